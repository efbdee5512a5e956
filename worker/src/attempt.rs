//! Calling the LLM for one job: each attempt streams, its text is relayed
//! live to subscribers (the events exchange) and saved to the row a few
//! times a second; failed attempts are retried in process (short pauses) or
//! handed to the broker's delay queues (long ones).
//!
//! Why this transport for the text: a piece of text costs one transient,
//! unconfirmed publish to a topic exchange (an in-memory route in the
//! broker, nothing on disk), and reaches only the api processes that have a
//! subscriber for that job (they bind the job id). `NOTIFY` per piece would
//! serialise the commits of every worker (PostgreSQL takes one lock for
//! notifying commits) and caps payloads at 8 KB. Pieces are coalesced to at
//! most one publish per [`COALESCE`] per job, and the row's copy is updated
//! at most every [`SAVE_EVERY`]: that copy is what lets any replica join or
//! resume a stream it never saw from the beginning.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use chatq_common::db::jobs::{self, AttemptEnd};
use chatq_common::domain::DeltaEvent;

use crate::budget::{Acquired, DEFAULT_PROVIDER_PAUSE, Permit};
use crate::llm::{ChatRequest, Completion, LlmError};
use crate::retry;
use crate::runner::{IN_PROCESS_RETRY_MAX, JobContext, with_db_retry};

/// Longest time streamed text waits before it is published (the first
/// piece of a burst goes out at once).
pub const COALESCE: Duration = Duration::from_millis(40);
/// How often the running attempt's text is saved to the row, at most.
pub const SAVE_EVERY: Duration = Duration::from_millis(250);

/// How calling the LLM for a job ended.
pub enum Call {
    /// The last attempt answered (or failed for good); with the text that
    /// attempt had streamed.
    Finished(Result<Completion, Failed>),
    /// Retry after `delay`, through the broker's delay queue.
    Deferred {
        /// Why the attempt failed.
        failed: Failed,
        /// How long to wait.
        delay: Duration,
    },
    /// The claim was lost (cancelled, conversation deleted, reclaimed).
    Lost,
    /// Shutting down past the grace period.
    Abandoned,
}

/// A failed attempt and the text it had streamed before failing.
pub struct Failed {
    /// The error.
    pub err: LlmError,
    /// Text streamed before the failure.
    pub partial: String,
}

impl Failed {
    /// The attempt history entry.
    pub fn end(&self) -> AttemptEnd<'_> {
        AttemptEnd {
            code: self.err.code(),
            message: self.err.message(),
            partial: &self.partial,
        }
    }
}

/// Stops an attempt early.
#[derive(Clone, Copy)]
pub struct Stops<'a> {
    /// The claim was lost.
    pub lost: &'a CancellationToken,
    /// Shutdown past the grace period.
    pub abandon: &'a CancellationToken,
}

/// The claimed job's first call.
pub struct FirstCall {
    /// The attempt number the claim started.
    pub attempt: i32,
    /// Tokens to reserve from the shared budget for each call.
    pub cost: i32,
    /// Capacity taken for the first call before the claim, if the model
    /// has a shared budget.
    pub permit: Option<Permit>,
}

/// Calls the LLM for `job_id` under claim `token`, starting at attempt
/// `first.attempt`, retrying retryable failures while the attempt budget
/// lasts. Every call holds capacity of the shared LLM budget (the first
/// call's was taken before the claim); a retry that cannot get it within
/// [`IN_PROCESS_RETRY_MAX`] waits in the broker instead.
pub async fn call_with_retries(
    ctx: &JobContext,
    job_id: Uuid,
    token: Uuid,
    first: FirstCall,
    request: &ChatRequest,
    stops: Stops<'_>,
) -> Call {
    let max_attempts = i32::try_from(ctx.config.max_attempts.max(1)).unwrap_or(i32::MAX);
    let mut attempt = first.attempt.max(1);
    let mut permit = first.permit;
    loop {
        let started = Instant::now();
        let answered = one_attempt(ctx, job_id, token, attempt, request, stops).await;
        let used = match &answered {
            Attempt::Answered(Ok(c), _) => c
                .prompt_tokens
                .zip(c.completion_tokens)
                .map(|(p, c)| p.saturating_add(c)),
            _ => None,
        };
        if let Some(permit) = permit.take() {
            ctx.budget.release(permit, used, true).await;
        }
        let (result, partial) = match answered {
            Attempt::Answered(result, partial) => (result, partial),
            Attempt::Stopped(call) => return call,
        };
        match &result {
            Ok(Completion {
                provider_pause: Some(pause),
                ..
            }) => ctx.budget.provider_pause(&request.model, *pause).await,
            Err(LlmError::Retryable {
                code: crate::llm::RATE_LIMITED,
                retry_after,
                ..
            }) => {
                let pause = retry_after.unwrap_or(DEFAULT_PROVIDER_PAUSE);
                ctx.budget.provider_pause(&request.model, pause).await;
            }
            _ => {}
        }
        let elapsed = started.elapsed();
        let latency_ms = elapsed.as_millis();
        ctx.metrics
            .llm_call(elapsed, result.as_ref().err().map(LlmError::code));
        let err = match result {
            Ok(completion) => {
                ctx.metrics
                    .llm_tokens(completion.prompt_tokens, completion.completion_tokens);
                // Debug: one info line per job ("job succeeded") is enough;
                // call latency is in chatq_llm_request_duration_seconds.
                tracing::debug!(llm.latency_ms = latency_ms, attempt, "LLM call succeeded");
                return Call::Finished(Ok(completion));
            }
            Err(err) => err,
        };
        tracing::warn!(llm.latency_ms = latency_ms, attempt, error = %err, "LLM call failed");
        let failed = Failed { err, partial };
        let delay = match next_step(&failed.err, attempt, max_attempts) {
            Next::GiveUp => return Call::Finished(Err(failed)),
            Next::InBroker(delay) => {
                ctx.metrics.retry(failed.err.code(), true);
                return Call::Deferred { failed, delay };
            }
            Next::InProcess(delay) => {
                ctx.metrics.retry(failed.err.code(), false);
                delay
            }
        };
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stops.lost.cancelled() => return Call::Lost,
            () = stops.abandon.cancelled() => return Call::Abandoned,
        }
        let acquired = tokio::select! {
            a = ctx.budget.acquire(&request.model, first.cost, Some(IN_PROCESS_RETRY_MAX), stops.abandon) => a,
            () = stops.lost.cancelled() => return Call::Lost,
        };
        match acquired {
            Acquired::Ready(p) => permit = p,
            Acquired::Later(delay) => return Call::Deferred { failed, delay },
            Acquired::Stopped => return Call::Abandoned,
        }
        let end = failed.end();
        let recorded = with_db_retry("record the retry attempt", || {
            jobs::retry_attempt(&ctx.db, job_id, token, ctx.config.lease, &end)
        })
        .await;
        match recorded {
            Ok(true) => attempt += 1,
            Ok(false) => return Call::Lost,
            // The row must hold the attempt number streamed text is tagged
            // with: without it, give the job up to the lease, which ends the
            // attempt and counts it.
            Err(e) => {
                tracing::warn!(error = %e, "could not record the retry attempt; leaving the job to recovery");
                return Call::Lost;
            }
        }
    }
}

enum Next {
    GiveUp,
    InProcess(Duration),
    InBroker(Duration),
}

/// What follows a failed attempt.
fn next_step(err: &LlmError, attempt: i32, max_attempts: i32) -> Next {
    let LlmError::Retryable { retry_after, .. } = err else {
        return Next::GiveUp;
    };
    if attempt >= max_attempts {
        return Next::GiveUp;
    }
    let pause = retry::delay(u32::try_from(attempt).unwrap_or(1), *retry_after);
    if pause > IN_PROCESS_RETRY_MAX {
        Next::InBroker(pause)
    } else {
        Next::InProcess(pause)
    }
}

enum Attempt {
    Answered(Result<Completion, LlmError>, String),
    Stopped(Call),
}

/// One streamed LLM call, its text relayed as it arrives.
async fn one_attempt(
    ctx: &JobContext,
    job_id: Uuid,
    token: Uuid,
    attempt: i32,
    request: &ChatRequest,
    stops: Stops<'_>,
) -> Attempt {
    let (tx, rx) = mpsc::unbounded_channel::<String>();
    let started = Instant::now();
    let mut first_piece = true;
    let call = async move {
        let mut sink = |text: &str| {
            if first_piece && !text.is_empty() {
                first_piece = false;
                ctx.metrics.llm_first_token(started.elapsed());
            }
            let _ = tx.send(text.to_owned());
        };
        // Dropping the call (lost, abandoned) closes the upstream connection.
        tokio::select! {
            r = ctx.llm.complete(request, &mut sink) => Ok(r),
            () = stops.lost.cancelled() => Err(Call::Lost),
            () = stops.abandon.cancelled() => Err(Call::Abandoned),
        }
        // `tx` is dropped here, which ends the relay.
    };
    let (ended, streamed) = tokio::join!(call, relay(ctx, job_id, token, attempt, rx));
    match ended {
        Ok(result) => Attempt::Answered(result, streamed),
        Err(call) => Attempt::Stopped(call),
    }
}

/// Publishes the attempt's text as it arrives (coalesced) and saves it to
/// the row every [`SAVE_EVERY`]; returns all of it once the call ends.
async fn relay(
    ctx: &JobContext,
    job_id: Uuid,
    token: Uuid,
    attempt: i32,
    mut pieces: mpsc::UnboundedReceiver<String>,
) -> String {
    let mut text = String::new();
    let mut pending = String::new();
    let mut published_chars: u64 = 0;
    let mut last_publish: Option<Instant> = None;
    let mut saved_len = 0;
    let mut next_save: Option<Instant> = None;
    loop {
        let publish_at = (!pending.is_empty())
            .then(|| last_publish.map_or_else(Instant::now, |at| at + COALESCE));
        tokio::select! {
            piece = pieces.recv() => match piece {
                Some(piece) => {
                    text.push_str(&piece);
                    pending.push_str(&piece);
                    next_save.get_or_insert_with(|| Instant::now() + SAVE_EVERY);
                    if last_publish.is_none_or(|at| at.elapsed() >= COALESCE) {
                        publish(ctx, job_id, attempt, &mut published_chars, &mut pending).await;
                        last_publish = Some(Instant::now());
                    }
                }
                None => break,
            },
            () = chatq_common::time::sleep_until(publish_at) => {
                publish(ctx, job_id, attempt, &mut published_chars, &mut pending).await;
                last_publish = Some(Instant::now());
            }
            () = chatq_common::time::sleep_until(next_save.filter(|_| text.len() > saved_len)) => {
                if let Err(err) = jobs::save_partial(&ctx.db, job_id, token, attempt, &text).await {
                    tracing::debug!(error = %err, "could not save the streamed text");
                }
                saved_len = text.len();
                next_save = Some(Instant::now() + SAVE_EVERY);
            }
        }
    }
    // The rest goes out before the result is written, so subscribers
    // normally have all the text when they hear the job finished.
    publish(ctx, job_id, attempt, &mut published_chars, &mut pending).await;
    text
}

async fn publish(
    ctx: &JobContext,
    job_id: Uuid,
    attempt: i32,
    published_chars: &mut u64,
    pending: &mut String,
) {
    if pending.is_empty() {
        return;
    }
    let content = std::mem::take(pending);
    let chars = content.chars().count() as u64;
    let event = DeltaEvent {
        job_id,
        attempt,
        offset: *published_chars,
        content,
    };
    *published_chars += chars;
    let Ok(body) = serde_json::to_vec(&event) else {
        return;
    };
    if let Err(err) = ctx.publisher.publish_event(job_id, &body).await {
        // Subscribers fill the gap from the row's copy.
        tracing::debug!(error = %err, "could not publish streamed text");
    }
}
