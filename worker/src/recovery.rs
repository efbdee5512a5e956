//! The recovery loop, safe in every replica at once: ends the attempts of
//! jobs whose worker died (lease lapsed), publishes queued jobs whose
//! publish was never confirmed (the api crashed, or the broker was down at
//! submit time), and republishes jobs whose message vanished inside the
//! broker (purged queue, lost message).

use std::time::Duration;

use sqlx::PgPool;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use chatq_common::db::{controls, jobs};
use chatq_common::queue::Publisher;
use uuid::Uuid;

/// Pause between recovery passes.
pub const RECOVERY_INTERVAL: Duration = Duration::from_secs(1);
/// Jobs handled per pass and statement.
const BATCH: i64 = 500;
/// Pause between two retention sweeps.
const RETENTION_INTERVAL: Duration = Duration::from_secs(60);
/// Jobs deleted per retention statement.
const RETENTION_BATCH: i64 = 1_000;
/// Longest pause between two looks for vanished messages.
const MAX_REPUBLISH_CHECK: Duration = Duration::from_secs(30);

/// What the recovery loop needs to know.
#[derive(Debug, Clone, Copy)]
pub struct RecoverySettings {
    /// A queued job unconfirmed for this long is published by the relay.
    pub relay_grace: Duration,
    /// A queued job published this long ago may have lost its message.
    pub republish_after: Duration,
    /// Attempts a job may take (`CHATQ_MAX_ATTEMPTS`).
    pub max_attempts: u32,
    /// Finished jobs older than this are deleted (`CHATQ_RETENTION_DAYS`).
    pub retention: Duration,
}

/// Runs recovery passes until `shutdown`.
pub async fn run(
    db: PgPool,
    publisher: Publisher,
    settings: RecoverySettings,
    shutdown: CancellationToken,
) {
    let check_every = (settings.republish_after / 4).clamp(RECOVERY_INTERVAL, MAX_REPUBLISH_CHECK);
    let mut next_republish_check = Instant::now() + check_every;
    let mut next_retention = Instant::now();
    loop {
        if Instant::now() >= next_retention {
            next_retention = Instant::now() + RETENTION_INTERVAL;
            if let Err(err) = expire_finished(&db, settings.retention).await {
                tracing::warn!(error = %err, "retention sweep failed; will retry");
            }
        }
        if let Err(err) = pass(&db, &publisher, &settings).await {
            tracing::warn!(error = %err, "recovery pass failed; will retry");
        }
        if Instant::now() >= next_republish_check {
            next_republish_check = Instant::now() + check_every;
            if let Err(err) = republish_vanished(&db, &publisher, settings.republish_after).await {
                tracing::warn!(error = %err, "looking for vanished messages failed; will retry");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(RECOVERY_INTERVAL) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

async fn pass(
    db: &PgPool,
    publisher: &Publisher,
    settings: &RecoverySettings,
) -> anyhow::Result<()> {
    let max_attempts = i32::try_from(settings.max_attempts.max(1)).unwrap_or(i32::MAX);
    let lapsed = jobs::requeue_expired(db, BATCH, max_attempts).await?;
    if !lapsed.failed.is_empty() {
        tracing::warn!(
            jobs = lapsed.failed.len(),
            "jobs whose last attempt's worker stopped answering: failed"
        );
        // Their messages were settled long ago: dead-letter a fresh one so
        // they can be inspected and replayed like any failed job.
        for id in &lapsed.failed {
            if let Err(err) = publisher.publish_dead(*id).await {
                tracing::warn!(job_id = %id, error = %err, "could not dead-letter the failed job");
            }
        }
    }
    if !lapsed.requeued.is_empty() {
        tracing::warn!(
            jobs = lapsed.requeued.len(),
            "requeued running jobs whose lease lapsed"
        );
        // Their messages are gone (acked when the claim failed): publish now
        // rather than after the relay's grace. A crash here leaves them to the relay.
        let published = publish_all(publisher, &lapsed.requeued).await;
        jobs::mark_published_many(db, &published).await?;
    }
    // Slots of capped keys that a finishing job's wake-up missed.
    let unparked = jobs::unpark_free_slots(db).await?;
    if unparked > 0 {
        tracing::debug!(jobs = unparked, "unparked jobs of keys with free slots");
    }
    loop {
        let mut tx = db.begin().await?;
        let ids = jobs::lock_unpublished(&mut *tx, settings.relay_grace, BATCH).await?;
        if ids.is_empty() {
            return Ok(());
        }
        let published = publish_all(publisher, &ids).await;
        jobs::mark_published_many(&mut *tx, &published).await?;
        tx.commit().await?;
        tracing::info!(jobs = published.len(), "relay published unconfirmed jobs");
        if published.len() < ids.len() {
            return Ok(());
        }
        // Let new submissions' publishes through between batches of a backlog.
        tokio::task::yield_now().await;
    }
}

/// Deletes jobs finished longer than `retention` ago, a batch at a time.
async fn expire_finished(db: &PgPool, retention: Duration) -> sqlx::Result<()> {
    let mut deleted = 0;
    loop {
        let n = jobs::delete_finished_before(db, retention, RETENTION_BATCH).await?;
        deleted += n;
        if n < RETENTION_BATCH.unsigned_abs() {
            break;
        }
        tokio::task::yield_now().await;
    }
    if deleted > 0 {
        tracing::info!(jobs = deleted, "deleted finished jobs past their retention");
    }
    Ok(())
}

/// Republishes queued jobs whose message is no longer in the broker.
///
/// The rule, and why a long healthy queue never trips it: a queued job
/// published more than `after` ago (longer than any retry delay, so its
/// message has left the delay queues) must have a message *ready* in the
/// work queue: not in a delay queue any more, and not in a worker's prefetch
/// buffer, since a delivered job is claimed within moments and is then no
/// longer queued. So, with `old` such jobs and `ready` messages in the work
/// queue, a healthy broker always has `ready >= old`, however long the queue
/// (100,000 jobs waiting their turn each have their message). Only when
/// `ready < old` have at least `old - ready` messages vanished; which ones
/// cannot be told apart, so every old job is published again (its
/// `published_at` restarts the clock) and the guarded claim makes the
/// duplicates of the healthy ones harmless: each costs one refused claim.
/// Skipped while paused: held messages are unacked, not ready.
///
/// Cost: one passive queue declare and one index count every
/// `after / 4` (at most 30 s), not per job.
async fn republish_vanished(
    db: &PgPool,
    publisher: &Publisher,
    after: Duration,
) -> anyhow::Result<()> {
    if controls::is_paused(db).await? {
        return Ok(());
    }
    let old = jobs::count_published_before(db, after).await?;
    if old == 0 {
        return Ok(());
    }
    let ready = i64::from(publisher.depths().await?.work_messages);
    if ready >= old {
        return Ok(());
    }
    tracing::warn!(
        old,
        ready,
        "queued jobs outnumber the messages in the work queue: republishing them"
    );
    let mut republished = 0usize;
    loop {
        let mut tx = db.begin().await?;
        let ids = jobs::lock_published_before(&mut *tx, after, BATCH).await?;
        if ids.is_empty() {
            break;
        }
        let published = publish_all(publisher, &ids).await;
        jobs::mark_republished_many(&mut *tx, &published).await?;
        tx.commit().await?;
        republished += published.len();
        if published.len() < ids.len() {
            break;
        }
    }
    tracing::warn!(
        jobs = republished,
        "republished jobs whose message vanished"
    );
    Ok(())
}

/// Publishes the jobs in order until one fails; returns those confirmed.
async fn publish_all(publisher: &Publisher, ids: &[Uuid]) -> Vec<Uuid> {
    let mut published = Vec::with_capacity(ids.len());
    for id in ids {
        match publisher.publish_job(*id).await {
            Ok(()) => published.push(*id),
            Err(err) => {
                tracing::warn!(job_id = %id, error = %err, "relay publish failed");
                break;
            }
        }
    }
    published
}
