//! A YAML document as a tree of nodes that each remember their line and column, and a serde
//! `Deserializer` over that tree, so that each part of a pipeline (one stage, one provider) is
//! deserialized on its own and every error carries the position of the node it is about.

use std::fmt;

use serde::de::{self, DeserializeSeed, IntoDeserializer, Visitor};
use serde::{Deserialize, Deserializer};
use serde_saphyr::Spanned;

/// A 1-based line and column in the pipeline file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Loc {
    pub line: u32,
    pub col: u32,
}

impl fmt::Display for Loc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub value: Value,
    pub loc: Loc,
}

impl Node {
    pub fn new(value: Value, loc: Loc) -> Self {
        Node { value, loc }
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The entries of a mapping node; `None` for any other node.
    pub fn entries(&self) -> Option<&[(Node, Node)]> {
        match &self.value {
            Value::Map(entries) => Some(entries),
            _ => None,
        }
    }

    /// The key node and value node of `key` in a mapping node.
    pub fn entry(&self, key: &str) -> Option<(&Node, &Node)> {
        self.entries()?
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(k, v)| (k, v))
    }

    pub fn get(&self, key: &str) -> Option<&Node> {
        self.entry(key).map(|(_, v)| v)
    }

    /// A short name for the node's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self.value {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Int(_) | Value::UInt(_) => "an integer",
            Value::Float(_) => "a number",
            Value::Str(_) => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }

    /// The node as plain JSON (positions dropped).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match &self.value {
            Value::Null => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Int(i) => J::from(*i),
            Value::UInt(u) => J::from(*u),
            Value::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
            Value::Str(s) => J::String(s.clone()),
            Value::Seq(items) => J::Array(items.iter().map(Node::to_json).collect()),
            Value::Map(entries) => J::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.scalar_text().unwrap_or_default(), v.to_json()))
                    .collect(),
            ),
        }
    }

    /// The text of a scalar node as YAML would print it; `None` for collections and null.
    pub fn scalar_text(&self) -> Option<String> {
        match &self.value {
            Value::Bool(b) => Some(b.to_string()),
            Value::Int(i) => Some(i.to_string()),
            Value::UInt(u) => Some(u.to_string()),
            Value::Float(f) => Some(f.to_string()),
            Value::Str(s) => Some(s.clone()),
            Value::Null | Value::Seq(_) | Value::Map(_) => None,
        }
    }

    /// A deserializer for this node that skips the given keys of a mapping (used for the
    /// `kind` and `inputs` keys every stage has besides its kind-specific settings).
    pub fn deserializer<'a>(&'a self, skip: &'a [&'a str]) -> NodeDeserializer<'a> {
        NodeDeserializer { node: self, skip }
    }

    pub fn deserialize<'a, T: Deserialize<'a>>(&'a self) -> Result<T, DeError> {
        T::deserialize(self.deserializer(&[]))
    }
}

/// Parse YAML text into a node tree. Only YAML 1.2 booleans (`true`, `false`) are booleans:
/// `y`, `no`, `on` stay strings, as a user writing `model: no` would mean.
pub fn parse_yaml(text: &str) -> Result<Node, serde_saphyr::Error> {
    let options = serde_saphyr::options! {
        strict_booleans: true,
        with_snippet: false,
    };
    serde_saphyr::from_str_with_options(text, options)
}

fn loc_of(location: &serde_saphyr::Location) -> Loc {
    Loc {
        line: u32::try_from(location.line()).unwrap_or(u32::MAX),
        col: u32::try_from(location.column()).unwrap_or(u32::MAX),
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let spanned = Spanned::<Value>::deserialize(deserializer)?;
        Ok(Node {
            value: spanned.value,
            loc: loc_of(&spanned.referenced),
        })
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Int(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(i64::try_from(v).map_or(Value::UInt(v), Value::Int))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::Str(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::Str(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Value::deserialize(d)
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Node>()? {
            items.push(item);
        }
        Ok(Value::Seq(items))
    }
    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<Node>()? {
            let value = map.next_value::<Node>()?;
            entries.push((key, value));
        }
        Ok(Value::Map(entries))
    }
}

/// An error from deserializing a node: a message, the position of the innermost node it is
/// about, and an optional hint.
#[derive(Debug, Clone, PartialEq)]
pub struct DeError {
    pub message: String,
    pub loc: Option<Loc>,
    pub hint: Option<String>,
}

impl DeError {
    pub fn new(message: impl Into<String>, loc: Loc) -> Self {
        DeError {
            message: message.into(),
            loc: Some(loc),
            hint: None,
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Attach a position unless a more precise (inner) one is already known.
    fn at(mut self, loc: Loc) -> Self {
        self.loc.get_or_insert(loc);
        self
    }
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DeError {
            message: msg.to_string(),
            loc: None,
            hint: None,
        }
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        DeError {
            message: format!("unknown field `{field}`"),
            loc: None,
            hint: Some(suggest(field, expected, "fields")),
        }
    }

    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        DeError {
            message: format!("unknown value `{variant}`"),
            loc: None,
            hint: Some(suggest(variant, expected, "values")),
        }
    }

    fn missing_field(field: &'static str) -> Self {
        DeError {
            message: format!("missing field `{field}`"),
            loc: None,
            hint: None,
        }
    }
}

/// "did you mean `x`? valid fields: `a`, `b`" — the closest candidate when it is close enough.
pub fn suggest(word: &str, candidates: &[&str], what: &str) -> String {
    let list = candidates
        .iter()
        .map(|c| format!("`{c}`"))
        .collect::<Vec<_>>()
        .join(", ");
    let closest = candidates
        .iter()
        .map(|c| (strsim::damerau_levenshtein(word, c), *c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min();
    match closest {
        Some((_, c)) => format!("did you mean `{c}`? valid {what}: {list}"),
        None if candidates.is_empty() => format!("there are no {what} to choose from"),
        None => format!("valid {what}: {list}"),
    }
}

/// Deserializes one node. Scalars are typed late, as the target asks: a string `"8"` fills an
/// integer field and a number fills a string field, because `${var}` substitution and
/// `--set name=value` both produce text.
pub struct NodeDeserializer<'a> {
    node: &'a Node,
    skip: &'a [&'a str],
}

impl<'a> NodeDeserializer<'a> {
    fn of(node: &'a Node) -> Self {
        NodeDeserializer { node, skip: &[] }
    }

    fn invalid(&self, expected: &str) -> DeError {
        DeError::new(
            format!("expected {expected}, found {}", self.node.type_name()),
            self.node.loc,
        )
    }
}

macro_rules! deserialize_number {
    ($method:ident, $visit:ident, $ty:ty, $what:literal) => {
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
            let loc = self.node.loc;
            let parsed: Option<$ty> = match &self.node.value {
                Value::Int(i) => <$ty>::try_from(*i).ok(),
                Value::UInt(u) => <$ty>::try_from(*u).ok(),
                Value::Str(s) => s.trim().parse().ok(),
                _ => None,
            };
            match parsed {
                Some(n) => visitor.$visit(n).map_err(|e: DeError| e.at(loc)),
                None => Err(DeError::new(
                    format!("expected {}, found {}", $what, describe_scalar(self.node)),
                    loc,
                )),
            }
        }
    };
}

fn describe_scalar(node: &Node) -> String {
    match node.scalar_text() {
        Some(text) => format!("`{text}`"),
        None => node.type_name().to_owned(),
    }
}

impl<'de> Deserializer<'de> for NodeDeserializer<'de> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let loc = self.node.loc;
        match &self.node.value {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Int(i) => visitor.visit_i64(*i),
            Value::UInt(u) => visitor.visit_u64(*u),
            Value::Float(f) => visitor.visit_f64(*f),
            Value::Str(s) => visitor.visit_borrowed_str(s),
            Value::Seq(items) => visitor.visit_seq(SeqAccess {
                items: items.iter(),
            }),
            Value::Map(entries) => visitor.visit_map(MapAccess {
                entries: entries.iter(),
                skip: self.skip,
                value: None,
            }),
        }
        .map_err(|e| e.at(loc))
    }

    deserialize_number!(deserialize_i8, visit_i8, i8, "an integer");
    deserialize_number!(deserialize_i16, visit_i16, i16, "an integer");
    deserialize_number!(deserialize_i32, visit_i32, i32, "an integer");
    deserialize_number!(deserialize_i64, visit_i64, i64, "an integer");
    deserialize_number!(deserialize_u8, visit_u8, u8, "a whole number");
    deserialize_number!(deserialize_u16, visit_u16, u16, "a whole number");
    deserialize_number!(deserialize_u32, visit_u32, u32, "a whole number");
    deserialize_number!(deserialize_u64, visit_u64, u64, "a whole number");

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_f64(visitor)
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let loc = self.node.loc;
        let parsed = match &self.node.value {
            Value::Int(i) => Some(*i as f64),
            Value::UInt(u) => Some(*u as f64),
            Value::Float(f) => Some(*f),
            Value::Str(s) => s.trim().parse().ok(),
            _ => None,
        };
        match parsed {
            Some(n) => visitor.visit_f64(n).map_err(|e: DeError| e.at(loc)),
            None => Err(DeError::new(
                format!("expected a number, found {}", describe_scalar(self.node)),
                loc,
            )),
        }
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let loc = self.node.loc;
        match &self.node.value {
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Str(s) if s == "true" => visitor.visit_bool(true),
            Value::Str(s) if s == "false" => visitor.visit_bool(false),
            _ => Err(DeError::new(
                format!(
                    "expected `true` or `false`, found {}",
                    describe_scalar(self.node)
                ),
                loc,
            )),
        }
        .map_err(|e| e.at(loc))
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let loc = self.node.loc;
        match &self.node.value {
            Value::Str(s) => visitor.visit_borrowed_str(s),
            Value::Bool(_) | Value::Int(_) | Value::UInt(_) | Value::Float(_) => {
                visitor.visit_string(self.node.scalar_text().unwrap_or_default())
            }
            _ => Err(self.invalid("a string")),
        }
        .map_err(|e| e.at(loc))
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_any(visitor)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_any(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.node.value {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_any(visitor)
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_any(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.node.value {
            Value::Seq(_) => self.deserialize_any(visitor),
            _ => Err(self.invalid("a list")),
        }
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.node.value {
            Value::Map(_) => self.deserialize_any(visitor),
            _ => Err(self.invalid("a mapping")),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_map(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let loc = self.node.loc;
        match &self.node.value {
            Value::Str(s) => visitor
                .visit_enum(IntoDeserializer::<DeError>::into_deserializer(s.as_str()))
                .map_err(|e| e.at(loc)),
            _ => Err(self.invalid("a string")),
        }
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }
}

struct SeqAccess<'a> {
    items: std::slice::Iter<'a, Node>,
}

impl<'de> de::SeqAccess<'de> for SeqAccess<'de> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        match self.items.next() {
            Some(node) => seed.deserialize(NodeDeserializer::of(node)).map(Some),
            None => Ok(None),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

struct MapAccess<'a> {
    entries: std::slice::Iter<'a, (Node, Node)>,
    skip: &'a [&'a str],
    value: Option<&'a Node>,
}

impl<'de> de::MapAccess<'de> for MapAccess<'de> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        for (key, value) in self.entries.by_ref() {
            if key.as_str().is_some_and(|k| self.skip.contains(&k)) {
                continue;
            }
            self.value = Some(value);
            return seed.deserialize(NodeDeserializer::of(key)).map(Some);
        }
        Ok(None)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        match self.value.take() {
            Some(node) => seed.deserialize(NodeDeserializer::of(node)),
            None => Err(de::Error::custom("value requested before key")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Chunking {
        size: u32,
        #[serde(default)]
        overlap: u32,
        label: Option<String>,
    }

    fn parse(text: &str) -> Node {
        parse_yaml(text).expect("valid yaml")
    }

    #[test]
    fn only_yaml_1_2_booleans_are_booleans() {
        let root = parse(
            "y: yes
n: off
t: true
",
        );
        assert_eq!(root.get("y").and_then(Node::as_str), Some("yes"));
        assert_eq!(root.get("n").and_then(Node::as_str), Some("off"));
        assert_eq!(root.get("t").map(|n| &n.value), Some(&Value::Bool(true)));
    }

    #[test]
    fn nodes_know_their_positions() {
        let root = parse("a: 1\nb:\n  - x\n  - y: true\n");
        assert_eq!(root.loc, Loc { line: 1, col: 1 });
        let (key, value) = root.entry("b").unwrap();
        assert_eq!(key.loc, Loc { line: 2, col: 1 });
        let Value::Seq(items) = &value.value else {
            panic!("not a seq")
        };
        assert_eq!(items[0].loc, Loc { line: 3, col: 5 });
        assert_eq!(
            items[1].get("y").unwrap(),
            &Node::new(Value::Bool(true), Loc { line: 4, col: 8 })
        );
    }

    #[test]
    fn unknown_field_points_at_the_key_with_a_suggestion() {
        let root = parse("size: 10\novrlap: 2\n");
        let err = root.deserialize::<Chunking>().unwrap_err();
        assert_eq!(err.message, "unknown field `ovrlap`");
        assert_eq!(err.loc, Some(Loc { line: 2, col: 1 }));
        assert_eq!(
            err.hint.as_deref(),
            Some("did you mean `overlap`? valid fields: `size`, `overlap`, `label`")
        );
    }

    #[test]
    fn wrong_type_points_at_the_value() {
        let root = parse("size: ten\n");
        let err = root.deserialize::<Chunking>().unwrap_err();
        assert_eq!(err.message, "expected a whole number, found `ten`");
        assert_eq!(err.loc, Some(Loc { line: 1, col: 7 }));
    }

    #[test]
    fn missing_field_points_at_the_mapping() {
        let root = parse("x:\n  overlap: 1\n");
        let err = root
            .get("x")
            .unwrap()
            .deserialize::<Chunking>()
            .unwrap_err();
        assert_eq!(err.message, "missing field `size`");
        assert_eq!(err.loc, Some(Loc { line: 2, col: 3 }));
    }

    #[test]
    fn scalars_are_typed_as_the_target_asks() {
        let root = parse("size: '12'\nlabel: 7\n");
        assert_eq!(
            root.deserialize::<Chunking>().unwrap(),
            Chunking {
                size: 12,
                overlap: 0,
                label: Some("7".into())
            }
        );
    }

    #[test]
    fn skipped_keys_are_invisible() {
        let root = parse("kind: chunk\nsize: 3\n");
        let chunking = Chunking::deserialize(root.deserializer(&["kind"])).unwrap();
        assert_eq!(chunking.size, 3);
    }
}
