//! `scaling`: completions/s with 1, 2 and 4 worker processes (concurrency
//! 64 each, mock latency 200 ms), jobs queued up front, a fresh system per
//! worker count; the ratio to one worker shows how far it scales.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::ctx::{Ctx, completion_rate, prefill, wait_drained};
use crate::scenarios::{Table, f};
use crate::system::SystemOptions;

/// Concurrency per worker.
pub const CONCURRENCY: u32 = 64;
/// Mock latency, ms.
pub const MOCK_LATENCY_MS: u64 = 200;

/// One worker count.
#[derive(Debug, Clone, Serialize)]
pub struct ScalingRow {
    /// Worker processes.
    pub workers: usize,
    /// Steady-state completions/s.
    pub completions_per_s: f64,
    /// workers × concurrency / latency.
    pub ideal_per_s: f64,
    /// Completions/s relative to one worker.
    pub ratio_to_one: f64,
    /// From worker start until every job was terminal, seconds.
    pub drain_s: f64,
    /// Jobs not terminal at the deadline.
    pub not_terminal: u64,
}

/// The scenario's result.
#[derive(Debug, Clone, Serialize)]
pub struct ScalingResult {
    /// Jobs queued per run.
    pub jobs: u64,
    /// One per worker count.
    pub rows: Vec<ScalingRow>,
}

/// Runs the scenario.
pub async fn run(ctx: &Ctx) -> anyhow::Result<ScalingResult> {
    let jobs: u64 = if ctx.quick { 50 } else { 4000 };
    let mut rows: Vec<ScalingRow> = Vec::new();
    for workers in [1usize, 2, 4] {
        println!("scaling: {jobs} jobs queued, then {workers} worker(s)");
        let mut sys = ctx
            .start(&SystemOptions {
                workers: 0,
                worker_concurrency: CONCURRENCY,
                mock_latency_ms: MOCK_LATENCY_MS,
                ..Default::default()
            })
            .await?;
        let r = async {
            let ids = prefill(&ctx.target(&sys), jobs, 64).await?;
            sys.start_workers(workers)?;
            let start = Instant::now();
            let deadline = Duration::from_secs(60) + Duration::from_millis(20 * jobs);
            let end = wait_drained(&sys.db, &ids, deadline).await?;
            let drain_s = start.elapsed().as_secs_f64();
            let (rate, _) = completion_rate(&sys.db).await?;
            Ok::<_, anyhow::Error>((rate, drain_s, end.not_terminal))
        }
        .await;
        sys.stop().await;
        let (rate, drain_s, not_terminal) = r?;
        let base = rows.first().map_or(rate, |r| r.completions_per_s);
        rows.push(ScalingRow {
            workers,
            completions_per_s: rate,
            ideal_per_s: workers as f64 * f64::from(CONCURRENCY) * 1000.0 / MOCK_LATENCY_MS as f64,
            ratio_to_one: if base > 0.0 { rate / base } else { 0.0 },
            drain_s,
            not_terminal,
        });
    }
    let r = ScalingResult { jobs, rows };
    print(&r);
    Ok(r)
}

impl ScalingResult {
    /// The per-worker-count table, for stdout and the report.
    pub fn table(&self) -> Table {
        let rows = self
            .rows
            .iter()
            .map(|row| {
                vec![
                    row.workers.to_string(),
                    f(row.completions_per_s, 0),
                    f(row.ideal_per_s, 0),
                    format!("{:.2}×", row.ratio_to_one),
                    f(row.drain_s, 1),
                    row.not_terminal.to_string(),
                ]
            })
            .collect();
        Table {
            headers: &[
                "workers",
                "completions/s",
                "ideal/s",
                "vs 1 worker",
                "drain s",
                "not terminal",
            ],
            rows,
        }
    }
}

fn print(r: &ScalingResult) {
    r.table().print(&format!(
        "scaling: {} jobs, concurrency {CONCURRENCY} per worker, mock latency {MOCK_LATENCY_MS} ms",
        r.jobs
    ));
}
