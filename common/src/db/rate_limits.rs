//! Per-key submission rate limits: a fixed one-minute window counted in
//! PostgreSQL, so every api replica enforces the same limit.

use sqlx::PgExecutor;
use uuid::Uuid;

/// Counts one submission for `key_id` in the current minute; returns the
/// count so far in this window and the seconds until it ends.
pub async fn hit(db: impl PgExecutor<'_>, key_id: Uuid) -> sqlx::Result<(i32, f64)> {
    sqlx::query_as(
        "insert into rate_windows (key_id, window_start, count)
         values ($1, date_trunc('minute', now()), 1)
         on conflict (key_id, window_start)
         do update set count = rate_windows.count + 1, updated_at = now()
         returning count,
                   extract(epoch from date_trunc('minute', now()) + interval '1 minute' - now())::float8",
    )
    .bind(key_id)
    .fetch_one(db)
    .await
}

/// Removes windows older than an hour.
pub async fn prune(db: impl PgExecutor<'_>) -> sqlx::Result<u64> {
    let done =
        sqlx::query("delete from rate_windows where window_start < now() - interval '1 hour'")
            .execute(db)
            .await?;
    Ok(done.rows_affected())
}
