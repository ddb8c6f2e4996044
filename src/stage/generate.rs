//! `generate`: send each record's `messages` to an LLM, asking for JSON that matches the
//! stage's schema, and turn each item of the reply into a record.
//!
//! Every call is cached under a key of the provider identity and the exact request the
//! moment it returns (the store commits within 250 ms, and the stage waits for it before it
//! ends, Ctrl-C and errors included), so a killed run loses at most the calls of its last
//! 250 ms. The reply is cached, not its interpretation: a re-run
//! reproduces the same records and the same rejects without calls.
//!
//! Each record's calls run as a task of their own on the runtime; results are kept by record
//! index, so the output order does not depend on which reply came first.
//!
//! A reply that is not usable gets, in order: safe repairs ([`crate::repair`]); when it was
//! cut off at the token limit, one more try with twice the budget; when it is invalid, a
//! re-ask with the validation error. Follow-ups are requests of their own, cached like any
//! other, so a re-run replays the same chain without calls. What still fails is rejected
//! with its reason.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::FutureExt;
use futures::future::BoxFuture;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};

use super::{
    BuildContext, JsonSchemaFile, Kind, Mode, Stage, StageContext, StageError, StageStats,
};
use crate::cache::key::{CALLS_BUCKET, CALLS_BUCKET_V1};
use crate::cache::{CallKey, KeyStarts, Store};
use crate::config::node::suggest;
use crate::provider::{Body, CallError, Provider, Queued, Reply};
use crate::record::Record;
use crate::repair;

pub const KIND: Kind = Kind {
    name: "generate",
    about: "ask an LLM for JSON items per record; each item becomes a record",
    takes_inputs: true,
    build,
    schema: |g| g.subschema_for::<GenerateConfig>(),
};

/// Settings of a `generate` stage.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerateConfig {
    /// The name of an entry under `providers:`.
    pub provider: String,
    /// A JSON Schema file (relative to the pipeline file) the reply must match; it is sent as
    /// the structured-output format.
    #[serde(default)]
    pub schema: Option<String>,
    /// The property of the reply that holds the list of items. Default: the reply itself when
    /// it is a list, else its only list-valued property, else the whole reply as one item.
    #[serde(default)]
    pub items_field: Option<String>,
    /// Token budget per reply. Default: 64 + `tokens_per_item` × the record's `items`, capped
    /// by the provider's `max_tokens`.
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default = "default_tokens_per_item")]
    pub tokens_per_item: u32,
    /// How many times an invalid reply is re-asked with the validation error.
    #[serde(default = "default_reasks")]
    pub reasks: u32,
    /// How many times a reply cut off at the token limit is retried with twice the budget.
    #[serde(default = "default_length_retries")]
    pub length_retries: u32,
}

fn default_tokens_per_item() -> u32 {
    120
}
fn default_reasks() -> u32 {
    1
}
fn default_length_retries() -> u32 {
    1
}

#[derive(Clone)]
pub struct Generate {
    config: GenerateConfig,
    provider: Arc<Provider>,
    schema: Option<JsonSchemaFile>,
    /// How this stage's call keys start, hashed once (see [`KeyStarts`]); shared by the
    /// copy each document's run makes.
    key_starts: Arc<KeyStarts>,
}

fn build(cx: &BuildContext) -> super::Built {
    let config: GenerateConfig = cx.settings()?;
    let mut errors = Vec::new();
    let provider = cx.providers.get(&config.provider).cloned();
    if provider.is_none() {
        let names: Vec<&str> = cx.providers.keys().map(String::as_str).collect();
        errors.push(
            cx.error(
                "provider",
                format!("no provider named `{}`", config.provider),
            )
            .hint(suggest(&config.provider, &names, "providers")),
        );
    }
    let schema = match &config.schema {
        Some(path) => match cx.json_schema("schema", path) {
            Ok(s) => Some(s),
            Err(d) => {
                errors.push(d);
                None
            }
        },
        None => None,
    };
    match provider {
        Some(provider) if errors.is_empty() => Ok(Arc::new(Generate {
            config,
            provider,
            schema,
            key_starts: Arc::default(),
        })),
        _ => Err(errors),
    }
}

/// One request: the messages (the record's own, until a re-ask adds to them) and budget it
/// was built from, its body, and its cache key.
struct Request<'r> {
    messages: Cow<'r, Json>,
    max_tokens: Option<u32>,
    body: Body,
    key: blake3::Hash,
}

/// What the calls of one run of the stage share. Each record's calls run as a task of their
/// own on the runtime, so this is owned, not borrowed from the run.
struct Calls {
    store: Arc<dyn Store>,
    read_cache: bool,
    mode: Mode,
    /// The run's stop flag (Ctrl-C, or a fatal error of any call), as seen by the calls:
    /// the driving loop copies the run's flag here, and a fatal error sets it at once.
    stop: Arc<AtomicBool>,
    /// This stage's counters, added to the run's when every call has ended.
    stats: StageStats,
    /// Whether the cache holds calls cached under version 1's keys, once asked.
    older: std::sync::OnceLock<bool>,
}

impl Calls {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Add the counters this stage fills in to the run's.
    fn add_stats_to(&self, to: &StageStats) {
        let from = &self.stats;
        for (to, from) in [
            (&to.cached, &from.cached),
            (&to.to_run, &from.to_run),
            (&to.retries, &from.retries),
            (&to.repairs, &from.repairs),
            (&to.reasks, &from.reasks),
            (&to.grown, &from.grown),
            (&to.tokens_in, &from.tokens_in),
            (&to.tokens_out, &from.tokens_out),
            (&to.cost_nanos, &from.cost_nanos),
        ] {
            StageStats::add(to, StageStats::get(from));
        }
    }
}

/// How one record ended.
enum Resolution {
    Items(Vec<serde_json::Map<String, Json>>),
    Rejected {
        code: &'static str,
        reason: String,
        reply: Option<String>,
    },
    /// Plan mode: a request is not cached yet.
    Pending,
    Interrupted,
    Fatal(StageError),
}

/// Why a reply is not usable.
struct Problem {
    code: &'static str,
    reason: String,
    /// Worth asking again with the reason appended.
    reask: bool,
}

/// A reply's token counts and cost without its text, for the run's usage totals.
fn usage_of(reply: &Reply) -> Reply {
    Reply {
        content: String::new(),
        finish_reason: None,
        prompt_tokens: reply.prompt_tokens,
        completion_tokens: reply.completion_tokens,
        cost: reply.cost,
        reasoning: None,
    }
}

impl Generate {
    fn call_key<'b>(&'b self, body: &'b Body) -> CallKey<'b> {
        CallKey {
            provider: self.provider.config.kind.name(),
            endpoint: self.provider.endpoint(),
            body: &body.canonical,
            messages: body.messages.clone(),
        }
    }

    /// The cached reply to a request: under its key, or else under its version 1 key when
    /// the cache holds calls cached before version 2. One found that way is cached under
    /// its key too (but not by `keg plan`, which writes nothing), so the next run finds it
    /// at once.
    fn cached(&self, calls: &Calls, request: &Request<'_>) -> std::io::Result<Option<Reply>> {
        let read = |bucket: &str, key: &blake3::Hash| -> std::io::Result<_> {
            Ok(calls.store.get(bucket, key)?.and_then(|bytes| {
                let reply = serde_json::from_slice::<Reply>(&bytes).ok()?;
                Some((bytes, reply))
            }))
        };
        if let Some((_, reply)) = read(CALLS_BUCKET, &request.key)? {
            return Ok(Some(reply));
        }
        let older = match calls.older.get() {
            Some(older) => *older,
            None => {
                let holds = calls.store.holds(CALLS_BUCKET_V1)?;
                *calls.older.get_or_init(|| holds)
            }
        };
        if !older {
            return Ok(None);
        }
        let key = self.call_key(&request.body).digest_v1();
        let Some((bytes, reply)) = read(CALLS_BUCKET_V1, &key)? else {
            return Ok(None);
        };
        if calls.mode != Mode::Plan {
            calls.store.put(CALLS_BUCKET, &request.key, &bytes)?;
        }
        Ok(Some(reply))
    }

    fn request<'r>(&self, messages: Cow<'r, Json>, max_tokens: Option<u32>) -> Request<'r> {
        let body = self.provider.body(
            &messages,
            self.schema.as_ref().map(|s| &s.canonical[..]),
            max_tokens,
        );
        let key = self.call_key(&body).digest_with(&self.key_starts);
        Request {
            messages,
            max_tokens,
            body,
            key,
        }
    }

    fn first_request<'r>(&self, record: &'r Record) -> Result<Request<'r>, StageError> {
        let messages = match super::field(&record.data, "messages") {
            Some(m @ Json::Array(_)) => Cow::Borrowed(m),
            _ => {
                return Err(StageError::Message(format!(
                    "record {} has no `messages`; put a `prompt` stage before it",
                    record.lineage.display()
                )));
            }
        };
        let max_tokens = self.config.max_tokens.or_else(|| {
            let items = super::field(&record.data, "items")?.as_u64()?;
            let items = u32::try_from(items).unwrap_or(u32::MAX);
            Some(
                items
                    .saturating_mul(self.config.tokens_per_item)
                    .saturating_add(64),
            )
        });
        Ok(self.request(messages, max_tokens))
    }

    /// The reply to a request: from the cache, or sent (and cached the moment it returns).
    async fn fetch(
        &self,
        calls: &Calls,
        request: &Request<'_>,
        queued: &mut Queued,
    ) -> Result<Option<Reply>, Resolution> {
        if calls.read_cache {
            let cached = self.cached(calls, request).map_err(|e| {
                Resolution::Fatal(StageError::Message(format!("cannot read the cache: {e}")))
            })?;
            if let Some(reply) = cached {
                StageStats::add(&calls.stats.cached, 1);
                return Ok(Some(reply));
            }
        }
        StageStats::add(&calls.stats.to_run, 1);
        if calls.mode == Mode::Plan {
            return Ok(None);
        }
        let Ok(permit) = self.provider.limit.acquire().await else {
            return Err(Resolution::Interrupted);
        };
        queued.started();
        if calls.stopping() {
            return Err(Resolution::Interrupted);
        }
        let sent = self.provider.send(&request.body).await;
        // The next call may start while this one's reply is cached.
        drop(permit);
        match sent {
            Ok((reply, retries)) => {
                StageStats::add(&calls.stats.retries, u64::from(retries));
                // Tokens count what this run spent; cached replies cost nothing now.
                StageStats::add(&calls.stats.tokens_in, reply.prompt_tokens);
                StageStats::add(&calls.stats.tokens_out, reply.completion_tokens);
                if let Some(cost) = reply.cost {
                    StageStats::add(&calls.stats.cost_nanos, super::cost_nanos(cost));
                }
                // Copied into the cache's own entry at once: written in a buffer kept warm.
                crate::record::with_scratch(|bytes| {
                    reply.write_json(bytes);
                    calls.store.put(CALLS_BUCKET, &request.key, bytes)
                })
                .map_err(|e| {
                    Resolution::Fatal(StageError::Message(format!("cannot write the cache: {e}")))
                })?;
                Ok(Some(reply))
            }
            Err(CallError::GaveUp { attempts, last }) => {
                StageStats::add(&calls.stats.retries, u64::from(attempts.saturating_sub(1)));
                Err(Resolution::Rejected {
                    code: "call_failed",
                    reason: format!("the call failed after {attempts} attempts: {last}"),
                    reply: None,
                })
            }
            Err(fatal) => {
                // A bad key or a bad request fails every call alike: stop sending.
                calls.stop.store(true, Ordering::Relaxed);
                Err(Resolution::Fatal(StageError::Call(fatal)))
            }
        }
    }

    /// Follow one record's requests to items or a rejection; `usage` gets every reply's
    /// token counts.
    async fn resolve(
        &self,
        calls: &Calls,
        record: &Record,
        usage: &mut Vec<Reply>,
        mut queued: Queued,
    ) -> Resolution {
        let mut request = match self.first_request(record) {
            Ok(r) => r,
            Err(e) => return Resolution::Fatal(e),
        };
        let (mut reasks, mut grows) = (0, 0);
        loop {
            let reply = match self.fetch(calls, &request, &mut queued).await {
                Ok(Some(reply)) => reply,
                Ok(None) => return Resolution::Pending,
                Err(resolution) => return resolution,
            };
            usage.push(usage_of(&reply));
            let problem = match self.interpret(calls, &reply) {
                Ok(items) => return Resolution::Items(items),
                Err(problem) => problem,
            };
            let truncated = reply.finish_reason.as_deref() == Some("length");
            if truncated
                && grows < self.config.length_retries
                && let Some(bigger) = self.bigger_budget(request.max_tokens)
            {
                grows += 1;
                StageStats::add(&calls.stats.grown, 1);
                request = self.request(request.messages, Some(bigger));
                continue;
            }
            if problem.reask && !truncated && reasks < self.config.reasks {
                reasks += 1;
                StageStats::add(&calls.stats.reasks, 1);
                let mut messages = match request.messages.into_owned() {
                    Json::Array(messages) => messages,
                    _ => Vec::new(),
                };
                messages.push(json!({ "role": "assistant", "content": reply.content }));
                messages.push(json!({
                    "role": "user",
                    "content": format!(
                        "That reply cannot be used: {}. Reply again with only the JSON, matching the schema.",
                        problem.reason
                    ),
                }));
                request = self.request(Cow::Owned(Json::Array(messages)), request.max_tokens);
                continue;
            }
            return Resolution::Rejected {
                code: problem.code,
                reason: problem.reason,
                reply: Some(reply.content),
            };
        }
    }

    /// Twice the budget, within the provider's cap; `None` when it cannot grow.
    fn bigger_budget(&self, current: Option<u32>) -> Option<u32> {
        let current = current.or(self.provider.config.max_tokens)?;
        let doubled = current.saturating_mul(2);
        let capped = match self.provider.config.max_tokens {
            Some(cap) => doubled.min(cap.max(current)),
            None => doubled,
        };
        (capped > current).then_some(capped)
    }

    /// The items of a reply, or why there are none.
    fn interpret(
        &self,
        calls: &Calls,
        reply: &Reply,
    ) -> Result<Vec<serde_json::Map<String, Json>>, Problem> {
        let truncated = reply.finish_reason.as_deref() == Some("length");
        let (mut value, repairs) = match repair::parse(&reply.content) {
            Ok(parsed) => parsed,
            Err(err) if truncated => {
                return Err(Problem {
                    code: "truncated",
                    reason: format!(
                        "the reply was cut off at the token limit (finish_reason `length`) before its JSON was complete ({err})"
                    ),
                    reask: false,
                });
            }
            Err(_)
                if reply.finish_reason.as_deref() == Some("content_filter")
                    || repair::looks_like_refusal(&reply.content) =>
            {
                return Err(Problem {
                    code: "refused",
                    reason: "the model refused".to_owned(),
                    reask: false,
                });
            }
            Err(err) => {
                return Err(Problem {
                    code: "invalid_json",
                    reason: format!("the reply is not valid JSON ({err})"),
                    reask: true,
                });
            }
        };
        let mut repaired = !repairs.is_empty();
        if let Some(field) = &self.config.items_field
            && repair::fit_items_field(&mut value, field)
        {
            repaired = true;
        }
        if let Some(schema) = &self.schema {
            schema.check(&value).map_err(|e| Problem {
                code: "schema",
                reason: format!("the reply does not match {}: {e}", schema.path.display()),
                reask: true,
            })?;
        }
        StageStats::add(&calls.stats.repairs, u64::from(repaired));
        let list = match (&self.config.items_field, value) {
            (Some(field), Json::Object(mut obj)) => match obj.remove(field) {
                Some(Json::Array(items)) => items,
                _ => {
                    return Err(Problem {
                        code: "schema",
                        reason: format!("the reply has no list `{field}`"),
                        reask: true,
                    });
                }
            },
            (Some(field), _) => {
                return Err(Problem {
                    code: "schema",
                    reason: format!("the reply is not an object with `{field}`"),
                    reask: true,
                });
            }
            (None, Json::Array(items)) => items,
            (None, Json::Object(obj)) => {
                let lists: Vec<String> = obj
                    .iter()
                    .filter(|(_, v)| v.is_array())
                    .map(|(k, _)| k.clone())
                    .collect();
                match lists.as_slice() {
                    [only] => match obj.into_iter().find(|(k, _)| k == only) {
                        Some((_, Json::Array(items))) => items,
                        _ => Vec::new(),
                    },
                    _ => vec![Json::Object(obj)],
                }
            }
            (None, other) => vec![other],
        };
        list.into_iter()
            .enumerate()
            .map(|(i, item)| match item {
                Json::Object(obj) => Ok(obj),
                other => Err(Problem {
                    code: "schema",
                    reason: format!("item {i} is not an object: {other}"),
                    reask: true,
                }),
            })
            .collect()
    }
}

impl Stage for Generate {
    fn partition(&self) -> super::Partition {
        super::Partition::PerDocument
    }

    fn settings(&self) -> Json {
        json!({
            "config": self.config,
            "schema_digest": self.schema.as_ref().map(|s| &s.digest),
        })
    }

    fn provider(&self) -> Option<&Arc<Provider>> {
        Some(&self.provider)
    }

    fn run<'a>(
        &'a self,
        cx: StageContext<'a>,
        input: Vec<Record>,
    ) -> BoxFuture<'a, Result<Vec<Record>, StageError>> {
        async move {
            StageStats::add(&cx.stats.items, input.len() as u64);
            // Run document by document, a stage runs once per document: a bar is only made
            // where it is shown.
            let bar = cx.bars.then(|| {
                let bar = cx
                    .shared
                    .progress
                    .add(indicatif::ProgressBar::new(input.len() as u64));
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{prefix} [{bar:30}] {pos}/{len} records · {per_sec} · eta {eta}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                bar.set_prefix(cx.name.to_owned());
                bar
            });
            // Each record's calls are a task of their own, woken on their own when their
            // reply comes, whatever the other records' calls are doing. The provider's limit
            // bounds what is in flight; cached records resolve at once, so the set only needs
            // enough room to keep that limit busy. Futures polled in place (one task for the
            // stage) would save a spawn and a join per call, but the runtime polls the run's
            // own future only once per batch of tasks, so replies wait longer to be read and
            // fewer calls stay in flight (BENCHMARKS.md, seventh round).
            let room = self.provider.config.concurrency.max(1) * 2 + 64;
            let this = Arc::new(self.clone());
            let calls = Arc::new(Calls {
                store: cx.shared.store.clone(),
                read_cache: cx.shared.read_cache,
                mode: cx.shared.mode,
                stop: cx.shared.stop.clone(),
                stats: StageStats::default(),
                older: std::sync::OnceLock::new(),
            });
            let input = Arc::new(input);
            let mut resolutions: Vec<Option<Resolution>> = (0..input.len()).map(|_| None).collect();
            let mut tasks = tokio::task::JoinSet::new();
            let mut next = 0;
            let mut failure = None;
            loop {
                // Once the run stops, no record starts: its calls could not be sent.
                while tasks.len() < room && next < input.len() && !calls.stopping() {
                    let (this, calls, input, i) =
                        (this.clone(), calls.clone(), input.clone(), next);
                    // Counted as waiting from now, so the runner sees this document's calls
                    // before it decides whether to start another.
                    let queued = self.provider.enqueue();
                    tasks.spawn(async move {
                        let mut usage = Vec::new();
                        let resolution = this.resolve(&calls, &input[i], &mut usage, queued).await;
                        (i, resolution, usage)
                    });
                    next += 1;
                }
                let Some(joined) = tasks.join_next().await else {
                    break;
                };
                let (i, resolution, usage) = match joined {
                    Ok(done) => done,
                    Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
                    Err(_) => {
                        failure.get_or_insert(StageError::Interrupted);
                        continue;
                    }
                };
                for reply in &usage {
                    cx.count_usage(&self.provider.name, reply);
                }
                if let Some(bar) = &bar {
                    bar.inc(1);
                }
                match resolution {
                    Resolution::Fatal(err) => {
                        // Stop sending, here and in every other stage of the run.
                        calls.stop.store(true, Ordering::Relaxed);
                        failure.get_or_insert(err);
                    }
                    Resolution::Interrupted => {
                        failure.get_or_insert(StageError::Interrupted);
                    }
                    other => resolutions[i] = Some(other),
                }
            }
            if next < input.len() {
                // Records never started because the run stopped.
                failure.get_or_insert(StageError::Interrupted);
            }
            calls.add_stats_to(cx.stats);
            if let Some(bar) = &bar {
                bar.finish_and_clear();
            }
            // The runner makes the cache entries durable before it reports anything.
            if let Some(err) = failure {
                return Err(err);
            }
            let mut out = Vec::new();
            for (record, resolution) in input.iter().zip(resolutions) {
                match resolution {
                    Some(Resolution::Items(items)) => {
                        for (i, item) in items.into_iter().enumerate() {
                            out.push(Record::new(item, record.lineage.child(i)));
                        }
                    }
                    Some(Resolution::Rejected {
                        code,
                        reason,
                        reply,
                    }) => cx.reject(&record.lineage, code, reason, reply.as_deref()),
                    _ => {}
                }
            }
            Ok(out)
        }
        .boxed()
    }
}
