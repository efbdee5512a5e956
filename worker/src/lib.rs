//! `chatq-worker`: consumes chat jobs from RabbitMQ, calls an
//! OpenAI-compatible LLM and writes the replies to PostgreSQL.

pub mod attempt;
pub mod budget;
pub mod cancels;
pub mod consumer;
pub mod controls;
pub mod llm;
pub mod metrics;
pub mod prompt;
pub mod recovery;
pub mod retry;
pub mod runner;
pub mod span;
pub mod sse;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use chatq_common::config::{AmqpArgs, DbArgs, parse_secs};
use chatq_common::queue::{Publisher, Topology};

pub use consumer::Stop;

/// `chatq-worker` settings: environment variables, each with a `--flag`.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerConfig {
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub amqp: AmqpArgs,
    /// Base URL of any OpenAI-compatible API (…/v1).
    #[arg(
        long,
        env = "OPENAI_BASE_URL",
        default_value = "http://127.0.0.1:8090/v1"
    )]
    pub openai_base_url: String,
    /// API key sent as a bearer token to the LLM, if any.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub openai_api_key: Option<SecretString>,
    /// LLM calls in flight per worker process (the prefetch), at least 1
    /// (0 would consume nothing while counting as a consumer).
    #[arg(long, env = "CHATQ_WORKER_CONCURRENCY", default_value_t = 64,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub concurrency: u16,
    /// LLM attempts per job before it fails.
    #[arg(long, env = "CHATQ_MAX_ATTEMPTS", default_value_t = 5)]
    pub max_attempts: u32,
    /// Seconds a claimed job stays owned without a heartbeat.
    #[arg(long = "lease-secs", env = "CHATQ_LEASE_SECS", default_value = "30", value_parser = parse_secs)]
    pub lease: Duration,
    /// Seconds in-flight jobs may take to finish after SIGTERM.
    #[arg(long = "shutdown-grace-secs", env = "CHATQ_SHUTDOWN_GRACE_SECS", default_value = "30", value_parser = parse_secs)]
    pub shutdown_grace: Duration,
    /// Seconds one LLM call may take.
    #[arg(long = "llm-timeout-secs", env = "CHATQ_LLM_TIMEOUT_SECS", default_value = "120", value_parser = parse_secs)]
    pub llm_timeout: Duration,
    /// Characters of conversation history sent to the LLM; oldest turns
    /// are dropped first, the system prompt is always kept.
    #[arg(long, env = "CHATQ_HISTORY_CHARS", default_value_t = 200_000)]
    pub history_chars: usize,
    /// Seconds a queued job may stay unconfirmed before the relay publishes it.
    #[arg(long = "relay-grace-secs", env = "CHATQ_RELAY_GRACE_SECS", default_value = "10", value_parser = parse_secs)]
    pub relay_grace: Duration,
    /// Seconds after its publish a still-queued job may have lost its
    /// message; such jobs are republished when the work queue holds fewer
    /// messages than they number (see `recovery::republish_vanished`). Keep
    /// it above the longest retry delay (60 s).
    #[arg(long = "republish-after-secs", env = "CHATQ_REPUBLISH_AFTER_SECS", default_value = "300", value_parser = parse_secs)]
    pub republish_after: Duration,
    /// Listen address of `/metrics`, `/healthz` and `/readyz` (port 0: any
    /// free port; the bound address is printed at start).
    #[arg(
        long,
        env = "CHATQ_WORKER_METRICS_ADDR",
        default_value = "127.0.0.1:9091"
    )]
    pub metrics_addr: String,
    /// LLM calls in flight across all workers together (unset: no shared cap).
    #[arg(long, env = "CHATQ_LLM_MAX_CONCURRENCY", value_parser = clap::value_parser!(u32).range(1..))]
    pub llm_max_concurrency: Option<u32>,
    /// LLM requests per minute across all workers together (unset: none).
    #[arg(long, env = "CHATQ_LLM_REQUESTS_PER_MINUTE", value_parser = parse_rate)]
    pub llm_requests_per_minute: Option<f64>,
    /// LLM tokens (prompt and reply) per minute across all workers together
    /// (unset: none). Each call reserves its estimate before it starts; the
    /// difference is refunded when the reply's usage arrives.
    #[arg(long, env = "CHATQ_LLM_TOKENS_PER_MINUTE", value_parser = parse_rate)]
    pub llm_tokens_per_minute: Option<f64>,
    /// Finished jobs older than this many days are deleted (fractions
    /// allowed); their messages stay, as the conversation's history.
    #[arg(long = "retention-days", env = "CHATQ_RETENTION_DAYS", default_value = "30", value_parser = parse_days)]
    pub retention: Duration,
    /// Per-model overrides of the three limits above, as JSON:
    /// `{"<model>": {"max_concurrency"?, "requests_per_minute"?, "tokens_per_minute"?}}`;
    /// a model's entry replaces only the limits it names.
    #[arg(long, env = "CHATQ_LLM_MODEL_LIMITS")]
    pub llm_model_limits: Option<String>,
    /// Length in seconds of the "minute" of the per-minute limits (for
    /// tests and benchmarks that compress time; keep 60 in production).
    #[arg(long = "llm-rate-window-secs", env = "CHATQ_LLM_RATE_WINDOW_SECS", default_value = "60", value_parser = parse_secs)]
    pub llm_rate_window: Duration,
}

impl WorkerConfig {
    /// The shared LLM budget's settings.
    pub fn budget(&self) -> Result<budget::BudgetConfig, String> {
        let default = chatq_common::db::llm_budget::Limits {
            max_concurrency: self.llm_max_concurrency,
            requests: self.llm_requests_per_minute,
            tokens: self.llm_tokens_per_minute,
        };
        let overrides = match &self.llm_model_limits {
            Some(json) if !json.trim().is_empty() => budget::BudgetConfig::parse_overrides(json)?,
            _ => std::collections::HashMap::new(),
        };
        if self.llm_rate_window.is_zero() {
            return Err("CHATQ_LLM_RATE_WINDOW_SECS must be positive".to_owned());
        }
        Ok(budget::BudgetConfig {
            default,
            models: overrides
                .into_iter()
                .map(|(model, o)| (model, o.over(default)))
                .collect(),
            window: self.llm_rate_window,
            // A call cannot outlive its timeout; a dead worker's capacity
            // returns one lease after that.
            lease: self.llm_timeout + self.lease,
        })
    }
}

fn parse_days(s: &str) -> Result<Duration, String> {
    match s.trim().parse::<f64>() {
        Ok(days) if days.is_finite() && days >= 0.0 => {
            Duration::try_from_secs_f64(days * 86_400.0).map_err(|e| e.to_string())
        }
        _ => Err(format!("expected a number of days, got {s:?}")),
    }
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("expected a positive number, got {s:?}")),
    }
}

/// Runs the worker until `shutdown` (or, with `drain`, until the queue is
/// empty): consumer, recovery loop, then a graceful drain of in-flight jobs.
pub async fn run(
    config: WorkerConfig,
    shutdown: CancellationToken,
    drain: bool,
) -> anyhow::Result<Stop> {
    let db = config.db.pool().context("configuring the postgres pool")?;
    let llm = llm::LlmClient::new(
        &config.openai_base_url,
        config.openai_api_key.clone(),
        config.llm_timeout,
    )
    .context("building the LLM client")?;
    let topology = Topology::new(&config.amqp);
    let publisher = Publisher::new(&config.amqp);
    let grace = config.shutdown_grace;
    let recovery_settings = recovery::RecoverySettings {
        relay_grace: config.relay_grace,
        republish_after: config.republish_after,
        max_attempts: config.max_attempts,
        retention: config.retention,
    };
    let budget_config = config.budget().map_err(anyhow::Error::msg)?;
    let listen = config
        .db
        .listen_pool(&db)
        .context("configuring the LISTEN connection")?;
    let stop_background = CancellationToken::new();
    let metrics = Arc::new(metrics::WorkerMetrics::new(config.concurrency));
    metrics::start(
        &config.metrics_addr,
        Arc::clone(&metrics),
        db.clone(),
        publisher.clone(),
        stop_background.clone(),
    )
    .await;
    let budget = budget::Budget::new(db.clone(), budget_config);
    let ctx = Arc::new(runner::JobContext {
        paused: controls::watch_pause(db.clone(), stop_background.clone()).await,
        store: store::JobStore::start(db.clone(), config.lease),
        db: db.clone(),
        llm,
        publisher: publisher.clone(),
        cancels: cancels::CancelWatch::start(listen, Arc::clone(&budget), stop_background.clone()),
        budget,
        metrics,
        config,
    });

    let recovery = tokio::spawn(recovery::run(
        db,
        publisher,
        recovery_settings,
        stop_background.clone(),
    ));

    // After SIGTERM, in-flight jobs get `grace`; then they are abandoned:
    // their claims are released and their messages requeued.
    let abandon = CancellationToken::new();
    let timer = {
        let (shutdown, abandon) = (shutdown.clone(), abandon.clone());
        tokio::spawn(async move {
            shutdown.cancelled().await;
            tokio::time::sleep(grace).await;
            tracing::warn!(
                grace_secs = grace.as_secs(),
                "grace period over; abandoning in-flight jobs"
            );
            abandon.cancel();
        })
    };
    let stop = consumer::consume(ctx, topology, TaskTracker::new(), abandon, shutdown, drain).await;
    timer.abort();
    stop_background.cancel();
    let _ = recovery.await;
    tracing::info!(?stop, "worker stopped");
    Ok(stop)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: super::WorkerConfig,
    }

    #[test]
    fn a_worker_concurrency_of_zero_is_refused() {
        let parsed = |n: &str| Cli::try_parse_from(["chatq-worker", "--concurrency", n]);
        assert!(parsed("0").is_err(), "0 would consume nothing");
        assert_eq!(parsed("1").map(|c| c.config.concurrency).ok(), Some(1));
    }
}
