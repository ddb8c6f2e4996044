//! Helpers for the provider tests: the shipped pipeline run against the mock with any
//! provider, a copy of it with extra provider settings, and readers for what a run left.

#![allow(dead_code)] // each test uses only part of the API

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;

use crate::mock::MockLlm;
use crate::support::{Workspace, repo, sample_doc, stderr};

pub const TOPICS: [&str; 4] = ["ledger", "billing", "inventory", "shipping"];

/// Four documents of three sections each: twelve calls.
pub fn docs_workspace() -> Workspace {
    let ws = Workspace::new();
    for topic in TOPICS {
        ws.write(&format!("docs/{topic}.md"), sample_doc(topic));
    }
    ws
}

/// `n` documents of three sections each: 3 × `n` calls. Enough calls that every fault of a
/// fraction ≥ 0.2 is met whatever the templates make of the documents.
pub fn many_docs_workspace(n: usize) -> Workspace {
    let ws = Workspace::new();
    for i in 0..n {
        let topic = format!("topic{i}");
        ws.write(&format!("docs/{topic}.md"), sample_doc(&topic));
    }
    ws
}

/// Which wire format a run uses, and the base URL the mock serves it at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    OpenAi,
    Ollama,
    Anthropic,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::OpenAi, Kind::Ollama, Kind::Anthropic];

    pub fn name(self) -> &'static str {
        match self {
            Kind::OpenAi => "openai",
            Kind::Ollama => "ollama",
            Kind::Anthropic => "anthropic",
        }
    }

    pub fn base_url(self, mock: &MockLlm) -> String {
        match self {
            Kind::OpenAi => mock.base_url(),
            Kind::Ollama | Kind::Anthropic => mock.root_url(),
        }
    }

    pub fn api(self) -> crate::mock::Api {
        match self {
            Kind::OpenAi => crate::mock::Api::OpenAi,
            Kind::Ollama => crate::mock::Api::Ollama,
            Kind::Anthropic => crate::mock::Api::Anthropic,
        }
    }

    /// The variable the shipped pipeline reads the key from for this kind.
    pub fn key_env(self) -> &'static str {
        match self {
            Kind::OpenAi => "OPENAI_API_KEY",
            Kind::Ollama => "OLLAMA_API_KEY",
            Kind::Anthropic => "ANTHROPIC_API_KEY",
        }
    }
}

/// A run of `pipeline` against the mock as `kind`, with more `--set`s and environment.
/// Keys of every kind are cleared unless `env` sets them.
pub fn run_with(
    ws: &Workspace,
    pipeline: &Path,
    mock: &MockLlm,
    kind: Kind,
    sets: &[(&str, &str)],
    env: &[(&str, &str)],
) -> Output {
    let base_url = kind.base_url(mock);
    let mut all_sets: Vec<(String, String)> = vec![
        ("docs".into(), "docs".into()),
        ("out".into(), "out".into()),
        ("model".into(), "m".into()),
        ("provider".into(), kind.name().into()),
        ("base_url".into(), base_url),
    ];
    for (k, v) in sets {
        all_sets.retain(|(name, _)| name != k);
        all_sets.push(((*k).into(), (*v).into()));
    }
    let mut args: Vec<String> = vec!["run".into(), pipeline.display().to_string()];
    for (k, v) in all_sets {
        args.push("--set".into());
        args.push(format!("{k}={v}"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut all_env: Vec<(&str, &str)> = vec![
        ("OPENAI_API_KEY", ""),
        ("OLLAMA_API_KEY", ""),
        ("ANTHROPIC_API_KEY", ""),
        ("OLLAMA_HOST", ""),
    ];
    for (k, v) in env {
        all_env.retain(|(name, _)| name != k);
        all_env.push((k, v));
    }
    ws.keg_with_env(&args, &all_env)
}

/// The shipped pipeline, run as `kind` against the mock.
pub fn run_shipped(ws: &Workspace, mock: &MockLlm, kind: Kind, sets: &[(&str, &str)]) -> Output {
    run_with(ws, &shipped(), mock, kind, sets, &[])
}

pub fn shipped() -> PathBuf {
    repo("pipelines/docs-qa.yaml")
}

/// A copy of the shipped pipeline in the workspace with `fields` (YAML lines, e.g.
/// `"retry_delay_ms: 5"`) added to its provider, and its relative paths made absolute.
pub fn shipped_with_provider_fields(ws: &Workspace, fields: &[&str]) -> PathBuf {
    let text = std::fs::read_to_string(shipped()).expect("read the shipped pipeline");
    let root = repo("");
    let root = root.display().to_string();
    let root = root.trim_end_matches('/');
    let text = text
        .replace("[../templates]", &format!("[{root}/templates]"))
        .replace(": ../schemas/", &format!(": {root}/schemas/"));
    let anchor = "providers:\n  llm:\n";
    let at = text
        .find(anchor)
        .expect("the shipped pipeline has provider `llm`")
        + anchor.len();
    let extra: String = fields.iter().map(|f| format!("    {f}\n")).collect();
    let text = format!("{}{extra}{}", &text[..at], &text[at..]);
    ws.write("pipeline.yaml", text);
    ws.path("pipeline.yaml")
}

pub fn assert_ok(output: &Output) {
    assert!(
        output.status.success(),
        "keg failed ({:?}):\n{}",
        output.status.code(),
        stderr(output)
    );
}

/// The `N retries` of the generate stage's summary line (0 when not printed).
pub fn retries_in(output: &Output) -> usize {
    let text = stderr(output);
    let line = text
        .lines()
        .find(|l| l.contains(" calls: "))
        .unwrap_or_else(|| panic!("no generate summary line in:\n{text}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[1].trim_end_matches(',') == "retries")
        .map_or(0, |w| w[0].replace(',', "").parse().expect("a retry count"))
}

/// Rows over train/valid/test.
pub fn dataset_rows(ws: &Workspace) -> usize {
    ["train", "valid", "test"]
        .iter()
        .map(|s| ws.rows(s).len())
        .sum()
}

/// The split files' bytes.
pub fn dataset_bytes(ws: &Workspace) -> Vec<Vec<u8>> {
    ["train", "valid", "test"]
        .iter()
        .map(|s| std::fs::read(ws.path(&format!("out/{s}.jsonl"))).expect("split file"))
        .collect()
}

pub fn rejects(ws: &Workspace) -> Vec<Value> {
    ws.read("out/rejects.jsonl")
        .lines()
        .map(|line| serde_json::from_str(line).expect("each reject is JSON"))
        .collect()
}

/// Every file under the workspace (documents, cache, outputs) whose bytes contain `needle`.
pub fn files_containing(ws: &Workspace, needle: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![ws.dir.path().to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path)
                && bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
            {
                found.push(path);
            }
        }
    }
    found
}

/// The number of files under `dir` (recursively).
pub fn file_count(dir: &Path) -> usize {
    let mut count = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.path().is_dir() {
                stack.push(entry.path());
            } else {
                count += 1;
            }
        }
    }
    count
}
