//! LLM providers: what the user configures, the per-provider concurrency limit, and retries.
//! Each wire format lives in its own file.

pub mod openai;

use std::sync::Arc;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use tokio::sync::Semaphore;

/// A provider as written under `providers:` in a pipeline.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// The wire format: `openai` is any OpenAI-compatible `/chat/completions` endpoint
    /// (OpenAI, OpenRouter, vLLM, llama.cpp server, LM Studio, Ollama's `/v1`).
    pub kind: ProviderKind,
    /// e.g. `https://api.openai.com/v1`, `http://localhost:11434/v1`.
    pub base_url: String,
    pub model: String,
    /// The environment variable holding the API key. When it is unset or empty, no key is
    /// sent (local servers need none). Keys are never written anywhere.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Requests in flight at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Upper bound for a reply's tokens; a generate stage may ask for less.
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub seed: Option<u64>,
    /// Seconds before a request is abandoned and retried.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Retries after the first attempt on 408, 409, 429, 5xx, timeouts and connection errors.
    #[serde(default = "default_retries")]
    pub max_retries: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    Openai,
}

impl ProviderKind {
    pub fn name(self) -> &'static str {
        match self {
            ProviderKind::Openai => "openai",
        }
    }
}

fn default_concurrency() -> usize {
    8
}
fn default_timeout() -> u64 {
    300
}
fn default_retries() -> u32 {
    4
}

/// What a chat call returned, as stored in the cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub content: String,
    #[serde(default)]
    pub finish_reason: Option<String>,
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// An answer retrying cannot fix (bad key, bad request, unknown model): stop the run.
    #[error("{provider}: the server answered {status}: {message}")]
    Fatal {
        provider: String,
        status: u16,
        message: String,
    },
    #[error("gave up after {attempts} attempts: {last}")]
    GaveUp { attempts: u32, last: String },
}

/// A configured provider, ready to send.
pub struct Provider {
    pub name: String,
    pub config: ProviderConfig,
    client: reqwest::Client,
    api_key: Option<String>,
    /// Shared by every stage that uses this provider.
    pub limit: Arc<Semaphore>,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key is deliberately left out.
        f.debug_struct("Provider")
            .field("name", &self.name)
            .field("config", &self.config)
            .finish()
    }
}

impl Provider {
    pub fn new(name: &str, config: ProviderConfig) -> Result<Provider, String> {
        let api_key = config
            .api_key_env
            .as_deref()
            .and_then(|var| std::env::var(var).ok())
            .filter(|key| !key.trim().is_empty());
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(config.timeout_secs.max(1)))
            .connect_timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(config.concurrency.max(1))
            .user_agent(concat!("keg/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
        Ok(Provider {
            name: name.to_owned(),
            limit: Arc::new(Semaphore::new(config.concurrency.max(1))),
            config,
            client,
            api_key,
        })
    }

    pub fn endpoint(&self) -> String {
        match self.config.kind {
            ProviderKind::Openai => openai::endpoint(&self.config.base_url),
        }
    }

    /// The request body for these messages; `schema` is the JSON Schema the reply must match.
    pub fn body(&self, messages: &Json, schema: Option<&Json>, max_tokens: Option<u32>) -> Json {
        match self.config.kind {
            ProviderKind::Openai => openai::body(&self.config, messages, schema, max_tokens),
        }
    }

    /// Send one request, retrying transient failures with exponential backoff and jitter.
    pub async fn send(&self, body: &Json) -> Result<(Reply, u32), CallError> {
        let endpoint = self.endpoint();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let outcome = self.send_once(&endpoint, body).await;
            let (retry_after, last) = match outcome {
                Attempt::Done(reply) => return Ok((reply, attempt - 1)),
                Attempt::Fatal(status, message) => {
                    return Err(CallError::Fatal {
                        provider: self.name.clone(),
                        status,
                        message,
                    });
                }
                Attempt::Retry(retry_after, last) => (retry_after, last),
            };
            if attempt > self.config.max_retries {
                return Err(CallError::GaveUp {
                    attempts: attempt,
                    last,
                });
            }
            tokio::time::sleep(backoff(attempt, retry_after)).await;
        }
    }

    async fn send_once(&self, endpoint: &str, body: &Json) -> Attempt {
        let mut request = self.client.post(endpoint).json(body);
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key);
        }
        let response = match request.send().await {
            Ok(r) => r,
            Err(err) => return Attempt::Retry(None, describe_transport(&err)),
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|secs| Duration::from_secs_f64(secs.clamp(0.0, 600.0)));
        let text = match response.text().await {
            Ok(t) => t,
            Err(err) => return Attempt::Retry(None, describe_transport(&err)),
        };
        if (200..300).contains(&status) {
            return match self.config.kind {
                ProviderKind::Openai => match openai::parse_reply(&text) {
                    Ok(reply) => Attempt::Done(reply),
                    Err(err) => Attempt::Retry(None, err),
                },
            };
        }
        let message = server_message(&text);
        if matches!(status, 408 | 409 | 429) || status >= 500 {
            Attempt::Retry(retry_after, format!("HTTP {status}: {message}"))
        } else {
            Attempt::Fatal(status, message)
        }
    }
}

enum Attempt {
    Done(Reply),
    Fatal(u16, String),
    Retry(Option<Duration>, String),
}

fn describe_transport(err: &reqwest::Error) -> String {
    if err.is_timeout() {
        "the request timed out".to_owned()
    } else if err.is_connect() {
        format!("cannot connect: {}", root_cause(err))
    } else {
        root_cause(err)
    }
}

fn root_cause(err: &dyn std::error::Error) -> String {
    let mut source = err;
    while let Some(next) = source.source() {
        source = next;
    }
    source.to_string()
}

/// The message an error body carries (`{"error":{"message":…}}` and similar), else the text.
fn server_message(text: &str) -> String {
    let parsed: Option<Json> = serde_json::from_str(text).ok();
    let message = parsed.as_ref().and_then(|v| {
        v.pointer("/error/message")
            .or_else(|| v.get("error"))
            .or_else(|| v.get("message"))
            .and_then(Json::as_str)
            .map(str::to_owned)
    });
    let message = message.unwrap_or_else(|| text.trim().to_owned());
    let mut message: String = message.chars().take(500).collect();
    if message.is_empty() {
        message = "(empty body)".to_owned();
    }
    message
}

/// 0.5 s, 1 s, 2 s … capped at 30 s, plus up to 50% jitter; a server's Retry-After wins
/// when it asks for longer.
fn backoff(attempt: u32, retry_after: Option<Duration>) -> Duration {
    let base = Duration::from_millis(500u64.saturating_mul(1 << (attempt - 1).min(6)))
        .min(Duration::from_secs(30));
    let jitter = base.mul_f64(rand::random::<f64>() * 0.5);
    let wait = base + jitter;
    match retry_after {
        Some(asked) if asked > wait => asked,
        _ => wait,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_message_reads_openai_error_bodies() {
        assert_eq!(
            server_message(
                r#"{"error":{"message":"Incorrect API key provided","type":"invalid_request_error"}}"#
            ),
            "Incorrect API key provided"
        );
        assert_eq!(
            server_message(r#"{"error":"model not found"}"#),
            "model not found"
        );
        assert_eq!(server_message("Bad Gateway"), "Bad Gateway");
    }

    #[test]
    fn backoff_grows_and_honours_retry_after() {
        assert!(backoff(1, None) >= Duration::from_millis(500));
        assert!(backoff(1, None) < Duration::from_millis(751));
        assert!(backoff(3, None) >= Duration::from_secs(2));
        assert_eq!(
            backoff(1, Some(Duration::from_secs(9))),
            Duration::from_secs(9)
        );
        assert!(backoff(20, None) <= Duration::from_secs(45));
    }
}
