//! A run killed with SIGKILL loses no finished call: the next run sends only the rest.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::mock::{Behavior, MockLlm};
use crate::support::{Workspace, assert_success, sample_doc, stderr};

/// Calls committed to the cache database, read as another process would.
fn cached_calls(ws: &Workspace) -> usize {
    kegline::cache::DiskStore::stats(&ws.path("cache"))
        .unwrap()
        .into_iter()
        .filter(|(bucket, _, _)| bucket == "calls-v2")
        .map(|(_, entries, _)| entries as usize)
        .sum()
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
    let mut child = ws.spawn_keg(&args);
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

#[test]
fn ctrl_c_lets_calls_in_flight_finish_caches_them_and_writes_nothing() {
    let ws = Workspace::new();
    for topic in ["a", "b", "c", "d", "e", "f"] {
        ws.write(&format!("docs/{topic}.md"), sample_doc(topic));
    }
    let mock = MockLlm::start(Behavior {
        latency: Duration::from_millis(400),
        ..Behavior::default()
    });
    let mut args = ws.docs_qa_args(&mock, "run");
    args.extend(["--set".to_owned(), "concurrency=2".to_owned()]);
    let child = ws.spawn_keg(&args);
    let deadline = Instant::now() + Duration::from_secs(30);
    while mock.requests() < 3 {
        assert!(Instant::now() < deadline, "no progress");
        std::thread::sleep(Duration::from_millis(10));
    }
    let sent_before = mock.requests();
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(130), "{}", stderr(&output));
    // No call starts after the signal beyond one racing it per slot (concurrency 2).
    assert!(
        mock.requests() <= sent_before + 2,
        "{} after {sent_before}",
        mock.requests()
    );
    assert!(mock.requests() < 18, "the run went on to the end");
    let err = stderr(&output);
    assert!(err.contains("stopping after the calls in flight"), "{err}");
    assert!(
        err.contains("interrupted: finished calls are cached; no output file was written"),
        "{err}"
    );
    assert!(!ws.path("out").exists());
    // Every request that was sent finished and was cached: none is paid for twice.
    let sent = mock.requests();
    assert_eq!(cached_calls(&ws), sent);
    mock.reset();
    ws.run_docs_qa(&mock);
    assert_eq!(mock.requests(), 18 - sent);
}

#[test]
fn two_runs_sharing_one_cache_at_once_do_not_corrupt_it() {
    let ws = Workspace::new();
    for topic in ["a", "b", "c", "d"] {
        ws.write(&format!("docs/{topic}.md"), sample_doc(topic));
    }
    let mock = MockLlm::start(Behavior {
        latency: Duration::from_millis(30),
        jitter: Duration::from_millis(30),
        ..Behavior::default()
    });
    let spawn = |out: &str| {
        let mut args = ws.docs_qa_args(&mock, "run");
        args.extend(["--set".to_owned(), format!("out={out}")]);
        ws.spawn_keg(&args)
    };
    let (a, b) = (spawn("out-a"), spawn("out-b"));
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success(), "{}", stderr(&a));
    assert!(b.status.success(), "{}", stderr(&b));
    for name in ["train.jsonl", "valid.jsonl", "test.jsonl", "rejects.jsonl"] {
        assert_eq!(
            std::fs::read(ws.path(&format!("out-a/{name}"))).unwrap(),
            std::fs::read(ws.path(&format!("out-b/{name}"))).unwrap(),
            "{name}"
        );
    }
    assert_eq!(cached_calls(&ws), 12);
    mock.reset();
    ws.run_docs_qa(&mock);
    assert_eq!(mock.requests(), 0);
    assert_eq!(
        std::fs::read(ws.path("out/train.jsonl")).unwrap(),
        std::fs::read(ws.path("out-a/train.jsonl")).unwrap()
    );
}

/// The temp files in `out` that outputs are written to before being renamed into place.
fn temp_files(ws: &Workspace) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(ws.path("out")) else {
        return Vec::new();
    };
    entries
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(".keg-tmp"))
        .collect()
}

/// A workspace of 30 documents, and the arguments of a run against `mock` that asks about
/// 50 pairs a call, so that `train.jsonl` outgrows export's buffer (256 KB) and is written to
/// its temp file while later documents are still waiting for their calls.
fn many_pairs(mock: &MockLlm) -> (Workspace, Vec<String>) {
    let ws = Workspace::new();
    for i in 0..30 {
        ws.write(
            &format!("docs/topic{i:02}.md"),
            sample_doc(&format!("topic{i:02}")),
        );
    }
    let mut args = ws.docs_qa_args(mock, "run");
    for set in ["concurrency=2", "pairs_per_1000_chars=200"] {
        args.extend(["--set".to_owned(), set.to_owned()]);
    }
    (ws, args)
}

/// Start a run, wait until it writes an output's temp file, and kill it with SIGKILL, which
/// gives it no chance to remove the file; check that the file is left, alone.
fn kill_while_writing(ws: &Workspace, args: &[String]) {
    let mut child = ws.spawn_keg(args);
    let deadline = Instant::now() + Duration::from_secs(60);
    while temp_files(ws).is_empty() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before writing a temp file"
        );
        assert!(Instant::now() < deadline, "no temp file was made");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let left = temp_files(ws);
    assert_eq!(left.len(), 1, "{left:?}");
}

/// A mock that answers after 30 ms, so that a run's calls outlast its first output bytes.
fn slow_mock() -> MockLlm {
    MockLlm::start(Behavior {
        latency: Duration::from_millis(30),
        ..Behavior::default()
    })
}

#[test]
fn the_temp_file_a_killed_run_was_writing_is_removed_by_the_next_run() {
    let mock = slow_mock();
    let (ws, args) = many_pairs(&mock);
    kill_while_writing(&ws, &args);
    assert!(!ws.path("out/train.jsonl").exists());

    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = ws.keg(&args);
    assert_success(&output);
    let err = stderr(&output);
    assert!(
        err.contains("removed 1 temp file left in out by a run that was killed"),
        "{err}"
    );
    assert_eq!(temp_files(&ws), Vec::<String>::new());
    let rows = ws.read("out/train.jsonl").lines().count()
        + ws.read("out/valid.jsonl").lines().count()
        + ws.read("out/test.jsonl").lines().count();
    assert!(rows > 4_000, "{rows} rows");

    // The next run finds the outputs as written and skips export: it does not tell it again.
    let output = ws.keg(&args);
    assert_success(&output);
    let err = stderr(&output);
    assert!(err.contains("unchanged out/train.jsonl"), "{err}");
    assert!(!err.contains("temp file"), "{err}");
}

const OUTPUTS: [&str; 5] = [
    "out/train.jsonl",
    "out/valid.jsonl",
    "out/test.jsonl",
    "out/rejects.jsonl",
    "out/manifest.json",
];

#[test]
fn a_run_that_leaves_the_outputs_as_they_were_still_removes_a_killed_runs_temp_file() {
    let mock = slow_mock();
    let (ws, args) = many_pairs(&mock);
    let first: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_success(&ws.keg(&first));
    let outputs = OUTPUTS.map(|name| ws.read(name));

    // Another model: every call is new, and the run is killed while writing the outputs.
    let mut other = args.clone();
    let model = other.iter().position(|a| a == "model=m").unwrap();
    other[model] = "model=m2".to_owned();
    kill_while_writing(&ws, &other);

    // Back to the first model: every document and the later stages' files are as the first
    // run left them, so export is skipped; the temp file goes all the same.
    let output = ws.keg(&first);
    assert_success(&output);
    let err = stderr(&output);
    assert!(err.contains("unchanged out/train.jsonl"), "{err}");
    assert!(
        err.contains("removed 1 temp file left in out by a run that was killed"),
        "{err}"
    );
    assert_eq!(temp_files(&ws), Vec::<String>::new());
    let now = OUTPUTS.map(|name| ws.read(name));
    assert!(outputs == now, "the outputs changed");
}
