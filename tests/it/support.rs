//! A scratch workspace with documents, and a way to run the real `keg` binary in it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use crate::mock::MockLlm;

pub fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

pub struct Workspace {
    pub dir: tempfile::TempDir,
}

/// A Markdown document with three sections of different text, each under 800 characters,
/// so the shipped pipeline makes three chunks (three LLM calls) of it.
pub fn sample_doc(topic: &str) -> String {
    let para = |n: usize| {
        format!(
            "The {topic} system, part {n}, keeps its records in order. Each {topic} entry has an owner, \
             a state and a history of changes. Operators of {topic} review the entries weekly and \
             close the ones that are done; reopened {topic} entries keep their original number."
        )
    };
    format!(
        "# {topic}\n\n{}\n\n## Setup of {topic}\n\n{}\n\n```sh\n{topic} init --fast\n```\n\n## Daily use of {topic}\n\n{}\n",
        para(1),
        para(2),
        para(3)
    )
}

impl Workspace {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir_all(dir.path().join("docs")).expect("docs dir");
        Workspace { dir }
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    pub fn write(&self, relative: &str, contents: impl AsRef<[u8]>) {
        let path = self.path(relative);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, contents).expect("write");
    }

    pub fn read(&self, relative: &str) -> String {
        std::fs::read_to_string(self.path(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
    }

    /// Start keg in the background (stderr piped, for `wait_with_output`).
    pub fn spawn_keg(&self, args: &[String]) -> std::process::Child {
        Command::new(env!("CARGO_BIN_EXE_keg"))
            .args(args)
            .current_dir(self.dir.path())
            .env("KEG_CACHE_DIR", self.path("cache"))
            .env("NO_COLOR", "1")
            .env_remove("OPENAI_API_KEY")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start keg")
    }

    pub fn keg(&self, args: &[&str]) -> Output {
        self.keg_with_env(args, &[])
    }

    pub fn keg_with_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_keg"));
        command
            .args(args)
            .current_dir(self.dir.path())
            .env("KEG_CACHE_DIR", self.path("cache"))
            .env("NO_COLOR", "1")
            .env_remove("OPENAI_API_KEY");
        for (k, v) in env {
            command.env(k, v);
        }
        command.output().expect("run keg")
    }

    /// The shipped example pipeline, as a user runs it.
    pub fn docs_qa_args(&self, mock: &MockLlm, command: &str) -> Vec<String> {
        vec![
            command.to_owned(),
            repo("pipelines/docs-qa.yaml").display().to_string(),
            "--set".into(),
            "docs=docs".into(),
            "--set".into(),
            "out=out".into(),
            "--set".into(),
            format!("base_url={}", mock.base_url()),
            "--set".into(),
            "model=m".into(),
        ]
    }

    pub fn run_docs_qa(&self, mock: &MockLlm) -> Output {
        let args = self.docs_qa_args(mock, "run");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let output = self.keg(&args);
        assert_success(&output);
        output
    }

    pub fn plan_json(&self, mock: &MockLlm) -> Value {
        let mut args = self.docs_qa_args(mock, "plan");
        args.push("--json".into());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let output = self.keg(&args);
        assert_success(&output);
        serde_json::from_slice(&output.stdout).expect("plan --json prints JSON")
    }

    /// Rows of `out/<split>.jsonl`.
    pub fn rows(&self, split: &str) -> Vec<Value> {
        self.read(&format!("out/{split}.jsonl"))
            .lines()
            .map(|line| serde_json::from_str(line).expect("each line is JSON"))
            .collect()
    }

    /// The bytes of every output file, by name.
    pub fn outputs(&self) -> BTreeMap<String, Vec<u8>> {
        std::fs::read_dir(self.path("out"))
            .expect("out dir")
            .map(|e| {
                let e = e.expect("entry");
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).expect("read"),
                )
            })
            .collect()
    }

    /// prompt → split, over train/valid/test.
    pub fn split_of_prompts(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for split in ["train", "valid", "test"] {
            for row in self.rows(split) {
                let prompt = row["prompt"].as_str().expect("prompt").to_owned();
                let previous = out.insert(prompt.clone(), split.to_owned());
                assert!(previous.is_none(), "prompt in two splits: {prompt}");
            }
        }
        out
    }
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

pub fn assert_success(output: &Output) {
    assert!(
        output.status.success(),
        "keg failed ({:?}):\n{}",
        output.status.code(),
        stderr(output)
    );
}

/// The value of `to_run` for stage `name` in `keg plan --json` output.
pub fn to_run(plan: &Value, name: &str) -> u64 {
    plan["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .find(|s| s["name"] == name)
        .and_then(|s| s["to_run"].as_u64())
        .unwrap_or_else(|| panic!("no stage {name} in {plan}"))
}

/// The user message of a chat request body.
pub fn user_message(body: &Value) -> String {
    body["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_owned()
}
