//! Fan-in and fan-out: two loads feed one chunk stage, one split feeds two exports in
//! different trainer formats.

use crate::mock::{Behavior, MockLlm};
use crate::support::{Workspace, assert_success, repo, sample_doc, stderr};

fn pipeline(base_url: &str) -> String {
    format!(
        r#"version: 1
name: fan
templates: [{templates}]
providers:
  llm: {{kind: openai, base_url: "{base_url}", model: m, concurrency: 4}}
stages:
  guides: {{kind: load, paths: ["guides/*.md"]}}
  notes: {{kind: load, paths: ["notes/*.txt"]}}
  chunks:
    kind: chunk
    inputs: [notes, guides]
    strategy: chars
    max_chars: 600
    overlap: 60
  prompts: {{kind: prompt, inputs: [chunks], system_template: qa/system.j2, user_template: qa/user.j2, items: "2"}}
  pairs: {{kind: generate, inputs: [prompts], provider: llm, schema: {schemas}/qa-pairs.schema.json, items_field: pairs}}
  splits:
    kind: split
    inputs: [pairs]
    ratios: {{train: 0.5, test: 0.5}}
    group_by: doc
  completions: {{kind: export, inputs: [splits], dir: out/pc, prompt: question, completion: answer}}
  chats:
    kind: export
    inputs: [splits]
    dir: out/chat
    format: chat
    system: "You answer questions about {{{{ 'our' }}}} systems."
    prompt: question
    completion: answer
"#,
        templates = repo("templates").display(),
        schemas = repo("schemas").display(),
    )
}

#[test]
fn two_loads_feed_one_stage_and_one_split_feeds_two_exports() {
    let ws = Workspace::new();
    ws.write("guides/alpha.md", sample_doc("alpha"));
    ws.write("notes/beta.txt", sample_doc("beta"));
    let mock = MockLlm::start(Behavior::default());
    ws.write("fan.yaml", pipeline(&mock.base_url()));
    let output = ws.keg(&["run", "fan.yaml"]);
    assert_success(&output);
    let err = stderr(&output);
    assert!(err.contains("chunk     2 → 4 records"), "{err}");

    let mermaid = String::from_utf8(ws.keg(&["graph", "fan.yaml"]).stdout).unwrap();
    for edge in [
        "notes --> chunks",
        "guides --> chunks",
        "splits --> completions",
        "splits --> chats",
    ] {
        assert!(mermaid.contains(edge), "{mermaid}");
    }

    // The same examples in both formats, in the same order and splits.
    for split in ["train", "test"] {
        let pc = ws.read(&format!("out/pc/{split}.jsonl"));
        let chat = ws.read(&format!("out/chat/{split}.jsonl"));
        assert_eq!(pc.lines().count(), chat.lines().count());
        for (a, b) in pc.lines().zip(chat.lines()) {
            let a: serde_json::Value = serde_json::from_str(a).unwrap();
            let b: serde_json::Value = serde_json::from_str(b).unwrap();
            assert_eq!(
                b,
                serde_json::json!({"messages": [
                    {"role": "system", "content": "You answer questions about our systems."},
                    {"role": "user", "content": a["prompt"]},
                    {"role": "assistant", "content": a["completion"]},
                ]})
            );
        }
    }
    // group_by doc: each document's rows sit in one split.
    for doc in ["alpha.md", "beta.txt"] {
        let splits: Vec<&str> = ["train", "test"]
            .into_iter()
            .filter(|s| ws.read(&format!("out/pc/{s}.jsonl")).contains(doc))
            .collect();
        assert_eq!(splits.len(), 1, "{doc} in {splits:?}");
    }
    let manifest: serde_json::Value =
        serde_json::from_str(&ws.read("out/chat/manifest.json")).unwrap();
    assert_eq!(manifest["format"], "chat");
    let documents: Vec<&String> = manifest["documents"].as_object().unwrap().keys().collect();
    assert_eq!(documents, ["alpha.md", "beta.txt"]);
}
