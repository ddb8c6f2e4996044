//! The OpenAI-compatible chat completions wire format (OpenAI, OpenRouter, vLLM, llama.cpp
//! server, LM Studio, Ollama's `/v1`).

use serde_json::{Value as Json, json};

use super::{ProviderConfig, Reply};

pub fn endpoint(base_url: &str) -> String {
    format!("{}/chat/completions", base_url.trim_end_matches('/'))
}

pub fn body(
    config: &ProviderConfig,
    messages: &Json,
    schema: Option<&Json>,
    max_tokens: Option<u32>,
) -> Json {
    let mut body = json!({ "model": config.model, "messages": messages });
    let obj = body.as_object_mut().expect("a JSON object literal");
    if let Some(t) = config.temperature {
        obj.insert("temperature".into(), json!(t));
    }
    if let Some(p) = config.top_p {
        obj.insert("top_p".into(), json!(p));
    }
    let max_tokens = match (max_tokens, config.max_tokens) {
        (Some(asked), Some(cap)) => Some(asked.min(cap)),
        (asked, cap) => asked.or(cap),
    };
    if let Some(n) = max_tokens {
        obj.insert("max_tokens".into(), json!(n));
    }
    if let Some(seed) = config.seed {
        obj.insert("seed".into(), json!(seed));
    }
    if let Some(schema) = schema {
        obj.insert(
            "response_format".into(),
            json!({
                "type": "json_schema",
                "json_schema": { "name": "output", "strict": true, "schema": schema },
            }),
        );
    }
    body
}

pub fn parse_reply(text: &str) -> Result<Reply, String> {
    let value: Json =
        serde_json::from_str(text).map_err(|e| format!("the server's reply is not JSON ({e})"))?;
    let choice = value
        .pointer("/choices/0")
        .ok_or("the server's reply has no `choices`")?;
    let content = choice
        .pointer("/message/content")
        .and_then(Json::as_str)
        .unwrap_or_default()
        .to_owned();
    let usage = |name: &str| {
        value
            .pointer(&format!("/usage/{name}"))
            .and_then(Json::as_u64)
            .unwrap_or(0)
    };
    Ok(Reply {
        content,
        finish_reason: choice
            .get("finish_reason")
            .and_then(Json::as_str)
            .map(str::to_owned),
        prompt_tokens: usage("prompt_tokens"),
        completion_tokens: usage("completion_tokens"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::ProviderKind;

    fn config() -> ProviderConfig {
        ProviderConfig {
            kind: ProviderKind::Openai,
            base_url: "http://localhost:11434/v1/".into(),
            model: "smollm2".into(),
            api_key_env: Some("OPENAI_API_KEY".into()),
            concurrency: 4,
            temperature: Some(0.7),
            top_p: None,
            max_tokens: Some(500),
            seed: Some(7),
            timeout_secs: 60,
            max_retries: 2,
        }
    }

    #[test]
    fn builds_the_chat_completions_body() {
        let messages = json!([{"role": "user", "content": "hi"}]);
        let schema = json!({"type": "object"});
        assert_eq!(
            endpoint(&config().base_url),
            "http://localhost:11434/v1/chat/completions"
        );
        assert_eq!(
            body(&config(), &messages, Some(&schema), Some(800)),
            json!({
                "model": "smollm2",
                "messages": [{"role": "user", "content": "hi"}],
                "temperature": 0.7,
                "max_tokens": 500,
                "seed": 7,
                "response_format": {"type": "json_schema", "json_schema": {"name": "output", "strict": true, "schema": {"type": "object"}}},
            })
        );
    }

    #[test]
    fn parses_content_finish_reason_and_usage() {
        let reply = parse_reply(
            r#"{"choices":[{"index":0,"message":{"role":"assistant","content":"{}"},"finish_reason":"length"}],"usage":{"prompt_tokens":12,"completion_tokens":30}}"#,
        )
        .unwrap();
        assert_eq!(
            reply,
            Reply {
                content: "{}".into(),
                finish_reason: Some("length".into()),
                prompt_tokens: 12,
                completion_tokens: 30
            }
        );
        assert!(parse_reply("{}").unwrap_err().contains("no `choices`"));
    }
}
