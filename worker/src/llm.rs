//! The OpenAI-compatible chat completions client: bounded in time and in
//! the bytes it reads, never follows redirects, and classifies every
//! failure as retryable or permanent.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

/// Largest response body read from the LLM; a bigger one is a bad response.
pub const MAX_RESPONSE_BYTES: usize = 8 * 1024 * 1024;
/// Longest wait for the TCP connection to the LLM.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest `Retry-After` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// One chat message sent to the LLM.
#[derive(Debug, Clone, Serialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: &'static str,
    /// Text.
    pub content: String,
}

/// A chat completions request.
#[derive(Debug, Clone, Serialize)]
pub struct ChatRequest {
    /// Model name.
    pub model: String,
    /// The prompt.
    pub messages: Vec<ChatMessage>,
    /// Completion token cap.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<i32>,
    /// Sampling temperature.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
}

/// What the LLM answered.
#[derive(Debug, Clone)]
pub struct Completion {
    /// Reply text.
    pub content: String,
    /// Why generation stopped.
    pub finish_reason: String,
    /// Prompt tokens, if reported.
    pub prompt_tokens: Option<i32>,
    /// Completion tokens, if reported.
    pub completion_tokens: Option<i32>,
}

/// A failed LLM call, classified for the retry decision.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LlmError {
    /// Worth another attempt: 408/409/429/5xx, connection errors, timeouts,
    /// unreadable responses.
    #[error("{code}: {message}")]
    Retryable {
        /// Error code stored on the job if this is the last attempt.
        code: &'static str,
        /// What happened.
        message: String,
        /// The provider's `Retry-After`, if any.
        retry_after: Option<Duration>,
    },
    /// Will fail again: other 4xx, redirects.
    #[error("{code}: {message}")]
    Permanent {
        /// Error code stored on the job.
        code: &'static str,
        /// What happened, with the provider's message.
        message: String,
    },
}

impl LlmError {
    /// The job error code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Retryable { code, .. } | Self::Permanent { code, .. } => code,
        }
    }

    /// The job error message.
    pub fn message(&self) -> &str {
        match self {
            Self::Retryable { message, .. } | Self::Permanent { message, .. } => message,
        }
    }

    fn bad_response(message: impl Into<String>) -> Self {
        Self::Retryable {
            code: "llm_bad_response",
            message: message.into(),
            retry_after: None,
        }
    }
}

/// Client for `{OPENAI_BASE_URL}/chat/completions`.
#[derive(Clone)]
pub struct LlmClient {
    http: reqwest::Client,
    url: String,
    api_key: Option<SecretString>,
}

impl LlmClient {
    /// A client with a per-call `timeout`.
    pub fn new(
        base_url: &str,
        api_key: Option<SecretString>,
        timeout: Duration,
    ) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(timeout)
            .pool_max_idle_per_host(4096)
            .build()?;
        let url = format!("{}/chat/completions", base_url.trim_end_matches('/'));
        // An empty OPENAI_API_KEY (as compose files often pass) means none.
        let api_key = api_key.filter(|k| !k.expose_secret().is_empty());
        Ok(Self { http, url, api_key })
    }

    /// One chat completion call.
    pub async fn complete(&self, request: &ChatRequest) -> Result<Completion, LlmError> {
        let mut call = self.http.post(&self.url).json(request);
        if let Some(key) = &self.api_key {
            call = call.bearer_auth(key.expose_secret());
        }
        let mut response = call.send().await.map_err(transport_error)?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(|s| Duration::from_secs_f64(s).min(MAX_RETRY_AFTER));
        let body = read_capped(&mut response).await?;
        if status.is_redirection() {
            return Err(LlmError::Permanent {
                code: "llm_bad_response",
                message: format!(
                    "the LLM answered with a redirect ({status}), which is not followed"
                ),
            });
        }
        if !status.is_success() {
            let detail = provider_message(&body);
            let message = format!("the LLM answered {status}: {detail}");
            return Err(match status.as_u16() {
                429 => LlmError::Retryable {
                    code: "llm_rate_limited",
                    message,
                    retry_after,
                },
                408 | 409 | 500..=599 => LlmError::Retryable {
                    code: "llm_unavailable",
                    message,
                    retry_after,
                },
                _ => LlmError::Permanent {
                    code: "llm_rejected",
                    message,
                },
            });
        }
        parse_completion(&body)
    }
}

fn transport_error(err: reqwest::Error) -> LlmError {
    if err.is_timeout() {
        LlmError::Retryable {
            code: "llm_timeout",
            message: "the LLM call timed out".into(),
            retry_after: None,
        }
    } else {
        LlmError::Retryable {
            code: "llm_unavailable",
            message: format!("cannot reach the LLM: {}", error_chain(&err)),
            retry_after: None,
        }
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

async fn read_capped(response: &mut reqwest::Response) -> Result<Vec<u8>, LlmError> {
    if response
        .content_length()
        .is_some_and(|n| n > MAX_RESPONSE_BYTES as u64)
    {
        return Err(LlmError::bad_response(format!(
            "the LLM response is larger than {MAX_RESPONSE_BYTES} bytes"
        )));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(transport_error)? {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(LlmError::bad_response(format!(
                "the LLM response is larger than {MAX_RESPONSE_BYTES} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The provider's error message from an OpenAI-style error body, or a
/// short excerpt of the body.
fn provider_message(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct ErrorBody {
        error: ErrorDetail,
    }
    #[derive(Deserialize)]
    struct ErrorDetail {
        message: String,
    }
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => e.error.message,
        Err(_) => String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
    }
}

fn parse_completion(body: &[u8]) -> Result<Completion, LlmError> {
    #[derive(Deserialize)]
    struct Response {
        choices: Vec<Choice>,
        usage: Option<Usage>,
    }
    #[derive(Deserialize)]
    struct Choice {
        message: Message,
        finish_reason: Option<String>,
    }
    #[derive(Deserialize)]
    struct Message {
        content: Option<String>,
    }
    #[derive(Deserialize)]
    struct Usage {
        prompt_tokens: Option<i32>,
        completion_tokens: Option<i32>,
    }
    let parsed: Response = serde_json::from_slice(body).map_err(|e| {
        LlmError::bad_response(format!("the LLM response is not a chat completion: {e}"))
    })?;
    let choice = parsed
        .choices
        .into_iter()
        .next()
        .ok_or_else(|| LlmError::bad_response("the LLM response has no choices"))?;
    Ok(Completion {
        content: choice.message.content.unwrap_or_default(),
        finish_reason: choice.finish_reason.unwrap_or_else(|| "stop".to_owned()),
        prompt_tokens: parsed.usage.as_ref().and_then(|u| u.prompt_tokens),
        completion_tokens: parsed.usage.as_ref().and_then(|u| u.completion_tokens),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_an_openai_completion() {
        let body = br#"{"choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"length"}],
                        "usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;
        let c = parse_completion(body).expect("valid completion");
        assert_eq!(
            (c.content.as_str(), c.finish_reason.as_str()),
            ("hi", "length")
        );
        assert_eq!((c.prompt_tokens, c.completion_tokens), (Some(3), Some(1)));
    }

    #[test]
    fn malformed_body_is_a_retryable_bad_response() {
        let err = parse_completion(b"{\"choices\": [").expect_err("truncated JSON");
        assert_eq!(err.code(), "llm_bad_response");
        assert!(matches!(err, LlmError::Retryable { .. }));
    }

    #[test]
    fn provider_message_is_extracted() {
        assert_eq!(
            provider_message(br#"{"error":{"message":"bad model"}}"#),
            "bad model"
        );
        assert_eq!(provider_message(b"oops"), "oops");
    }
}
