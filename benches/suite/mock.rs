//! A fast mock of an OpenAI-compatible `/v1/chat/completions` endpoint, for the benchmarks.
//!
//! It runs on its own tokio runtime on its own thread, so the `keg` child process it serves
//! is measured alone. Everything it decides is a pure function of the request bytes:
//! - the delay: a fixed latency, plus jitter in [0, jitter), plus, for a chosen fraction of
//!   requests, a long "slow" delay instead — so the same requests are slow in every run;
//! - the reply: `{"pairs":[…]}` with as many items as the prompt's `Write N …` asks for,
//!   each question unique to the request, so `dedupe` keeps them all.
//!
//! It counts requests and records the window from the first arrival to the last reply, which
//! is what throughput figures are computed from.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

/// How the mock answers; it can be changed between phases of a run.
#[derive(Clone, Debug)]
pub struct Behavior {
    /// Delay of every ordinary reply, counted from the request's arrival.
    pub latency: Duration,
    /// Extra delay in [0, jitter), chosen by the request's hash.
    pub jitter: Duration,
    /// Share of requests (by hash) answered after `slow_latency` instead.
    pub slow_fraction: f64,
    pub slow_latency: Duration,
    /// Characters of passage text quoted in each answer.
    pub answer_chars: usize,
    /// Keep every request body, so a baseline client can replay them.
    pub capture: bool,
}

impl Default for Behavior {
    fn default() -> Self {
        Behavior {
            latency: Duration::ZERO,
            jitter: Duration::ZERO,
            slow_fraction: 0.0,
            slow_latency: Duration::ZERO,
            answer_chars: 120,
            capture: false,
        }
    }
}

/// Requests seen since the last reset, and the window they were served in.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    pub requests: u64,
    pub slow: u64,
    /// From the first request's arrival to the last reply; zero when there was none.
    pub span: Duration,
    /// The sum of every request's time in the server: divided by `span`, the mean number of
    /// requests in flight (the concurrency the client really kept up).
    pub busy: Duration,
}

impl Window {
    pub fn in_flight(&self) -> f64 {
        self.busy.as_secs_f64() / self.span.as_secs_f64().max(1e-9)
    }
}

struct Shared {
    behavior: RwLock<Behavior>,
    /// The origin of the nanosecond timestamps below.
    origin: Instant,
    requests: AtomicU64,
    slow: AtomicU64,
    first_arrival: AtomicU64,
    last_reply: AtomicU64,
    busy: AtomicU64,
    bodies: Mutex<Vec<Bytes>>,
    timer: Timer,
}

/// Holds each reply until its deadline, on a thread of its own. tokio's timer fires on the
/// first millisecond tick after a deadline, and later under load: a "50 ms" mock answered
/// after 51.2 ms on average at 512 requests in flight, which put the ideal out of reach of
/// any client. This one sleeps to the deadline itself (the OS's timers are precise to
/// tens of microseconds), so a reply leaves at the latency asked for, never before.
#[derive(Default)]
struct Timer {
    state: Mutex<Deadlines>,
    changed: Condvar,
}

#[derive(Default)]
struct Deadlines {
    due: BinaryHeap<Reverse<Due>>,
    next: u64,
    stop: bool,
}

struct Due {
    at: Instant,
    seq: u64,
    wake: oneshot::Sender<()>,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Due {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

impl Timer {
    fn lock(&self) -> std::sync::MutexGuard<'_, Deadlines> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Resolves at `at`.
    fn at(&self, at: Instant) -> oneshot::Receiver<()> {
        let (wake, done) = oneshot::channel();
        let mut state = self.lock();
        let seq = state.next;
        state.next += 1;
        let earliest = state.due.peek().is_none_or(|Reverse(first)| at < first.at);
        state.due.push(Reverse(Due { at, seq, wake }));
        drop(state);
        if earliest {
            self.changed.notify_one();
        }
        done
    }

    /// Wake each waiter at its deadline, until `stop`.
    fn run(&self) {
        let mut state = self.lock();
        while !state.stop {
            let now = Instant::now();
            while state
                .due
                .peek()
                .is_some_and(|Reverse(first)| first.at <= now)
            {
                if let Some(Reverse(due)) = state.due.pop() {
                    let _ = due.wake.send(());
                }
            }
            state = match state.due.peek() {
                Some(Reverse(first)) => {
                    let wait = first.at.saturating_duration_since(now);
                    self.changed
                        .wait_timeout(state, wait)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
                None => self
                    .changed
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner),
            };
        }
    }

    fn stop(&self) {
        self.lock().stop = true;
        self.changed.notify_one();
    }
}

impl Shared {
    fn nanos(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn behavior(&self) -> Behavior {
        self.behavior
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// A running mock; dropping it stops the server.
pub struct Mock {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    timer: Option<JoinHandle<()>>,
}

impl Mock {
    /// Listen on 127.0.0.1 (a port the OS picks) on a thread with its own runtime.
    pub fn start(behavior: Behavior) -> Result<Mock> {
        let shared = Arc::new(Shared {
            behavior: RwLock::new(behavior),
            origin: Instant::now(),
            requests: AtomicU64::new(0),
            slow: AtomicU64::new(0),
            first_arrival: AtomicU64::new(u64::MAX),
            last_reply: AtomicU64::new(0),
            busy: AtomicU64::new(0),
            bodies: Mutex::new(Vec::new()),
            timer: Timer::default(),
        });
        let timer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("bench-mock-timer".into())
                .spawn(move || shared.timer.run())
                .context("cannot start the mock server's timer")?
        };
        let app = Router::new()
            .route("/v1/chat/completions", post(chat_completions))
            .layer(DefaultBodyLimit::max(64 << 20))
            .with_state(shared.clone());
        let (addr_tx, addr_rx) = std::sync::mpsc::channel::<std::io::Result<SocketAddr>>();
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("bench-mock".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("bench-mock-worker")
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(err) => {
                        let _ = addr_tx.send(Err(err));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let listener = match bind() {
                        Ok(l) => l,
                        Err(err) => {
                            let _ = addr_tx.send(Err(err));
                            return;
                        }
                    };
                    let _ = addr_tx.send(listener.local_addr());
                    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                        let _ = tcp.set_nodelay(true);
                    });
                    tokio::select! {
                        served = axum::serve(listener, app) => {
                            if let Err(err) = served {
                                eprintln!("bench mock: {err}");
                            }
                        }
                        _ = shutdown_rx => {}
                    }
                });
                runtime.shutdown_timeout(Duration::from_secs(1));
            })
            .context("cannot start the mock server thread")?;
        let addr = addr_rx
            .recv()
            .map_err(|_| anyhow!("the mock server thread died while starting"))?
            .context("the mock server cannot listen on 127.0.0.1")?;
        Ok(Mock {
            addr,
            shared,
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
            timer: Some(timer),
        })
    }

    /// e.g. `http://127.0.0.1:40123/v1`
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn endpoint(&self) -> String {
        format!("{}/chat/completions", self.base_url())
    }

    pub fn set(&self, behavior: Behavior) {
        *self
            .shared
            .behavior
            .write()
            .unwrap_or_else(PoisonError::into_inner) = behavior;
    }

    /// Zero the counters, the window and the captured bodies.
    pub fn reset(&self) {
        self.shared.requests.store(0, Ordering::SeqCst);
        self.shared.slow.store(0, Ordering::SeqCst);
        self.shared.first_arrival.store(u64::MAX, Ordering::SeqCst);
        self.shared.last_reply.store(0, Ordering::SeqCst);
        self.shared.busy.store(0, Ordering::SeqCst);
        self.bodies_lock().clear();
    }

    pub fn window(&self) -> Window {
        let first = self.shared.first_arrival.load(Ordering::SeqCst);
        let last = self.shared.last_reply.load(Ordering::SeqCst);
        Window {
            requests: self.shared.requests.load(Ordering::SeqCst),
            slow: self.shared.slow.load(Ordering::SeqCst),
            span: Duration::from_nanos(last.saturating_sub(first)),
            busy: Duration::from_nanos(self.shared.busy.load(Ordering::SeqCst)),
        }
    }

    /// The captured request bodies, in arrival order.
    pub fn take_bodies(&self) -> Vec<Bytes> {
        std::mem::take(&mut *self.bodies_lock())
    }

    fn bodies_lock(&self) -> std::sync::MutexGuard<'_, Vec<Bytes>> {
        self.shared
            .bodies
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.shared.timer.stop();
        if let Some(timer) = self.timer.take() {
            let _ = timer.join();
        }
    }
}

/// 127.0.0.1 only, with a backlog large enough for 512 connections opened at once.
fn bind() -> std::io::Result<tokio::net::TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    socket.listen(4096)
}

async fn chat_completions(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let arrived = Instant::now();
    let arrived_nanos = shared.nanos();
    shared
        .first_arrival
        .fetch_min(arrived_nanos, Ordering::SeqCst);
    shared.requests.fetch_add(1, Ordering::SeqCst);
    let behavior = shared.behavior();
    let digest = blake3::hash(&body);
    let (delay, slow) = delay(&behavior, &digest);
    if slow {
        shared.slow.fetch_add(1, Ordering::SeqCst);
    }
    let reply = completion(&body, &digest, behavior.answer_chars);
    if behavior.capture {
        shared
            .bodies
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(body);
    }
    if !delay.is_zero() {
        let _ = shared.timer.at(arrived + delay).await;
    }
    let response = match reply {
        Ok(bytes) => ([(header::CONTENT_TYPE, "application/json")], bytes).into_response(),
        Err(message) => (
            StatusCode::BAD_REQUEST,
            [(header::CONTENT_TYPE, "application/json")],
            format!(r#"{{"error":{{"message":{message:?},"type":"mock"}}}}"#),
        )
            .into_response(),
    };
    let done = shared.nanos();
    shared.last_reply.fetch_max(done, Ordering::SeqCst);
    shared
        .busy
        .fetch_add(done.saturating_sub(arrived_nanos), Ordering::SeqCst);
    response
}

/// The delay of a request with this digest, and whether it is one of the slow ones.
pub fn delay(behavior: &Behavior, digest: &blake3::Hash) -> (Duration, bool) {
    let bytes = digest.as_bytes();
    let fraction = |at: usize| {
        let mut head = [0u8; 8];
        head.copy_from_slice(&bytes[at..at + 8]);
        (u64::from_le_bytes(head) >> 11) as f64 / (1u64 << 53) as f64
    };
    if behavior.slow_fraction > 0.0 && fraction(0) < behavior.slow_fraction {
        return (behavior.slow_latency, true);
    }
    let jitter = behavior.jitter.mul_f64(fraction(8));
    (behavior.latency + jitter, false)
}

#[derive(Deserialize)]
struct Request {
    #[serde(default)]
    model: String,
    messages: Vec<Message>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: String,
}

#[derive(Serialize)]
struct Pair {
    question: String,
    answer: String,
}

#[derive(Serialize)]
struct Pairs {
    pairs: Vec<Pair>,
}

#[derive(Serialize)]
struct Completion<'a> {
    id: String,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [Choice; 1],
    usage: Usage,
}

#[derive(Serialize)]
struct Choice {
    index: u32,
    message: Reply,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct Reply {
    role: &'static str,
    content: String,
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: usize,
    completion_tokens: usize,
    total_tokens: usize,
}

/// The reply body for one request, or why the request is not a chat request.
fn completion(body: &[u8], digest: &blake3::Hash, answer_chars: usize) -> Result<Bytes, String> {
    let request: Request = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let user = request
        .messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .map_or("", |m| m.content.as_str());
    let count = item_count(user).unwrap_or(2);
    let passage = passage(user);
    let tag = &digest.to_hex()[..16];
    let mut words: Vec<&str> = Vec::with_capacity(passage.len() / 4);
    words.extend(passage.split_whitespace());
    let pairs = (1..=count)
        .map(|i| {
            let word = if words.is_empty() {
                "it"
            } else {
                words[(i * 7) % words.len()]
            };
            Pair {
                question: format!("Question {i} of {tag}: what does the passage say about {word}?"),
                answer: excerpt(passage, i * 37, answer_chars),
            }
        })
        .collect();
    let pairs = Pairs { pairs };
    let mut content = Vec::with_capacity(
        pairs
            .pairs
            .iter()
            .map(|p| p.question.len() + p.answer.len() + 32)
            .sum::<usize>()
            + 16,
    );
    serde_json::to_writer(&mut content, &pairs).map_err(|e| e.to_string())?;
    let content = String::from_utf8(content).map_err(|e| e.to_string())?;
    let prompt_tokens = request
        .messages
        .iter()
        .map(|m| m.content.len())
        .sum::<usize>()
        / 4;
    let completion_tokens = content.len() / 4;
    let reply = Completion {
        id: format!("chatcmpl-{tag}"),
        object: "chat.completion",
        created: 0,
        model: &request.model,
        choices: [Choice {
            index: 0,
            message: Reply {
                role: "assistant",
                content,
            },
            finish_reason: "stop",
        }],
        usage: Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        },
    };
    // Sized up front: the content is escaped once more inside the reply.
    let mut bytes = Vec::with_capacity(reply.choices[0].message.content.len() * 9 / 8 + 512);
    serde_json::to_writer(&mut bytes, &reply).map_err(|e| e.to_string())?;
    Ok(Bytes::from(bytes))
}

/// The N of the last `Write N` in the prompt (the shipped `qa/user.j2` says
/// `Write {{ items }} question-answer pairs`).
pub fn item_count(user: &str) -> Option<usize> {
    let at = user.rfind("Write ")?;
    let digits: String = user[at + 6..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// The text between the `"""` fences of the shipped template, else the whole message.
fn passage(user: &str) -> &str {
    let mut parts = user.splitn(3, "\"\"\"");
    match (parts.next(), parts.next()) {
        (Some(_), Some(inside)) => inside.trim(),
        _ => user,
    }
}

/// About `chars` characters of `text` from a rotating offset, on one line.
fn excerpt(text: &str, offset: usize, chars: usize) -> String {
    if text.is_empty() {
        return "No text.".to_owned();
    }
    let mut start = offset % text.len();
    while !text.is_char_boundary(start) {
        start -= 1;
    }
    let mut out = String::with_capacity(chars.max(1) + 8);
    out.extend(
        text[start..]
            .chars()
            .chain(" ".chars())
            .chain(text.chars())
            .take(chars.max(1))
            .map(|c| if c.is_whitespace() { ' ' } else { c }),
    );
    out
}
