//! Deterministic corpora of Markdown documents: the same seed and count give the same bytes
//! on every machine, so figures from different runs are comparable.
//!
//! Documents go in folders of [`PER_FOLDER`] (`f000/doc-00000.md` …), so a scenario can take
//! a prefix of a corpus with a glob over folders.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// The chunk settings of the shipped `docs-qa` pipeline, which the bench pipeline uses too.
pub const CHUNK_CHARS: usize = 800;
pub const CHUNK_OVERLAP: usize = 80;
pub const PER_FOLDER: usize = 50;

/// SplitMix64: tiny, fast, and fixed forever (a crate's RNG may change between versions).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn pick<'a>(&mut self, words: &[&'a str]) -> &'a str {
        words[self.below(words.len())]
    }
}

const WORDS: &[&str] = &[
    "the",
    "a",
    "of",
    "to",
    "and",
    "in",
    "is",
    "for",
    "that",
    "with",
    "on",
    "as",
    "by",
    "it",
    "when",
    "each",
    "every",
    "only",
    "then",
    "which",
    "from",
    "are",
    "be",
    "can",
    "not",
    "this",
    "server",
    "client",
    "request",
    "response",
    "cache",
    "entry",
    "record",
    "pipeline",
    "stage",
    "document",
    "chunk",
    "token",
    "model",
    "prompt",
    "template",
    "schema",
    "field",
    "value",
    "key",
    "hash",
    "file",
    "folder",
    "path",
    "config",
    "setting",
    "option",
    "flag",
    "command",
    "output",
    "input",
    "error",
    "warning",
    "message",
    "queue",
    "worker",
    "thread",
    "process",
    "buffer",
    "stream",
    "batch",
    "limit",
    "timeout",
    "retry",
    "backoff",
    "connection",
    "socket",
    "index",
    "table",
    "column",
    "row",
    "query",
    "transaction",
    "lock",
    "snapshot",
    "version",
    "release",
    "build",
    "test",
    "deploy",
    "cluster",
    "node",
    "replica",
    "shard",
    "partition",
    "writes",
    "reads",
    "returns",
    "stores",
    "keeps",
    "drops",
    "sends",
    "receives",
    "checks",
    "validates",
    "parses",
    "renders",
    "splits",
    "merges",
    "sorts",
    "filters",
    "maps",
    "counts",
    "runs",
    "starts",
    "stops",
    "waits",
    "blocks",
    "resumes",
    "restarts",
    "skips",
    "loads",
    "quickly",
    "safely",
    "always",
    "never",
    "usually",
    "rarely",
    "first",
    "last",
    "next",
    "previous",
    "larger",
    "smaller",
    "faster",
    "slower",
    "stable",
    "atomic",
    "durable",
    "optional",
    "required",
    "default",
    "custom",
    "local",
    "remote",
    "shared",
    "private",
    "incremental",
    "deterministic",
    "concurrent",
    "parallel",
    "sequential",
    "ordered",
];

const TITLES: &[&str] = &[
    "Overview",
    "Installation",
    "Configuration",
    "Getting started",
    "Concepts",
    "Architecture",
    "Caching",
    "Retries and timeouts",
    "Troubleshooting",
    "Performance",
    "Security",
    "Upgrading",
    "Command reference",
    "Examples",
    "Limitations",
    "Frequently asked questions",
];

const LANGUAGES: &[&str] = &["rust", "sh", "yaml", "json", "python", ""];

/// One document of a corpus.
pub struct Doc {
    /// Path below the corpus folder, `/`-separated, as `keg` reports it.
    pub relative: String,
    pub text: String,
    /// Chunks (so LLM calls) the bench pipeline makes of it.
    pub chunks: usize,
}

pub struct Corpus {
    /// The folder holding `f000/`, `f001/` …
    pub root: PathBuf,
    pub docs: Vec<Doc>,
}

impl Corpus {
    pub fn bytes(&self) -> usize {
        self.docs.iter().map(|d| d.text.len()).sum()
    }

    pub fn chunks(&self) -> usize {
        self.docs.iter().map(|d| d.chunks).sum()
    }

    pub fn path(&self, doc: &Doc) -> PathBuf {
        self.root.join(&doc.relative)
    }

    /// A glob over every document.
    pub fn glob_all(&self) -> String {
        format!("{}/**/*.md", self.root.display())
    }

    /// The fewest whole folders holding at least `calls` chunks (all of them if the corpus
    /// is smaller): their glob and their chunk count.
    pub fn glob_for_calls(&self, calls: usize) -> (String, usize) {
        let mut folders = Vec::new();
        let mut total = 0;
        for (n, folder) in self.docs.chunks(PER_FOLDER).enumerate() {
            if total >= calls {
                break;
            }
            folders.push(format!("f{n:03}"));
            total += folder.iter().map(|d| d.chunks).sum::<usize>();
        }
        let glob = match folders.as_slice() {
            [one] => format!("{}/{one}/*.md", self.root.display()),
            many => format!("{}/{{{}}}/*.md", self.root.display(), many.join(",")),
        };
        (glob, total)
    }
}

/// `count` documents of realistic Markdown, about 10 KB each on average.
pub fn markdown(root: &Path, count: usize, seed: u64) -> Result<Corpus> {
    let docs = (0..count)
        .map(|index| {
            let text = markdown_doc(seed, index);
            Doc {
                relative: relative(index),
                chunks: chunks(&text),
                text,
            }
        })
        .collect();
    write(root, docs)
}

/// `count` short documents of exactly one chunk each: one LLM call per document.
pub fn single_chunk(root: &Path, count: usize, seed: u64) -> Result<Corpus> {
    let mut docs = Vec::with_capacity(count);
    for index in 0..count {
        let mut rng = Rng::new(seed ^ (index as u64).wrapping_mul(0x2545_f491_4f6c_dd1d));
        let mut text = format!("# Note {index}\n\n");
        while text.len() < 450 {
            sentence(&mut rng, index, &mut text);
            text.push(' ');
        }
        text.truncate(text.trim_end().len());
        text.push('\n');
        let chunks = chunks(&text);
        if chunks != 1 {
            bail!("generated note {index} makes {chunks} chunks, not 1");
        }
        docs.push(Doc {
            relative: relative(index),
            text,
            chunks,
        });
    }
    write(root, docs)
}

fn relative(index: usize) -> String {
    format!("f{:03}/doc-{index:05}.md", index / PER_FOLDER)
}

pub fn chunks(text: &str) -> usize {
    kegline::chunker::split_markdown(text, CHUNK_CHARS, CHUNK_OVERLAP).len()
}

fn write(root: &Path, docs: Vec<Doc>) -> Result<Corpus> {
    if root.exists() {
        std::fs::remove_dir_all(root)
            .with_context(|| format!("cannot clear {}", root.display()))?;
    }
    for doc in &docs {
        let path = root.join(&doc.relative);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        std::fs::write(&path, &doc.text)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(Corpus {
        root: root.to_path_buf(),
        docs,
    })
}

/// Document `index` of the corpus with this seed: a title, an intro, then sections with
/// paragraphs, lists, code blocks and subsections, until about 5–15 KB.
pub fn markdown_doc(seed: u64, index: usize) -> String {
    let mut rng = Rng::new(seed ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let target = 5_000 + rng.below(10_000);
    let mut doc = String::with_capacity(target + 2_000);
    let _ = writeln!(doc, "# Component {index}: {}\n", rng.pick(TITLES));
    paragraph(&mut rng, index, &mut doc);
    let mut section = 0;
    while doc.len() < target {
        section += 1;
        let _ = writeln!(doc, "## {} {section}\n", rng.pick(TITLES));
        for _ in 0..1 + rng.below(3) {
            paragraph(&mut rng, index, &mut doc);
        }
        if rng.chance(50) {
            list(&mut rng, index, &mut doc);
        }
        if rng.chance(40) {
            code(&mut rng, index, &mut doc);
        }
        if rng.chance(35) {
            let _ = writeln!(doc, "### {} {section}.1\n", rng.pick(TITLES));
            paragraph(&mut rng, index, &mut doc);
            if rng.chance(50) {
                paragraph(&mut rng, index, &mut doc);
            }
        }
    }
    doc
}

fn sentence(rng: &mut Rng, index: usize, out: &mut String) {
    let words = 8 + rng.below(15);
    for i in 0..words {
        if i > 0 {
            out.push(' ');
        }
        match rng.below(40) {
            0 => {
                let _ = write!(out, "`component_{index}_{}`", rng.below(1000));
            }
            1 => {
                let _ = write!(out, "**{}**", rng.pick(WORDS));
            }
            2 => {
                let _ = write!(
                    out,
                    "[{}](https://example.invalid/{index}/{})",
                    rng.pick(WORDS),
                    rng.below(100)
                );
            }
            _ => {
                let word = rng.pick(WORDS);
                if i == 0 {
                    let mut chars = word.chars();
                    if let Some(first) = chars.next() {
                        out.extend(first.to_uppercase());
                        out.push_str(chars.as_str());
                    }
                } else {
                    out.push_str(word);
                }
            }
        }
    }
    out.push(if rng.chance(10) { '?' } else { '.' });
}

fn paragraph(rng: &mut Rng, index: usize, out: &mut String) {
    for i in 0..2 + rng.below(5) {
        if i > 0 {
            out.push(' ');
        }
        sentence(rng, index, out);
    }
    out.push_str("\n\n");
}

fn list(rng: &mut Rng, index: usize, out: &mut String) {
    for _ in 0..3 + rng.below(5) {
        out.push_str("- ");
        sentence(rng, index, out);
        out.push('\n');
    }
    out.push('\n');
}

fn code(rng: &mut Rng, index: usize, out: &mut String) {
    let _ = writeln!(out, "```{}", rng.pick(LANGUAGES));
    for line in 0..3 + rng.below(10) {
        let _ = writeln!(
            out,
            "{}{}_{index}({}, {line}) # {}",
            "    ".repeat(rng.below(3)),
            rng.pick(WORDS),
            rng.pick(WORDS),
            rng.pick(WORDS)
        );
    }
    out.push_str("```\n\n");
}
