//! Group commit for submissions ([`GroupCommit`]): concurrent submissions
//! are stored by one multi-row statement (one round trip, one commit)
//! instead of one each. A turn the batch skipped (its conversation is
//! missing or busy), or a batch that failed for another reason than an
//! unreachable database, is retried alone, so every caller gets the answer
//! it would have got unbatched.

use std::collections::HashMap;

use sqlx::PgPool;
use uuid::Uuid;

use chatq_common::db::jobs::NewJob;
use chatq_common::db::submissions::{self, BatchedTurn, UserTurn};
use chatq_common::db::{self};
use chatq_common::domain::Job;
use chatq_common::group::{Batch, GroupCommit, Reply, answer_all};

/// Batches being committed at once, at most.
const EXECUTORS: usize = 4;
/// Turns per statement, at most.
const MAX_BATCH: usize = 256;

/// Hands turns to the batch executors.
#[derive(Clone)]
pub struct SubmitBatcher {
    group: GroupCommit<BatchedTurn, sqlx::Result<Option<Job>>>,
}

impl SubmitBatcher {
    /// Starts the executors; they stop when every clone of this value is gone.
    pub fn start(db: PgPool) -> Self {
        let group = GroupCommit::start(EXECUTORS, MAX_BATCH, move |batch| {
            let db = db.clone();
            async move { store_batch(&db, batch).await }
        });
        Self { group }
    }

    /// Stores the turn (and its new conversation, if any) and its job. `None`
    /// if the tenant has no such conversation; a busy conversation violates
    /// `jobs_one_active_per_conversation`, as the one-at-a-time statements do.
    pub async fn submit(&self, turn: BatchedTurn) -> sqlx::Result<Option<Job>> {
        self.group
            .run(turn)
            .await
            .unwrap_or(Err(sqlx::Error::PoolClosed))
    }
}

async fn store_batch(db: &PgPool, mut batch: Batch<BatchedTurn, sqlx::Result<Option<Job>>>) {
    if let [_] = batch.as_slice() {
        if let Some((turn, reply)) = batch.pop() {
            let _ = reply.send(store_one(db, &turn, None).await);
        }
        return;
    }
    // One lock order for every batch: concurrent batches that touch the
    // same conversations wait for each other instead of deadlocking.
    batch.sort_by_key(|(turn, _)| turn.conversation_id);
    let (turns, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
    match submissions::submit_many(db, &turns).await {
        Ok(jobs) => {
            let mut stored: HashMap<Uuid, Job> =
                jobs.into_iter().map(|job| (job.id, job)).collect();
            for (turn, reply) in turns.into_iter().zip(replies) {
                match stored.remove(&turn.job_id) {
                    Some(job) => {
                        let _ = reply.send(Ok(Some(job)));
                    }
                    // Skipped: retried alone for the exact answer.
                    None => retry_alone(db, turn, reply),
                }
            }
        }
        Err(err) if db::is_unavailable(&err) => {
            answer_all(replies, || Err(db::unavailable_copy(&err)));
        }
        Err(err) => {
            tracing::debug!(error = %err, turns = turns.len(), "batch failed; storing its turns one by one");
            for (turn, reply) in turns.into_iter().zip(replies) {
                retry_alone(db, turn, reply);
            }
        }
    }
}

fn retry_alone(db: &PgPool, turn: BatchedTurn, reply: Reply<sqlx::Result<Option<Job>>>) {
    let db = db.clone();
    tokio::spawn(async move {
        let _ = reply.send(store_one(&db, &turn, None).await);
    });
}

/// Stores one turn with the one-at-a-time statements, which report exactly
/// what went wrong; `idempotency` is the client's key and request hash.
pub async fn store_one(
    db: &PgPool,
    turn: &BatchedTurn,
    idempotency: Option<(&str, &[u8])>,
) -> sqlx::Result<Option<Job>> {
    let job = NewJob {
        id: turn.job_id,
        tenant_id: turn.tenant_id,
        conversation_id: turn.conversation_id,
        model: &turn.model,
        max_tokens: turn.max_tokens,
        temperature: turn.temperature,
        idempotency_key: idempotency.map(|(key, _)| key),
        request_hash: idempotency.map(|(_, hash)| hash),
    };
    let user_turn = UserTurn {
        message_id: turn.message_id,
        content: &turn.content,
    };
    match &turn.new_conversation {
        None => submissions::submit_to_conversation(db, &job, user_turn).await,
        Some(c) => submissions::submit_with_new_conversation(db, c, &job, user_turn)
            .await
            .map(Some),
    }
}
