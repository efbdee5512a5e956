//! `chatq-api`: a thin async HTTP API that stores chat requests in
//! PostgreSQL and enqueues them on RabbitMQ. It never waits on the LLM.

pub mod auth;
pub mod batch;
pub mod error;
pub mod events;
pub mod extract;
pub mod follow;
pub mod hub;
pub mod limits;
pub mod metrics;
pub mod notify;
pub mod observe;
pub mod openai;
pub mod openapi;
pub mod positions;
pub mod publish;
pub mod replay;
pub mod routes;
pub mod server;
pub mod submission;
pub mod trace;
pub mod validate;
pub mod views;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use secrecy::SecretString;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use chatq_common::config::{AmqpArgs, DbArgs, parse_secs};
use chatq_common::queue::{Publisher, Topology};

use crate::auth::KeyCache;
use crate::batch::SubmitBatcher;
use crate::hub::JobHub;
use crate::publish::JobPublisher;

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
    /// Per-minute limit of write requests for keys created without their
    /// own `rate_limit_per_minute`; unset: such keys are not limited.
    #[arg(long, env = "CHATQ_DEFAULT_RATE_LIMIT_PER_MINUTE", value_parser = clap::value_parser!(i32).range(1..=1_000_000))]
    pub default_rate_limit_per_minute: Option<i32>,
    /// Fraction of `CHATQ_MAX_QUEUE_LENGTH` one tenant's queued jobs may take
    /// (0 < share <= 1); past it the tenant's submissions get `429 queue_full`.
    #[arg(long, env = "CHATQ_TENANT_QUEUE_SHARE", default_value_t = 0.5, value_parser = parse_share)]
    pub tenant_queue_share: f64,
    /// Jobs that may wait unpublished while the broker is unreachable;
    /// past it submissions get `503 unavailable` and nothing is stored.
    /// Default: `CHATQ_MAX_QUEUE_LENGTH`.
    #[arg(long, env = "CHATQ_MAX_OUTBOX")]
    pub max_outbox: Option<u32>,
    /// Models tenants may ask for (comma-separated); unset: any model.
    #[arg(long, env = "CHATQ_MODELS", value_delimiter = ',')]
    pub models: Vec<String>,
    /// Most open client connections; past it new connections are closed at
    /// once. Lowered at start-up if the open-file limit cannot hold them.
    #[arg(long, env = "CHATQ_MAX_CONNECTIONS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Seconds a client may take to send a complete request head; also how
    /// long a keep-alive connection may sit idle between requests.
    #[arg(long, env = "CHATQ_HEADER_READ_TIMEOUT_SECS", default_value = "30", value_parser = parse_secs)]
    pub header_read_timeout: Duration,
    /// Seconds a client may take to send a whole request body; past it the
    /// request gets `400` and the connection is closed.
    #[arg(long, env = "CHATQ_BODY_READ_TIMEOUT_SECS", default_value = "10", value_parser = parse_secs)]
    pub body_read_timeout: Duration,
    /// Requests handled at once (long-polls, event streams and `/healthz`
    /// not counted); past it a request gets `503` with `Retry-After: 1`.
    #[arg(long, env = "CHATQ_MAX_IN_FLIGHT_REQUESTS", default_value_t = 2048, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_in_flight_requests: u32,
    /// Seconds a request may take to be handled (long-polls and event
    /// streams excepted); past it the request gets `503`.
    #[arg(long, env = "CHATQ_REQUEST_TIMEOUT_SECS", default_value = "30", value_parser = parse_secs)]
    pub request_timeout: Duration,
    /// Largest list page, in bytes of message content (or of system prompts
    /// and metadata); a page stops early past it and `next_after` continues.
    #[arg(long, env = "CHATQ_MAX_PAGE_BYTES", default_value_t = 1024 * 1024)]
    pub max_page_bytes: usize,
    /// Longest wait of a `/v1/chat/completions` request for its job, in
    /// seconds; past it the client gets a timeout error and the job is
    /// cancelled.
    #[arg(long = "completions-timeout-secs", env = "CHATQ_COMPLETIONS_TIMEOUT_SECS", default_value = "600", value_parser = parse_secs)]
    pub completions_timeout: Duration,
    /// Apply pending database migrations at start-up.
    #[arg(long, env = "CHATQ_MIGRATE_ON_START", default_value_t = true, action = clap::ArgAction::Set)]
    pub migrate_on_start: bool,
}

/// Parses a fraction in `(0, 1]` (for clap).
fn parse_share(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 1.0 => Ok(v),
        _ => Err("expected a number greater than 0 and at most 1".into()),
    }
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
    /// Job events (state changes, streamed text) for long-polls and streams.
    pub hub: JobHub,
    /// Counts behind the per-tenant queue share and the outbox bound.
    pub backlogs: limits::Backlogs,
    /// Queue positions and start estimates of queued jobs.
    pub positions: positions::Positions,
    /// Settings.
    pub config: Arc<ApiConfig>,
    /// Prometheus metrics of this process.
    pub metrics: Arc<metrics::ApiMetrics>,
    /// Cancelled when the api shuts down: open event streams end on it.
    pub shutdown: CancellationToken,
}

impl AppState {
    /// Connects (lazily) and starts the background tasks, which end on `shutdown`.
    pub fn new(config: ApiConfig, shutdown: &CancellationToken) -> anyhow::Result<Self> {
        let db = config.db.pool()?;
        let publisher = JobPublisher::start(Publisher::new(&config.amqp), db.clone());
        let keys = KeyCache::default();
        let (binds, bind_commands) = tokio::sync::mpsc::unbounded_channel();
        let hub = JobHub::new(binds);
        let listen = config.db.listen_pool(&db)?;
        notify::start(listen, hub.clone(), keys.clone(), shutdown.clone());
        events::start(
            config.amqp.amqp_url.clone(),
            Topology::new(&config.amqp),
            hub.clone(),
            bind_commands,
            shutdown.clone(),
        );
        let batcher = SubmitBatcher::start(db.clone());
        Ok(Self {
            db,
            publisher,
            keys,
            batcher,
            hub,
            backlogs: limits::Backlogs::default(),
            positions: positions::Positions::default(),
            config: Arc::new(config),
            metrics: Arc::default(),
            shutdown: shutdown.clone(),
        })
    }
}

impl AppState {
    /// The job object, with its place in the queue while it is queued.
    pub async fn job_view(&self, job: chatq_common::domain::Job) -> views::JobView {
        let queue = if job.status == chatq_common::domain::JobStatus::Queued {
            self.positions.of(&self.db, job.start_key()).await
        } else {
            None
        };
        views::JobView::from(job).with_queue(queue)
    }
}

/// The whole HTTP surface.
pub fn router(state: AppState) -> Router {
    let limits = server::RequestLimits::new(&state.config);
    let metrics = Arc::clone(&state.metrics);
    routes::router()
        // The JSON extractor enforces CHATQ_MAX_BODY_BYTES itself, draining
        // what it refuses so clients can read the 413.
        .layer(DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn_with_state(
            limits,
            server::limit_request,
        ))
        // Outermost: metrics, trace context and the request span, so shed
        // and timed-out requests are counted and traced too.
        .layer(observe::ObserveLayer::new(metrics))
        .with_state(state)
}

/// Serves until `shutdown`, then lets in-flight requests finish.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let limits = server::ConnectionLimits::new(&state.config);
    server::run(listener, router(state), limits, shutdown).await
}
