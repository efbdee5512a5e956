//! Dead-letter replay: take messages off `<prefix>.dead` one at a time and
//! let the caller decide, per job, whether it runs again.

use std::future::Future;

use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions};
use uuid::Uuid;

use super::{Publisher, QueueError, publish_on, timed};
use crate::domain::QueueMessage;

/// What to do with one dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterDecision {
    /// Publish this job to the work queue again, then drop the letter.
    Requeue(Uuid),
    /// Leave the letter in the dead-letter queue for a later replay.
    Keep,
    /// Drop the letter (it names no job that can run again).
    Discard,
}

/// Takes up to `limit` dead letters; `decide` sees each one's job id (`None`
/// for a letter that names none) and says what becomes of it; `requeued`
/// is told of each job published again. Letters kept are returned to the
/// dead-letter queue at the end (so one replay does not see them twice).
/// Returns how many jobs were published again.
pub async fn replay_dead_letters<E, D, DF, R, RF>(
    publisher: &Publisher,
    limit: i64,
    mut decide: D,
    mut requeued: R,
) -> Result<u64, ReplayError<E>>
where
    D: FnMut(Option<Uuid>) -> DF,
    DF: Future<Output = Result<DeadLetterDecision, E>>,
    R: FnMut(Uuid) -> RF,
    RF: Future<Output = Result<(), E>>,
{
    let ch = publisher.channel().await?;
    let topology = publisher.topology();
    let mut replayed = 0;
    let mut kept = Vec::new();
    for _ in 0..limit {
        let got = timed(ch.basic_get(
            topology.dead_queue.as_str().into(),
            BasicGetOptions { no_ack: false },
        ))
        .await?;
        let Some(message) = got else { break };
        let delivery = message.delivery;
        let job_id = serde_json::from_slice::<QueueMessage>(&delivery.data)
            .ok()
            .map(|m| m.job_id());
        match decide(job_id).await.map_err(ReplayError::Decide)? {
            DeadLetterDecision::Requeue(id) => {
                publish_on(&ch, &topology.work_queue, id).await?;
                requeued(id).await.map_err(ReplayError::Decide)?;
                replayed += 1;
                timed(delivery.acker.ack(BasicAckOptions::default())).await?;
            }
            DeadLetterDecision::Keep => kept.push(delivery),
            DeadLetterDecision::Discard => {
                tracing::info!(?job_id, "dead letter names no replayable job; discarded");
                timed(delivery.acker.ack(BasicAckOptions::default())).await?;
            }
        }
    }
    for delivery in kept {
        let requeue = BasicNackOptions {
            requeue: true,
            ..Default::default()
        };
        timed(delivery.acker.nack(requeue)).await?;
    }
    Ok(replayed)
}

/// Why a replay stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError<E> {
    /// The broker failed.
    #[error(transparent)]
    Broker(#[from] QueueError),
    /// The caller's decision failed.
    #[error("deciding what to replay failed")]
    Decide(E),
}
