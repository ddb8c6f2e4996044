//! The Anthropic Messages API: `POST {base_url}/v1/messages`. System messages go to the
//! top-level `system`; structured output is a single forced tool, `output`, whose input
//! schema is the stage's schema, and the reply's content is that tool call's input as JSON.

use serde_json::{Value as Json, json};

use super::{ProviderConfig, Reply, Wire, effective_max_tokens};

/// The API version every request names; the reply format below is this version's.
pub const API_VERSION: &str = "2023-06-01";
/// Anthropic requires a reply budget; this one when neither stage nor provider sets it.
pub const DEFAULT_MAX_TOKENS: u32 = 4096;
const TOOL: &str = "output";

pub const WIRE: Wire = Wire {
    name: "anthropic",
    default_base_url: || "https://api.anthropic.com".to_owned(),
    default_key_env: "ANTHROPIC_API_KEY",
    endpoint,
    body,
    // System messages move to the top-level `system`.
    messages_as_given: false,
    transport_fields: |_| serde_json::Map::new(),
    authorize,
    parse_reply,
};

/// `{base_url}/v1/messages`; a base URL that already ends in `/v1` is accepted.
pub fn endpoint(base_url: &str) -> String {
    let base = base_url.trim_end_matches('/');
    let base = base.strip_suffix("/v1").unwrap_or(base);
    format!("{base}/v1/messages")
}

fn authorize(headers: &mut ::http::header::HeaderMap, key: Option<&str>) {
    headers.insert(
        "anthropic-version",
        ::http::header::HeaderValue::from_static(API_VERSION),
    );
    if let Some(key) = key {
        super::insert_secret(
            headers,
            ::http::header::HeaderName::from_static("x-api-key"),
            key,
        );
    }
}

pub fn body(
    config: &ProviderConfig,
    messages: &Json,
    schema: Option<&Json>,
    max_tokens: Option<u32>,
) -> Json {
    let mut system = Vec::new();
    let mut turns = Vec::new();
    for message in messages.as_array().into_iter().flatten() {
        if message.get("role").and_then(Json::as_str) == Some("system") {
            match message.get("content") {
                Some(Json::String(text)) => system.push(text.clone()),
                Some(Json::Array(parts)) => system.extend(
                    parts
                        .iter()
                        .filter_map(|p| p.get("text").and_then(Json::as_str))
                        .map(str::to_owned),
                ),
                _ => {}
            }
        } else {
            turns.push(message.clone());
        }
    }
    let mut body = serde_json::Map::new();
    body.insert("model".into(), json!(config.model));
    body.insert(
        "max_tokens".into(),
        json!(effective_max_tokens(config, max_tokens).unwrap_or(DEFAULT_MAX_TOKENS)),
    );
    if !system.is_empty() {
        body.insert("system".into(), json!(system.join("\n\n")));
    }
    body.insert("messages".into(), Json::Array(turns));
    if let Some(t) = config.temperature {
        body.insert("temperature".into(), json!(t));
    }
    if let Some(p) = config.top_p {
        body.insert("top_p".into(), json!(p));
    }
    if let Some(schema) = schema {
        body.insert(
            "tools".into(),
            json!([{
                "name": TOOL,
                "description": "Record the answer. Its input is the complete answer.",
                "input_schema": schema,
            }]),
        );
        body.insert("tool_choice".into(), json!({"type": "tool", "name": TOOL}));
    }
    Json::Object(body)
}

pub fn parse_reply(text: &str) -> Result<Reply, String> {
    let value: Json =
        serde_json::from_str(text).map_err(|e| format!("the server's reply is not JSON ({e})"))?;
    let blocks = value
        .get("content")
        .and_then(Json::as_array)
        .ok_or("the server's reply has no `content`")?;
    let mut tool_input = None;
    let mut text = String::new();
    let mut thinking = String::new();
    for block in blocks {
        match block.get("type").and_then(Json::as_str) {
            Some("tool_use") if tool_input.is_none() => tool_input = block.get("input"),
            Some("text") => text.push_str(block.get("text").and_then(Json::as_str).unwrap_or("")),
            Some("thinking") => {
                thinking.push_str(block.get("thinking").and_then(Json::as_str).unwrap_or(""))
            }
            _ => {}
        }
    }
    let content = match tool_input {
        Some(input) => serde_json::to_string(input)
            .map_err(|e| format!("cannot re-serialize the tool input: {e}"))?,
        None => text,
    };
    let usage = |name: &str| {
        value
            .pointer(&format!("/usage/{name}"))
            .and_then(Json::as_u64)
            .unwrap_or(0)
    };
    let finish_reason = value
        .get("stop_reason")
        .and_then(Json::as_str)
        .map(|reason| match reason {
            "max_tokens" => "length",
            "end_turn" | "tool_use" | "stop_sequence" => "stop",
            other => other,
        })
        .map(str::to_owned);
    Ok(Reply {
        content,
        finish_reason,
        prompt_tokens: usage("input_tokens"),
        completion_tokens: usage("output_tokens"),
        cost: None,
        reasoning: (!thinking.is_empty()).then_some(thinking),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::ProviderKind;

    fn config() -> ProviderConfig {
        ProviderConfig {
            base_url: "https://api.anthropic.com".into(),
            model: "claude-haiku-4-5".into(),
            temperature: Some(0.7),
            seed: Some(1),
            max_tokens: Some(2048),
            ..crate::provider::tests::config(ProviderKind::Anthropic)
        }
    }

    #[test]
    fn endpoint_is_v1_messages() {
        assert_eq!(
            endpoint("https://api.anthropic.com"),
            "https://api.anthropic.com/v1/messages"
        );
        assert_eq!(
            endpoint("https://api.anthropic.com/v1/"),
            "https://api.anthropic.com/v1/messages"
        );
    }

    #[test]
    fn builds_the_messages_body_with_system_and_a_forced_tool() {
        let messages = json!([
            {"role": "system", "content": "You write datasets."},
            {"role": "user", "content": "Write 3 pairs."},
        ]);
        let schema = json!({"type": "object", "required": ["pairs"]});
        // No seed: the Messages API has none.
        assert_eq!(
            body(&config(), &messages, Some(&schema), Some(424)).to_string(),
            r#"{"model":"claude-haiku-4-5","max_tokens":424,"system":"You write datasets.","messages":[{"role":"user","content":"Write 3 pairs."}],"temperature":0.7,"tools":[{"name":"output","description":"Record the answer. Its input is the complete answer.","input_schema":{"type":"object","required":["pairs"]}}],"tool_choice":{"type":"tool","name":"output"}}"#
        );
    }

    #[test]
    fn max_tokens_defaults_when_nobody_sets_it() {
        let unbounded = ProviderConfig {
            max_tokens: None,
            temperature: None,
            ..config()
        };
        let messages = json!([{"role": "user", "content": "hi"}]);
        assert_eq!(
            body(&unbounded, &messages, None, None),
            json!({"model": "claude-haiku-4-5", "max_tokens": 4096, "messages": [{"role": "user", "content": "hi"}]})
        );
        assert_eq!(
            body(&config(), &messages, None, Some(9000))["max_tokens"],
            2048
        );
    }

    #[test]
    fn parses_the_tool_input_as_the_content() {
        let reply = parse_reply(
            r#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-haiku-4-5","content":[{"type":"thinking","thinking":"Plan.","signature":"x"},{"type":"text","text":"Here you go."},{"type":"tool_use","id":"toolu_1","name":"output","input":{"pairs":[{"question":"Q?","answer":"A."}]}}],"stop_reason":"tool_use","stop_sequence":null,"usage":{"input_tokens":50,"output_tokens":20}}"#,
        )
        .unwrap();
        assert_eq!(
            reply,
            Reply {
                content: r#"{"pairs":[{"question":"Q?","answer":"A."}]}"#.into(),
                finish_reason: Some("stop".into()),
                prompt_tokens: 50,
                completion_tokens: 20,
                cost: None,
                reasoning: Some("Plan.".into()),
            }
        );
    }

    #[test]
    fn text_replies_and_max_tokens_read_as_truncation() {
        let reply = parse_reply(
            r#"{"content":[{"type":"text","text":"{\"pairs\":[{\"quest"}],"stop_reason":"max_tokens","usage":{"input_tokens":5,"output_tokens":7}}"#,
        )
        .unwrap();
        assert_eq!(reply.content, r#"{"pairs":[{"quest"#);
        assert_eq!(reply.finish_reason.as_deref(), Some("length"));
        assert_eq!(reply.reasoning, None);
        assert_eq!(
            parse_reply(r#"{"type":"error"}"#).unwrap_err(),
            "the server's reply has no `content`"
        );
    }
}
