//! `stream`: the event-stream path (`GET /v1/jobs/{id}/events`) on one
//! api process, against a deployment the bench starts itself:
//!
//! 1. time to first token through chatq minus the mock's own (`ttft`),
//! 2. how many subscribers one api holds, and its RSS doing so (`held`),
//! 3. delta events/s delivered to 1,000 subscribers (`rate`),
//! 4. how soon a client that reconnects with `Last-Event-ID` gets the
//!    text it missed (`resume`).

pub mod fanout;
pub mod resume;
pub mod ttft;

use serde::Serialize;

use crate::ctx::Ctx;
use crate::scenarios::{Table, f};
use crate::system::SystemOptions;

pub use fanout::{HeldResult, RateRow};
pub use resume::ResumeRow;
pub use ttft::TtftRow;

/// Worker processes of the deployment.
const WORKERS: usize = 2;
/// `CHATQ_WORKER_CONCURRENCY` per worker: room for every job of a phase
/// to stream at once.
const WORKER_CONCURRENCY: u32 = 128;
/// `CHATQ_MAX_CONNECTIONS` of the api: the default (10,000) would leave no
/// room for the bench's own requests next to 10,000 subscribers.
const API_MAX_CONNECTIONS: u32 = 12_000;
/// The worker publishes a job's text at most once per this many ms
/// (`chatq_worker::attempt::COALESCE`), so a subscriber gets at most
/// 1000 / 40 = 25 deltas a second.
pub const WORKER_COALESCE_MS: u64 = 40;

/// The scenario's result.
#[derive(Debug, Clone, Serialize)]
pub struct StreamResult {
    /// Worker processes.
    pub workers: usize,
    /// Concurrency per worker.
    pub worker_concurrency: u32,
    /// `CHATQ_MAX_CONNECTIONS` of the api.
    pub api_max_connections: u32,
    /// Time to first token, by concurrent clients.
    pub ttft: Vec<TtftRow>,
    /// Subscribers held by one api.
    pub held: HeldResult,
    /// Delta events/s, by subscribers per job.
    pub rate: Vec<RateRow>,
    /// Resume after a disconnect, by time away.
    pub resume: Vec<ResumeRow>,
}

/// Runs the scenario (needs its own system: it pauses the queue and reads
/// the api's memory).
pub async fn run(ctx: &Ctx) -> anyhow::Result<StreamResult> {
    let sys = ctx
        .start(&SystemOptions {
            workers: WORKERS,
            worker_concurrency: WORKER_CONCURRENCY,
            api_env: vec![(
                "CHATQ_MAX_CONNECTIONS".into(),
                API_MAX_CONNECTIONS.to_string(),
            )],
            ..Default::default()
        })
        .await?;
    let r = async {
        let ttft = ttft::run(ctx, &sys).await?;
        let held = fanout::held(ctx, &sys).await?;
        let rate = fanout::rate(ctx, &sys).await?;
        let resume = resume::run(ctx, &sys).await?;
        Ok::<_, anyhow::Error>(StreamResult {
            workers: WORKERS,
            worker_concurrency: WORKER_CONCURRENCY,
            api_max_connections: API_MAX_CONNECTIONS,
            ttft,
            held,
            rate,
            resume,
        })
    }
    .await;
    // Resume the queue in case a phase failed while it was paused.
    let _ = sys.set_paused(&ctx.http, false).await;
    sys.stop().await;
    let r = r?;
    print(&r);
    Ok(r)
}

impl StreamResult {
    /// Time to first token, for stdout and the report.
    pub fn ttft_table(&self) -> Table {
        let rows = self
            .ttft
            .iter()
            .map(|r| {
                vec![
                    r.clients.to_string(),
                    r.chatq.count.to_string(),
                    format!("{} / {}", f(r.chatq.p50_ms, 1), f(r.chatq.p99_ms, 1)),
                    format!("{} / {}", f(r.mock.p50_ms, 1), f(r.mock.p99_ms, 1)),
                    format!("{} / {}", f(r.overhead_p50_ms, 1), f(r.overhead_p99_ms, 1)),
                    format!("{} / {}", f(r.submit.p50_ms, 1), f(r.submit.p99_ms, 1)),
                    format!(
                        "{} / {}",
                        f(r.queue_claim.p50_ms, 1),
                        f(r.queue_claim.p99_ms, 1)
                    ),
                    format!(
                        "{} / {}",
                        f(r.claim_to_first_delta.p50_ms, 1),
                        f(r.claim_to_first_delta.p99_ms, 1)
                    ),
                    errors_text(&r.errors),
                ]
            })
            .collect();
        Table {
            headers: &[
                "clients",
                "jobs",
                "chatq TTFT p50/p99 ms",
                "mock TTFT p50/p99 ms",
                "overhead p50/p99 ms",
                "submit→202",
                "queue+claim",
                "claim→first delta",
                "errors",
            ],
            rows,
        }
    }

    /// Subscribers held, for stdout and the report.
    pub fn held_table(&self) -> Table {
        let h = &self.held;
        Table {
            headers: &[
                "subscribers",
                "jobs",
                "held",
                "got done",
                "open s",
                "api RSS before MB",
                "holding MB",
                "streaming max MB",
                "KB/subscriber",
                "api fds",
                "resume→all done s",
                "deltas/s",
                "errors",
            ],
            rows: vec![vec![
                h.subscribers.to_string(),
                h.jobs.to_string(),
                h.held.to_string(),
                h.done.to_string(),
                f(h.open_s, 1),
                f(h.rss_before_mb, 1),
                f(h.rss_holding_mb, 1),
                f(h.rss_streaming_max_mb, 1),
                f(h.kb_per_subscriber, 1),
                h.api_fds_holding.to_string(),
                f(h.resume_to_all_done_s, 1),
                f(h.delta_events_per_s, 0),
                errors_text(&h.errors),
            ]],
        }
    }

    /// Delta events/s, for stdout and the report.
    pub fn rate_table(&self) -> Table {
        let rows = self
            .rate
            .iter()
            .map(|r| {
                vec![
                    r.subscribers.to_string(),
                    r.jobs.to_string(),
                    format!("{} @ {} ms", r.words, r.chunk_delay_ms),
                    r.done.to_string(),
                    r.delta_events.to_string(),
                    f(r.delta_events_per_s, 0),
                    f(r.ceiling_per_s, 0),
                    f(r.text_kb_per_s, 0),
                    f(r.api_cpu_pct, 0),
                    f(r.api_cpu_us_per_event, 1),
                    f(r.bench_cpu_pct, 0),
                    f(r.machine_busy_pct, 0),
                    errors_text(&r.errors),
                ]
            })
            .collect();
        Table {
            headers: &[
                "subscribers",
                "jobs",
                "words @ delay",
                "got done",
                "deltas",
                "deltas/s",
                "ceiling/s",
                "text KB/s",
                "api CPU %",
                "api µs/delta",
                "bench CPU %",
                "machine busy %",
                "errors",
            ],
            rows,
        }
    }

    /// Resume latency, for stdout and the report.
    pub fn resume_table(&self) -> Table {
        let rows = self
            .resume
            .iter()
            .map(|r| {
                vec![
                    r.away_ms.to_string(),
                    r.jobs.to_string(),
                    r.first_text.count.to_string(),
                    format!("{} / {}", f(r.open.p50_ms, 1), f(r.open.p99_ms, 1)),
                    format!(
                        "{} / {} / {}",
                        f(r.first_text.p50_ms, 1),
                        f(r.first_text.p99_ms, 1),
                        f(r.first_text.max_ms, 1)
                    ),
                    r.nothing_missed.to_string(),
                    format!("{}/{}", r.exact_text, r.jobs_done),
                    errors_text(&r.errors),
                ]
            })
            .collect();
        Table {
            headers: &[
                "away ms",
                "jobs",
                "resumes",
                "reconnect→stream open p50/p99 ms",
                "reconnect→first new text p50/p99/max ms",
                "reconnects after the last text",
                "exact text",
                "errors",
            ],
            rows,
        }
    }
}

/// `"503: 2, timeout: 1"` or `"none"`.
fn errors_text(errors: &std::collections::BTreeMap<String, u64>) -> String {
    if errors.is_empty() {
        return "none".into();
    }
    let parts: Vec<String> = errors.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    parts.join(", ")
}

fn print(r: &StreamResult) {
    r.ttft_table()
        .print("stream: time to first token (submit → first delta) vs the mock's own");
    r.held_table()
        .print("stream: event-stream subscribers held by one api");
    r.rate_table()
        .print("stream: delta events/s through one api");
    r.resume_table()
        .print("stream: resume with Last-Event-ID after a disconnect");
}
