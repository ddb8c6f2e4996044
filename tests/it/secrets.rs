//! API keys come from the environment, go out in a header, and are written nowhere.

use crate::mock::{Behavior, MockLlm};
use crate::support::{Workspace, sample_doc, stderr};

const KEY: &str = "sk-test-7f3a9c1e5b2d4a6c";

fn files_containing(dir: &std::path::Path, needle: &[u8]) -> Vec<String> {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .filter(|e| {
            std::fs::read(e.path())
                .map(|b| b.windows(needle.len()).any(|w| w == needle))
                .unwrap_or(false)
        })
        .map(|e| e.path().display().to_string())
        .collect()
}

#[test]
fn the_key_is_sent_as_a_bearer_header_and_written_nowhere() {
    let ws = Workspace::new();
    ws.write("docs/a.md", sample_doc("alpha"));
    let mock = MockLlm::start(Behavior::default());
    let args = ws.docs_qa_args(&mock, "run");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = ws.keg_with_env(&args, &[("OPENAI_API_KEY", KEY)]);
    assert!(output.status.success(), "{}", stderr(&output));
    let headers = mock.auth_headers();
    assert_eq!(headers.len(), 3);
    assert!(
        headers
            .iter()
            .all(|h| h.as_deref() == Some(&format!("Bearer {KEY}")[..]))
    );
    assert_eq!(
        files_containing(ws.dir.path(), KEY.as_bytes()),
        Vec::<String>::new()
    );
    assert!(!stderr(&output).contains(KEY));
    assert!(!String::from_utf8_lossy(&output.stdout).contains(KEY));

    // A different key hits the same cache: keys are not part of cache keys.
    mock.reset();
    let output = ws.keg_with_env(&args, &[("OPENAI_API_KEY", "sk-other")]);
    assert!(output.status.success());
    assert_eq!(mock.requests(), 0);
}

#[test]
fn without_the_variable_no_authorization_is_sent() {
    let ws = Workspace::new();
    ws.write("docs/a.md", sample_doc("alpha"));
    let mock = MockLlm::start(Behavior::default());
    ws.run_docs_qa(&mock);
    assert_eq!(mock.auth_headers(), vec![None, None, None]);
}
