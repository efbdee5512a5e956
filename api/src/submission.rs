//! Submitting a chat turn, whichever front door it came through (the REST
//! routes, the OpenAI facade): bounds checked, the user message and its
//! queued job stored by one statement, the job published with confirms.
//! Returns the job or a [`SubmitError`]; the HTTP mapping lives in one
//! `From` impl per front door.

use uuid::Uuid;

use chatq_common::db::submissions::{self, NewTurn};
use chatq_common::db::{self, conversations, jobs};
use chatq_common::domain::{Job, Priority, Role, new_id};
use chatq_common::queue::QueueError;

use crate::AppState;
use crate::auth::Tenant;
use crate::error::ApiError;
use crate::limits::Refusal;
use crate::routes::conversations::{NewConversation, conversation_row};

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
    /// The lane the job waits in.
    pub priority: Priority,
    /// Upstream sampling parameters forwarded unchanged (a JSON object).
    pub sampling: Option<serde_json::Value>,
    /// W3C `traceparent` of the request (its span as the parent).
    pub trace_parent: Option<String>,
}

/// Where the turn goes.
pub enum Target {
    /// An existing conversation of the tenant.
    Existing(Uuid),
    /// A conversation created in the same transaction.
    New(NewConversation),
    /// A conversation created with earlier turns (the OpenAI facade gets
    /// the whole history in one request), in the same transaction.
    NewWithHistory(NewConversation, Vec<(Role, String)>),
}

/// A client's `Idempotency-Key` and the hash of the request it came with.
pub struct Idempotency {
    /// The key.
    pub key: String,
    /// sha256 of the request: the same key with another request is a conflict.
    pub request_hash: Vec<u8>,
}

/// Why a submission was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The conversation already has a queued or running job.
    #[error("the conversation already has a queued or running job")]
    ConversationBusy,
    /// The idempotency key was used with another request.
    #[error("Idempotency-Key was already used with a different request")]
    KeyReused,
    /// A concurrent request with the same key did not complete.
    #[error("idempotency key was just used by a request that did not complete")]
    KeyRace,
    /// No such conversation for this tenant.
    #[error("no such conversation")]
    NoConversation,
    /// A bound refused it (rate limit, queue full, tenant share, outbox).
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The database failed.
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

impl From<SubmitError> for ApiError {
    fn from(err: SubmitError) -> Self {
        match err {
            SubmitError::ConversationBusy => ApiError::ConversationBusy,
            SubmitError::KeyReused => {
                ApiError::Conflict("Idempotency-Key was already used with a different request")
            }
            SubmitError::KeyRace => ApiError::Conflict(
                "idempotency key was just used by a request that did not complete",
            ),
            SubmitError::NoConversation => ApiError::NotFound("no such conversation"),
            SubmitError::Refused(refusal) => refusal.into(),
            SubmitError::Db(err) => err.into(),
        }
    }
}

/// Stores the turn and its job, publishes it; the job (the original one
/// for an idempotent replay). Every outcome is counted in the metrics.
pub async fn submit(
    state: &AppState,
    tenant: &Tenant,
    target: Target,
    turn: TurnInput,
    idempotency: Option<&Idempotency>,
) -> Result<Job, SubmitError> {
    let submitted = submit_uncounted(state, tenant, target, turn, idempotency).await;
    state.metrics.record_submission(&submitted);
    submitted
}

async fn submit_uncounted(
    state: &AppState,
    tenant: &Tenant,
    target: Target,
    turn: TurnInput,
    idempotency: Option<&Idempotency>,
) -> Result<Job, SubmitError> {
    if let Some(i) = idempotency
        && let Some(existing) = replay(state, tenant, i).await?
    {
        return Ok(existing);
    }
    // Counted after validation, and not for replays (answered above).
    crate::limits::check_rate(state, tenant).await?;
    state.backlogs.check_tenant_share(state, tenant).await?;
    state.backlogs.check_outbox(state).await?;
    let created_conversation = !matches!(target, Target::Existing(_));
    let job = match (
        store(state, tenant, target, turn, idempotency).await,
        idempotency,
    ) {
        // A concurrent request with the same key won; answer as its replay.
        (Err(SubmitError::KeyRace), Some(i)) => {
            return replay(state, tenant, i).await?.ok_or(SubmitError::KeyRace);
        }
        // A concurrent twin with the same key may have made the conversation
        // busy before either reached the key's constraint: replay it.
        (Err(SubmitError::ConversationBusy), Some(i)) => {
            return replay(state, tenant, i)
                .await?
                .ok_or(SubmitError::ConversationBusy);
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
                return Err(Refusal::QueueFull {
                    retry_after_secs: state.positions.seconds_until_room(&state.db).await,
                }
                .into());
            }
        }
        Err(err) => {
            // The job is committed; the relay publishes it once the broker is back.
            tracing::warn!(job_id = %job.id, error = %err, "publish not confirmed; left to the relay");
        }
    }
    Ok(job)
}

async fn replay(
    state: &AppState,
    tenant: &Tenant,
    idempotency: &Idempotency,
) -> Result<Option<Job>, SubmitError> {
    match jobs::find_by_idempotency_key(&state.db, tenant.id, &idempotency.key).await? {
        None => Ok(None),
        Some((job, hash)) if hash.as_deref() == Some(idempotency.request_hash.as_slice()) => {
            Ok(Some(job))
        }
        Some(_) => Err(SubmitError::KeyReused),
    }
}

async fn store(
    state: &AppState,
    tenant: &Tenant,
    target: Target,
    turn: TurnInput,
    idempotency: Option<&Idempotency>,
) -> Result<Job, SubmitError> {
    let (conversation_id, new_conversation, history) = match target {
        Target::Existing(id) => (id, None, None),
        Target::New(new) => {
            let conversation = conversation_row(tenant, new);
            (conversation.id, Some(conversation), None)
        }
        Target::NewWithHistory(new, history) => {
            let conversation = conversation_row(tenant, new);
            (conversation.id, None, Some((conversation, history)))
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
        priority: turn.priority,
        sampling: turn.sampling,
        trace_parent: turn.trace_parent,
        key: Some((tenant.key_id, tenant.max_concurrency)),
    };
    let keyed = idempotency.map(|i| (i.key.as_str(), i.request_hash.as_slice()));
    let stored = match (history, keyed) {
        // The conversation and its history first, then the turn: one transaction.
        (Some((conversation, history)), keyed) => {
            let mut tx = state.db.begin().await?;
            submissions::insert_history(&mut *tx, &conversation, &history).await?;
            let stored = submissions::submit_one(&mut *tx, &turn, keyed).await;
            match stored {
                Ok(job) => tx.commit().await.map(|()| job),
                Err(err) => Err(err),
            }
        }
        // Keyed submissions are rare and need their own conflict handling.
        (None, Some(keyed)) => submissions::submit_one(&state.db, &turn, Some(keyed)).await,
        (None, None) => state.batcher.submit(turn).await,
    };
    let stored = stored.map_err(|err| match db::violated_constraint(&err) {
        Some("jobs_one_active_per_conversation") => SubmitError::ConversationBusy,
        Some("jobs_tenant_idempotency_key") => SubmitError::KeyRace,
        // The conversation was deleted while we submitted to it.
        Some("jobs_conversation_id_fkey" | "messages_conversation_id_fkey") => {
            SubmitError::NoConversation
        }
        _ => err.into(),
    })?;
    stored.ok_or(SubmitError::NoConversation)
}
