//! Providers end to end: each wire format with the shipped pipeline, retries through every
//! kind of fault, fatal answers stopping the run, the adaptive window and the per-minute
//! limits, and keys that never leave the process.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::faults_support::{
    Kind, assert_ok, dataset_bytes, dataset_rows, docs_workspace, file_count, files_containing,
    many_docs_workspace, rejects, retries_in, run_shipped, run_with, shipped,
    shipped_with_provider_fields,
};
use crate::mock::{Api, Behavior, Faults, MockLlm, RetryAfter, last_user_text, parse_item_count};
use crate::support::{Workspace, repo, stderr};

/// The JSON Schema the shipped pipeline sends.
fn qa_schema() -> Value {
    let text = std::fs::read_to_string(repo("schemas/qa-pairs.schema.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The pairs every call asked for: what a complete dataset holds.
fn asked(mock: &MockLlm) -> usize {
    let mut users: Vec<String> = mock.bodies().iter().map(last_user_text).collect();
    users.sort();
    users.dedup();
    users
        .iter()
        .map(|u| parse_item_count(u).expect("the prompt names a count"))
        .sum()
}

/// The split files of a fault-free run of the shipped pipeline as `kind`.
fn clean_dataset(kind: Kind) -> Vec<Vec<u8>> {
    let ws = docs_workspace();
    let mock = MockLlm::start(Behavior::default());
    assert_ok(&run_shipped(&ws, &mock, kind, &[]));
    dataset_bytes(&ws)
}

fn summary_has(output: &std::process::Output, text: &str) {
    let err = stderr(output);
    assert!(err.contains(text), "no `{text}` in:\n{err}");
}

#[test]
fn ollama_native_chat_end_to_end() {
    let ws = docs_workspace();
    let mock = MockLlm::start(Behavior::default());
    let output = run_shipped(&ws, &mock, Kind::Ollama, &[]);
    assert_ok(&output);
    assert_eq!(mock.requests_to(Api::Ollama), 12);
    assert_eq!(mock.requests(), 12, "nothing went to another endpoint");
    summary_has(&output, "12 calls: 12 sent, 0 cached");
    assert_eq!(dataset_rows(&ws), asked(&mock));
    assert!(rejects(&ws).is_empty());

    let schema = qa_schema();
    let system = std::fs::read_to_string(repo("templates/qa/system.j2")).unwrap();
    for body in mock.bodies() {
        let user = last_user_text(&body);
        let items = parse_item_count(&user).unwrap() as u64;
        assert_eq!(body["model"], "m");
        assert_eq!(body["stream"], false);
        assert_eq!(body["format"], schema);
        assert_eq!(
            body["options"],
            json!({"temperature": 0.7, "seed": 1, "num_predict": (64 + 120 * items).min(2048)})
        );
        let roles: Vec<&str> = body["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["role"].as_str().unwrap())
            .collect();
        assert_eq!(roles, ["system", "user"]);
        // The shipped system template is text alone: the same message in every request.
        assert_eq!(body["messages"][0]["content"], system.trim());
        assert!(body.get("keep_alive").is_none());
        assert!(body.get("response_format").is_none());
    }
    assert_eq!(mock.auth_headers(), vec![None; 12]);
    // Re-running sends nothing.
    mock.reset();
    assert_ok(&run_shipped(&ws, &mock, Kind::Ollama, &[]));
    assert_eq!(mock.requests(), 0);
}

#[test]
fn ollama_without_a_base_url_reads_ollama_host_and_sends_keep_alive() {
    let ws = docs_workspace();
    let mock = MockLlm::start(Behavior::default());
    let pipeline = shipped_with_provider_fields(&ws, &["keep_alive: 10m", "num_ctx: 8192"]);
    let output = run_with(
        &ws,
        &pipeline,
        &mock,
        Kind::Ollama,
        &[("base_url", "")],
        &[("OLLAMA_HOST", &mock.host_port())],
    );
    assert_ok(&output);
    assert_eq!(mock.requests_to(Api::Ollama), 12);
    for body in mock.bodies() {
        assert_eq!(body["keep_alive"], "10m");
        assert_eq!(body["options"]["num_ctx"], 8192);
    }
    let manifest: Value = serde_json::from_str(&ws.read("out/manifest.json")).unwrap();
    assert_eq!(
        manifest["models"][0]["base_url"],
        format!("http://{}", mock.host_port())
    );
    // keep_alive is not part of the cache key: changing it sends nothing.
    let pipeline = shipped_with_provider_fields(&ws, &["keep_alive: 1h", "num_ctx: 8192"]);
    mock.reset();
    let output = run_with(
        &ws,
        &pipeline,
        &mock,
        Kind::Ollama,
        &[("base_url", "")],
        &[("OLLAMA_HOST", &mock.host_port())],
    );
    assert_ok(&output);
    assert_eq!(mock.requests(), 0, "{}", stderr(&output));
}

#[test]
fn anthropic_messages_end_to_end() {
    let ws = docs_workspace();
    let mock = MockLlm::start(Behavior::default());
    let key = "sk-ant-test-4f1e9c";
    let output = run_with(
        &ws,
        &shipped(),
        &mock,
        Kind::Anthropic,
        &[],
        &[("ANTHROPIC_API_KEY", key)],
    );
    assert_ok(&output);
    assert_eq!(mock.requests_to(Api::Anthropic), 12);
    assert_eq!(mock.requests(), 12);
    summary_has(&output, "12 calls: 12 sent, 0 cached");
    assert_eq!(dataset_rows(&ws), asked(&mock));
    assert!(rejects(&ws).is_empty());

    assert_eq!(mock.header("x-api-key"), vec![Some(key.to_owned()); 12]);
    assert_eq!(
        mock.header("anthropic-version"),
        vec![Some("2023-06-01".to_owned()); 12]
    );
    assert_eq!(mock.auth_headers(), vec![None; 12], "no bearer token");
    let system = std::fs::read_to_string(repo("templates/qa/system.j2")).unwrap();
    let schema = qa_schema();
    for body in mock.bodies() {
        let user = last_user_text(&body);
        let items = parse_item_count(&user).unwrap() as u64;
        assert_eq!(body["model"], "m");
        assert_eq!(body["system"].as_str().unwrap().trim(), system.trim());
        let messages = body["messages"].as_array().unwrap();
        assert_eq!(messages.len(), 1);
        assert_eq!(messages[0]["role"], "user");
        assert_eq!(body["max_tokens"], (64 + 120 * items).min(2048));
        assert_eq!(body["temperature"], 0.7);
        assert!(body.get("seed").is_none(), "the Messages API has no seed");
        assert_eq!(body["tools"].as_array().unwrap().len(), 1);
        assert_eq!(body["tools"][0]["name"], "output");
        assert_eq!(body["tools"][0]["input_schema"], schema);
        assert_eq!(
            body["tool_choice"],
            json!({"type": "tool", "name": "output"})
        );
    }
    // The same pairs as over the other wire formats: the content is the tool input.
    assert_eq!(dataset_bytes(&ws), clean_dataset(Kind::OpenAi));
}

#[test]
fn openai_sends_the_configured_headers_and_the_key_as_a_bearer_token() {
    let ws = docs_workspace();
    let mock = MockLlm::start(Behavior::default());
    let pipeline = shipped_with_provider_fields(
        &ws,
        &["headers: {HTTP-Referer: https://example.org/keg, X-Title: keg docs-qa}"],
    );
    let output = run_with(
        &ws,
        &pipeline,
        &mock,
        Kind::OpenAi,
        &[("api_key_env", "OPENROUTER_API_KEY")],
        &[("OPENROUTER_API_KEY", "sk-or-test-77")],
    );
    assert_ok(&output);
    assert_eq!(mock.requests_to(Api::OpenAi), 12);
    assert_eq!(
        mock.header("http-referer"),
        vec![Some("https://example.org/keg".to_owned()); 12]
    );
    assert_eq!(
        mock.header("x-title"),
        vec![Some("keg docs-qa".to_owned()); 12]
    );
    assert_eq!(
        mock.auth_headers(),
        vec![Some("Bearer sk-or-test-77".to_owned()); 12]
    );
}

#[test]
fn a_credential_in_headers_is_refused_with_its_location() {
    let ws = docs_workspace();
    let mock = MockLlm::start(Behavior::default());
    let pipeline = shipped_with_provider_fields(&ws, &["headers: {Authorization: Bearer sk-1}"]);
    let output = run_with(&ws, &pipeline, &mock, Kind::OpenAi, &[], &[]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let err = stderr(&output);
    assert!(err.contains("pipeline.yaml:"), "{err}");
    assert!(
        err.contains("header `Authorization` carries a credential"),
        "{err}"
    );
    assert_eq!(mock.requests(), 0);
}

#[test]
fn rate_limits_are_retried_and_counted() {
    let clean = clean_dataset(Kind::OpenAi);
    let faults = Faults {
        rate_limit: 0.5,
        retry_after: RetryAfter::Seconds(0),
        ..Faults::default()
    };
    let ws = docs_workspace();
    let mock = MockLlm::start(Behavior {
        faults: faults.clone(),
        ..Behavior::default()
    });
    let output = run_shipped(&ws, &mock, Kind::OpenAi, &[]);
    assert_ok(&output);
    let limited = mock.injected_count("rate_limit");
    // Which calls meet a 429 is a function of their messages: count them independently.
    let mut users: Vec<String> = mock.bodies().iter().map(last_user_text).collect();
    users.sort();
    users.dedup();
    assert_eq!(users.len(), 12);
    let picked = users.iter().filter(|u| faults.pick(u).is_some()).count();
    assert_eq!(limited, picked);
    assert!((1..12).contains(&limited), "{limited} of 12 limited");
    assert_eq!(mock.requests(), 12 + limited);
    eprintln!(
        "rate limits: 12 calls, {limited} answered 429, {} requests",
        mock.requests()
    );
    assert_eq!(retries_in(&output), limited);
    summary_has(
        &output,
        &format!("12 calls: 12 sent, 0 cached, {limited} retries"),
    );
    assert_eq!(dataset_bytes(&ws), clean, "the dataset is complete");
    assert!(rejects(&ws).is_empty());
}

#[test]
fn retry_after_is_honoured_in_seconds_dates_and_milliseconds() {
    for retry_after in [
        RetryAfter::Seconds(1),
        RetryAfter::Date(2),
        RetryAfter::Millis(1000),
    ] {
        let ws = docs_workspace();
        let mock = MockLlm::start(Behavior {
            faults: Faults {
                rate_limit: 0.25,
                retry_after,
                ..Faults::default()
            },
            ..Behavior::default()
        });
        // Backoff alone would wait 10–15 ms: a wait of a second is the server's.
        let pipeline = shipped_with_provider_fields(&ws, &["retry_delay_ms: 10"]);
        let started = Instant::now();
        let output = run_with(&ws, &pipeline, &mock, Kind::OpenAi, &[], &[]);
        let elapsed = started.elapsed();
        assert_ok(&output);
        eprintln!("{retry_after:?}: run took {elapsed:?}");
        let limited = mock.injected_count("rate_limit");
        assert!(limited > 0, "{retry_after:?}: no 429 sent");
        assert_eq!(retries_in(&output), limited);
        assert_eq!(mock.requests(), 12 + limited);
        assert!(
            elapsed >= Duration::from_millis(950),
            "{retry_after:?}: the run took only {elapsed:?}"
        );
        assert!(
            elapsed < Duration::from_secs(15),
            "{retry_after:?}: {elapsed:?}"
        );
    }
}

#[test]
fn server_errors_resets_and_timeouts_are_retried() {
    let ws = many_docs_workspace(10);
    let mock = MockLlm::start(Behavior {
        faults: Faults {
            server_error: 0.25,
            reset: 0.25,
            slow: 0.2,
            slow_delay: Duration::from_secs(4),
            times: 2,
            ..Faults::default()
        },
        ..Behavior::default()
    });
    let pipeline = shipped_with_provider_fields(&ws, &["retry_delay_ms: 5", "timeout_secs: 1"]);
    let output = run_with(&ws, &pipeline, &mock, Kind::OpenAi, &[], &[]);
    assert_ok(&output);
    let injected = mock.injected();
    for fault in ["server_error", "reset", "slow"] {
        assert!(
            injected.get(fault).copied().unwrap_or(0) >= 2,
            "no {fault}: {injected:?}"
        );
    }
    // Each picked call fails twice, then succeeds: one retry per injected fault.
    let total: usize = injected.values().sum();
    eprintln!(
        "transient faults: 30 calls, {injected:?}, {} requests",
        mock.requests()
    );
    assert_eq!(total % 2, 0, "{injected:?}");
    assert_eq!(mock.requests(), 30 + total, "{injected:?}");
    assert_eq!(retries_in(&output), total, "{injected:?}");
    assert_eq!(dataset_rows(&ws), asked(&mock), "the dataset is complete");
    assert!(rejects(&ws).is_empty());
}

#[test]
fn a_call_that_keeps_failing_is_given_up_and_rejected_with_the_reason() {
    let ws = docs_workspace();
    let mock = MockLlm::start(Behavior {
        faults: Faults {
            server_error: 0.3,
            times: usize::MAX,
            ..Faults::default()
        },
        ..Behavior::default()
    });
    let pipeline = shipped_with_provider_fields(&ws, &["retry_delay_ms: 5", "max_retries: 2"]);
    let output = run_with(&ws, &pipeline, &mock, Kind::OpenAi, &[], &[]);
    assert_ok(&output);
    let failed = mock.injected_count("server_error") / 3;
    assert!(failed > 0);
    eprintln!(
        "give up: 12 calls, {failed} always 500, {} requests",
        mock.requests()
    );
    assert_eq!(mock.injected_count("server_error"), 3 * failed);
    assert_eq!(mock.requests(), 12 + 2 * failed);
    assert_eq!(
        retries_in(&output),
        2 * failed,
        "retries of calls that gave up count too"
    );
    let rejects = rejects(&ws);
    assert_eq!(rejects.len(), failed);
    for reject in &rejects {
        assert_eq!(
            reject["reason"], "the call failed after 3 attempts: HTTP 500: mock server error",
            "{reject}"
        );
    }
    summary_has(&output, &format!("{failed} rejected"));
}

#[test]
fn provider_settings_that_change_answers_rerun_documents_and_pacing_does_not() {
    let ws = docs_workspace();
    let mock = MockLlm::start(Behavior::default());
    let plain = shipped_with_provider_fields(&ws, &[]);
    assert_ok(&run_with(&ws, &plain, &mock, Kind::OpenAi, &[], &[]));
    assert_eq!(mock.requests(), 12);
    // Pacing: the same answers, so every document is kept.
    let output = run_with(
        &ws,
        &plain,
        &mock,
        Kind::OpenAi,
        &[("concurrency", "3")],
        &[],
    );
    assert_ok(&output);
    assert_eq!(mock.requests(), 12);
    summary_has(&output, "documents unchanged since an earlier run: skipped");
    // A lower token cap (not part of the provider's identity in the manifest) changes every
    // request.
    let text = ws.read("pipeline.yaml");
    assert!(text.contains("max_tokens: 2048"));
    ws.write(
        "capped.yaml",
        text.replace("max_tokens: 2048", "max_tokens: 100"),
    );
    let output = run_with(&ws, &ws.path("capped.yaml"), &mock, Kind::OpenAi, &[], &[]);
    assert_ok(&output);
    assert_eq!(mock.requests(), 24);
    assert!(mock.bodies()[12..].iter().all(|b| b["max_tokens"] == 100));
}

#[test]
fn calls_that_gave_up_are_sent_again_by_the_next_run() {
    let ws = docs_workspace();
    // Each picked message fails its first 3 attempts: the first run gives up on it after
    // 1 + 2 retries, the next run's attempt gets through.
    let mock = MockLlm::start(Behavior {
        faults: Faults {
            server_error: 0.3,
            times: 3,
            ..Faults::default()
        },
        ..Behavior::default()
    });
    let pipeline = shipped_with_provider_fields(&ws, &["retry_delay_ms: 5", "max_retries: 2"]);
    let output = run_with(&ws, &pipeline, &mock, Kind::OpenAi, &[], &[]);
    assert_ok(&output);
    let failed = rejects(&ws).len();
    assert!(failed > 0);
    // Not `mock.reset()`: that would also forget how often each message failed.
    let before = mock.requests();
    let output = run_with(&ws, &pipeline, &mock, Kind::OpenAi, &[], &[]);
    assert_ok(&output);
    assert_eq!(
        mock.requests() - before,
        failed,
        "only the calls that gave up"
    );
    assert!(rejects(&ws).is_empty());
    summary_has(
        &output,
        &format!("12 calls: {failed} sent, {} cached", 12 - failed),
    );
}

#[test]
fn bad_replies_land_in_rejects_for_every_provider() {
    for kind in Kind::ALL {
        let ws = many_docs_workspace(10);
        let mock = MockLlm::start(Behavior {
            faults: Faults {
                malformed: 0.25,
                truncated: 0.25,
                ..Faults::default()
            },
            ..Behavior::default()
        });
        let output = run_shipped(&ws, &mock, kind, &[]);
        assert_ok(&output);
        let (malformed, truncated) = (
            mock.injected_count("malformed"),
            mock.injected_count("truncated"),
        );
        assert!(
            malformed > 0 && truncated > 0,
            "{kind:?}: {malformed}, {truncated}"
        );
        let rejects = rejects(&ws);
        let reason = |r: &Value| r["reason"].as_str().unwrap_or_default().to_owned();
        let not_json = rejects
            .iter()
            .filter(|r| reason(r).starts_with("the reply is not valid JSON"))
            .count();
        let cut = rejects
            .iter()
            .filter(|r| reason(r).contains("cut off at the token limit"))
            .count();
        // A truncated reply is retried once with twice the budget; the mock cuts the same
        // message again, so each ends as one `truncated` reject after two requests.
        // A malformed reply is re-asked once with the error; the re-ask is a different
        // message, which the mock may or may not break again: only those that break twice
        // are rejected.
        assert_eq!(truncated % 2, 0, "{kind:?}");
        assert_eq!(cut, truncated / 2, "{kind:?}: {rejects:?}");
        assert_eq!(rejects.len(), not_json + cut, "{kind:?}: {rejects:?}");
        let reasked = malformed - not_json;
        assert_eq!(
            mock.requests(),
            30 + reasked + truncated / 2,
            "{kind:?}: one follow-up per bad reply"
        );
        let summary = stderr(&output);
        assert!(
            summary.contains(&format!("{reasked} re-asked"))
                && summary.contains(&format!("{} with a larger budget", truncated / 2)),
            "{kind:?}: {summary}"
        );
    }
}

#[test]
fn unauthorized_stops_the_run_with_the_servers_message() {
    for kind in Kind::ALL {
        let ws = docs_workspace();
        let mock = MockLlm::start(Behavior {
            fail_status: Some(401),
            latency: Duration::from_millis(20),
            ..Behavior::default()
        });
        let output = run_shipped(&ws, &mock, kind, &[("concurrency", "2")]);
        let err = stderr(&output);
        assert_eq!(output.status.code(), Some(1), "{kind:?}:\n{err}");
        assert!(
            err.contains("the server answered 401: mock error 401"),
            "{kind:?}:\n{err}"
        );
        assert!(
            err.contains(&format!("no key was sent: `{}` is not set", kind.key_env())),
            "{kind:?}:\n{err}"
        );
        eprintln!("401 ({kind:?}): {} requests sent", mock.requests());
        assert!(
            mock.requests() <= 2,
            "{kind:?}: {} requests sent after a 401 with concurrency 2",
            mock.requests()
        );
        assert!(!ws.path("out/train.jsonl").exists());
    }
}

#[test]
fn api_keys_never_leak() {
    for kind in [Kind::OpenAi, Kind::Anthropic] {
        let key = format!("sk-{}-SECRET-91c2d7e4", kind.name());
        let env = [(kind.key_env(), key.as_str())];
        let ws = docs_workspace();
        let pipeline = shipped_with_provider_fields(&ws, &["retry_delay_ms: 5"]);
        // A run through faults, whose error bodies are retried and whose reasons are logged…
        let mock = MockLlm::start(Behavior {
            faults: Faults {
                rate_limit: 0.2,
                server_error: 0.2,
                malformed: 0.2,
                ..Faults::default()
            },
            ..Behavior::default()
        });
        let ok = run_with(&ws, &pipeline, &mock, kind, &[], &env);
        assert_ok(&ok);
        let sent = match kind {
            Kind::Anthropic => mock.header("x-api-key"),
            _ => mock.auth_headers(),
        };
        assert!(
            sent.iter()
                .all(|h| h.as_deref().is_some_and(|h| h.ends_with(&key))),
            "{kind:?}: the key was not sent: {sent:?}"
        );
        // …and a run refused by a server that quotes the key back.
        let echo = MockLlm::start(Behavior {
            fail_status: Some(401),
            error_echoes_key: true,
            ..Behavior::default()
        });
        let refused = run_with(&ws, &pipeline, &echo, kind, &[("out", "out2")], &env);
        assert_eq!(refused.status.code(), Some(1));
        let err = stderr(&refused);
        assert!(
            err.contains("mock error 401: invalid key [redacted]"),
            "{err}"
        );
        for output in [&ok, &refused] {
            for stream in [&output.stdout, &output.stderr] {
                assert!(
                    !String::from_utf8_lossy(stream).contains(&key),
                    "{kind:?}: the key was printed"
                );
            }
        }
        assert!(file_count(&ws.path("cache")) > 0, "nothing was cached");
        assert_eq!(
            files_containing(&ws, &key),
            Vec::<std::path::PathBuf>::new(),
            "{kind:?}"
        );
    }
}

#[test]
fn an_overloaded_server_is_not_flooded() {
    // A server with 2 slots behind a provider allowed 8 at once: the window must come down
    // to what the server takes instead of retrying 8 at a time until calls give up.
    let ws = many_docs_workspace(10);
    let mock = MockLlm::start(Behavior {
        latency: Duration::from_millis(40),
        faults: Faults {
            capacity: Some(2),
            retry_after: RetryAfter::Seconds(0),
            ..Faults::default()
        },
        ..Behavior::default()
    });
    let pipeline = shipped_with_provider_fields(&ws, &["retry_delay_ms: 20"]);
    let output = run_with(&ws, &pipeline, &mock, Kind::OpenAi, &[], &[]);
    assert_ok(&output);
    let over = mock.injected_count("capacity");
    eprintln!(
        "overload: 30 calls, {} requests, {over} refused over capacity, {} retries",
        mock.requests(),
        retries_in(&output)
    );
    assert!(rejects(&ws).is_empty(), "{:?}", rejects(&ws));
    assert_eq!(dataset_rows(&ws), asked(&mock));
    assert_eq!(mock.requests(), 30 + over);
    assert_eq!(retries_in(&output), over);
    // 8 at once against 2 slots refuses 6 at the start; after that the halved window keeps
    // refusals to the occasional probe above capacity (measured: 9–16). Without the adaptive
    // window the same run was refused 104–126 times and some calls gave up.
    assert!(over <= 30, "{over} requests refused");
}

#[test]
fn requests_per_minute_spaces_requests() {
    let ws = docs_workspace();
    let mock = MockLlm::start(Behavior::default());
    // 240 a minute: a first burst of 4, then one every 250 ms.
    let pipeline = shipped_with_provider_fields(&ws, &["requests_per_minute: 240"]);
    let output = run_with(&ws, &pipeline, &mock, Kind::OpenAi, &[], &[]);
    assert_ok(&output);
    let arrivals = mock.arrivals();
    assert_eq!(arrivals.len(), 12);
    let span = *arrivals.last().unwrap() - arrivals[0];
    // Only a lower bound: a loaded machine can make a run slower, never the limiter faster.
    assert!(
        span >= Duration::from_millis(1900),
        "12 requests at 240/min took {span:?}"
    );
    // No second holds more than its share plus the burst.
    for (i, start) in arrivals.iter().enumerate() {
        let within = arrivals[i..]
            .iter()
            .filter(|t| **t - *start < Duration::from_secs(1))
            .count();
        assert!(within <= 8, "{within} requests within a second");
    }
}

#[test]
fn calls_share_connections_kept_open() {
    let ws = many_docs_workspace(10);
    let mock = MockLlm::start(Behavior::default());
    let output = run_shipped(&ws, &mock, Kind::OpenAi, &[("concurrency", "2")]);
    assert_ok(&output);
    assert_eq!(mock.requests(), 30);
    // One connection per request in flight, each kept open for the next request.
    assert!(
        mock.connections() <= 2,
        "30 calls at concurrency 2 opened {} connections",
        mock.connections()
    );
}

/// The shipped pipeline, with `fields` added to its provider, run against `base_url` (a
/// server other than the mock) as kind `openai`; the mock the pipeline names gets nothing.
fn run_against(ws: &Workspace, base_url: &str, fields: &[&str]) -> std::process::Output {
    let mock = MockLlm::start(Behavior::default());
    let pipeline = shipped_with_provider_fields(ws, fields);
    let sets = [("base_url", base_url)];
    let output = run_with(ws, &pipeline, &mock, Kind::OpenAi, &sets, &[]);
    assert_eq!(mock.requests(), 0, "`base_url` was not followed");
    output
}

#[test]
fn an_unreachable_server_is_named_in_each_reject() {
    let ws = docs_workspace();
    // A port nothing listens on: bound, then closed.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base_url = format!("http://{}/v1", closed.local_addr().unwrap());
    drop(closed);
    let output = run_against(&ws, &base_url, &["retry_delay_ms: 5", "max_retries: 1"]);
    assert_ok(&output);
    let rejects = rejects(&ws);
    assert_eq!(rejects.len(), 12, "{}", stderr(&output));
    for reject in &rejects {
        assert_eq!(
            reject["reason"],
            format!(
                "the call failed after 2 attempts: cannot connect to {base_url}/chat/completions: \
                 Connection refused (os error 111)"
            ),
            "{reject}"
        );
    }
}

#[test]
fn a_redirect_stops_the_run_and_names_where_it_points() {
    let ws = docs_workspace();
    // A server that answers every request with a redirect.
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base_url = format!("http://{}/v1", server.local_addr().unwrap());
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for stream in server.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut request = [0; 65536];
            let _ = stream.read(&mut request);
            let _ = stream.write_all(
                b"HTTP/1.1 308 Permanent Redirect\r\nlocation: https://llm.example/v1/chat/completions\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            );
        }
    });
    let output = run_against(&ws, &base_url, &["retry_delay_ms: 5"]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let err = stderr(&output);
    assert!(
        err.contains(&format!(
            "the server answered 308: {base_url}/chat/completions redirects to \
             https://llm.example/v1/chat/completions: set `base_url` to the address requests \
             should go to"
        )),
        "{err}"
    );
}
