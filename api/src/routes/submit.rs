//! Submitting a message: one transaction stores the user message and a
//! queued job, then the job is published with confirms and answered 202.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use uuid::Uuid;

use chatq_common::db::submissions::{self, NewTurn};
use chatq_common::db::{self, conversations, jobs, rate_limits};
use chatq_common::domain::{Job, new_id};
use chatq_common::queue::QueueError;

use super::conversations::{
    NewConversation, conversation_row, validate_model, validate_new_conversation,
};
use crate::AppState;
use crate::auth::Tenant;
use crate::error::{ApiError, ApiResult};
use crate::extract::{IdPath, JsonBody};
use crate::views::JobView;

/// Largest accepted `max_tokens`.
const MAX_TOKENS_LIMIT: i64 = 32_768;
/// Longest accepted `Idempotency-Key`.
const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;
/// Seconds a client is asked to wait when the work queue is full.
const QUEUE_FULL_RETRY_AFTER_SECS: u64 = 5;

/// Body of `POST /v1/conversations/{id}/messages`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitBody {
    content: String,
    model: Option<String>,
    max_tokens: Option<i64>,
    temperature: Option<f64>,
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
}

/// A validated chat turn to queue.
pub struct TurnInput {
    /// The user's message.
    pub content: String,
    /// Model override for this job.
    pub model: Option<String>,
    /// Completion token cap.
    pub max_tokens: Option<i32>,
    /// Sampling temperature.
    pub temperature: Option<f64>,
}

/// Where the turn goes.
pub enum Target {
    /// An existing conversation of the tenant.
    Existing(Uuid),
    /// A conversation created in the same transaction.
    New(NewConversation),
}

/// `POST /v1/conversations/{id}/messages` → 202 job.
pub async fn submit(
    State(state): State<AppState>,
    tenant: Tenant,
    IdPath(conversation_id): IdPath,
    headers: HeaderMap,
    JsonBody(body): JsonBody<SubmitBody>,
) -> ApiResult<Response> {
    check_rate_limit(&state, &tenant).await?;
    let idempotency = idempotency(&headers, &("messages", conversation_id, &body))?;
    let turn = validate_turn(
        &state,
        body.content,
        body.model,
        body.max_tokens,
        body.temperature,
    )?;
    submit_turn(
        &state,
        &tenant,
        Target::Existing(conversation_id),
        turn,
        idempotency.as_ref(),
    )
    .await
}

/// `POST /v1/chat` → 202 job in a new conversation.
pub async fn chat(
    State(state): State<AppState>,
    tenant: Tenant,
    headers: HeaderMap,
    JsonBody(body): JsonBody<ChatBody>,
) -> ApiResult<Response> {
    check_rate_limit(&state, &tenant).await?;
    let idempotency = idempotency(&headers, &("chat", &body))?;
    let turn = validate_turn(
        &state,
        body.content,
        None,
        body.max_tokens,
        body.temperature,
    )?;
    let new = validate_new_conversation(&state, body.system_prompt, body.model, body.metadata)?;
    submit_turn(
        &state,
        &tenant,
        Target::New(new),
        turn,
        idempotency.as_ref(),
    )
    .await
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
    let model = validate_model(model)?;
    Ok(TurnInput {
        content,
        model,
        max_tokens,
        temperature,
    })
}

/// Counts the submission against the key's per-minute limit, if it has one.
async fn check_rate_limit(state: &AppState, tenant: &Tenant) -> ApiResult<()> {
    let Some(limit) = tenant.rate_limit_per_minute else {
        return Ok(());
    };
    let (count, window_left_secs) = rate_limits::hit(&state.db, tenant.key_id).await?;
    if count > limit {
        // Whole seconds, rounded up, so a client that waits is not refused again.
        let retry_after_secs = window_left_secs.max(0.0).ceil() as u64;
        return Err(ApiError::RateLimited {
            retry_after_secs: retry_after_secs.max(1),
        });
    }
    Ok(())
}

/// A client's `Idempotency-Key` and the hash of the request it came with.
pub struct Idempotency {
    key: String,
    request_hash: Vec<u8>,
}

/// The `Idempotency-Key` header, if given (1–255 visible ASCII characters),
/// with the hash of `request`, which is only computed when there is a key.
fn idempotency(headers: &HeaderMap, request: &impl Serialize) -> ApiResult<Option<Idempotency>> {
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

/// Stores the turn and its job (one statement), publishes, answers 202.
pub async fn submit_turn(
    state: &AppState,
    tenant: &Tenant,
    target: Target,
    turn: TurnInput,
    idempotency: Option<&Idempotency>,
) -> ApiResult<Response> {
    if let Some(i) = idempotency
        && let Some(existing) = replay(state, tenant, i).await?
    {
        return Ok(existing);
    }
    let created_conversation = matches!(target, Target::New(_));
    let job = match (
        store_turn(state, tenant, target, turn, idempotency).await,
        idempotency,
    ) {
        (Err(ApiError::Conflict(IDEMPOTENCY_RACE)), Some(i)) => {
            // A concurrent request with the same key won; answer as its replay.
            return replay(state, tenant, i).await?.ok_or(ApiError::Conflict(
                "idempotency key was just used by a request that did not complete",
            ));
        }
        // A concurrent twin with the same key may have made the conversation
        // busy before either reached the key's constraint: replay it.
        (Err(ApiError::ConversationBusy), Some(i)) => {
            return replay(state, tenant, i)
                .await?
                .ok_or(ApiError::ConversationBusy);
        }
        (other, _) => other?,
    };
    match state.publisher.publish(job.id).await {
        Ok(()) => {}
        Err(QueueError::Full) => {
            // Refused by the broker: undo the submission, as if it never came.
            if jobs::withdraw(&state.db, job.id).await? {
                if created_conversation {
                    conversations::delete(&state.db, tenant.id, job.conversation_id).await?;
                }
                return Err(ApiError::QueueFull {
                    retry_after_secs: QUEUE_FULL_RETRY_AFTER_SECS,
                });
            }
        }
        Err(err) => {
            // The job is committed; the relay publishes it once the broker is back.
            tracing::warn!(job_id = %job.id, error = %err, "publish not confirmed; left to the relay");
        }
    }
    Ok(accepted(job))
}

const IDEMPOTENCY_RACE: &str = "idempotency key race";

async fn replay(
    state: &AppState,
    tenant: &Tenant,
    idempotency: &Idempotency,
) -> ApiResult<Option<Response>> {
    match jobs::find_by_idempotency_key(&state.db, tenant.id, &idempotency.key).await? {
        None => Ok(None),
        Some((job, hash)) if hash.as_deref() == Some(idempotency.request_hash.as_slice()) => {
            Ok(Some(accepted(job)))
        }
        Some(_) => Err(ApiError::Conflict(
            "Idempotency-Key was already used with a different request",
        )),
    }
}

async fn store_turn(
    state: &AppState,
    tenant: &Tenant,
    target: Target,
    turn: TurnInput,
    idempotency: Option<&Idempotency>,
) -> ApiResult<Job> {
    let (conversation_id, new_conversation) = match target {
        Target::Existing(id) => (id, None),
        Target::New(new) => {
            let conversation = conversation_row(tenant, new);
            (conversation.id, Some(conversation))
        }
    };
    let turn = NewTurn {
        job_id: new_id(),
        tenant_id: tenant.id,
        conversation_id,
        new_conversation,
        // Empty: the conversation's model.
        model: turn.model.unwrap_or_default(),
        max_tokens: turn.max_tokens,
        temperature: turn.temperature,
        message_id: new_id(),
        content: turn.content,
    };
    let stored = match idempotency {
        // Keyed submissions are rare and need their own conflict handling.
        Some(i) => {
            let keyed = (i.key.as_str(), i.request_hash.as_slice());
            submissions::submit_one(&state.db, &turn, Some(keyed)).await
        }
        None => state.batcher.submit(turn).await,
    };
    let stored = stored.map_err(|err| match db::violated_constraint(&err) {
        Some("jobs_one_active_per_conversation") => ApiError::ConversationBusy,
        Some("jobs_tenant_idempotency_key") => ApiError::Conflict(IDEMPOTENCY_RACE),
        // The conversation was deleted while we submitted to it.
        Some("jobs_conversation_id_fkey" | "messages_conversation_id_fkey") => {
            ApiError::NotFound("no such conversation")
        }
        _ => err.into(),
    })?;
    stored.ok_or(ApiError::NotFound("no such conversation"))
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
