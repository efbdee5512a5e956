//! Operator controls shared by every replica: whether workers take new jobs.

use sqlx::PgExecutor;

/// Pauses (`true`) or resumes (`false`) consumption; returns the new state.
pub async fn set_paused(db: impl PgExecutor<'_>, paused: bool) -> sqlx::Result<bool> {
    sqlx::query_scalar!(
        "update queue_controls set paused = $1, updated_at = now() returning paused",
        paused
    )
    .fetch_one(db)
    .await
}

/// Whether consumption is paused.
pub async fn is_paused(db: impl PgExecutor<'_>) -> sqlx::Result<bool> {
    sqlx::query_scalar!("select paused from queue_controls")
        .fetch_one(db)
        .await
}
