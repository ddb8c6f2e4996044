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
    // Only the LAST user message counts.
    let multi = json!({
        "model": "m",
        "messages": [
            {"role": "user", "content": "Chunk two: pears."},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "Chunk one: apples."},
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
