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
        write_canonical_map(&self.data, &mut HashWriter(&mut hasher));
        hasher.finalize()
    }

    pub fn str_field(&self, name: &str) -> Option<&str> {
        self.data.get(name).and_then(Value::as_str)
    }
}

/// Canonical JSON: object keys sorted, no whitespace. Used wherever a hash must not depend on
/// the order fields were written in.
pub fn canonical_json(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write_canonical(value, &mut out);
    out
}

pub fn canonical_hash(value: &Value) -> blake3::Hash {
    let mut hasher = blake3::Hasher::new();
    write_canonical(value, &mut HashWriter(&mut hasher));
    hasher.finalize()
}

/// Canonical JSON of `value`, fed straight into a hasher.
pub fn write_canonical_into(value: &Value, hasher: &mut blake3::Hasher) {
    write_canonical(value, &mut HashWriter(hasher));
}

trait Sink {
    fn put(&mut self, bytes: &[u8]);
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

struct HashWriter<'a>(&'a mut blake3::Hasher);

impl Sink for HashWriter<'_> {
    fn put(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

fn write_canonical(value: &Value, out: &mut impl Sink) {
    match value {
        Value::Object(map) => write_canonical_map(map, out),
        Value::Array(items) => {
            out.put(b"[");
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.put(b",");
                }
                write_canonical(item, out);
            }
            out.put(b"]");
        }
        scalar => out.put(scalar.to_string().as_bytes()),
    }
}

fn write_canonical_map(map: &Map<String, Value>, out: &mut impl Sink) {
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort_unstable();
    out.put(b"{");
    for (i, key) in keys.into_iter().enumerate() {
        if i > 0 {
            out.put(b",");
        }
        out.put(Value::String(key.clone()).to_string().as_bytes());
        out.put(b":");
        write_canonical(&map[key], out);
    }
    out.put(b"}");
}

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
