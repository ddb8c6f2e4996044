//! Cache key derivation, in one place: each key is a serialized struct hashed with blake3.
//! Golden tests pin the digests so a key cannot change by accident; bump the version when it
//! should.

use crate::record::CanonicalWriter;

/// The bucket LLM calls are stored in; its suffix follows [`CALL_KEY_VERSION`].
pub const CALLS_BUCKET: &str = "calls-v1";
pub const CALL_KEY_VERSION: u32 = 1;

/// Everything that decides an LLM call's answer. The request body holds the model, the
/// messages, the sampling parameters and the output schema; secrets are never part of it
/// (they travel in headers, which are not part of the key).
pub struct CallKey<'a> {
    pub key_version: u32,
    /// Provider kind, e.g. `openai`.
    pub provider: &'a str,
    /// The endpoint URL the request goes to.
    pub endpoint: &'a str,
    /// The request body as canonical JSON ([`crate::record::canonical_json`]): the bytes
    /// [`crate::provider::Provider::body`] makes once and sends.
    pub body: &'a [u8],
}

impl CallKey<'_> {
    /// blake3 of the canonical JSON of this struct (fields in sorted order). The body is
    /// canonical already, so it is hashed as it is: the key costs blake3 over the bytes that
    /// are sent, and nothing else.
    pub fn digest(&self) -> blake3::Hash {
        let mut hasher = blake3::Hasher::new();
        let mut out = CanonicalWriter::new(&mut hasher);
        out.raw(b"{\"body\":");
        out.raw(self.body);
        out.raw(b",\"endpoint\":");
        out.str(self.endpoint);
        out.raw(b",\"key_version\":");
        out.raw(itoa(self.key_version, &mut [0; 10]));
        out.raw(b",\"provider\":");
        out.str(self.provider);
        out.raw(b"}");
        out.finish();
        hasher.finalize()
    }
}

/// The decimal digits of `n`, written into `buffer`.
fn itoa(mut n: u32, buffer: &mut [u8; 10]) -> &[u8] {
    let mut start = buffer.len();
    loop {
        start -= 1;
        buffer[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buffer[start..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::canonical_json;
    use serde_json::json;

    #[test]
    fn call_key_is_pinned() {
        let body = json!({
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "temperature": 0.7,
        });
        let key = CallKey {
            key_version: CALL_KEY_VERSION,
            provider: "openai",
            endpoint: "http://127.0.0.1:8080/v1/chat/completions",
            body: &canonical_json(&body),
        };
        // If this changes, cached calls of every user are invalidated: bump CALL_KEY_VERSION
        // and CALLS_BUCKET deliberately, then update the digest.
        assert_eq!(
            key.digest().to_hex().as_str(),
            "0d472ff6d399c3b5d671b4b12601b2b757d2771d93330a2bff445a970d800641"
        );
    }

    #[test]
    fn call_key_is_the_canonical_json_of_its_fields() {
        let body = json!({"model": "m", "messages": [{"content": "x", "role": "user"}]});
        let key = CallKey {
            key_version: 1,
            provider: "openai",
            endpoint: "http://h/\"v1\"/chat/completions",
            body: &canonical_json(&body),
        };
        let value = json!({
            "provider": "openai",
            "key_version": 1,
            "endpoint": "http://h/\"v1\"/chat/completions",
            "body": body,
        });
        assert_eq!(key.digest(), crate::record::canonical_hash(&value));
    }

    #[test]
    fn call_key_ignores_json_field_order_but_not_content() {
        let a = json!({"model": "m", "temperature": 0.7});
        let b = json!({"temperature": 0.7, "model": "m"});
        let c = json!({"temperature": 0.8, "model": "m"});
        let key = |body| {
            CallKey {
                key_version: 1,
                provider: "openai",
                endpoint: "e",
                body: &canonical_json(body),
            }
            .digest()
        };
        assert_eq!(key(&a), key(&b));
        assert_ne!(key(&a), key(&c));
    }
}

#[cfg(test)]
mod speed {
    use super::*;
    use serde_json::json;

    #[test]
    #[ignore = "a measurement: cargo test --release --lib -- --ignored digest_speed --nocapture"]
    fn digest_speed() {
        let schema: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/schemas/qa-pairs.schema.json"
            ))
            .unwrap(),
        )
        .unwrap();
        let body = json!({"model": "bench", "messages": [
            {"role": "system", "content": "You write question-answer pairs for fine-tuning a language model on documentation."},
            {"role": "user", "content": "Document: x — y\n\nPassage:\n\"\"\"\n".to_owned() + &"Some words of prose, `code` and [links](http://x).\n".repeat(20) + "\"\"\"\n\nWrite 2 pairs"}],
            "temperature": 0.7, "seed": 1, "max_tokens": 304,
            "response_format": {"type": "json_schema", "json_schema": {"name": "output", "strict": true, "schema": schema}}});
        let canonical = crate::record::canonical_json(&body);
        let key = CallKey {
            key_version: 1,
            provider: "openai",
            endpoint: "http://127.0.0.1:1/v1/chat/completions",
            body: &canonical,
        };
        let bytes = crate::record::canonical_json(&json!({
            "key_version": 1,
            "provider": "openai",
            "endpoint": "http://127.0.0.1:1/v1/chat/completions",
            "body": body,
        }));
        let n = 20_000;
        let t = std::time::Instant::now();
        for _ in 0..n {
            std::hint::black_box(key.digest());
        }
        let digest = t.elapsed();
        let t = std::time::Instant::now();
        for _ in 0..n {
            std::hint::black_box(blake3::hash(std::hint::black_box(&bytes)));
        }
        let hash = t.elapsed();
        let t = std::time::Instant::now();
        for _ in 0..n {
            std::hint::black_box(crate::record::canonical_json(std::hint::black_box(&body)));
        }
        let ser = t.elapsed();
        eprintln!(
            "{} bytes: digest {:?}, blake3 {:?}, canonical_json {:?} per key",
            bytes.len(),
            digest / n,
            hash / n,
            ser / n
        );
    }
}
