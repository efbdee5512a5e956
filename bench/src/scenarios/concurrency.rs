//! `concurrency`: one worker with 2,000 LLM calls in flight against a mock
//! answering after 1 s. The jobs are queued up front (no worker running),
//! then the worker starts; completions/s in steady state (ideal 2,000/s),
//! peak LLM calls in flight, and the worker's peak RSS.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::ctx::{Ctx, completion_rate, end_state, prefill};
use crate::procfs::peak_rss_bytes;
use crate::scenarios::{Table, f};
use crate::system::{System, SystemOptions};

/// `CHATQ_WORKER_CONCURRENCY`.
pub const CONCURRENCY: u32 = 2000;
/// Mock latency, ms.
pub const MOCK_LATENCY_MS: u64 = 1000;

/// The scenario's result.
#[derive(Debug, Clone, Serialize)]
pub struct ConcurrencyResult {
    /// Jobs queued.
    pub jobs: u64,
    /// Worker concurrency.
    pub concurrency: u32,
    /// Mock latency, ms.
    pub mock_latency_ms: u64,
    /// Steady-state completions/s (10th to 90th percentile of finish times).
    pub completions_per_s: f64,
    /// The ideal: concurrency / latency.
    pub ideal_per_s: f64,
    /// From worker start until every job was terminal, seconds.
    pub drain_s: f64,
    /// Jobs that succeeded.
    pub succeeded: u64,
    /// Jobs not terminal at the deadline.
    pub not_terminal: u64,
    /// Most LLM calls the mock saw in flight at once (sampled every 100 ms).
    pub peak_in_flight: u64,
    /// The worker's peak RSS (VmHWM), MB.
    pub worker_peak_rss_mb: f64,
}

/// Runs the scenario.
pub async fn run(ctx: &Ctx) -> anyhow::Result<ConcurrencyResult> {
    let mut sys = ctx
        .start(&SystemOptions {
            workers: 0,
            worker_concurrency: CONCURRENCY,
            worker_db_connections: Some(32),
            mock_latency_ms: MOCK_LATENCY_MS,
            ..Default::default()
        })
        .await?;
    let r = measure(ctx, &mut sys).await;
    sys.stop().await;
    let r = r?;
    print(&r);
    Ok(r)
}

async fn measure(ctx: &Ctx, sys: &mut System) -> anyhow::Result<ConcurrencyResult> {
    let jobs: u64 = if ctx.quick { 100 } else { 10_000 };
    println!("concurrency: queueing {jobs} jobs, then starting one worker");
    let ids = prefill(&ctx.target(sys), jobs, 64).await?;
    sys.start_workers(1)?;
    let pid = sys.worker_pids().first().copied();
    let start = Instant::now();
    let deadline = Duration::from_secs(60) + Duration::from_millis(10 * jobs);
    let mut peak_in_flight = 0u64;
    let mut peak_rss = 0u64;
    let mut last_check = Instant::now();
    let mut end = end_state(&sys.db, &ids).await?;
    while end.not_terminal > 0 && start.elapsed() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Ok(r) = ctx
            .http
            .get(format!("{}/_mock/stats", sys.mock_url))
            .send()
            .await
            && let Ok(v) = r.json::<serde_json::Value>().await
        {
            peak_in_flight = peak_in_flight.max(v["in_flight"].as_u64().unwrap_or(0));
        }
        if let Some(rss) = pid.and_then(peak_rss_bytes) {
            peak_rss = peak_rss.max(rss);
        }
        if last_check.elapsed() >= Duration::from_millis(500) {
            end = end_state(&sys.db, &ids).await?;
            last_check = Instant::now();
        }
    }
    end = end_state(&sys.db, &ids).await?;
    let drain_s = start.elapsed().as_secs_f64();
    if let Some(rss) = pid.and_then(peak_rss_bytes) {
        peak_rss = peak_rss.max(rss);
    }
    let (rate, _) = completion_rate(&sys.db).await?;
    Ok(ConcurrencyResult {
        jobs,
        concurrency: CONCURRENCY,
        mock_latency_ms: MOCK_LATENCY_MS,
        completions_per_s: rate,
        ideal_per_s: f64::from(CONCURRENCY) * 1000.0 / MOCK_LATENCY_MS as f64,
        drain_s,
        succeeded: end.succeeded,
        not_terminal: end.not_terminal,
        peak_in_flight,
        worker_peak_rss_mb: peak_rss as f64 / 1_048_576.0,
    })
}

impl ConcurrencyResult {
    /// The one-row table, for stdout and the report.
    pub fn table(&self) -> Table {
        Table {
            headers: &[
                "completions/s",
                "ideal/s",
                "ratio",
                "peak LLM calls in flight",
                "drain s",
                "succeeded",
                "not terminal",
                "worker peak RSS MB",
            ],
            rows: vec![vec![
                f(self.completions_per_s, 0),
                f(self.ideal_per_s, 0),
                format!(
                    "{:.0}%",
                    100.0 * self.completions_per_s / self.ideal_per_s.max(1e-9)
                ),
                self.peak_in_flight.to_string(),
                f(self.drain_s, 1),
                self.succeeded.to_string(),
                self.not_terminal.to_string(),
                f(self.worker_peak_rss_mb, 1),
            ]],
        }
    }
}

fn print(r: &ConcurrencyResult) {
    r.table().print(&format!(
        "concurrency: {} jobs, one worker, concurrency {}, mock latency {} ms",
        r.jobs, r.concurrency, r.mock_latency_ms
    ));
}
