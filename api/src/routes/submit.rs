//! The REST front door for submissions: `POST /v1/conversations/{id}/messages`
//! and `POST /v1/chat` validate, then hand the turn to [`crate::submission`]
//! and answer `202` with the job.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use utoipa::ToSchema;

use chatq_common::domain::{Job, Priority};

use super::conversations::{validate_model, validate_new_conversation};
use crate::AppState;
use crate::auth::Tenant;
use crate::error::{ApiError, ApiResult};
use crate::extract::{IdPath, JsonBody};
use crate::submission::{self, Idempotency, Target, TurnInput};
use crate::trace::TraceContext;
use crate::views::JobView;

/// Largest accepted `max_tokens`.
const MAX_TOKENS_LIMIT: i64 = 32_768;
/// Longest accepted `Idempotency-Key`.
const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// Body of `POST /v1/conversations/{id}/messages`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitBody {
    /// The user message, 1 to `CHATQ_MAX_CONTENT_CHARS` (default 100,000)
    /// characters; a body over `CHATQ_MAX_BODY_BYTES` is a 413 first.
    #[schema(min_length = 1, max_length = 100_000)]
    content: String,
    /// The model for this turn (1 to 200 characters); default: the conversation's.
    #[schema(min_length = 1, max_length = 200)]
    model: Option<String>,
    /// Most tokens of the answer.
    #[schema(minimum = 1, maximum = 32_768)]
    max_tokens: Option<i64>,
    /// Sampling temperature.
    #[schema(minimum = 0, maximum = 2)]
    temperature: Option<f64>,
    // Left out of the idempotency hash when absent, as before it existed.
    /// `interactive` (default) or `batch`: batch work runs on capacity
    /// interactive work leaves idle, with a starvation bound.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<crate::openapi::PrioritySchema>)]
    priority: Option<Priority>,
}

/// Body of `POST /v1/chat`: a conversation and its first message at once.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatBody {
    /// The user message, 1 to `CHATQ_MAX_CONTENT_CHARS` (default 100,000)
    /// characters; a body over `CHATQ_MAX_BODY_BYTES` is a 413 first.
    #[schema(min_length = 1, max_length = 100_000)]
    content: String,
    /// The new conversation's system prompt.
    #[schema(max_length = 100_000)]
    system_prompt: Option<String>,
    /// The new conversation's model (1 to 200 characters); default `CHATQ_DEFAULT_MODEL`.
    #[schema(min_length = 1, max_length = 200)]
    model: Option<String>,
    /// Most tokens of the answer.
    #[schema(minimum = 1, maximum = 32_768)]
    max_tokens: Option<i64>,
    /// Sampling temperature.
    #[schema(minimum = 0, maximum = 2)]
    temperature: Option<f64>,
    /// The new conversation's metadata, a JSON object.
    #[schema(value_type = Option<Object>)]
    metadata: Option<serde_json::Value>,
    /// `interactive` (default) or `batch`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<crate::openapi::PrioritySchema>)]
    priority: Option<Priority>,
}

/// `POST /v1/conversations/{id}/messages` → 202 job.
#[utoipa::path(
    post,
    path = "/v1/conversations/{id}/messages",
    operation_id = "submitMessage",
    tag = "jobs",
    summary = "Submit a message",
    description = "Stores the user message and a job for the answer, and enqueues the job. `202` means both are committed: from then on the job reaches a terminal state. The worker appends the answer to the conversation as an `assistant` message.",
    params(
        ("id" = Uuid, Path, description = "The conversation's id."),
        crate::openapi::IdempotencyKey,
    ),
    request_body = SubmitBody,
    responses(
        (status = 202, description = "Accepted: the job, `queued` (or, for a repeated `Idempotency-Key`, the original job in its current state).", body = JobView,
            headers(("Location" = String, description = "`/v1/jobs/{id}`"))),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 404, response = crate::openapi::NotFound),
        (status = 409, response = crate::openapi::Conflict),
        (status = 413, response = crate::openapi::PayloadTooLarge),
        (status = 415, response = crate::openapi::UnsupportedMediaType),
        (status = 429, response = crate::openapi::TooManyRequests),
        (status = 503, response = crate::openapi::Unavailable),
    ),
    security(("api_key" = [])),
)]
pub async fn submit(
    State(state): State<AppState>,
    tenant: Tenant,
    IdPath(conversation_id): IdPath,
    headers: HeaderMap,
    Extension(trace): Extension<TraceContext>,
    JsonBody(body): JsonBody<SubmitBody>,
) -> ApiResult<Response> {
    let idempotency = idempotency(&headers, &("messages", conversation_id, &body))?;
    let mut turn = validate_turn(
        &state,
        body.content,
        body.model,
        body.max_tokens,
        body.temperature,
    )?;
    turn.priority = body.priority.unwrap_or_default();
    turn.trace_parent = Some(trace.traceparent());
    let job = submission::submit(
        &state,
        &tenant,
        Target::Existing(conversation_id),
        turn,
        idempotency.as_ref(),
    )
    .await?;
    Ok(accepted(&state, job).await)
}

/// `POST /v1/chat` → 202 job in a new conversation.
#[utoipa::path(
    post,
    path = "/v1/chat",
    operation_id = "startChat",
    tag = "jobs",
    summary = "Start a conversation with a message",
    description = "A one-shot convenience: creates a conversation and submits its first message in one call.",
    params(crate::openapi::IdempotencyKey),
    request_body = ChatBody,
    responses(
        (status = 202, description = "Accepted: the job, `queued` (or, for a repeated `Idempotency-Key`, the original job in its current state).", body = JobView,
            headers(("Location" = String, description = "`/v1/jobs/{id}`"))),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 409, response = crate::openapi::Conflict),
        (status = 413, response = crate::openapi::PayloadTooLarge),
        (status = 415, response = crate::openapi::UnsupportedMediaType),
        (status = 429, response = crate::openapi::TooManyRequests),
        (status = 503, response = crate::openapi::Unavailable),
    ),
    security(("api_key" = [])),
)]
pub async fn chat(
    State(state): State<AppState>,
    tenant: Tenant,
    headers: HeaderMap,
    Extension(trace): Extension<TraceContext>,
    JsonBody(body): JsonBody<ChatBody>,
) -> ApiResult<Response> {
    let idempotency = idempotency(&headers, &("chat", &body))?;
    let mut turn = validate_turn(
        &state,
        body.content,
        None,
        body.max_tokens,
        body.temperature,
    )?;
    turn.priority = body.priority.unwrap_or_default();
    turn.trace_parent = Some(trace.traceparent());
    let new = validate_new_conversation(&state, body.system_prompt, body.model, body.metadata)?;
    let job = submission::submit(
        &state,
        &tenant,
        Target::New(new),
        turn,
        idempotency.as_ref(),
    )
    .await?;
    Ok(accepted(&state, job).await)
}

/// Checks the fields of a turn against API.md's rules.
pub fn validate_turn(
    state: &AppState,
    content: String,
    model: Option<String>,
    max_tokens: Option<i64>,
    temperature: Option<f64>,
) -> ApiResult<TurnInput> {
    let max_chars = state.config.max_content_chars;
    if content.is_empty() {
        return Err(ApiError::invalid("content: must not be empty"));
    }
    if content.chars().count() > max_chars {
        return Err(ApiError::invalid(format!(
            "content: must be at most {max_chars} characters"
        )));
    }
    crate::validate::no_nul("content", &content)?;
    let max_tokens = match max_tokens {
        None => None,
        Some(n) if (1..=MAX_TOKENS_LIMIT).contains(&n) => i32::try_from(n).ok(),
        Some(_) => {
            return Err(ApiError::invalid(format!(
                "max_tokens: must be an integer from 1 to {MAX_TOKENS_LIMIT}"
            )));
        }
    };
    if temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
        return Err(ApiError::invalid(
            "temperature: must be a number from 0 to 2",
        ));
    }
    let model = super::conversations::check_model_offered(state, validate_model(model)?)?;
    Ok(TurnInput {
        content,
        model,
        max_tokens,
        temperature,
        priority: Priority::default(),
        sampling: None,
        trace_parent: None,
    })
}

/// The `Idempotency-Key` header, if given (1–255 visible ASCII characters),
/// with the hash of `request`, which is only computed when there is a key.
pub fn idempotency(
    headers: &HeaderMap,
    request: &impl Serialize,
) -> ApiResult<Option<Idempotency>> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let bytes = value.as_bytes();
    if bytes.is_empty()
        || bytes.len() > MAX_IDEMPOTENCY_KEY_LEN
        || !bytes.iter().all(|b| b.is_ascii_graphic())
    {
        return Err(ApiError::invalid(format!(
            "Idempotency-Key: must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} visible ASCII characters"
        )));
    }
    // Serialising a derived struct is deterministic: same request, same bytes.
    let serialized = serde_json::to_vec(request).unwrap_or_default();
    Ok(Some(Idempotency {
        key: String::from_utf8_lossy(bytes).into_owned(),
        request_hash: sha2::Sha256::digest(&serialized).to_vec(),
    }))
}

async fn accepted(state: &AppState, job: Job) -> Response {
    let location = format!("/v1/jobs/{}", job.id);
    (
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(state.job_view(job).await),
    )
        .into_response()
}
