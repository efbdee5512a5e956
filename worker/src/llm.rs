//! The OpenAI-compatible chat completions client: bounded in time and in
//! the bytes it reads, never follows redirects, and classifies every
//! failure as retryable or permanent.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use crate::sse::{ChunkParser, StreamEvent};
use serde::{Deserialize, Serialize};

/// Largest response body read from the LLM; a bigger one is a bad response.
pub const MAX_RESPONSE_BYTES: usize = 8 * 1024 * 1024;
/// Longest wait for the TCP connection to the LLM.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest `Retry-After` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
/// Longest error message stored on a job (and shown to its tenant), in
/// characters; the provider's full text goes to the logs, cut at
/// [`MAX_LOGGED_DETAIL_CHARS`].
pub const MAX_ERROR_MESSAGE_CHARS: usize = 500;
/// Longest upstream detail written to one log line, in characters.
const MAX_LOGGED_DETAIL_CHARS: usize = 2_000;

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
    /// Other sampling parameters, forwarded unchanged (`top_p`, `stop`,
    /// `seed`, penalties, `user`, `max_completion_tokens`).
    #[serde(flatten)]
    pub sampling: serde_json::Map<String, serde_json::Value>,
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
    /// The provider's `x-ratelimit-remaining-*` said nothing is left: how
    /// long until its `x-ratelimit-reset-*`.
    pub provider_pause: Option<Duration>,
}

/// Error code of a call the provider refused with 429.
pub const RATE_LIMITED: &str = "llm_rate_limited";

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

    /// One chat completion call, streamed: `sink` receives each piece of
    /// reply text as it arrives (already cleaned as the stored reply is, so
    /// the pieces concatenate to the returned `content` exactly). An
    /// upstream that ignores `stream` and answers one JSON completion is
    /// accepted too: its whole text is one piece.
    pub async fn complete(
        &self,
        request: &ChatRequest,
        sink: &mut (dyn FnMut(&str) + Send),
    ) -> Result<Completion, LlmError> {
        let body = StreamingRequest {
            request,
            stream: true,
            stream_options: StreamOptions {
                include_usage: true,
            },
        };
        let mut call = self.http.post(&self.url).json(&body);
        if let Some(key) = &self.api_key {
            call = call.bearer_auth(key.expose_secret());
        }
        let mut response = call.send().await.map_err(transport_error)?;
        let status = response.status();
        let exhausted = exhausted_for(response.headers());
        if !status.is_success() {
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(|s| Duration::from_secs_f64(s).min(MAX_RETRY_AFTER));
            // A 429 lasts until the later of `Retry-After` and the reset of
            // the limit that ran out.
            let retry_after = match (retry_after, exhausted) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
            let body = read_capped(&mut response).await?;
            return Err(status_error(status, retry_after, &body));
        }
        let is_event_stream = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().starts_with("text/event-stream"));
        if !is_event_stream {
            let mut completion = parse_completion(&read_capped(&mut response).await?)?;
            if !completion.content.is_empty() {
                sink(&completion.content);
            }
            completion.provider_pause = exhausted;
            return Ok(completion);
        }
        let mut completion = read_stream(&mut response, sink).await?;
        completion.provider_pause = exhausted;
        Ok(completion)
    }
}

/// How long until the provider has room again, when its
/// `x-ratelimit-remaining-requests` or `-tokens` header says none is left:
/// the time its bucket needs for one more request (or a twentieth of the
/// tokens), that is `x-ratelimit-reset-*` (the time until the bucket is
/// full again) divided by `x-ratelimit-limit-*` (its size) and multiplied
/// by what is missing. At most [`MAX_RETRY_AFTER`].
fn exhausted_for(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let number = |name: String| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v >= 0.0)
    };
    [("requests", None), ("tokens", Some(0.05))]
        .iter()
        .filter_map(|&(kind, share)| {
            let left = number(format!("x-ratelimit-remaining-{kind}"))?;
            if left >= 1.0 {
                return None;
            }
            let reset = headers
                .get(format!("x-ratelimit-reset-{kind}"))
                .and_then(|v| v.to_str().ok())
                .and_then(parse_reset)
                .unwrap_or(Duration::from_secs(1));
            Some(match number(format!("x-ratelimit-limit-{kind}")) {
                // The reset is the time to refill `limit - left`.
                Some(limit) if limit >= 1.0 => {
                    let missing = (limit - left).max(1.0);
                    let unit = reset.as_secs_f64() / missing;
                    Duration::from_secs_f64(
                        (unit * share.map_or(1.0, |s| (limit * s).max(1.0)))
                            .min(reset.as_secs_f64()),
                    )
                }
                _ => reset,
            })
        })
        .max()
        .map(|d| d.min(MAX_RETRY_AFTER))
}

/// Parses OpenAI's reset durations: `1s`, `6m0s`, `120ms`, `1.5s`,
/// `1h2m3.5s`; a bare number is seconds.
fn parse_reset(text: &str) -> Option<Duration> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).ok();
    }
    let mut total = 0.0;
    let mut rest = text;
    while !rest.is_empty() {
        let split = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .filter(|&i| i > 0)?;
        let value: f64 = rest[..split].parse().ok()?;
        rest = &rest[split..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            _ => return None,
        };
        total += value * scale;
        rest = &rest[unit_len..];
    }
    Duration::try_from_secs_f64(total).ok()
}

/// Body of a streamed call: the request plus the streaming options.
#[derive(Serialize)]
struct StreamingRequest<'a> {
    #[serde(flatten)]
    request: &'a ChatRequest,
    stream: bool,
    stream_options: StreamOptions,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

/// Reads a `text/event-stream` reply to its end. A stream that ends
/// without `[DONE]` is complete if it said why it finished
/// (`finish_reason`), else it was cut short: a retryable bad response.
async fn read_stream(
    response: &mut reqwest::Response,
    sink: &mut (dyn FnMut(&str) + Send),
) -> Result<Completion, LlmError> {
    let mut parser = ChunkParser::default();
    let mut events = Vec::new();
    let mut content = String::new();
    let mut finish_reason = None;
    let (mut prompt_tokens, mut completion_tokens) = (None, None);
    let (mut ended, mut done) = (false, false);
    while !ended {
        let chunk = response.chunk().await.map_err(transport_error)?;
        let parsed = match &chunk {
            Some(bytes) => parser.push(bytes, &mut events),
            None => {
                ended = true;
                parser.finish(&mut events)
            }
        };
        parsed.map_err(|e| LlmError::bad_response(format!("unreadable LLM stream: {e}")))?;
        for event in events.drain(..) {
            match event {
                StreamEvent::Delta(text) => {
                    let text = clean_reply(text);
                    if content.len() + text.len() > MAX_RESPONSE_BYTES {
                        return Err(LlmError::bad_response(format!(
                            "the LLM reply is larger than {MAX_RESPONSE_BYTES} bytes"
                        )));
                    }
                    content.push_str(&text);
                    sink(&text);
                }
                StreamEvent::Finish(reason) => {
                    finish_reason = Some(tenant_message(&truncate(&reason, 64)));
                }
                StreamEvent::Usage {
                    prompt_tokens: p,
                    completion_tokens: c,
                } => {
                    prompt_tokens = token_count(p.as_ref());
                    completion_tokens = token_count(c.as_ref());
                }
                StreamEvent::Done => (ended, done) = (true, true),
                StreamEvent::Error(message) => {
                    tracing::warn!(detail = %truncate(&message, MAX_LOGGED_DETAIL_CHARS), "the LLM failed mid-stream");
                    return Err(LlmError::Retryable {
                        code: "llm_unavailable",
                        message: tenant_message(&format!("the LLM failed mid-stream: {message}")),
                        retry_after: None,
                    });
                }
            }
        }
    }
    let finish_reason = match (finish_reason, done) {
        (Some(reason), _) => reason,
        (None, true) => "stop".to_owned(),
        (None, false) => {
            return Err(LlmError::bad_response(
                "the LLM stream ended before the reply was complete",
            ));
        }
    };
    Ok(Completion {
        content,
        finish_reason,
        prompt_tokens,
        completion_tokens,
        provider_pause: None,
    })
}

/// The error for a non-success status, classified for the retry decision.
fn status_error(
    status: reqwest::StatusCode,
    retry_after: Option<Duration>,
    body: &[u8],
) -> LlmError {
    if status.is_redirection() {
        return LlmError::Permanent {
            code: "llm_bad_response",
            message: format!("the LLM answered with a redirect ({status}), which is not followed"),
        };
    }
    let detail = provider_message(body);
    tracing::warn!(%status, detail = %truncate(&detail, MAX_LOGGED_DETAIL_CHARS), "the LLM answered an error");
    let message = tenant_message(&format!("the LLM answered {status}: {detail}"));
    match status.as_u16() {
        429 => LlmError::Retryable {
            code: RATE_LIMITED,
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
        // The chain names the LLM's host, port and OS errors: logs only.
        tracing::warn!(detail = %truncate(&error_chain(&err), MAX_LOGGED_DETAIL_CHARS), "cannot reach the LLM");
        LlmError::Retryable {
            code: "llm_unavailable",
            message: if err.is_connect() {
                "cannot connect to the LLM".into()
            } else {
                "the connection to the LLM failed".into()
            },
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

/// `text` cut to at most `max` characters (an ellipsis marks the cut).
pub fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        None => text.to_owned(),
        Some((at, _)) => format!("{}…", &text[..at]),
    }
}

/// A message fit to store on a job and show its tenant: control characters
/// (U+0000 included, which PostgreSQL text cannot hold) become spaces, and it
/// is cut to [`MAX_ERROR_MESSAGE_CHARS`].
pub fn tenant_message(text: &str) -> String {
    let cleaned: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    truncate(&cleaned, MAX_ERROR_MESSAGE_CHARS)
}

/// Reply text as it is stored and streamed: U+0000, which PostgreSQL text
/// cannot hold, becomes U+FFFD (the replacement character), so the reply
/// keeps its length and shows where the model emitted a NUL; nothing else
/// changes.
pub fn clean_reply(text: String) -> String {
    if text.contains('\0') {
        text.replace('\0', "\u{FFFD}")
    } else {
        text
    }
}

/// A token count as the LLM reported it, clamped into `0..=i32::MAX`: a
/// hostile or buggy upstream can send negative or huge numbers.
fn token_count(value: Option<&serde_json::Value>) -> Option<i32> {
    let v = value?;
    let n = if let Some(i) = v.as_i64() {
        i
    } else if let Some(u) = v.as_u64() {
        i64::try_from(u).unwrap_or(i64::MAX)
    } else {
        let f = v.as_f64()?;
        if f.is_nan() {
            return None;
        }
        f as i64
    };
    Some(i32::try_from(n.max(0)).unwrap_or(i32::MAX))
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
        prompt_tokens: Option<serde_json::Value>,
        completion_tokens: Option<serde_json::Value>,
    }
    let parsed: Response = serde_json::from_slice(body).map_err(|e| {
        tracing::warn!(error = %e, "unparseable LLM response");
        LlmError::bad_response("the LLM response is not a chat completion")
    })?;
    let choice = parsed
        .choices
        .into_iter()
        .next()
        .ok_or_else(|| LlmError::bad_response("the LLM response has no choices"))?;
    Ok(Completion {
        content: clean_reply(choice.message.content.unwrap_or_default()),
        finish_reason: choice
            .finish_reason
            .map_or_else(|| "stop".to_owned(), |r| tenant_message(&truncate(&r, 64))),
        prompt_tokens: parsed
            .usage
            .as_ref()
            .and_then(|u| token_count(u.prompt_tokens.as_ref())),
        completion_tokens: parsed
            .usage
            .as_ref()
            .and_then(|u| token_count(u.completion_tokens.as_ref())),
        provider_pause: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_durations_parse_like_openai_writes_them() {
        let ms = |t: &str| parse_reset(t).map(|d| d.as_millis());
        assert_eq!(ms("1s"), Some(1000));
        assert_eq!(ms("6m0s"), Some(360_000));
        assert_eq!(ms("120ms"), Some(120));
        assert_eq!(ms("1.5s"), Some(1500));
        assert_eq!(ms("1h2m3.5s"), Some(3_723_500));
        assert_eq!(ms("2"), Some(2000));
        assert_eq!(ms("soon"), None);
        assert_eq!(ms("5x"), None);
    }

    #[test]
    fn exhausted_limits_pause_until_their_reset() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(
            "x-ratelimit-remaining-requests",
            "3".parse().unwrap_or_else(|_| unreachable!()),
        );
        h.insert(
            "x-ratelimit-reset-requests",
            "2s".parse().unwrap_or_else(|_| unreachable!()),
        );
        assert_eq!(exhausted_for(&h), None);
        h.insert(
            "x-ratelimit-remaining-tokens",
            "0".parse().unwrap_or_else(|_| unreachable!()),
        );
        h.insert(
            "x-ratelimit-reset-tokens",
            "750ms".parse().unwrap_or_else(|_| unreachable!()),
        );
        assert_eq!(exhausted_for(&h), Some(Duration::from_millis(750)));
    }

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
    fn nul_in_the_reply_becomes_the_replacement_character() {
        let body = br#"{"choices":[{"message":{"content":"a\u0000b"},"finish_reason":"stop"}]}"#;
        let c = parse_completion(body).expect("valid completion");
        assert_eq!(c.content, "a\u{FFFD}b");
    }

    #[test]
    fn usage_beyond_i32_is_clamped_never_negative() {
        let body = br#"{"choices":[{"message":{"content":"x"}}],
                        "usage":{"prompt_tokens":99999999999999,"completion_tokens":-5}}"#;
        let c = parse_completion(body).expect("valid completion");
        assert_eq!(
            (c.prompt_tokens, c.completion_tokens),
            (Some(i32::MAX), Some(0))
        );
    }

    #[test]
    fn tenant_messages_are_bounded_and_hold_no_control_characters() {
        let huge = format!("x\0y{}", "z".repeat(7_000_000));
        let m = tenant_message(&huge);
        assert!(m.chars().count() <= MAX_ERROR_MESSAGE_CHARS + 1);
        assert!(!m.contains('\0'));
        assert!(m.starts_with("x y"));
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
