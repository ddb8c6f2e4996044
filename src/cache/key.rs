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

/// What every call key's bytes start with, the body following.
const KEY_HEAD: &[u8] = b"{\"body\":";
/// blake3 hashes 64-byte blocks, in chunks of 1 KiB.
const BLOCK: usize = 64;
const CHUNK: usize = 1024;
/// How many starts [`KeyStarts`] keeps: a stage's calls start alike, or with a few budgets.
const MOST_STARTS: usize = 4;

impl CallKey<'_> {
    /// blake3 of the canonical JSON of this struct (fields in sorted order). The body is
    /// canonical already, so it is hashed as it is: the key costs blake3 over the bytes that
    /// are sent, and nothing else. The bytes reach the hasher in one update: blake3 hashes
    /// two or more whole 1 KiB chunks side by side (SIMD) only when one update holds them.
    pub fn digest(&self) -> blake3::Hash {
        let mut hasher = blake3::Hasher::new();
        let mut out = CanonicalWriter::new(&mut hasher);
        out.raw(KEY_HEAD);
        out.raw(self.body);
        self.write_rest(&mut out);
        out.finish();
        hasher.finalize()
    }

    /// [`CallKey::digest`], going on from the hasher's state after a start of the key's
    /// bytes that `starts` remembers: the same digest, without hashing those bytes again.
    /// Only for keys shorter than two chunks: hashing on from a start goes block by block,
    /// and a longer key is hashed faster whole, its chunks side by side.
    pub fn digest_with(&self, starts: &KeyStarts) -> blake3::Hash {
        if !self.shorter_than_two_chunks() {
            return self.digest();
        }
        match starts.state_after(self.body) {
            Some((mut hasher, from)) => {
                let mut out = CanonicalWriter::new(&mut hasher);
                out.raw(&self.body[from..]);
                self.write_rest(&mut out);
                out.finish();
                hasher.finalize()
            }
            None => self.digest(),
        }
    }

    /// Whether the key's bytes are fewer than two chunks: its head, the body, and
    /// `,"endpoint":…,"key_version":…,"provider":…}`, 44 bytes besides the two names and the
    /// version's digits. Escapes in the names are not counted: either way gives the same
    /// digest.
    fn shorter_than_two_chunks(&self) -> bool {
        let version = itoa(self.key_version, &mut [0; 10]).len();
        let rest = 44 + self.endpoint.len() + version + self.provider.len();
        KEY_HEAD.len() + self.body.len() + rest < 2 * CHUNK
    }

    /// The key's fields after the body.
    fn write_rest(&self, out: &mut CanonicalWriter) {
        out.raw(b",\"endpoint\":");
        out.str(self.endpoint);
        out.raw(b",\"key_version\":");
        out.raw(itoa(self.key_version, &mut [0; 10]));
        out.raw(b",\"provider\":");
        out.str(self.provider);
        out.raw(b"}");
    }
}

/// The hasher's state after the first blocks of call keys seen lately, so that a key that
/// starts the same way hashes only the rest; one per `generate` stage. One stage's calls
/// mostly share their first few hundred bytes: `{"body":{"max_tokens":N,"messages":[`, the
/// system message, and within a document its path. The fields after the messages (the
/// schema among them) cannot be kept this way, as where they fall in blake3's blocks moves
/// with the messages' length. A start is kept when a key matches none kept and shares two
/// blocks or more with the key before it; a state is a plain copy of the hasher (about 2 KB).
#[derive(Default)]
pub struct KeyStarts(std::sync::Mutex<Starts>);

#[derive(Default)]
struct Starts {
    /// Starts of bodies (`KEY_HEAD` and these bytes fill whole blocks) and the hasher
    /// having taken them; the newest last.
    kept: Vec<(Vec<u8>, blake3::Hasher)>,
    /// The last body no kept start matched (shorter than two chunks, as every body is that
    /// [`CallKey::digest_with`] looks starts up for).
    last: Vec<u8>,
}

impl KeyStarts {
    /// A hasher that has taken `KEY_HEAD` and `body[..from]`, and `from`; `None` when the
    /// body shares no start worth keeping with the bodies before it.
    fn state_after(&self, body: &[u8]) -> Option<(blake3::Hasher, usize)> {
        let mut starts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((start, hasher)) = starts.kept.iter().rev().find(|(s, _)| body.starts_with(s)) {
            return Some((hasher.clone(), start.len()));
        }
        // Whole blocks this body shares with the last one that matched no kept start.
        let shared = |from: usize, to: usize| {
            to <= body.len() && to <= starts.last.len() && body[from..to] == starts.last[from..to]
        };
        let mut end = BLOCK - KEY_HEAD.len();
        if shared(0, end) {
            while shared(end, end + BLOCK) {
                end += BLOCK;
            }
            // Two blocks at least: a shorter start saves less than keeping it costs.
            if KEY_HEAD.len() + end >= 2 * BLOCK {
                let mut hasher = blake3::Hasher::new();
                hasher.update(KEY_HEAD);
                hasher.update(&body[..end]);
                if starts.kept.len() == MOST_STARTS {
                    starts.kept.remove(0);
                }
                starts.kept.push((body[..end].to_vec(), hasher.clone()));
                return Some((hasher, end));
            }
        }
        starts.last.clear();
        starts.last.extend_from_slice(body);
        None
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
mod starts {
    use super::*;

    fn key(body: &[u8]) -> CallKey<'_> {
        CallKey {
            key_version: CALL_KEY_VERSION,
            provider: "openai",
            endpoint: "http://127.0.0.1:1/v1/chat/completions",
            body,
        }
    }

    /// Bodies as a stage's calls make them: a shared start of `shared` bytes (the system
    /// message) then text of their own, of lengths around and across blake3's block and chunk
    /// edges, some with budgets of their own.
    fn bodies() -> Vec<Vec<u8>> {
        let mut bodies = Vec::new();
        for shared in [
            0, 40, 56, 57, 119, 120, 121, 184, 500, 1016, 1017, 1500, 3000,
        ] {
            for (i, own) in [0, 1, 7, 63, 64, 65, 900, 2100].into_iter().enumerate() {
                let budget = if i % 3 == 0 { "304" } else { "1000" };
                let mut body = format!("{{\"max_tokens\":{budget},\"messages\":[").into_bytes();
                body.extend((0..shared).map(|n| b'a' + (n % 26) as u8));
                body.extend((0..own).map(|n| b'0' + ((n * 7 + i) % 10) as u8));
                body.extend_from_slice(b"]}");
                bodies.push(body);
            }
        }
        bodies
    }

    #[test]
    fn a_key_from_a_kept_start_is_the_same_key() {
        let starts = KeyStarts::default();
        let mut from_a_start = 0;
        for body in bodies() {
            let kept = starts.0.lock().unwrap().kept.clone();
            assert_eq!(key(&body).digest_with(&starts), key(&body).digest());
            if key(&body).shorter_than_two_chunks() {
                from_a_start += usize::from(kept.iter().any(|(s, _)| body.starts_with(s)));
            } else {
                // A longer key is hashed whole, and nothing is kept for it.
                assert_eq!(starts.0.lock().unwrap().kept.len(), kept.len());
            }
        }
        assert!(from_a_start > 30, "{from_a_start}");
        // Starts end on a block's edge, two blocks in at least, short of two chunks.
        let kept = &starts.0.lock().unwrap().kept;
        assert!(!kept.is_empty() && kept.len() <= MOST_STARTS);
        for (start, _) in kept {
            let end = KEY_HEAD.len() + start.len();
            assert!(
                end.is_multiple_of(BLOCK) && (2 * BLOCK..2 * CHUNK).contains(&end),
                "{end}"
            );
        }
    }

    #[test]
    fn a_key_is_told_shorter_than_two_chunks_by_its_whole_length() {
        for n in 1900..2000 {
            let body = crate::record::canonical_json(&serde_json::json!("a".repeat(n)));
            let key = key(&body);
            let whole = crate::record::canonical_json(&serde_json::json!({
                "body": "a".repeat(n),
                "endpoint": key.endpoint,
                "key_version": key.key_version,
                "provider": key.provider,
            }));
            assert_eq!(
                key.shorter_than_two_chunks(),
                whole.len() < 2 * CHUNK,
                "{n}"
            );
        }
    }

    #[test]
    fn bodies_that_share_little_keep_no_start() {
        let starts = KeyStarts::default();
        for i in 0..20u8 {
            let body = [&[b'{', b'a' + i][..], &[b'x'; 300][..]].concat();
            assert_eq!(key(&body).digest_with(&starts), key(&body).digest());
        }
        assert!(starts.0.lock().unwrap().kept.is_empty());
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
            {"role": "system", "content": std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/templates/qa/system.j2"
            )).unwrap().trim()},
            {"role": "user", "content": "Document: x — y\n\nPassage:\n\"\"\"\n".to_owned() + &"Some words of prose, `code` and [links](http://x).\n".repeat(14) + "\"\"\"\n\nWrite 2 pairs"}],
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
        // Calls of one stage: the same system message, a user message of their own.
        let text = String::from_utf8(canonical.clone()).unwrap();
        let calls: Vec<Vec<u8>> = (0..16)
            .map(|i| {
                text.replace("Document: x", &format!("Document: {i:02}"))
                    .into_bytes()
            })
            .collect();
        let keys: Vec<CallKey> = calls.iter().map(|body| CallKey { body, ..key }).collect();
        let t = std::time::Instant::now();
        for i in 0..n {
            std::hint::black_box(keys[i as usize % keys.len()].digest());
        }
        let each = t.elapsed();
        let starts = KeyStarts::default();
        let t = std::time::Instant::now();
        for i in 0..n {
            std::hint::black_box(keys[i as usize % keys.len()].digest_with(&starts));
        }
        let with_start = t.elapsed();
        let t = std::time::Instant::now();
        for _ in 0..n {
            std::hint::black_box(crate::record::canonical_json(std::hint::black_box(&body)));
        }
        let ser = t.elapsed();
        eprintln!(
            "{} bytes: digest {:?}, blake3 {:?}, canonical_json {:?} per key; calls sharing \
             their system message: {:?}, from a kept start {:?}",
            bytes.len(),
            digest / n,
            hash / n,
            ser / n,
            each / n,
            with_start / n
        );
    }
}
