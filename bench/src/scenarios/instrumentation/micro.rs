//! The in-process half of `instrumentation`: what the api's and the
//! worker's instrumentation costs per submit and per job, timed in a tight
//! loop with the project's own code. It runs in a child process of the
//! bench (the hidden `instrumentation-micro` subcommand) because
//! [`chatq_common::telemetry::init`] installs a process-wide subscriber
//! from `RUST_LOG` and `LOG_FORMAT` and writes to stderr: each log
//! configuration gets its own process, with stderr on `/dev/null` (so every
//! log line still costs its formatting and its `write` call).
//!
//! **Per submit** (api): a request `POST /v1/chat` goes through an axum
//! router holding the api's instrumentation layer,
//! [`chatq_api::observe::ObserveLayer`] (request counter and latency
//! histogram by method, route and status; the W3C trace context; the
//! `request` span, entered at each poll of the handler and of the body).
//! The handler does what the submit handler does for instrumentation: takes
//! the `TraceContext` extension, renders its `traceparent` (stored with the
//! job) and calls [`chatq_api::metrics::ApiMetrics::record_submission`].
//! It is polled [`HANDLER_POLLS`] times (a submit waits for its batched
//! INSERT and the broker confirm), so with the response body's polls the
//! span is entered and left as often as in the api (counted, see the
//! constant). The response body is read to its end and
//! dropped, which closes the span. The same router without these layers
//! and calls is the baseline; the cost is the difference.
//!
//! **Per job** (worker): the `job` span, made and filled by the worker's
//! own `chatq_worker::span::{job_span, record_claim}` (joined to the
//! submit's trace), entered and left
//! [`JOB_POLLS`] times (the instrumented job future is polled at every
//! await), cloned once for the heartbeat task, the log lines of a
//! successful job inside the span (`LLM call succeeded` and `job
//! succeeded`, both at `debug`, so filtered out at `info`),
//! and the [`chatq_worker::metrics::WorkerMetrics`] calls of one job:
//! `job_started` (in-flight gauge up, down on drop), `llm_first_token`,
//! `llm_call`, `llm_tokens` and `job_finished`.
//!
//! Time is the thread's CPU time (`/proc/thread-self/schedstat`, made
//! current by a `sched_yield` before each read), so other processes on the
//! machine do not inflate it; variants are interleaved within every
//! repetition and the median of the repetitions is kept.

use std::future::Future;
use std::hint::black_box;
use std::pin::{Pin, pin};
use std::sync::{Arc, Barrier};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Extension, Router};
use serde::{Deserialize, Serialize};
use tower::ServiceExt;
use uuid::Uuid;

use chatq_api::metrics::ApiMetrics;
use chatq_api::observe::ObserveLayer;
use chatq_api::submission::SubmitError;
use chatq_api::trace::TraceContext;
use chatq_worker::metrics::{JobOutcome, WorkerMetrics};

/// Times the submit handler is polled. With the 2 polls of the response
/// body this enters the request span 28 times per submit, what the api
/// does: counted once (2026-12-02, this scenario at 32 clients per api)
/// with a uprobe on the subscriber's `enter` in the `info` api process,
/// 460,588 entries for 16,218 accepted submits (28.4 each).
pub const HANDLER_POLLS: u32 = 26;
/// Times a job's instrumented future is polled. With the log lines' scopes this
/// enters the job span 24 times per job, what the worker does: counted the
/// same way in the `info` worker, 356,305 entries for 15,089 jobs (23.6
/// each): the claim, the prompt read, the streamed LLM call, the result's
/// commit and the ack each wait, and the heartbeat runs in the span too.
pub const JOB_POLLS: u32 = 22;
/// Span entries per submit and per job that are not polls (the response
/// body's two polls; the log lines' scopes).
pub const EXTRA_ENTERS: u32 = 2;
/// Threads of the contended runs: the api's and the worker's tokio
/// runtimes have one per core, and this machine has 2.
const THREADS: usize = 2;
const BODY: &str = r#"{"content":"bench 17 4242"}"#;

/// One variant's per-operation cost over the repetitions.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Samples {
    /// `bare`, `metrics`, `span` (trace context and span, no log line),
    /// `tracing` (`span` and the log lines) or `all`.
    pub variant: String,
    /// Nanoseconds of CPU (or wall, see `clock`) per operation, one per repetition.
    pub ns_per_op: Vec<f64>,
}

/// What one child process measured, under one log configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MicroRun {
    /// `RUST_LOG` of the process.
    pub rust_log: String,
    /// `LOG_FORMAT` of the process (`text` when unset).
    pub log_format: String,
    /// `thread CPU time` or `wall time` (if schedstat is missing).
    pub clock: String,
    /// Repetitions per variant.
    pub repetitions: usize,
    /// Submits per repetition (and thread).
    pub iterations: u64,
    /// Jobs per repetition (and thread).
    pub job_iterations: u64,
    /// Per submit, one thread.
    pub api: Vec<Samples>,
    /// Per submit, two threads sharing the metrics and the subscriber.
    pub api_contended: Vec<Samples>,
    /// Per job, one thread.
    pub worker: Vec<Samples>,
    /// Per job, two threads sharing the metrics and the subscriber.
    pub worker_contended: Vec<Samples>,
    /// One enter and exit of a `job` span (one more poll of an
    /// instrumented future), ns, one per repetition.
    pub enter_exit: Vec<f64>,
}

#[derive(Debug, Clone, Copy)]
struct Variant {
    name: &'static str,
    metrics: bool,
    /// Trace context and spans.
    spans: bool,
    /// The log lines (the worker's own; the api writes none at `info`).
    logs: bool,
}

const BARE: usize = 0;
const METRICS: usize = 1;
const SPAN: usize = 2;
const TRACING: usize = 3;
const ALL: usize = 4;

const VARIANTS: [Variant; 5] = [
    Variant {
        name: "bare",
        metrics: false,
        spans: false,
        logs: false,
    },
    Variant {
        name: "metrics",
        metrics: true,
        spans: false,
        logs: false,
    },
    Variant {
        name: "span",
        metrics: false,
        spans: true,
        logs: false,
    },
    Variant {
        name: "tracing",
        metrics: false,
        spans: true,
        logs: true,
    },
    Variant {
        name: "all",
        metrics: true,
        spans: true,
        logs: true,
    },
];

/// The child's entry point: installs the real subscriber from the
/// environment, measures, and prints a [`MicroRun`] as JSON on stdout.
pub fn child_main(quick: bool) -> anyhow::Result<()> {
    chatq_common::telemetry::init();
    let (repetitions, iterations) = if quick { (3, 2_000) } else { (9, 10_000) };
    let run = measure(repetitions, iterations)?;
    println!("{}", serde_json::to_string(&run)?);
    Ok(())
}

fn measure(repetitions: usize, iterations: u64) -> anyhow::Result<MicroRun> {
    let clock = if thread_cpu_ns().is_some() {
        "thread CPU time"
    } else {
        "wall time"
    };
    let api_metrics = Arc::new(ApiMetrics::new());
    let routers: Vec<Router> = VARIANTS
        .iter()
        .map(|v| submit_router(*v, &api_metrics))
        .collect();
    let worker_metrics = Arc::new(WorkerMetrics::new(64));
    // Each job with the `traceparent` its submit stored.
    let jobs: Vec<(Uuid, String)> = (0..1024)
        .map(|_| {
            let t = TraceContext::from_header(None);
            (Uuid::now_v7(), t.traceparent())
        })
        .collect();

    let submit = |v: usize, i: u64| submit_once(&routers[v], i);
    let job = |v: usize, i: u64| {
        let (id, traceparent) = &jobs[(i % jobs.len() as u64) as usize];
        job_once(&worker_metrics, VARIANTS[v], *id, traceparent, i);
        Ok(())
    };
    let span = tracing::info_span!("job", job_id = tracing::field::Empty);
    let enter_exit = |_: usize, _: u64| {
        let entered = span.enter();
        black_box(&entered);
        Ok(())
    };
    // A job costs a few times a submit: fewer per repetition.
    let job_iterations = (iterations / 2).max(1);
    let api_variants = [BARE, METRICS, TRACING, ALL];
    let job_variants = [BARE, METRICS, SPAN, TRACING, ALL];
    let contended = [BARE, ALL];
    Ok(MicroRun {
        rust_log: std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        log_format: std::env::var("LOG_FORMAT").unwrap_or_else(|_| "text".into()),
        clock: clock.into(),
        repetitions,
        iterations,
        job_iterations,
        api: interleaved(&api_variants, repetitions, iterations, 1, &submit)?,
        api_contended: interleaved(&contended, repetitions, iterations, THREADS, &submit)?,
        worker: interleaved(&job_variants, repetitions, job_iterations, 1, &job)?,
        worker_contended: interleaved(&contended, repetitions, job_iterations, THREADS, &job)?,
        enter_exit: interleaved(&[BARE], repetitions, iterations * 10, 1, &enter_exit)?
            .pop()
            .map(|s| s.ns_per_op)
            .unwrap_or_default(),
    })
}

/// Runs every variant of `variants` `iterations` times per thread, on
/// `threads` threads at once, `repetitions` times (the variants' order
/// rotating by repetition), after one warm-up round.
fn interleaved<F>(
    variants: &[usize],
    repetitions: usize,
    iterations: u64,
    threads: usize,
    op: &F,
) -> anyhow::Result<Vec<Samples>>
where
    F: Fn(usize, u64) -> anyhow::Result<()> + Sync,
{
    let mut out: Vec<Samples> = variants
        .iter()
        .map(|&v| Samples {
            variant: VARIANTS[v].name.into(),
            ns_per_op: Vec::with_capacity(repetitions),
        })
        .collect();
    for &v in variants {
        batch(v, iterations / 10 + 1, threads, op)?;
    }
    for rep in 0..repetitions {
        for k in 0..variants.len() {
            let slot = (k + rep) % variants.len();
            let ns = batch(variants[slot], iterations, threads, op)?;
            out[slot].ns_per_op.push(ns);
        }
    }
    Ok(out)
}

/// `iterations` operations on each of `threads` threads started together:
/// CPU (or wall) nanoseconds per operation.
fn batch<F>(variant: usize, iterations: u64, threads: usize, op: &F) -> anyhow::Result<f64>
where
    F: Fn(usize, u64) -> anyhow::Result<()> + Sync,
{
    let barrier = Barrier::new(threads);
    let results: Vec<anyhow::Result<f64>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    let timer = Timer::start();
                    let base = t as u64 * iterations;
                    for i in 0..iterations {
                        op(variant, base + i)?;
                    }
                    Ok(timer.elapsed_ns())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a measuring thread panicked")))
            })
            .collect()
    });
    let mut total = 0.0;
    for r in results {
        total += r?;
    }
    Ok(total / (iterations as f64 * threads as f64))
}

/// The thread's CPU time, else wall time.
enum Timer {
    Cpu(u64),
    Wall(Instant),
}

impl Timer {
    fn start() -> Self {
        match thread_cpu_ns() {
            Some(ns) => Self::Cpu(ns),
            None => Self::Wall(Instant::now()),
        }
    }

    fn elapsed_ns(&self) -> f64 {
        match self {
            Self::Cpu(start) => {
                thread_cpu_ns().map_or(0.0, |now| now.saturating_sub(*start) as f64)
            }
            Self::Wall(start) => start.elapsed().as_nanos() as f64,
        }
    }
}

/// CPU time of the calling thread, in ns. The kernel brings a running
/// thread's figure up to date only at a tick or when it leaves the CPU;
/// `sched_yield` makes it do so now.
fn thread_cpu_ns() -> Option<u64> {
    std::thread::yield_now();
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// Polls `fut` to completion with a no-op waker: everything here is ready
/// after a bounded number of polls, nothing waits on I/O.
fn run_ready<F: Future>(fut: F) -> F::Output {
    let mut fut = pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
    }
}

/// Pending `n` times (waking itself), then ready: one poll per await of a
/// real handler.
struct Polls(u32);

impl Future for Polls {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 == 0 {
            return Poll::Ready(());
        }
        self.0 -= 1;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[derive(Clone)]
struct HandlerState {
    metrics: Option<Arc<ApiMetrics>>,
}

/// Stands in for `POST /v1/chat`: only its instrumentation is real.
async fn submit_handler(
    State(state): State<HandlerState>,
    trace: Option<Extension<TraceContext>>,
) -> StatusCode {
    Polls(HANDLER_POLLS - 1).await;
    if let Some(Extension(trace)) = trace {
        // Stored with the job (`routes::submit`).
        black_box(trace.traceparent());
    }
    if let Some(m) = &state.metrics {
        m.record_submission(&Ok::<(), SubmitError>(()));
    }
    StatusCode::ACCEPTED
}

/// The submit route with the parts of the api's instrumentation layer that
/// `v` turns on (load shedding left out: it is not instrumentation).
fn submit_router(v: Variant, metrics: &Arc<ApiMetrics>) -> Router {
    let router = Router::new()
        .route("/v1/chat", post(submit_handler))
        .with_state(HandlerState {
            metrics: v.metrics.then(|| Arc::clone(metrics)),
        });
    if !v.metrics && !v.spans {
        return router;
    }
    router.layer(ObserveLayer::parts(
        v.metrics.then(|| Arc::clone(metrics)),
        v.spans,
    ))
}

/// One submit through `router`, its response body read to the end.
fn submit_once(router: &Router, i: u64) -> anyhow::Result<()> {
    let req = Request::post("/v1/chat")
        .header("authorization", "Bearer cq_bench_0123456789abcdef")
        .header("content-type", "application/json")
        .header("content-length", BODY.len())
        .body(Body::from(BODY))
        .context("building the request")?;
    let response = run_ready(router.clone().oneshot(req)).context("calling the router")?;
    if response.status() != StatusCode::ACCEPTED {
        anyhow::bail!("submit {i} answered {}", response.status());
    }
    let body = run_ready(axum::body::to_bytes(response.into_body(), usize::MAX))
        .context("reading the response")?;
    black_box(body);
    Ok(())
}

/// One successful job's instrumentation (see the module docs).
fn job_once(m: &Arc<WorkerMetrics>, v: Variant, id: Uuid, traceparent: &str, i: u64) {
    // `consumer::handle_delivery`.
    let span = if v.spans {
        chatq_worker::span::job_span(id)
    } else {
        tracing::Span::none()
    };
    let polls = if v.spans { JOB_POLLS } else { 0 };
    for _ in 0..polls {
        let entered = span.enter();
        black_box(&entered);
    }
    // `runner::run_job`.
    let in_flight = v.metrics.then(|| m.job_started());
    if v.spans {
        chatq_worker::span::record_claim(&span, id, 1, Some(traceparent));
        // The heartbeat task runs in `Span::current()`.
        black_box(span.clone());
    }
    let elapsed = Duration::from_micros(900 + i % 200);
    if v.metrics {
        // `attempt::one_attempt` and `attempt::call_with_retries`.
        m.llm_first_token(elapsed / 3);
        m.llm_call(elapsed, None);
        m.llm_tokens(Some(42), Some(17));
    }
    if v.logs {
        let _entered = span.enter();
        tracing::debug!(
            llm.latency_ms = elapsed.as_millis(),
            attempt = 1_i32,
            "LLM call succeeded"
        );
    }
    // `runner::succeed`.
    if v.metrics {
        m.job_finished(JobOutcome::Succeeded);
    }
    if v.logs {
        let _entered = span.enter();
        tracing::debug!(job_id = %id, "job succeeded");
    }
    drop(in_flight);
    drop(span);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_answers_and_is_timed() {
        let run = measure(1, 50).expect("measured");
        assert_eq!(run.api.len(), 4);
        assert_eq!(run.worker.len(), 5);
        assert_eq!(run.worker_contended.len(), 2);
        assert_eq!(run.enter_exit.len(), 1);
        for s in run.api.iter().chain(&run.worker) {
            assert_eq!(s.ns_per_op.len(), 1, "{s:?}");
            assert!(s.ns_per_op[0] > 0.0, "{s:?}");
        }
    }
}
