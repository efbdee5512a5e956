//! The REST front door for submissions: `POST /v1/conversations/{id}/messages`
//! and `POST /v1/chat` validate, then hand the turn to [`crate::submission`]
//! and answer `202` with the job.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use sha2::Digest;

use chatq_common::domain::{Job, Priority};

use super::conversations::{validate_model, validate_new_conversation};
use crate::AppState;
use crate::auth::Tenant;
use crate::error::{ApiError, ApiResult};
use crate::extract::{IdPath, JsonBody};
use crate::submission::{self, Idempotency, Target, TurnInput};
use crate::views::JobView;

/// Largest accepted `max_tokens`.
const MAX_TOKENS_LIMIT: i64 = 32_768;
/// Longest accepted `Idempotency-Key`.
const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// Body of `POST /v1/conversations/{id}/messages`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitBody {
    content: String,
    model: Option<String>,
    max_tokens: Option<i64>,
    temperature: Option<f64>,
    // Left out of the idempotency hash when absent, as before it existed.
    #[serde(skip_serializing_if = "Option::is_none")]
    priority: Option<Priority>,
}

/// Body of `POST /v1/chat`: a conversation and its first message at once.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatBody {
    content: String,
    system_prompt: Option<String>,
    model: Option<String>,
    max_tokens: Option<i64>,
    temperature: Option<f64>,
    metadata: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    priority: Option<Priority>,
}

/// `POST /v1/conversations/{id}/messages` → 202 job.
pub async fn submit(
    State(state): State<AppState>,
    tenant: Tenant,
    IdPath(conversation_id): IdPath,
    headers: HeaderMap,
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
    let job = submission::submit(
        &state,
        &tenant,
        Target::Existing(conversation_id),
        turn,
        idempotency.as_ref(),
    )
    .await?;
    Ok(accepted(job))
}

/// `POST /v1/chat` → 202 job in a new conversation.
pub async fn chat(
    State(state): State<AppState>,
    tenant: Tenant,
    headers: HeaderMap,
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
    let new = validate_new_conversation(&state, body.system_prompt, body.model, body.metadata)?;
    let job = submission::submit(
        &state,
        &tenant,
        Target::New(new),
        turn,
        idempotency.as_ref(),
    )
    .await?;
    Ok(accepted(job))
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

fn accepted(job: Job) -> Response {
    let location = format!("/v1/jobs/{}", job.id);
    (
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(JobView::from(job)),
    )
        .into_response()
}
