//! `dedupe`: drop records whose chosen fields repeat an earlier record's (exact match, after
//! optional case and whitespace folding). The first record in lineage order is kept.

use std::collections::HashSet;
use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::{BuildContext, Kind, Stage, StageContext, StageError, StageStats};
use crate::config::Diagnostic;
use crate::record::{Record, canonical_json};

pub const KIND: Kind = Kind {
    name: "dedupe",
    about: "drop exact duplicates on chosen fields",
    takes_inputs: true,
    build,
    schema: |g| g.subschema_for::<DedupeConfig>(),
};

/// Settings of a `dedupe` stage.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DedupeConfig {
    /// The fields that make two records the same. Default: all fields.
    #[serde(default)]
    pub fields: Vec<String>,
    /// Compare text case-insensitively with runs of whitespace folded to one space.
    #[serde(default = "default_normalize")]
    pub normalize: bool,
}

fn default_normalize() -> bool {
    true
}

pub struct Dedupe {
    config: DedupeConfig,
}

fn build(cx: &BuildContext) -> Result<Arc<dyn Stage>, Vec<Diagnostic>> {
    Ok(Arc::new(Dedupe {
        config: cx.settings()?,
    }))
}

/// Lowercase, with runs of whitespace folded to one space and the ends trimmed.
pub fn normalize_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for word in text.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.extend(word.chars().flat_map(char::to_lowercase));
    }
    out
}

impl Dedupe {
    fn key(&self, record: &Record) -> blake3::Hash {
        let mut hasher = blake3::Hasher::new();
        let mut add = |value: Option<&Json>| {
            match value {
                Some(Json::String(s)) if self.config.normalize => {
                    hasher.update(normalize_text(s).as_bytes())
                }
                Some(v) => hasher.update(&canonical_json(v)),
                None => hasher.update(b"\0missing"),
            };
            hasher.update(b"\0");
        };
        if self.config.fields.is_empty() {
            add(Some(&Json::Object(record.data.clone())));
        } else {
            for field in &self.config.fields {
                add(record.data.get(field));
            }
        }
        hasher.finalize()
    }
}

impl Stage for Dedupe {
    fn settings(&self) -> Json {
        serde_json::to_value(&self.config).unwrap_or_default()
    }

    fn run<'a>(
        &'a self,
        cx: StageContext<'a>,
        mut input: Vec<Record>,
    ) -> BoxFuture<'a, Result<Vec<Record>, StageError>> {
        async move {
            StageStats::add(&cx.stats.items, input.len() as u64);
            input.sort_by(crate::record::by_lineage);
            let mut seen = HashSet::with_capacity(input.len());
            let before = input.len();
            input.retain(|record| seen.insert(self.key(record)));
            StageStats::add(&cx.stats.skipped, (before - input.len()) as u64);
            Ok(input)
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_case_and_whitespace() {
        assert_eq!(normalize_text("  What IS\n\tKeg?  "), "what is keg?");
    }
}
