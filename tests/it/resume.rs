//! A run killed with SIGKILL loses no finished call: the next run sends only the rest.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::mock::{Behavior, MockLlm};
use crate::support::{Workspace, sample_doc, stderr};

fn cached_calls(ws: &Workspace) -> usize {
    walkdir::WalkDir::new(ws.path("cache/calls-v1"))
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file() && !e.file_name().to_string_lossy().starts_with(".tmp"))
        .count()
}

#[test]
fn sigkill_mid_run_then_rerun_sends_only_unfinished_calls() {
    let ws = Workspace::new();
    for topic in ["a", "b", "c", "d", "e", "f"] {
        ws.write(&format!("docs/{topic}.md"), sample_doc(topic));
    }
    let total = 18;
    let mock = MockLlm::start(Behavior {
        latency: Duration::from_millis(250),
        ..Behavior::default()
    });
    let mut args = ws.docs_qa_args(&mock, "run");
    args.extend(["--set".to_owned(), "concurrency=2".to_owned()]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_keg"))
        .args(&args)
        .current_dir(ws.dir.path())
        .env("KEG_CACHE_DIR", ws.path("cache"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while cached_calls(&ws) < 5 {
        assert!(Instant::now() < deadline, "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let finished = cached_calls(&ws);
    assert!(finished < total, "the run finished before it was killed");
    assert!(
        !ws.path("out").exists(),
        "a killed run must leave no output"
    );

    mock.reset();
    let output = ws.run_docs_qa(&mock);
    assert_eq!(mock.requests(), total - finished, "{}", stderr(&output));
    assert!(stderr(&output).contains(&format!(
        "{total} calls: {} sent, {finished} cached",
        total - finished
    )));
}
