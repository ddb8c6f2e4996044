//! Sending one request body and reading the answer whole.
//!
//! Plain-`http://` endpoints are local or in-house inference servers (vLLM, llama.cpp,
//! Ollama, LM Studio): they answer fast, and the client's own CPU per call is what limits a
//! run. Those go through [`Pool`], HTTP/1.1 connections kept open, one per request in
//! flight, each exchange written and read in the caller's task with `httparse` reading the
//! answer's head. `https://` endpoints (OpenAI, OpenRouter, Anthropic) and any endpoint while
//! a proxy variable is set go through reqwest, for its TLS, HTTP/2 and proxy handling; a
//! remote API's latency dwarfs what the client costs there.

use std::io::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use ::http::Uri;
use ::http::header::{
    CONTENT_LENGTH, CONTENT_TYPE, HOST, HeaderMap, HeaderName, HeaderValue, USER_AGENT,
};
use bytes::{Buf, Bytes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::lock;

/// How long opening a connection may take before the attempt fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// An answer read whole.
pub struct Answer {
    pub status: u16,
    /// The answer's headers when it is not a success (2xx); empty for a success, whose
    /// headers nothing reads.
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Why no answer came.
#[derive(Debug)]
pub enum Failure {
    /// Nothing within the provider's `timeout_secs`.
    Timeout,
    /// The server could not be reached; the root cause.
    Connect(String),
    /// The connection broke, or the URL is unusable; the root cause.
    Broken(String),
}

/// How a provider's requests travel.
pub enum Transport {
    Pooled(Pool),
    Client {
        client: reqwest::Client,
        /// The endpoint parsed once, not per request; `None` when it does not parse (each
        /// request then fails with the URL error).
        url: Option<reqwest::Url>,
        endpoint: String,
    },
}

/// The variables reqwest reads a proxy for `http://` from.
const PROXY_VARIABLES: &[&str] = &["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"];

impl Transport {
    /// `headers` go with every request (the key among them, marked sensitive), besides
    /// `content-type: application/json` and keg's user agent. `concurrency` connections are
    /// kept open at most.
    pub fn new(
        endpoint: &str,
        headers: HeaderMap,
        timeout: Duration,
        concurrency: usize,
    ) -> Result<Transport, String> {
        let headers = with_standard_headers(headers);
        let proxied = PROXY_VARIABLES
            .iter()
            .any(|var| std::env::var_os(var).is_some_and(|v| !v.is_empty()));
        match Pool::new(endpoint, &headers, timeout, concurrency) {
            Some(pool) if !proxied => Ok(Transport::Pooled(pool)),
            _ => Transport::client(endpoint, headers, timeout, concurrency),
        }
    }

    /// Through reqwest, whatever the scheme.
    fn client(
        endpoint: &str,
        headers: HeaderMap,
        timeout: Duration,
        concurrency: usize,
    ) -> Result<Transport, String> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_max_idle_per_host(concurrency)
            .default_headers(headers)
            // A redirected POST is answered with the redirect, as in the pool: the user
            // should fix `base_url` rather than pay a round trip per call.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
        Ok(Transport::Client {
            client,
            url: reqwest::Url::parse(endpoint).ok(),
            endpoint: endpoint.to_owned(),
        })
    }

    /// POST `body` and read the answer whole, whatever its status.
    pub async fn post(&self, body: Bytes) -> Result<Answer, Failure> {
        match self {
            Transport::Pooled(pool) => pool.post(body).await,
            Transport::Client {
                client,
                url,
                endpoint,
            } => {
                let request = match url {
                    Some(url) => client.post(url.clone()),
                    None => client.post(endpoint),
                };
                let response = request.body(body).send().await.map_err(reqwest_failure)?;
                let status = response.status().as_u16();
                let headers = if response.status().is_success() {
                    HeaderMap::new()
                } else {
                    response.headers().clone()
                };
                let body = response.bytes().await.map_err(reqwest_failure)?;
                Ok(Answer {
                    status,
                    headers,
                    body,
                })
            }
        }
    }
}

/// `headers` plus what every request carries: the JSON content type and keg's user agent.
fn with_standard_headers(mut headers: HeaderMap) -> HeaderMap {
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(
        USER_AGENT,
        HeaderValue::from_static(concat!("keg/", env!("CARGO_PKG_VERSION"))),
    );
    headers
}

fn reqwest_failure(err: reqwest::Error) -> Failure {
    if err.is_timeout() {
        Failure::Timeout
    } else if err.is_connect() {
        Failure::Connect(super::root_cause(&err))
    } else {
        Failure::Broken(super::root_cause(&err))
    }
}

/// HTTP/1.1 connections to one `http://` endpoint, kept open between requests.
///
/// Each exchange is driven in the caller's own task: the request is written whole in one
/// system call and the answer read into the connection's own buffer, parsed by `httparse`.
/// There is no connection task, no channel between the caller and the connection, and no
/// buffer made per answer: at a local server's pace, that is most of what a call costs
/// besides the kernel's share (see BENCHMARKS.md, change 40).
pub struct Pool {
    /// `host:port` to connect to.
    address: String,
    /// The request up to the value of its `content-length`: the request line and every
    /// header, `host` included.
    head: Vec<u8>,
    idle: Mutex<Vec<Connection>>,
    /// Idle connections kept at most.
    keep: usize,
    timeout: Duration,
}

/// One open connection and its buffer, kept between exchanges.
struct Connection {
    stream: TcpStream,
    /// What was read of the answer.
    read: Vec<u8>,
}

/// Headers an answer may have at most.
const MAX_HEADERS: usize = 100;

/// Read at least this much room at a time.
const READ_ROOM: usize = 8 * 1024;

/// A connection's read buffer grown past this by a long answer is not kept for the next: a
/// few long answers would otherwise hold that much for every connection.
const KEPT_BUFFER: usize = 64 * 1024;

/// An answer's head (status line and headers) may be this long at most.
const MAX_HEAD: usize = 256 * 1024;

impl Pool {
    /// `None` unless `endpoint` is a plain `http://` URL.
    fn new(
        endpoint: &str,
        headers: &HeaderMap,
        timeout: Duration,
        concurrency: usize,
    ) -> Option<Pool> {
        let uri: Uri = endpoint.parse().ok()?;
        if uri.scheme_str() != Some("http") {
            return None;
        }
        let authority = uri.authority()?;
        let host = HeaderValue::from_str(authority.as_str()).ok()?;
        let address = format!(
            "{}:{}",
            authority.host(),
            authority.port_u16().unwrap_or(80)
        );
        let target = uri.path_and_query()?.as_str();
        let mut head = Vec::with_capacity(512);
        head.extend_from_slice(b"POST ");
        head.extend_from_slice(target.as_bytes());
        head.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        head.extend_from_slice(host.as_bytes());
        for (name, value) in headers {
            if name == HOST || name == CONTENT_LENGTH {
                continue;
            }
            head.extend_from_slice(b"\r\n");
            head.extend_from_slice(name.as_str().as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
        }
        head.extend_from_slice(b"\r\ncontent-length: ");
        Some(Pool {
            address,
            head,
            idle: Mutex::new(Vec::with_capacity(concurrency)),
            keep: concurrency,
            timeout,
        })
    }

    async fn post(&self, body: Bytes) -> Result<Answer, Failure> {
        tokio::time::timeout(self.timeout, self.exchange(body))
            .await
            .unwrap_or(Err(Failure::Timeout))
    }

    async fn exchange(&self, body: Bytes) -> Result<Answer, Failure> {
        let mut connection = match self.take() {
            Some(connection) => connection,
            None => self.connect().await?,
        };
        let mut length = [0; 24];
        let room = length.len();
        let written = {
            let mut at = &mut length[..];
            let _ = write!(at, "{}\r\n\r\n", body.len());
            room - at.len()
        };
        // One system call (`writev`) for the head, its length and the body, not copied.
        let mut request = Buf::chain(Buf::chain(&self.head[..], &length[..written]), &body[..]);
        connection
            .stream
            .write_all_buf(&mut request)
            .await
            .map_err(|e| Failure::Broken(super::root_cause(&e)))?;
        let (answer, reusable) = connection.answer().await?;
        if reusable {
            if connection.read.capacity() > KEPT_BUFFER {
                connection.read = Vec::new();
            }
            self.give_back(connection);
        }
        Ok(answer)
    }

    /// An idle connection still open, if there is one. A server closes idle connections
    /// whenever it likes; one whose close (or anything else) has arrived is not reused. The
    /// probe rarely costs a system call: the runtime knows a connection is not readable
    /// once a read came back short, as the answer's last read does, until something arrives.
    fn take(&self) -> Option<Connection> {
        let mut idle = lock(&self.idle);
        while let Some(connection) = idle.pop() {
            let mut probe = [0; 1];
            if let Err(err) = connection.stream.try_read(&mut probe)
                && err.kind() == std::io::ErrorKind::WouldBlock
            {
                return Some(connection);
            }
        }
        None
    }

    fn give_back(&self, connection: Connection) {
        let mut idle = lock(&self.idle);
        if idle.len() < self.keep {
            idle.push(connection);
        }
    }

    async fn connect(&self) -> Result<Connection, Failure> {
        let stream =
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.address)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(err)) => return Err(Failure::Connect(super::root_cause(&err))),
                Err(_) => {
                    return Err(Failure::Connect(format!(
                        "no connection within {} s",
                        CONNECT_TIMEOUT.as_secs()
                    )));
                }
            };
        // Requests are written whole; waiting to coalesce them only adds latency.
        let _ = stream.set_nodelay(true);
        Ok(Connection {
            stream,
            read: Vec::new(),
        })
    }
}

/// How an answer's body ends.
enum Framing {
    Length(usize),
    Chunked,
    /// At the end of the connection.
    Close,
}

/// An answer's head, parsed.
struct Head {
    status: u16,
    headers: HeaderMap,
    framing: Framing,
    /// Whether the server keeps the connection open after this answer.
    keep_alive: bool,
    /// Where the body starts in the connection's buffer.
    body_from: usize,
}

/// What the start of a read buffer holds.
enum Parsed {
    /// Not yet a whole head.
    Partial,
    /// An interim answer (`100 Continue` and the like) this long; the real one follows.
    Interim(usize),
    Head(Head),
}

/// Parse the head at the start of `read`. Not part of a future: the header slots live on
/// the stack only while it runs, not in every call's task across its waits.
fn parse_head(read: &[u8]) -> Result<Parsed, Failure> {
    // Left unwritten until parsed into, as hyper does: 3.2 KB the parser would only overwrite.
    let mut slots = [std::mem::MaybeUninit::<httparse::Header>::uninit(); MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        read,
        &mut slots,
    );
    let end = match parsed {
        Ok(httparse::Status::Complete(end)) => end,
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(err) => return Err(malformed(err)),
    };
    let status = response.code.unwrap_or(0);
    if (100..200).contains(&status) && status != 101 {
        return Ok(Parsed::Interim(end));
    }
    // Only an answer that is not a success has its headers read (a wait asked for, a
    // redirect's target): a success is framed and read without building a map.
    let mut headers = HeaderMap::new();
    let keep = !(200..300).contains(&status);
    let (mut length, mut chunked, mut close) = (None, false, response.version == Some(0));
    for header in response.headers.iter() {
        let name = header.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            let this = std::str::from_utf8(header.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok());
            length = match (this, length) {
                (Some(this), None) => Some(this),
                (Some(this), Some(before)) if this == before => Some(this),
                _ => return Err(malformed("an unreadable content-length")),
            };
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            chunked = has_token(header.value, b"chunked");
        } else if name.eq_ignore_ascii_case(b"connection") {
            if has_token(header.value, b"close") {
                close = true;
            } else if has_token(header.value, b"keep-alive") {
                close = false;
            }
        }
        if keep {
            headers.append(
                HeaderName::from_bytes(name).map_err(malformed)?,
                HeaderValue::from_bytes(header.value).map_err(malformed)?,
            );
        }
    }
    let framing = if status == 204 || status == 304 {
        Framing::Length(0)
    } else if chunked {
        Framing::Chunked
    } else if let Some(length) = length {
        Framing::Length(length)
    } else {
        Framing::Close
    };
    Ok(Parsed::Head(Head {
        status,
        headers,
        framing,
        keep_alive: !close,
        body_from: end,
    }))
}

impl Connection {
    /// Read one answer whole; also whether the connection may carry another request.
    async fn answer(&mut self) -> Result<(Answer, bool), Failure> {
        self.read.clear();
        let Head {
            status,
            headers,
            framing,
            keep_alive: mut reusable,
            body_from,
        } = loop {
            match parse_head(&self.read)? {
                Parsed::Head(head) => break head,
                // The real answer follows.
                Parsed::Interim(end) => {
                    self.read.drain(..end);
                }
                // Read more: what has arrived (maybe nothing) is not a whole head yet.
                Parsed::Partial if self.read.len() < MAX_HEAD => {
                    if self.fill().await? == 0 {
                        return Err(if self.read.is_empty() {
                            Failure::Broken(
                                "the server closed the connection before answering".into(),
                            )
                        } else {
                            cut_short()
                        });
                    }
                }
                Parsed::Partial => {
                    return Err(Failure::Broken(format!(
                        "the answer's headers are longer than {} KB",
                        MAX_HEAD / 1024
                    )));
                }
            }
        };
        let body = match framing {
            Framing::Length(length) => {
                while self.read.len() - body_from < length {
                    if self.fill().await? == 0 {
                        return Err(cut_short());
                    }
                }
                // Bytes after the body were never asked for: the connection is not reused.
                reusable &= self.read.len() - body_from == length;
                Bytes::copy_from_slice(&self.read[body_from..body_from + length])
            }
            Framing::Chunked => {
                let (body, end) = self.chunked(body_from).await?;
                reusable &= self.read.len() == end;
                body
            }
            Framing::Close => {
                while self.fill().await? != 0 {}
                reusable = false;
                Bytes::copy_from_slice(&self.read[body_from..])
            }
        };
        Ok((
            Answer {
                status,
                headers,
                body,
            },
            reusable,
        ))
    }

    /// A chunked body starting at `at` in what is read: the body, and where it ends.
    async fn chunked(&mut self, mut at: usize) -> Result<(Bytes, usize), Failure> {
        let mut body = Vec::new();
        loop {
            let (size_end, size) = loop {
                match httparse::parse_chunk_size(&self.read[at..]) {
                    Ok(httparse::Status::Complete((end, size))) => break (end, size),
                    Ok(httparse::Status::Partial) => {
                        if self.fill().await? == 0 {
                            return Err(cut_short());
                        }
                    }
                    Err(_) => return Err(malformed("a bad chunk size")),
                }
            };
            at += size_end;
            let size = usize::try_from(size).map_err(|_| malformed("a bad chunk size"))?;
            if size == 0 {
                // Trailers, if any, then the empty line.
                loop {
                    if let Some(line) = memchr::memmem::find(&self.read[at..], b"\r\n") {
                        at += line + 2;
                        if line == 0 {
                            return Ok((Bytes::from(body), at));
                        }
                    } else if self.fill().await? == 0 {
                        return Err(cut_short());
                    }
                }
            }
            while self.read.len() < at + size + 2 {
                if self.fill().await? == 0 {
                    return Err(cut_short());
                }
            }
            if &self.read[at + size..at + size + 2] != b"\r\n" {
                return Err(malformed("a chunk longer than its size"));
            }
            body.extend_from_slice(&self.read[at..at + size]);
            at += size + 2;
        }
    }

    /// Read what has arrived onto `read`; 0 at the end of the connection.
    async fn fill(&mut self) -> Result<usize, Failure> {
        if self.read.capacity() - self.read.len() < READ_ROOM / 2 {
            self.read.reserve(READ_ROOM);
        }
        self.stream
            .read_buf(&mut self.read)
            .await
            .map_err(|e| Failure::Broken(super::root_cause(&e)))
    }
}

fn malformed(what: impl std::fmt::Display) -> Failure {
    Failure::Broken(format!("the server's answer is not valid HTTP/1.1: {what}"))
}

fn cut_short() -> Failure {
    Failure::Broken("the server closed the connection before the answer was whole".into())
}

/// Whether a comma-separated header value holds `token`, in any case.
fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|part| part.trim_ascii().eq_ignore_ascii_case(token))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A server answering every request on each connection with `answer` (and then closing
    /// the connection unannounced, when `hang_up`); returns its address and what it
    /// received, one entry per request.
    fn server(answer: &'static [u8], hang_up: bool) -> (String, std::sync::mpsc::Receiver<String>) {
        let (address, received, _) = serve(answer, hang_up, usize::MAX);
        (address, received)
    }

    /// [`server`], writing each answer in pieces of `piece` bytes a millisecond apart; also
    /// counts the connections it accepted.
    fn serve(
        answer: &'static [u8],
        hang_up: bool,
        piece: usize,
    ) -> (
        String,
        std::sync::mpsc::Receiver<String>,
        std::sync::Arc<std::sync::atomic::AtomicUsize>,
    ) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let (seen, received) = std::sync::mpsc::channel();
        let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let accepted = connections.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let (Ok(mut stream), seen) = (stream, seen.clone()) else {
                    return;
                };
                accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = stream.set_nodelay(true);
                std::thread::spawn(move || {
                    let mut buffer = Vec::new();
                    let mut chunk = [0; 4096];
                    while let Ok(n @ 1..) = stream.read(&mut chunk) {
                        buffer.extend_from_slice(&chunk[..n]);
                        let text = String::from_utf8_lossy(&buffer).into_owned();
                        let Some(end) = text.find("\r\n\r\n") else {
                            continue;
                        };
                        let length: usize = text
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        if buffer.len() < end + 4 + length {
                            continue;
                        }
                        let _ = seen.send(text[..end + 4 + length].to_owned());
                        buffer.drain(..end + 4 + length);
                        for part in answer.chunks(piece) {
                            if stream.write_all(part).is_err() {
                                return;
                            }
                            if piece < answer.len() {
                                std::thread::sleep(Duration::from_millis(1));
                            }
                        }
                        if hang_up {
                            return;
                        }
                    }
                });
            }
        });
        (address, received, connections)
    }

    /// The pool and reqwest, whatever proxy variables the tests run with.
    fn both(endpoint: &str, timeout: Duration) -> [Transport; 2] {
        let mut headers = HeaderMap::new();
        headers.insert("x-title", HeaderValue::from_static("keg docs"));
        let headers = with_standard_headers(headers);
        let pool = Pool::new(endpoint, &headers, timeout, 2).unwrap();
        let client = Transport::client(endpoint, headers, timeout, 2).unwrap();
        [Transport::Pooled(pool), client]
    }

    #[tokio::test]
    async fn both_transports_send_and_read_the_same() {
        let (address, received) = server(
            b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 3\r\ncontent-length: 5\r\n\r\nslow!",
            false,
        );
        let endpoint = format!("http://{address}/v1/chat/completions");
        for transport in both(&endpoint, Duration::from_secs(5)) {
            for _ in 0..2 {
                let answer = transport
                    .post(Bytes::from_static(br#"{"model":"m"}"#))
                    .await
                    .ok()
                    .unwrap();
                assert_eq!(answer.status, 429);
                assert_eq!(answer.headers["retry-after"], "3");
                assert_eq!(&answer.body[..], b"slow!");
                let request = received.recv().unwrap().to_ascii_lowercase();
                assert!(
                    request.starts_with("post /v1/chat/completions http/1.1\r\n"),
                    "{request}"
                );
                for line in [
                    format!("host: {address}"),
                    "content-type: application/json".into(),
                    format!("user-agent: keg/{}", env!("CARGO_PKG_VERSION")),
                    "x-title: keg docs".into(),
                    "content-length: 13".into(),
                ] {
                    assert!(
                        request.contains(&format!("\r\n{line}\r\n")),
                        "{line}: {request}"
                    );
                }
                assert!(request.ends_with("\r\n\r\n{\"model\":\"m\"}"), "{request}");
            }
        }
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_is_not_reused() {
        let (address, received) = server(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}", true);
        let endpoint = format!("http://{address}/v1/chat/completions");
        for transport in both(&endpoint, Duration::from_secs(5)) {
            for _ in 0..5 {
                match transport.post(Bytes::from_static(b"{}")).await {
                    Ok(answer) => {
                        assert_eq!((answer.status, &answer.body[..]), (200, &b"{}"[..]))
                    }
                    Err(failure) => panic!("{failure:?}"),
                }
                // Time for the hang-up to arrive: a request sent in the same instant races
                // it, and that failure is left to keg's retries.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        assert_eq!(received.try_iter().count(), 10);
    }

    #[tokio::test]
    async fn a_refused_connection_and_a_silent_server_are_told_apart() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = closed.local_addr().unwrap();
        let endpoint = format!("http://{address}/v1");
        drop(closed);
        // The cause is the system's own words, which differ between systems.
        let refused = std::net::TcpStream::connect(address).unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
        for transport in both(&endpoint, Duration::from_secs(5)) {
            match transport.post(Bytes::new()).await {
                Err(Failure::Connect(cause)) => assert_eq!(cause, refused.to_string()),
                _ => panic!("not a connection failure"),
            }
        }
        // Accepts, reads, never answers.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}/v1", silent.local_addr().unwrap());
        for transport in both(&endpoint, Duration::from_millis(200)) {
            assert!(matches!(
                transport.post(Bytes::new()).await,
                Err(Failure::Timeout)
            ));
        }
        drop(silent);
    }

    #[tokio::test]
    async fn answers_are_read_whole_however_they_end_and_arrive() {
        // (answer, whether the server closes after it, connections for three requests)
        let cases: [(&'static [u8], bool, usize); 6] = [
            // A length (header names are read in any case).
            (
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n{\"a\":1}",
                false,
                1,
            ),
            // Chunks, with an extension and a trailer.
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;x=y\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\nx-trailer: t\r\n\r\n",
                false,
                1,
            ),
            // An interim answer first.
            (
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n{\"a\":1}",
                false,
                1,
            ),
            // No length: the body ends with the connection.
            (b"HTTP/1.0 200 OK\r\n\r\n{\"a\":1}", true, 3),
            // A length, and the server says it closes.
            (
                b"HTTP/1.1 200 OK\r\nCONNECTION: Close\r\ncontent-length: 7\r\n\r\n{\"a\":1}",
                true,
                3,
            ),
            // No content.
            (b"HTTP/1.1 204 No Content\r\nx-n: 1\r\n\r\n", false, 1),
        ];
        for (case, closes, expected) in cases {
            let status = if case.starts_with(b"HTTP/1.1 204") {
                204
            } else {
                200
            };
            let body: &[u8] = if status == 204 { b"" } else { b"{\"a\":1}" };
            for (which, transport, connections) in both_to(case, closes) {
                for _ in 0..3 {
                    let answer = match transport.post(Bytes::from_static(b"{}")).await {
                        Ok(answer) => answer,
                        Err(failure) => panic!("{which}, {failure:?}"),
                    };
                    assert_eq!(
                        (answer.status, &answer.body[..]),
                        (status, body),
                        "{which}: {}",
                        String::from_utf8_lossy(case)
                    );
                    // Time for a closing server's hang-up to arrive.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                assert_eq!(
                    connections.load(std::sync::atomic::Ordering::SeqCst),
                    expected,
                    "{which}: {}",
                    String::from_utf8_lossy(case)
                );
            }
        }
    }

    /// Each transport against its own server giving `answer` whole, and against another
    /// giving it in pieces of 5 bytes.
    fn both_to(
        answer: &'static [u8],
        closes: bool,
    ) -> Vec<(
        String,
        Transport,
        std::sync::Arc<std::sync::atomic::AtomicUsize>,
    )> {
        let mut transports = Vec::new();
        for (how, piece) in [("whole", usize::MAX), ("in pieces", 5)] {
            for which in ["pool", "reqwest"] {
                let (address, _, connections) = serve(answer, closes, piece);
                let endpoint = format!("http://{address}/v1/chat/completions");
                let [pool, client] = both(&endpoint, Duration::from_secs(5));
                let transport = if which == "pool" { pool } else { client };
                transports.push((format!("{which}, {how}"), transport, connections));
            }
        }
        transports
    }

    #[tokio::test]
    async fn a_broken_answer_says_what_was_wrong() {
        let cases: [(&'static [u8], &str); 5] = [
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n{\"a\"",
                "the server closed the connection before the answer was whole",
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-le",
                "the server closed the connection before the answer was whole",
            ),
            (b"", "the server closed the connection before answering"),
            (
                b"SMTP ready\r\n\r\n",
                "the server's answer is not valid HTTP/1.1: invalid HTTP version",
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n{}",
                "the server's answer is not valid HTTP/1.1: an unreadable content-length",
            ),
        ];
        for (answer, expected) in cases {
            let (address, _, _) = serve(answer, true, usize::MAX);
            let endpoint = format!("http://{address}/v1");
            let [pool, _] = both(&endpoint, Duration::from_secs(5));
            match pool.post(Bytes::from_static(b"{}")).await {
                Err(Failure::Broken(cause)) => assert_eq!(cause, expected),
                Err(failure) => panic!("{failure:?}"),
                Ok(answer) => panic!("answered {}", answer.status),
            }
        }
    }
}
