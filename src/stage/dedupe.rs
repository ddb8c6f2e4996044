//! `dedupe`: drop records whose chosen fields repeat an earlier record's (exact match, after
//! optional case and whitespace folding). The first record in lineage order is kept.

use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hash, Hasher};
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
    let mut out = Vec::with_capacity(text.len());
    normalize_into(text, &mut out);
    // Only whole characters were written.
    String::from_utf8(out).unwrap_or_default()
}

/// [`normalize_text`] appended to `out` as UTF-8, so one buffer serves every record.
pub fn normalize_into(text: &str, out: &mut Vec<u8>) {
    let start = out.len();
    if text.is_ascii() {
        // The same result, byte by byte: for ASCII, `char::is_whitespace` is 0x09–0x0D and
        // space (`u8::is_ascii_whitespace` leaves out 0x0B), and lowercasing is ASCII's own.
        out.reserve(text.len());
        let mut space = false;
        for &b in text.as_bytes() {
            if matches!(b, b'\t'..=b'\r' | b' ') {
                space = out.len() > start;
            } else {
                if space {
                    out.push(b' ');
                    space = false;
                }
                out.push(b.to_ascii_lowercase());
            }
        }
        return;
    }
    let mut utf8 = [0u8; 4];
    for word in text.split_whitespace() {
        if out.len() > start {
            out.push(b' ');
        }
        for c in word.chars().flat_map(char::to_lowercase) {
            out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
        }
    }
}

impl Dedupe {
    /// The hash of what makes `record` a duplicate: blake3 of each chosen field (normalised
    /// text, or canonical JSON) followed by a NUL, built in `buf` and hashed at once.
    fn key(&self, record: &mut Record, buf: &mut Vec<u8>) -> blake3::Hash {
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
            match super::field(&record.data, field) {
                Some(Json::String(s)) if self.config.normalize => normalize_into(s, buf),
                Some(value) => buf.extend_from_slice(&canonical_json(value)),
                None => buf.extend_from_slice(b"\0missing"),
            }
            buf.push(0);
        }
        blake3::hash(buf)
    }
}

/// A record's blake3 key in the set of those seen. The key is already uniformly random, so
/// the set's hash is its first 8 bytes (equality still compares all 32) — SipHash over it again
/// was a tenth of the stage.
#[derive(PartialEq, Eq)]
struct Key(blake3::Hash);

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let bytes = self.0.as_bytes();
        state.write_u64(u64::from_le_bytes([
            bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5], bytes[6], bytes[7],
        ]));
    }
}

#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used by `Key`; anything else is folded in, not lost.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
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
            if !super::in_lineage_order(&input) {
                input.sort_by(crate::record::by_lineage);
            }
            let mut seen: HashSet<Key, BuildHasherDefault<KeyHasher>> =
                HashSet::with_capacity_and_hasher(input.len(), Default::default());
            let before = input.len();
            let mut buf = Vec::new();
            input.retain_mut(|record| seen.insert(Key(self.key(record, &mut buf))));
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
        let mut buf = b"left over".to_vec();
        for text in [
            all.as_str(),
            "",
            " ",
            "\x0b\x0cA\x0bB\r\n",
            "  What IS\n\tKeg?  ",
            "x\x1fy\x1cz",
            "ALL CAPS_and-Digits 0123",
        ] {
            buf.clear();
            normalize_into(text, &mut buf);
            assert_eq!(buf, reference(text).as_bytes(), "{text:?}");
        }
    }
}

#[cfg(test)]
mod order_tests {
    use crate::record::{Lineage, Record};
    use crate::stage::in_lineage_order;

    fn records(lineages: &[Lineage]) -> Vec<Record> {
        lineages
            .iter()
            .map(|l| Record::new(Default::default(), l.clone()))
            .collect()
    }

    #[test]
    fn lineage_order_is_checked_across_shared_and_separate_paths() {
        let a = Lineage::document("a.md");
        // The same path in another `Arc`, as two load stages would give.
        let a_again = Lineage::document("a.md");
        let b = Lineage::document("b.md");
        let sorted = [
            a.child(0),
            a.child(0).child(1),
            a_again.child(1),
            b.child(0),
        ];
        assert!(in_lineage_order(&records(&sorted)));
        assert!(in_lineage_order(&records(&[a.child(1), a_again.child(1)])));
        assert!(!in_lineage_order(&records(&[a.child(1), a.child(0)])));
        assert!(!in_lineage_order(&records(&[a.child(1), a_again.child(0)])));
        assert!(!in_lineage_order(&records(&[b.child(0), a.child(9)])));
        assert!(in_lineage_order(&records(&[])));
    }
}
