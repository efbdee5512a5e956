//! Replaying dead letters: take messages off the dead-letter queue, put
//! their jobs back in the queue, publish them again.

use uuid::Uuid;

use chatq_common::db::jobs;
use chatq_common::domain::JobStatus;
use chatq_common::queue::{DeadLetterDecision, ReplayError, replay_dead_letters};

use crate::AppState;
use crate::error::{ApiError, ApiResult};

/// Replays up to `limit` dead letters; returns how many jobs were requeued.
/// A failed job goes back to `queued` with a fresh attempt budget; a job
/// whose conversation is busy again stays dead-lettered for a later replay;
/// a letter naming no replayable job is discarded.
pub async fn replay(state: &AppState, limit: i64) -> ApiResult<u64> {
    let replayed = replay_dead_letters(
        state.publisher.broker(),
        limit,
        |job_id| decide(state, job_id),
        |id| async move {
            jobs::mark_published(&state.db, id)
                .await
                .map_err(ApiError::from)
        },
    )
    .await
    .map_err(|err| match err {
        ReplayError::Broker(err) => {
            tracing::warn!(error = %err, "dead-letter replay: broker unavailable");
            ApiError::Unavailable("the broker")
        }
        ReplayError::Decide(err) => err,
    })?;
    tracing::info!(replayed, "replayed dead letters");
    Ok(replayed)
}

async fn decide(state: &AppState, job_id: Option<Uuid>) -> ApiResult<DeadLetterDecision> {
    let Some(id) = job_id else {
        return Ok(DeadLetterDecision::Discard);
    };
    let Some(job) = jobs::get_any(&state.db, id).await? else {
        return Ok(DeadLetterDecision::Discard);
    };
    Ok(match job.status {
        JobStatus::Failed if jobs::requeue_failed(&state.db, id).await? => {
            DeadLetterDecision::Requeue(id)
        }
        // Its conversation has another active job by now: later.
        JobStatus::Failed => DeadLetterDecision::Keep,
        // Dead-lettered by the broker's delivery limit while still queued.
        JobStatus::Queued => DeadLetterDecision::Requeue(id),
        _ => DeadLetterDecision::Discard,
    })
}
