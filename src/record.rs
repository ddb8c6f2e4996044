//! The unit of data flowing between stages: a JSON object plus lineage that is not exported.

use std::cmp::Ordering;
use std::sync::Arc;

use serde_json::{Map, Value};

/// Where a record came from: the document path, then the chunk, item … indices below it.
/// Lineage orders every output row deterministically.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lineage {
    pub source: Arc<str>,
    pub path: Vec<u32>,
}

impl Lineage {
    pub fn document(source: &str) -> Self {
        Lineage {
            source: Arc::from(source),
            path: Vec::new(),
        }
    }

    pub fn child(&self, index: usize) -> Self {
        let mut path = Vec::with_capacity(self.path.len() + 1);
        path.extend_from_slice(&self.path);
        path.push(u32::try_from(index).unwrap_or(u32::MAX));
        Lineage {
            source: self.source.clone(),
            path,
        }
    }

    /// `docs/intro.md#2.5` — a short human form.
    pub fn display(&self) -> String {
        let mut out = self.source.to_string();
        if !self.path.is_empty() {
            out.push('#');
            let parts: Vec<String> = self.path.iter().map(u32::to_string).collect();
            out.push_str(&parts.join("."));
        }
        out
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub data: Map<String, Value>,
    pub lineage: Lineage,
    /// The split a `split` stage assigned.
    pub split: Option<Arc<str>>,
}

impl Record {
    pub fn new(data: Map<String, Value>, lineage: Lineage) -> Self {
        Record {
            data,
            lineage,
            split: None,
        }
    }

    /// The content id: blake3 of the canonical JSON of the data.
    pub fn id(&self) -> blake3::Hash {
        let mut hasher = blake3::Hasher::new();
        let mut sink = HashSink::new(&mut hasher);
        write_canonical_map(&self.data, &mut sink);
        sink.finish();
        hasher.finalize()
    }

    pub fn str_field(&self, name: &str) -> Option<&str> {
        self.data.get(name).and_then(Value::as_str)
    }
}

/// Canonical JSON: object keys sorted, no whitespace. Used wherever a hash must not depend on
/// the order fields were written in.
pub fn canonical_json(value: &Value) -> Vec<u8> {
    // Request bodies are its main use: a few KB, grown in few steps.
    let mut out = Vec::with_capacity(4096);
    write_canonical(value, &mut out);
    out
}

/// Canonical JSON of `value`, appended to `out`.
pub fn write_canonical_json(value: &Value, out: &mut Vec<u8>) {
    write_canonical(value, out);
}

pub fn canonical_hash(value: &Value) -> blake3::Hash {
    let mut hasher = blake3::Hasher::new();
    write_canonical_into(value, &mut hasher);
    hasher.finalize()
}

/// Canonical JSON of `value`, fed straight into a hasher.
pub fn write_canonical_into(value: &Value, hasher: &mut blake3::Hasher) {
    let mut sink = HashSink::new(hasher);
    write_canonical(value, &mut sink);
    sink.finish();
}

/// Canonical JSON written piece by piece into a hasher through one buffer, for keys that
/// are structs of their own (see `cache::key`).
pub struct CanonicalWriter<'a>(HashSink<'a>);

impl<'a> CanonicalWriter<'a> {
    pub fn new(hasher: &'a mut blake3::Hasher) -> Self {
        CanonicalWriter(HashSink::new(hasher))
    }

    /// Bytes as they are: punctuation and field names the caller has written canonically.
    pub fn raw(&mut self, bytes: &[u8]) {
        self.0.put(bytes);
    }

    /// A JSON string, escaped as `serde_json` escapes it.
    pub fn str(&mut self, text: &str) {
        write_str(text, &mut self.0);
    }

    /// Hand what is buffered to the hasher.
    pub fn finish(self) {
        self.0.finish();
    }
}

trait Sink {
    fn put(&mut self, bytes: &[u8]);

    /// A buffer to write up to `worst` bytes into: `HashSink` hashes what it holds first
    /// when they would not fit in it.
    fn room(&mut self, worst: usize) -> &mut Vec<u8>;
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }

    fn room(&mut self, _worst: usize) -> &mut Vec<u8> {
        // The escaper reserves what it needs.
        self
    }
}

/// Bytes for a hasher, gathered into large updates: blake3 hashes several 1 KiB chunks at
/// once (SIMD) only when one update holds them, and each small update has a cost of its own.
/// It gathers in this thread's scratch buffer (see [`with_scratch`]).
struct HashSink<'a> {
    hasher: &'a mut blake3::Hasher,
    buffer: Vec<u8>,
}

const HASH_BUFFER: usize = 16 * 1024;

impl<'a> HashSink<'a> {
    fn new(hasher: &'a mut blake3::Hasher) -> Self {
        let mut buffer = take_scratch();
        buffer.reserve(HASH_BUFFER);
        HashSink { hasher, buffer }
    }

    fn finish(mut self) {
        self.hasher.update(&self.buffer);
        give_back_scratch(std::mem::take(&mut self.buffer));
    }
}

impl Sink for HashSink<'_> {
    fn put(&mut self, bytes: &[u8]) {
        if self.buffer.len() + bytes.len() > HASH_BUFFER {
            self.hasher.update(&self.buffer);
            self.buffer.clear();
            if bytes.len() >= HASH_BUFFER {
                self.hasher.update(bytes);
                return;
            }
        }
        self.buffer.extend_from_slice(bytes);
    }

    fn room(&mut self, worst: usize) -> &mut Vec<u8> {
        if self.buffer.len() + worst > HASH_BUFFER && !self.buffer.is_empty() {
            self.hasher.update(&self.buffer);
            self.buffer.clear();
        }
        &mut self.buffer
    }
}

/// Lends `f` a buffer of this thread's, emptied, for bytes that are copied elsewhere at once
/// (into a request body, into a cache entry): a buffer used again stays in the CPU's cache,
/// where a fresh one is memory written for the first time on every call. A buffer that grew
/// past 256 KB is not kept.
pub fn with_scratch<R>(f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    let mut buffer = take_scratch();
    let result = f(&mut buffer);
    give_back_scratch(buffer);
    result
}

thread_local! {
    /// The buffer [`with_scratch`] lends and [`HashSink`] gathers in.
    static SCRATCH: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// This thread's scratch buffer, emptied; a nested use finds it taken and gets a fresh one.
fn take_scratch() -> Vec<u8> {
    let mut buffer = SCRATCH.take();
    buffer.clear();
    buffer
}

fn give_back_scratch(buffer: Vec<u8>) {
    if buffer.capacity() <= 256 * 1024 {
        SCRATCH.set(buffer);
    }
}

/// Lets `serde_json` write a number into a sink.
struct SinkWriter<'s, S>(&'s mut S);

impl<S: Sink> std::io::Write for SinkWriter<'_, S> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.put(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// An object exactly as `serde_json::to_vec` writes it (no whitespace, keys in the map's
/// order), appended to `out`. Strings are escaped many bytes at a time, where `serde_json`
/// looks at each byte: for what is written per call (cache entries, output rows).
pub fn write_json_map(map: &Map<String, Value>, out: &mut Vec<u8>) {
    write_map::<false>(map, out);
}

/// A JSON string exactly as `serde_json` writes it, appended to `out`.
pub fn write_json_str(text: &str, out: &mut Vec<u8>) {
    write_str(text, out);
}

/// JSON without whitespace, object keys sorted.
fn write_canonical(value: &Value, out: &mut impl Sink) {
    write_value::<true>(value, out);
}

/// JSON without whitespace; object keys sorted when `SORTED`, else in their map's order.
fn write_value<const SORTED: bool>(value: &Value, out: &mut impl Sink) {
    match value {
        Value::Object(map) => write_map::<SORTED>(map, out),
        Value::Array(items) => {
            out.put(b"[");
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.put(b",");
                }
                write_value::<SORTED>(item, out);
            }
            out.put(b"]");
        }
        Value::String(text) => write_str(text, out),
        Value::Null => out.put(b"null"),
        Value::Bool(true) => out.put(b"true"),
        Value::Bool(false) => out.put(b"false"),
        // `serde_json` writes numbers as its `Display` does (itoa, ryu): no string made.
        Value::Number(n) => {
            let _ = serde_json::to_writer(SinkWriter(out), n);
        }
    }
}

/// An object; its keys sorted when `SORTED`, else in the map's order.
fn write_map<const SORTED: bool>(map: &Map<String, Value>, out: &mut impl Sink) {
    if SORTED {
        write_canonical_map(map, out);
    } else {
        write_entries::<false>(map.iter().map(|(k, v)| (k.as_str(), v)), out);
    }
}

/// Maps this small sort their keys on the stack.
const SMALL_MAP: usize = 16;
static NULL: Value = Value::Null;

fn write_canonical_map(map: &Map<String, Value>, out: &mut impl Sink) {
    if map.len() <= SMALL_MAP {
        let mut entries = [("", &NULL); SMALL_MAP];
        for (slot, (key, value)) in entries.iter_mut().zip(map) {
            *slot = (key.as_str(), value);
        }
        let entries = &mut entries[..map.len()];
        entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
        write_entries::<true>(entries.iter().copied(), out);
    } else {
        let mut entries: Vec<(&str, &Value)> = map.iter().map(|(k, v)| (k.as_str(), v)).collect();
        entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
        write_entries::<true>(entries.into_iter(), out);
    }
}

fn write_entries<'v, const SORTED: bool>(
    entries: impl Iterator<Item = (&'v str, &'v Value)>,
    out: &mut impl Sink,
) {
    out.put(b"{");
    for (i, (key, value)) in entries.enumerate() {
        if i > 0 {
            out.put(b",");
        }
        write_str(key, out);
        out.put(b":");
        write_value::<SORTED>(value, out);
    }
    out.put(b"}");
}

/// A JSON string exactly as `serde_json` escapes it: `"`, `\` and control characters only,
/// the short forms where JSON has them, else `\u00xx` in lower case. `json_escape_simd`
/// looks at 32 bytes at a time; it wants room for the worst case, six bytes out for each
/// byte in, so a long text is escaped [`ESCAPE_PIECE`] bytes at a time.
fn write_str(text: &str, out: &mut impl Sink) {
    let worst = |len: usize| len * 6 + 64;
    if text.len() <= ESCAPE_PIECE {
        json_escape_simd::escape_into(text, out.room(worst(text.len())));
        return;
    }
    out.put(b"\"");
    let mut rest = text;
    while !rest.is_empty() {
        let (piece, tail) = rest.split_at(rest.floor_char_boundary(ESCAPE_PIECE));
        let buffer = out.room(worst(piece.len()));
        let start = buffer.len();
        json_escape_simd::escape_into(piece, buffer);
        // Without the piece's own quotes.
        let end = buffer.len() - 1;
        buffer.copy_within(start + 1..end, start);
        buffer.truncate(end - 1);
        rest = tail;
    }
    out.put(b"\"");
}

/// How much of a long text [`write_str`] escapes at a time.
const ESCAPE_PIECE: usize = 2048;

/// Records in lineage order.
pub fn by_lineage(a: &Record, b: &Record) -> Ordering {
    a.lineage.cmp(&b.lineage)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_json_sorts_keys_at_every_depth() {
        let v = json!({"b": 1, "a": {"d": [true, null], "c": "x\"y"}});
        assert_eq!(
            String::from_utf8(canonical_json(&v)).unwrap(),
            r#"{"a":{"c":"x\"y","d":[true,null]},"b":1}"#
        );
    }

    #[test]
    fn strings_are_escaped_exactly_as_serde_json_escapes_them() {
        let mut samples: Vec<String> = (0u8..0x80)
            .map(|b| format!("{}abcdefghij{}", b as char, b as char))
            .collect();
        samples.extend(
            [
                "",
                "a",
                "plain text well over eight bytes long",
                "é ünï 日本語 \u{1F600} \u{7f}\u{80}",
                "\"quoted\" \\ back\nslash\t\r\u{8}\u{c}\u{1}\u{1f} end",
                "12345678\"2345678\\",
            ]
            .map(str::to_owned),
        );
        for text in samples {
            let mut out = Vec::new();
            write_str(&text, &mut out);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                serde_json::to_string(&text).unwrap()
            );
        }
    }

    #[test]
    fn an_escape_at_any_offset_is_written_as_serde_json_writes_it() {
        // The escaper looks at 16 to 64 bytes at a time: every offset across several blocks,
        // with ASCII and multi-byte text around the escape.
        for fill in ["a", "é"] {
            for len in 0..100 {
                for escape in ["\"", "\\", "\n", "\u{1}", "\u{1f}"] {
                    for at in 0..=len {
                        let text = format!("{}{escape}{}", fill.repeat(at), fill.repeat(len - at));
                        let mut out = Vec::new();
                        write_str(&text, &mut out);
                        assert_eq!(out, serde_json::to_vec(&text).unwrap(), "{text:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn strings_hashed_across_the_hash_buffer_hash_as_their_bytes() {
        // Strings whose worst case does not fit what is left of the buffer, after a little
        // and after a lot is already in it.
        for (before, len) in [(10, 2_700), (15_000, 100), (16_000, 3_000), (0, 20_000)] {
            // Escapes and three-byte characters across the pieces long text is escaped in.
            let v = json!({
                "a": "b".repeat(before),
                "c": "\"q\"\n".repeat(len / 4),
                "d": "日\t本".repeat(len / 7),
            });
            assert_eq!(canonical_hash(&v), blake3::hash(&canonical_json(&v)));
            assert_eq!(canonical_json(&v), serde_json::to_vec(&v).unwrap());
        }
    }

    #[test]
    fn canonical_json_writes_strings_and_numbers_as_serde_json_does() {
        // Keys already in sorted order: the canonical bytes are serde_json's own.
        let v = json!({
            "a": [1, -2, 0.5, 1e300, null, true, false, {"c": [], "d": {}}],
            "z": "x\"y\n".repeat(100),
            "é": "日本語\u{1}",
        });
        assert_eq!(canonical_json(&v), serde_json::to_vec(&v).unwrap());
    }

    #[test]
    fn canonical_hash_is_blake3_of_the_canonical_json_at_any_size() {
        let keys: Map<String, Value> = (0..40)
            .rev()
            .map(|i| {
                (
                    format!("k{i}"),
                    json!([i, -i, f64::from(i) / 3.0, null, true]),
                )
            })
            .collect();
        let v = json!({
            "z": "x".repeat(40_000),
            "keys": keys,
            "a": ["line\none ".repeat(3_000), {"b": false, "a": 1e300}],
        });
        let bytes = canonical_json(&v);
        assert!(bytes.starts_with(br#"{"a":["line\none line"#));
        assert!(
            String::from_utf8_lossy(&bytes).contains(r#""keys":{"k0":[0,0,0.0,null,true],"k1":"#)
        );
        assert_eq!(canonical_hash(&v), blake3::hash(&bytes));
        // The same bytes as the string-per-token writer made before.
        assert_eq!(
            String::from_utf8_lossy(&canonical_json(
                &json!({"n": [1.5, -2, 18446744073709551615u64]})
            )),
            r#"{"n":[1.5,-2,18446744073709551615]}"#
        );
    }

    #[test]
    fn record_id_ignores_field_order() {
        let a = Record::new(
            json!({"q": "x", "a": "y"}).as_object().unwrap().clone(),
            Lineage::document("d.md"),
        );
        let b = Record::new(
            json!({"a": "y", "q": "x"}).as_object().unwrap().clone(),
            Lineage::document("other.md"),
        );
        assert_eq!(a.id(), b.id());
        assert_eq!(
            a.id().to_hex().as_str(),
            canonical_hash(&json!({"a": "y", "q": "x"}))
                .to_hex()
                .as_str()
        );
    }

    #[test]
    fn lineage_orders_by_source_then_indices() {
        let d = Lineage::document("a.md");
        assert!(d.child(1) < d.child(2));
        assert!(d.child(2).child(0) < Lineage::document("b.md"));
        assert_eq!(d.child(3).child(1).display(), "a.md#3.1");
    }
}
