//! `overhead`: end-to-end latency (before `POST /v1/chat` → terminal state
//! seen by a client long-polling `GET /v1/jobs/{id}?wait=30` right after
//! the 202) minus the mock LLM's latency L, at light and heavy load.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::ctx::{Ctx, Target, is_terminal};
use crate::load::{self, LoadResult, Outcome, Stop};
use crate::scenarios::{Table, f};
use crate::system::SystemOptions;

/// The mock LLM latency subtracted from every sample.
pub const MOCK_LATENCY_MS: u64 = 200;

/// One load level.
#[derive(Debug, Clone, Serialize)]
pub struct OverheadRow {
    /// `"light"` or `"heavy"`.
    pub load: String,
    /// End-to-end latency including L.
    pub e2e: LoadResult,
    /// p50 of e2e minus L, ms.
    pub overhead_p50_ms: f64,
    /// p99 of e2e minus L, ms.
    pub overhead_p99_ms: f64,
}

/// The scenario's result.
#[derive(Debug, Clone, Serialize)]
pub struct OverheadResult {
    /// Mock latency, ms.
    pub mock_latency_ms: u64,
    /// Light then heavy.
    pub rows: Vec<OverheadRow>,
}

/// Runs the scenario (needs its own system: it sets the mock latency).
pub async fn run(ctx: &Ctx) -> anyhow::Result<OverheadResult> {
    let sys = ctx
        .start(&SystemOptions {
            workers: 2,
            ..Default::default()
        })
        .await?;
    let r = async {
        sys.set_mock_latency(&ctx.http, MOCK_LATENCY_MS).await?;
        let target = ctx.target(&sys);
        let (light_n, heavy_c, heavy_n) = if ctx.quick { (5, 8, 16) } else { (50, 64, 640) };
        // Warm up connections and caches.
        e2e_load(&target, 2, 4).await;
        let light = e2e_load(&target, 1, light_n).await;
        let heavy = e2e_load(&target, heavy_c, heavy_n).await;
        Ok::<_, anyhow::Error>(OverheadResult {
            mock_latency_ms: MOCK_LATENCY_MS,
            rows: vec![row("light", light), row("heavy", heavy)],
        })
    }
    .await;
    sys.stop().await;
    let r = r?;
    print(&r);
    Ok(r)
}

fn row(name: &str, e2e: LoadResult) -> OverheadRow {
    let l = MOCK_LATENCY_MS as f64;
    OverheadRow {
        load: name.into(),
        overhead_p50_ms: e2e.latency.p50_ms - l,
        overhead_p99_ms: e2e.latency.p99_ms - l,
        e2e,
    }
}

/// `n` submit-then-long-poll operations from `clients` tasks.
async fn e2e_load(target: &Target, clients: usize, n: u64) -> LoadResult {
    let t = target.clone();
    load::run(clients, Stop::Count(n), move |client, seq| {
        let t = t.clone();
        async move { e2e_once(&t, &format!("overhead {client} {seq}")).await }
    })
    .await
}

async fn e2e_once(t: &Target, content: &str) -> Outcome {
    let start = Instant::now();
    let job = match t.submit(content, None).await {
        Ok(s) => match s.job {
            Some(id) => id,
            None => return Outcome::from_status(s.status),
        },
        Err(e) => return Outcome::from_reqwest(&e),
    };
    while start.elapsed() < Duration::from_secs(120) {
        match t.poll(job, 30).await {
            Ok((200, status)) if is_terminal(&status) => {
                return if status == "succeeded" {
                    Outcome::Ok
                } else {
                    Outcome::Err(status)
                };
            }
            Ok((200, _)) => {}
            Ok((code, _)) => return Outcome::from_status(code),
            Err(e) => return Outcome::from_reqwest(&e),
        }
    }
    Outcome::Err("not_terminal".into())
}

impl OverheadResult {
    /// The per-load table, for stdout and the report.
    pub fn table(&self) -> Table {
        let rows = self
            .rows
            .iter()
            .map(|row| {
                vec![
                    row.load.clone(),
                    row.e2e.clients.to_string(),
                    row.e2e.ok.to_string(),
                    f(row.e2e.latency.p50_ms, 1),
                    f(row.e2e.latency.p99_ms, 1),
                    f(row.overhead_p50_ms, 1),
                    f(row.overhead_p99_ms, 1),
                    row.e2e.errors_text(),
                ]
            })
            .collect();
        Table {
            headers: &[
                "load",
                "clients",
                "jobs",
                "e2e p50 ms",
                "e2e p99 ms",
                "overhead p50 ms",
                "overhead p99 ms",
                "errors",
            ],
            rows,
        }
    }
}

fn print(r: &OverheadResult) {
    r.table().print(&format!(
        "overhead: end-to-end latency minus the mock's {} ms",
        r.mock_latency_ms
    ));
}
