//! The OpenAI-compatible facade's wire format: the chat completions request
//! (read strictly: a parameter chatq does not support is a `400` naming it,
//! never dropped), its answers (`chat.completion`, `chat.completion.chunk`),
//! and OpenAI's error shape `{"error": {"message", "type", "param", "code"}}`.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use chatq_common::domain::{Job, JobStatus, Priority, Role};

use crate::error::ApiError;
use crate::submission::SubmitError;

/// Largest accepted `max_tokens` / `max_completion_tokens`.
const MAX_TOKENS_LIMIT: i64 = 32_768;
/// Most `stop` sequences (as OpenAI).
const MAX_STOP_SEQUENCES: usize = 4;

/// An error in OpenAI's shape, with OpenAI's status codes, so the official
/// SDKs raise the matching exception class (and retry 429/5xx).
#[derive(Debug)]
pub struct OpenAiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<String>,
    code: Option<String>,
    retry_after_secs: Option<u64>,
}

impl OpenAiError {
    /// A `400 invalid_request_error` about `param`.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.into()),
            code: None,
            retry_after_secs: None,
        }
    }

    /// A `400` for a parameter chatq does not support (yet).
    pub fn unsupported(param: &str) -> Self {
        let mut err = Self::invalid(
            param,
            format!("`{param}` is not supported by chatq; remove it from the request"),
        );
        err.code = Some("unsupported_parameter".into());
        err
    }

    /// `404 model_not_found`.
    pub fn model_not_found(model: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{model}` does not exist or you do not have access to it."),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found".into()),
            retry_after_secs: None,
        }
    }

    /// The error of a job that did not succeed: `502` when the LLM failed
    /// (an upstream error), `500` otherwise; `code` is the job's error code.
    pub fn from_job(job: &Job) -> Self {
        let (status, code, message) = match job.status {
            JobStatus::Cancelled => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "job_cancelled".to_owned(),
                "the job was cancelled before it finished".to_owned(),
            ),
            _ => {
                let code = job
                    .error_code
                    .clone()
                    .unwrap_or_else(|| "internal_error".into());
                // The provider refused the request itself (e.g. too long a
                // context): a 400 as OpenAI would answer it, which the SDKs
                // do not retry. Other LLM failures are upstream errors.
                let status = match code.as_str() {
                    "llm_rejected" => StatusCode::BAD_REQUEST,
                    c if c.starts_with("llm_") => StatusCode::BAD_GATEWAY,
                    _ => StatusCode::INTERNAL_SERVER_ERROR,
                };
                let message = job
                    .error_message
                    .clone()
                    .unwrap_or_else(|| "the job failed".into());
                (status, code, message)
            }
        };
        let kind = if status == StatusCode::BAD_REQUEST {
            "invalid_request_error"
        } else {
            "server_error"
        };
        Self {
            status,
            message,
            kind,
            param: None,
            code: Some(code),
            retry_after_secs: None,
        }
    }

    /// `504`: the job did not finish within `CHATQ_COMPLETIONS_TIMEOUT_SECS`.
    pub fn timed_out(secs: u64) -> Self {
        Self {
            status: StatusCode::GATEWAY_TIMEOUT,
            message: format!(
                "the completion did not finish within {secs} s; its job was cancelled"
            ),
            kind: "timeout",
            param: None,
            code: Some("timeout".into()),
            retry_after_secs: None,
        }
    }

    /// The error object (for a mid-stream `data: {"error": …}` event too).
    pub fn body(&self) -> OpenAiErrorBody {
        OpenAiErrorBody {
            error: OpenAiErrorDetail {
                message: self.message.clone(),
                kind: self.kind,
                param: self.param.clone(),
                code: self.code.clone(),
            },
        }
    }
}

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"error": {"message": "you must provide a model parameter", "type": "invalid_request_error", "param": "model", "code": null}}))]
pub struct OpenAiErrorBody {
    /// What went wrong.
    pub error: OpenAiErrorDetail,
}

/// The error of an [`OpenAiErrorBody`].
#[derive(Debug, Serialize, ToSchema)]
pub struct OpenAiErrorDetail {
    /// For people.
    pub message: String,
    /// `invalid_request_error`, `requests`, `server_error` or `timeout`.
    #[serde(rename = "type")]
    #[schema(value_type = String)]
    pub kind: &'static str,
    /// The offending parameter, if any.
    pub param: Option<String>,
    /// Machine-readable code, if any (e.g. `invalid_api_key`,
    /// `model_not_found`, `rate_limit_exceeded`, `unsupported_parameter`,
    /// `stream_diverged`, `timeout`, or the job's error code).
    pub code: Option<String>,
}

impl From<ApiError> for OpenAiError {
    fn from(err: ApiError) -> Self {
        let status = err.status();
        let retry_after_secs = err.retry_after_secs();
        let (kind, code) = match (status.as_u16(), err.code()) {
            (401, _) => ("invalid_request_error", "invalid_api_key"),
            (429, "rate_limited") => ("requests", "rate_limit_exceeded"),
            (429, code) => ("requests", code),
            (500..=599, code) => ("server_error", code),
            (_, code) => ("invalid_request_error", code),
        };
        let message = match &err {
            // Logged once by the chatq mapping; never shown.
            ApiError::Internal(inner) => {
                tracing::error!(error = ?inner, "internal error");
                "internal error".to_owned()
            }
            ApiError::Unauthorized => "Incorrect API key provided.".to_owned(),
            other => other.to_string(),
        };
        // chatq's messages name the field first (`content: …`).
        let param = (status == StatusCode::BAD_REQUEST)
            .then(|| message.split_once(": ").map(|(field, _)| field.to_owned()))
            .flatten()
            .filter(|f| !f.contains(' '));
        Self {
            status,
            message,
            kind,
            param,
            code: Some(code.to_owned()),
            retry_after_secs,
        }
    }
}

impl From<SubmitError> for OpenAiError {
    fn from(err: SubmitError) -> Self {
        ApiError::from(err).into()
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let body = self.body();
        let mut response = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after_secs {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// The body of `POST /v1/chat/completions` as documented in the OpenAPI
/// document. The handler reads the body field by field
/// ([`CompletionRequest::parse`]); a parameter of OpenAI's API that chatq
/// does not support (`tools`, `response_format`, `logprobs`, ...) is a 400
/// naming it, never ignored.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = ChatCompletionRequest)]
pub struct CompletionRequestSchema {
    /// The model (at most 200 characters); with `CHATQ_MODELS` set, one of
    /// `GET /v1/models` (else `404 model_not_found`).
    #[schema(min_length = 1, max_length = 200)]
    pub model: String,
    /// The conversation so far; the last message must be a `user` message.
    /// Leading `system`/`developer` messages become the system prompt.
    #[schema(min_items = 1)]
    pub messages: Vec<MessageSchema>,
    /// Most tokens of the answer.
    #[schema(required = false, minimum = 1, maximum = 32_768)]
    pub max_tokens: i64,
    /// Most tokens of the answer (forwarded to the model).
    #[schema(minimum = 1, maximum = 32_768)]
    pub max_completion_tokens: Option<i64>,
    /// Sampling temperature.
    #[schema(required = false, minimum = 0, maximum = 2)]
    pub temperature: f64,
    /// Nucleus sampling (forwarded to the model).
    #[schema(minimum = 0, maximum = 1)]
    pub top_p: Option<f64>,
    /// Forwarded to the model.
    #[schema(minimum = -2, maximum = 2)]
    pub presence_penalty: Option<f64>,
    /// Forwarded to the model.
    #[schema(minimum = -2, maximum = 2)]
    pub frequency_penalty: Option<f64>,
    /// Forwarded to the model.
    pub seed: Option<i64>,
    /// Up to 4 stop sequences (forwarded to the model).
    pub stop: Option<StopSchema>,
    /// An end-user id (at most 256 characters; forwarded to the model).
    #[schema(max_length = 256)]
    pub user: Option<String>,
    /// Choices per request: chatq answers one.
    #[schema(required = false, minimum = 1, maximum = 1)]
    pub n: i64,
    /// Stream the answer as `chat.completion.chunk` events.
    pub stream: Option<bool>,
    /// Only with `stream: true`.
    pub stream_options: Option<StreamOptionsSchema>,
    /// `flex` runs the job in the `batch` lane; the others in `interactive`.
    #[schema(required = false)]
    pub service_tier: ServiceTierSchema,
}

/// A message of a chat completions request.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = ChatMessage)]
pub struct MessageSchema {
    /// Who said it.
    pub role: MessageRoleSchema,
    /// Text, or text parts (joined); not empty, at most
    /// `CHATQ_MAX_CONTENT_CHARS` characters.
    pub content: MessageContentSchema,
    /// A participant name: accepted, not sent to the model.
    #[schema(required = false)]
    pub name: String,
}

/// The role of a [`MessageSchema`].
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[schema(as = ChatMessageRole)]
pub enum MessageRoleSchema {
    /// Instructions (the system prompt when leading).
    System,
    /// Instructions, as `system`.
    Developer,
    /// The user.
    User,
    /// An earlier answer.
    Assistant,
}

/// The content of a [`MessageSchema`].
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
#[schema(as = ChatMessageContent)]
pub enum MessageContentSchema {
    /// Plain text.
    Text(String),
    /// Text parts, joined.
    Parts(Vec<TextPartSchema>),
}

/// A text part of a message's content.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = ChatTextPart)]
pub struct TextPartSchema {
    /// `text`: the only kind of part chatq supports.
    #[serde(rename = "type")]
    pub kind: TextPartKindSchema,
    /// The text.
    pub text: String,
}

/// The kind of a [`TextPartSchema`].
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[schema(as = ChatTextPartKind)]
pub enum TextPartKindSchema {
    /// Text.
    Text,
}

/// `stop`: one sequence or up to 4.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
#[schema(as = ChatStop)]
pub enum StopSchema {
    /// One stop sequence.
    One(String),
    /// Up to 4 stop sequences.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = ChatStreamOptions)]
pub struct StreamOptionsSchema {
    /// End the stream with a chunk carrying `usage`.
    pub include_usage: Option<bool>,
}

/// `service_tier`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[schema(as = ChatServiceTier)]
pub enum ServiceTierSchema {
    /// Interactive lane.
    Auto,
    /// Interactive lane.
    Default,
    /// Interactive lane.
    Priority,
    /// Batch lane.
    Flex,
}

/// A chat completions request, validated.
#[derive(Debug)]
pub struct CompletionRequest {
    /// Model name.
    pub model: String,
    /// Leading `system`/`developer` messages, joined: the system prompt.
    pub system_prompt: Option<String>,
    /// Turns between the system prompt and the last user message.
    pub history: Vec<(Role, String)>,
    /// The last user message: what the job answers.
    pub content: String,
    /// `max_tokens`.
    pub max_tokens: Option<i32>,
    /// `temperature`.
    pub temperature: Option<f64>,
    /// Other sampling parameters, forwarded to the LLM unchanged.
    pub sampling: Map<String, Value>,
    /// `stream`.
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
    /// `service_tier: "flex"` is the batch lane.
    pub priority: Priority,
}

/// Parameters forwarded to the LLM as they are, after a type check.
const FORWARDED: [&str; 7] = [
    "top_p",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "user",
    "max_completion_tokens",
];

/// Parameters of OpenAI's API that chatq does not support yet: a request
/// using one is refused, naming it, rather than answered without it.
const UNSUPPORTED: [&str; 20] = [
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "functions",
    "function_call",
    "audio",
    "modalities",
    "response_format",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "prediction",
    "reasoning_effort",
    "web_search_options",
    "store",
    "metadata",
    "verbosity",
    "prompt_cache_key",
    "safety_identifier",
    "stream_options.unknown",
];

impl CompletionRequest {
    /// Reads and checks a request body (already parsed as a JSON object).
    pub fn parse(body: Map<String, Value>, max_chars: usize) -> Result<Self, OpenAiError> {
        let mut model = None;
        let mut messages = None;
        let mut request = Self {
            model: String::new(),
            system_prompt: None,
            history: Vec::new(),
            content: String::new(),
            max_tokens: None,
            temperature: None,
            sampling: Map::new(),
            stream: false,
            include_usage: false,
            priority: Priority::Interactive,
        };
        let mut stream_options = None;
        for (key, value) in body {
            match key.as_str() {
                "model" => model = Some(string(&key, &value)?),
                "messages" => messages = Some(value),
                "max_tokens" => {
                    let n = integer(&key, &value, 1, MAX_TOKENS_LIMIT)?;
                    request.max_tokens = i32::try_from(n).ok();
                }
                "temperature" => request.temperature = Some(number(&key, &value, 0.0, 2.0)?),
                "stream" => request.stream = boolean(&key, &value)?,
                "stream_options" => stream_options = Some(value),
                "n" => {
                    if integer(&key, &value, 1, 128)? != 1 {
                        return Err(OpenAiError::invalid(
                            "n",
                            "chatq answers one choice per request: `n` must be 1",
                        ));
                    }
                }
                "service_tier" => {
                    request.priority = match string(&key, &value)?.as_str() {
                        "flex" => Priority::Batch,
                        "auto" | "default" | "priority" => Priority::Interactive,
                        other => {
                            return Err(OpenAiError::invalid(
                                "service_tier",
                                format!("unknown service_tier `{other}`"),
                            ));
                        }
                    }
                }
                k if FORWARDED.contains(&k) => {
                    check_forwarded(k, &value)?;
                    if !value.is_null() {
                        request.sampling.insert(key, value);
                    }
                }
                k if UNSUPPORTED.contains(&k) => return Err(OpenAiError::unsupported(k)),
                _ => {
                    return Err(OpenAiError::invalid(
                        key.clone(),
                        format!("Unrecognized request argument supplied: {key}"),
                    ));
                }
            }
        }
        request.model = model
            .filter(|m| !m.trim().is_empty())
            .ok_or_else(|| OpenAiError::invalid("model", "you must provide a model parameter"))?;
        if request.model.chars().count() > 200 || request.model.contains('\0') {
            return Err(OpenAiError::invalid("model", "invalid model name"));
        }
        if let Some(options) = stream_options.filter(|v| !v.is_null()) {
            if !request.stream {
                return Err(OpenAiError::invalid(
                    "stream_options",
                    "stream_options is only allowed when stream is true",
                ));
            }
            request.include_usage = read_stream_options(options)?;
        }
        let messages = messages
            .ok_or_else(|| OpenAiError::invalid("messages", "you must provide messages"))?;
        request.read_messages(messages, max_chars)?;
        Ok(request)
    }

    fn read_messages(&mut self, messages: Value, max_chars: usize) -> Result<(), OpenAiError> {
        let Value::Array(messages) = messages else {
            return Err(OpenAiError::invalid(
                "messages",
                "messages must be an array",
            ));
        };
        if messages.is_empty() {
            return Err(OpenAiError::invalid(
                "messages",
                "messages must contain at least one message",
            ));
        }
        let mut turns = Vec::with_capacity(messages.len());
        for (i, message) in messages.into_iter().enumerate() {
            turns.push(read_message(i, message, max_chars)?);
        }
        let Some((Role::User, content)) = turns.pop() else {
            return Err(OpenAiError::invalid(
                format!("messages[{}].role", turns.len()),
                "the last message must be a `user` message",
            ));
        };
        // Leading instructions become the conversation's system prompt;
        // later ones stay where they were said.
        let leading = turns.iter().take_while(|(r, _)| *r == Role::System).count();
        let system: Vec<String> = turns.drain(..leading).map(|(_, c)| c).collect();
        self.system_prompt = (!system.is_empty()).then(|| system.join("\n\n"));
        self.history = turns;
        self.content = content;
        Ok(())
    }
}

fn read_message(i: usize, message: Value, max_chars: usize) -> Result<(Role, String), OpenAiError> {
    let Value::Object(fields) = message else {
        return Err(OpenAiError::invalid(
            format!("messages[{i}]"),
            "each message must be an object",
        ));
    };
    let mut role = None;
    let mut content = None;
    for (key, value) in fields {
        match key.as_str() {
            "role" => role = Some(string(&format!("messages[{i}].role"), &value)?),
            "content" => content = Some(value),
            // A participant name: accepted, not sent upstream.
            "name" => {}
            other => return Err(OpenAiError::unsupported(&format!("messages[{i}].{other}"))),
        }
    }
    let role = match role.as_deref() {
        Some("system" | "developer") => Role::System,
        Some("user") => Role::User,
        Some("assistant") => Role::Assistant,
        Some(other) => {
            return Err(OpenAiError::invalid(
                format!("messages[{i}].role"),
                format!(
                    "role `{other}` is not supported by chatq (use system, developer, user or assistant)"
                ),
            ));
        }
        None => {
            return Err(OpenAiError::invalid(
                format!("messages[{i}].role"),
                "each message needs a role",
            ));
        }
    };
    let param = format!("messages[{i}].content");
    let text = match content {
        Some(Value::String(text)) => text,
        Some(Value::Array(parts)) => text_of_parts(&param, parts)?,
        _ => {
            return Err(OpenAiError::invalid(
                param,
                "content must be a string or an array of text parts",
            ));
        }
    };
    if text.is_empty() {
        return Err(OpenAiError::invalid(param, "content must not be empty"));
    }
    if text.contains('\0') {
        return Err(OpenAiError::invalid(
            param,
            "content must not contain U+0000",
        ));
    }
    if text.chars().count() > max_chars {
        return Err(OpenAiError::invalid(
            param,
            format!("content must be at most {max_chars} characters"),
        ));
    }
    Ok((role, text))
}

fn text_of_parts(param: &str, parts: Vec<Value>) -> Result<String, OpenAiError> {
    let mut text = String::new();
    for (j, part) in parts.into_iter().enumerate() {
        let kind = part.get("type").and_then(Value::as_str).unwrap_or_default();
        match (kind, part.get("text").and_then(Value::as_str)) {
            ("text", Some(t)) => text.push_str(t),
            ("text", None) => {
                return Err(OpenAiError::invalid(
                    format!("{param}[{j}].text"),
                    "a text part needs `text`",
                ));
            }
            _ => return Err(OpenAiError::unsupported(&format!("{param}[{j}].type"))),
        }
    }
    Ok(text)
}

fn read_stream_options(options: Value) -> Result<bool, OpenAiError> {
    let Value::Object(options) = options else {
        return Err(OpenAiError::invalid("stream_options", "must be an object"));
    };
    let mut include_usage = false;
    for (key, value) in options {
        match key.as_str() {
            "include_usage" => include_usage = boolean("stream_options.include_usage", &value)?,
            other => {
                return Err(OpenAiError::unsupported(&format!("stream_options.{other}")));
            }
        }
    }
    Ok(include_usage)
}

fn check_forwarded(key: &str, value: &Value) -> Result<(), OpenAiError> {
    if value.is_null() {
        return Ok(());
    }
    match key {
        "top_p" => number(key, value, 0.0, 1.0).map(drop),
        "presence_penalty" | "frequency_penalty" => number(key, value, -2.0, 2.0).map(drop),
        "seed" => integer(key, value, i64::MIN, i64::MAX).map(drop),
        "max_completion_tokens" => integer(key, value, 1, MAX_TOKENS_LIMIT).map(drop),
        "user" => {
            let user = string(key, value)?;
            if user.chars().count() > 256 || user.contains('\0') {
                return Err(OpenAiError::invalid(
                    key,
                    "user must be at most 256 characters",
                ));
            }
            Ok(())
        }
        "stop" => match value {
            Value::String(s) if !s.contains('\0') => Ok(()),
            Value::Array(items)
                if items.len() <= MAX_STOP_SEQUENCES
                    && items
                        .iter()
                        .all(|s| s.as_str().is_some_and(|s| !s.contains('\0'))) =>
            {
                Ok(())
            }
            _ => Err(OpenAiError::invalid(
                key,
                format!(
                    "stop must be a string or an array of at most {MAX_STOP_SEQUENCES} strings"
                ),
            )),
        },
        _ => Ok(()),
    }
}

fn string(key: &str, value: &Value) -> Result<String, OpenAiError> {
    value
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| OpenAiError::invalid(key, format!("{key} must be a string")))
}

fn boolean(key: &str, value: &Value) -> Result<bool, OpenAiError> {
    match value {
        Value::Null => Ok(false),
        Value::Bool(b) => Ok(*b),
        _ => Err(OpenAiError::invalid(
            key,
            format!("{key} must be a boolean"),
        )),
    }
}

fn integer(key: &str, value: &Value, min: i64, max: i64) -> Result<i64, OpenAiError> {
    value
        .as_i64()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| {
            OpenAiError::invalid(key, format!("{key} must be an integer from {min} to {max}"))
        })
}

fn number(key: &str, value: &Value, min: f64, max: f64) -> Result<f64, OpenAiError> {
    value
        .as_f64()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| {
            OpenAiError::invalid(key, format!("{key} must be a number from {min} to {max}"))
        })
}

/// The completion id of a job: `chatcmpl-` and the job id (which
/// `GET /v1/jobs/{id}` also accepts).
pub fn completion_id(job: &Job) -> String {
    format!("chatcmpl-{}", job.id)
}

/// OpenAI's `usage` object.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = CompletionUsage)]
pub struct Usage {
    /// Tokens of the prompt.
    pub prompt_tokens: i64,
    /// Tokens of the answer.
    pub completion_tokens: i64,
    /// Their sum.
    pub total_tokens: i64,
}

/// OpenAI's `usage` object of a finished job.
pub fn usage(job: &Job) -> Usage {
    let prompt = i64::from(job.prompt_tokens.unwrap_or(0));
    let completion = i64::from(job.completion_tokens.unwrap_or(0));
    Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt + completion,
    }
}

/// A `chat.completion` object.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChatCompletion {
    /// `chatcmpl-` and the job's id (which `GET /v1/jobs/{id}` also accepts).
    pub id: String,
    /// `chat.completion`.
    #[schema(value_type = String)]
    pub object: &'static str,
    /// Unix time of the job's creation, in seconds.
    pub created: i64,
    /// The model.
    pub model: String,
    /// One choice.
    pub choices: Vec<CompletionChoice>,
    /// Tokens used.
    pub usage: Usage,
    /// `flex` for the batch lane, else `default`.
    #[schema(value_type = String)]
    pub service_tier: &'static str,
    /// Always `null`.
    #[schema(value_type = Option<String>)]
    pub system_fingerprint: Option<()>,
}

/// The choice of a `chat.completion`.
#[derive(Debug, Serialize, ToSchema)]
pub struct CompletionChoice {
    /// Always 0.
    pub index: u32,
    /// The answer.
    pub message: CompletionMessage,
    /// Always `null`.
    #[schema(value_type = Option<Object>)]
    pub logprobs: Option<()>,
    /// `stop`, `length`, ...
    pub finish_reason: String,
}

/// The assistant message of a `chat.completion`.
#[derive(Debug, Serialize, ToSchema)]
pub struct CompletionMessage {
    /// `assistant`.
    #[schema(value_type = String)]
    pub role: &'static str,
    /// The answer.
    pub content: String,
    /// Always `null`.
    #[schema(value_type = Option<String>)]
    pub refusal: Option<()>,
}

/// A `chat.completion.chunk`: one event of a streamed completion (`data:`
/// lines; the stream ends with `data: [DONE]`, or with an error event in
/// OpenAI's error shape).
#[derive(Debug, Serialize, ToSchema)]
pub struct ChatCompletionChunk {
    /// `chatcmpl-` and the job's id.
    pub id: String,
    /// `chat.completion.chunk`.
    #[schema(value_type = String)]
    pub object: &'static str,
    /// Unix time of the job's creation, in seconds.
    pub created: i64,
    /// The model.
    pub model: String,
    /// One choice, or none in the final `usage` chunk.
    pub choices: Vec<ChunkChoice>,
    /// Only in the final chunk, with `stream_options.include_usage`.
    pub usage: Option<Usage>,
    /// Always `null`.
    #[schema(value_type = Option<String>)]
    pub system_fingerprint: Option<()>,
}

/// The choice of a `chat.completion.chunk`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChunkChoice {
    /// Always 0.
    pub index: u32,
    /// What the chunk adds.
    pub delta: ChunkDelta,
    /// Always `null`.
    #[schema(value_type = Option<Object>)]
    pub logprobs: Option<()>,
    /// Set in the last chunk with a choice.
    pub finish_reason: Option<String>,
}

/// What a chunk adds: the role (first chunk), text, or nothing (last chunk).
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct ChunkDelta {
    /// `assistant`, in the first chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub role: Option<&'static str>,
    /// The next piece of text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

impl ChunkDelta {
    /// The first chunk's delta: the role and empty text.
    pub fn role() -> Self {
        Self {
            role: Some("assistant"),
            content: Some(String::new()),
        }
    }

    /// A delta of text.
    pub fn text(content: String) -> Self {
        Self {
            role: None,
            content: Some(content),
        }
    }
}

/// The `chat.completion` object of a succeeded job.
pub fn completion(job: &Job) -> ChatCompletion {
    ChatCompletion {
        id: completion_id(job),
        object: "chat.completion",
        created: job.created_at.timestamp(),
        model: job.model.clone(),
        choices: vec![CompletionChoice {
            index: 0,
            message: CompletionMessage {
                role: "assistant",
                content: job.result_content.clone().unwrap_or_default(),
                refusal: None,
            },
            logprobs: None,
            finish_reason: job.finish_reason.as_deref().unwrap_or("stop").to_owned(),
        }],
        usage: usage(job),
        service_tier: if job.priority == Priority::Batch {
            "flex"
        } else {
            "default"
        },
        system_fingerprint: None,
    }
}

/// A `chat.completion.chunk` with one choice (`delta`, `finish_reason`),
/// or with none and `usage`.
pub fn chunk(
    job: &Job,
    delta: Option<ChunkDelta>,
    finish_reason: Option<&str>,
    usage: Option<Usage>,
) -> ChatCompletionChunk {
    let choices = match delta {
        Some(delta) => vec![ChunkChoice {
            index: 0,
            delta,
            logprobs: None,
            finish_reason: finish_reason.map(str::to_owned),
        }],
        None => vec![],
    };
    ChatCompletionChunk {
        id: completion_id(job),
        object: "chat.completion.chunk",
        created: job.created_at.timestamp(),
        model: job.model.clone(),
        choices,
        usage,
        system_fingerprint: None,
    }
}

/// The `data:` of an event: the JSON of `value` (the facade's types
/// always serialize).
pub fn event_data(value: &impl Serialize) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse(body: Value) -> Result<CompletionRequest, OpenAiError> {
        let Value::Object(map) = body else {
            panic!("test bodies are objects")
        };
        CompletionRequest::parse(map, 1000)
    }

    #[test]
    fn a_full_request_is_read_and_sampling_is_forwarded() {
        let r = parse(json!({
            "model": "m", "temperature": 0.5, "top_p": 0.9, "stop": ["x"], "seed": 7,
            "max_completion_tokens": 20, "stream": true,
            "stream_options": {"include_usage": true}, "service_tier": "flex",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "system", "content": [{"type": "text", "text": "and kind"}]},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
            ]
        }))
        .expect("valid");
        assert_eq!(r.system_prompt.as_deref(), Some("be brief\n\nand kind"));
        assert_eq!(
            r.history,
            vec![(Role::User, "hi".into()), (Role::Assistant, "hello".into())]
        );
        assert_eq!(r.content, "ab");
        assert!(r.stream && r.include_usage);
        assert_eq!(r.priority, Priority::Batch);
        assert_eq!(r.sampling.len(), 4);
    }

    #[test]
    fn unsupported_and_unknown_parameters_are_named() {
        for (body, param) in [
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2}),
                "n",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": []}),
                "tools",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "foo": 1}),
                "foo",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
                "messages[0].content[0].type",
            ),
            (
                json!({"model": "m", "messages": [{"role": "tool", "content": "x"}]}),
                "messages[0].role",
            ),
            (
                json!({"model": "m", "messages": [{"role": "assistant", "content": "x"}]}),
                "messages[0].role",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}]}),
                "model",
            ),
        ] {
            let err = parse(body).expect_err("refused");
            assert_eq!(err.status, StatusCode::BAD_REQUEST);
            assert_eq!(err.param.as_deref(), Some(param));
        }
    }
}
