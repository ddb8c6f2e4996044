//! The promises of the cache: a re-run costs nothing, an edit costs only what changed, and
//! output files do not depend on the order calls finished in.

use std::process::Output;
use std::time::Duration;

use crate::mock::{Behavior, MockLlm};
use crate::support::{Workspace, sample_doc, stderr, to_run, user_message};

const TOPICS: [&str; 4] = ["ledger", "billing", "inventory", "shipping"];

fn workspace_with_docs() -> Workspace {
    let ws = Workspace::new();
    for topic in TOPICS {
        ws.write(&format!("docs/{topic}.md"), sample_doc(topic));
    }
    ws
}

#[test]
fn first_run_writes_a_complete_dataset() {
    let ws = workspace_with_docs();
    let mock = MockLlm::start(Behavior::default());
    let output = ws.run_docs_qa(&mock);
    // 4 documents × 3 sections = 12 chunks, one call each.
    assert_eq!(mock.requests(), 12, "{}", stderr(&output));
    let prompts = ws.split_of_prompts();
    let rows: usize = ["train", "valid", "test"]
        .iter()
        .map(|s| ws.rows(s).len())
        .sum();
    assert_eq!(prompts.len(), rows);
    for split in ["train", "valid", "test"] {
        for row in ws.rows(split) {
            let keys: Vec<&String> = row.as_object().unwrap().keys().collect();
            assert_eq!(keys, ["prompt", "completion"]);
            assert!(!row["prompt"].as_str().unwrap().trim().is_empty());
            assert!(!row["completion"].as_str().unwrap().trim().is_empty());
        }
    }
    // Each call asked for 10 pairs per 1,000 characters and got them: nothing rejected.
    let asked: usize = mock
        .bodies()
        .iter()
        .map(|b| crate::mock::parse_item_count(&user_message(b)).unwrap())
        .sum();
    assert_eq!(rows, asked);
    assert_eq!(ws.read("out/rejects.jsonl"), "");
    let manifest: serde_json::Value = serde_json::from_str(&ws.read("out/manifest.json")).unwrap();
    assert_eq!(manifest["pipeline"], "docs-qa");
    assert_eq!(manifest["models"][0]["model"], "m");
    assert_eq!(manifest["documents"].as_object().unwrap().len(), 4);
    let counted: u64 = ["train", "valid", "test"]
        .iter()
        .map(|s| manifest["splits"][s]["rows"].as_u64().unwrap())
        .sum();
    assert_eq!(counted as usize, rows);
    let summary = stderr(&output);
    assert!(summary.contains("12 calls: 12 sent, 0 cached"), "{summary}");
}

#[test]
fn rerun_sends_nothing_and_writes_identical_bytes() {
    let ws = workspace_with_docs();
    let mock = MockLlm::start(Behavior::default());
    ws.run_docs_qa(&mock);
    let first = ws.outputs();
    assert_eq!(to_run(&ws.plan_json(&mock), "pairs"), 0);
    mock.reset();
    let output = ws.run_docs_qa(&mock);
    assert_eq!(mock.requests(), 0);
    assert_eq!(ws.outputs(), first);
    assert!(stderr(&output).contains("12 calls: 0 sent, 12 cached"));
}

#[test]
fn editing_one_document_resends_only_its_changed_chunks() {
    let ws = workspace_with_docs();
    let mock = MockLlm::start(Behavior::default());
    ws.run_docs_qa(&mock);
    let before = ws.split_of_prompts();

    let edited = format!(
        "{}\nA closing paragraph about billing exports, added later, that says how the monthly \
         export is archived.\n",
        sample_doc("billing")
    );
    ws.write("docs/billing.md", edited);
    assert_eq!(to_run(&ws.plan_json(&mock), "pairs"), 1);
    mock.reset();
    ws.run_docs_qa(&mock);
    // The paragraph lands in the last section: one chunk changed, one call.
    assert_eq!(mock.requests(), 1);
    let message = user_message(&mock.bodies()[0]);
    assert!(message.starts_with("Document: billing.md"), "{message}");
    assert!(message.contains("closing paragraph"), "{message}");
    // Examples from untouched chunks keep their split.
    let after = ws.split_of_prompts();
    for (prompt, split) in &before {
        if let Some(now) = after.get(prompt) {
            assert_eq!(now, split, "{prompt} moved");
        }
    }
}

#[test]
fn deleting_a_document_removes_its_rows_without_calls() {
    let ws = workspace_with_docs();
    let mock = MockLlm::start(Behavior::default());
    ws.run_docs_qa(&mock);
    let all = ws.split_of_prompts();
    std::fs::remove_file(ws.path("docs/inventory.md")).unwrap();
    mock.reset();
    ws.run_docs_qa(&mock);
    assert_eq!(mock.requests(), 0);
    let left = ws.split_of_prompts();
    // The mock's answers quote the start of the user message, which names the document.
    for split in ["train", "valid", "test"] {
        for row in ws.rows(split) {
            let completion = row["completion"].as_str().unwrap();
            assert!(!completion.contains("inventory.md"), "{completion}");
        }
    }
    assert!(left.len() < all.len());
    for (prompt, split) in &left {
        assert_eq!(all.get(prompt), Some(split));
    }
    let manifest: serde_json::Value = serde_json::from_str(&ws.read("out/manifest.json")).unwrap();
    assert!(manifest["documents"].get("inventory.md").is_none());
}

#[test]
fn adding_documents_never_moves_an_example_between_splits() {
    let ws = workspace_with_docs();
    let mock = MockLlm::start(Behavior::default());
    ws.run_docs_qa(&mock);
    let before = ws.split_of_prompts();
    for i in 0..10 {
        let topic = format!("added{i}");
        ws.write(&format!("docs/{topic}.md"), sample_doc(&topic));
    }
    mock.reset();
    ws.run_docs_qa(&mock);
    assert_eq!(mock.requests(), 30);
    let after = ws.split_of_prompts();
    for (prompt, split) in &before {
        assert_eq!(after.get(prompt), Some(split), "{prompt}");
    }
    assert!(after.len() > before.len());
}

#[test]
fn completion_order_does_not_change_the_files() {
    let calm = workspace_with_docs();
    let shuffled = workspace_with_docs();
    let in_order = MockLlm::start(Behavior::default());
    let jittery = MockLlm::start(Behavior {
        jitter: Duration::from_millis(150),
        ..Behavior::default()
    });
    calm.run_docs_qa(&in_order);
    shuffled.run_docs_qa(&jittery);
    let (a, b) = (calm.outputs(), shuffled.outputs());
    for name in ["train.jsonl", "valid.jsonl", "test.jsonl", "rejects.jsonl"] {
        assert_eq!(a[name], b[name], "{name} differs");
    }
}

#[test]
fn no_cache_resends_and_refreshes() {
    let ws = workspace_with_docs();
    let mock = MockLlm::start(Behavior::default());
    ws.run_docs_qa(&mock);
    mock.reset();
    let mut args = ws.docs_qa_args(&mock, "run");
    args.push("--no-cache".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = ws.keg(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(mock.requests(), 12);
}

/// The shipped pipeline with its templates and schemas copied into the workspace, so a test
/// can edit them.
fn copy_shipped_pipeline(ws: &Workspace) {
    for file in [
        "pipelines/docs-qa.yaml",
        "templates/qa/system.j2",
        "templates/qa/user.j2",
        "schemas/qa-pairs.schema.json",
        "schemas/qa-pair.schema.json",
        "schemas/pipeline.schema.json",
    ] {
        ws.write(file, std::fs::read(crate::support::repo(file)).unwrap());
    }
}

fn run_copied(ws: &Workspace, mock: &MockLlm) -> std::process::Output {
    let mut args = ws.docs_qa_args(mock, "run");
    args[1] = ws.path("pipelines/docs-qa.yaml").display().to_string();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = ws.keg(&args);
    crate::support::assert_success(&output);
    output
}

#[test]
fn unchanged_documents_are_skipped_and_unchanged_outputs_left_alone() {
    let ws = workspace_with_docs();
    let mock = MockLlm::start(Behavior::default());
    ws.run_docs_qa(&mock);
    let first = ws.outputs();
    let modified = |name: &str| {
        std::fs::metadata(ws.path(&format!("out/{name}")))
            .unwrap()
            .modified()
            .unwrap()
    };
    let written = modified("train.jsonl");
    std::thread::sleep(Duration::from_millis(20));
    mock.reset();
    let output = ws.run_docs_qa(&mock);
    let summary = stderr(&output);
    assert_eq!(mock.requests(), 0);
    assert!(
        summary.contains("4 of 4 documents unchanged since an earlier run: skipped"),
        "{summary}"
    );
    assert!(summary.contains("12 calls: 0 sent, 12 cached"), "{summary}");
    assert!(summary.contains("unchanged out/train.jsonl ("), "{summary}");
    assert_eq!(
        modified("train.jsonl"),
        written,
        "left alone, not rewritten"
    );
    assert_eq!(ws.outputs(), first);

    // An output deleted or damaged by hand is written again, from the cache.
    std::fs::remove_file(ws.path("out/valid.jsonl")).unwrap();
    ws.write("out/train.jsonl", "damaged\n");
    let output = ws.run_docs_qa(&mock);
    assert_eq!(mock.requests(), 0);
    assert!(
        stderr(&output).contains("wrote out/train.jsonl ("),
        "{}",
        stderr(&output)
    );
    assert_eq!(ws.outputs(), first);
}

#[test]
fn one_edited_document_runs_alone_and_the_others_are_skipped() {
    let ws = workspace_with_docs();
    let mock = MockLlm::start(Behavior::default());
    ws.run_docs_qa(&mock);
    ws.write(
        "docs/ledger.md",
        format!(
            "{}\nOne more line at the end of the ledger.\n",
            sample_doc("ledger")
        ),
    );
    mock.reset();
    let output = ws.run_docs_qa(&mock);
    let summary = stderr(&output);
    assert_eq!(mock.requests(), 1, "{summary}");
    assert!(
        summary.contains("3 of 4 documents unchanged since an earlier run: skipped"),
        "{summary}"
    );
    assert!(summary.contains("12 calls: 1 sent, 11 cached"), "{summary}");
    // The same files as a run from scratch with the same replies.
    let fresh = workspace_with_docs();
    fresh.write(
        "docs/ledger.md",
        format!(
            "{}\nOne more line at the end of the ledger.\n",
            sample_doc("ledger")
        ),
    );
    fresh.run_docs_qa(&mock);
    assert_eq!(ws.outputs(), fresh.outputs());
}

#[test]
fn an_edited_included_template_changes_the_calls() {
    // `user.j2` imports `macros.j2`: an edit there changes every prompt, although no file a
    // stage names changed.
    let ws = workspace_with_docs();
    copy_shipped_pipeline(&ws);
    let user = ws.read("templates/qa/user.j2");
    let inline = r#"{% if headings %} — {{ headings | join(" › ") }}{% endif %}"#;
    assert!(user.contains(inline), "the shipped user template: {user}");
    ws.write(
        "templates/qa/user.j2",
        format!(
            "{{% from \"qa/macros.j2\" import trail %}}{}",
            user.replacen(inline, "{{ trail(headings) }}", 1)
        ),
    );
    ws.write(
        "templates/qa/macros.j2",
        format!("{{% macro trail(headings) %}}{inline}{{% endmacro %}}\n"),
    );
    let mock = MockLlm::start(Behavior::default());
    run_copied(&ws, &mock);
    assert_eq!(mock.requests(), 12);
    assert!(user_message(&mock.bodies()[0]).contains(" — "));
    let macros = ws.read("templates/qa/macros.j2");
    ws.write("templates/qa/macros.j2", macros.replace(" — ", " / "));
    mock.reset();
    run_copied(&ws, &mock);
    assert_eq!(mock.requests(), 12, "every prompt shows the heading trail");
    assert!(user_message(&mock.bodies()[0]).contains(" / "));
    mock.reset();
    run_copied(&ws, &mock);
    assert_eq!(mock.requests(), 0);
}

#[test]
fn a_var_a_template_reads_changes_the_calls() {
    let ws = workspace_with_docs();
    copy_shipped_pipeline(&ws);
    let pipeline = ws.read("pipelines/docs-qa.yaml");
    ws.write(
        "pipelines/docs-qa.yaml",
        pipeline.replacen("vars:\n", "vars:\n  audience: engineers\n", 1),
    );
    let user = ws.read("templates/qa/user.j2");
    ws.write(
        "templates/qa/user.j2",
        format!("{user}\nWrite for {{{{ vars.audience }}}}.\n"),
    );
    let mock = MockLlm::start(Behavior::default());
    run_copied(&ws, &mock);
    assert_eq!(mock.requests(), 12);
    assert!(user_message(&mock.bodies()[0]).contains("Write for engineers."));
    mock.reset();
    let mut args = ws.docs_qa_args(&mock, "run");
    args[1] = ws.path("pipelines/docs-qa.yaml").display().to_string();
    args.extend(["--set".to_owned(), "audience=students".to_owned()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    crate::support::assert_success(&ws.keg(&args));
    assert_eq!(mock.requests(), 12);
    assert!(user_message(&mock.bodies()[0]).contains("Write for students."));
}

#[test]
fn a_changed_validation_schema_applies_without_calls() {
    let ws = workspace_with_docs();
    copy_shipped_pipeline(&ws);
    let mock = MockLlm::start(Behavior::default());
    run_copied(&ws, &mock);
    assert!(ws.read("out/rejects.jsonl").is_empty());
    // Answers must now be at most 5 characters long: every row is rejected by `validate`.
    let schema = ws.read("schemas/qa-pair.schema.json").replacen(
        "\"answer\": {",
        "\"answer\": {\"maxLength\": 5, ",
        1,
    );
    assert!(schema.contains("maxLength"), "{schema}");
    ws.write("schemas/qa-pair.schema.json", schema);
    mock.reset();
    let output = run_copied(&ws, &mock);
    assert_eq!(mock.requests(), 0);
    let rows: usize = ["train", "valid", "test"]
        .iter()
        .map(|s| ws.rows(s).len())
        .sum();
    assert_eq!(rows, 0, "{}", stderr(&output));
    assert!(
        ws.read("out/rejects.jsonl")
            .contains("\"code\":\"validate\"")
    );
}

/// Set a file's modification time to an hour ago, as for a file checked out long before.
fn age(ws: &Workspace, relative: &str) {
    let file = std::fs::File::options()
        .write(true)
        .open(ws.path(relative))
        .unwrap();
    let past = std::time::SystemTime::now() - Duration::from_secs(3600);
    file.set_modified(past).unwrap();
}

#[test]
fn unchanged_files_are_not_read_again_and_edited_ones_are() {
    let ws = workspace_with_docs();
    for topic in TOPICS {
        age(&ws, &format!("docs/{topic}.md"));
    }
    let mock = MockLlm::start(Behavior::default());
    ws.run_docs_qa(&mock);
    let first = ws.outputs();

    // Same size, same time, same inode: taken as unchanged without being read, as git's
    // index and make do. (Here the bytes did change, which shows the file was not read.)
    let ledger = ws.read("docs/ledger.md");
    let swapped = ledger.replacen("ledger", "LEDGER", 1);
    assert_eq!(swapped.len(), ledger.len());
    let modified = std::fs::metadata(ws.path("docs/ledger.md"))
        .unwrap()
        .modified()
        .unwrap();
    ws.write("docs/ledger.md", &swapped);
    std::fs::File::options()
        .write(true)
        .open(ws.path("docs/ledger.md"))
        .unwrap()
        .set_modified(modified)
        .unwrap();
    mock.reset();
    ws.run_docs_qa(&mock);
    assert_eq!(mock.requests(), 0);
    assert_eq!(ws.outputs(), first);

    // An edit as editors make them (a new modification time) is seen.
    ws.write("docs/ledger.md", &swapped);
    mock.reset();
    let output = ws.run_docs_qa(&mock);
    assert!(mock.requests() > 0, "{}", stderr(&output));
    for body in mock.bodies() {
        assert!(user_message(&body).starts_with("Document: ledger.md"));
    }
    assert!(user_message(&mock.bodies()[0]).contains("LEDGER"));
}

/// A pipeline over `docs/*.md` whose prompts do not name the document, so two documents
/// with the same text ask the same questions; `extra` adds stages after `splits`.
fn pipeline_without_paths(ws: &Workspace, mock: &MockLlm, out: &str, extra: &str) -> String {
    ws.write(
        "tpl/user.j2",
        "Passage:\n{{ text }}\n\nWrite {{ items }} question-answer pairs about this passage.\n",
    );
    format!(
        r#"version: 1
name: no-paths
templates: [tpl, {templates}]
providers:
  llm: {{kind: openai, base_url: "{base_url}", model: m, concurrency: 4}}
stages:
  docs: {{kind: load, paths: ["docs/*.md"]}}
  chunks: {{kind: chunk, inputs: [docs], strategy: markdown, max_chars: 800}}
  prompts: {{kind: prompt, inputs: [chunks], system_template: qa/system.j2, user_template: user.j2, items: "3"}}
  pairs: {{kind: generate, inputs: [prompts], provider: llm, schema: {schemas}/qa-pairs.schema.json, items_field: pairs}}
  unique: {{kind: dedupe, inputs: [pairs], fields: [question]}}
  splits: {{kind: split, inputs: [unique], ratios: {{train: 0.5, test: 0.5}}, group_by: example}}
  dataset: {{kind: export, inputs: [splits], dir: {out}, prompt: question, completion: answer}}
{extra}"#,
        templates = crate::support::repo("templates").display(),
        schemas = crate::support::repo("schemas").display(),
        base_url = mock.base_url(),
    )
}

/// The no-paths pipeline run three times over the workspace's documents, each way the later
/// stages can run.
/// - As a chain (into `out`): fed document by document.
/// - With a `validate` stage between `unique` and `splits`, a second export reading `splits`
///   (into `out-fork` and `out-chat`) and one reading `chunks` (into `out-fork-chunks`): a
///   fork and a second tree, also fed document by document.
/// - With `unique` reading `pairs` twice, a join, and the export of `chunks` (into
///   `out-whole` and `out-whole-chunks`): the stages after the per-document ones run whole,
///   on every record at once. `unique` drops the second copy of every record, so what it
///   keeps is what the others keep.
fn run_chained_forked_and_whole(ws: &Workspace, mock: &MockLlm) -> [Output; 3] {
    ws.write("chain.yaml", pipeline_without_paths(ws, mock, "out", ""));
    let chunks = |dir: &str| {
        format!(
            "  pieces: {{kind: export, inputs: [chunks], dir: {dir}, prompt: path, completion: text}}\n"
        )
    };
    let fork = format!(
        "  chat: {{kind: export, inputs: [splits], dir: out-chat, format: chat, prompt: question, completion: answer}}\n{}",
        chunks("out-fork-chunks")
    );
    let fork = pipeline_without_paths(ws, mock, "out-fork", &fork).replace(
        "splits: {kind: split, inputs: [unique]",
        &format!(
            "checked: {{kind: validate, inputs: [unique], schema: {}}}\n  \
             splits: {{kind: split, inputs: [checked]",
            crate::support::repo("schemas/qa-pair.schema.json").display()
        ),
    );
    assert!(fork.contains("inputs: [checked]"));
    ws.write("fork.yaml", fork);
    let whole = pipeline_without_paths(ws, mock, "out-whole", &chunks("out-whole-chunks"))
        .replace("inputs: [pairs]", "inputs: [pairs, pairs]");
    assert!(whole.contains("inputs: [pairs, pairs]"));
    ws.write("whole.yaml", whole);
    ["chain.yaml", "fork.yaml", "whole.yaml"].map(|file| {
        let output = ws.keg(&["run", file]);
        crate::support::assert_success(&output);
        output
    })
}

/// The summaries of the three runs of [`run_chained_forked_and_whole`] say that `unique`
/// dropped what `dropped` says; the join's, that it dropped the second copies too.
fn assert_dropped(outputs: &[Output; 3], dropped: &str) {
    let (counts, _) = dropped.split_once(" records").unwrap();
    let (before, after) = counts.split_once(" → ").unwrap();
    let (before, after): (usize, usize) = (before.parse().unwrap(), after.parse().unwrap());
    let joined = format!(
        "{} → {after} records ({} duplicates dropped)",
        2 * before,
        2 * before - after
    );
    for (output, line) in outputs.iter().zip([dropped, dropped, &joined]) {
        let summary = stderr(output);
        assert!(summary.contains(line), "{line}\n{summary}");
    }
}

/// The files the three runs of [`run_chained_forked_and_whole`] write are the same, and the
/// export of `chunks` has one row for each of the documents' `chunks`.
fn assert_same_outputs(ws: &Workspace, chunks: usize) {
    for name in ["train.jsonl", "test.jsonl", "rejects.jsonl"] {
        for dir in ["out-fork", "out-whole"] {
            assert_eq!(
                ws.read(&format!("out/{name}")),
                ws.read(&format!("{dir}/{name}")),
                "{dir}/{name}"
            );
        }
    }
    assert_eq!(
        ws.read("out-fork-chunks/data.jsonl").lines().count(),
        chunks
    );
    assert_eq!(
        ws.read("out-fork-chunks/data.jsonl"),
        ws.read("out-whole-chunks/data.jsonl")
    );
}

#[test]
fn later_stages_fed_document_by_document_write_what_running_them_whole_writes() {
    // dedupe → split → export form one chain after the per-document stages, and with a
    // `validate` and a second export reading `splits` a fork: both are fed one document at a
    // time. A join makes them run whole, on every record at once. All three must write the
    // same bytes, and drop the same repeats: the copy of a document asks the same
    // questions, and only the first document keeps them.
    let ws = workspace_with_docs();
    ws.write("docs/zz-copy-of-ledger.md", sample_doc("ledger"));
    let mock = MockLlm::start(Behavior::default());
    let outputs = run_chained_forked_and_whole(&ws, &mock);

    // 5 documents × 3 sections, 3 questions each; the copy's 9 are dropped.
    let rows = |dir: &str| -> Vec<String> {
        ["train", "test"]
            .iter()
            .flat_map(|s| {
                ws.read(&format!("{dir}/{s}.jsonl"))
                    .lines()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    assert_eq!(rows("out").len(), 36, "{}", stderr(&outputs[0]));
    let unique: std::collections::BTreeSet<String> = rows("out").into_iter().collect();
    assert_eq!(unique.len(), 36);
    assert_dropped(&outputs, "45 → 36 records (9 duplicates dropped)");
    assert_same_outputs(&ws, 15);
    // The fork's second export wrote the same rows in its own format.
    let chat = rows("out-chat");
    assert_eq!(chat.len(), 36);
    let first: serde_json::Value = serde_json::from_str(&rows("out")[0]).unwrap();
    let first_chat: serde_json::Value = serde_json::from_str(&chat[0]).unwrap();
    assert!(first["prompt"].is_string() && first["completion"].is_string());
    assert_eq!(first_chat["messages"][0]["content"], first["prompt"]);
    assert_eq!(first_chat["messages"][1]["content"], first["completion"]);
}

#[test]
fn a_later_stage_that_starts_reading_another_per_document_stage_gets_its_records() {
    // The first run keeps each document's `pairs`, the records the later stages read. The
    // second adds an export of `chunks`: the documents did not change, but what was kept of
    // them holds no chunks, so they run again, every call answered from the cache, and the
    // new export has every chunk.
    let ws = workspace_with_docs();
    let mock = MockLlm::start(Behavior::default());
    ws.write("p.yaml", pipeline_without_paths(&ws, &mock, "out", ""));
    crate::support::assert_success(&ws.keg(&["run", "p.yaml"]));
    let calls = mock.requests();
    assert!(calls > 0);
    let first = ws.read("out/train.jsonl");
    mock.reset();
    let pieces = "  pieces: {kind: export, inputs: [chunks], dir: out-chunks, prompt: path, completion: text}\n";
    ws.write("p.yaml", pipeline_without_paths(&ws, &mock, "out", pieces));
    let output = ws.keg(&["run", "p.yaml"]);
    crate::support::assert_success(&output);
    assert_eq!(mock.requests(), 0, "{}", stderr(&output));
    // One call per chunk.
    assert_eq!(
        ws.read("out-chunks/data.jsonl").lines().count(),
        calls,
        "{}",
        stderr(&output)
    );
    assert_eq!(ws.read("out/train.jsonl"), first);
}

#[test]
fn later_stages_fed_over_many_batches_keep_document_order() {
    // 40 documents: the streamed later stages read them back in batches of 16, on reader
    // threads a few batches ahead (several on a machine of three cores or more), and must
    // still see them in document order, as the stages run whole do. The last document
    // repeats the first, so only its own questions are dropped.
    let ws = workspace_with_docs();
    for i in 0..35 {
        let topic = format!("extra{i:02}");
        ws.write(&format!("docs/{topic}.md"), sample_doc(&topic));
    }
    ws.write("docs/zz-copy-of-extra00.md", sample_doc("extra00"));
    let mock = MockLlm::start(Behavior::default());
    let outputs = run_chained_forked_and_whole(&ws, &mock);
    assert_same_outputs(&ws, 120);
    // 40 documents × 3 sections × 3 questions; the copy's 9 are dropped.
    assert_dropped(&outputs, "360 → 351 records (9 duplicates dropped)");
    let before = ws.read("out/train.jsonl") + &ws.read("out/test.jsonl");

    // In a first run the later stages take each document from memory as it is made. After
    // an edit to the first document they take it so, then read the 39 kept ones back.
    ws.write(
        "docs/billing.md",
        format!("{}\nOne more line at the end.\n", sample_doc("billing")),
    );
    mock.reset();
    for file in ["chain.yaml", "whole.yaml"] {
        let output = ws.keg(&["run", file]);
        crate::support::assert_success(&output);
        let summary = stderr(&output);
        assert!(
            summary.contains("39 of 40 documents unchanged since an earlier run: skipped"),
            "{summary}"
        );
    }
    assert_eq!(mock.requests(), 1);
    for name in ["train.jsonl", "test.jsonl", "rejects.jsonl"] {
        assert_eq!(
            ws.read(&format!("out/{name}")),
            ws.read(&format!("out-whole/{name}")),
            "{name}"
        );
    }
    assert_ne!(
        ws.read("out/train.jsonl") + &ws.read("out/test.jsonl"),
        before,
        "the edit changed no row"
    );
}

/// Calls cached before call keys' version 2 (the whole body hashed as one, in `calls-v1`)
/// are still found: an upgrade sends nothing again. Each one found is cached under its new
/// key too, and the next run finds it there.
#[test]
fn calls_cached_under_version_1_keys_are_found_and_kept_under_version_2() {
    let ws = workspace_with_docs();
    let mock = MockLlm::start(Behavior::default());
    ws.run_docs_qa(&mock);
    let before = ws.outputs();
    let bodies = mock.bodies();
    assert_eq!(bodies.len(), 12);

    // The cache as an older `keg` left it: each call under its version 1 key, in
    // `calls-v1`, and nothing else (so the documents are made again, call by call).
    let db = rusqlite::Connection::open(ws.path("cache").join(kegline::cache::DATABASE)).unwrap();
    let endpoint = format!("{}/chat/completions", mock.base_url());
    for body in &bodies {
        let canonical = kegline::record::canonical_json(body);
        let key = kegline::cache::CallKey {
            provider: "openai",
            endpoint: &endpoint,
            body: &canonical,
            messages: kegline::cache::key::messages_in(&canonical, &body["messages"]),
        };
        let (new, old) = (key.digest(), key.digest_v1());
        let moved = db
            .execute(
                "UPDATE keys SET bucket = 'calls-v1', key = ?1 WHERE bucket = 'calls-v2' AND key = ?2",
                [&old.as_bytes()[..], &new.as_bytes()[..]],
            )
            .unwrap();
        assert_eq!(moved, 1, "no call cached under the key of {body}");
        db.execute(
            "UPDATE blobs SET key = ?1 WHERE key = ?2",
            [&old.as_bytes()[..], &new.as_bytes()[..]],
        )
        .unwrap();
    }
    drop(db);
    // Every entry but those of `bucket` deleted.
    let keep_only = |bucket: &str| {
        let db =
            rusqlite::Connection::open(ws.path("cache").join(kegline::cache::DATABASE)).unwrap();
        db.execute(
            "DELETE FROM blobs WHERE id IN (SELECT id FROM keys WHERE bucket != ?1)",
            [bucket],
        )
        .unwrap();
        db.execute("DELETE FROM keys WHERE bucket != ?1", [bucket])
            .unwrap();
    };
    keep_only("calls-v1");
    let buckets = || {
        kegline::cache::DiskStore::stats(&ws.path("cache"))
            .unwrap()
            .into_iter()
            .filter(|(bucket, _, _)| bucket.starts_with("calls-"))
            .map(|(bucket, entries, _)| (bucket, entries))
            .collect::<Vec<_>>()
    };
    assert_eq!(buckets(), [("calls-v1".to_owned(), 12)]);

    mock.reset();
    assert_eq!(to_run(&ws.plan_json(&mock), "pairs"), 0);
    // `keg plan` writes nothing.
    assert_eq!(buckets(), [("calls-v1".to_owned(), 12)]);
    let output = ws.run_docs_qa(&mock);
    assert_eq!(mock.requests(), 0, "{}", stderr(&output));
    assert!(
        stderr(&output).contains("12 calls: 0 sent, 12 cached"),
        "{}",
        stderr(&output)
    );
    assert_eq!(ws.outputs(), before);
    assert_eq!(
        buckets(),
        [("calls-v1".to_owned(), 12), ("calls-v2".to_owned(), 12)]
    );

    // Found under version 2 now: the old entries are not needed.
    keep_only("calls-v2");
    mock.reset();
    let output = ws.run_docs_qa(&mock);
    assert_eq!(mock.requests(), 0, "{}", stderr(&output));
    assert_eq!(ws.outputs(), before);
}
