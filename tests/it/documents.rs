//! Bad documents are skipped by a documented rule and named in the summary; they never
//! become rows and never stop the run.

use crate::mock::{Behavior, MockLlm};
use crate::support::{Workspace, sample_doc, stderr};

#[test]
fn empty_binary_and_non_utf8_files_are_skipped_and_reported() {
    let ws = Workspace::new();
    ws.write("docs/good.md", sample_doc("good"));
    ws.write("docs/empty.md", "\n  \n");
    ws.write("docs/binary.md", b"PK\x03\x04\0\0binary");
    ws.write("docs/latin1.txt", b"caf\xe9 au lait");
    ws.write(
        "docs/notes.txt",
        "Plain text notes about the good system, long enough to ask about.",
    );
    let mock = MockLlm::start(Behavior::default());
    let output = ws.run_docs_qa(&mock);
    let err = stderr(&output);
    assert!(err.contains("2 documents (3 skipped)"), "{err}");
    assert!(
        err.contains("warning: skipped docs/binary.md: binary file (it contains NUL bytes)"),
        "{err}"
    );
    assert!(
        err.contains("warning: skipped docs/empty.md: empty file"),
        "{err}"
    );
    assert!(
        err.contains("warning: skipped docs/latin1.txt: not valid UTF-8 (at byte 3)"),
        "{err}"
    );
    // good.md has 3 chunks, notes.txt 1.
    assert_eq!(mock.requests(), 4);
    let manifest: serde_json::Value = serde_json::from_str(&ws.read("out/manifest.json")).unwrap();
    let docs: Vec<&String> = manifest["documents"].as_object().unwrap().keys().collect();
    assert_eq!(docs, ["good.md", "notes.txt"]);
}

#[test]
fn no_documents_at_all_is_an_error_that_writes_nothing() {
    let ws = Workspace::new();
    ws.write("docs/empty.md", "");
    let mock = MockLlm::start(Behavior::default());
    let args = ws.docs_qa_args(&mock, "run");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = ws.keg(&args);
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert!(
        err.contains(
            "error: stage `docs`: no documents to load from `docs/**/*.{md,markdown,txt}`"
        ),
        "{err}"
    );
    assert!(!ws.path("out").exists());
    assert_eq!(mock.requests(), 0);
}
