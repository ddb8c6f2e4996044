//! `dedupe`: drop records whose chosen fields repeat an earlier record's (exact match, after
//! optional case and whitespace folding). The first record in lineage order is kept.

use std::collections::HashSet;
use std::hash::BuildHasherDefault;
use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::{BuildContext, Kind, Stage, StageContext, StageError, StageStats, Streamed};
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
    let bytes = text.as_bytes();
    // Whitespace other than single spaces between words; counted without stopping early so
    // the loop vectorises.
    let control_space = bytes
        .iter()
        .fold(0usize, |n, &b| n + usize::from(b.wrapping_sub(b'\t') < 5));
    if control_space == 0
        && bytes.first() != Some(&b' ')
        && bytes.last() != Some(&b' ')
        && !text.contains("  ")
        && text.is_ascii()
    {
        // Already folded: only lowercase, over the whole slice at once.
        out.extend_from_slice(bytes);
        out[start..].make_ascii_lowercase();
        return;
    }
    if text.is_ascii() {
        // The same result, byte by byte: for ASCII, `char::is_whitespace` is 0x09–0x0D and
        // space (`u8::is_ascii_whitespace` leaves out 0x0B), and lowercasing is ASCII's own.
        for word in text
            .as_bytes()
            .split(|b| matches!(b, b'\t'..=b'\r' | b' '))
            .filter(|word| !word.is_empty())
        {
            if out.len() > start {
                out.push(b' ');
            }
            out.extend(word.iter().map(u8::to_ascii_lowercase));
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
    /// Drop every record whose key an earlier record (in `input`'s order) has.
    fn drop_duplicates(&self, input: &mut Vec<Record>) {
        // Sorting (key, position) pairs finds repeats in one pass over contiguous memory,
        // several times faster than a hash set of a million keys, whose every insert misses
        // the cache. A key is compared as two `u128`s, not as 32 bytes through `memcmp`.
        let mut buf = Vec::new();
        let mut keys: Vec<(u128, u128, usize)> = input
            .iter_mut()
            .enumerate()
            .map(|(position, record)| {
                let (high, low) = key_halves(&self.key(record, &mut buf));
                (high, low, position)
            })
            .collect();
        // Equal keys end up adjacent, the earliest position first: the one kept.
        keys.sort_unstable();
        let mut duplicate = vec![false; input.len()];
        for pair in keys.windows(2) {
            if (pair[0].0, pair[0].1) == (pair[1].0, pair[1].1) {
                duplicate[pair[1].2] = true;
            }
        }
        // `retain` visits the records in order, once each.
        let mut position = 0;
        input.retain(|_| {
            position += 1;
            !duplicate[position - 1]
        });
    }

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

/// A key as two halves, compared without `memcmp`.
type Key = (u128, u128);

fn key_halves(hash: &blake3::Hash) -> Key {
    let (high, low) = hash.as_bytes().split_at(16);
    let half = |bytes: &[u8]| {
        let mut array = [0u8; 16];
        array.copy_from_slice(bytes);
        u128::from_be_bytes(array)
    };
    (half(high), half(low))
}

/// Keys are blake3 digests, already uniform: a set of them needs no hashing of its own.
#[derive(Default)]
struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u128(&mut self, n: u128) {
        // The first half written decides the bucket; the second only confirms equality.
        if self.0 == 0 {
            self.0 = n as u64;
        }
    }
}

/// Dedupe fed document by document: the keys seen so far are all it keeps.
struct Streaming<'a> {
    stage: &'a Dedupe,
    cx: StageContext<'a>,
    seen: HashSet<Key, BuildHasherDefault<KeyHasher>>,
    buf: Vec<u8>,
}

impl Streamed for Streaming<'_> {
    fn push(&mut self, mut records: Vec<Record>) -> Result<Vec<Record>, StageError> {
        StageStats::add(&self.cx.stats.items, records.len() as u64);
        if !super::in_lineage_order(&records) {
            records.sort_by(crate::record::by_lineage);
        }
        let before = records.len();
        let Streaming {
            stage, seen, buf, ..
        } = self;
        records.retain_mut(|record| seen.insert(key_halves(&stage.key(record, buf))));
        StageStats::add(&self.cx.stats.skipped, (before - records.len()) as u64);
        Ok(records)
    }

    fn finish(self: Box<Self>) -> Result<(), StageError> {
        Ok(())
    }
}

impl Stage for Dedupe {
    fn settings(&self) -> Json {
        serde_json::to_value(&self.config).unwrap_or_default()
    }

    fn stream<'a>(&'a self, cx: StageContext<'a>) -> Option<Box<dyn Streamed + 'a>> {
        Some(Box::new(Streaming {
            stage: self,
            cx,
            seen: HashSet::default(),
            buf: Vec::new(),
        }))
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
            let before = input.len();
            self.drop_duplicates(&mut input);
            StageStats::add(&cx.stats.skipped, (before - input.len()) as u64);
            Ok(input)
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Lineage;
    use crate::stage::in_lineage_order;
    use serde_json::json;

    #[test]
    fn normalizes_case_and_whitespace() {
        assert_eq!(normalize_text("  What IS\n\tKeg?  "), "what is keg?");
        assert_eq!(
            normalize_text("Ünïcode  ÉTÉ\u{2003}Straße"),
            "ünïcode été straße"
        );
    }

    /// The definition the ASCII fast path must agree with.
    fn reference_text(text: &str) -> String {
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
            "What Is KEG?",
            "trailing ",
            "two  spaces",
            "a\u{a0}B\u{2003}c",
        ] {
            buf.clear();
            normalize_into(text, &mut buf);
            assert_eq!(buf, reference_text(text).as_bytes(), "{text:?}");
        }
    }

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

    /// What `dedupe` kept before it was made fast: a hash set of blake3 keys fed field by
    /// field, the first record to insert a key kept.
    fn reference(config: &DedupeConfig, input: &[Record]) -> Vec<String> {
        let mut seen = std::collections::HashSet::new();
        let mut kept = Vec::new();
        for record in input {
            let mut hasher = blake3::Hasher::new();
            let mut add = |value: Option<&Json>| {
                match value {
                    Some(Json::String(s)) if config.normalize => {
                        hasher.update(reference_text(s).as_bytes())
                    }
                    Some(v) => hasher.update(&canonical_json(v)),
                    None => hasher.update(b"\0missing"),
                };
                hasher.update(b"\0");
            };
            if config.fields.is_empty() {
                add(Some(&Json::Object(record.data.clone())));
            } else {
                for field in &config.fields {
                    add(record.data.get(field));
                }
            }
            if seen.insert(hasher.finalize()) {
                kept.push(record.lineage.display());
            }
        }
        kept
    }

    #[test]
    fn keeps_the_first_of_each_duplicate_as_before() {
        let doc = Lineage::document("a.md");
        let rows = [
            json!({"question": "What is keg?", "answer": "a tool"}),
            json!({"question": "what  IS keg?", "answer": "a CLI"}),
            json!({"question": "What is keg ?", "answer": "a tool"}),
            json!({"answer": "no question"}),
            json!({"answer": "no question either"}),
            json!({"question": 7, "answer": "a number"}),
            json!({"question": "7", "answer": "a string"}),
            json!({"question": "Ünïcode  ÉTÉ", "answer": "x"}),
            json!({"question": "ünïcode été", "answer": "a tool"}),
            json!({"answer": "a tool", "question": "What is keg?"}),
        ];
        let input: Vec<Record> = rows
            .iter()
            .enumerate()
            .map(|(i, row)| {
                let Json::Object(data) = row.clone() else {
                    unreachable!()
                };
                Record::new(data, doc.child(0).child(i))
            })
            .collect();
        let configs = [
            (vec!["question"], true),
            (vec!["question"], false),
            (vec!["question", "answer"], true),
            (vec!["answer"], true),
            (vec![], true),
            (vec![], false),
        ];
        let dir = tempfile::tempdir().unwrap();
        let shared = crate::stage::RunShared::for_tests(dir.path());
        for (fields, normalize) in configs {
            let config = DedupeConfig {
                fields: fields.iter().map(|f| f.to_string()).collect(),
                normalize,
            };
            let expected = reference(&config, &input);
            let dedupe = Dedupe {
                config: config.clone(),
            };
            let mut records = input.clone();
            dedupe.drop_duplicates(&mut records);
            let kept: Vec<String> = records.iter().map(|r| r.lineage.display()).collect();
            assert_eq!(kept, expected, "{config:?}");
            assert!(kept.len() < input.len(), "{config:?} drops something");

            // Fed in pieces (as document by document), it keeps the same records.
            let stats = StageStats::default();
            let cx = StageContext::for_tests("unique", &shared, &stats);
            let streamed = dedupe.stream(cx).expect("dedupe streams");
            let kept =
                crate::stage::fed_in_pieces(streamed, &[&input[..3], &input[3..4], &input[4..]]);
            assert_eq!(kept, expected, "{config:?}, fed in pieces");
            assert_eq!(
                StageStats::get(&stats.skipped) as usize,
                input.len() - expected.len()
            );
        }
        assert_eq!(
            reference(
                &DedupeConfig {
                    fields: vec!["question".into()],
                    normalize: true
                },
                &input
            ),
            ["a.md#0.0", "a.md#0.2", "a.md#0.3", "a.md#0.5", "a.md#0.7"]
        );
    }
}
