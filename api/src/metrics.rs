//! The api's Prometheus metrics, served on `GET /metrics` (no auth, exempt
//! from the in-flight cap and the handling timeout, like `/healthz`).
//!
//! Request counts and latencies are recorded by [`crate::observe`]; submission
//! outcomes by [`ApiMetrics::record_submission`]. Queue and job gauges come
//! from the broker and PostgreSQL, read at most once per [`SAMPLE_EVERY`] by
//! a scrape and cached, so a scrape never costs a query per job and a
//! process nobody scrapes reads nothing.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{Method, header};
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use chatq_common::db::jobs;
use chatq_common::metrics::{CONTENT_TYPE, HistogramFamily, fast_histogram, render};

use crate::AppState;
use crate::limits::Refusal;
use crate::submission::SubmitError;

/// Longest a cached queue and job sample is served before a scrape reads
/// the broker and PostgreSQL again.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// Longest a scrape waits for a fresh sample; past it the cached values
/// are served.
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(2);

/// Labels of one HTTP request: route template (never the raw path), method
/// and status code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    method: &'static str,
    route: String,
    status: u16,
}

/// Why a submission was rejected.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// A job status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: String,
}

/// Every metric the api exports.
pub struct ApiMetrics {
    /// Distinguishes this instance in the per-thread cache of HTTP series.
    id: u64,
    registry: Registry,
    http_requests: Family<HttpLabels, Counter>,
    http_duration: HistogramFamily<HttpLabels>,
    submissions_accepted: Counter,
    submissions_rejected: Family<ReasonLabels, Counter>,
    sse_subscribers: Gauge,
    queue_messages: Gauge,
    queue_consumers: Gauge,
    dead_letter_messages: Gauge,
    jobs: Family<StatusLabels, Gauge>,
    oldest_queued_age: Gauge<f64, AtomicU64>,
    outbox_backlog: Gauge,
    outbox_lag: Gauge<f64, AtomicU64>,
    sample_errors: Counter,
    /// When the broker and database were last sampled; held across the
    /// sample so concurrent scrapes share one.
    sampled_at: tokio::sync::Mutex<Option<Instant>>,
}

impl std::fmt::Debug for ApiMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiMetrics").finish_non_exhaustive()
    }
}

impl Default for ApiMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ApiMetrics {
    /// A registry with every api metric at zero.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "chatq_http_requests",
            "HTTP requests answered, by method, route template and status",
            http_requests.clone(),
        );
        let http_duration = HistogramFamily::<HttpLabels>::new_with_constructor(fast_histogram);
        registry.register(
            "chatq_http_request_duration_seconds",
            "Time to answer an HTTP request (to the response head; streams excluded), by method, route template and status",
            http_duration.clone(),
        );
        let submissions_accepted = Counter::default();
        registry.register(
            "chatq_submissions_accepted",
            "Chat turns accepted and queued (idempotent replays included)",
            submissions_accepted.clone(),
        );
        let submissions_rejected = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "chatq_submissions_rejected",
            "Chat turns refused after validation, by reason",
            submissions_rejected.clone(),
        );
        let sse_subscribers = Gauge::default();
        registry.register(
            "chatq_sse_subscribers",
            "Open job event subscriptions (SSE streams, long-polls, facade waits) in this process",
            sse_subscribers.clone(),
        );
        let queue_messages = Gauge::default();
        registry.register(
            "chatq_queue_messages",
            "Messages ready in the work queue (sampled from the broker)",
            queue_messages.clone(),
        );
        let queue_consumers = Gauge::default();
        registry.register(
            "chatq_queue_consumers",
            "Consumers of the work queue (sampled from the broker)",
            queue_consumers.clone(),
        );
        let dead_letter_messages = Gauge::default();
        registry.register(
            "chatq_dead_letter_messages",
            "Messages in the dead-letter queue (sampled from the broker)",
            dead_letter_messages.clone(),
        );
        let jobs = Family::<StatusLabels, Gauge>::default();
        registry.register(
            "chatq_jobs",
            "Jobs in PostgreSQL by status (sampled)",
            jobs.clone(),
        );
        let oldest_queued_age = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "chatq_oldest_queued_job_age_seconds",
            "Age of the oldest queued job, 0 when none is queued (sampled)",
            oldest_queued_age.clone(),
        );
        let outbox_backlog = Gauge::default();
        registry.register(
            "chatq_outbox_backlog",
            "Queued jobs whose publish is not confirmed yet, waiting for the relay (sampled)",
            outbox_backlog.clone(),
        );
        let outbox_lag = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "chatq_outbox_lag_seconds",
            "Age of the oldest queued job whose publish is not confirmed (the relay's lag), 0 when none (sampled)",
            outbox_lag.clone(),
        );
        let sample_errors = Counter::default();
        registry.register(
            "chatq_metrics_sample_errors",
            "Failed reads of the broker or PostgreSQL for the sampled gauges (stale values were served)",
            sample_errors.clone(),
        );
        Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            registry,
            http_requests,
            http_duration,
            submissions_accepted,
            submissions_rejected,
            sse_subscribers,
            queue_messages,
            queue_consumers,
            dead_letter_messages,
            jobs,
            oldest_queued_age,
            outbox_backlog,
            outbox_lag,
            sample_errors,
            sampled_at: tokio::sync::Mutex::new(None),
        }
    }

    /// Every series in the Prometheus text format (what `/metrics` serves,
    /// without the sampled gauges' refresh).
    pub fn render(&self) -> String {
        render(&self.registry)
    }

    /// Counts one answered request and its latency (to the response head)
    /// by method, route template (`unmatched` for the fallback) and status.
    pub fn record_request(&self, method: &Method, route: &str, status: u16, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        with_http_series(
            self,
            method_label(method),
            route,
            status,
            |requests, duration| {
                duration.observe(seconds);
                requests.inc();
            },
        );
    }

    /// Counts a submission's outcome.
    pub fn record_submission<T>(&self, result: &Result<T, SubmitError>) {
        match result {
            Ok(_) => {
                self.submissions_accepted.inc();
            }
            Err(err) => {
                let reason = rejection_reason(err);
                self.submissions_rejected
                    .get_or_create(&ReasonLabels { reason })
                    .inc();
            }
        }
    }

    /// Reads the broker and PostgreSQL if the cached sample is older than
    /// [`SAMPLE_EVERY`]; on failure the previous values stay.
    async fn sample(&self, state: &AppState) {
        let mut sampled_at = self.sampled_at.lock().await;
        if sampled_at.is_some_and(|at| at.elapsed() < SAMPLE_EVERY) {
            return;
        }
        // Set before reading: an unreachable broker is retried once per
        // interval, not on every scrape.
        *sampled_at = Some(Instant::now());
        // Each read has its own time limit: a hung broker must not stop the
        // PostgreSQL gauges (the outbox matters most exactly then).
        let (depths, stats, outbox) = tokio::join!(
            bounded(state.publisher.broker().depths()),
            bounded(jobs::stats(&state.db)),
            bounded(jobs::outbox(&state.db)),
        );
        match depths {
            Ok(d) => {
                self.queue_messages.set(i64::from(d.work_messages));
                self.queue_consumers.set(i64::from(d.work_consumers));
                self.dead_letter_messages.set(i64::from(d.dead_messages));
            }
            Err(err) => {
                self.sample_errors.inc();
                tracing::warn!(error = %err, "reading queue depths for metrics failed");
            }
        }
        match stats {
            Ok(stats) => {
                for (status, count) in stats.by_status {
                    self.jobs.get_or_create(&StatusLabels { status }).set(count);
                }
                self.oldest_queued_age
                    .set(stats.oldest_queued_age_secs.unwrap_or(0.0).max(0.0));
            }
            Err(err) => {
                self.sample_errors.inc();
                tracing::warn!(error = %err, "reading job counts for metrics failed");
            }
        }
        match outbox {
            Ok((backlog, lag)) => {
                self.outbox_backlog.set(backlog);
                self.outbox_lag.set(lag);
            }
            Err(err) => {
                self.sample_errors.inc();
                tracing::warn!(error = %err, "reading the outbox for metrics failed");
            }
        }
    }
}

/// A sampled read, bounded by [`SAMPLE_TIMEOUT`]; its error as text.
async fn bounded<T, E: std::fmt::Display>(
    read: impl Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(SAMPLE_TIMEOUT, read).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => Err(err.to_string()),
        Err(_) => Err(format!("timed out after {SAMPLE_TIMEOUT:?}")),
    }
}

/// Source of [`ApiMetrics`] instance ids.
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// One HTTP series' handles: the request counter and the latency histogram
/// of one (instance, method, route, status).
struct HttpSeries {
    route: Box<str>,
    requests: Counter,
    duration: Histogram,
}

/// Cached series by (instance, method, status), then by route.
type SeriesByKey = HashMap<(u64, &'static str, u16), Vec<HttpSeries>>;

/// Series per thread before the cache is emptied (routes × methods ×
/// statuses is small; this bounds a pathological mix).
const HTTP_SERIES_PER_THREAD: usize = 4096;

thread_local! {
    /// Handles of the HTTP series this thread recorded, by (instance,
    /// method, status), then route: a request then touches no lock of the
    /// metric families (under load on several cores those locks, shared by
    /// every request, cost more than the counting itself).
    static HTTP_SERIES: RefCell<(usize, SeriesByKey)> = RefCell::new((0, HashMap::new()));
}

/// Calls `record` with the request counter and latency histogram of one
/// series, created in the families on first use.
fn with_http_series(
    metrics: &ApiMetrics,
    method: &'static str,
    route: &str,
    status: u16,
    record: impl FnOnce(&Counter, &Histogram),
) {
    HTTP_SERIES.with_borrow_mut(|(count, cache)| {
        let key = (metrics.id, method, status);
        if let Some(series) = cache
            .get(&key)
            .and_then(|v| v.iter().find(|s| &*s.route == route))
        {
            record(&series.requests, &series.duration);
            return;
        }
        if *count >= HTTP_SERIES_PER_THREAD {
            cache.clear();
            *count = 0;
        }
        let labels = HttpLabels {
            method,
            route: route.to_owned(),
            status,
        };
        let series = HttpSeries {
            route: route.into(),
            requests: metrics.http_requests.get_or_create(&labels).clone(),
            duration: metrics.http_duration.get_or_create(&labels).clone(),
        };
        record(&series.requests, &series.duration);
        cache.entry(key).or_default().push(series);
        *count += 1;
    });
}

/// The bounded label value for a rejected submission.
fn rejection_reason(err: &SubmitError) -> &'static str {
    match err {
        SubmitError::ConversationBusy => "conversation_busy",
        SubmitError::KeyReused => "idempotency_key_reused",
        SubmitError::KeyRace => "idempotency_key_race",
        SubmitError::NoConversation => "no_conversation",
        SubmitError::Refused(Refusal::RateLimited { .. }) => "rate_limited",
        SubmitError::Refused(Refusal::QueueFull { .. }) => "queue_full",
        SubmitError::Refused(Refusal::OutboxFull { .. }) => "outbox_full",
        SubmitError::Refused(Refusal::Db(_)) | SubmitError::Db(_) => "database",
    }
}

/// `GET /metrics`: the Prometheus text exposition.
#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "metrics",
    tag = "operations",
    summary = "Prometheus metrics",
    description = "The OpenMetrics text format (which Prometheus reads): request counts and latency histograms by route and status, jobs by status, queue depth, event-stream subscribers. Exempt from load shedding.",
    responses(
        (status = 200, description = "The metrics.", content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8", body = String),
    ),
)]
pub async fn metrics(State(state): State<AppState>) -> Response {
    let m = &state.metrics;
    m.sse_subscribers
        .set(i64::try_from(state.hub.subscribers()).unwrap_or(i64::MAX));
    m.sample(&state).await;
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], m.render()).into_response()
}

/// The method as a label; anything non-standard is `other` (bounded).
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn submissions_are_counted_by_outcome_and_reason() {
        let m = ApiMetrics::new();
        m.record_submission::<()>(&Ok(()));
        m.record_submission::<()>(&Err(SubmitError::ConversationBusy));
        m.record_submission::<()>(&Err(SubmitError::Refused(Refusal::QueueFull {
            retry_after_secs: 1,
        })));
        let text = render(&m.registry);
        assert!(
            text.contains("chatq_submissions_accepted_total 1"),
            "{text}"
        );
        assert!(
            text.contains(r#"chatq_submissions_rejected_total{reason="conversation_busy"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"chatq_submissions_rejected_total{reason="queue_full"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn unknown_methods_share_one_label() {
        let odd = Method::from_bytes(b"BREW").expect("a valid token");
        assert_eq!(method_label(&odd), "other");
        assert_eq!(method_label(&Method::GET), "GET");
    }
}
