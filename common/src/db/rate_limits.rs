//! Per-key rate limits: a sliding one-minute window of one-second buckets,
//! kept in PostgreSQL (`chatq_rate_hit`, migration 5) so every api replica
//! enforces the same limit.

use sqlx::PgExecutor;
use uuid::Uuid;

/// Counts one request of `key_id` against `limit` per minute. `None` if it
/// is allowed, else the seconds until a retry can be allowed.
pub async fn hit(db: impl PgExecutor<'_>, key_id: Uuid, limit: i32) -> sqlx::Result<Option<f64>> {
    let (allowed, retry_after): (bool, f64) =
        sqlx::query_as("select allowed, retry_after_secs from chatq_rate_hit($1, $2)")
            .bind(key_id)
            .bind(limit)
            .fetch_one(db)
            .await?;
    Ok((!allowed).then_some(retry_after))
}
