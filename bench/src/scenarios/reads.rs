//! `reads`: `GET /v1/jobs/{id}` requests/s at 64 clients over existing
//! (finished) jobs. Server-sent events (`/v1/jobs/{id}/events`) are not
//! measured: the api does not implement them yet.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use uuid::Uuid;

use crate::ctx::{Ctx, Target, prefill};
use crate::load::{self, LoadResult, Outcome, Stop};
use crate::scenarios::{Table, f};
use crate::system::SystemOptions;

/// Said in the table and the report.
pub const SSE_NOTE: &str =
    "SSE (GET /v1/jobs/{id}/events) is not implemented by the api yet, so it is not measured";

/// The scenario's result.
#[derive(Debug, Clone, Serialize)]
pub struct ReadsResult {
    /// Distinct jobs read (random order).
    pub jobs: usize,
    /// The read load.
    pub get_job: LoadResult,
    /// What is not measured.
    pub note: String,
}

/// Runs the scenario.
pub async fn run(ctx: &Ctx) -> anyhow::Result<ReadsResult> {
    let n: u64 = if ctx.quick { 20 } else { 1000 };
    let r = if let Some(target) = ctx.external_target().await? {
        measure(ctx, &target, n).await
    } else {
        let sys = ctx
            .start(&SystemOptions {
                workers: 2,
                ..Default::default()
            })
            .await?;
        let target = ctx.target(&sys);
        let r = measure(ctx, &target, n).await;
        sys.stop().await;
        r
    }?;
    print(&r);
    Ok(r)
}

async fn measure(ctx: &Ctx, target: &Target, n: u64) -> anyhow::Result<ReadsResult> {
    println!(
        "reads: creating {n} jobs, then {:?} of GET /v1/jobs/{{id}}",
        ctx.duration
    );
    let ids: Arc<Vec<Uuid>> = Arc::new(prefill(target, n, 16).await?);
    // Let the workers finish them, so reads see settled rows.
    tokio::time::sleep(Duration::from_secs(if ctx.quick { 1 } else { 3 })).await;
    let clients = if ctx.quick { 8 } else { 64 };
    let t = target.clone();
    let list = Arc::clone(&ids);
    let get_job = load::run(clients, Stop::After(ctx.duration), move |_, _| {
        let (t, list) = (t.clone(), Arc::clone(&list));
        async move {
            let Some(&id) = list.get(fastrand::usize(..list.len().max(1))) else {
                return Outcome::Err("no_jobs".into());
            };
            match t.poll(id, 0).await {
                Ok((code, _)) => Outcome::from_status(code),
                Err(e) => Outcome::from_reqwest(&e),
            }
        }
    })
    .await;
    Ok(ReadsResult {
        jobs: ids.len(),
        get_job,
        note: SSE_NOTE.into(),
    })
}

impl ReadsResult {
    /// The one-row table, for stdout and the report.
    pub fn table(&self) -> Table {
        let g = &self.get_job;
        Table {
            headers: &["clients", "jobs", "req/s", "p50 ms", "p99 ms", "errors"],
            rows: vec![vec![
                g.clients.to_string(),
                self.jobs.to_string(),
                f(g.ok_per_s, 0),
                f(g.latency.p50_ms, 2),
                f(g.latency.p99_ms, 2),
                g.errors_text(),
            ]],
        }
    }
}

fn print(r: &ReadsResult) {
    r.table().print("reads: GET /v1/jobs/{id}");
    println!("  {}", r.note);
}
