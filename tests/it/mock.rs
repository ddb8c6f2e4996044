//! An in-process mock LLM server, for integration tests: three wire formats, and faults
//! injected deterministically.
//!
//! The server runs on its own tokio runtime on a background thread, so test code stays
//! synchronous and can run the real `keg` binary as a subprocess against it. It listens on
//! 127.0.0.1 only, on a port chosen by the OS, and stops when the [`MockLlm`] is dropped.
//!
//! Endpoints (every one answers with the same deterministic pairs for the same last user
//! message: `{"pairs":[{"question":"…","answer":"…"}, …]}`):
//! - `POST /v1/chat/completions` ([`MockLlm::base_url`]): an OpenAI chat completion whose
//!   content is the pairs' JSON text.
//! - `POST /api/chat` ([`MockLlm::root_url`]): an Ollama chat reply (`stream` is ignored:
//!   always one JSON object), `message.content` the pairs' JSON text.
//! - `POST /v1/messages` ([`MockLlm::root_url`]): an Anthropic message; when the request
//!   offers tools, a `tool_use` block of the first tool whose `input` is the pairs object,
//!   else a text block.
//! - `GET /v1/models`: `{"object":"list","data":[{"id":"mock","object":"model"}]}`.
//! - `GET /health`: `{"status":"ok"}`.
//!
//! Faults ([`Faults`]) are chosen by a seeded hash of the last user message, so the same
//! requests meet the same faults whatever order they arrive in. Transient faults (429, 500,
//! connection reset, slow reply) hit the first [`Faults::times`] attempts of a picked message
//! and then let it through, so a client that retries gets a complete answer; content faults
//! (malformed, truncated) hit every attempt, as a model's bad answer would be cached.

#![allow(dead_code)] // each test module uses only part of the API

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use axum::body::Bytes;
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::IncomingStream;
use axum::{Json, Router};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// Seed of the jitter RNG: the jitter of the k-th request since start (or the last reset) is a
/// pure function of this seed and k, so runs are reproducible.
const JITTER_SEED: u64 = 0x6b65_676c_696e_6531;

/// How the mock answers.
#[derive(Clone, Debug)]
pub struct Behavior {
    /// Fixed delay before each reply.
    pub latency: Duration,
    /// Extra random delay in [0, jitter) per request (seeded RNG, so completion order is shuffled
    /// relative to arrival order, reproducibly).
    pub jitter: Duration,
    /// If set, the number of items to put in every reply; otherwise parse it from the LAST user
    /// message: the first integer N that appears before the word "pairs" or "questions" or
    /// "items" (e.g. "Write 3 question-answer pairs"), defaulting to 2 if none.
    pub items: Option<usize>,
    /// If set, answer every request with this HTTP status and an error body in the endpoint's
    /// format, message `mock error <status>` (OpenAI:
    /// `{"error":{"message":"mock error <status>","type":"mock"}}`).
    pub fail_status: Option<u16>,
    /// Error messages quote the credential the request carried (`mock error 401: invalid key
    /// <key>`), as some servers do: a client must not pass that on.
    pub error_echoes_key: bool,
    pub faults: Faults,
}

impl Default for Behavior {
    fn default() -> Self {
        Behavior {
            latency: Duration::ZERO,
            jitter: Duration::ZERO,
            items: None,
            fail_status: None,
            error_echoes_key: false,
            faults: Faults::default(),
        }
    }
}

/// Faults to inject. The shares are fractions of distinct user messages, laid end to end on
/// [0, 1) in the order of the fields (a message falls in at most one share); each message's
/// point on that line is a seeded hash of its text.
#[derive(Clone, Debug)]
pub struct Faults {
    pub seed: u64,
    /// Share answered 429 Too Many Requests, carrying [`Faults::retry_after`].
    pub rate_limit: f64,
    pub retry_after: RetryAfter,
    /// Share answered 500 with an error body.
    pub server_error: f64,
    /// Share whose connection is reset (RST, no response at all).
    pub reset: f64,
    /// Share answered normally after [`Faults::slow_delay`] more.
    pub slow: f64,
    pub slow_delay: Duration,
    /// Share answered 200 with content that is not JSON and holds none (every attempt).
    pub malformed: f64,
    /// Share answered 200 with the JSON inside prose and a code fence, with a trailing comma:
    /// broken, but safely repairable (every attempt).
    pub repairable: f64,
    /// Share answered 200 with the first half of the JSON and finish reason `length`
    /// (Ollama `done_reason: length`, Anthropic `stop_reason: max_tokens`) (every attempt).
    pub truncated: f64,
    /// How many attempts of a message a transient fault hits before it is let through.
    pub times: usize,
    /// If set, a request arriving while this many are already being answered gets a 429
    /// (with [`Faults::retry_after`]), like a server with a fixed number of slots.
    pub capacity: Option<usize>,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            seed: 0,
            rate_limit: 0.0,
            retry_after: RetryAfter::Seconds(0),
            server_error: 0.0,
            reset: 0.0,
            slow: 0.0,
            slow_delay: Duration::ZERO,
            malformed: 0.0,
            repairable: 0.0,
            truncated: 0.0,
            times: 1,
            capacity: None,
        }
    }
}

/// What a 429 asks the client to wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryAfter {
    None,
    /// `Retry-After: <n>`
    Seconds(u64),
    /// `Retry-After: <HTTP-date n seconds from now>`
    Date(u64),
    /// `retry-after-ms: <n>`
    Millis(u64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    RateLimit,
    ServerError,
    Reset,
    Slow,
    Malformed,
    Repairable,
    Truncated,
}

impl Fault {
    /// The key [`MockLlm::injected`] counts it under.
    pub fn name(self) -> &'static str {
        match self {
            Fault::RateLimit => "rate_limit",
            Fault::ServerError => "server_error",
            Fault::Reset => "reset",
            Fault::Slow => "slow",
            Fault::Malformed => "malformed",
            Fault::Repairable => "repairable",
            Fault::Truncated => "truncated",
        }
    }

    /// A fault a retry gets past.
    pub fn transient(self) -> bool {
        !matches!(
            self,
            Fault::Malformed | Fault::Repairable | Fault::Truncated
        )
    }
}

impl Faults {
    /// The fault picked for requests whose last user message is `user`, if any.
    pub fn pick(&self, user: &str) -> Option<Fault> {
        let point = unit_interval(self.seed, user);
        let mut edge = 0.0;
        for (fault, share) in [
            (Fault::RateLimit, self.rate_limit),
            (Fault::ServerError, self.server_error),
            (Fault::Reset, self.reset),
            (Fault::Slow, self.slow),
            (Fault::Malformed, self.malformed),
            (Fault::Repairable, self.repairable),
            (Fault::Truncated, self.truncated),
        ] {
            edge += share;
            if point < edge {
                return Some(fault);
            }
        }
        None
    }
}

/// A point in [0, 1) from blake3 of the seed and the text.
fn unit_interval(seed: u64, text: &str) -> f64 {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&seed.to_le_bytes());
    hasher.update(text.as_bytes());
    let bytes = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&bytes.as_bytes()[..8]);
    (u64::from_le_bytes(first) >> 11) as f64 / (1u64 << 53) as f64
}

/// The wire formats the mock speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    OpenAi,
    Ollama,
    Anthropic,
}

impl Api {
    pub fn path(self) -> &'static str {
        match self {
            Api::OpenAi => "/v1/chat/completions",
            Api::Ollama => "/api/chat",
            Api::Anthropic => "/v1/messages",
        }
    }
}

/// What the server has received since start or the last [`MockLlm::reset`].
#[derive(Default)]
struct Log {
    /// Number of LLM requests, all endpoints (also the next arrival index).
    requests: usize,
    apis: Vec<Api>,
    bodies: Vec<Value>,
    auth_headers: Vec<Option<String>>,
    headers: Vec<HeaderMap>,
    /// Attempts so far per last user message.
    attempts: HashMap<String, usize>,
    injected: BTreeMap<&'static str, usize>,
    max_in_flight: usize,
    arrivals: Vec<Instant>,
}

struct Shared {
    behavior: Behavior,
    log: Mutex<Log>,
    in_flight: AtomicUsize,
    /// TCP connections accepted so far.
    connections: Arc<AtomicUsize>,
}

impl Shared {
    fn log(&self) -> MutexGuard<'_, Log> {
        // A panicking test thread must not poison the log for the others.
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running mock server; dropping it shuts the server down.
pub struct MockLlm {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl MockLlm {
    /// Start on 127.0.0.1:0 on a background thread with its own runtime; returns once listening.
    pub fn start(behavior: Behavior) -> MockLlm {
        let shared = Arc::new(Shared {
            behavior,
            log: Mutex::new(Log::default()),
            in_flight: AtomicUsize::new(0),
            connections: Arc::default(),
        });
        let (addr_tx, addr_rx) = std::sync::mpsc::channel::<io::Result<SocketAddr>>();
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let app = router(shared.clone());
        let connections = shared.connections.clone();
        let thread = std::thread::Builder::new()
            .name("mock-llm".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("mock-llm-worker")
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = addr_tx.send(Err(e));
                        return;
                    }
                };
                rt.block_on(async move {
                    let listener = match bind().await {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = addr_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = addr_tx.send(listener.local_addr());
                    let listener = ResettableListener(listener, connections);
                    let app = app.into_make_service_with_connect_info::<Connection>();
                    // Not a graceful shutdown: in-flight requests (possibly sleeping for a long
                    // latency) are abandoned, and dropping the runtime below cancels their tasks.
                    tokio::select! {
                        res = axum::serve(listener, app) => {
                            if let Err(e) = res {
                                eprintln!("mock-llm: server error: {e}");
                            }
                        }
                        _ = shutdown_rx => {}
                    }
                });
                // Cancels every connection task still running (e.g. sleeping for latency).
                rt.shutdown_timeout(Duration::from_secs(1));
            })
            .expect("mock-llm: cannot spawn server thread");
        let addr = match addr_rx.recv() {
            Ok(Ok(addr)) => addr,
            Ok(Err(e)) => panic!("mock-llm: cannot start server: {e}"),
            Err(_) => panic!("mock-llm: server thread died during start"),
        };
        MockLlm {
            addr,
            shared,
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
        }
    }

    /// The OpenAI-compatible base URL, e.g. "http://127.0.0.1:43127/v1".
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The server root, the base URL of the Ollama and Anthropic APIs, e.g.
    /// "http://127.0.0.1:43127".
    pub fn root_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `host:port`, as `OLLAMA_HOST` takes it.
    pub fn host_port(&self) -> String {
        self.addr.to_string()
    }

    /// Number of LLM requests (all three endpoints) received so far.
    pub fn requests(&self) -> usize {
        self.shared.log().requests
    }

    /// Number of requests received at one endpoint.
    pub fn requests_to(&self, api: Api) -> usize {
        self.shared.log().apis.iter().filter(|a| **a == api).count()
    }

    /// The JSON bodies received, in arrival order. A body that is not valid JSON is recorded as
    /// a JSON string holding its text (lossily decoded).
    pub fn bodies(&self) -> Vec<Value> {
        self.shared.log().bodies.clone()
    }

    /// The `Authorization` header values received (None when absent), in arrival order.
    pub fn auth_headers(&self) -> Vec<Option<String>> {
        self.shared.log().auth_headers.clone()
    }

    /// The values of header `name` received (None when absent), in arrival order.
    pub fn header(&self, name: &str) -> Vec<Option<String>> {
        self.shared
            .log()
            .headers
            .iter()
            .map(|h| {
                h.get(name)
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            })
            .collect()
    }

    /// Faults injected so far, by [`Fault::name`] (and `capacity` for 429s over capacity).
    pub fn injected(&self) -> BTreeMap<&'static str, usize> {
        self.shared.log().injected.clone()
    }

    /// The number of faults of one kind injected so far.
    pub fn injected_count(&self, name: &str) -> usize {
        self.shared.log().injected.get(name).copied().unwrap_or(0)
    }

    /// The most requests being answered at once so far.
    pub fn max_in_flight(&self) -> usize {
        self.shared.log().max_in_flight
    }

    /// TCP connections accepted since the start (not cleared by [`MockLlm::reset`]).
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// When each LLM request arrived, in arrival order.
    pub fn arrivals(&self) -> Vec<Instant> {
        self.shared.log().arrivals.clone()
    }

    /// Reset the counters and logs (server keeps running). The jitter sequence and the
    /// per-message attempt counts restart too.
    pub fn reset(&self) {
        *self.shared.log() = Log::default();
    }
}

impl Drop for MockLlm {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Listen on 127.0.0.1 with an OS-chosen port and a large backlog (many concurrent connects).
async fn bind() -> io::Result<TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    socket.listen(1024)
}

// ---- Connection resets ----
//
// A handler cannot close its connection through axum, so every accepted socket is wrapped in
// [`ResettableStream`], and the handler reaches a switch on it through `ConnectInfo`. A handler
// that resets flips the switch and returns; when hyper then writes the response, the stream
// sets SO_LINGER to zero and fails the write, hyper drops the connection, and closing a socket
// with zero linger sends a TCP RST: the client sees "connection reset" with no response bytes.

/// The per-connection reset switch, handed to handlers as connect info.
#[derive(Clone, Debug, Default)]
pub struct Connection {
    reset: Arc<AtomicBool>,
}

impl Connection {
    fn reset(&self) {
        self.reset.store(true, Ordering::SeqCst);
    }
}

struct ResettableListener(TcpListener, Arc<AtomicUsize>);

impl axum::serve::Listener for ResettableListener {
    type Io = ResettableStream;
    type Addr = Connection;

    async fn accept(&mut self) -> (ResettableStream, Connection) {
        loop {
            match self.0.accept().await {
                Ok((tcp, _)) => {
                    self.1.fetch_add(1, Ordering::SeqCst);
                    let _ = tcp.set_nodelay(true);
                    let connection = Connection::default();
                    let stream = ResettableStream {
                        tcp,
                        reset: connection.reset.clone(),
                    };
                    return (stream, connection);
                }
                // e.g. too many open files: wait for some to close.
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Connection> {
        self.0.local_addr().map(|_| Connection::default())
    }
}

impl Connected<IncomingStream<'_, ResettableListener>> for Connection {
    fn connect_info(stream: IncomingStream<'_, ResettableListener>) -> Self {
        stream.remote_addr().clone()
    }
}

struct ResettableStream {
    tcp: TcpStream,
    reset: Arc<AtomicBool>,
}

impl ResettableStream {
    /// When the switch is on: arm the RST and fail the operation.
    fn check(&self) -> io::Result<()> {
        if self.reset.load(Ordering::SeqCst) {
            let _ = self.tcp.set_zero_linger();
            return Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "mock: reset",
            ));
        }
        Ok(())
    }
}

impl AsyncRead for ResettableStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check()?;
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for ResettableStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check()?;
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.check()?;
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check()?;
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check()?;
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

// ---- Routes ----

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(Api::OpenAi.path(), post(openai))
        .route(Api::Ollama.path(), post(ollama))
        .route(Api::Anthropic.path(), post(anthropic))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .layer(DefaultBodyLimit::max(256 * 1024 * 1024))
        .with_state(shared)
}

async fn health() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

async fn models(State(shared): State<Arc<Shared>>) -> Response {
    if let Some(status) = shared.behavior.fail_status {
        return error_response(Api::OpenAi, status, "");
    }
    Json(json!({"object": "list", "data": [{"id": "mock", "object": "model"}]})).into_response()
}

async fn openai(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(connection): ConnectInfo<Connection>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    answer(&shared, Api::OpenAi, &connection, headers, &body).await
}

async fn ollama(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(connection): ConnectInfo<Connection>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    answer(&shared, Api::Ollama, &connection, headers, &body).await
}

async fn anthropic(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(connection): ConnectInfo<Connection>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    answer(&shared, Api::Anthropic, &connection, headers, &body).await
}

/// Counts a request as being answered until dropped (also when the client goes away).
struct InFlight<'a>(&'a Shared);

impl<'a> InFlight<'a> {
    /// Enter, returning the guard and how many are being answered now, this one included.
    fn enter(shared: &'a Shared) -> (InFlight<'a>, usize) {
        let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        let mut log = shared.log();
        log.max_in_flight = log.max_in_flight.max(now);
        (InFlight(shared), now)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn answer(
    shared: &Shared,
    api: Api,
    connection: &Connection,
    headers: HeaderMap,
    body: &[u8],
) -> Response {
    let auth = headers
        .get(header::AUTHORIZATION)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let key = auth
        .as_deref()
        .map(|a| a.trim_start_matches("Bearer ").to_owned())
        .or_else(|| {
            headers
                .get("x-api-key")
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        });
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let logged = parsed
        .clone()
        .unwrap_or_else(|| Value::String(String::from_utf8_lossy(body).into_owned()));
    let user = parsed.as_ref().map(last_user_text).unwrap_or_default();
    // The answer is about the task (the first user message), as a model answering a follow-up
    // still answers the original request; faults are picked by the last message, so a
    // follow-up meets its own luck.
    let task = parsed.as_ref().map(first_user_text).unwrap_or_default();
    let (index, attempt) = {
        let mut log = shared.log();
        let index = log.requests;
        log.requests += 1;
        log.apis.push(api);
        log.bodies.push(logged);
        log.auth_headers.push(auth);
        log.headers.push(headers);
        log.arrivals.push(Instant::now());
        let seen = log.attempts.entry(user.clone()).or_default();
        let attempt = *seen;
        *seen += 1;
        (index, attempt)
    };
    let (_in_flight, now) = InFlight::enter(shared);
    let behavior = &shared.behavior;
    let faults = &behavior.faults;
    let record = |name: &'static str| *shared.log().injected.entry(name).or_default() += 1;

    if faults.capacity.is_some_and(|capacity| now > capacity) {
        record("capacity");
        return rate_limited(api, faults.retry_after);
    }

    let delay = behavior.latency + jitter_delay(behavior.jitter, index);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }

    if let Some(status) = behavior.fail_status {
        let message = match (&key, behavior.error_echoes_key) {
            (Some(key), true) => format!(": invalid key {key}"),
            _ => String::new(),
        };
        return error_response(api, status, &message);
    }
    let Some(request) = parsed.filter(Value::is_object) else {
        return error_body(
            api,
            StatusCode::BAD_REQUEST,
            "mock: request body is not a JSON object",
        );
    };

    let fault = faults
        .pick(&user)
        .filter(|f| !f.transient() || attempt < faults.times);
    if let Some(fault) = fault {
        record(fault.name());
    }
    match fault {
        Some(Fault::RateLimit) => return rate_limited(api, faults.retry_after),
        Some(Fault::ServerError) => {
            return error_body(api, StatusCode::INTERNAL_SERVER_ERROR, "mock server error");
        }
        Some(Fault::Reset) => {
            connection.reset();
            // Never written: writing it resets the connection.
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
        Some(Fault::Slow) => tokio::time::sleep(faults.slow_delay).await,
        _ => {}
    }

    let count = behavior
        .items
        .unwrap_or_else(|| parse_item_count(&task).unwrap_or(2));
    let pairs = pairs_content(&task, count);
    let content = match fault {
        Some(Fault::Malformed) => Content::Text(
            "Sure! The passage is about records and their owners, and how they are reviewed."
                .to_owned(),
        ),
        Some(Fault::Repairable) => {
            let with_comma = match pairs.strip_suffix("]}") {
                Some(head) => format!("{head}],}}"),
                None => pairs.clone(),
            };
            Content::Text(format!(
                "Here are the pairs:\n```json\n{with_comma}\n```\nHope this helps!"
            ))
        }
        Some(Fault::Truncated) => {
            let half: String = pairs.chars().take(pairs.chars().count() / 2).collect();
            Content::Truncated(half)
        }
        _ => Content::Pairs(pairs),
    };
    Json(reply(api, &request, content, index + 1)).into_response()
}

/// What a reply carries.
enum Content {
    /// The pairs' JSON text: a tool call where the API has them.
    Pairs(String),
    /// Text that is not JSON.
    Text(String),
    /// Cut-off JSON, with the API's "hit the token limit" reason.
    Truncated(String),
}

/// The reply to one request in `api`'s format (`n` is its 1-based arrival number).
fn reply(api: Api, request: &Value, content: Content, n: usize) -> Value {
    let model = request
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock");
    let messages: &[Value] = request
        .get("messages")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let system_chars = request
        .get("system")
        .and_then(Value::as_str)
        .map_or(0, |s| s.chars().count());
    let prompt_chars: usize = messages
        .iter()
        .map(|m| message_text(m).chars().count())
        .sum::<usize>()
        + system_chars;
    let prompt_tokens = prompt_chars.div_ceil(4);
    let (text, truncated) = match &content {
        Content::Pairs(t) | Content::Text(t) => (t.as_str(), false),
        Content::Truncated(t) => (t.as_str(), true),
    };
    let completion_tokens = text.chars().count() / 4;
    match api {
        Api::OpenAi => json!({
            "id": format!("chatcmpl-mock-{n}"),
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": if truncated { "length" } else { "stop" },
            }],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }),
        Api::Ollama => json!({
            "model": model,
            "created_at": "1970-01-01T00:00:00Z",
            "message": {"role": "assistant", "content": text},
            "done": true,
            "done_reason": if truncated { "length" } else { "stop" },
            "total_duration": 0,
            "prompt_eval_count": prompt_tokens,
            "eval_count": completion_tokens,
        }),
        Api::Anthropic => {
            let tool = request
                .pointer("/tools/0/name")
                .and_then(Value::as_str)
                .map(str::to_owned);
            let (block, stop_reason) = match (&content, tool) {
                (Content::Pairs(pairs), Some(tool)) => (
                    json!({
                        "type": "tool_use",
                        "id": format!("toolu_mock_{n}"),
                        "name": tool,
                        "input": serde_json::from_str::<Value>(pairs).unwrap_or(Value::Null),
                    }),
                    "tool_use",
                ),
                _ => (
                    json!({"type": "text", "text": text}),
                    if truncated { "max_tokens" } else { "end_turn" },
                ),
            };
            json!({
                "id": format!("msg_mock_{n}"),
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [block],
                "stop_reason": stop_reason,
                "stop_sequence": null,
                "usage": {"input_tokens": prompt_tokens, "output_tokens": completion_tokens},
            })
        }
    }
}

/// The jitter of the request with 0-based arrival index `index` (counted since start or the
/// last reset): SplitMix64 of a fixed seed and the index, reduced into [0, max).
pub fn jitter_delay(max: Duration, index: usize) -> Duration {
    let max_nanos = max.as_nanos().min(u128::from(u64::MAX)) as u64;
    if max_nanos == 0 {
        return Duration::ZERO;
    }
    let mut z = JITTER_SEED.wrapping_add((index as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    Duration::from_nanos(z % max_nanos)
}

/// The text of the first user message of a request body (any of the three formats).
pub fn first_user_text(request: &Value) -> String {
    request
        .get("messages")
        .and_then(Value::as_array)
        .and_then(|m| {
            m.iter()
                .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        })
        .map(message_text)
        .unwrap_or_default()
}

/// The text of the last user message of a request body (any of the three formats).
pub fn last_user_text(request: &Value) -> String {
    request
        .get("messages")
        .and_then(Value::as_array)
        .and_then(|m| {
            m.iter()
                .rev()
                .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        })
        .map(message_text)
        .unwrap_or_default()
}

/// The serialized `{"pairs":[…]}` object for the user message `user`.
pub fn pairs_content(user: &str, count: usize) -> String {
    let hash = blake3::hash(user.as_bytes()).to_hex();
    let h = &hash.as_str()[..8];
    let excerpt: String = user
        .chars()
        .take(60)
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    let pairs: Vec<Value> = (1..=count)
        .map(|i| {
            json!({
                "question": format!("Question {i} about {h}?"),
                "answer": format!("Answer {i} about {h}: {excerpt}"),
            })
        })
        .collect();
    json!({ "pairs": pairs }).to_string()
}

/// The text of a message's `content`: a string, or the concatenated `text` of an array of
/// content parts; anything else is empty.
fn message_text(message: &Value) -> String {
    match message.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect(),
        _ => String::new(),
    }
}

/// How many words after a number may separate it from "pairs"/"questions"/"items".
const COUNT_WINDOW: usize = 8;

/// The first integer in `text` that is followed, within [`COUNT_WINDOW`] words and with no
/// other integer in between, by the word "pairs", "questions" or "items" (case-insensitive).
/// Words are runs of ASCII letters and digits, so "question-answer" is two words.
pub fn parse_item_count(text: &str) -> Option<usize> {
    let words: Vec<&str> = text
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    let is_int = |w: &str| w.bytes().all(|b| b.is_ascii_digit());
    for (i, word) in words.iter().enumerate() {
        if !is_int(word) {
            continue;
        }
        for next in words.iter().skip(i + 1).take(COUNT_WINDOW) {
            if is_int(next) {
                break;
            }
            let lower = next.to_ascii_lowercase();
            if matches!(lower.as_str(), "pairs" | "questions" | "items") {
                if let Ok(n) = word.parse::<usize>() {
                    return Some(n);
                }
                break;
            }
        }
    }
    None
}

/// 429 in `api`'s error format, with the configured wait.
fn rate_limited(api: Api, retry_after: RetryAfter) -> Response {
    let mut response = error_body(api, StatusCode::TOO_MANY_REQUESTS, "mock rate limit");
    let (name, value) = match retry_after {
        RetryAfter::None => return response,
        RetryAfter::Seconds(n) => (header::RETRY_AFTER, n.to_string()),
        RetryAfter::Date(n) => (
            header::RETRY_AFTER,
            httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(n)),
        ),
        RetryAfter::Millis(n) => (HeaderName::from_static("retry-after-ms"), n.to_string()),
    };
    if let Ok(value) = HeaderValue::from_str(&value) {
        response.headers_mut().insert(name, value);
    }
    response
}

/// `mock error <status><suffix>` in `api`'s error format.
fn error_response(api: Api, status: u16, suffix: &str) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    error_body(api, code, &format!("mock error {status}{suffix}"))
}

fn error_body(api: Api, status: StatusCode, message: &str) -> Response {
    let body = match api {
        Api::OpenAi => json!({"error": {"message": message, "type": "mock"}}),
        Api::Ollama => json!({"error": message}),
        Api::Anthropic => {
            let kind = match status.as_u16() {
                401 => "authentication_error",
                403 => "permission_error",
                404 => "not_found_error",
                429 => "rate_limit_error",
                529 => "overloaded_error",
                400..=499 => "invalid_request_error",
                _ => "api_error",
            };
            json!({"type": "error", "error": {"type": kind, "message": message}})
        }
    };
    (status, Json(body)).into_response()
}
