//! Per-key rate limits: a sliding one-minute window of one-second buckets,
//! kept in PostgreSQL (`chatq_rate_hit`, migration 5) so every api replica
//! enforces the same limit.

use sqlx::PgExecutor;
use uuid::Uuid;

/// Counts one request of `key_id` against `limit` per minute. `None` if it
/// is allowed, else the seconds until a retry can be allowed.
pub async fn hit(db: impl PgExecutor<'_>, key_id: Uuid, limit: i32) -> sqlx::Result<Option<f64>> {
    // A function's out parameters have no NOT NULL to infer from; the
    // function always sets both.
    let hit = sqlx::query!(
        r#"select allowed as "allowed!", retry_after_secs as "retry_after_secs!"
           from chatq_rate_hit($1, $2)"#,
        key_id,
        limit
    )
    .fetch_one(db)
    .await?;
    Ok((!hit.allowed).then_some(hit.retry_after_secs))
}
