//! `generate`: send each record's `messages` to an LLM, asking for JSON that matches the
//! stage's schema, and turn each item of the reply into a record.
//!
//! Every call is cached under a key of the provider identity and the exact request, the
//! moment it returns, so a killed run loses no finished call. The reply is cached, not its
//! interpretation: a re-run reproduces the same records and the same rejects without calls.

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
use crate::config::{Diagnostic, node::suggest};
use crate::provider::{CallError, Provider, Reply};
use crate::record::Record;

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
}

fn default_tokens_per_item() -> u32 {
    120
}

pub struct Generate {
    config: GenerateConfig,
    provider: Arc<Provider>,
    schema: Option<JsonSchemaFile>,
}

fn build(cx: &BuildContext) -> Result<Arc<dyn Stage>, Vec<Diagnostic>> {
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

/// One record's call: its request, and the reply once known.
struct Call {
    body: Json,
    key: blake3::Hash,
    reply: Option<Reply>,
    failure: Option<String>,
}

impl Generate {
    fn max_tokens(&self, record: &Record) -> Option<u32> {
        self.config.max_tokens.or_else(|| {
            let items = record.data.get("items")?.as_u64()?;
            let items = u32::try_from(items).unwrap_or(u32::MAX);
            Some(
                items
                    .saturating_mul(self.config.tokens_per_item)
                    .saturating_add(64),
            )
        })
    }

    fn prepare(&self, cx: &StageContext, record: &Record) -> Result<Call, StageError> {
        let messages = match record.data.get("messages") {
            Some(m @ Json::Array(_)) => m,
            _ => {
                return Err(StageError::Message(format!(
                    "record {} has no `messages`; put a `prompt` stage before it",
                    record.lineage.display()
                )));
            }
        };
        let body = self.provider.body(
            messages,
            self.schema.as_ref().map(|s| &s.schema),
            self.max_tokens(record),
        );
        let endpoint = self.provider.endpoint();
        let key = CallKey {
            key_version: CALL_KEY_VERSION,
            provider: self.provider.config.kind.name(),
            endpoint: &endpoint,
            body: &body,
        }
        .digest();
        let reply = if cx.shared.read_cache {
            cx.shared
                .store
                .get(CALLS_BUCKET, &key)
                .map_err(|e| StageError::Message(format!("cannot read the cache: {e}")))?
                .and_then(|bytes| serde_json::from_slice::<Reply>(&bytes).ok())
        } else {
            None
        };
        Ok(Call {
            body,
            key,
            reply,
            failure: None,
        })
    }

    /// Send the calls that have no reply yet, `concurrency` at a time, caching each reply as
    /// it arrives.
    async fn send_missing(
        &self,
        cx: &StageContext<'_>,
        calls: &mut [Call],
    ) -> Result<(), StageError> {
        let missing: Vec<usize> = (0..calls.len())
            .filter(|&i| calls[i].reply.is_none())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let bar = cx.shared.progress.add(
            indicatif::ProgressBar::new(missing.len() as u64).with_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {pos}/{len} calls · {per_sec} · eta {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            ),
        );
        bar.set_prefix(cx.name.to_owned());
        let provider = &self.provider;
        let store = &cx.shared.store;
        // Bodies are cloned so replies can be stored while requests are in flight; a clone
        // is nothing beside a network call.
        let bodies: Vec<(usize, Json, blake3::Hash)> = missing
            .iter()
            .map(|&i| (i, calls[i].body.clone(), calls[i].key))
            .collect();
        let mut results = futures::stream::iter(bodies)
            .map(|(i, body, key)| {
                let bar = bar.clone();
                async move {
                    let Ok(_permit) = provider.limit.acquire().await else {
                        return (i, Err(None));
                    };
                    if cx.shared.stopping() {
                        return (i, Err(None));
                    }
                    let outcome = provider.send(&body).await;
                    bar.inc(1);
                    match outcome {
                        Ok((reply, retries)) => {
                            StageStats::add(&cx.stats.retries, u64::from(retries));
                            let bytes = serde_json::to_vec(&reply).unwrap_or_default();
                            if let Err(err) = store.put(CALLS_BUCKET, &key, &bytes) {
                                return (
                                    i,
                                    Err(Some(StageError::Message(format!(
                                        "cannot write the cache: {err}"
                                    )))),
                                );
                            }
                            (i, Ok(reply))
                        }
                        Err(err) => (i, Err(Some(StageError::Call(err)))),
                    }
                }
            })
            .buffer_unordered(provider.config.concurrency.max(1));
        let mut interrupted = false;
        while let Some((i, outcome)) = results.next().await {
            match outcome {
                Ok(reply) => {
                    // Tokens count what this run spent; cached replies cost nothing.
                    StageStats::add(&cx.stats.to_run, 1);
                    StageStats::add(&cx.stats.tokens_in, reply.prompt_tokens);
                    StageStats::add(&cx.stats.tokens_out, reply.completion_tokens);
                    calls[i].reply = Some(reply);
                }
                Err(None) => interrupted = true,
                Err(Some(StageError::Call(CallError::GaveUp { attempts, last }))) => {
                    calls[i].failure =
                        Some(format!("the call failed after {attempts} attempts: {last}"));
                }
                Err(Some(fatal)) => {
                    // A bad key or a bad request fails every call alike: stop sending.
                    cx.shared
                        .stop
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    bar.abandon();
                    return Err(fatal);
                }
            }
        }
        bar.finish_and_clear();
        if interrupted {
            return Err(StageError::Interrupted);
        }
        Ok(())
    }

    /// The items of a reply, or why there are none.
    fn items(&self, reply: &Reply) -> Result<Vec<serde_json::Map<String, Json>>, String> {
        let truncated = reply.finish_reason.as_deref() == Some("length");
        let value: Json = serde_json::from_str(reply.content.trim()).map_err(|e| {
            if truncated {
                "the reply was cut off at the token limit (finish_reason `length`) before its JSON was complete".to_owned()
            } else {
                format!("the reply is not valid JSON: {e}")
            }
        })?;
        if let Some(schema) = &self.schema {
            schema
                .check(&value)
                .map_err(|e| format!("the reply does not match {}: {e}", schema.path.display()))?;
        }
        let list = match (&self.config.items_field, value) {
            (Some(field), Json::Object(mut obj)) => match obj.remove(field) {
                Some(Json::Array(items)) => items,
                _ => return Err(format!("the reply has no list `{field}`")),
            },
            (Some(field), _) => return Err(format!("the reply is not an object with `{field}`")),
            (None, Json::Array(items)) => items,
            (None, Json::Object(obj)) => {
                let lists: Vec<&String> = obj
                    .iter()
                    .filter(|(_, v)| v.is_array())
                    .map(|(k, _)| k)
                    .collect();
                match lists.as_slice() {
                    [only] => {
                        let only = (*only).clone();
                        match obj.into_iter().find(|(k, _)| *k == only) {
                            Some((_, Json::Array(items))) => items,
                            _ => Vec::new(),
                        }
                    }
                    _ => vec![Json::Object(obj)],
                }
            }
            (None, other) => vec![other],
        };
        list.into_iter()
            .enumerate()
            .map(|(i, item)| match item {
                Json::Object(obj) => Ok(obj),
                other => Err(format!("item {i} is not an object: {other}")),
            })
            .collect()
    }
}

impl Stage for Generate {
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
            let mut calls = input
                .iter()
                .map(|record| self.prepare(&cx, record))
                .collect::<Result<Vec<_>, _>>()?;
            StageStats::add(&cx.stats.items, calls.len() as u64);
            let hits = calls.iter().filter(|c| c.reply.is_some()).count() as u64;
            StageStats::add(&cx.stats.cached, hits);
            match cx.shared.mode {
                Mode::Plan => StageStats::add(&cx.stats.to_run, calls.len() as u64 - hits),
                Mode::Run => self.send_missing(&cx, &mut calls).await?,
            }
            let mut out = Vec::new();
            for (record, call) in input.iter().zip(&calls) {
                if let Some(failure) = &call.failure {
                    cx.reject(&record.lineage, failure.clone(), None);
                }
                let Some(reply) = &call.reply else { continue };
                match self.items(reply) {
                    Ok(items) => {
                        for (i, item) in items.into_iter().enumerate() {
                            out.push(Record::new(item, record.lineage.child(i)));
                        }
                    }
                    Err(reason) => cx.reject(&record.lineage, reason, Some(&reply.content)),
                }
            }
            Ok(out)
        }
        .boxed()
    }
}
