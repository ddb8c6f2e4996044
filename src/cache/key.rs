//! Cache key derivation, in one place: each key is a serialized struct hashed with blake3.
//! Golden tests pin the digests so a key cannot change by accident; bump the version when it
//! should.

use crate::lock;
use crate::record::CanonicalWriter;

/// The bucket LLM calls are stored in; its suffix follows [`CALL_KEY_VERSION`].
pub const CALLS_BUCKET: &str = "calls-v2";
pub const CALL_KEY_VERSION: u32 = 2;
/// Calls cached under version 1's keys (the whole body hashed as one): still looked up
/// when the cache holds any, so no cached call is lost (see [`CallKey::digest_v1`]).
pub const CALLS_BUCKET_V1: &str = "calls-v1";

/// Everything that decides an LLM call's answer. The request body holds the model, the
/// messages, the sampling parameters and the output schema; secrets are never part of it
/// (they travel in headers, which are not part of the key).
///
/// Version 2 hashes the body in two parts: the messages, and a digest of everything else
/// (the provider, the endpoint, and the body around the messages), which a stage's calls
/// share and [`KeyStarts`] makes once. Version 1 hashed the whole body per call.
#[derive(Clone)]
pub struct CallKey<'a> {
    /// Provider kind, e.g. `openai`.
    pub provider: &'a str,
    /// The endpoint URL the request goes to.
    pub endpoint: &'a str,
    /// The request body as canonical JSON ([`crate::record::canonical_json`]): the bytes
    /// [`crate::provider::Provider::body`] makes once and sends.
    pub body: &'a [u8],
    /// Where the messages' canonical JSON lies in `body`, when the body was built around
    /// them; otherwise the whole body is hashed as the rest, and the messages as empty.
    pub messages: Option<std::ops::Range<usize>>,
}

/// What every version 1 key's bytes start with, the body following.
const KEY_HEAD: &[u8] = b"{\"body\":";
/// What every version 2 key's bytes start with: the digest of the rest, then the messages.
const KEY_HEAD_V2: &[u8] = b"keg call key v2\0";
/// What the digest of the rest of a version 2 key hashes first.
const REST_HEAD: &[u8] = b"keg call rest v2\0";
/// blake3 hashes 64-byte blocks, in chunks of 1 KiB.
const BLOCK: usize = 64;
const CHUNK: usize = 1024;
/// How many starts [`KeyStarts`] keeps: a stage's calls start alike, or with a few budgets.
const MOST_STARTS: usize = 4;

impl CallKey<'_> {
    /// The key: blake3 of [`KEY_HEAD_V2`], the digest of the rest ([`CallKey::rest`]) and the
    /// messages' canonical JSON.
    pub fn digest(&self) -> blake3::Hash {
        self.digest_after(&self.rest())
    }

    /// The key, given the digest of its rest: hashed whole, in one go.
    fn digest_after(&self, rest: &blake3::Hash) -> blake3::Hash {
        let mut hasher = blake3::Hasher::new();
        hasher.update(KEY_HEAD_V2);
        hasher.update(rest.as_bytes());
        hasher.update(self.messages_bytes());
        hasher.finalize()
    }

    /// [`CallKey::digest`], with the digest of the rest made once for the calls that share
    /// it, and hashing on from the hasher's state after a start of the key's bytes that
    /// `starts` remembers: the same digest, without hashing those bytes again.
    pub fn digest_with(&self, starts: &KeyStarts) -> blake3::Hash {
        let mut starts = lock(&starts.0);
        let rest = starts.rest_of(self);
        let messages = self.messages_bytes();
        if KEY_HEAD_V2.len() + rest.as_bytes().len() + messages.len() >= 2 * CHUNK {
            // Hashing on from a start goes block by block; a longer key is hashed faster
            // whole, its chunks side by side.
            drop(starts);
            return self.digest_after(&rest);
        }
        // The key's bytes after its head, in one piece, for comparing with starts.
        let mut tail = std::mem::take(&mut starts.tail);
        tail.clear();
        tail.extend_from_slice(rest.as_bytes());
        tail.extend_from_slice(messages);
        let (mut hasher, from) = starts.state_after(&tail).unwrap_or_else(|| {
            let mut hasher = blake3::Hasher::new();
            hasher.update(KEY_HEAD_V2);
            (hasher, 0)
        });
        hasher.update(&tail[from..]);
        starts.tail = tail;
        hasher.finalize()
    }

    /// The messages' canonical JSON (empty when the body was not built around them).
    fn messages_bytes(&self) -> &[u8] {
        match &self.messages {
            Some(range) => &self.body[range.clone()],
            None => &[],
        }
    }

    /// The body around the messages: before them and after them.
    fn around(&self) -> (&[u8], &[u8]) {
        match &self.messages {
            Some(range) => (&self.body[..range.start], &self.body[range.end..]),
            None => (self.body, &[]),
        }
    }

    /// The digest of everything but the messages: each part after its length, so that no
    /// two keys' parts run into each other.
    fn rest(&self) -> blake3::Hash {
        let (before, after) = self.around();
        let mut hasher = blake3::Hasher::new();
        hasher.update(REST_HEAD);
        for part in [
            self.provider.as_bytes(),
            self.endpoint.as_bytes(),
            before,
            after,
        ] {
            hasher.update(&(part.len() as u64).to_le_bytes());
            hasher.update(part);
        }
        hasher.finalize()
    }

    /// The version 1 key, under which calls cached before version 2 are found: blake3 of
    /// the canonical JSON of `{body, endpoint, key_version: 1, provider}`. The body is
    /// canonical already, so it is hashed as it is.
    pub fn digest_v1(&self) -> blake3::Hash {
        let mut hasher = blake3::Hasher::new();
        let mut out = CanonicalWriter::new(&mut hasher);
        out.raw(KEY_HEAD);
        out.raw(self.body);
        out.raw(b",\"endpoint\":");
        out.str(self.endpoint);
        out.raw(b",\"key_version\":1,\"provider\":");
        out.str(self.provider);
        out.raw(b"}");
        out.finish();
        hasher.finalize()
    }
}

/// Where the canonical JSON of `messages` lies in `body`, a canonical request body that
/// holds it: what [`crate::provider::Provider::body`] reports, found again from a body as
/// sent (for tests and benchmarks that make keys of recorded requests).
pub fn messages_in(body: &[u8], messages: &serde_json::Value) -> Option<std::ops::Range<usize>> {
    let messages = crate::record::canonical_json(messages);
    let at = memchr::memmem::find(body, &messages)?;
    Some(at..at + messages.len())
}

/// What a `generate` stage's call keys share, made once: the digests of the rest of their
/// bodies (see [`CallKey::rest`]), and the hasher's state after the first blocks of the keys
/// seen lately, so that a key that starts the same way hashes only what follows. One stage's
/// calls share their rest (a few, with budgets of their own) and mostly their first few
/// hundred bytes: the rest's digest, the system message, and within a document its path.
/// A start is kept when a key matches none kept and shares two blocks or more with the key
/// before it; a state is a plain copy of the hasher (about 2 KB).
#[derive(Default)]
pub struct KeyStarts(std::sync::Mutex<Starts>);

#[derive(Default)]
struct Starts {
    /// Starts of keys after their head (`KEY_HEAD_V2` and these bytes fill whole blocks)
    /// and the hasher having taken them; the newest last.
    kept: Vec<(Vec<u8>, blake3::Hasher)>,
    /// The last key no kept start matched, after its head (shorter than two chunks, as
    /// every key is that [`CallKey::digest_with`] looks starts up for).
    last: Vec<u8>,
    /// The rests of bodies seen lately and their digests; the newest last.
    rests: Vec<(Rest, blake3::Hash)>,
    /// A buffer for the key's bytes after its head, kept warm.
    tail: Vec<u8>,
}

/// What the digest of a key's rest covers.
#[derive(PartialEq)]
struct Rest {
    provider: String,
    endpoint: String,
    before: Vec<u8>,
    after: Vec<u8>,
}

impl Starts {
    /// The digest of `key`'s rest: made once for every key that shares it.
    fn rest_of(&mut self, key: &CallKey) -> blake3::Hash {
        if key.messages.is_none() {
            // The whole body is the rest: shared by no other call.
            return key.rest();
        }
        let (before, after) = key.around();
        let same = |rest: &Rest| {
            rest.before == before
                && rest.after == after
                && rest.endpoint == key.endpoint
                && rest.provider == key.provider
        };
        if let Some((_, digest)) = self.rests.iter().rev().find(|(rest, _)| same(rest)) {
            return *digest;
        }
        let digest = key.rest();
        if self.rests.len() == MOST_STARTS {
            self.rests.remove(0);
        }
        let rest = Rest {
            provider: key.provider.to_owned(),
            endpoint: key.endpoint.to_owned(),
            before: before.to_vec(),
            after: after.to_vec(),
        };
        self.rests.push((rest, digest));
        digest
    }

    /// A hasher that has taken `KEY_HEAD_V2` and `tail[..from]`, and `from`; `None` when
    /// the key shares no start worth keeping with the keys before it.
    fn state_after(&mut self, tail: &[u8]) -> Option<(blake3::Hasher, usize)> {
        if let Some((start, hasher)) = self.kept.iter().rev().find(|(s, _)| tail.starts_with(s)) {
            return Some((hasher.clone(), start.len()));
        }
        // Whole blocks this key shares with the last one that matched no kept start.
        let last = &self.last;
        let shared = |from: usize, to: usize| {
            to <= tail.len() && to <= last.len() && tail[from..to] == last[from..to]
        };
        let mut end = BLOCK - KEY_HEAD_V2.len();
        if shared(0, end) {
            while shared(end, end + BLOCK) {
                end += BLOCK;
            }
            // Two blocks at least: a shorter start saves less than keeping it costs.
            if KEY_HEAD_V2.len() + end >= 2 * BLOCK {
                let mut hasher = blake3::Hasher::new();
                hasher.update(KEY_HEAD_V2);
                hasher.update(&tail[..end]);
                if self.kept.len() == MOST_STARTS {
                    self.kept.remove(0);
                }
                self.kept.push((tail[..end].to_vec(), hasher.clone()));
                return Some((hasher, end));
            }
        }
        self.last.clear();
        self.last.extend_from_slice(tail);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::canonical_json;
    use serde_json::json;

    /// A body as the OpenAI wire makes it, and where its messages lie.
    fn body_and_messages(body: &serde_json::Value) -> (Vec<u8>, std::ops::Range<usize>) {
        let canonical = canonical_json(body);
        let messages = messages_in(&canonical, &body["messages"]).unwrap();
        (canonical, messages)
    }

    fn pinned_body() -> serde_json::Value {
        json!({
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "temperature": 0.7,
        })
    }

    #[test]
    fn call_keys_are_pinned() {
        let (body, messages) = body_and_messages(&pinned_body());
        let key = CallKey {
            provider: "openai",
            endpoint: "http://127.0.0.1:8080/v1/chat/completions",
            body: &body,
            messages: Some(messages),
        };
        // If this changes, cached calls of every user are invalidated: bump CALL_KEY_VERSION
        // and CALLS_BUCKET deliberately, look the old keys up too, then update the digest.
        assert_eq!(
            key.digest().to_hex().as_str(),
            "993711a1396fa0d2f6b0e8f376d5aefb812e5056161b7a7e0c8d0b092c9174d3"
        );
        assert_eq!(key.digest_with(&KeyStarts::default()), key.digest());
        // Calls cached before version 2 are found under these keys: they must not change.
        assert_eq!(
            key.digest_v1().to_hex().as_str(),
            "0d472ff6d399c3b5d671b4b12601b2b757d2771d93330a2bff445a970d800641"
        );
        // Where the messages lie plays no part in it.
        let whole = CallKey {
            messages: None,
            ..key.clone()
        };
        assert_eq!(whole.digest_v1(), key.digest_v1());
    }

    #[test]
    fn call_key_v1_is_the_canonical_json_of_its_fields() {
        let body = json!({"model": "m", "messages": [{"content": "x", "role": "user"}]});
        let key = CallKey {
            provider: "openai",
            endpoint: "http://h/\"v1\"/chat/completions",
            body: &canonical_json(&body),
            messages: None,
        };
        let value = json!({
            "provider": "openai",
            "key_version": 1,
            "endpoint": "http://h/\"v1\"/chat/completions",
            "body": body,
        });
        assert_eq!(key.digest_v1(), crate::record::canonical_hash(&value));
    }

    /// A version 2 key is blake3 of its head, the rest's digest and the messages; the
    /// rest's parts go after their lengths, so no byte can move from one part to another
    /// and give the same key.
    #[test]
    fn call_key_hashes_the_messages_and_the_digest_of_the_rest() {
        let (body, messages) = body_and_messages(&pinned_body());
        let key = CallKey {
            provider: "openai",
            endpoint: "e",
            body: &body,
            messages: Some(messages.clone()),
        };
        let mut rest = blake3::Hasher::new();
        rest.update(b"keg call rest v2\0");
        for part in [
            &b"openai"[..],
            b"e",
            &body[..messages.start],
            &body[messages.end..],
        ] {
            rest.update(&(part.len() as u64).to_le_bytes());
            rest.update(part);
        }
        let mut whole = blake3::Hasher::new();
        whole.update(b"keg call key v2\0");
        whole.update(rest.finalize().as_bytes());
        whole.update(&body[messages.clone()]);
        assert_eq!(key.digest(), whole.finalize());

        let differs = [
            CallKey {
                messages: None,
                ..key.clone()
            },
            CallKey {
                messages: Some(messages.start..messages.end - 1),
                ..key.clone()
            },
            CallKey {
                provider: "openaie",
                endpoint: "",
                ..key.clone()
            },
            CallKey {
                endpoint: "f",
                ..key.clone()
            },
        ];
        for other in differs {
            assert_ne!(other.digest(), key.digest());
        }
    }

    #[test]
    fn call_key_ignores_json_field_order_but_not_content() {
        let a = json!({"model": "m", "temperature": 0.7, "messages": ["x"]});
        let b = json!({"temperature": 0.7, "messages": ["x"], "model": "m"});
        let c = json!({"temperature": 0.8, "messages": ["x"], "model": "m"});
        let d = json!({"temperature": 0.7, "messages": ["y"], "model": "m"});
        let key = |body| {
            let (body, messages) = body_and_messages(body);
            let key = CallKey {
                provider: "openai",
                endpoint: "e",
                body: &body,
                messages: Some(messages),
            };
            (key.digest(), key.digest_v1())
        };
        assert_eq!(key(&a), key(&b));
        assert_ne!(key(&a).0, key(&c).0);
        assert_ne!(key(&a).0, key(&d).0);
        assert_ne!(key(&a).1, key(&c).1);
    }
}

#[cfg(test)]
mod starts {
    use super::*;

    /// A key of one of [`bodies`]: its messages are the array.
    fn key(body: &[u8]) -> CallKey<'_> {
        let start = body.iter().position(|&b| b == b'[').unwrap();
        CallKey {
            provider: "openai",
            endpoint: "http://127.0.0.1:1/v1/chat/completions",
            body,
            messages: Some(start..body.len() - 1),
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
            let key = key(&body);
            let kept = starts.0.lock().unwrap().kept.clone();
            assert_eq!(key.digest_with(&starts), key.digest());
            let tail = [key.rest().as_bytes(), key.messages_bytes()].concat();
            if KEY_HEAD_V2.len() + tail.len() < 2 * CHUNK {
                from_a_start += usize::from(kept.iter().any(|(s, _)| tail.starts_with(s)));
            } else {
                // A longer key is hashed whole, and nothing is kept for it.
                assert_eq!(starts.0.lock().unwrap().kept.len(), kept.len());
            }
        }
        assert!(from_a_start > 30, "{from_a_start}");
        let starts = starts.0.lock().unwrap();
        // Starts end on a block's edge, two blocks in at least, short of two chunks.
        assert!(!starts.kept.is_empty() && starts.kept.len() <= MOST_STARTS);
        for (start, _) in &starts.kept {
            let end = KEY_HEAD_V2.len() + start.len();
            assert!(
                end.is_multiple_of(BLOCK) && (2 * BLOCK..2 * CHUNK).contains(&end),
                "{end}"
            );
        }
        // One rest per budget.
        assert_eq!(starts.rests.len(), 2);
    }

    #[test]
    fn keys_that_share_little_keep_no_start() {
        let starts = KeyStarts::default();
        for i in 0..20u8 {
            let body = [&[b'[', b'a' + i][..], &[b'x'; 300][..], b"]}"].concat();
            let key = key(&body);
            assert_eq!(key.digest_with(&starts), key.digest());
        }
        let starts = starts.0.lock().unwrap();
        assert!(starts.kept.is_empty());
        assert_eq!(starts.rests.len(), 1);
    }

    /// A body not built around its messages (wires that reshape them) is all rest: its
    /// digest is made for the key alone, and not kept.
    #[test]
    fn a_body_without_its_messages_apart_keeps_no_rest() {
        let starts = KeyStarts::default();
        for body in bodies().iter().take(12) {
            let key = CallKey {
                messages: None,
                ..key(body)
            };
            assert_eq!(key.digest_with(&starts), key.digest());
        }
        assert!(starts.0.lock().unwrap().rests.is_empty());
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
        let with_messages = |body: &serde_json::Value| {
            let canonical = crate::record::canonical_json(body);
            let messages = messages_in(&canonical, &body["messages"]).unwrap();
            (canonical, messages)
        };
        let (canonical, messages) = with_messages(&body);
        let key = CallKey {
            provider: "openai",
            endpoint: "http://127.0.0.1:1/v1/chat/completions",
            body: &canonical,
            messages: Some(messages),
        };
        let n = 20_000;
        let time = |f: &mut dyn FnMut(usize)| {
            let t = std::time::Instant::now();
            for i in 0..n {
                f(i);
            }
            t.elapsed() / n as u32
        };
        let v1 = time(&mut |_| {
            std::hint::black_box(key.digest_v1());
        });
        let v2 = time(&mut |_| {
            std::hint::black_box(key.digest());
        });
        // Calls of one stage: the same system message, a user message of their own.
        let calls: Vec<(Vec<u8>, std::ops::Range<usize>)> = (0..16)
            .map(|i| {
                let mut body = body.clone();
                let user = &mut body["messages"][1]["content"];
                *user = json!(
                    user.as_str()
                        .unwrap()
                        .replace("Document: x", &format!("Document: {i:02}"))
                );
                with_messages(&body)
            })
            .collect();
        let keys: Vec<CallKey> = calls
            .iter()
            .map(|(body, messages)| CallKey {
                body,
                messages: Some(messages.clone()),
                ..key.clone()
            })
            .collect();
        let each_v1 = time(&mut |i| {
            std::hint::black_box(keys[i % keys.len()].digest_v1());
        });
        let starts = KeyStarts::default();
        let with_start = time(&mut |i| {
            std::hint::black_box(keys[i % keys.len()].digest_with(&starts));
        });
        eprintln!(
            "{} bytes of body: version 1 {v1:?}, version 2 {v2:?} per key; calls sharing their \
             system message: version 1 {each_v1:?}, version 2 from a kept start and rest \
             {with_start:?}",
            canonical.len(),
        );
    }
}
