//! The OpenAI-compatible chat completions wire format (OpenAI, OpenRouter, vLLM, llama.cpp
//! server, LM Studio, Ollama's `/v1`), with OpenRouter's extras read when present: the cost
//! in `usage.cost` and the reasoning in `message.reasoning` (`reasoning_content` elsewhere).

use serde::Deserialize;
use serde_json::{Value as Json, json};

use super::{ProviderConfig, Reply, Wire, effective_max_tokens};

pub const WIRE: Wire = Wire {
    name: "openai",
    default_base_url: || "https://api.openai.com/v1".to_owned(),
    default_key_env: "OPENAI_API_KEY",
    endpoint,
    body,
    messages_as_given: true,
    transport_fields: |_| serde_json::Map::new(),
    authorize: super::bearer,
    parse_reply,
};

pub fn endpoint(base_url: &str) -> String {
    format!("{}/chat/completions", base_url.trim_end_matches('/'))
}

pub fn body(
    config: &ProviderConfig,
    messages: &Json,
    schema: Option<&Json>,
    max_tokens: Option<u32>,
) -> Json {
    let mut body = serde_json::Map::new();
    body.insert("model".into(), json!(config.model));
    body.insert("messages".into(), messages.clone());
    if let Some(t) = config.temperature {
        body.insert("temperature".into(), json!(t));
    }
    if let Some(p) = config.top_p {
        body.insert("top_p".into(), json!(p));
    }
    if let Some(n) = effective_max_tokens(config, max_tokens) {
        body.insert("max_tokens".into(), json!(n));
    }
    if let Some(seed) = config.seed {
        body.insert("seed".into(), json!(seed));
    }
    if let Some(schema) = schema {
        body.insert(
            "response_format".into(),
            json!({
                "type": "json_schema",
                "json_schema": { "name": "output", "strict": true, "schema": schema },
            }),
        );
    }
    Json::Object(body)
}

/// The parts of a reply that are read; everything else is skipped without being built.
#[derive(Deserialize)]
struct Completion {
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<Usage>,
}

/// The counts read from `usage`; its other fields (`prompt_tokens_details` …) are skipped
/// without being built. Each is a value, not a number, so that a `null` or a string reads
/// as absent. Read from an object only: anything else fails, and [`parse_value`] reads it.
#[derive(Default)]
struct Usage {
    prompt_tokens: Option<Json>,
    completion_tokens: Option<Json>,
    cost: Option<Json>,
}

impl<'de> Deserialize<'de> for Usage {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Usage, D::Error> {
        struct Fields;
        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = Usage;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Usage, A::Error> {
                let mut usage = Usage::default();
                while let Some(name) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    let field = match &*name {
                        "prompt_tokens" => &mut usage.prompt_tokens,
                        "completion_tokens" => &mut usage.completion_tokens,
                        "cost" => &mut usage.cost,
                        _ => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                            continue;
                        }
                    };
                    // A field given twice: the value reading keeps the last, so does this.
                    *field = Some(map.next_value()?);
                }
                Ok(usage)
            }
        }
        deserializer.deserialize_map(Fields)
    }
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    message: Option<Message>,
    #[serde(default)]
    finish_reason: Option<Json>,
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    content: Option<Json>,
    #[serde(default)]
    reasoning: Option<Json>,
    #[serde(default)]
    reasoning_content: Option<Json>,
}

pub fn parse_reply(text: &str) -> Result<Reply, String> {
    match serde_json::from_str::<Completion>(text) {
        Ok(completion) => from_completion(completion),
        // An unusual shape (a field of another type, a duplicate field): read it as a value.
        Err(_) => parse_value(text),
    }
}

/// A non-empty string, taken out of its value.
fn text_of(value: Option<Json>) -> Option<String> {
    match value {
        Some(Json::String(text)) if !text.is_empty() => Some(text),
        _ => None,
    }
}

fn from_completion(completion: Completion) -> Result<Reply, String> {
    let Some(choice) = completion.choices.into_iter().next() else {
        return Err("the server's reply has no `choices`".to_owned());
    };
    let usage = completion.usage.as_ref();
    let tokens = |count: Option<&Json>| count.and_then(Json::as_u64).unwrap_or(0);
    let (content, reasoning) = match choice.message {
        Some(message) => (
            text_of(message.content),
            text_of(message.reasoning).or_else(|| text_of(message.reasoning_content)),
        ),
        None => (None, None),
    };
    Ok(Reply {
        content: content.unwrap_or_default(),
        finish_reason: match choice.finish_reason {
            Some(Json::String(reason)) => Some(reason),
            _ => None,
        },
        prompt_tokens: tokens(usage.and_then(|u| u.prompt_tokens.as_ref())),
        completion_tokens: tokens(usage.and_then(|u| u.completion_tokens.as_ref())),
        cost: usage.and_then(|u| u.cost.as_ref()).and_then(Json::as_f64),
        reasoning,
    })
}

fn parse_value(text: &str) -> Result<Reply, String> {
    let value: Json =
        serde_json::from_str(text).map_err(|e| format!("the server's reply is not JSON ({e})"))?;
    let choice = value
        .pointer("/choices/0")
        .ok_or("the server's reply has no `choices`")?;
    let message = |name: &str| {
        choice
            .pointer(&format!("/message/{name}"))
            .and_then(Json::as_str)
            .filter(|s| !s.is_empty())
    };
    let usage = |name: &str| {
        value
            .pointer(&format!("/usage/{name}"))
            .and_then(Json::as_u64)
            .unwrap_or(0)
    };
    Ok(Reply {
        content: message("content").unwrap_or_default().to_owned(),
        finish_reason: choice
            .get("finish_reason")
            .and_then(Json::as_str)
            .map(str::to_owned),
        prompt_tokens: usage("prompt_tokens"),
        completion_tokens: usage("completion_tokens"),
        cost: value.pointer("/usage/cost").and_then(Json::as_f64),
        reasoning: message("reasoning")
            .or_else(|| message("reasoning_content"))
            .map(str::to_owned),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::ProviderKind;

    fn config() -> ProviderConfig {
        ProviderConfig {
            base_url: "http://localhost:11434/v1/".into(),
            model: "smollm2".into(),
            api_key_env: Some("OPENAI_API_KEY".into()),
            temperature: Some(0.7),
            max_tokens: Some(500),
            seed: Some(7),
            ..crate::provider::tests::config(ProviderKind::Openai)
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
        // The exact text matters: it is hashed into every cache key of this provider.
        assert_eq!(
            body(&config(), &messages, Some(&schema), Some(800)).to_string(),
            r#"{"model":"smollm2","messages":[{"role":"user","content":"hi"}],"temperature":0.7,"max_tokens":500,"seed":7,"response_format":{"type":"json_schema","json_schema":{"name":"output","strict":true,"schema":{"type":"object"}}}}"#
        );
        let bare = ProviderConfig {
            temperature: None,
            max_tokens: None,
            seed: None,
            ..config()
        };
        assert_eq!(
            body(&bare, &messages, None, None),
            json!({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]})
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
                completion_tokens: 30,
                cost: None,
                reasoning: None,
            }
        );
        assert!(parse_reply("{}").unwrap_err().contains("no `choices`"));
        assert!(parse_reply("<html>").unwrap_err().contains("not JSON"));
    }

    #[test]
    fn the_typed_reading_agrees_with_reading_a_value() {
        for text in [
            r#"{"id":"x","choices":[{"index":0,"message":{"role":"assistant","content":"{}","refusal":null},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":30,"total_tokens":42,"cost":0.5}}"#,
            r#"{"choices":[{"message":null,"finish_reason":null}]}"#,
            r#"{"choices":[],"usage":{}}"#,
            r#"{"choices":[{"message":{"content":"","reasoning":"","reasoning_content":"r"},"finish_reason":""}],"usage":{"prompt_tokens":1.5,"cost":"x"}}"#,
            r#"{"choices":[{"message":{"content":5},"finish_reason":7}],"usage":[]}"#,
            r#"{"choices":[{"message":"text"}]}"#,
            r#"{"choices":{"0":{"message":{"content":"odd"}}}}"#,
            r#"{"choices":[{"message":{"content":"a","content":"b"}}]}"#,
            r#"{"usage":{"prompt_tokens":3}}"#,
            r#"{"choices":[{"message":{"content":"c"}}],"usage":[3,4]}"#,
            r#"{"choices":[{"message":{"content":"c"}}],"usage":{"prompt_tokens":3,"prompt_tokens":4,"x":{"y":[1]}}}"#,
            r#"{"choices":[{"message":{"content":"c"}}],"usage":{"prompt_tokens":null,"completion_tokens":"7"}}"#,
        ] {
            assert_eq!(parse_reply(text), parse_value(text), "{text}");
        }
    }

    #[test]
    fn parses_openrouter_cost_and_reasoning() {
        let reply = parse_reply(
            r#"{"id":"gen-1","provider":"DeepInfra","choices":[{"finish_reason":"stop","native_finish_reason":"stop","message":{"role":"assistant","content":"{\"pairs\":[]}","reasoning":"Two pairs fit."}}],"usage":{"prompt_tokens":40,"completion_tokens":9,"total_tokens":49,"cost":0.000123}}"#,
        )
        .unwrap();
        assert_eq!(
            reply,
            Reply {
                content: r#"{"pairs":[]}"#.into(),
                finish_reason: Some("stop".into()),
                prompt_tokens: 40,
                completion_tokens: 9,
                cost: Some(0.000123),
                reasoning: Some("Two pairs fit.".into()),
            }
        );
        // vLLM and DeepSeek name it `reasoning_content`; a null content reads as empty.
        let reply = parse_reply(
            r#"{"choices":[{"message":{"content":null,"reasoning_content":"hmm"},"finish_reason":"length"}]}"#,
        )
        .unwrap();
        assert_eq!(reply.content, "");
        assert_eq!(reply.reasoning.as_deref(), Some("hmm"));
    }
}
