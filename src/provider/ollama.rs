//! Ollama's native chat API: `POST {base_url}/api/chat` with `stream: false`, the JSON Schema
//! as `format` (Ollama constrains decoding to it), and sampling under `options`.

use serde_json::{Value as Json, json};

use super::{ProviderConfig, Reply, Wire, effective_max_tokens};

pub const WIRE: Wire = Wire {
    name: "ollama",
    default_base_url: || host(std::env::var("OLLAMA_HOST").ok().as_deref()),
    default_key_env: "OLLAMA_API_KEY",
    endpoint,
    body,
    // Each message's content parts are joined into one string.
    messages_as_given: false,
    transport_fields,
    // Ollama's own server needs no key; its cloud and authenticating proxies take a bearer.
    authorize: super::bearer,
    parse_reply,
};

/// The base URL `OLLAMA_HOST` names, read the way the `ollama` CLI reads it: `host`,
/// `host:port`, `:port` or a URL; no scheme means `http` and port 11434; the wildcard
/// addresses a server listens on mean this machine.
pub fn host(value: Option<&str>) -> String {
    let value = value.map(str::trim).unwrap_or_default();
    let (scheme, rest, default_port) = match value.split_once("://") {
        None => ("http", value, "11434"),
        Some(("https", rest)) => ("https", rest, "443"),
        Some((scheme, rest)) => (scheme, rest, "80"),
    };
    let (authority, path) = match rest.split_once('/') {
        Some((authority, path)) => (authority, path.trim_end_matches('/')),
        None => (rest, ""),
    };
    let (host, port) = match authority.rsplit_once(':') {
        // `[::1]` alone has colons but no port.
        Some((host, port)) if !port.contains(']') => (host, port),
        _ => (authority, default_port),
    };
    let host = match host {
        "" | "0.0.0.0" => "127.0.0.1",
        "[::]" => "[::1]",
        other => other,
    };
    let port = if port.is_empty() { default_port } else { port };
    let path = if path.is_empty() {
        String::new()
    } else {
        format!("/{path}")
    };
    format!("{scheme}://{host}:{port}{path}")
}

/// `{base_url}/api/chat`; a trailing `/v1` (Ollama's OpenAI-compatible root) is dropped, so
/// the same base URL serves both kinds.
pub fn endpoint(base_url: &str) -> String {
    let base = base_url.trim_end_matches('/');
    let base = base.strip_suffix("/v1").unwrap_or(base);
    format!("{base}/api/chat")
}

pub fn body(
    config: &ProviderConfig,
    messages: &Json,
    schema: Option<&Json>,
    max_tokens: Option<u32>,
) -> Json {
    let mut body = serde_json::Map::new();
    body.insert("model".into(), json!(config.model));
    body.insert("messages".into(), flatten_content(messages));
    body.insert("stream".into(), json!(false));
    if let Some(schema) = schema {
        body.insert("format".into(), schema.clone());
    }
    let mut options = serde_json::Map::new();
    if let Some(t) = config.temperature {
        options.insert("temperature".into(), json!(t));
    }
    if let Some(p) = config.top_p {
        options.insert("top_p".into(), json!(p));
    }
    if let Some(seed) = config.seed {
        options.insert("seed".into(), json!(seed));
    }
    if let Some(n) = config.num_ctx {
        options.insert("num_ctx".into(), json!(n));
    }
    if let Some(n) = effective_max_tokens(config, max_tokens) {
        options.insert("num_predict".into(), json!(n));
    }
    if !options.is_empty() {
        body.insert("options".into(), Json::Object(options));
    }
    Json::Object(body)
}

/// Ollama takes a message's content as one string: text parts are joined.
fn flatten_content(messages: &Json) -> Json {
    let Json::Array(list) = messages else {
        return messages.clone();
    };
    let flat = list.iter().map(|m| match m.get("content") {
        Some(Json::Array(parts)) => {
            let text: String = parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Json::as_str))
                .collect();
            let mut m = m.clone();
            m["content"] = Json::String(text);
            m
        }
        _ => m.clone(),
    });
    Json::Array(flat.collect())
}

/// `keep_alive` decides how long the model stays loaded, not what it says: sent, not hashed.
/// A number is seconds and goes out as a number (Ollama reads a string as a duration).
fn transport_fields(config: &ProviderConfig) -> serde_json::Map<String, Json> {
    let mut fields = serde_json::Map::new();
    if let Some(keep_alive) = config.keep_alive.as_deref().map(str::trim) {
        let value = match keep_alive.parse::<i64>() {
            Ok(secs) => json!(secs),
            Err(_) => json!(keep_alive),
        };
        fields.insert("keep_alive".into(), value);
    }
    fields
}

pub fn parse_reply(text: &str) -> Result<Reply, String> {
    let value: Json =
        serde_json::from_str(text).map_err(|e| format!("the server's reply is not JSON ({e})"))?;
    let Some(message) = value.get("message") else {
        return Err(match value.get("error").and_then(Json::as_str) {
            Some(error) => format!("the server answered with an error: {error}"),
            None => "the server's reply has no `message`".to_owned(),
        });
    };
    let text_of = |name: &str| {
        message
            .get(name)
            .and_then(Json::as_str)
            .filter(|s| !s.is_empty())
    };
    let count = |name: &str| value.get(name).and_then(Json::as_u64).unwrap_or(0);
    Ok(Reply {
        content: text_of("content").unwrap_or_default().to_owned(),
        // Ollama says `stop`, `length`, `load` … in the same words chat completions use.
        finish_reason: value
            .get("done_reason")
            .and_then(Json::as_str)
            .map(str::to_owned),
        prompt_tokens: count("prompt_eval_count"),
        completion_tokens: count("eval_count"),
        cost: None,
        reasoning: text_of("thinking").map(str::to_owned),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::ProviderKind;

    fn config() -> ProviderConfig {
        ProviderConfig {
            base_url: "http://localhost:11434".into(),
            model: "qwen2.5:1.5b".into(),
            temperature: Some(0.7),
            top_p: Some(0.9),
            seed: Some(1),
            num_ctx: Some(8192),
            max_tokens: Some(2048),
            keep_alive: Some("10m".into()),
            ..crate::provider::tests::config(ProviderKind::Ollama)
        }
    }

    #[test]
    fn endpoint_drops_a_trailing_v1() {
        assert_eq!(
            endpoint("http://localhost:11434"),
            "http://localhost:11434/api/chat"
        );
        assert_eq!(
            endpoint("http://localhost:11434/v1/"),
            "http://localhost:11434/api/chat"
        );
        assert_eq!(
            endpoint("https://proxy.example/ollama/"),
            "https://proxy.example/ollama/api/chat"
        );
    }

    #[test]
    fn reads_ollama_host_like_the_cli() {
        assert_eq!(host(None), "http://127.0.0.1:11434");
        assert_eq!(host(Some("")), "http://127.0.0.1:11434");
        assert_eq!(host(Some("0.0.0.0")), "http://127.0.0.1:11434");
        assert_eq!(host(Some("gpu-box")), "http://gpu-box:11434");
        assert_eq!(host(Some("gpu-box:8080")), "http://gpu-box:8080");
        assert_eq!(host(Some(":9999")), "http://127.0.0.1:9999");
        assert_eq!(host(Some("127.0.0.1:11500")), "http://127.0.0.1:11500");
        assert_eq!(host(Some("http://gpu-box")), "http://gpu-box:80");
        assert_eq!(
            host(Some("https://ollama.example/base/")),
            "https://ollama.example:443/base"
        );
        assert_eq!(host(Some("[::1]")), "http://[::1]:11434");
        assert_eq!(host(Some("[::1]:8000")), "http://[::1]:8000");
    }

    #[test]
    fn builds_the_chat_body_with_format_and_options() {
        let messages = json!([
            {"role": "system", "content": "You write datasets."},
            {"role": "user", "content": [{"type": "text", "text": "Write "}, {"type": "text", "text": "3 pairs."}]},
        ]);
        let schema = json!({"type": "object", "properties": {"pairs": {"type": "array"}}});
        assert_eq!(
            body(&config(), &messages, Some(&schema), Some(424)).to_string(),
            r#"{"model":"qwen2.5:1.5b","messages":[{"role":"system","content":"You write datasets."},{"role":"user","content":"Write 3 pairs."}],"stream":false,"format":{"type":"object","properties":{"pairs":{"type":"array"}}},"options":{"temperature":0.7,"top_p":0.9,"seed":1,"num_ctx":8192,"num_predict":424}}"#
        );
        let bare = ProviderConfig {
            temperature: None,
            top_p: None,
            seed: None,
            num_ctx: None,
            max_tokens: None,
            ..config()
        };
        assert_eq!(
            body(&bare, &json!([]), None, None),
            json!({"model": "qwen2.5:1.5b", "messages": [], "stream": false})
        );
    }

    #[test]
    fn keep_alive_is_a_number_when_it_is_one() {
        assert_eq!(
            Json::Object(transport_fields(&config())),
            json!({"keep_alive": "10m"})
        );
        let forever = ProviderConfig {
            keep_alive: Some("-1".into()),
            ..config()
        };
        assert_eq!(
            Json::Object(transport_fields(&forever)),
            json!({"keep_alive": -1})
        );
        let unset = ProviderConfig {
            keep_alive: None,
            ..config()
        };
        assert!(transport_fields(&unset).is_empty());
    }

    #[test]
    fn parses_content_done_reason_counts_and_thinking() {
        let reply = parse_reply(
            r#"{"model":"qwen2.5:1.5b","created_at":"2025-01-01T00:00:00Z","message":{"role":"assistant","content":"{\"pairs\":[","thinking":"Start."},"done":true,"done_reason":"length","total_duration":1,"prompt_eval_count":26,"eval_count":300}"#,
        )
        .unwrap();
        assert_eq!(
            reply,
            Reply {
                content: r#"{"pairs":["#.into(),
                finish_reason: Some("length".into()),
                prompt_tokens: 26,
                completion_tokens: 300,
                cost: None,
                reasoning: Some("Start.".into()),
            }
        );
        assert_eq!(
            parse_reply(r#"{"error":"model 'x' not found"}"#).unwrap_err(),
            "the server answered with an error: model 'x' not found"
        );
        assert_eq!(
            parse_reply("{}").unwrap_err(),
            "the server's reply has no `message`"
        );
    }
}
