//! Runs one job: claim it (a guarded transition), build the prompt, call
//! the LLM (with heartbeats and in-process retries), then write the
//! assistant message and the terminal state in one transaction. No
//! database connection is held across the LLM call.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use chatq_common::db::{self, jobs};
use chatq_common::domain::{Job, new_id};
use chatq_common::queue::Publisher;

use crate::llm::{ChatRequest, Completion, LlmClient, LlmError};
use crate::store::JobStore;
use crate::{WorkerConfig, prompt, retry};

/// Everything a job needs, shared by all of a process's jobs.
pub struct JobContext {
    /// Whether an operator paused consumption (read by the consumer).
    pub paused: tokio::sync::watch::Receiver<bool>,
    /// Claims and results, batched with other jobs'.
    pub store: JobStore,
    /// PostgreSQL pool.
    pub db: PgPool,
    /// The LLM client.
    pub llm: LlmClient,
    /// Publishes delayed retries.
    pub publisher: Publisher,
    /// Settings.
    pub config: WorkerConfig,
}

/// How handling a message ended, which decides its ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The job reached a terminal state (or already had one, or is owned
    /// by a live worker): ack.
    Done,
    /// No such job: a poison message, dead-letter it.
    UnknownJob,
    /// Shutting down: the claim was given back; requeue the message.
    Released,
    /// The job failed for good: dead-letter the message for inspection and
    /// replay.
    Failed,
}

/// Longest retry pause slept in-process; longer ones wait in the broker's
/// delay queue, so a waiting retry does not hold a worker slot.
pub const IN_PROCESS_RETRY_MAX: Duration = Duration::from_secs(1);

/// Longest total wait for the database to come back mid-job.
const DB_RETRY_BUDGET: Duration = Duration::from_secs(120);

/// Runs `op` until it succeeds, retrying while the database is unreachable
/// (with a capped exponential pause), for at most [`DB_RETRY_BUDGET`].
pub async fn with_db_retry<T, F, Fut>(what: &str, mut op: F) -> sqlx::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = sqlx::Result<T>>,
{
    let started = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(100);
    loop {
        match op().await {
            Err(err) if db::is_unavailable(&err) && started.elapsed() < DB_RETRY_BUDGET => {
                tracing::warn!(error = %err, what, "database unavailable; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            other => return other,
        }
    }
}

/// Handles the job `id` from the queue.
pub async fn run_job(
    ctx: &Arc<JobContext>,
    id: Uuid,
    abandon: &CancellationToken,
) -> sqlx::Result<Outcome> {
    let token = Uuid::new_v4();
    let lease = ctx.config.lease;
    let claimed = with_db_retry("claim", || ctx.store.claim(id, token)).await?;
    let Some(job) = claimed else {
        let existing = with_db_retry("read job", || jobs::get_any(&ctx.db, id)).await?;
        return Ok(match existing {
            None => Outcome::UnknownJob,
            Some(j) => {
                tracing::info!(job_id = %id, status = ?j.status, "not queued; skipping duplicate delivery");
                Outcome::Done
            }
        });
    };
    tracing::Span::current().record("job.attempt", job.attempts);
    let request = match load_request(ctx, &job).await? {
        Some(r) => r,
        None => return Ok(Outcome::Done),
    };

    // Heartbeat: keeps the lease while the call runs; stops the call if the
    // claim is lost (cancelled, conversation deleted, reclaimed).
    let lost = CancellationToken::new();
    let heartbeat = tokio::spawn(
        heartbeat(ctx.db.clone(), id, token, lease, lost.clone())
            .instrument(tracing::Span::current()),
    );
    let called = call_with_retries(ctx, &job, token, &request, &lost, abandon).await;
    heartbeat.abort();

    match called {
        Call::Lost => {
            tracing::info!(job_id = %id, "claim lost (cancelled or reclaimed); result discarded");
            Ok(Outcome::Done)
        }
        Call::Deferred { err, delay } => {
            let deferred = with_db_retry("defer", || {
                jobs::defer(&ctx.db, id, token, err.code(), err.message())
            })
            .await?;
            if !deferred {
                return Ok(Outcome::Done);
            }
            match ctx.publisher.publish_delayed(id, delay).await {
                Ok(wait) => {
                    if let Err(e) = jobs::mark_published(&ctx.db, id).await {
                        // The relay may publish it once more; the claim makes that harmless.
                        tracing::warn!(error = %e, "could not record the delayed publish");
                    }
                    tracing::info!(job_id = %id, wait_ms = wait.as_millis(), code = err.code(), "retry scheduled");
                }
                Err(e) => {
                    tracing::warn!(job_id = %id, error = %e, "delay queue unavailable; the relay requeues the job")
                }
            }
            Ok(Outcome::Done)
        }
        Call::Abandoned => {
            with_db_retry("release", || jobs::release(&ctx.db, id, token)).await?;
            tracing::info!(job_id = %id, "released unfinished job back to the queue");
            Ok(Outcome::Released)
        }
        Call::Finished(Ok(completion)) => {
            let message_id = new_id();
            let success = jobs::Success {
                id,
                token,
                message_id,
                content: completion.content,
                finish_reason: completion.finish_reason,
                prompt_tokens: completion.prompt_tokens,
                completion_tokens: completion.completion_tokens,
            };
            let written =
                with_db_retry("write result", || ctx.store.succeed(success.clone())).await?;
            if written {
                tracing::info!(job_id = %id, "job succeeded");
            } else {
                tracing::info!(job_id = %id, "claim lost before the result was written; discarded");
            }
            Ok(Outcome::Done)
        }
        Call::Finished(Err(err)) => {
            let failed = with_db_retry("mark failed", || {
                jobs::fail(&ctx.db, id, token, err.code(), err.message())
            })
            .await?;
            if failed {
                tracing::warn!(job_id = %id, code = err.code(), "job failed");
                Ok(Outcome::Failed)
            } else {
                Ok(Outcome::Done)
            }
        }
    }
}

async fn load_request(ctx: &JobContext, job: &Job) -> sqlx::Result<Option<ChatRequest>> {
    let source = with_db_retry("read conversation", || {
        ctx.store.prompt_source(job.tenant_id, job.conversation_id)
    })
    .await?;
    // The conversation was deleted after the claim: its jobs went with it.
    let Some((system_prompt, history)) = source else {
        return Ok(None);
    };
    Ok(Some(ChatRequest {
        model: job.model.clone(),
        messages: prompt::build(system_prompt.as_deref(), history, ctx.config.history_chars),
        max_tokens: job.max_tokens,
        temperature: job.temperature,
    }))
}

enum Call {
    Finished(Result<Completion, LlmError>),
    /// Retry after `delay`, through the delay queue.
    Deferred {
        err: LlmError,
        delay: Duration,
    },
    Lost,
    Abandoned,
}

async fn call_with_retries(
    ctx: &JobContext,
    job: &Job,
    token: Uuid,
    request: &ChatRequest,
    lost: &CancellationToken,
    abandon: &CancellationToken,
) -> Call {
    let max_attempts = ctx.config.max_attempts.max(1);
    let mut attempt = u32::try_from(job.attempts).unwrap_or(1);
    loop {
        let started = tokio::time::Instant::now();
        let result = tokio::select! {
            r = ctx.llm.complete(request) => r,
            () = lost.cancelled() => return Call::Lost,
            () = abandon.cancelled() => return Call::Abandoned,
        };
        let latency_ms = started.elapsed().as_millis();
        let err = match result {
            Ok(c) => {
                tracing::info!(llm.latency_ms = latency_ms, attempt, "LLM call succeeded");
                return Call::Finished(Ok(c));
            }
            Err(e) => e,
        };
        tracing::warn!(llm.latency_ms = latency_ms, attempt, error = %err, "LLM call failed");
        let LlmError::Retryable { retry_after, .. } = &err else {
            return Call::Finished(Err(err));
        };
        if attempt >= max_attempts {
            return Call::Finished(Err(err));
        }
        let pause = retry::delay(attempt, *retry_after);
        if pause > IN_PROCESS_RETRY_MAX {
            return Call::Deferred { err, delay: pause };
        }
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = lost.cancelled() => return Call::Lost,
            () = abandon.cancelled() => return Call::Abandoned,
        }
        match jobs::retry_attempt(
            &ctx.db,
            job.id,
            token,
            ctx.config.lease,
            err.code(),
            err.message(),
        )
        .await
        {
            Ok(true) => attempt += 1,
            Ok(false) => return Call::Lost,
            // The heartbeat keeps the claim; count the attempt locally.
            Err(e) => {
                tracing::warn!(error = %e, "could not record the retry attempt");
                attempt += 1;
            }
        }
    }
}

async fn heartbeat(db: PgPool, id: Uuid, token: Uuid, lease: Duration, lost: CancellationToken) {
    let every = lease / 3;
    loop {
        tokio::time::sleep(every).await;
        match jobs::heartbeat(&db, id, token, lease).await {
            Ok(true) => {}
            Ok(false) => {
                lost.cancel();
                return;
            }
            // Keep trying: the lease outlives a few missed beats.
            Err(err) => tracing::warn!(error = %err, "heartbeat failed"),
        }
    }
}
