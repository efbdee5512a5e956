//! The worker's Prometheus metrics and its small operations listener on
//! `CHATQ_WORKER_METRICS_ADDR`: `GET /metrics`, `GET /healthz` (the process
//! runs) and `GET /readyz` (PostgreSQL and RabbitMQ answer), for scrapers
//! and orchestrators. Queue depths are the api's to export; a worker reports
//! what happens inside it: its jobs, its slots and its LLM calls.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use chatq_common::metrics::{CONTENT_TYPE, HistogramFamily, llm_histogram, render};
use chatq_common::queue::Publisher;

/// Longest a readiness probe waits on each dependency.
const READY_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// How a job's handling in this worker ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum JobOutcome {
    /// The reply was stored: terminal `succeeded`.
    Succeeded,
    /// Failed for good: terminal `failed`, message dead-lettered.
    Failed,
    /// Given back to wait out a long retry delay in the broker.
    Deferred,
    /// Given back unfinished at shutdown.
    Released,
    /// The claim was lost (cancelled, conversation deleted, reclaimed);
    /// the result was discarded.
    Discarded,
}

impl JobOutcome {
    fn label(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Deferred => "deferred",
            Self::Released => "released",
            Self::Discarded => "discarded",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetryLabels {
    reason: &'static str,
    /// `in_process` (a short pause) or `broker` (the delay queue).
    via: &'static str,
}

/// Every metric a worker exports.
pub struct WorkerMetrics {
    registry: Registry,
    jobs: Family<OutcomeLabels, Counter>,
    in_flight: Gauge,
    llm_duration: HistogramFamily<OutcomeLabels>,
    llm_first_token: Histogram,
    llm_tokens: Family<TokenLabels, Counter>,
    llm_errors: Family<CodeLabels, Counter>,
    retries: Family<RetryLabels, Counter>,
}

impl std::fmt::Debug for WorkerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerMetrics").finish_non_exhaustive()
    }
}

impl WorkerMetrics {
    /// A registry with every worker metric at zero; `capacity` is
    /// `CHATQ_WORKER_CONCURRENCY`.
    pub fn new(capacity: u16) -> Self {
        let mut registry = Registry::default();
        let jobs = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "chatq_worker_jobs",
            "Jobs this worker finished handling, by outcome (succeeded and failed are terminal)",
            jobs.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "chatq_worker_jobs_in_flight",
            "Jobs being handled by this worker",
            in_flight.clone(),
        );
        let capacity_gauge: Gauge = Gauge::default();
        capacity_gauge.set(i64::from(capacity));
        registry.register(
            "chatq_worker_capacity",
            "Jobs this worker handles at once (CHATQ_WORKER_CONCURRENCY)",
            capacity_gauge,
        );
        let llm_duration = HistogramFamily::<OutcomeLabels>::new_with_constructor(llm_histogram);
        registry.register(
            "chatq_llm_request_duration_seconds",
            "Duration of one LLM call (one attempt), by outcome (ok, error)",
            llm_duration.clone(),
        );
        let llm_first_token = llm_histogram();
        registry.register(
            "chatq_llm_time_to_first_token_seconds",
            "Time from the start of an LLM call to the first piece of text reaching the relay",
            llm_first_token.clone(),
        );
        let llm_tokens = Family::<TokenLabels, Counter>::default();
        registry.register(
            "chatq_llm_tokens",
            "Tokens the LLM reported, by direction (in: prompt, out: completion)",
            llm_tokens.clone(),
        );
        let llm_errors = Family::<CodeLabels, Counter>::default();
        registry.register(
            "chatq_llm_errors",
            "Failed LLM calls, by error code",
            llm_errors.clone(),
        );
        let retries = Family::<RetryLabels, Counter>::default();
        registry.register(
            "chatq_llm_retries",
            "LLM calls scheduled again after a retryable failure, by reason (error code) and where the wait happens",
            retries.clone(),
        );
        Self {
            registry,
            jobs,
            in_flight,
            llm_duration,
            llm_first_token,
            llm_tokens,
            llm_errors,
            retries,
        }
    }

    /// Counts a job's end in this worker.
    pub fn job_finished(&self, outcome: JobOutcome) {
        self.jobs
            .get_or_create(&OutcomeLabels {
                outcome: outcome.label(),
            })
            .inc();
    }

    /// Counts a job as in flight until the guard drops.
    pub fn job_started(self: &Arc<Self>) -> InFlight {
        self.in_flight.inc();
        InFlight(Arc::clone(self))
    }

    /// Records one LLM call: its duration, and its error code if it failed.
    pub fn llm_call(&self, elapsed: Duration, error_code: Option<&'static str>) {
        let outcome = if error_code.is_some() { "error" } else { "ok" };
        self.llm_duration
            .get_or_create(&OutcomeLabels { outcome })
            .observe(elapsed.as_secs_f64());
        if let Some(code) = error_code {
            self.llm_errors.get_or_create(&CodeLabels { code }).inc();
        }
    }

    /// Records the time to the first piece of text of a call.
    pub fn llm_first_token(&self, elapsed: Duration) {
        self.llm_first_token.observe(elapsed.as_secs_f64());
    }

    /// Adds the token counts an LLM reported.
    pub fn llm_tokens(&self, prompt: Option<i32>, completion: Option<i32>) {
        for (direction, n) in [("in", prompt), ("out", completion)] {
            if let Some(n) = n.and_then(|n| u64::try_from(n).ok()) {
                self.llm_tokens
                    .get_or_create(&TokenLabels { direction })
                    .inc_by(n);
            }
        }
    }

    /// Counts a retry scheduled for `reason` (an error code), waiting in
    /// process or in the broker.
    pub fn retry(&self, reason: &'static str, in_broker: bool) {
        let via = if in_broker { "broker" } else { "in_process" };
        self.retries
            .get_or_create(&RetryLabels { reason, via })
            .inc();
    }
}

/// A job counted in `chatq_worker_jobs_in_flight` while this lives.
#[derive(Debug)]
pub struct InFlight(Arc<WorkerMetrics>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

/// What the operations listener reads.
#[derive(Clone)]
struct Ops {
    metrics: Arc<WorkerMetrics>,
    db: PgPool,
    publisher: Publisher,
}

/// Binds `addr` and serves `/metrics`, `/healthz` and `/readyz` until
/// `stop`. The bound address is printed (port 0 picks a free one, as tests
/// do). A failed bind is logged and the worker runs on without the
/// listener: jobs matter more than their metrics, and several workers on
/// one host with the default address must not stop each other.
pub async fn start(
    addr: &str,
    metrics: Arc<WorkerMetrics>,
    db: PgPool,
    publisher: Publisher,
    stop: CancellationToken,
) {
    let listener = match TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(err) => {
            tracing::error!(addr, error = %err, "cannot bind CHATQ_WORKER_METRICS_ADDR; running without /metrics, /healthz and /readyz");
            return;
        }
    };
    match listener.local_addr() {
        Ok(bound) => {
            // Test harnesses and scripts read the bound address from this line.
            println!("chatq-worker metrics listening on http://{bound}");
            tracing::info!(addr = %bound, "metrics listening");
        }
        Err(err) => tracing::warn!(error = %err, "could not read the metrics address"),
    }
    let app = Router::new()
        .route("/metrics", get(serve_metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(Ops {
            metrics,
            db,
            publisher,
        });
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
        if let Err(err) = served {
            tracing::warn!(error = %err, "metrics listener stopped");
        }
    });
}

async fn serve_metrics(State(ops): State<Ops>) -> Response {
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        render(&ops.metrics.registry),
    )
        .into_response()
}

/// 200 when PostgreSQL and RabbitMQ answer, else 503 naming the one that
/// does not.
async fn readyz(State(ops): State<Ops>) -> (StatusCode, String) {
    let db = async { sqlx::query("select 1").execute(&ops.db).await.is_ok() };
    let (db_ok, broker_ok) = tokio::join!(
        tokio::time::timeout(READY_CHECK_TIMEOUT, db),
        tokio::time::timeout(READY_CHECK_TIMEOUT, ops.publisher.is_ready()),
    );
    let down: Vec<&str> = [
        (db_ok.unwrap_or(false), "postgres"),
        (broker_ok.unwrap_or(false), "rabbitmq"),
    ]
    .into_iter()
    .filter_map(|(ok, name)| (!ok).then_some(name))
    .collect();
    if down.is_empty() {
        (StatusCode::OK, "ready".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not reachable: {}", down.join(", ")),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_follows_the_guards_and_capacity_is_set() {
        let m = Arc::new(WorkerMetrics::new(8));
        let a = m.job_started();
        let b = m.job_started();
        assert_eq!(m.in_flight.get(), 2);
        drop(a);
        drop(b);
        assert_eq!(m.in_flight.get(), 0);
        m.job_finished(JobOutcome::Succeeded);
        m.llm_tokens(Some(3), Some(-1));
        m.retry("llm_rate_limited", false);
        let text = render(&m.registry);
        assert!(text.contains("chatq_worker_capacity 8"), "{text}");
        assert!(
            text.contains(r#"chatq_worker_jobs_total{outcome="succeeded"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"chatq_llm_tokens_total{direction="in"} 3"#),
            "{text}"
        );
        assert!(!text.contains(r#"direction="out""#), "{text}");
    }
}
