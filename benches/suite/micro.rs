//! Target 7, in process through the library: chunking speed over the main corpus, and how
//! close hashing a call key comes to blake3's own speed on the same bytes.
//!
//! Rates are bytes over on-CPU time of this thread (best of three), so a busy neighbour on a
//! shared machine does not lower them.

use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use kegline::cache::key::messages_in;
use kegline::cache::{CallKey, KeyStarts};
use kegline::provider::ProviderConfig;
use kegline::record::canonical_json;

use crate::corpus::{CHUNK_CHARS, CHUNK_OVERLAP};
use crate::report::{Figure, Goal, megabytes, thousands};
use crate::{Bench, progress};

/// Call keys hashed for the hashing figure.
const MAX_KEYS: usize = 50_000;

pub fn run(bench: &mut Bench) -> Result<()> {
    let endpoint = bench.mock.endpoint();
    let base_url = bench.mock.base_url();
    let corpus = bench.corpus()?;
    let bytes = corpus.bytes() as f64;

    let (markdown, pieces) = best_rate(bytes, || {
        corpus
            .docs
            .iter()
            .map(|d| kegline::chunker::split_markdown(&d.text, CHUNK_CHARS, CHUNK_OVERLAP).len())
            .sum::<usize>()
    });
    let (chars, _) = best_rate(bytes, || {
        corpus
            .docs
            .iter()
            .map(|d| kegline::chunker::split_chars(&d.text, CHUNK_CHARS, CHUNK_OVERLAP).len())
            .sum::<usize>()
    });
    let (blake3_docs, _) = best_rate(bytes, || {
        corpus
            .docs
            .iter()
            .map(|d| usize::from(blake3::hash(d.text.as_bytes()).as_bytes()[0]))
            .sum::<usize>()
    });

    // Call keys of the first chunks, with bodies as `keg` builds them.
    let config: ProviderConfig = serde_json::from_value(json!({
        "kind": "openai", "base_url": base_url, "model": "bench",
        "temperature": 0.7, "seed": 1, "max_tokens": 2048,
    }))
    .context("cannot build a provider config")?;
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/schemas/qa-pairs.schema.json"
        ))
        .context("cannot read schemas/qa-pairs.schema.json")?,
    )?;
    let mut bodies = Vec::new();
    'docs: for doc in &corpus.docs {
        for piece in kegline::chunker::split_markdown(&doc.text, CHUNK_CHARS, CHUNK_OVERLAP) {
            if bodies.len() == MAX_KEYS {
                break 'docs;
            }
            let user = format!(
                "Document: {} — {}\n\nPassage:\n\"\"\"\n{}\n\"\"\"\n\nWrite 2 question-answer pairs about this passage.\nReply as JSON: {{\"pairs\": [{{\"question\": \"...\", \"answer\": \"...\"}}]}}",
                doc.relative,
                piece.headings.join(" › "),
                piece.text
            );
            let messages = json!([
                {"role": "system", "content": "You write question-answer pairs for fine-tuning a language model on documentation."},
                {"role": "user", "content": user},
            ]);
            bodies.push(kegline::provider::openai::body(
                &config,
                &messages,
                Some(&schema),
                Some(304),
            ));
        }
    }
    // What `keg` does per call: the body's canonical JSON, made once (and sent as it is),
    // then the key: blake3 over those bytes with the key's other fields around them.
    let canonical_bodies: Vec<Vec<u8>> = bodies.iter().map(canonical_json).collect();
    let body_bytes = canonical_bodies.iter().map(Vec::len).sum::<usize>();
    let (serialise_rate, _) = best_rate(body_bytes as f64, || {
        bodies
            .iter()
            .map(|b| canonical_json(b).len())
            .sum::<usize>()
    });
    // Where each body's messages lie, as `Provider::body` tells the key.
    let messages: Vec<std::ops::Range<usize>> = bodies
        .iter()
        .zip(&canonical_bodies)
        .map(|(body, canonical)| {
            messages_in(canonical, &body["messages"])
                .expect("a body holds its messages' canonical JSON")
        })
        .collect();
    let key = |i: usize| CallKey {
        provider: "openai",
        endpoint: &endpoint,
        body: &canonical_bodies[i],
        messages: Some(messages[i].clone()),
    };
    let starts = KeyStarts::default();
    for i in 0..bodies.len() {
        anyhow::ensure!(
            key(i).digest_with(&starts) == key(i).digest(),
            "a call key made from a kept start and rest differs from the key made whole"
        );
    }
    let key_bytes = body_bytes as f64;
    let (digest_rate, _) = best_rate(key_bytes, || {
        (0..bodies.len())
            .map(|i| usize::from(key(i).digest().as_bytes()[0]))
            .sum::<usize>()
    });
    let (digest_with_rate, _) = best_rate(key_bytes, || {
        (0..bodies.len())
            .map(|i| usize::from(key(i).digest_with(&starts).as_bytes()[0]))
            .sum::<usize>()
    });
    let (blake3_keys, _) = best_rate(key_bytes, || {
        canonical_bodies
            .iter()
            .map(|bytes| usize::from(blake3::hash(bytes).as_bytes()[0]))
            .sum::<usize>()
    });
    progress(&format!(
        "hashed {} call keys ({})",
        thousands(bodies.len() as u64),
        megabytes(key_bytes as u64)
    ));

    let mb = |rate: f64| (rate, format!("{:.0} MB/s", rate / 1e6));
    bench.push(
        Figure::new(
            "7a",
            format!(
                "chunking, markdown strategy ({}, {} chunks)",
                megabytes(bytes as u64),
                thousands(pieces as u64)
            ),
        )
        .compare(
            mb(markdown),
            (200e6, "200 MB/s".to_owned()),
            Goal::AtLeast(1.0),
        ),
    );
    bench.push(Figure::new("7a", "  chunking, chars strategy").compare(
        mb(chars),
        (200e6, "200 MB/s".to_owned()),
        Goal::Info,
    ));
    bench.push(
        Figure::new(
            "7b",
            "call-key hashing (`CallKey::digest_with` on the body as sent, as `keg` makes keys) vs blake3 on the same bytes",
        )
        .compare(mb(digest_with_rate), mb(blake3_keys), Goal::AtLeast(0.8)),
    );
    bench.push(
        Figure::new(
            "7b",
            "  the same keys made alone (`CallKey::digest`: the rest of the body hashed for each, not once per stage)",
        )
        .info(format!("{:.0} MB/s", digest_rate / 1e6)),
    );
    bench.push(
        Figure::new(
            "7b",
            "  writing a request body as canonical JSON (once per call; these bytes are hashed and sent)",
        )
        .info(format!("{:.0} MB/s", serialise_rate / 1e6)),
    );
    bench.push(
        Figure::new(
            "7b",
            "  document hashing in `load` (`blake3::hash`, ~10 KB inputs)",
        )
        .info(format!("{:.0} MB/s", blake3_docs / 1e6)),
    );
    Ok(())
}

/// The best rate (bytes per second of this thread's CPU time) of three runs, and the work's
/// result (so it is not optimised away).
fn best_rate(bytes: f64, mut work: impl FnMut() -> usize) -> (f64, usize) {
    let mut best = Duration::MAX;
    let mut result = 0;
    for _ in 0..3 {
        let started = thread_cpu();
        result = std::hint::black_box(work());
        best = best.min(thread_cpu().saturating_sub(started));
    }
    (bytes / best.as_secs_f64().max(1e-9), result)
}

fn thread_cpu() -> Duration {
    // SAFETY: clock_gettime writes a timespec we own.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}
