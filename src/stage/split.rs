//! `split`: assign each record to a named split. Assignment is a pure function of the
//! record's group key, the seed and the ratios, so adding or removing documents never moves
//! an existing example to another split.

use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;
use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::{BuildContext, Kind, Stage, StageContext, StageError, StageStats, Streamed};
use crate::config::{Diagnostic, is_valid_name};
use crate::record::Record;

pub const KIND: Kind = Kind {
    name: "split",
    about: "assign records to train/valid/test (stable as documents come and go)",
    takes_inputs: true,
    build,
    schema: |g| g.subschema_for::<SplitConfig>(),
};

/// Settings of a `split` stage.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SplitConfig {
    /// Split name → share of the records; the shares sum to 1. Names become file names.
    pub ratios: IndexMap<String, f64>,
    #[serde(default)]
    pub seed: u64,
    /// What stays together in one split: each `example` on its own, all examples from one
    /// `chunk`, or all from one `doc`.
    #[serde(default)]
    pub group_by: GroupBy,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum GroupBy {
    Example,
    #[default]
    Chunk,
    Doc,
}

pub struct Split {
    config: SplitConfig,
    /// Upper bounds of each split's share of [0, 1), in declaration order.
    bounds: Vec<(Arc<str>, f64)>,
}

fn build(cx: &BuildContext) -> Result<Arc<dyn Stage>, Vec<Diagnostic>> {
    let config: SplitConfig = cx.settings()?;
    let mut errors = Vec::new();
    if config.ratios.is_empty() {
        errors.push(
            cx.error("ratios", "`ratios` is empty")
                .hint("e.g. `ratios: {train: 0.8, valid: 0.1, test: 0.1}`"),
        );
    }
    for (name, ratio) in &config.ratios {
        if !is_valid_name(name) {
            errors.push(
                cx.error("ratios", format!("invalid split name `{name}`"))
                    .hint("split names become file names: use letters, digits, `-` and `_`"),
            );
        }
        if !(0.0..=1.0).contains(ratio) {
            errors.push(cx.error(
                "ratios",
                format!("ratio of `{name}` must be between 0 and 1"),
            ));
        }
    }
    let sum: f64 = config.ratios.values().sum();
    if !config.ratios.is_empty() && (sum - 1.0).abs() > 1e-6 {
        errors.push(
            cx.error("ratios", format!("ratios sum to {sum}, not 1"))
                .hint("adjust the shares so they add up to 1"),
        );
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let mut upper = 0.0;
    let mut bounds: Vec<(Arc<str>, f64)> = config
        .ratios
        .iter()
        .map(|(name, ratio)| {
            upper += ratio;
            (Arc::from(name.as_str()), upper)
        })
        .collect();
    if let Some(last) = bounds.last_mut() {
        last.1 = f64::INFINITY;
    }
    Ok(Arc::new(Split { config, bounds }))
}

impl Split {
    /// Write the record's group key into `key` (cleared first).
    fn group_key(&self, record: &Record, key: &mut String) {
        use std::fmt::Write;
        key.clear();
        match self.config.group_by {
            GroupBy::Doc => key.push_str(&record.lineage.source),
            GroupBy::Chunk => {
                key.push_str(&record.lineage.source);
                if let Some(chunk) = record.lineage.path.first() {
                    // Writing to a `String` cannot fail.
                    let _ = write!(key, "#{chunk}");
                }
            }
            GroupBy::Example => key.push_str(record.id().to_hex().as_str()),
        }
    }

    /// The split for a group key: blake3(seed, key) read as a fraction of [0, 1).
    fn assign(&self, key: &str) -> Arc<str> {
        let mut hasher = blake3::Hasher::new();
        hasher.update(&self.config.seed.to_le_bytes());
        hasher.update(key.as_bytes());
        let hash = hasher.finalize();
        let mut head = [0u8; 8];
        head.copy_from_slice(&hash.as_bytes()[..8]);
        let fraction = (u64::from_le_bytes(head) >> 11) as f64 / (1u64 << 53) as f64;
        self.bounds
            .iter()
            .find(|(_, upper)| fraction < *upper)
            .or(self.bounds.last())
            .map(|(name, _)| name.clone())
            .unwrap_or_else(|| Arc::from("train"))
    }
}

impl Stage for Split {
    fn settings(&self) -> Json {
        serde_json::to_value(&self.config).unwrap_or_default()
    }

    fn splits(&self) -> Option<Vec<String>> {
        Some(self.config.ratios.keys().cloned().collect())
    }

    fn run<'a>(
        &'a self,
        cx: StageContext<'a>,
        input: Vec<Record>,
    ) -> BoxFuture<'a, Result<Vec<Record>, StageError>> {
        async move { self.streaming(cx).push(input) }.boxed()
    }

    fn stream<'a>(&'a self, cx: StageContext<'a>) -> Option<Box<dyn Streamed + 'a>> {
        Some(Box::new(self.streaming(cx)))
    }
}

impl Split {
    fn streaming<'a>(&'a self, cx: StageContext<'a>) -> Streaming<'a> {
        Streaming {
            stage: self,
            cx,
            key: String::new(),
            last: None,
        }
    }
}

/// Each record's split is its own: nothing is kept between documents but the last group's.
struct Streaming<'a> {
    stage: &'a Split,
    cx: StageContext<'a>,
    key: String,
    /// The last group key and its split: records of a group arrive together (lineage
    /// order), so each group is hashed once.
    last: Option<(String, Arc<str>)>,
}

impl Streamed for Streaming<'_> {
    fn push(&mut self, mut records: Vec<Record>) -> Result<Vec<Record>, StageError> {
        StageStats::add(&self.cx.stats.items, records.len() as u64);
        for record in &mut records {
            self.stage.group_key(record, &mut self.key);
            let split = match &mut self.last {
                Some((last_key, split)) if *last_key == self.key => split.clone(),
                _ => {
                    let split = self.stage.assign(&self.key);
                    self.last = Some((self.key.clone(), split.clone()));
                    split
                }
            };
            record.split = Some(split);
        }
        Ok(records)
    }

    fn finish(self: Box<Self>) -> Result<(), StageError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(ratios: &[(&str, f64)], seed: u64) -> Split {
        let config = SplitConfig {
            ratios: ratios.iter().map(|(n, r)| (n.to_string(), *r)).collect(),
            seed,
            group_by: GroupBy::Chunk,
        };
        let mut upper = 0.0;
        let mut bounds: Vec<(Arc<str>, f64)> = config
            .ratios
            .iter()
            .map(|(n, r)| {
                upper += r;
                (Arc::from(n.as_str()), upper)
            })
            .collect();
        bounds.last_mut().unwrap().1 = f64::INFINITY;
        Split { config, bounds }
    }

    #[test]
    fn assignment_is_pinned_and_proportional() {
        let s = split(&[("train", 0.8), ("valid", 0.1), ("test", 0.1)], 42);
        // Pinned: changing the function moves every user's examples between splits.
        let first: Vec<String> = (0..8)
            .map(|i| s.assign(&format!("doc{i}.md#0")).to_string())
            .collect();
        assert_eq!(
            first,
            [
                "valid", "train", "train", "test", "train", "train", "train", "valid"
            ]
        );
        let mut counts = std::collections::HashMap::new();
        for i in 0..10_000 {
            *counts.entry(s.assign(&format!("k{i}"))).or_insert(0) += 1;
        }
        let train = counts[&Arc::from("train")];
        assert!((7_700..8_300).contains(&train), "train got {train}");
    }

    #[test]
    fn seed_changes_assignment() {
        let a = split(&[("train", 0.5), ("test", 0.5)], 1);
        let b = split(&[("train", 0.5), ("test", 0.5)], 2);
        let differ = (0..100)
            .filter(|i| a.assign(&i.to_string()) != b.assign(&i.to_string()))
            .count();
        assert!(differ > 20);
    }
}
