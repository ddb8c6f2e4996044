//! An in-process mock of an OpenAI-compatible server, for integration tests.
//!
//! The server runs on its own tokio runtime on a background thread, so test code stays
//! synchronous and can run the real `keg` binary as a subprocess against [`MockLlm::base_url`].
//! It listens on 127.0.0.1 only, on a port chosen by the OS, and stops when the [`MockLlm`]
//! is dropped.
//!
//! Endpoints:
//! - `POST /v1/chat/completions`: a non-streaming chat completion whose content is the JSON text
//!   `{"pairs":[{"question":"…","answer":"…"}, …]}`, deterministic in the last user message.
//! - `GET /v1/models`: `{"object":"list","data":[{"id":"mock","object":"model"}]}`.
//! - `GET /health`: `{"status":"ok"}`.

#![allow(dead_code)] // each test module uses only part of the API

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
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
    /// If set, answer every request with this HTTP status and an OpenAI-style error body
    /// `{"error":{"message":"mock error <status>","type":"mock"}}`.
    pub fail_status: Option<u16>,
}

impl Default for Behavior {
    fn default() -> Self {
        Behavior {
            latency: Duration::ZERO,
            jitter: Duration::ZERO,
            items: None,
            fail_status: None,
        }
    }
}

/// What the server has received since start or the last [`MockLlm::reset`].
#[derive(Default)]
struct Log {
    /// Number of POST /v1/chat/completions requests (also the next arrival index).
    requests: usize,
    bodies: Vec<Value>,
    auth_headers: Vec<Option<String>>,
}

struct Shared {
    behavior: Behavior,
    log: Mutex<Log>,
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
        });
        let (addr_tx, addr_rx) = std::sync::mpsc::channel::<std::io::Result<SocketAddr>>();
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let app = router(shared.clone());
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
                    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                        let _ = tcp.set_nodelay(true);
                    });
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

    /// e.g. "http://127.0.0.1:43127/v1"
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Number of POST /v1/chat/completions requests received so far.
    pub fn requests(&self) -> usize {
        self.shared.log().requests
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

    /// Reset the counters and logs (server keeps running). The jitter sequence restarts too.
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
async fn bind() -> std::io::Result<tokio::net::TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    socket.listen(1024)
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
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
        return error_response(status);
    }
    Json(json!({"object": "list", "data": [{"id": "mock", "object": "model"}]})).into_response()
}

async fn chat_completions(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let auth = headers
        .get(header::AUTHORIZATION)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    let logged = parsed
        .clone()
        .unwrap_or_else(|| Value::String(String::from_utf8_lossy(&body).into_owned()));
    let index = {
        let mut log = shared.log();
        let index = log.requests;
        log.requests += 1;
        log.bodies.push(logged);
        log.auth_headers.push(auth);
        index
    };

    let behavior = &shared.behavior;
    let delay = behavior.latency + jitter_delay(behavior.jitter, index);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }

    if let Some(status) = behavior.fail_status {
        return error_response(status);
    }
    let Some(request) = parsed.filter(Value::is_object) else {
        return error_body(
            StatusCode::BAD_REQUEST,
            "mock: request body is not a JSON object",
        );
    };
    Json(completion(&request, behavior.items, index + 1)).into_response()
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

/// The reply to one chat completion request (`n` is its 1-based arrival number).
fn completion(request: &Value, items: Option<usize>, n: usize) -> Value {
    let model = request
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock");
    let messages: &[Value] = request
        .get("messages")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let user = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .map(message_text)
        .unwrap_or_default();
    let count = items.unwrap_or_else(|| parse_item_count(&user).unwrap_or(2));

    let content = pairs_content(&user, count);
    let prompt_chars: usize = messages
        .iter()
        .map(|m| message_text(m).chars().count())
        .sum();
    let prompt_tokens = prompt_chars.div_ceil(4);
    let completion_tokens = content.chars().count() / 4;
    json!({
        "id": format!("chatcmpl-mock-{n}"),
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": "stop",
        }],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    })
}

/// The serialized `{"pairs":[…]}` object for the user message `user`.
fn pairs_content(user: &str, count: usize) -> String {
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

fn error_response(status: u16) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    error_body(code, &format!("mock error {status}"))
}

fn error_body(status: StatusCode, message: &str) -> Response {
    (
        status,
        Json(json!({"error": {"message": message, "type": "mock"}})),
    )
        .into_response()
}
