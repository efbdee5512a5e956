//! Group commit for the worker's per-job statements: claims, prompt reads
//! and results of concurrent jobs share one statement each ([`GroupCommit`]).
//! Both statements `NOTIFY`, and PostgreSQL serialises the commits of
//! notifying transactions, so one commit per batch instead of one per job
//! is what lets a worker with thousands of calls in flight keep up.
//!
//! A batch that fails for another reason than an unreachable database is
//! retried item by item with the one-job statements, so one bad item cannot
//! fail the others.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use sqlx::PgPool;
use uuid::Uuid;

use chatq_common::db::messages::{self, PromptSource};
use chatq_common::db::{self, jobs};
use chatq_common::domain::Job;
use chatq_common::group::{Batch, GroupCommit, answer_all, answer_alone};

/// Batches being committed at once, at most, per kind.
const EXECUTORS: usize = 4;
/// Items per statement, at most.
const MAX_BATCH: usize = 256;

type ClaimResult = sqlx::Result<Option<Job>>;
type ReadResult = sqlx::Result<Option<PromptSource>>;
type WriteResult = sqlx::Result<bool>;

/// Claims jobs and writes their results in batches.
#[derive(Clone)]
pub struct JobStore {
    claims: GroupCommit<(Uuid, Uuid), ClaimResult>,
    prompts: GroupCommit<(Uuid, Uuid), ReadResult>,
    results: GroupCommit<jobs::Success, WriteResult>,
}

impl JobStore {
    /// Starts the executors; claims hold for `lease` without a heartbeat.
    pub fn start(db: PgPool, lease: Duration) -> Self {
        let claim_db = db.clone();
        let claims = GroupCommit::start(EXECUTORS, MAX_BATCH, move |batch| {
            let db = claim_db.clone();
            async move { claim_batch(&db, batch, lease).await }
        });
        let read_db = db.clone();
        let prompts = GroupCommit::start(EXECUTORS, MAX_BATCH, move |batch| {
            let db = read_db.clone();
            async move { read_batch(&db, batch).await }
        });
        let results = GroupCommit::start(EXECUTORS, MAX_BATCH, move |batch| {
            let db = db.clone();
            async move { succeed_batch(&db, batch).await }
        });
        Self {
            claims,
            prompts,
            results,
        }
    }

    /// [`jobs::claim`] (any model), batched with concurrent claims: `hint`
    /// is the job the message names.
    pub async fn claim(&self, hint: Uuid, token: Uuid) -> ClaimResult {
        self.claims
            .run((hint, token))
            .await
            .unwrap_or(Err(sqlx::Error::PoolClosed))
    }

    /// [`messages::prompt_source`], batched with concurrent reads.
    pub async fn prompt_source(&self, tenant_id: Uuid, conversation_id: Uuid) -> ReadResult {
        self.prompts
            .run((tenant_id, conversation_id))
            .await
            .unwrap_or(Err(sqlx::Error::PoolClosed))
    }

    /// [`jobs::succeed`], batched with concurrent results.
    pub async fn succeed(&self, success: jobs::Success) -> WriteResult {
        self.results
            .run(success)
            .await
            .unwrap_or(Err(sqlx::Error::PoolClosed))
    }
}

async fn claim_batch(db: &PgPool, batch: Batch<(Uuid, Uuid), ClaimResult>, lease: Duration) {
    let (claims, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
    match jobs::claim_many(db, &claims, None, lease).await {
        Ok(claimed) => {
            let mut claimed: HashMap<Uuid, Job> = claimed
                .into_iter()
                .filter_map(|job| Some((job.claim_token?, job)))
                .collect();
            for ((_, token), reply) in claims.into_iter().zip(replies) {
                let _ = reply.send(Ok(claimed.remove(&token)));
            }
        }
        Err(err) if db::is_unavailable(&err) => {
            answer_all(replies, || Err(db::unavailable_copy(&err)));
        }
        Err(err) => {
            tracing::warn!(error = %err, claims = claims.len(), "claim batch failed; claiming one by one");
            for ((id, token), reply) in claims.into_iter().zip(replies) {
                answer_alone(reply, {
                    let db = db.clone();
                    async move { jobs::claim(&db, id, token, None, lease).await }
                });
            }
        }
    }
}

async fn read_batch(db: &PgPool, batch: Batch<(Uuid, Uuid), ReadResult>) {
    let (keys, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
    match messages::prompt_sources(db, &keys).await {
        Ok(sources) => {
            for ((_, conversation_id), reply) in keys.into_iter().zip(replies) {
                let _ = reply.send(Ok(sources.get(&conversation_id).cloned()));
            }
        }
        Err(err) if db::is_unavailable(&err) => {
            answer_all(replies, || Err(db::unavailable_copy(&err)));
        }
        Err(err) => {
            tracing::warn!(error = %err, reads = keys.len(), "prompt read batch failed; reading one by one");
            for ((tenant_id, conversation_id), reply) in keys.into_iter().zip(replies) {
                answer_alone(reply, {
                    let db = db.clone();
                    async move { messages::prompt_source(&db, tenant_id, conversation_id).await }
                });
            }
        }
    }
}

async fn succeed_batch(db: &PgPool, mut batch: Batch<jobs::Success, WriteResult>) {
    batch.sort_by_key(|(s, _)| s.id);
    let (results, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
    match jobs::succeed_many(db, &results).await {
        Ok(written) => {
            let written: HashSet<(Uuid, Uuid)> = written.into_iter().collect();
            for (s, reply) in results.iter().zip(replies) {
                let _ = reply.send(Ok(written.contains(&(s.id, s.token))));
            }
        }
        Err(err) if db::is_unavailable(&err) => {
            answer_all(replies, || Err(db::unavailable_copy(&err)));
        }
        Err(err) => {
            tracing::warn!(error = %err, results = results.len(), "result batch failed; writing one by one");
            for (s, reply) in results.into_iter().zip(replies) {
                answer_alone(reply, {
                    let db = db.clone();
                    async move { jobs::succeed(&db, &s).await }
                });
            }
        }
    }
}
