//! Configuration shared by the api and the worker. Every field is an
//! environment variable with a `--flag` equivalent; names are fixed by
//! DESIGN.md because deployments rely on them.

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// How long a request may wait for a pooled database connection before it
/// gets a clear error instead of a hang.
pub const DB_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// PostgreSQL settings.
#[derive(Debug, Clone, clap::Args)]
pub struct DbArgs {
    /// PostgreSQL URL.
    #[arg(
        long,
        env = "DATABASE_URL",
        hide_env_values = true,
        default_value = "postgres://postgres@127.0.0.1:5432/chatq"
    )]
    pub database_url: String,
    /// Maximum connections in this process's pool.
    #[arg(long, env = "CHATQ_DB_MAX_CONNECTIONS", default_value_t = 16)]
    pub db_max_connections: u32,
    /// A direct PostgreSQL URL for `LISTEN`, when `DATABASE_URL` goes
    /// through a transaction pooler (which does not deliver notifications).
    /// Unset: `DATABASE_URL`.
    #[arg(long, env = "CHATQ_LISTEN_DATABASE_URL", hide_env_values = true)]
    pub listen_database_url: Option<String>,
}

impl DbArgs {
    /// A pool that connects lazily, so a process starts (and reports not
    /// ready) while the database is down, and each acquire is bounded.
    pub fn pool(&self) -> Result<PgPool, sqlx::Error> {
        let options: PgConnectOptions = self.database_url.parse()?;
        Ok(PgPoolOptions::new()
            .max_connections(self.db_max_connections)
            .acquire_timeout(DB_ACQUIRE_TIMEOUT)
            .connect_lazy_with(options))
    }

    /// Where `LISTEN` connections come from: a small pool on
    /// `CHATQ_LISTEN_DATABASE_URL` when it is set, else `main`.
    pub fn listen_pool(&self, main: &PgPool) -> Result<PgPool, sqlx::Error> {
        match self
            .listen_database_url
            .as_deref()
            .filter(|u| !u.is_empty())
        {
            Some(url) => Ok(PgPoolOptions::new()
                .max_connections(LISTEN_CONNECTIONS)
                .acquire_timeout(DB_ACQUIRE_TIMEOUT)
                .connect_lazy_with(url.parse()?)),
            None => Ok(main.clone()),
        }
    }
}

/// Connections of the `LISTEN` pool: one per listener of a process.
const LISTEN_CONNECTIONS: u32 = 4;

/// RabbitMQ settings.
#[derive(Debug, Clone, clap::Args)]
pub struct AmqpArgs {
    /// RabbitMQ URL.
    #[arg(
        long,
        env = "AMQP_URL",
        hide_env_values = true,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
    /// Prefix of every exchange and queue name, so several deployments (or
    /// tests) can share one broker.
    #[arg(long, env = "CHATQ_QUEUE_PREFIX", default_value = "chatq")]
    pub queue_prefix: String,
    /// Maximum jobs waiting in the work queue; beyond it submissions get
    /// `429 queue_full`.
    #[arg(long, env = "CHATQ_MAX_QUEUE_LENGTH", default_value_t = 100_000)]
    pub max_queue_length: u32,
}

/// Parses a duration given in whole seconds (for clap).
pub fn parse_secs(s: &str) -> Result<Duration, String> {
    s.parse::<u64>()
        .map(Duration::from_secs)
        .map_err(|e| format!("expected whole seconds: {e}"))
}
