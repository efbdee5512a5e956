//! The recovery loop, safe in every replica at once: returns jobs whose
//! worker died (lease lapsed) to the queue, and publishes queued jobs whose
//! publish was never confirmed (the api crashed, or the broker was down at
//! submit time).

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use chatq_common::db::jobs;
use chatq_common::queue::Publisher;
use uuid::Uuid;

/// Pause between recovery passes.
pub const RECOVERY_INTERVAL: Duration = Duration::from_secs(1);
/// Jobs handled per pass and statement.
const BATCH: i64 = 500;

/// Runs recovery passes until `shutdown`.
pub async fn run(
    db: PgPool,
    publisher: Publisher,
    relay_grace: Duration,
    shutdown: CancellationToken,
) {
    loop {
        if let Err(err) = pass(&db, &publisher, relay_grace).await {
            tracing::warn!(error = %err, "recovery pass failed; will retry");
        }
        tokio::select! {
            () = tokio::time::sleep(RECOVERY_INTERVAL) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

async fn pass(db: &PgPool, publisher: &Publisher, relay_grace: Duration) -> anyhow::Result<()> {
    chatq_common::db::rate_limits::prune(db).await?;
    let requeued = jobs::requeue_expired(db, BATCH).await?;
    if !requeued.is_empty() {
        tracing::warn!(
            jobs = requeued.len(),
            "requeued running jobs whose lease lapsed"
        );
        // Their messages are gone (acked when the claim failed): publish now
        // rather than after the relay's grace. A crash here leaves them to the relay.
        let published = publish_all(publisher, &requeued).await;
        jobs::mark_published_many(db, &published).await?;
    }
    loop {
        let mut tx = db.begin().await?;
        let ids = jobs::lock_unpublished(&mut *tx, relay_grace, BATCH).await?;
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
    }
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
