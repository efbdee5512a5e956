//! Group commit for submissions ([`GroupCommit`]): concurrent submissions
//! are stored by one multi-row statement (one round trip, one commit)
//! instead of one each. A turn the batch skipped (its conversation is
//! missing or busy), or a batch that failed for another reason than an
//! unreachable database, is retried alone, so every caller gets the answer
//! it would have got unbatched.

use std::collections::HashMap;

use sqlx::PgPool;
use uuid::Uuid;

use chatq_common::db;
use chatq_common::db::submissions::{self, NewTurn};
use chatq_common::domain::Job;
use chatq_common::group::{Batch, GroupCommit, Reply, answer_all, answer_alone};

/// Batches being committed at once, at most.
const EXECUTORS: usize = 4;
/// Turns per statement, at most.
const MAX_BATCH: usize = 256;

/// Hands turns to the batch executors.
#[derive(Clone)]
pub struct SubmitBatcher {
    group: GroupCommit<NewTurn, sqlx::Result<Option<Job>>>,
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
    /// `jobs_one_active_per_conversation`, as [`submissions::submit_one`] does.
    pub async fn submit(&self, turn: NewTurn) -> sqlx::Result<Option<Job>> {
        self.group
            .run(turn)
            .await
            .unwrap_or(Err(sqlx::Error::PoolClosed))
    }
}

async fn store_batch(db: &PgPool, mut batch: Batch<NewTurn, sqlx::Result<Option<Job>>>) {
    if let [_] = batch.as_slice() {
        if let Some((turn, reply)) = batch.pop() {
            let _ = reply.send(submissions::submit_one(db, &turn, None).await);
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

/// Stores one turn alone, for the exact answer the batch could not give.
fn retry_alone(db: &PgPool, turn: NewTurn, reply: Reply<sqlx::Result<Option<Job>>>) {
    let db = db.clone();
    answer_alone(reply, async move {
        submissions::submit_one(&db, &turn, None).await
    });
}
