//! Bad pipelines: every error at once, each with `file:line:col`, the offending line, a
//! hint, and exit code 2 — before anything runs.

use crate::mock::{Behavior, MockLlm};
use crate::support::{Workspace, repo, sample_doc, stderr};

const BAD: &str = r#"version: 1
name: bad
vars:
  docs: d
providers:
  llm:
    kind: openai
    base_url: http://127.0.0.1:9/v1
    modle: m
stages:
  docs:
    kind: load
    paths: ["${doc}/*.md"]
  chunks:
    kind: chnk
    inputs: [docs]
  prompts:
    kind: prompt
    inputs: [chunkz]
    user: "{{ text }"
  pairs:
    kind: generate
    inputs: [prompts, loop]
    provider: llm
    tempurature: 3
  loop:
    kind: dedupe
    inputs: [pairs]
"#;

#[test]
fn validate_reports_every_error_with_its_position() {
    let ws = Workspace::new();
    ws.write("bad.yaml", BAD);
    let output = ws.keg(&["validate", "bad.yaml"]);
    assert_eq!(output.status.code(), Some(2));
    let expected = r#"error: bad.yaml:9:5: provider `llm`: unknown field `modle`
  |
9 |     modle: m
  |     ^
  hint: did you mean `model`? valid fields: `kind`, `base_url`, `model`, `api_key_env`, `headers`, `concurrency`, `requests_per_minute`, `tokens_per_minute`, `temperature`, `top_p`, `max_tokens`, `seed`, `num_ctx`, `keep_alive`, `timeout_secs`, `max_retries`, `retry_delay_ms`
error: bad.yaml:13:13: undefined var `doc`
   |
13 |     paths: ["${doc}/*.md"]
   |             ^
  hint: did you mean `docs`? valid vars: `docs`; declare it under `vars:` or pass `--set doc=…`
error: bad.yaml:15:11: unknown stage kind `chnk`
   |
15 |     kind: chnk
   |           ^
  hint: did you mean `chunk`? valid kinds: `load`, `chunk`, `prompt`, `generate`, `dedupe`, `validate`, `split`, `export`
error: bad.yaml:19:14: stage `prompts` reads `chunkz`, which is not a stage
   |
19 |     inputs: [chunkz]
   |              ^
  hint: did you mean `chunks`? valid stages: `docs`, `chunks`, `prompts`, `pairs`, `loop`
error: bad.yaml:20:11: stage `prompts`: bad.yaml#prompts.user:1: syntax error: unexpected `}`, expected end of variable block (in `}`)
   |
20 |     user: "{{ text }"
   |           ^
error: bad.yaml:23:14: stages `pairs`, `loop` read each other in a cycle
   |
23 |     inputs: [prompts, loop]
   |              ^
  hint: a stage can only read stages that do not depend on it
error: bad.yaml:25:5: stage `pairs`: unknown field `tempurature`
   |
25 |     tempurature: 3
   |     ^
  hint: valid fields: `provider`, `schema`, `items_field`, `max_tokens`, `tokens_per_item`, `reasks`, `length_retries`
7 errors in the pipeline; nothing was run
"#;
    assert_eq!(stderr(&output), expected);
    assert!(output.stdout.is_empty());
}

#[test]
fn run_refuses_a_bad_pipeline_without_sending_or_writing() {
    let ws = Workspace::new();
    let mock = MockLlm::start(Behavior::default());
    ws.write("docs/a.md", sample_doc("alpha"));
    let pipeline = std::fs::read_to_string(repo("pipelines/docs-qa.yaml"))
        .unwrap()
        .replace(
            "templates: [../templates]",
            &format!("templates: [{}]", repo("templates").display()),
        )
        .replace("../schemas/", &format!("{}/", repo("schemas").display()))
        .replace(
            "    strategy: markdown\n",
            "    strategy: markdown\n    chunk_size: 5\n",
        );
    ws.write("p.yaml", pipeline);
    let output = ws.keg(&[
        "run",
        "p.yaml",
        "--set",
        "docs=docs",
        "--set",
        &format!("base_url={}", mock.base_url()),
    ]);
    assert_eq!(output.status.code(), Some(2));
    let err = stderr(&output);
    assert!(
        err.starts_with("error: p.yaml:45:5: stage `chunks`: unknown field `chunk_size`\n"),
        "{err}"
    );
    assert!(
        err.contains("hint: valid fields: `strategy`, `max_chars`, `overlap`, `field`"),
        "{err}"
    );
    assert_eq!(mock.requests(), 0);
    assert!(!ws.path("out").exists());
}

#[test]
fn yaml_syntax_errors_have_positions() {
    let ws = Workspace::new();
    ws.write(
        "p.yaml",
        "version: 1\nstages:\n  a:\n    kind: load\n   paths: [x\n",
    );
    let output = ws.keg(&["validate", "p.yaml"]);
    assert_eq!(output.status.code(), Some(2));
    let err = stderr(&output);
    assert!(err.starts_with("error: p.yaml:5:"), "{err}");
    assert!(err.contains("invalid YAML"), "{err}");
}

#[test]
fn unknown_set_names_and_missing_files_are_usage_errors() {
    let ws = Workspace::new();
    let output = ws.keg(&[
        "validate",
        &repo("pipelines/docs-qa.yaml").display().to_string(),
        "--set",
        "doc=x",
    ]);
    assert_eq!(output.status.code(), Some(2));
    let err = stderr(&output);
    assert!(
        err.contains("error: --set: `--set doc=…` names a var that"),
        "{err}"
    );
    assert!(err.contains("did you mean `docs`?"), "{err}");

    let output = ws.keg(&["validate", "nope.yaml"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).starts_with("error: nope.yaml: cannot read the pipeline file"));

    let output = ws.keg(&["run", "x.yaml", "--set", "novalue"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("expected NAME=VALUE"));
}

#[test]
fn template_errors_name_template_and_line() {
    let ws = Workspace::new();
    ws.write("templates/broken.j2", "Passage:\n{% if %}\n");
    ws.write("templates/typo.j2", "Passage:\n{{ txet }}\n");
    ws.write("docs/a.md", sample_doc("alpha"));
    let pipeline = |template: &str| {
        format!(
            "version: 1\nproviders:\n  llm: {{kind: openai, base_url: 'http://127.0.0.1:9/v1', model: m}}\nstages:\n  docs: {{kind: load, paths: [docs]}}\n  prompts:\n    kind: prompt\n    inputs: [docs]\n    user_template: {template}\n"
        )
    };
    ws.write("broken.yaml", pipeline("broken.j2"));
    let output = ws.keg(&["validate", "broken.yaml"]);
    assert_eq!(output.status.code(), Some(2));
    let err = stderr(&output);
    assert!(
        err.starts_with("error: broken.yaml:9:20: stage `prompts`: broken.j2:2: syntax error"),
        "{err}"
    );

    // An undefined variable is known only when a record is rendered: the run fails (exit 1)
    // naming template and line, and writes nothing.
    ws.write("typo.yaml", pipeline("typo.j2"));
    let output = ws.keg(&["run", "typo.yaml"]);
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert!(
        err.contains("error: stage `prompts`: template typo.j2:2: undefined value"),
        "{err}"
    );
}
