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
use crate::record::{Record, canonical_json, write_canonical_into};

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
    normalize_into(text, &mut out);
    out
}

/// [`normalize_text`] into `out` (cleared first), so one buffer serves every record.
pub fn normalize_into(text: &str, out: &mut String) {
    out.clear();
    if text.is_ascii() {
        // The same result, byte by byte: for ASCII, `char::is_whitespace` is 0x09–0x0D and
        // space (`u8::is_ascii_whitespace` leaves out 0x0B), and lowercasing is ASCII's own.
        let mut space = false;
        for &b in text.as_bytes() {
            if matches!(b, b'\t'..=b'\r' | b' ') {
                space = !out.is_empty();
            } else {
                if space {
                    out.push(' ');
                    space = false;
                }
                out.push(char::from(b.to_ascii_lowercase()));
            }
        }
        return;
    }
    for word in text.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.extend(word.chars().flat_map(char::to_lowercase));
    }
}

impl Dedupe {
    /// The hash of what makes `record` a duplicate: blake3 of each chosen field (normalised
    /// text, or canonical JSON) followed by a NUL, built in `buf` and hashed at once.
    fn key(&self, record: &mut Record, buf: &mut Vec<u8>, text: &mut String) -> blake3::Hash {
        if self.config.fields.is_empty() {
            // The whole record as one value: lend the map to a `Value` rather than copy it.
            let data = Json::Object(std::mem::take(&mut record.data));
            let mut hasher = blake3::Hasher::new();
            write_canonical_into(&data, &mut hasher);
            hasher.update(b"\0");
            if let Json::Object(map) = data {
                record.data = map;
            }
            return hasher.finalize();
        }
        buf.clear();
        for field in &self.config.fields {
            match record.data.get(field) {
                Some(Json::String(s)) if self.config.normalize => {
                    normalize_into(s, text);
                    buf.extend_from_slice(text.as_bytes());
                }
                Some(value) => buf.extend_from_slice(&canonical_json(value)),
                None => buf.extend_from_slice(b"\0missing"),
            }
            buf.push(0);
        }
        blake3::hash(buf)
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
            if !input.is_sorted_by(|a, b| crate::record::by_lineage(a, b).is_le()) {
                input.sort_by(crate::record::by_lineage);
            }
            let mut seen = HashSet::with_capacity(input.len());
            let before = input.len();
            let (mut buf, mut text) = (Vec::new(), String::new());
            input.retain_mut(|record| seen.insert(self.key(record, &mut buf, &mut text)));
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
        assert_eq!(
            normalize_text("Ünïcode  ÉTÉ\u{2003}Straße"),
            "ünïcode été straße"
        );
    }

    /// The definition the ASCII fast path must agree with.
    fn reference(text: &str) -> String {
        let words: Vec<String> = text
            .split_whitespace()
            .map(|w| w.chars().flat_map(char::to_lowercase).collect())
            .collect();
        words.join(" ")
    }

    #[test]
    fn ascii_fast_path_matches_the_unicode_definition() {
        // Every ASCII byte, and whitespace runs at the ends and in the middle.
        let all: String = (0u8..128).map(char::from).collect();
        let mut buf = String::from("left over");
        for text in [
            all.as_str(),
            "",
            " ",
            "\x0b\x0cA\x0bB\r\n",
            "  What IS\n\tKeg?  ",
            "x\x1fy\x1cz",
            "ALL CAPS_and-Digits 0123",
        ] {
            normalize_into(text, &mut buf);
            assert_eq!(buf, reference(text), "{text:?}");
        }
    }
}
