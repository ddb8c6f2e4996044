//! Tests of the mock OpenAI-compatible server itself.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use crate::mock::{Behavior, MockLlm, jitter_delay, parse_item_count};

/// A small runtime for the test side (the mock has its own).
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

fn chat_body(user: &str) -> Value {
    json!({
        "model": "test-model",
        "messages": [
            {"role": "system", "content": "You write datasets."},
            {"role": "user", "content": user},
        ],
    })
}

/// POST one chat completion; returns the status and the JSON reply.
async fn post_chat(
    client: &reqwest::Client,
    mock: &str,
    body: &Value,
    key: Option<&str>,
) -> (u16, Value) {
    let mut req = client.post(format!("{mock}/chat/completions")).json(body);
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    let resp = req.send().await.expect("request failed");
    let status = resp.status().as_u16();
    let json = resp.json::<Value>().await.expect("reply is not JSON");
    (status, json)
}

fn post_chat_blocking(mock: &MockLlm, body: &Value, key: Option<&str>) -> (u16, Value) {
    let url = mock.base_url();
    runtime().block_on(async { post_chat(&client(), &url, body, key).await })
}

/// The `pairs` of a reply, parsed from the message content.
fn pairs(reply: &Value) -> Vec<(String, String)> {
    let content = reply["choices"][0]["message"]["content"]
        .as_str()
        .expect("content is a string");
    let parsed: Value = serde_json::from_str(content).expect("content is JSON");
    parsed["pairs"]
        .as_array()
        .expect("pairs is an array")
        .iter()
        .map(|p| {
            (
                p["question"].as_str().unwrap().to_owned(),
                p["answer"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn reply_has_openai_shape_and_parsed_item_count() {
    let mock = MockLlm::start(Behavior::default());
    let user = "Write 3 question-answer pairs about this text:\nThe kettle boils.";
    let body = chat_body(user);
    let (status, reply) = post_chat_blocking(&mock, &body, None);
    assert_eq!(status, 200);
    assert_eq!(reply["id"], "chatcmpl-mock-1");
    assert_eq!(reply["object"], "chat.completion");
    assert_eq!(reply["created"], 0);
    assert_eq!(reply["model"], "test-model");
    let choice = &reply["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["finish_reason"], "stop");

    let pairs = pairs(&reply);
    assert_eq!(pairs.len(), 3);
    let h = &blake3::hash(user.as_bytes()).to_hex()[..8];
    let excerpt: String = user.chars().take(60).collect::<String>().replace('\n', " ");
    for (i, (q, a)) in pairs.iter().enumerate() {
        assert_eq!(q, &format!("Question {} about {h}?", i + 1));
        assert_eq!(a, &format!("Answer {} about {h}: {excerpt}", i + 1));
    }

    let content = reply["choices"][0]["message"]["content"].as_str().unwrap();
    let prompt_chars = "You write datasets.".chars().count() + user.chars().count();
    let p = prompt_chars.div_ceil(4) as u64;
    let c = (content.chars().count() / 4) as u64;
    assert_eq!(reply["usage"]["prompt_tokens"], p);
    assert_eq!(reply["usage"]["completion_tokens"], c);
    assert_eq!(reply["usage"]["total_tokens"], p + c);

    assert_eq!(mock.requests(), 1);
    assert_eq!(mock.bodies(), vec![body]);
}

#[test]
fn item_count_default_and_override() {
    let mock = MockLlm::start(Behavior::default());
    let (_, reply) = post_chat_blocking(&mock, &chat_body("Just some text."), None);
    assert_eq!(pairs(&reply).len(), 2, "default is 2");

    let mock = MockLlm::start(Behavior {
        items: Some(5),
        ..Behavior::default()
    });
    let (_, reply) = post_chat_blocking(&mock, &chat_body("Write 3 pairs."), None);
    assert_eq!(pairs(&reply).len(), 5, "Behavior::items wins");
}

#[test]
fn item_count_parsing() {
    assert_eq!(parse_item_count("Write 3 question-answer pairs"), Some(3));
    assert_eq!(parse_item_count("Generate 12 QUESTIONS."), Some(12));
    assert_eq!(parse_item_count("Give me 4 items"), Some(4));
    assert_eq!(
        parse_item_count("Report of 2024.\nWrite exactly 5 diverse, high-quality Q/A pairs"),
        Some(5)
    );
    assert_eq!(parse_item_count("No number here, just pairs"), None);
    assert_eq!(parse_item_count("Write 3 answers"), None);
    assert_eq!(parse_item_count(""), None);
}

#[test]
fn replies_are_deterministic_in_the_user_message() {
    let mock = MockLlm::start(Behavior::default());
    let a1 = post_chat_blocking(&mock, &chat_body("Chunk one: apples."), None).1;
    let a2 = post_chat_blocking(&mock, &chat_body("Chunk one: apples."), None).1;
    let b = post_chat_blocking(&mock, &chat_body("Chunk two: pears."), None).1;
    let content = |r: &Value| r["choices"][0]["message"]["content"].clone();
    assert_eq!(content(&a1), content(&a2));
    assert_eq!(a1["usage"], a2["usage"]);
    let qa: Vec<String> = pairs(&a1).into_iter().map(|p| p.0).collect();
    let qb: Vec<String> = pairs(&b).into_iter().map(|p| p.0).collect();
    for q in &qa {
        assert!(!qb.contains(q), "question {q:?} appears for both messages");
    }
    // A follow-up is answered about the task: the FIRST user message counts.
    let multi = json!({
        "model": "m",
        "messages": [
            {"role": "user", "content": "Chunk one: apples."},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "Chunk two: pears."},
        ],
    });
    let m = post_chat_blocking(&mock, &multi, None).1;
    assert_eq!(content(&m), content(&a1));
}

#[test]
fn counts_50_concurrent_requests_exactly() {
    let mock = MockLlm::start(Behavior {
        latency: Duration::from_millis(50),
        ..Behavior::default()
    });
    let url = mock.base_url();
    let statuses = runtime().block_on(async {
        let client = client();
        let mut set = tokio::task::JoinSet::new();
        for i in 0..50 {
            let (client, url) = (client.clone(), url.clone());
            set.spawn(async move {
                post_chat(&client, &url, &chat_body(&format!("request {i}")), None)
                    .await
                    .0
            });
        }
        set.join_all().await
    });
    assert_eq!(statuses, vec![200; 50]);
    assert_eq!(mock.requests(), 50);
    assert_eq!(mock.bodies().len(), 50);
    assert_eq!(mock.auth_headers().len(), 50);
    let mut users: Vec<String> = mock
        .bodies()
        .iter()
        .map(|b| b["messages"][1]["content"].as_str().unwrap().to_owned())
        .collect();
    users.sort();
    users.dedup();
    assert_eq!(users.len(), 50, "every body logged once");

    mock.reset();
    assert_eq!(mock.requests(), 0);
    assert!(mock.bodies().is_empty());
    assert!(mock.auth_headers().is_empty());
    let (status, reply) = post_chat_blocking(&mock, &chat_body("after reset"), None);
    assert_eq!(status, 200);
    assert_eq!(reply["id"], "chatcmpl-mock-1");
    assert_eq!(mock.requests(), 1);
}

#[test]
fn fail_status_returns_openai_error() {
    let mock = MockLlm::start(Behavior {
        fail_status: Some(401),
        ..Behavior::default()
    });
    let (status, reply) = post_chat_blocking(&mock, &chat_body("Write 3 pairs"), Some("bad"));
    assert_eq!(status, 401);
    assert_eq!(
        reply,
        json!({"error": {"message": "mock error 401", "type": "mock"}})
    );
    assert_eq!(mock.requests(), 1);
}

#[test]
fn jitter_shuffles_completion_order_reproducibly() {
    let jitter = Duration::from_millis(400);
    // The delays are a pure function of the arrival index, and far from sorted.
    let delays: Vec<Duration> = (0..20).map(|k| jitter_delay(jitter, k)).collect();
    assert_eq!(
        delays,
        (0..20).map(|k| jitter_delay(jitter, k)).collect::<Vec<_>>()
    );
    assert!(delays.iter().all(|d| *d < jitter));
    let inversions = (0..20)
        .flat_map(|i| (i + 1..20).map(move |j| (i, j)))
        .filter(|&(i, j)| delays[i] > delays[j])
        .count();
    assert!(inversions > 40, "seeded delays barely shuffled: {delays:?}");

    let mock = MockLlm::start(Behavior {
        jitter,
        ..Behavior::default()
    });
    let url = mock.base_url();
    let completed = Arc::new(Mutex::new(Vec::new()));
    runtime().block_on(async {
        let client = client();
        let mut set = tokio::task::JoinSet::new();
        for i in 0..20usize {
            let (client, url, completed) = (client.clone(), url.clone(), completed.clone());
            set.spawn(async move {
                let (status, _) =
                    post_chat(&client, &url, &chat_body(&format!("request {i}")), None).await;
                assert_eq!(status, 200);
                completed.lock().unwrap().push(i);
            });
        }
        set.join_all().await;
    });
    let completed = completed.lock().unwrap().clone();
    let arrived: Vec<usize> = mock
        .bodies()
        .iter()
        .map(|b| {
            b["messages"][1]["content"].as_str().unwrap()["request ".len()..]
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(completed.len(), 20);
    assert!(
        !completed.is_sorted(),
        "completion order is sorted: {completed:?}"
    );
    assert_ne!(completed, arrived, "completion order equals arrival order");
}

#[test]
fn records_authorization_headers() {
    let mock = MockLlm::start(Behavior::default());
    post_chat_blocking(&mock, &chat_body("with key"), Some("sk-test-123"));
    post_chat_blocking(&mock, &chat_body("without key"), None);
    assert_eq!(
        mock.auth_headers(),
        vec![Some("Bearer sk-test-123".to_owned()), None]
    );
}

#[test]
fn models_and_health_endpoints() {
    let mock = MockLlm::start(Behavior::default());
    let base = mock.base_url();
    let (models, health) = runtime().block_on(async {
        let client = client();
        let models: Value = client
            .get(format!("{base}/models"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let health = client
            .get(format!("{}/health", base.trim_end_matches("/v1")))
            .send()
            .await
            .unwrap();
        let status = health.status().as_u16();
        (models, (status, health.json::<Value>().await.unwrap()))
    });
    assert_eq!(
        models,
        json!({"object": "list", "data": [{"id": "mock", "object": "model"}]})
    );
    assert_eq!(health, (200, json!({"status": "ok"})));
    assert_eq!(mock.requests(), 0, "only chat completions are counted");
}

#[test]
fn drop_shuts_the_server_down() {
    let mock = MockLlm::start(Behavior {
        latency: Duration::from_secs(60),
        ..Behavior::default()
    });
    let url = mock.base_url();
    let addr = url
        .trim_start_matches("http://")
        .trim_end_matches("/v1")
        .to_owned();
    // A request stuck in a long latency must not keep the server (or the drop) alive.
    let rt = runtime();
    let pending = rt.spawn({
        let url = url.clone();
        async move {
            client()
                .post(format!("{url}/chat/completions"))
                .json(&chat_body("slow"))
                .send()
                .await
        }
    });
    while mock.requests() == 0 {
        std::thread::sleep(Duration::from_millis(10));
    }
    let started = std::time::Instant::now();
    drop(mock);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "drop took too long"
    );
    assert!(
        std::net::TcpStream::connect(&addr).is_err(),
        "still listening on {addr}"
    );
    let result = rt.block_on(pending).unwrap();
    assert!(result.is_err(), "the pending request got a reply");
}

// ---- Wire formats, fault injection ----

use std::io::{Read, Write};

use crate::mock::{Api, Fault, Faults, RetryAfter, pairs_content};

/// POST `body` to `url`; returns status, headers and the JSON reply (Null when not JSON).
fn post_to(
    url: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, Value) {
    runtime().block_on(async {
        let mut req = client().post(url).json(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.expect("request failed");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let json = resp.json::<Value>().await.unwrap_or(Value::Null);
        (status, headers, json)
    })
}

/// The user message the shipped templates would make, varied by `i`.
fn user(i: usize) -> String {
    format!("Document: doc{i}.md\nWrite 2 question-answer pairs about this text.")
}

#[test]
fn speaks_ollama_and_anthropic_and_counts_per_endpoint() {
    let mock = MockLlm::start(Behavior::default());
    let root = mock.root_url();
    let u = "Write 3 pairs about kettles.";
    let pairs = pairs_content(u, 3);

    let (status, _, reply) = post_to(
        &format!("{root}/api/chat"),
        &json!({"model": "m", "stream": false, "messages": [{"role": "user", "content": u}]}),
        &[],
    );
    assert_eq!(status, 200);
    assert_eq!(reply["message"]["content"], pairs);
    assert_eq!(reply["done_reason"], "stop");
    assert_eq!(reply["prompt_eval_count"], u.len().div_ceil(4));
    assert_eq!(reply["eval_count"], pairs.len() / 4);

    let (status, _, reply) = post_to(
        &format!("{root}/v1/messages"),
        &json!({
            "model": "m", "max_tokens": 100, "system": "Be brief.",
            "messages": [{"role": "user", "content": u}],
            "tools": [{"name": "output", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "tool", "name": "output"},
        }),
        &[
            ("x-api-key", "sk-ant-1"),
            ("anthropic-version", "2023-06-01"),
        ],
    );
    assert_eq!(status, 200);
    assert_eq!(reply["content"][0]["type"], "tool_use");
    assert_eq!(reply["content"][0]["name"], "output");
    assert_eq!(reply["content"][0]["input"].to_string(), pairs);
    assert_eq!(reply["stop_reason"], "tool_use");
    assert_eq!(
        reply["usage"]["input_tokens"],
        ("Be brief.".len() + u.len()).div_ceil(4)
    );
    // Without tools: a text block.
    let (_, _, reply) = post_to(
        &format!("{root}/v1/messages"),
        &json!({"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": u}]}),
        &[],
    );
    assert_eq!(reply["content"][0], json!({"type": "text", "text": pairs}));
    assert_eq!(reply["stop_reason"], "end_turn");

    post_chat_blocking(&mock, &chat_body(u), None);
    assert_eq!(mock.requests(), 4);
    assert_eq!(mock.requests_to(Api::Ollama), 1);
    assert_eq!(mock.requests_to(Api::Anthropic), 2);
    assert_eq!(mock.requests_to(Api::OpenAi), 1);
    assert_eq!(
        mock.header("x-api-key"),
        vec![None, Some("sk-ant-1".into()), None, None]
    );
    assert_eq!(
        mock.header("anthropic-version")[1].as_deref(),
        Some("2023-06-01")
    );
}

#[test]
fn fault_picks_are_a_seeded_function_of_the_message() {
    let faults = Faults {
        rate_limit: 0.25,
        server_error: 0.25,
        malformed: 0.25,
        ..Faults::default()
    };
    let picks: Vec<Option<Fault>> = (0..400).map(|i| faults.pick(&user(i))).collect();
    assert_eq!(
        picks,
        (0..400).map(|i| faults.pick(&user(i))).collect::<Vec<_>>()
    );
    let share = |f: Option<Fault>| picks.iter().filter(|p| **p == f).count();
    for f in [
        Some(Fault::RateLimit),
        Some(Fault::ServerError),
        Some(Fault::Malformed),
        None,
    ] {
        assert!((70..130).contains(&share(f)), "{f:?}: {}", share(f));
    }
    let reseeded = Faults {
        seed: 1,
        ..faults.clone()
    };
    let moved = (0..400)
        .filter(|&i| reseeded.pick(&user(i)) != picks[i])
        .count();
    assert!(moved > 100, "the seed barely matters: {moved}");
    assert_eq!(Faults::default().pick(&user(0)), None);
}

/// The first message (from 0 up) that `faults` picks for `fault`.
fn message_with(faults: &Faults, fault: Fault) -> String {
    (0..10_000)
        .map(user)
        .find(|u| faults.pick(u) == Some(fault))
        .expect("some message is picked")
}

#[test]
fn rate_limits_carry_each_kind_of_retry_after_and_pass_after_times() {
    for (retry_after, header, check) in [
        (
            RetryAfter::Seconds(3),
            "retry-after",
            Box::new(|v: &str| v == "3") as Box<dyn Fn(&str) -> bool>,
        ),
        (
            RetryAfter::Millis(250),
            "retry-after-ms",
            Box::new(|v: &str| v == "250"),
        ),
        (
            RetryAfter::Date(30),
            "retry-after",
            Box::new(|v: &str| {
                let at = httpdate::parse_http_date(v).expect("an HTTP-date");
                let ahead = at
                    .duration_since(std::time::SystemTime::now())
                    .unwrap_or_default();
                ahead > Duration::from_secs(27) && ahead <= Duration::from_secs(30)
            }),
        ),
    ] {
        let faults = Faults {
            rate_limit: 0.5,
            retry_after,
            times: 2,
            ..Faults::default()
        };
        let u = message_with(&faults, Fault::RateLimit);
        let mock = MockLlm::start(Behavior {
            faults,
            ..Behavior::default()
        });
        let url = format!("{}/chat/completions", mock.base_url());
        for _ in 0..2 {
            let (status, headers, reply) = post_to(&url, &chat_body(&u), &[]);
            assert_eq!(status, 429);
            let value = headers
                .get(header)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            assert!(check(value), "{retry_after:?}: {header}: {value:?}");
            assert_eq!(reply["error"]["message"], "mock rate limit");
        }
        let (status, _, reply) = post_to(&url, &chat_body(&u), &[]);
        assert_eq!(status, 200, "the third attempt passes");
        assert_eq!(
            reply["choices"][0]["message"]["content"],
            pairs_content(&u, 2)
        );
        assert_eq!(mock.injected_count("rate_limit"), 2);
        assert_eq!(mock.requests(), 3);
    }
}

#[test]
fn server_errors_come_in_each_apis_error_format() {
    let faults = Faults {
        server_error: 1.0,
        times: 3,
        ..Faults::default()
    };
    let mock = MockLlm::start(Behavior {
        faults,
        ..Behavior::default()
    });
    let root = mock.root_url();
    let body = chat_body("Write 2 pairs.");
    let (status, _, reply) = post_to(&format!("{root}/v1/chat/completions"), &body, &[]);
    assert_eq!(
        (status, reply),
        (
            500,
            json!({"error": {"message": "mock server error", "type": "mock"}})
        )
    );
    let (status, _, reply) = post_to(&format!("{root}/api/chat"), &body, &[]);
    assert_eq!(
        (status, reply),
        (500, json!({"error": "mock server error"}))
    );
    let (status, _, reply) = post_to(&format!("{root}/v1/messages"), &body, &[]);
    assert_eq!(
        (status, reply),
        (
            500,
            json!({"type": "error", "error": {"type": "api_error", "message": "mock server error"}})
        )
    );
    // `times` counts attempts per message, whatever the endpoint: the fourth passes.
    let (status, _, _) = post_to(&format!("{root}/api/chat"), &body, &[]);
    assert_eq!(status, 200);
    assert_eq!(mock.injected_count("server_error"), 3);
}

#[test]
fn fail_status_errors_can_echo_the_key() {
    let mock = MockLlm::start(Behavior {
        fail_status: Some(401),
        error_echoes_key: true,
        ..Behavior::default()
    });
    let (status, reply) = post_chat_blocking(&mock, &chat_body("hi"), Some("sk-echo-1"));
    assert_eq!(status, 401);
    assert_eq!(
        reply["error"]["message"],
        "mock error 401: invalid key sk-echo-1"
    );
    let (status, _, reply) = post_to(
        &format!("{}/v1/messages", mock.root_url()),
        &chat_body("hi"),
        &[("x-api-key", "sk-ant-echo")],
    );
    assert_eq!(status, 401);
    assert_eq!(
        reply,
        json!({"type": "error", "error": {"type": "authentication_error", "message": "mock error 401: invalid key sk-ant-echo"}})
    );
}

#[test]
fn a_reset_closes_the_connection_without_a_response() {
    let faults = Faults {
        reset: 0.5,
        ..Faults::default()
    };
    let u = message_with(&faults, Fault::Reset);
    let mock = MockLlm::start(Behavior {
        faults,
        ..Behavior::default()
    });
    let body = chat_body(&u).to_string();
    let send = || {
        let mut tcp = std::net::TcpStream::connect(mock.host_port()).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            tcp,
            "POST /v1/chat/completions HTTP/1.1\r\nhost: mock\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut received = Vec::new();
        let outcome = tcp.read_to_end(&mut received);
        (outcome.map_err(|e| e.kind()), received)
    };
    let (outcome, received) = send();
    assert!(
        received.is_empty(),
        "got {:?}",
        String::from_utf8_lossy(&received)
    );
    assert_eq!(outcome, Err(std::io::ErrorKind::ConnectionReset));
    // The second attempt is answered.
    let (_, received) = send();
    assert!(String::from_utf8_lossy(&received).starts_with("HTTP/1.1 200"));
    assert_eq!(mock.injected_count("reset"), 1);
    assert_eq!(mock.requests(), 2);
}

#[test]
fn malformed_and_truncated_replies_in_every_format() {
    let faults = Faults {
        malformed: 0.5,
        truncated: 0.5,
        ..Faults::default()
    };
    let bad = message_with(&faults, Fault::Malformed);
    let cut = message_with(&faults, Fault::Truncated);
    let mock = MockLlm::start(Behavior {
        faults,
        ..Behavior::default()
    });
    let root = mock.root_url();
    let anthropic = |u: &str| {
        json!({"model": "m", "max_tokens": 9, "messages": [{"role": "user", "content": u}],
               "tools": [{"name": "output", "input_schema": {"type": "object"}}]})
    };
    for _ in 0..2 {
        let (_, _, r) = post_to(
            &format!("{root}/v1/chat/completions"),
            &chat_body(&bad),
            &[],
        );
        let content = r["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(serde_json::from_str::<Value>(content).is_err(), "{content}");
        assert_eq!(r["choices"][0]["finish_reason"], "stop");
    }
    let full = pairs_content(&cut, 2);
    let half: String = full.chars().take(full.chars().count() / 2).collect();
    let (_, _, r) = post_to(
        &format!("{root}/v1/chat/completions"),
        &chat_body(&cut),
        &[],
    );
    assert_eq!(r["choices"][0]["message"]["content"], half);
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    let (_, _, r) = post_to(&format!("{root}/api/chat"), &chat_body(&cut), &[]);
    assert_eq!(r["message"]["content"], half);
    assert_eq!(r["done_reason"], "length");
    let (_, _, r) = post_to(&format!("{root}/v1/messages"), &anthropic(&cut), &[]);
    assert_eq!(r["content"][0], json!({"type": "text", "text": half}));
    assert_eq!(r["stop_reason"], "max_tokens");
    let (_, _, r) = post_to(&format!("{root}/v1/messages"), &anthropic(&bad), &[]);
    assert_eq!(r["content"][0]["type"], "text");
    assert_eq!(mock.injected_count("malformed"), 3);
    assert_eq!(mock.injected_count("truncated"), 3);
}

#[test]
fn slow_replies_are_slow_on_the_first_attempt_only() {
    let faults = Faults {
        slow: 0.5,
        slow_delay: Duration::from_millis(300),
        ..Faults::default()
    };
    let slow = message_with(&faults, Fault::Slow);
    let mock = MockLlm::start(Behavior {
        faults,
        ..Behavior::default()
    });
    let timed = || {
        let started = std::time::Instant::now();
        let (status, reply) = post_chat_blocking(&mock, &chat_body(&slow), None);
        assert_eq!(status, 200);
        assert_eq!(
            reply["choices"][0]["message"]["content"],
            pairs_content(&slow, 2)
        );
        started.elapsed()
    };
    assert!(timed() >= Duration::from_millis(300));
    assert!(timed() < Duration::from_millis(300));
    assert_eq!(mock.injected_count("slow"), 1);
}

#[test]
fn requests_over_capacity_get_429() {
    let faults = Faults {
        capacity: Some(2),
        retry_after: RetryAfter::Seconds(1),
        ..Faults::default()
    };
    let mock = MockLlm::start(Behavior {
        latency: Duration::from_millis(400),
        faults,
        ..Behavior::default()
    });
    let url = mock.base_url();
    let mut statuses = runtime().block_on(async {
        let client = client();
        let mut set = tokio::task::JoinSet::new();
        for i in 0..3u64 {
            let (client, url) = (client.clone(), url.clone());
            set.spawn(async move {
                // Two take the slots; the third arrives while they are busy.
                tokio::time::sleep(Duration::from_millis(150 * (i / 2))).await;
                post_chat(&client, &url, &chat_body(&user(i as usize)), None)
                    .await
                    .0
            });
        }
        set.join_all().await
    });
    statuses.sort();
    assert_eq!(statuses, [200, 200, 429]);
    assert_eq!(mock.injected_count("capacity"), 1);
    assert_eq!(mock.max_in_flight(), 3);
    // Once they are done, there is room again.
    assert_eq!(post_chat_blocking(&mock, &chat_body("later"), None).0, 200);
}
