//! The PostgreSQL repository: one module per aggregate. Every query on
//! tenant-owned data is scoped by `tenant_id`; functions take
//! `impl PgExecutor` so they work on a pool or inside a transaction.

pub mod controls;
pub mod conversations;
pub mod jobs;
pub mod keys;
pub mod llm_budget;
pub mod messages;
pub mod rate_limits;
pub mod submissions;

/// A page of rows cut to a size budget in PostgreSQL.
#[derive(Debug)]
pub struct Cut<T> {
    /// The rows kept.
    pub rows: Vec<T>,
    /// Whether rows fetched within the count limit were left out for size.
    pub truncated: bool,
}

/// A row of a size-cut page: the row and how many rows the page held
/// before the cut.
#[derive(Debug, sqlx::FromRow)]
pub struct CutRow<T> {
    #[sqlx(flatten)]
    row: T,
    fetched: i64,
}

impl<T> Cut<T> {
    fn from_rows(rows: Vec<CutRow<T>>) -> Self {
        let fetched = rows.first().map_or(0, |r| r.fetched);
        let truncated = usize::try_from(fetched).unwrap_or(usize::MAX) > rows.len();
        Self {
            rows: rows.into_iter().map(|r| r.row).collect(),
            truncated,
        }
    }
}

/// The LISTEN/NOTIFY channel on which every job state change is announced,
/// with the job id as payload.
pub const JOB_CHANNEL: &str = "chatq_job";
/// The LISTEN/NOTIFY channel on which cancellations of jobs (by the client,
/// or by deleting their conversation) are announced to the workers, so a
/// running call stops at once.
pub const CANCEL_CHANNEL: &str = "chatq_cancel";
/// The LISTEN/NOTIFY channel on which a key with `max_concurrency` freeing
/// a slot is announced (migration `key_concurrency`), so workers holding
/// messages for parked jobs claim again at once.
pub const KEY_SLOT_CHANNEL: &str = "chatq_key_slot";
/// Longest abandoned partial reply kept in a job's attempt history, in
/// characters.
pub const MAX_PARTIAL_CHARS: i32 = 10_000;

/// The name of the constraint a database error violated, if any: callers
/// map named constraints to API errors next to the query.
pub fn violated_constraint(err: &sqlx::Error) -> Option<&str> {
    match err {
        sqlx::Error::Database(db) => db.constraint(),
        _ => None,
    }
}

/// Whether the error means the database could not be reached or did not
/// answer in time (as opposed to a bug or a constraint).
pub fn is_unavailable(err: &sqlx::Error) -> bool {
    matches!(
        err,
        sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed
    ) || matches!(err, sqlx::Error::Database(db) if db.code().is_some_and(|c| {
        // 57P01 admin_shutdown, 57P02 crash_shutdown, 57P03 cannot_connect_now,
        // 08xxx connection exceptions, 53300 too_many_connections.
        c.starts_with("57P") || c.starts_with("08") || c == "53300"
    }))
}

/// An error to hand each caller of a batch that failed because the database
/// is unreachable (a `sqlx::Error` cannot be cloned); [`is_unavailable`]
/// holds for it, so callers retry or answer 503 as for the original.
pub fn unavailable_copy(err: &sqlx::Error) -> sqlx::Error {
    let io = match err {
        sqlx::Error::Io(io) => std::io::Error::new(io.kind(), io.to_string()),
        other => std::io::Error::other(other.to_string()),
    };
    sqlx::Error::Io(io)
}
