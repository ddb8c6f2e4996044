//! LLM providers: what the user configures, the wire format of each API (one file per API,
//! one line in [`ProviderKind::wire`]), and how a call is sent: limits, retries, errors.

pub mod anthropic;
pub mod http;
pub mod limits;
pub mod ollama;
pub mod openai;
pub mod retry;

use std::sync::Arc;
use std::time::Duration;

use ::http::header::HeaderMap;
use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use tokio::sync::Semaphore;

use limits::Limits;

use crate::lock;

/// A provider as written under `providers:` in a pipeline.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// The wire format: `openai` is any OpenAI-compatible `/chat/completions` endpoint
    /// (OpenAI, OpenRouter, vLLM, llama.cpp server, LM Studio, Ollama's `/v1`); `ollama` is
    /// Ollama's native `/api/chat`; `anthropic` is the Anthropic Messages API.
    pub kind: ProviderKind,
    /// e.g. `https://api.openai.com/v1`, `http://localhost:11434/v1` (openai),
    /// `http://localhost:11434` (ollama), `https://api.anthropic.com` (anthropic). Empty or
    /// omitted: the kind's default (`https://api.openai.com/v1`; for ollama `$OLLAMA_HOST`,
    /// else `http://127.0.0.1:11434`; `https://api.anthropic.com`). For ollama and anthropic
    /// a trailing `/v1` is ignored.
    #[serde(default)]
    pub base_url: String,
    pub model: String,
    /// The environment variable holding the API key. Empty or omitted: `OPENAI_API_KEY`,
    /// `OLLAMA_API_KEY` or `ANTHROPIC_API_KEY` by kind. When the variable is unset or empty,
    /// no key is sent (local servers need none). Keys are never written anywhere.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Extra HTTP headers sent with every request, e.g. OpenRouter's `HTTP-Referer` and
    /// `X-Title`. Not part of cache keys. Keys do not belong here: use `api_key_env`.
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub headers: IndexMap<String, String>,
    /// Requests in flight at most. On 429 (or 503/529) the provider halves how many it sends
    /// at once, and grows back by one per round of successes.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Requests started per minute at most, spaced evenly (retries count).
    #[serde(default)]
    pub requests_per_minute: Option<u32>,
    /// Tokens per minute at most, estimated before sending as prompt characters / 4 plus the
    /// reply's token budget.
    #[serde(default)]
    pub tokens_per_minute: Option<u32>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Upper bound for a reply's tokens; a generate stage may ask for less. Anthropic requires
    /// a bound: 4096 when neither this nor the stage gives one.
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Sampling seed (Anthropic has none: ignored there).
    #[serde(default)]
    pub seed: Option<u64>,
    /// ollama: the context window in tokens (`options.num_ctx`); Ollama's default is small,
    /// and a prompt longer than it is cut silently.
    #[serde(default)]
    pub num_ctx: Option<u32>,
    /// ollama: how long the model stays loaded after a request, e.g. `10m`, `1h`, or seconds
    /// (`-1`: forever). Not part of cache keys.
    #[serde(default)]
    pub keep_alive: Option<String>,
    /// Seconds before a request is abandoned and retried.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Retries after the first attempt on 408, 409, 429, 5xx, timeouts and connection errors.
    #[serde(default = "default_retries")]
    pub max_retries: u32,
    /// Milliseconds before the first retry; each further retry waits twice as long (at most
    /// 30 s), plus up to 50% jitter. A server's `Retry-After` replaces this wait.
    #[serde(default = "default_retry_delay")]
    pub retry_delay_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    Openai,
    Ollama,
    Anthropic,
}

impl ProviderKind {
    /// The wire format of this kind: adding a provider is one file and one line here.
    pub fn wire(self) -> &'static Wire {
        match self {
            ProviderKind::Openai => &openai::WIRE,
            ProviderKind::Ollama => &ollama::WIRE,
            ProviderKind::Anthropic => &anthropic::WIRE,
        }
    }

    pub fn name(self) -> &'static str {
        self.wire().name
    }
}

/// What one API needs to be called: every function a provider file supplies.
pub struct Wire {
    /// The YAML `kind`.
    pub name: &'static str,
    /// The base URL when the config leaves it empty.
    pub default_base_url: fn() -> String,
    /// The variable the key is read from when `api_key_env` is not given.
    pub default_key_env: &'static str,
    pub endpoint: fn(base_url: &str) -> String,
    /// The request body: everything that decides the answer, and nothing secret (it is the
    /// cache key).
    pub body: fn(&ProviderConfig, &Json, Option<&Json>, Option<u32>) -> Json,
    /// Whether `body` puts the messages in the body as they are given (the schema always
    /// is): they are then written straight into the body's bytes (see [`Provider::body`]).
    pub messages_as_given: bool,
    /// Fields sent but left out of the cache key because they cannot change the answer.
    pub transport_fields: fn(&ProviderConfig) -> serde_json::Map<String, Json>,
    /// Adds the key (when there is one, marked sensitive) and the API's fixed headers.
    pub authorize: fn(&mut HeaderMap, Option<&str>),
    pub parse_reply: fn(&str) -> Result<Reply, String>,
}

fn default_concurrency() -> usize {
    8
}
fn default_timeout() -> u64 {
    300
}
fn default_retries() -> u32 {
    4
}
fn default_retry_delay() -> u64 {
    500
}

/// The token budget of a reply: the stage's ask, capped by the provider's `max_tokens`.
pub fn effective_max_tokens(config: &ProviderConfig, asked: Option<u32>) -> Option<u32> {
    match (asked, config.max_tokens) {
        (Some(asked), Some(cap)) => Some(asked.min(cap)),
        (asked, cap) => asked.or(cap),
    }
}

/// What a chat call returned, as stored in the cache. Fields added later default when an
/// older entry is read, and are left out when empty so older entries keep their bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub content: String,
    #[serde(default)]
    pub finish_reason: Option<String>,
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    /// What the server says the call cost (OpenRouter's `usage.cost`, in its credits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<f64>,
    /// The model's reasoning when the server returns it apart from the content (`reasoning`,
    /// `reasoning_content`, Ollama's `thinking`, Anthropic's thinking blocks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<String>,
}

impl Reply {
    /// The cache entry, appended to `out`: the bytes `serde_json::to_vec` makes of the
    /// reply, its strings written by [`crate::record::write_json_str`], since one is made
    /// per call.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        use crate::record::write_json_str;
        out.extend_from_slice(b"{\"content\":");
        write_json_str(&self.content, out);
        out.extend_from_slice(b",\"finish_reason\":");
        match &self.finish_reason {
            Some(reason) => write_json_str(reason, out),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"prompt_tokens\":");
        let _ = serde_json::to_writer(&mut *out, &self.prompt_tokens);
        out.extend_from_slice(b",\"completion_tokens\":");
        let _ = serde_json::to_writer(&mut *out, &self.completion_tokens);
        if let Some(cost) = self.cost {
            out.extend_from_slice(b",\"cost\":");
            let _ = serde_json::to_writer(&mut *out, &cost);
        }
        if let Some(reasoning) = &self.reasoning {
            out.extend_from_slice(b",\"reasoning\":");
            write_json_str(reasoning, out);
        }
        out.push(b'}');
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// An answer retrying cannot fix (bad key, bad request, unknown model): stop the run.
    #[error("{provider}: the server answered {status}: {message}")]
    Fatal {
        provider: String,
        status: u16,
        message: String,
    },
    #[error("gave up after {attempts} attempts: {last}")]
    GaveUp { attempts: u32, last: String },
}

/// One request body, made once per call by [`Provider::body`].
pub struct Body {
    /// The body's canonical JSON (keys sorted, no whitespace): what the call key hashes.
    pub canonical: bytes::Bytes,
    /// Where the messages' canonical JSON lies in `canonical`, when the body was built around
    /// them (wires that take the messages as given): the call key hashes them apart from the
    /// rest of the body, which is the same for a stage's calls.
    pub messages: Option<std::ops::Range<usize>>,
    /// The bytes sent: the canonical body, plus the wire's transport fields when it has any
    /// (they cannot change the answer, so they are not hashed).
    wire: bytes::Bytes,
    /// Prompt and completion tokens expected, for the per-minute token limit.
    tokens: u32,
}

/// A configured provider, ready to send.
pub struct Provider {
    pub name: String,
    /// The config as written, with `base_url` and `api_key_env` resolved to what is used.
    pub config: ProviderConfig,
    transport: http::Transport,
    api_key: Option<String>,
    endpoint: String,
    transport_fields: serde_json::Map<String, Json>,
    /// Frames of bodies whose messages are written in apart (see [`Provider::body`]): the
    /// same for every call with the same token budget and schema.
    frames: std::sync::Mutex<Frames>,
    /// Calls in progress (sending, or waiting to retry), at most `concurrency`; shared by
    /// every stage that uses this provider.
    pub limit: Arc<Semaphore>,
    /// Calls made ready (their record's task spawned) that have not yet started: what the
    /// runner reads to start just enough documents to keep `limit` busy.
    queue: Queue,
    /// Requests on the wire: the adaptive window and the per-minute limits.
    limits: Limits,
}

/// Calls waiting to start, counted from the moment they are made ready, and a signal when
/// their number falls below the provider's concurrency.
#[derive(Default)]
struct Queue {
    waiting: std::sync::atomic::AtomicUsize,
    low: tokio::sync::Notify,
}

/// One call counted as waiting in its provider's queue until it starts (or is dropped).
pub struct Queued(Option<Arc<Provider>>);

impl Queued {
    /// The call has started (or needs no sending): it no longer waits.
    pub fn started(&mut self) {
        if let Some(provider) = self.0.take() {
            let before = provider
                .queue
                .waiting
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            // Only crossing below the concurrency wakes the runner, not every call.
            if before == provider.config.concurrency.max(1) {
                provider.queue.low.notify_one();
            }
        }
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.started();
    }
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key is deliberately left out.
        f.debug_struct("Provider")
            .field("name", &self.name)
            .field("config", &self.config)
            .finish()
    }
}

/// Header names that carry credentials: those come from `api_key_env`, never the file.
const SECRET_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "api-key",
];

impl Provider {
    pub fn new(name: &str, mut config: ProviderConfig) -> Result<Provider, String> {
        let wire = config.kind.wire();
        let mut problems = Vec::new();
        if config.base_url.trim().is_empty() {
            config.base_url = (wire.default_base_url)();
        }
        let key_env = match config.api_key_env.as_deref().map(str::trim) {
            Some(var) if !var.is_empty() => var.to_owned(),
            _ => wire.default_key_env.to_owned(),
        };
        config.api_key_env = Some(key_env.clone());
        if config.kind != ProviderKind::Ollama {
            for (field, set) in [
                ("num_ctx", config.num_ctx.is_some()),
                ("keep_alive", config.keep_alive.is_some()),
            ] {
                if set {
                    problems.push(format!(
                        "provider `{name}`: `{field}` applies to kind `ollama` only, not `{}`",
                        wire.name
                    ));
                }
            }
        }
        for (limit, value) in [
            ("requests_per_minute", config.requests_per_minute),
            ("tokens_per_minute", config.tokens_per_minute),
        ] {
            if value == Some(0) {
                problems.push(format!(
                    "provider `{name}`: `{limit}` must be at least 1 (leave it out for no limit)"
                ));
            }
        }
        let mut headers = match header_map(name, &config.headers) {
            Ok(h) => h,
            Err(mut e) => {
                problems.append(&mut e);
                HeaderMap::new()
            }
        };
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        let api_key = std::env::var(&key_env)
            .ok()
            .filter(|key| !key.trim().is_empty());
        let concurrency = config.concurrency.max(1);
        (wire.authorize)(&mut headers, api_key.as_deref());
        let endpoint = (wire.endpoint)(&config.base_url);
        let transport = http::Transport::new(
            &endpoint,
            headers,
            Duration::from_secs(config.timeout_secs.max(1)),
            concurrency,
        )
        .map_err(|e| format!("provider `{name}`: {e}"))?;
        Ok(Provider {
            name: name.to_owned(),
            endpoint,
            transport_fields: (wire.transport_fields)(&config),
            frames: std::sync::Mutex::default(),
            limit: Arc::new(Semaphore::new(concurrency)),
            queue: Queue::default(),
            limits: Limits::new(
                concurrency,
                config.requests_per_minute,
                config.tokens_per_minute,
            ),
            config,
            transport,
            api_key,
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Count one more call as waiting to start, until the returned guard says it started.
    pub fn enqueue(self: &Arc<Self>) -> Queued {
        self.queue
            .waiting
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Queued(Some(self.clone()))
    }

    /// Whether fewer calls wait to start than the provider sends at once: more work is needed
    /// for its limit to stay busy.
    pub fn wants_more(&self) -> bool {
        self.queue
            .waiting
            .load(std::sync::atomic::Ordering::Relaxed)
            < self.config.concurrency.max(1)
    }

    /// Resolves once [`Provider::wants_more`] may have become true.
    pub async fn wanting_more(&self) {
        self.queue.low.notified().await;
    }

    /// The request body for these messages; `schema` is the canonical JSON of the JSON Schema
    /// the reply must match. Serialised once, here, to canonical JSON: the call key hashes
    /// those bytes and the same bytes are sent (every attempt), so no body is walked twice or
    /// kept as a `Value`.
    ///
    /// The wire builds only the frame of the body, with stand-ins for the schema and (when it
    /// takes them as given) the messages; their canonical JSON is written in place of the
    /// stand-ins. Canonical JSON of a whole is the canonical JSON of its parts put together,
    /// so the bytes are those of the whole body, without copying the messages into a `Value`
    /// or writing the schema per call.
    pub fn body(&self, messages: &Json, schema: Option<&[u8]>, max_tokens: Option<u32>) -> Body {
        let wire = self.config.kind.wire();
        let filled = if wire.messages_as_given {
            // The messages are copied into the body at once: written in a buffer kept warm.
            crate::record::with_scratch(|written| {
                crate::record::write_canonical_json(messages, written);
                let frame = self.frame_for(max_tokens, schema.is_some());
                let messages: Part = (&*MESSAGES_FINDER, &written[..]);
                let body = match schema {
                    Some(schema) => frame.fill(&[messages, (&*SCHEMA_FINDER, schema)]),
                    None => frame.fill(&[messages]),
                };
                body.map(|(mut body, at)| {
                    body.messages = at.map(|at| at..at + written.len());
                    body
                })
            })
        } else {
            let stand_in = schema.map(|_| Json::String(SCHEMA_MARK.0.into()));
            let frame = self.frame(&(wire.body)(
                &self.config,
                messages,
                stand_in.as_ref(),
                max_tokens,
            ));
            frame
                .fill(schema.map(|schema| (&*SCHEMA_FINDER, schema)).as_slice())
                .map(|(body, _)| body)
        };
        if let Some(body) = filled {
            return body;
        }
        // A stand-in's text was in the frame already (a message holding it): build it whole.
        let schema = schema.and_then(|s| serde_json::from_slice::<Json>(s).ok());
        let whole = (wire.body)(&self.config, messages, schema.as_ref(), max_tokens);
        self.frame(&whole)
            .fill(&[])
            .expect("a body without stand-ins has nothing to fill")
            .0
    }

    /// The frame of a body whose messages are written in apart, made once per token budget.
    fn frame_for(&self, max_tokens: Option<u32>, schema: bool) -> Arc<Frame> {
        let mut frames = lock(&self.frames);
        if let Some(frame) = frames.get(&(max_tokens, schema)) {
            return frame.clone();
        }
        let stand_in = Json::String(MESSAGES_MARK.0.into());
        let schema_stand_in = schema.then(|| Json::String(SCHEMA_MARK.0.into()));
        let wire = self.config.kind.wire();
        let frame = (wire.body)(
            &self.config,
            &stand_in,
            schema_stand_in.as_ref(),
            max_tokens,
        );
        let frame = Arc::new(self.frame(&frame));
        // Budgets come from the data: a run uses a handful, but keep the map small whatever.
        if frames.len() >= 64 {
            frames.clear();
        }
        frames.insert((max_tokens, schema), frame.clone());
        frame
    }

    /// A body's frame serialised: as hashed, and as sent.
    fn frame(&self, frame: &Json) -> Frame {
        let sent = match frame {
            Json::Object(obj) if !self.transport_fields.is_empty() => {
                let mut obj = obj.clone();
                for (k, v) in &self.transport_fields {
                    obj.insert(k.clone(), v.clone());
                }
                Some(crate::record::canonical_json(&Json::Object(obj)))
            }
            _ => None,
        };
        Frame {
            canonical: crate::record::canonical_json(frame),
            sent,
            budget: budget(frame),
        }
    }

    /// How many requests this provider currently sends at once (the adaptive window).
    pub fn window(&self) -> usize {
        self.limits.window()
    }

    /// Send one request, retrying transient failures with exponential backoff and jitter.
    /// Returns the reply and the number of retries it took.
    pub async fn send(&self, body: &Body) -> Result<(Reply, u32), CallError> {
        let (sent, tokens) = (&body.wire, body.tokens);
        let base = Duration::from_millis(self.config.retry_delay_ms);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let ticket = self.limits.admit(tokens).await;
            let (wait, last) = match self.send_once(sent).await {
                Attempt::Done(reply) => {
                    ticket.succeeded();
                    return Ok((reply, attempt - 1));
                }
                Attempt::Fatal(status, message) => {
                    return Err(CallError::Fatal {
                        provider: self.name.clone(),
                        status,
                        message,
                    });
                }
                Attempt::Retry {
                    wait,
                    last,
                    overloaded,
                } => {
                    // Either way the place in the window is freed before the wait.
                    if overloaded {
                        ticket.overloaded();
                    } else {
                        drop(ticket);
                    }
                    (wait, last)
                }
            };
            if attempt > self.config.max_retries {
                return Err(CallError::GaveUp {
                    attempts: attempt,
                    last,
                });
            }
            tokio::time::sleep(retry::delay(attempt, base, wait, rand::random())).await;
        }
    }

    async fn send_once(&self, body: &bytes::Bytes) -> Attempt {
        let answer = match self.transport.post(body.clone()).await {
            Ok(answer) => answer,
            Err(failure) => return self.transport_failure(failure),
        };
        let status = answer.status;
        // Checked as UTF-8 the fast way first; the lossy reading is for a broken reply.
        let text = match std::str::from_utf8(&answer.body) {
            Ok(text) => std::borrow::Cow::Borrowed(text),
            Err(_) => String::from_utf8_lossy(&answer.body),
        };
        if (200..300).contains(&status) {
            return match (self.config.kind.wire().parse_reply)(&text) {
                Ok(reply) => Attempt::Done(reply),
                Err(err) => Attempt::Retry {
                    wait: None,
                    last: self.redact(err),
                    overloaded: false,
                },
            };
        }
        let message = self.redact(server_message(&text));
        if retry::is_transient(status) {
            Attempt::Retry {
                wait: retry::asked_wait(&answer.headers, std::time::SystemTime::now()),
                last: format!("HTTP {status}: {message}"),
                overloaded: retry::is_overload(status),
            }
        } else if (300..400).contains(&status) {
            let to = answer
                .headers
                .get(::http::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("elsewhere");
            let message = format!(
                "{} redirects to {to}: set `base_url` to the address requests should go to",
                self.endpoint
            );
            Attempt::Fatal(status, self.redact(message))
        } else {
            Attempt::Fatal(status, self.explain(status, message))
        }
    }

    fn transport_failure(&self, failure: http::Failure) -> Attempt {
        let last = match failure {
            http::Failure::Timeout => format!(
                "no answer within {} s (`timeout_secs`)",
                self.config.timeout_secs
            ),
            http::Failure::Connect(cause) => {
                format!("cannot connect to {}: {cause}", self.endpoint)
            }
            http::Failure::Broken(cause) => format!("the connection failed: {cause}"),
        };
        Attempt::Retry {
            wait: None,
            last: self.redact(last),
            overloaded: false,
        }
    }

    /// A server may quote what it was sent; the key never leaves this struct.
    fn redact(&self, text: String) -> String {
        match &self.api_key {
            Some(key) if text.contains(key.as_str()) => text.replace(key.as_str(), "[redacted]"),
            _ => text,
        }
    }

    /// Adds what the user most likely needs to know to an authentication failure.
    fn explain(&self, status: u16, message: String) -> String {
        let var = self.config.api_key_env.as_deref().unwrap_or_default();
        match (status, &self.api_key) {
            (401 | 403, None) => format!("{message} (no key was sent: `{var}` is not set)"),
            (401 | 403, Some(_)) => format!("{message} (the key is read from `{var}`)"),
            _ => message,
        }
    }
}

enum Attempt {
    Done(Reply),
    Fatal(u16, String),
    Retry {
        /// What the server asked for (Retry-After), if anything.
        wait: Option<Duration>,
        last: String,
        /// The server is over its capacity: send less at once.
        overloaded: bool,
    },
}

/// `headers:` as a header map, refusing names that carry credentials.
fn header_map(
    provider: &str,
    headers: &IndexMap<String, String>,
) -> Result<HeaderMap, Vec<String>> {
    use ::http::header::{HeaderName, HeaderValue};
    let mut map = HeaderMap::new();
    let mut problems = Vec::new();
    for (name, value) in headers {
        if SECRET_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
            problems.push(format!(
                "provider `{provider}`: header `{name}` carries a credential; put the key in an \
                 environment variable and name it in `api_key_env`"
            ));
            continue;
        }
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            (Ok(n), Ok(v)) => {
                map.insert(n, v);
            }
            (Err(_), _) => problems.push(format!(
                "provider `{provider}`: `{name}` is not a valid HTTP header name"
            )),
            (_, Err(_)) => problems.push(format!(
                "provider `{provider}`: the value of header `{name}` is not valid in HTTP (no \
                 line breaks or control characters)"
            )),
        }
    }
    if problems.is_empty() {
        Ok(map)
    } else {
        Err(problems)
    }
}

/// Stand-ins for the parts of a body written apart (see [`Provider::body`]), and how
/// canonical JSON writes them. A string starting with NUL appears in no configuration a
/// frame is built from.
const MESSAGES_MARK: (&str, &[u8]) = ("\u{0}keg:messages", br#""\u0000keg:messages""#);
const SCHEMA_MARK: (&str, &[u8]) = ("\u{0}keg:schema", br#""\u0000keg:schema""#);

/// The stand-ins' searchers, built once: building one costs more than the search itself.
static MESSAGES_FINDER: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(MESSAGES_MARK.1));
static SCHEMA_FINDER: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(SCHEMA_MARK.1));

/// A stand-in's searcher and the bytes that replace it.
type Part<'a> = (&'a memchr::memmem::Finder<'static>, &'a [u8]);

/// Frames by the reply's token budget and whether a schema is sent.
type Frames = std::collections::HashMap<(Option<u32>, bool), Arc<Frame>>;

/// A body around stand-ins, serialised (see [`Provider::body`]).
struct Frame {
    /// What the call key hashes.
    canonical: Vec<u8>,
    /// What is sent, when the wire adds transport fields.
    sent: Option<Vec<u8>>,
    /// The reply's token budget.
    budget: u64,
}

impl Frame {
    /// The body with `parts` filled in, and where in its canonical JSON the first part
    /// went; `None` when a stand-in is found more than once.
    fn fill(&self, parts: &[Part]) -> Option<(Body, Option<usize>)> {
        let (canonical, at) = fill(&self.canonical, parts)?;
        let canonical = bytes::Bytes::from(canonical);
        let wire = match &self.sent {
            Some(sent) => bytes::Bytes::from(fill(sent, parts)?.0),
            None => canonical.clone(),
        };
        let body = Body {
            tokens: estimated_tokens(wire.len(), self.budget),
            canonical,
            messages: None,
            wire,
        };
        Some((body, at))
    }
}

/// `frame` with each stand-in (as canonical JSON writes it) replaced by its part, and where
/// the first part went; `None` when one is found more than once, and which is the stand-in
/// cannot be told.
fn fill(frame: &[u8], parts: &[Part]) -> Option<(Vec<u8>, Option<usize>)> {
    let mut found: Vec<(usize, usize, &[u8], bool)> = Vec::with_capacity(parts.len());
    for (n, (finder, part)) in parts.iter().enumerate() {
        let mut at = finder.find_iter(frame);
        if let Some(first) = at.next() {
            if at.next().is_some() {
                return None;
            }
            found.push((first, finder.needle().len(), part, n == 0));
        }
    }
    found.sort_unstable_by_key(|(at, ..)| *at);
    let mut out = Vec::with_capacity(frame.len() + found.iter().map(|f| f.2.len()).sum::<usize>());
    let mut from = 0;
    let mut first = None;
    for (at, len, part, is_first) in found {
        out.extend_from_slice(&frame[from..at]);
        if is_first {
            first = Some(out.len());
        }
        out.extend_from_slice(part);
        from = at + len;
    }
    out.extend_from_slice(&frame[from..]);
    Some((out, first))
}

/// Tokens a request may use, for `tokens_per_minute`: prompt characters / 4 (`chars`: the
/// length of the body as sent) plus the reply's budget (servers count the budget against the
/// limit before the reply exists, see [`budget`]).
fn estimated_tokens(chars: usize, budget: u64) -> u32 {
    u32::try_from(chars as u64 / 4 + budget).unwrap_or(u32::MAX)
}

/// The reply's token budget a body names.
fn budget(body: &Json) -> u64 {
    body.get("max_tokens")
        .or_else(|| body.pointer("/options/num_predict"))
        .and_then(Json::as_u64)
        .unwrap_or(0)
}

fn root_cause(err: &dyn std::error::Error) -> String {
    let mut source = err;
    while let Some(next) = source.source() {
        source = next;
    }
    source.to_string()
}

/// The message an error body carries (`{"error":{"message":…}}` and similar), else the text.
fn server_message(text: &str) -> String {
    let parsed: Option<Json> = serde_json::from_str(text).ok();
    let message = parsed.as_ref().and_then(|v| {
        v.pointer("/error/message")
            .or_else(|| v.get("error"))
            .or_else(|| v.get("message"))
            .or_else(|| v.get("detail"))
            .and_then(Json::as_str)
            .map(str::to_owned)
    });
    let message = message.unwrap_or_else(|| text.trim().to_owned());
    let mut message: String = message.chars().take(500).collect();
    if message.is_empty() {
        message = "(empty body)".to_owned();
    }
    message
}

/// `Authorization: Bearer KEY` when there is a key (OpenAI-compatible servers, Ollama).
pub fn bearer(headers: &mut HeaderMap, key: Option<&str>) {
    if let Some(key) = key {
        insert_secret(
            headers,
            ::http::header::AUTHORIZATION,
            &format!("Bearer {key}"),
        );
    }
}

/// A header carrying a key: marked sensitive, so no debug output or HTTP/2 table keeps it.
/// A key that cannot go in a header (a line break in the variable) is left out; the server
/// then answers 401, and the error names the variable.
pub fn insert_secret(headers: &mut HeaderMap, name: ::http::header::HeaderName, value: &str) {
    if let Ok(mut value) = ::http::header::HeaderValue::from_str(value) {
        value.set_sensitive(true);
        headers.insert(name, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_reply_is_cached_as_serde_json_writes_it() {
        let plain = Reply {
            content: r#"{"pairs":[{"question":"Q \"1\"?","answer":"a\nb"}]}"#.into(),
            finish_reason: Some("stop".into()),
            prompt_tokens: 7,
            completion_tokens: 77,
            cost: None,
            reasoning: None,
        };
        let replies = [
            plain.clone(),
            Reply {
                content: "é 日本 \u{1}\t\\".into(),
                finish_reason: None,
                prompt_tokens: u64::MAX,
                completion_tokens: 0,
                cost: Some(0.000_123_4),
                reasoning: Some("thought \"first\"".into()),
            },
            Reply {
                content: String::new(),
                cost: Some(f64::NAN),
                ..plain.clone()
            },
            Reply {
                cost: Some(3.0),
                ..plain
            },
        ];
        for reply in replies {
            let mut bytes = Vec::new();
            reply.write_json(&mut bytes);
            assert_eq!(
                String::from_utf8(bytes.clone()).unwrap(),
                String::from_utf8(serde_json::to_vec(&reply).unwrap()).unwrap()
            );
            let back: Reply = serde_json::from_slice(&bytes).unwrap();
            if reply.cost.is_some_and(f64::is_nan) {
                assert_eq!(back.cost, None);
            } else {
                assert_eq!(back, reply);
            }
        }
    }

    pub(crate) fn config(kind: ProviderKind) -> ProviderConfig {
        ProviderConfig {
            kind,
            base_url: String::new(),
            model: "m".into(),
            api_key_env: None,
            headers: IndexMap::new(),
            concurrency: 4,
            requests_per_minute: None,
            tokens_per_minute: None,
            temperature: None,
            top_p: None,
            max_tokens: None,
            seed: None,
            num_ctx: None,
            keep_alive: None,
            timeout_secs: 60,
            max_retries: 2,
            retry_delay_ms: 500,
        }
    }

    #[test]
    fn server_message_reads_error_bodies_of_every_api() {
        assert_eq!(
            server_message(
                r#"{"error":{"message":"Incorrect API key provided","type":"invalid_request_error"}}"#
            ),
            "Incorrect API key provided"
        );
        assert_eq!(
            server_message(
                r#"{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}}"#
            ),
            "invalid x-api-key"
        );
        assert_eq!(
            server_message(r#"{"error":"model not found"}"#),
            "model not found"
        );
        assert_eq!(server_message("Bad Gateway"), "Bad Gateway");
        assert_eq!(server_message(""), "(empty body)");
    }

    #[test]
    fn empty_base_url_and_key_variable_take_the_kinds_defaults() {
        let p = Provider::new("llm", config(ProviderKind::Anthropic)).unwrap();
        assert_eq!(p.config.base_url, "https://api.anthropic.com");
        assert_eq!(p.endpoint(), "https://api.anthropic.com/v1/messages");
        assert_eq!(p.config.api_key_env.as_deref(), Some("ANTHROPIC_API_KEY"));
        let p = Provider::new("llm", config(ProviderKind::Openai)).unwrap();
        assert_eq!(p.endpoint(), "https://api.openai.com/v1/chat/completions");
        assert_eq!(p.config.api_key_env.as_deref(), Some("OPENAI_API_KEY"));
        let mut c = config(ProviderKind::Openai);
        c.api_key_env = Some("OPENROUTER_API_KEY".into());
        let p = Provider::new("llm", c).unwrap();
        assert_eq!(p.config.api_key_env.as_deref(), Some("OPENROUTER_API_KEY"));
    }

    #[test]
    fn ollama_only_fields_and_credential_headers_are_refused() {
        let mut c = config(ProviderKind::Openai);
        c.num_ctx = Some(8192);
        c.headers
            .insert("Authorization".into(), "Bearer sk-1".into());
        c.headers.insert("X Title".into(), "keg".into());
        c.requests_per_minute = Some(0);
        let err = Provider::new("llm", c).unwrap_err();
        assert_eq!(
            err,
            "provider `llm`: `num_ctx` applies to kind `ollama` only, not `openai`; \
             provider `llm`: `requests_per_minute` must be at least 1 (leave it out for no limit); \
             provider `llm`: header `Authorization` carries a credential; put the key in an \
             environment variable and name it in `api_key_env`; \
             provider `llm`: `X Title` is not a valid HTTP header name"
        );
    }

    #[test]
    fn transport_fields_are_sent_but_not_in_the_body() {
        let mut c = config(ProviderKind::Ollama);
        c.base_url = "http://h:1".into();
        c.keep_alive = Some("10m".into());
        let p = Provider::new("llm", c).unwrap();
        let body = p.body(&json!([]), None, None);
        let hashed: Json = serde_json::from_slice(&body.canonical).unwrap();
        let sent: Json = serde_json::from_slice(&body.wire).unwrap();
        assert!(hashed.get("keep_alive").is_none());
        assert_eq!(sent["keep_alive"], "10m");
        assert_eq!(sent["model"], hashed["model"]);
        // Without transport fields the bytes sent are the bytes hashed.
        let p = Provider::new("llm", config(ProviderKind::Openai)).unwrap();
        let body = p.body(&json!([{"role": "user", "content": "hi"}]), None, None);
        assert_eq!(body.wire, body.canonical);
        assert!(
            body.canonical
                .starts_with(br#"{"messages":[{"content":"hi","role":"user"}],"model":"#)
        );
    }

    #[test]
    fn bodies_are_the_canonical_json_of_the_whole_body_for_every_wire() {
        // How canonical JSON writes the stand-ins, as `fill` looks for them.
        for (mark, quoted) in [MESSAGES_MARK, SCHEMA_MARK] {
            assert_eq!(crate::record::canonical_json(&json!(mark)), quoted);
        }
        let messages = json!([
            {"role": "system", "content": "Reply in JSON.\n\u{0}keg:schema \"quoted\""},
            {"role": "user", "content": "Two pairs about é and 🦀.", "name": "u"}
        ]);
        // A message that is exactly a stand-in: the body is then built whole.
        let forged = json!([{"role": "system", "content": SCHEMA_MARK.0}, {"role": "user", "content": "hi"}]);
        let schema = json!({"type": "object", "required": ["pairs"], "properties": {
            "pairs": {"type": "array", "items": {"type": "string"}}}});
        for kind in [
            ProviderKind::Openai,
            ProviderKind::Ollama,
            ProviderKind::Anthropic,
        ] {
            let mut c = config(kind);
            c.base_url = "http://h:1".into();
            c.temperature = Some(0.7);
            c.seed = Some(3);
            if kind == ProviderKind::Ollama {
                c.keep_alive = Some("10m".into());
                c.num_ctx = Some(4096);
            }
            let p = Provider::new("llm", c.clone()).unwrap();
            for (messages, schema, max_tokens) in [
                (&messages, None, None),
                (&messages, Some(&schema), Some(300)),
                (&forged, Some(&schema), None),
                // The frame of the second case again, around other messages.
                (&forged, Some(&schema), Some(300)),
            ] {
                let whole = (kind.wire().body)(&c, messages, schema, max_tokens);
                let canonical =
                    crate::record::canonical_json(&schema.map_or(json!(null), |s| s.clone()));
                let body = p.body(messages, schema.map(|_| &canonical[..]), max_tokens);
                assert_eq!(
                    String::from_utf8_lossy(&body.canonical),
                    String::from_utf8_lossy(&crate::record::canonical_json(&whole)),
                    "{kind:?}"
                );
                let mut sent = whole.clone();
                for (k, v) in (kind.wire().transport_fields)(&c) {
                    sent.as_object_mut().unwrap().insert(k, v);
                }
                assert_eq!(body.wire, crate::record::canonical_json(&sent), "{kind:?}");
                assert_eq!(
                    body.tokens,
                    estimated_tokens(body.wire.len(), budget(&whole))
                );
            }
        }
    }

    #[test]
    fn the_queue_wants_more_calls_until_it_holds_as_many_as_the_provider_sends_at_once() {
        let p = Arc::new(Provider::new("llm", config(ProviderKind::Openai)).unwrap());
        let concurrency = p.config.concurrency;
        let mut queued: Vec<Queued> = (0..concurrency).map(|_| p.enqueue()).collect();
        assert!(!p.wants_more());
        let extra = p.enqueue();
        // Starting one call leaves the queue as full as the limit: still nothing wanted.
        queued[0].started();
        assert!(!p.wants_more());
        // Starting twice counts once; dropping an unstarted call counts as starting it.
        queued[0].started();
        assert!(!p.wants_more());
        drop(extra);
        assert!(p.wants_more());
        // The crossing below the limit was signalled, once.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), p.wanting_more())
                .await
                .expect("the runner is woken when the queue falls below the limit");
            assert!(
                tokio::time::timeout(Duration::from_millis(50), p.wanting_more())
                    .await
                    .is_err()
            );
        });
        queued.clear();
        assert!(p.wants_more());
    }

    #[test]
    fn token_estimate_counts_prompt_and_budget() {
        let body = json!({"messages": "x".repeat(400), "max_tokens": 100});
        let chars = serde_json::to_string(&body).unwrap().len();
        assert_eq!(
            estimated_tokens(chars, budget(&body)),
            chars as u32 / 4 + 100
        );
        let body = json!({"options": {"num_predict": 50}});
        assert_eq!(estimated_tokens(29, budget(&body)), 7 + 50);
    }

    #[test]
    fn replies_cached_before_cost_and_reasoning_still_read_and_keep_their_bytes() {
        let old =
            r#"{"content":"{}","finish_reason":"stop","prompt_tokens":3,"completion_tokens":4}"#;
        let reply: Reply = serde_json::from_str(old).unwrap();
        assert_eq!(reply.cost, None);
        assert_eq!(reply.reasoning, None);
        assert_eq!(serde_json::to_string(&reply).unwrap(), old);
    }

    #[test]
    fn redacts_the_key_from_server_messages() {
        let mut p = Provider::new("llm", config(ProviderKind::Openai)).unwrap();
        p.api_key = Some("sk-secret-1".into());
        assert_eq!(
            p.redact("Incorrect API key provided: sk-secret-1.".into()),
            "Incorrect API key provided: [redacted]."
        );
        assert_eq!(
            p.explain(401, "bad key".into()),
            "bad key (the key is read from `OPENAI_API_KEY`)"
        );
        p.api_key = None;
        assert_eq!(
            p.explain(401, "bad key".into()),
            "bad key (no key was sent: `OPENAI_API_KEY` is not set)"
        );
        assert_eq!(p.explain(400, "bad request".into()), "bad request");
    }
}
