//! Replaying dead letters: take messages off the dead-letter queue, put
//! their jobs back in the queue, publish them again.

use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions};
use uuid::Uuid;

use chatq_common::db::jobs;
use chatq_common::domain::{JobStatus, QueueMessage};
use chatq_common::queue::{publish_on, timed};

use crate::AppState;
use crate::error::{ApiError, ApiResult};

/// Replays up to `limit` dead letters; returns how many jobs were requeued.
pub async fn replay(state: &AppState, limit: i64) -> ApiResult<u64> {
    let broker = state.publisher.broker();
    let unavailable = |err: chatq_common::queue::QueueError| {
        tracing::warn!(error = %err, "dead-letter replay: broker unavailable");
        ApiError::Unavailable("the broker")
    };
    let ch = broker.channel().await.map_err(unavailable)?;
    let topology = broker.topology();
    let mut replayed = 0;
    let mut kept = Vec::new();
    for _ in 0..limit {
        let got = timed(ch.basic_get(
            topology.dead_queue.as_str().into(),
            BasicGetOptions { no_ack: false },
        ))
        .await
        .map_err(unavailable)?;
        let Some(message) = got else { break };
        let delivery = message.delivery;
        let job_id = serde_json::from_slice::<QueueMessage>(&delivery.data)
            .ok()
            .map(|m| m.job_id());
        match requeue(state, job_id).await? {
            Some(id) => {
                publish_on(&ch, &topology.work_queue, id)
                    .await
                    .map_err(unavailable)?;
                jobs::mark_published(&state.db, id).await?;
                replayed += 1;
                timed(delivery.acker.ack(BasicAckOptions::default()))
                    .await
                    .map_err(unavailable)?;
            }
            None if job_id.is_some() && is_busy_failed(state, job_id).await? => kept.push(delivery),
            None => {
                tracing::info!(?job_id, "dead letter names no replayable job; discarded");
                timed(delivery.acker.ack(BasicAckOptions::default()))
                    .await
                    .map_err(unavailable)?;
            }
        }
    }
    // Jobs whose conversation is busy again stay dead-lettered for a later replay.
    for delivery in kept {
        let requeue = BasicNackOptions {
            requeue: true,
            ..Default::default()
        };
        timed(delivery.acker.nack(requeue))
            .await
            .map_err(unavailable)?;
    }
    tracing::info!(replayed, "replayed dead letters");
    Ok(replayed)
}

/// The job to publish again, if the dead letter names one that can run.
async fn requeue(state: &AppState, job_id: Option<Uuid>) -> ApiResult<Option<Uuid>> {
    let Some(id) = job_id else { return Ok(None) };
    let Some(job) = jobs::get_any(&state.db, id).await? else {
        return Ok(None);
    };
    Ok(match job.status {
        JobStatus::Failed => jobs::requeue_failed(&state.db, id).await?.then_some(id),
        // Dead-lettered by the broker's delivery limit while still queued.
        JobStatus::Queued => Some(id),
        _ => None,
    })
}

async fn is_busy_failed(state: &AppState, job_id: Option<Uuid>) -> ApiResult<bool> {
    let Some(id) = job_id else { return Ok(false) };
    Ok(jobs::get_any(&state.db, id)
        .await?
        .is_some_and(|j| j.status == JobStatus::Failed))
}
