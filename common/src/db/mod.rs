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

impl<T> Cut<T> {
    /// The page from its rows, each with how many rows the page held
    /// before the cut (the same on every row).
    fn from_rows(rows: impl IntoIterator<Item = (T, i64)>) -> Self {
        let mut fetched = 0;
        let rows: Vec<T> = rows
            .into_iter()
            .map(|(row, n)| {
                fetched = n;
                row
            })
            .collect();
        let truncated = usize::try_from(fetched).unwrap_or(usize::MAX) > rows.len();
        Self { rows, truncated }
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

#[cfg(test)]
mod tests {
    //! The notification channels are named once in Rust, here and in
    //! `keys` and `llm_budget`: the repository's statements bind them as
    //! parameters. Functions in the migrations (append-only) spell some of
    //! them as literals, so these tests hold the two together.

    use std::path::Path;

    use super::llm_budget::{PAUSE_CHANNEL, RELEASE_CHANNEL};
    use super::{CANCEL_CHANNEL, JOB_CHANNEL, KEY_SLOT_CHANNEL, keys::KEY_CHANNEL};

    const CHANNELS: [&str; 6] = [
        JOB_CHANNEL,
        CANCEL_CHANNEL,
        KEY_SLOT_CHANNEL,
        KEY_CHANNEL,
        RELEASE_CHANNEL,
        PAUSE_CHANNEL,
    ];

    /// Every migration, in the order they apply: (file name, text).
    fn migrations() -> std::io::Result<Vec<(String, String)>> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations");
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "sql") {
                let name = path
                    .file_name()
                    .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
                files.push((name, std::fs::read_to_string(&path)?));
            }
        }
        files.sort();
        Ok(files)
    }

    /// The channel literals of `pg_notify('…'` in `sql`.
    fn notified_literals(sql: &str) -> Vec<&str> {
        sql.split("pg_notify('")
            .skip(1)
            .filter_map(|rest| rest.split('\'').next())
            .collect()
    }

    /// The body (between `$$`s) of the last definition of SQL function
    /// `name` in the migrations.
    fn latest_body(files: &[(String, String)], name: &str) -> Option<String> {
        let heads = [
            format!("create function {name}("),
            format!("create or replace function {name}("),
        ];
        files.iter().rev().find_map(|(_, sql)| {
            let start = heads.iter().filter_map(|h| sql.rfind(h.as_str())).max()?;
            let body = &sql[start..];
            let open = body.find("$$")? + 2;
            let close = body[open..].find("$$")?;
            Some(body[open..open + close].to_owned())
        })
    }

    #[test]
    fn channel_names_are_distinct() {
        for (i, a) in CHANNELS.iter().enumerate() {
            assert!(!CHANNELS[i + 1..].contains(a), "{a} is named twice");
        }
    }

    #[test]
    fn every_channel_a_migration_notifies_is_a_rust_constant() -> std::io::Result<()> {
        let files = migrations()?;
        assert!(!files.is_empty(), "no migrations found");
        for (name, sql) in &files {
            for channel in notified_literals(sql) {
                assert!(
                    CHANNELS.contains(&channel),
                    "{name} notifies {channel:?}, which no constant in common::db names"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn functions_notify_the_channels_the_workers_listen_on() -> std::io::Result<()> {
        let files = migrations()?;
        for (function, channel) in [
            ("chatq_llm_release", RELEASE_CHANNEL),
            ("chatq_llm_pause", PAUSE_CHANNEL),
            ("chatq_key_slot_freed", KEY_SLOT_CHANNEL),
            ("chatq_unpark_free_slots", KEY_SLOT_CHANNEL),
        ] {
            let Some(body) = latest_body(&files, function) else {
                panic!("no migration defines {function}");
            };
            assert_eq!(
                notified_literals(&body),
                [channel],
                "{function} must notify {channel:?} (and only that)"
            );
        }
        Ok(())
    }

    #[test]
    fn repository_statements_bind_their_channels() {
        for (file, source) in [
            ("conversations.rs", include_str!("conversations.rs")),
            ("jobs.rs", include_str!("jobs.rs")),
            ("keys.rs", include_str!("keys.rs")),
            ("llm_budget.rs", include_str!("llm_budget.rs")),
            ("messages.rs", include_str!("messages.rs")),
            ("submissions.rs", include_str!("submissions.rs")),
            ("controls.rs", include_str!("controls.rs")),
            ("rate_limits.rs", include_str!("rate_limits.rs")),
        ] {
            assert!(
                notified_literals(source).is_empty(),
                "common/src/db/{file} spells a channel in SQL: bind the constant instead"
            );
            for channel in CHANNELS {
                assert!(
                    !source.contains(&format!("'{channel}'")),
                    "common/src/db/{file} spells {channel:?} in SQL: bind the constant instead"
                );
            }
        }
    }
}
