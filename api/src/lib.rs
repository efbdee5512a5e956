//! `chatq-api`: a thin async HTTP API that stores chat requests in
//! PostgreSQL and enqueues them on RabbitMQ. It never waits on the LLM.

pub mod auth;
pub mod batch;
pub mod error;
pub mod extract;
pub mod publish;
pub mod replay;
pub mod routes;
pub mod views;
pub mod watch;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use secrecy::SecretString;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::trace::TraceLayer;

use chatq_common::config::{AmqpArgs, DbArgs, parse_secs};
use chatq_common::queue::Publisher;

use crate::auth::KeyCache;
use crate::batch::SubmitBatcher;
use crate::publish::JobPublisher;
use crate::watch::JobWatcher;

/// `chatq-api` settings: environment variables, each with a `--flag`.
#[derive(Debug, Clone, clap::Args)]
pub struct ApiConfig {
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub amqp: AmqpArgs,
    /// Listen address.
    #[arg(long, env = "CHATQ_API_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: String,
    /// Bearer token for `/admin/v1`; admin routes answer 401 while unset.
    #[arg(long, env = "CHATQ_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<SecretString>,
    /// Longest accepted message content, in characters.
    #[arg(long, env = "CHATQ_MAX_CONTENT_CHARS", default_value_t = 100_000)]
    pub max_content_chars: usize,
    /// Largest accepted request body, in bytes.
    #[arg(long, env = "CHATQ_MAX_BODY_BYTES", default_value_t = 256 * 1024)]
    pub max_body_bytes: usize,
    /// Model used when neither the request nor its conversation names one.
    #[arg(long, env = "CHATQ_DEFAULT_MODEL", default_value = "gpt-4o-mini")]
    pub default_model: String,
    /// Seconds in-flight requests may take to finish after SIGTERM.
    #[arg(long, env = "CHATQ_SHUTDOWN_GRACE_SECS", default_value = "10", value_parser = parse_secs)]
    pub shutdown_grace: Duration,
    /// Apply pending database migrations at start-up.
    #[arg(long, env = "CHATQ_MIGRATE_ON_START", default_value_t = true, action = clap::ArgAction::Set)]
    pub migrate_on_start: bool,
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// The PostgreSQL pool.
    pub db: PgPool,
    /// Publishes jobs and records confirmed publishes.
    pub publisher: JobPublisher,
    /// Recent API key lookups.
    pub keys: KeyCache,
    /// Stores concurrent submissions with one statement.
    pub batcher: SubmitBatcher,
    /// Wakes long-polls when a job changes.
    pub watcher: JobWatcher,
    /// Settings.
    pub config: Arc<ApiConfig>,
}

impl AppState {
    /// Connects (lazily) and starts the background tasks, which end on `shutdown`.
    pub fn new(config: ApiConfig, shutdown: &CancellationToken) -> anyhow::Result<Self> {
        let db = config.db.pool()?;
        let publisher = JobPublisher::start(Publisher::new(&config.amqp), db.clone());
        let keys = KeyCache::default();
        let watcher = JobWatcher::start(db.clone(), keys.clone(), shutdown.clone());
        let batcher = SubmitBatcher::start(db.clone());
        Ok(Self {
            db,
            publisher,
            keys,
            batcher,
            watcher,
            config: Arc::new(config),
        })
    }
}

/// The whole HTTP surface.
pub fn router(state: AppState) -> Router {
    routes::router()
        // The JSON extractor enforces CHATQ_MAX_BODY_BYTES itself, draining
        // what it refuses so clients can read the 413.
        .layer(DefaultBodyLimit::disable())
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            let route = req
                .extensions()
                .get::<MatchedPath>()
                .map_or("unmatched", MatchedPath::as_str);
            tracing::info_span!("request", method = %req.method(), route = %route)
        }))
        .with_state(state)
}

/// Serves until `shutdown`, then lets in-flight requests finish.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}
