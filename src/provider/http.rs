//! Sending one request body and reading the answer whole.
//!
//! Plain-`http://` endpoints are local or in-house inference servers (vLLM, llama.cpp,
//! Ollama, LM Studio): they answer fast, and the client's own CPU per call is what limits a
//! run. Those go through [`Pool`], HTTP/1.1 connections kept open on hyper, one per request
//! in flight. `https://` endpoints (OpenAI, OpenRouter, Anthropic) and any endpoint while a
//! proxy variable is set go through reqwest, for its TLS, HTTP/2 and proxy handling; a
//! remote API's latency dwarfs what the client costs there.

use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{CONTENT_TYPE, HOST, HeaderMap, HeaderValue, USER_AGENT};
use hyper::{Request, Uri};

/// How long opening a connection may take before the attempt fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// An answer read whole.
pub struct Answer {
    pub status: u16,
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
                let headers = response.headers().clone();
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
pub struct Pool {
    /// `host:port` to connect to.
    address: String,
    /// The request target: the endpoint's path and query.
    target: Uri,
    /// Sent with every request, `host` included.
    headers: HeaderMap,
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
    /// Idle connections kept at most.
    keep: usize,
    timeout: Duration,
}

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
        let target = uri.path_and_query()?.as_str().parse().ok()?;
        let mut headers = headers.clone();
        headers.insert(HOST, host);
        Some(Pool {
            address,
            target,
            headers,
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
        let mut request = Request::post(self.target.clone())
            .body(Full::new(body))
            .map_err(|e| Failure::Broken(e.to_string()))?;
        *request.headers_mut() = self.headers.clone();
        loop {
            let (mut connection, reused) = match self.take() {
                Some(connection) => (connection, true),
                None => (self.connect().await?, false),
            };
            // A kept connection the server closed before the request went out (servers close
            // idle connections whenever they like): the request goes on another connection.
            // Once any of it is written, a failure is the server's and keg's retries decide.
            if let Err(err) = connection.ready().await {
                if reused {
                    continue;
                }
                return Err(Failure::Broken(super::root_cause(&err)));
            }
            let response = match connection.try_send_request(request).await {
                Ok(response) => response,
                Err(mut err) => match err.take_message() {
                    Some(unsent) if reused => {
                        request = unsent;
                        continue;
                    }
                    _ => return Err(Failure::Broken(super::root_cause(&err.into_error()))),
                },
            };
            let (parts, body) = response.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| Failure::Broken(super::root_cause(&e)))?
                .to_bytes();
            self.give_back(connection);
            return Ok(Answer {
                status: parts.status.as_u16(),
                headers: parts.headers,
                body,
            });
        }
    }

    /// An idle connection still open, if there is one.
    fn take(&self) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(connection) = idle.pop() {
            if !connection.is_closed() {
                return Some(connection);
            }
        }
        None
    }

    fn give_back(&self, connection: SendRequest<Full<Bytes>>) {
        if connection.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.keep {
            idle.push(connection);
        }
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, Failure> {
        let stream = match tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect(&self.address),
        )
        .await
        {
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
        let (sender, connection) = http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| Failure::Connect(super::root_cause(&e)))?;
        // The connection is driven on the runtime until the server closes it or its last
        // handle (the sender) is dropped.
        tokio::spawn(connection);
        Ok(sender)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A server answering every request on each connection with `answer` (and then closing
    /// the connection unannounced, when `hang_up`); returns its address and what it
    /// received, one entry per request.
    fn server(answer: &'static [u8], hang_up: bool) -> (String, std::sync::mpsc::Receiver<String>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let (seen, received) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let (Ok(mut stream), seen) = (stream, seen.clone()) else {
                    return;
                };
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
                        if stream.write_all(answer).is_err() || hang_up {
                            return;
                        }
                    }
                });
            }
        });
        (address, received)
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
        let endpoint = format!("http://{}/v1", closed.local_addr().unwrap());
        drop(closed);
        for transport in both(&endpoint, Duration::from_secs(5)) {
            match transport.post(Bytes::new()).await {
                Err(Failure::Connect(cause)) => {
                    assert_eq!(cause, "Connection refused (os error 111)")
                }
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
}
