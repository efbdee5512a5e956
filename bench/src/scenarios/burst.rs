//! `burst`: N submissions as fast as 256 clients can send them (honouring
//! `Retry-After` on 429), then the drain until every accepted job is
//! terminal, with 1, 2 and 4 worker processes (a fresh system each).
//! Lost and duplicated jobs are counted in PostgreSQL.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use uuid::Uuid;

use crate::ctx::{Ctx, EndState, wait_drained};
use crate::load::{self, Outcome, Stop};
use crate::scenarios::{Table, f};
use crate::system::SystemOptions;

/// Clients sending the burst.
pub const CLIENTS: usize = 256;
/// Attempts per submission before giving up (429/503 are retried).
const MAX_ATTEMPTS: u32 = 30;

/// One burst run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BurstRun {
    /// Worker processes.
    pub workers: usize,
    /// `CHATQ_MAX_QUEUE_LENGTH`, when the run caps the queue below the burst.
    pub queue_max: Option<u64>,
    /// Submissions attempted.
    pub submissions: u64,
    /// Accepted (202).
    pub accepted: u64,
    /// 429 answers received.
    pub rejected_429: u64,
    /// Retries made after a 429 or 503.
    pub retried: u64,
    /// 5xx answers.
    pub status_5xx: u64,
    /// Client timeouts (30 s).
    pub timeouts: u64,
    /// Other failures by kind (including submissions given up).
    pub other_errors: BTreeMap<String, u64>,
    /// Time to submit everything, seconds.
    pub submit_s: f64,
    /// Accepted/s while submitting.
    pub submit_per_s: f64,
    /// Time from the end of submitting until every accepted job was terminal, seconds.
    pub drain_s: f64,
    /// Time from the first submission until every accepted job was terminal, seconds.
    pub total_s: f64,
    /// Accepted jobs that `succeeded`.
    pub succeeded: u64,
    /// Accepted jobs not terminal at the drain deadline.
    pub lost: u64,
    /// Jobs with more than one assistant message.
    pub duplicates: u64,
}

/// The scenario's result.
#[derive(Debug, Clone, Serialize)]
pub struct BurstResult {
    /// Submissions per run.
    pub n: u64,
    /// One per worker count.
    pub runs: Vec<BurstRun>,
}

#[derive(Default)]
struct Counters {
    r429: AtomicU64,
    retried: AtomicU64,
}

/// Runs the scenario.
pub async fn run(ctx: &Ctx) -> anyhow::Result<BurstResult> {
    let mut runs = Vec::new();
    // The last run caps the queue at a tenth of the burst, so the burst
    // overflows it: 429 queue_full, Retry-After honoured, nothing lost.
    let overflow = (ctx.burst_n / 10).max(10);
    for (workers, queue_max) in [(1usize, None), (2, None), (4, None), (1, Some(overflow))] {
        let cap = queue_max.map_or_else(String::new, |q| format!(", queue capped at {q}"));
        println!(
            "burst: {} submissions, {workers} worker(s){cap}",
            ctx.burst_n
        );
        runs.push(one(ctx, workers, queue_max).await?);
    }
    let r = BurstResult {
        n: ctx.burst_n,
        runs,
    };
    print(&r);
    Ok(r)
}

async fn one(ctx: &Ctx, workers: usize, queue_max: Option<u64>) -> anyhow::Result<BurstRun> {
    let defaults = SystemOptions::default();
    let sys = ctx
        .start(&SystemOptions {
            workers,
            max_queue_length: queue_max.unwrap_or(defaults.max_queue_length),
            ..defaults
        })
        .await?;
    let target = ctx.target(&sys);
    let n = ctx.burst_n;
    let ids = Arc::new(Mutex::new(Vec::<Uuid>::with_capacity(n as usize)));
    let counters = Arc::new(Counters::default());
    let (sink, c) = (Arc::clone(&ids), Arc::clone(&counters));
    let start = Instant::now();
    let load = load::run(CLIENTS, Stop::Count(n), move |client, seq| {
        let (t, sink, c) = (target.clone(), Arc::clone(&sink), Arc::clone(&c));
        async move {
            let content = format!("burst {client} {seq}");
            for attempt in 0..MAX_ATTEMPTS {
                if attempt > 0 {
                    c.retried.fetch_add(1, Ordering::Relaxed);
                }
                match t.submit(&content, Some(Duration::from_secs(30))).await {
                    Ok(s) if s.status == 202 => {
                        let Some(id) = s.job else {
                            return Outcome::Err("202_without_id".into());
                        };
                        if let Ok(mut v) = sink.lock() {
                            v.push(id);
                        }
                        return Outcome::Ok;
                    }
                    Ok(s) if s.status == 429 || s.status == 503 => {
                        if s.status == 429 {
                            c.r429.fetch_add(1, Ordering::Relaxed);
                        }
                        let secs = s.retry_after.unwrap_or(1).clamp(1, 10);
                        tokio::time::sleep(Duration::from_secs(secs)).await;
                    }
                    Ok(s) => return Outcome::from_status(s.status),
                    // A timed-out submission is not retried: it may have been accepted.
                    Err(e) => return Outcome::from_reqwest(&e),
                }
            }
            Outcome::Err("gave_up".into())
        }
    })
    .await;
    let submit_s = start.elapsed().as_secs_f64();
    let accepted_ids = ids.lock().map(|v| v.clone()).unwrap_or_default();
    // Bounded: generous for a slow debug build, finite if something is stuck.
    let deadline = Duration::from_secs(60) + Duration::from_millis(20 * n);
    let drain_start = Instant::now();
    let end: anyhow::Result<EndState> = wait_drained(&sys.db, &accepted_ids, deadline).await;
    let drain_s = drain_start.elapsed().as_secs_f64();
    sys.stop().await;
    let end = end?;
    let mut other = load.errors.clone();
    let status_5xx: u64 = other
        .iter()
        .filter(|(k, _)| k.starts_with('5') && k.len() == 3)
        .map(|(_, v)| *v)
        .sum();
    let timeouts = other.remove("timeout").unwrap_or(0);
    other.retain(|k, _| !(k.starts_with('5') && k.len() == 3));
    Ok(BurstRun {
        workers,
        submissions: n,
        accepted: accepted_ids.len() as u64,
        rejected_429: counters.r429.load(Ordering::Relaxed),
        retried: counters.retried.load(Ordering::Relaxed),
        status_5xx,
        timeouts,
        queue_max,
        other_errors: other,
        submit_s,
        submit_per_s: accepted_ids.len() as f64 / submit_s.max(1e-9),
        drain_s,
        total_s: submit_s + drain_s,
        succeeded: end.succeeded,
        lost: end.not_terminal,
        duplicates: end.duplicates,
    })
}

impl BurstResult {
    /// The per-worker-count table, for stdout and the report.
    pub fn table(&self) -> Table {
        let rows = self
            .runs
            .iter()
            .map(|run| {
                vec![
                    run.workers.to_string(),
                    run.queue_max
                        .map_or_else(|| "default".into(), |q| q.to_string()),
                    run.accepted.to_string(),
                    format!("{} ({})", run.rejected_429, run.retried),
                    run.status_5xx.to_string(),
                    run.timeouts.to_string(),
                    f(run.submit_s, 1),
                    f(run.submit_per_s, 0),
                    f(run.drain_s, 1),
                    run.succeeded.to_string(),
                    run.lost.to_string(),
                    run.duplicates.to_string(),
                ]
            })
            .collect();
        Table {
            headers: &[
                "workers",
                "queue max",
                "accepted",
                "429 (retries)",
                "5xx",
                "timeouts",
                "submit s",
                "accepted/s",
                "drain s (after submit)",
                "succeeded",
                "lost",
                "duplicates",
            ],
            rows,
        }
    }
}

fn print(r: &BurstResult) {
    r.table().print(&format!(
        "burst: {} submissions from {CLIENTS} clients",
        r.n
    ));
}
