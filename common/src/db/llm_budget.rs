//! The LLM budget shared by every worker: capacity for upstream calls per
//! model (calls in flight, requests and tokens per window) and the
//! provider's pauses, in PostgreSQL (`llm_budgets`, `llm_calls`; the
//! functions are in the `flow_control` migration).

use std::time::Duration;

use sqlx::PgExecutor;
use uuid::Uuid;

/// Notified with the model's name when a call gives its capacity back.
pub const RELEASE_CHANNEL: &str = "chatq_llm";
/// Notified with `{"model", "until" (epoch seconds), "spread" (seconds)}`
/// when the provider asked every worker to stop calling a model.
pub const PAUSE_CHANNEL: &str = "chatq_llm_pause";

/// A model's limits; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    /// Calls in flight across all workers.
    pub max_concurrency: Option<u32>,
    /// Requests per window (a minute unless time is compressed): the
    /// bucket holds this many and refills this many per window.
    pub requests: Option<f64>,
    /// Tokens (prompt and reply) per window, likewise.
    pub tokens: Option<f64>,
}

impl Limits {
    /// Whether any limit is set.
    pub fn is_limited(&self) -> bool {
        self.max_concurrency.is_some() || self.requests.is_some() || self.tokens.is_some()
    }
}

/// Takes capacity for one call of `model` reserving `tokens`, held by
/// `call` for `lease`: `None` when taken, else how long to wait before
/// asking again.
pub async fn acquire(
    db: impl PgExecutor<'_>,
    model: &str,
    call: Uuid,
    tokens: i32,
    limits: &Limits,
    window: Duration,
    lease: Duration,
) -> sqlx::Result<Option<Duration>> {
    // A function's result has no NOT NULL to infer from; it always returns
    // a number.
    let wait: f64 = sqlx::query_scalar!(
        r#"select chatq_llm_acquire($1, $2, $3, $4, $5, $6, $7, $8) as "wait!""#,
        model,
        call,
        tokens,
        limits
            .max_concurrency
            .map(|c| i32::try_from(c).unwrap_or(i32::MAX)),
        limits.requests,
        limits.tokens,
        window.as_secs_f64().max(0.001),
        lease.as_secs_f64(),
    )
    .fetch_one(db)
    .await?;
    Ok((wait > 0.0).then(|| Duration::from_secs_f64(wait.min(3600.0))))
}

/// Gives a call's capacity back, refunding the tokens it reserved beyond
/// `used` (the provider's count; `None`: keep the reservation), and its
/// request if it was never `sent`.
pub async fn release(
    db: impl PgExecutor<'_>,
    call: Uuid,
    used: Option<i32>,
    sent: bool,
    limits: &Limits,
) -> sqlx::Result<()> {
    sqlx::query!(
        "select chatq_llm_release($1, $2, $3, $4, $5)",
        call,
        used,
        sent,
        limits.requests,
        limits.tokens,
    )
    .execute(db)
    .await?;
    Ok(())
}

/// The provider asked to stop: no call of `model` starts for `pause`, then
/// capacity returns over `spread`. Tells every worker.
pub async fn pause(
    db: impl PgExecutor<'_>,
    model: &str,
    pause: Duration,
    spread: Duration,
) -> sqlx::Result<()> {
    // The function returns when the pause ends, which nobody reads; with an
    // output column `query!` gives a `Map`, run by the executor.
    let query = sqlx::query!(
        "select chatq_llm_pause($1, $2, $3)",
        model,
        pause.as_secs_f64(),
        spread.as_secs_f64(),
    );
    db.execute(query).await?;
    Ok(())
}

/// Provider pauses still in force: `(model, seconds left, spread seconds)`.
pub async fn active_pauses(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<(String, f64, f64)>> {
    // `paused_until > clock_timestamp()` holds, so `paused_until` is not
    // null; `ramp_until` is set with it.
    let rows = sqlx::query!(
        r#"select model, extract(epoch from paused_until - clock_timestamp())::float8 as "left!",
                  extract(epoch from ramp_until - paused_until)::float8 as "spread!"
           from llm_budgets where paused_until > clock_timestamp()"#
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.model, r.left, r.spread))
        .collect())
}
