//! Runs one job: claim it (a guarded transition), build the prompt, call
//! the LLM (`attempt`: streamed, with heartbeats and retries), then write
//! the assistant message and the terminal state in one transaction. No
//! database connection is held across the LLM call.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use chatq_common::db::jobs::{self, AttemptEnd};
use chatq_common::db::{self, controls};
use chatq_common::domain::{Job, new_id};
use chatq_common::queue::Publisher;

use crate::attempt::{Call, Failed, Stops, call_with_retries};
use crate::budget::{Acquired, Budget, Permit};
use crate::cancels::CancelWatch;
use crate::llm::{ChatRequest, Completion, LlmClient};
use crate::metrics::{JobOutcome, WorkerMetrics};
use crate::store::JobStore;
use crate::{WorkerConfig, prompt};

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
    /// Publishes delayed retries and streamed text.
    pub publisher: Publisher,
    /// Stops the calls of cancelled jobs at once.
    pub cancels: CancelWatch,
    /// The LLM capacity shared by every worker.
    pub budget: Arc<Budget>,
    /// Prometheus metrics of this process.
    pub metrics: Arc<WorkerMetrics>,
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
    /// The job failed for good: dead-letter it for inspection and replay
    /// (the message, when it was published for this job).
    Failed(Uuid),
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

/// Handles a message of the work queue: starts the next job in start order
/// (see [`jobs::claim`]; `hint` is the job the message was published for)
/// and runs it to its end.
pub async fn run_job(
    ctx: &Arc<JobContext>,
    hint: Uuid,
    abandon: &CancellationToken,
) -> sqlx::Result<Outcome> {
    let _in_flight = ctx.metrics.job_started();
    let token = Uuid::new_v4();
    let lease = ctx.config.lease;
    let (job, permit) = match claim_next(ctx, hint, token, abandon).await? {
        Claimed::Job(job, permit) => (*job, permit),
        Claimed::Not(outcome) => return Ok(outcome),
    };
    let id = job.id;
    crate::span::record_claim(
        &tracing::Span::current(),
        id,
        job.attempts,
        job.trace_parent.as_deref(),
    );
    // Registered right after the claim: a cancellation announced from here
    // on stops the call at once (one announced between the claim and here
    // is caught by the first heartbeat).
    let lost = CancellationToken::new();
    let _registered = ctx.cancels.register(id, lost.clone());
    let request = match load_request(ctx, &job).await? {
        Some(r) => r,
        None => {
            if let Some(permit) = permit {
                ctx.budget.release(permit, None, false).await;
            }
            return Ok(Outcome::Done);
        }
    };

    // Heartbeat: keeps the lease while the call runs; stops the call if the
    // claim is lost (cancelled, conversation deleted, reclaimed). A
    // cancellation's notification stops it at once.
    let heartbeat = tokio::spawn(
        heartbeat(ctx.db.clone(), id, token, lease, lost.clone())
            .instrument(tracing::Span::current()),
    );
    let stops = Stops {
        lost: &lost,
        abandon,
    };
    let first = crate::attempt::FirstCall {
        attempt: job.attempts,
        cost: job.cost,
        permit,
    };
    let called = call_with_retries(ctx, id, token, first, &request, stops).await;
    heartbeat.abort();

    match called {
        Call::Lost => {
            ctx.metrics.job_finished(JobOutcome::Discarded);
            tracing::info!(job_id = %id, "claim lost (cancelled or reclaimed); result discarded");
            Ok(Outcome::Done)
        }
        Call::Deferred { failed, delay } => defer(ctx, id, token, &failed, delay).await,
        Call::Abandoned => {
            with_db_retry("release", || jobs::release(&ctx.db, id, token)).await?;
            ctx.metrics.job_finished(JobOutcome::Released);
            tracing::info!(job_id = %id, "released unfinished job back to the queue");
            Ok(Outcome::Released)
        }
        Call::Finished(Ok(completion)) => succeed(ctx, id, token, completion).await,
        Call::Finished(Err(failed)) => end_failed(ctx, id, token, &failed.end()).await,
    }
}

/// Gives the job back to wait out a long retry delay in the broker.
async fn defer(
    ctx: &JobContext,
    id: Uuid,
    token: Uuid,
    failed: &Failed,
    delay: Duration,
) -> sqlx::Result<Outcome> {
    let end = failed.end();
    let deferred = with_db_retry("defer", || jobs::defer(&ctx.db, id, token, &end, delay)).await?;
    if !deferred {
        ctx.metrics.job_finished(JobOutcome::Discarded);
        return Ok(Outcome::Done);
    }
    ctx.metrics.job_finished(JobOutcome::Deferred);
    match ctx.publisher.publish_delayed(id, delay).await {
        Ok(wait) => {
            if let Err(e) = jobs::mark_published(&ctx.db, id).await {
                // The relay may publish it once more; the claim makes that harmless.
                tracing::warn!(error = %e, "could not record the delayed publish");
            }
            tracing::info!(job_id = %id, wait_ms = wait.as_millis(), code = failed.err.code(), "retry scheduled");
        }
        Err(e) => {
            tracing::warn!(job_id = %id, error = %e, "delay queue unavailable; the relay requeues the job")
        }
    }
    Ok(Outcome::Done)
}

/// Writes the reply and the succeeded state in one statement.
async fn succeed(
    ctx: &JobContext,
    id: Uuid,
    token: Uuid,
    completion: Completion,
) -> sqlx::Result<Outcome> {
    let success = jobs::Success {
        id,
        token,
        message_id: new_id(),
        content: completion.content,
        finish_reason: completion.finish_reason,
        prompt_tokens: completion.prompt_tokens,
        completion_tokens: completion.completion_tokens,
    };
    let written = match with_db_retry("write result", || ctx.store.succeed(success.clone())).await {
        Ok(written) => written,
        // Not an outage: this reply can never be stored. Retrying would
        // call the LLM again and again; the attempt ends here, failed.
        Err(err) if !db::is_unavailable(&err) => {
            tracing::error!(job_id = %id, error = %err, "the reply could not be stored; failing the job");
            let end = AttemptEnd {
                code: "result_unstorable",
                message: "the LLM's reply could not be stored",
                partial: "",
            };
            return end_failed(ctx, id, token, &end).await;
        }
        Err(err) => return Err(err),
    };
    if written {
        ctx.metrics.job_finished(JobOutcome::Succeeded);
        // Debug, as the api logs a successful request: the metrics count
        // successes; failures and retries are logged at info and warn.
        tracing::debug!(job_id = %id, "job succeeded");
    } else {
        ctx.metrics.job_finished(JobOutcome::Discarded);
        tracing::info!(job_id = %id, "claim lost before the result was written; discarded");
    }
    Ok(Outcome::Done)
}

/// Marks the claimed job failed: its message is dead-lettered, unless the
/// claim was lost meanwhile.
async fn end_failed(
    ctx: &JobContext,
    id: Uuid,
    token: Uuid,
    end: &AttemptEnd<'_>,
) -> sqlx::Result<Outcome> {
    let failed = with_db_retry("mark failed", || jobs::fail(&ctx.db, id, token, end)).await?;
    if failed {
        ctx.metrics.job_finished(JobOutcome::Failed);
        tracing::warn!(job_id = %id, code = end.code, "job failed");
        Ok(Outcome::Failed(id))
    } else {
        ctx.metrics.job_finished(JobOutcome::Discarded);
        Ok(Outcome::Done)
    }
}

/// How often a message held during a pause looks at the switch again.
const PAUSED_RECHECK: Duration = Duration::from_millis(250);
/// Pause before claiming again when startable jobs were locked by others.
const RECLAIM_PAUSE: Duration = Duration::from_millis(100);

enum Claimed {
    Job(Box<Job>, Option<Permit>),
    Not(Outcome),
}

/// Claims the next job in start order for this message. With a shared LLM
/// budget, capacity for the next job's model is taken first, so a job
/// waiting for capacity stays `queued`: not started, not an attempt, no
/// database connection held while waiting.
///
/// A message that starts nothing: names no job at all (poison); is held,
/// unacked, while an operator has paused consumption, then claims after
/// `resume`; tries again while startable jobs exist that the claim skipped
/// (locked by another transaction); or, when the only queued jobs are
/// retries waiting out their delay, comes back when the first of them may
/// start. A message may have started another job than its own, so no
/// message is dropped while a queued job may still need it: there are
/// always at least as many messages as queued jobs. Otherwise it was a
/// duplicate.
async fn claim_next(
    ctx: &JobContext,
    hint: Uuid,
    token: Uuid,
    abandon: &CancellationToken,
) -> sqlx::Result<Claimed> {
    let mut paused = ctx.paused.clone();
    let mut held = false;
    loop {
        if !*paused.borrow_and_update() {
            let claimed = if ctx.budget.is_limited() || ctx.budget.is_provider_paused() {
                claim_with_capacity(ctx, hint, token, abandon).await?
            } else {
                with_db_retry("claim", || ctx.store.claim(hint, token))
                    .await?
                    .map(|job| Claimed::Job(Box::new(job), None))
            };
            if let Some(claimed) = claimed {
                if held {
                    tracing::info!("resumed: held message claimed a job");
                }
                return Ok(claimed);
            }
        }
        if with_db_retry("read job", || jobs::get_any(&ctx.db, hint))
            .await?
            .is_none()
        {
            return Ok(Claimed::Not(Outcome::UnknownJob));
        }
        if with_db_retry("read pause", || controls::is_paused(&ctx.db)).await? {
            if !held {
                tracing::info!("paused by an operator: holding the message until resume");
                held = true;
            }
            tokio::select! {
                // The switch as this process last read it; the claim re-checks it.
                resumed = paused.wait_for(|p| !*p) => drop(resumed),
                () = abandon.cancelled() => return Ok(Claimed::Not(Outcome::Released)),
            }
            tokio::time::sleep(PAUSED_RECHECK).await;
            continue;
        }
        // Startable jobs that the claim skipped: another transaction held
        // their rows (a concurrent claim, the relay marking its publishes).
        // Try again: they may still need this message.
        if with_db_retry("read queue", || jobs::has_startable(&ctx.db)).await? {
            if !sleep_unless_abandoned(RECLAIM_PAUSE, abandon).await {
                return Ok(Claimed::Not(Outcome::Released));
            }
            continue;
        }
        let Some(next) = with_db_retry("read retries", || jobs::next_not_before(&ctx.db)).await?
        else {
            // Jobs waiting for their key's slot need messages when it frees.
            if with_db_retry("read parked", || jobs::has_parked(&ctx.db)).await? {
                if !wait_for_key_slot(ctx, abandon).await? {
                    return Ok(Claimed::Not(Outcome::Released));
                }
                continue;
            }
            tracing::debug!(hint = %hint, "nothing to start; duplicate message");
            return Ok(Claimed::Not(Outcome::Done));
        };
        let wait = (next - chrono::Utc::now()).to_std().unwrap_or_default();
        if wait > IN_PROCESS_RETRY_MAX {
            match ctx.publisher.publish_delayed(hint, wait).await {
                Ok(_) => return Ok(Claimed::Not(Outcome::Done)),
                Err(err) => tracing::warn!(error = %err, "delay queue unavailable; waiting here"),
            }
        }
        if !sleep_unless_abandoned(wait.min(Duration::from_secs(5)), abandon).await {
            return Ok(Claimed::Not(Outcome::Released));
        }
    }
}

/// Sleeps for `d`; false, at once, if the message is abandoned meanwhile.
async fn sleep_unless_abandoned(d: Duration, abandon: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => true,
        () = abandon.cancelled() => false,
    }
}

/// Longest wait of a message held for parked jobs before it looks at the
/// queue again (new work arrives with its own message, which may sit behind
/// held ones in a full prefetch buffer).
const PARKED_RECHECK: Duration = Duration::from_secs(1);

/// Holds a message while the only queued jobs are parked (their keys at
/// `max_concurrency`): until a slot is announced or something became
/// startable, checked at most every [`PARKED_RECHECK`] with one query.
/// False if the message was abandoned (shutdown, drain).
async fn wait_for_key_slot(ctx: &JobContext, abandon: &CancellationToken) -> sqlx::Result<bool> {
    loop {
        // Spread the rechecks of many held messages over time.
        let recheck = PARKED_RECHECK.mul_f64(0.5 + fastrand::f64());
        tokio::select! {
            () = ctx.cancels.slot_freed() => return Ok(true),
            () = tokio::time::sleep(recheck) => {}
            () = abandon.cancelled() => return Ok(false),
        }
        if with_db_retry("read queue", || jobs::has_startable(&ctx.db)).await?
            || !with_db_retry("read parked", || jobs::has_parked(&ctx.db)).await?
        {
            return Ok(true);
        }
    }
}

/// Takes LLM capacity for the next startable job's model, then claims the
/// next job of that model. `None` (capacity given back) if there was
/// nothing to claim.
async fn claim_with_capacity(
    ctx: &JobContext,
    hint: Uuid,
    token: Uuid,
    abandon: &CancellationToken,
) -> sqlx::Result<Option<Claimed>> {
    let Some((model, cost)) = with_db_retry("peek", || jobs::peek_next(&ctx.db)).await? else {
        return Ok(None);
    };
    let permit = match ctx.budget.acquire(&model, cost, None, abandon).await {
        Acquired::Ready(permit) => permit,
        Acquired::Later(_) | Acquired::Stopped => {
            return Ok(Some(Claimed::Not(Outcome::Released)));
        }
    };
    let lease = ctx.config.lease;
    let claimed = with_db_retry("claim", || {
        jobs::claim(&ctx.db, hint, token, Some(&model), lease)
    })
    .await;
    match claimed {
        Ok(Some(job)) => Ok(Some(Claimed::Job(Box::new(job), permit))),
        other => {
            if let Some(permit) = permit {
                ctx.budget.release(permit, None, false).await;
            }
            other.map(|_| None)
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
        sampling: match &job.sampling {
            Some(serde_json::Value::Object(map)) => map.clone(),
            _ => serde_json::Map::new(),
        },
    }))
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
