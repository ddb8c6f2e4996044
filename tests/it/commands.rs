//! `keg plan`, `keg graph`, `keg cache` as a user sees them.

use crate::mock::{Behavior, MockLlm};
use crate::support::{Workspace, assert_success, repo, sample_doc};

#[test]
fn plan_counts_calls_without_sending_and_prints_versioned_json() {
    let ws = Workspace::new();
    ws.write("docs/a.md", sample_doc("alpha"));
    let mock = MockLlm::start(Behavior::default());
    let plan = ws.plan_json(&mock);
    assert_eq!(mock.requests(), 0);
    let expected = serde_json::json!({"version": 1, "stages": [
        {"name": "docs", "kind": "load", "items": 1, "cached": 0, "to_run": 0},
        {"name": "chunks", "kind": "chunk", "items": 1, "cached": 0, "to_run": 0},
        {"name": "prompts", "kind": "prompt", "items": 3, "cached": 0, "to_run": 0},
        {"name": "pairs", "kind": "generate", "items": 3, "cached": 0, "to_run": 3},
        {"name": "checked", "kind": "validate", "items": 0, "cached": 0, "to_run": 0},
        {"name": "unique", "kind": "dedupe", "items": 0, "cached": 0, "to_run": 0},
        {"name": "splits", "kind": "split", "items": 0, "cached": 0, "to_run": 0},
        {"name": "dataset", "kind": "export", "items": 0, "cached": 0, "to_run": 0},
    ]});
    assert_eq!(plan, expected);
    assert!(!ws.path("out").exists(), "plan writes no output");
    ws.run_docs_qa(&mock);
    let plan = ws.plan_json(&mock);
    assert_eq!(plan["stages"][3]["cached"], 3);
    assert_eq!(plan["stages"][3]["to_run"], 0);
}

#[test]
fn graph_prints_mermaid_and_dot() {
    let ws = Workspace::new();
    let pipeline = repo("pipelines/docs-qa.yaml").display().to_string();
    let output = ws.keg(&["graph", &pipeline]);
    assert_success(&output);
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(
        text.starts_with("flowchart LR\n  docs[\"docs (load)\"]\n"),
        "{text}"
    );
    assert!(text.contains("  pairs --> checked\n"), "{text}");
    let output = ws.keg(&["graph", &pipeline, "--format", "dot"]);
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains("  \"splits\" -> \"dataset\";\n"), "{text}");
}

#[test]
fn cache_stats_and_clear() {
    let ws = Workspace::new();
    ws.write("docs/a.md", sample_doc("alpha"));
    let mock = MockLlm::start(Behavior::default());
    ws.run_docs_qa(&mock);
    let output = ws.keg(&["cache", "stats"]);
    assert_success(&output);
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains("/calls-v2: 3 entries,"), "{text}");
    assert!(ws.path("cache/CACHEDIR.TAG").is_file());
    let output = ws.keg(&["cache", "clear"]);
    assert_success(&output);
    mock.reset();
    ws.run_docs_qa(&mock);
    assert_eq!(mock.requests(), 3);
}
