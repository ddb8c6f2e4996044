//! `generate`: send each record's `messages` to an LLM, asking for JSON that matches the
//! stage's schema, and turn each item of the reply into a record.
//!
//! Every call is cached under a key of the provider identity and the exact request, the
//! moment it returns, so a killed run loses no finished call. The reply is cached, not its
//! interpretation: a re-run reproduces the same records and the same rejects without calls.
//!
//! A reply that is not usable gets, in order: safe repairs ([`crate::repair`]); when it was
//! cut off at the token limit, one more try with twice the budget; when it is invalid, a
//! re-ask with the validation error. Follow-ups are requests of their own, cached like any
//! other, so a re-run replays the same chain without calls. What still fails is rejected
//! with its reason.

use std::sync::Arc;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};

use super::{
    BuildContext, JsonSchemaFile, Kind, Mode, Stage, StageContext, StageError, StageStats,
};
use crate::cache::CallKey;
use crate::cache::key::{CALL_KEY_VERSION, CALLS_BUCKET};
use crate::config::node::suggest;
use crate::provider::{CallError, Provider, Reply};
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

pub struct Generate {
    config: GenerateConfig,
    provider: Arc<Provider>,
    schema: Option<JsonSchemaFile>,
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
        })),
        _ => Err(errors),
    }
}

/// One request: the messages and budget it was built from, its body, and its cache key.
struct Request {
    messages: Json,
    max_tokens: Option<u32>,
    body: Json,
    key: blake3::Hash,
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

impl Generate {
    fn request(&self, messages: Json, max_tokens: Option<u32>) -> Request {
        let body = self.provider.body(
            &messages,
            self.schema.as_ref().map(|s| &s.schema),
            max_tokens,
        );
        let endpoint = self.provider.endpoint();
        let key = CallKey {
            key_version: CALL_KEY_VERSION,
            provider: self.provider.config.kind.name(),
            endpoint: &endpoint,
            body: &body,
        }
        .digest();
        Request {
            messages,
            max_tokens,
            body,
            key,
        }
    }

    fn first_request(&self, record: &Record) -> Result<Request, StageError> {
        let messages = match record.data.get("messages") {
            Some(m @ Json::Array(_)) => m.clone(),
            _ => {
                return Err(StageError::Message(format!(
                    "record {} has no `messages`; put a `prompt` stage before it",
                    record.lineage.display()
                )));
            }
        };
        let max_tokens = self.config.max_tokens.or_else(|| {
            let items = record.data.get("items")?.as_u64()?;
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
        cx: &StageContext<'_>,
        request: &Request,
    ) -> Result<Option<Reply>, Resolution> {
        if cx.shared.read_cache {
            let cached = cx
                .shared
                .store
                .get(CALLS_BUCKET, &request.key)
                .map_err(|e| {
                    Resolution::Fatal(StageError::Message(format!("cannot read the cache: {e}")))
                })?
                .and_then(|bytes| serde_json::from_slice::<Reply>(&bytes).ok());
            if let Some(reply) = cached {
                StageStats::add(&cx.stats.cached, 1);
                return Ok(Some(reply));
            }
        }
        StageStats::add(&cx.stats.to_run, 1);
        if cx.shared.mode == Mode::Plan {
            return Ok(None);
        }
        let Ok(_permit) = self.provider.limit.acquire().await else {
            return Err(Resolution::Interrupted);
        };
        if cx.shared.stopping() {
            return Err(Resolution::Interrupted);
        }
        match self.provider.send(&request.body).await {
            Ok((reply, retries)) => {
                StageStats::add(&cx.stats.retries, u64::from(retries));
                // Tokens count what this run spent; cached replies cost nothing now.
                StageStats::add(&cx.stats.tokens_in, reply.prompt_tokens);
                StageStats::add(&cx.stats.tokens_out, reply.completion_tokens);
                if let Some(cost) = reply.cost {
                    StageStats::add(&cx.stats.cost_nanos, super::cost_nanos(cost));
                }
                let bytes = serde_json::to_vec(&reply).unwrap_or_default();
                cx.shared
                    .store
                    .put(CALLS_BUCKET, &request.key, &bytes)
                    .map_err(|e| {
                        Resolution::Fatal(StageError::Message(format!(
                            "cannot write the cache: {e}"
                        )))
                    })?;
                Ok(Some(reply))
            }
            Err(CallError::GaveUp { attempts, last }) => {
                StageStats::add(&cx.stats.retries, u64::from(attempts.saturating_sub(1)));
                Err(Resolution::Rejected {
                    code: "call_failed",
                    reason: format!("the call failed after {attempts} attempts: {last}"),
                    reply: None,
                })
            }
            Err(fatal) => {
                // A bad key or a bad request fails every call alike: stop sending.
                cx.shared
                    .stop
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                Err(Resolution::Fatal(StageError::Call(fatal)))
            }
        }
    }

    /// Follow one record's requests to items or a rejection.
    async fn resolve(&self, cx: &StageContext<'_>, record: &Record) -> Resolution {
        let mut request = match self.first_request(record) {
            Ok(r) => r,
            Err(e) => return Resolution::Fatal(e),
        };
        let (mut reasks, mut grows) = (0, 0);
        loop {
            let reply = match self.fetch(cx, &request).await {
                Ok(Some(reply)) => reply,
                Ok(None) => return Resolution::Pending,
                Err(resolution) => return resolution,
            };
            cx.count_usage(&self.provider.name, &reply);
            let problem = match self.interpret(cx, &reply) {
                Ok(items) => return Resolution::Items(items),
                Err(problem) => problem,
            };
            let truncated = reply.finish_reason.as_deref() == Some("length");
            if truncated
                && grows < self.config.length_retries
                && let Some(bigger) = self.bigger_budget(request.max_tokens)
            {
                grows += 1;
                StageStats::add(&cx.stats.grown, 1);
                request = self.request(request.messages.clone(), Some(bigger));
                continue;
            }
            if problem.reask && !truncated && reasks < self.config.reasks {
                reasks += 1;
                StageStats::add(&cx.stats.reasks, 1);
                let mut messages = request.messages.as_array().cloned().unwrap_or_default();
                messages.push(json!({ "role": "assistant", "content": reply.content }));
                messages.push(json!({
                    "role": "user",
                    "content": format!(
                        "That reply cannot be used: {}. Reply again with only the JSON, matching the schema.",
                        problem.reason
                    ),
                }));
                request = self.request(Json::Array(messages), request.max_tokens);
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
        cx: &StageContext<'_>,
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
        StageStats::add(&cx.stats.repairs, u64::from(repaired));
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
            let bar = cx.shared.progress.add(
                indicatif::ProgressBar::new(input.len() as u64).with_style(
                    indicatif::ProgressStyle::with_template(
                        "{prefix} [{bar:30}] {pos}/{len} records · {per_sec} · eta {eta}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                    .progress_chars("=> "),
                ),
            );
            bar.set_prefix(cx.name.to_owned());
            // Cached records resolve at once; the provider's limit bounds what is in flight,
            // so the stream only needs enough room to keep that limit busy.
            let room = self.provider.config.concurrency.max(1) * 2 + 64;
            let mut resolutions: Vec<Option<Resolution>> = (0..input.len()).map(|_| None).collect();
            // Indices, not references, go through the stream: a closure over borrowed items
            // trips a known limit of rustc's lifetime inference in boxed futures.
            let (bar_ref, cx_ref, records) = (&bar, &cx, &input);
            let mut stream = futures::stream::iter(0..input.len())
                .map(move |i| async move {
                    let resolution = self.resolve(cx_ref, &records[i]).await;
                    bar_ref.inc(1);
                    (i, resolution)
                })
                .buffer_unordered(room);
            let mut failure = None;
            while let Some((i, resolution)) = stream.next().await {
                match resolution {
                    Resolution::Fatal(err) => {
                        failure.get_or_insert(err);
                    }
                    Resolution::Interrupted => {
                        failure.get_or_insert(StageError::Interrupted);
                    }
                    other => resolutions[i] = Some(other),
                }
            }
            drop(stream);
            bar.finish_and_clear();
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
