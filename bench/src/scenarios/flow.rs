//! `flow`: flow control (issue 13), four parts, each on its own deployment
//! (2 workers):
//!
//! 1. Saturation: the mock LLM enforces R requests per window (time
//!    compressed: 300 per 10 s) and chatq's workers share the same budget
//!    (`CHATQ_LLM_REQUESTS_PER_MINUTE`, `CHATQ_LLM_RATE_WINDOW_SECS`; chatq
//!    uses 95% of it). A backlog larger than ~40 s of the budget is
//!    submitted at once. The 429 rate is the mock's `rate_limited /
//!    (total + rate_limited)`; goodput is the jobs completed per second from
//!    one window after the first start (the buckets' initial burst spent)
//!    until the last start (the queue empty), as a share of R / window.
//! 2. Fairness: 5 tenants, one submitting 10× the jobs of each other one,
//!    all submitted while the queue is paused (in a shuffled order, by 256,
//!    32 and 1 concurrent clients in turn: concurrent submissions of one
//!    tenant can read the same last tag), then released against
//!    `CHATQ_LLM_MAX_CONCURRENCY` = 4 and a 100 ms mock.
//!    Over the period in which every tenant still has queued work (first
//!    start until the first tenant's last start), each tenant's served
//!    tokens (the jobs started in it: chatq's estimate, the unit fair
//!    queueing weighs, and the mock's reported usage) give Jain's index
//!    (Σx)² / (n·Σx²). The FIFO figure is computed, not measured: the same
//!    jobs served in their `created_at` order over the same kind of period.
//! 3. Lanes: 3,000 `batch` jobs flood a capped deployment (concurrency 4,
//!    100 ms), then `interactive` jobs arrive at 5/s for 20 s: their wait
//!    (`started_at − created_at`) and how many batch jobs still started
//!    meanwhile.
//! 4. ETA: jobs arrive at 40/s for 30 s against a capacity of ~20/s
//!    (concurrency 4, mock 200 ms), so the queue and the waits grow; each
//!    202's `queue.estimated_start_at`, and a GET's at the end of the
//!    arrivals, against the actual `started_at`, for jobs that waited at
//!    least 5 s: absolute error as a % of the actual wait. Part 1's backlog
//!    gives the same figures for a rate-limited start.
//!
//! Timings come from PostgreSQL (`created_at`, `started_at`,
//! `finished_at`): one clock, exact.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::ctx::{Ctx, wait_drained};
use crate::load::{self, Outcome, Percentiles, Stop};
use crate::scenarios::{Table, f};
use crate::system::{ADMIN_TOKEN, System, SystemOptions};

/// Worker processes of every part.
pub const WORKERS: usize = 2;
/// Part 1: requests per window, of the mock and of chatq's budget.
pub const SAT_REQUESTS: u64 = 300;
/// Part 1: the window, seconds.
pub const SAT_WINDOW_S: u64 = 10;
/// Part 1: the backlog (the budget's burst plus ~45 s of its rate).
pub const SAT_JOBS: u64 = 1_600;
/// Part 1: mock latency, ms.
pub const SAT_MOCK_LATENCY_MS: u64 = 20;
/// Part 1: when queued jobs are asked for their ETA again, s after the
/// first submission.
pub const SAT_PROBE_AFTER_S: u64 = 20;
/// Parts 2–4: `CHATQ_LLM_MAX_CONCURRENCY`.
pub const CAPPED_CONCURRENCY: u32 = 4;
/// Part 2: tenants.
pub const FAIR_TENANTS: usize = 5;
/// Part 2: jobs of each light tenant.
pub const FAIR_LIGHT_JOBS: u64 = 60;
/// Part 2: the heavy tenant submits this many times as many.
pub const FAIR_SKEW: u64 = 10;
/// Parts 2 and 3: mock latency, ms.
pub const CAPPED_MOCK_LATENCY_MS: u64 = 100;
/// Part 2: concurrent submitting clients of each run.
pub const FAIR_SUBMIT_CLIENTS: [usize; 3] = [256, 32, 1];
/// Part 3: the batch flood.
pub const LANE_BATCH_JOBS: u64 = 3_000;
/// Part 3: interactive submissions per second.
pub const LANE_INTERACTIVE_PER_S: u64 = 5;
/// Part 3: for this long, s.
pub const LANE_INTERACTIVE_S: u64 = 20;
/// Part 4: submissions per second.
pub const ETA_ARRIVAL_PER_S: u64 = 40;
/// Part 4: for this long, s.
pub const ETA_ARRIVAL_S: u64 = 30;
/// Part 4: mock latency, ms (capacity ≈ 4 / 0.2 s = 20 jobs/s).
pub const ETA_MOCK_LATENCY_MS: u64 = 200;
/// ETA errors count for jobs that waited at least this long, s.
pub const ETA_MIN_WAIT_S: f64 = 5.0;
/// Clients submitting a backlog.
const SUBMIT_CLIENTS: usize = 64;
/// Attempts per submission (429 and 503 are retried after `Retry-After`).
const MAX_ATTEMPTS: u32 = 30;
/// Concurrent GETs of an ETA probe.
const PROBE_CLIENTS: usize = 16;

/// The sizes of a run (`--quick` shrinks them).
#[derive(Debug, Clone, Copy)]
struct Sizes {
    sat_requests: u64,
    sat_window_s: u64,
    sat_jobs: u64,
    sat_probe_after_s: u64,
    fair_light_jobs: u64,
    lane_batch_jobs: u64,
    lane_per_s: u64,
    lane_s: u64,
    eta_per_s: u64,
    eta_s: u64,
}

impl Sizes {
    fn of(quick: bool) -> Self {
        if quick {
            Self {
                sat_requests: 60,
                sat_window_s: 2,
                sat_jobs: 150,
                sat_probe_after_s: 2,
                fair_light_jobs: 6,
                lane_batch_jobs: 200,
                lane_per_s: 5,
                lane_s: 2,
                eta_per_s: 20,
                eta_s: 3,
            }
        } else {
            Self {
                sat_requests: SAT_REQUESTS,
                sat_window_s: SAT_WINDOW_S,
                sat_jobs: SAT_JOBS,
                sat_probe_after_s: SAT_PROBE_AFTER_S,
                fair_light_jobs: FAIR_LIGHT_JOBS,
                lane_batch_jobs: LANE_BATCH_JOBS,
                lane_per_s: LANE_INTERACTIVE_PER_S,
                lane_s: LANE_INTERACTIVE_S,
                eta_per_s: ETA_ARRIVAL_PER_S,
                eta_s: ETA_ARRIVAL_S,
            }
        }
    }
}

/// Part 1.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Saturation {
    /// Requests per window, mock and chatq alike.
    pub requests_per_window: u64,
    /// The window, s.
    pub window_s: u64,
    /// Worker processes.
    pub workers: usize,
    /// Mock latency, ms.
    pub mock_latency_ms: u64,
    /// Jobs submitted.
    pub jobs: u64,
    /// Submission failures by kind.
    pub submit_errors: BTreeMap<String, u64>,
    /// Time to submit the backlog, s.
    pub submit_s: f64,
    /// Jobs that succeeded.
    pub succeeded: u64,
    /// Jobs not succeeded at the deadline.
    pub not_succeeded: u64,
    /// Jobs that needed more than one attempt.
    pub retried_jobs: u64,
    /// Calls that reached the model (mock `total`).
    pub mock_total: u64,
    /// 429s the mock sent.
    pub mock_rate_limited: u64,
    /// 429s / all calls the mock saw, %.
    pub rate_429_pct: f64,
    /// Most calls in flight at the mock.
    pub mock_peak_in_flight: u64,
    /// First start → last start (the queue never empty), s.
    pub saturated_s: f64,
    /// The steady part: one window after the first start → last start, s.
    pub steady_s: f64,
    /// Jobs finished in the steady part.
    pub steady_completed: u64,
    /// Completed per second in the steady part.
    pub goodput_per_s: f64,
    /// R / window, per second.
    pub budget_per_s: f64,
    /// Goodput / budget, % (chatq aims at 95%).
    pub goodput_pct: f64,
    /// Completed per second over the whole saturated period, including the
    /// buckets' initial burst, % of the budget.
    pub whole_period_pct: f64,
    /// Jobs started in each window from the first start.
    pub starts_per_window: Vec<u64>,
}

/// One tenant of part 2.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TenantRow {
    /// Tenant name.
    pub tenant: String,
    /// Jobs submitted.
    pub submitted: u64,
    /// Jobs started in the period.
    pub started: u64,
    /// chatq's estimated tokens of those jobs.
    pub est_tokens: i64,
    /// The mock's prompt + completion tokens of those jobs.
    pub actual_tokens: i64,
    /// Share of the period's estimated tokens, %.
    pub share_pct: f64,
    /// FIFO (computed): jobs started in its period.
    pub fifo_started: u64,
    /// FIFO (computed): share of its period's estimated tokens, %.
    pub fifo_share_pct: f64,
    /// The tenant's jobs minus its distinct start tags: jobs that got the
    /// same fair-queueing tag as another of its jobs.
    pub shared_tags: u64,
    /// The tenant's largest start tag.
    pub max_start_tag: f64,
}

/// Part 2, one run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Fairness {
    /// Concurrent submitting clients.
    pub submit_clients: usize,
    /// Time to submit every job, s.
    pub submit_s: f64,
    /// `CHATQ_LLM_MAX_CONCURRENCY`.
    pub max_concurrency: u32,
    /// Mock latency, ms.
    pub mock_latency_ms: u64,
    /// Jobs submitted.
    pub jobs: u64,
    /// Submission failures by kind.
    pub submit_errors: BTreeMap<String, u64>,
    /// First start → the first tenant's last start, s.
    pub period_s: f64,
    /// Jobs started in the period.
    pub period_jobs: u64,
    /// Jobs started per second in the period.
    pub starts_per_s: f64,
    /// Per tenant (the heavy one first).
    pub tenants: Vec<TenantRow>,
    /// Jain's index of estimated tokens.
    pub jain_est_tokens: f64,
    /// Jain's index of the mock's reported tokens.
    pub jain_actual_tokens: f64,
    /// Jain's index of jobs.
    pub jain_jobs: f64,
    /// FIFO in `created_at` order (computed): jobs in its period.
    pub fifo_period_jobs: u64,
    /// FIFO (computed): Jain's index of estimated tokens.
    pub fifo_jain_est_tokens: f64,
}

/// Part 3.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Lanes {
    /// `CHATQ_LLM_MAX_CONCURRENCY`.
    pub max_concurrency: u32,
    /// Mock latency, ms.
    pub mock_latency_ms: u64,
    /// Batch jobs submitted first.
    pub batch_jobs: u64,
    /// Time to submit them, s.
    pub batch_submit_s: f64,
    /// Interactive submissions per second.
    pub interactive_per_s: u64,
    /// For this long, s.
    pub interactive_s: u64,
    /// Interactive jobs accepted.
    pub interactive_jobs: u64,
    /// Interactive jobs started.
    pub interactive_started: u64,
    /// Submission failures by kind.
    pub submit_errors: BTreeMap<String, u64>,
    /// Interactive `started_at − created_at`.
    pub interactive_wait: Percentiles,
    /// First interactive `created_at` → last interactive start, s.
    pub period_s: f64,
    /// Batch jobs started in the period.
    pub batch_started_in_period: u64,
    /// Interactive jobs started in the period.
    pub interactive_started_in_period: u64,
    /// Batch share of the period's starts, %.
    pub batch_share_pct: f64,
    /// All starts per second in the period.
    pub starts_per_s: f64,
    /// Batch jobs still queued at the period's end (the flood lasted).
    pub batch_queued_at_end: u64,
}

/// One ETA accuracy figure.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EtaRow {
    /// The run.
    pub run: String,
    /// Where the estimate came from.
    pub source: String,
    /// Estimates read.
    pub estimates: u64,
    /// Of those, jobs that then waited at least [`ETA_MIN_WAIT_S`].
    pub samples: u64,
    /// Median |estimate − actual start| / actual wait, %.
    pub median_abs_err_pct: f64,
    /// 90th percentile of the same, %.
    pub p90_abs_err_pct: f64,
    /// Median (estimate − actual start) / actual wait, %: negative means
    /// the estimate was early (optimistic).
    pub median_signed_err_pct: f64,
    /// Median actual wait of the samples, s.
    pub median_wait_s: f64,
    /// Median start rate the estimate implied: jobs ahead / estimated wait.
    pub median_estimated_rate_per_s: f64,
    /// Median start rate the job saw: jobs ahead / actual wait.
    pub median_actual_rate_per_s: f64,
}

/// Part 4.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Eta {
    /// `CHATQ_LLM_MAX_CONCURRENCY`.
    pub max_concurrency: u32,
    /// Mock latency, ms.
    pub mock_latency_ms: u64,
    /// Submissions per second.
    pub arrival_per_s: u64,
    /// For this long, s.
    pub arrival_s: u64,
    /// Jobs accepted.
    pub jobs: u64,
    /// Submission failures by kind.
    pub submit_errors: BTreeMap<String, u64>,
    /// Measured start rate, first → last start, jobs/s.
    pub start_rate_per_s: f64,
    /// Start rate while jobs were arriving (first start → last submission).
    pub start_rate_arriving_per_s: f64,
    /// Start rate after the last submission.
    pub start_rate_after_per_s: f64,
    /// Longest wait, s.
    pub max_wait_s: f64,
    /// This run's figures, then part 1's.
    pub rows: Vec<EtaRow>,
}

/// The scenario's result.
#[derive(Debug, Clone, Serialize)]
pub struct FlowResult {
    /// Part 1.
    pub saturation: Saturation,
    /// Part 2: 256, 32 and 1 concurrent submitters.
    pub fairness: Vec<Fairness>,
    /// Part 3.
    pub lanes: Lanes,
    /// Part 4.
    pub eta: Eta,
}

/// Runs the scenario.
pub async fn run(ctx: &Ctx) -> anyhow::Result<FlowResult> {
    let sizes = Sizes::of(ctx.quick);
    println!(
        "flow 1/4: saturation: {} jobs, {} requests per {} s window (mock and chatq)",
        sizes.sat_jobs, sizes.sat_requests, sizes.sat_window_s
    );
    let (saturation, sat_eta) = saturation(ctx, sizes).await.context("saturation")?;
    println!(
        "flow 2/4: fairness: {FAIR_TENANTS} tenants, {}:{} jobs",
        sizes.fair_light_jobs * FAIR_SKEW,
        sizes.fair_light_jobs
    );
    let mut fairness = Vec::new();
    // Quick: one run.
    let runs = if ctx.quick {
        &FAIR_SUBMIT_CLIENTS[1..2]
    } else {
        &FAIR_SUBMIT_CLIENTS[..]
    };
    for &clients in runs {
        println!("  submitted by {clients} client(s)");
        fairness.push(
            fairness_run(ctx, sizes, clients)
                .await
                .context("fairness")?,
        );
    }
    println!(
        "flow 3/4: lanes: {} batch jobs, then interactive at {}/s for {} s",
        sizes.lane_batch_jobs, sizes.lane_per_s, sizes.lane_s
    );
    let lanes = lanes(ctx, sizes).await.context("lanes")?;
    println!(
        "flow 4/4: eta: {}/s for {} s against ~{}/s",
        sizes.eta_per_s,
        sizes.eta_s,
        u64::from(CAPPED_CONCURRENCY) * 1000 / ETA_MOCK_LATENCY_MS
    );
    let mut eta = eta(ctx, sizes).await.context("eta")?;
    eta.rows.extend(sat_eta);
    let r = FlowResult {
        saturation,
        fairness,
        lanes,
        eta,
    };
    r.print();
    Ok(r)
}

// ---------------------------------------------------------------- helpers

fn now_epoch() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn env(pairs: &[(&str, String)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

/// A job object's `queue`: `estimated_start_at` as epoch seconds, and the
/// jobs ahead (`position` − 1).
fn queue_of(body: &Value) -> Option<Queue> {
    let s = body["queue"]["estimated_start_at"].as_str()?;
    let t = chrono::DateTime::parse_from_rfc3339(s).ok()?;
    let position = body["queue"]["position"].as_i64()?;
    Some((
        t.timestamp_micros() as f64 / 1e6,
        (position - 1).max(0) as f64,
    ))
}

/// `(estimated start, epoch s; jobs ahead)`.
type Queue = (f64, f64);

fn error_kind(err: &reqwest::Error) -> String {
    match Outcome::from_reqwest(err) {
        Outcome::Err(kind) => kind,
        Outcome::Ok => "transport".into(),
    }
}

/// An API key for `tenant` (created on first use).
async fn tenant_key(http: &reqwest::Client, api_url: &str, tenant: &str) -> anyhow::Result<String> {
    let r = http
        .post(format!("{api_url}/admin/v1/api-keys"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({ "tenant": tenant }))
        .send()
        .await?;
    let status = r.status();
    let body: Value = r.json().await.unwrap_or_default();
    match body["key"].as_str() {
        Some(k) if status.is_success() => Ok(k.to_owned()),
        _ => bail!("creating a key of {tenant} answered {status}: {body}"),
    }
}

/// Patches the mock's configuration, then resets its stats and buckets.
async fn mock_config(http: &reqwest::Client, sys: &System, patch: Value) -> anyhow::Result<()> {
    let r = http
        .post(format!("{}/_mock/config", sys.mock_url))
        .json(&patch)
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("mock config answered {}", r.status());
    }
    let r = http
        .post(format!("{}/_mock/reset", sys.mock_url))
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("mock reset answered {}", r.status());
    }
    Ok(())
}

/// The mock's `(total, rate_limited, peak_in_flight)`.
async fn mock_stats(http: &reqwest::Client, sys: &System) -> anyhow::Result<(u64, u64, u64)> {
    let r = http
        .get(format!("{}/_mock/stats", sys.mock_url))
        .send()
        .await?;
    let v: Value = r.json().await.context("reading the mock's stats")?;
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    Ok((n("total"), n("rate_limited"), n("peak_in_flight")))
}

/// One planned submission: group (tenant or lane), key, body.
type Plan = Vec<(usize, String, Value)>;

/// An accepted submission.
#[derive(Debug, Clone, Copy)]
struct Sub {
    id: Uuid,
    group: usize,
    /// The 202's `queue`.
    eta: Option<Queue>,
}

/// Accepted submissions and failures by kind.
#[derive(Debug, Default)]
struct Submitted {
    subs: Vec<Sub>,
    errors: BTreeMap<String, u64>,
    elapsed_s: f64,
}

/// `POST /v1/chat`, retried on 429 and 503: the id and the ETA.
async fn submit_one(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    body: &Value,
) -> Result<(Uuid, Option<Queue>), String> {
    for _ in 0..MAX_ATTEMPTS {
        let resp = http
            .post(format!("{url}/v1/chat"))
            .bearer_auth(key)
            .json(body)
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .map_err(|e| error_kind(&e))?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let v: Value = resp.json().await.unwrap_or_default();
        match status {
            202 => {
                let id = v["id"]
                    .as_str()
                    .and_then(|s| Uuid::parse_str(s).ok())
                    .ok_or_else(|| "202_without_id".to_owned())?;
                return Ok((id, queue_of(&v)));
            }
            429 | 503 => {
                let secs = retry_after.unwrap_or(1).clamp(1, 5);
                tokio::time::sleep(Duration::from_secs(secs)).await;
            }
            s => return Err(s.to_string()),
        }
    }
    Err("gave_up".into())
}

/// Submits `plan` as fast as `clients` clients can.
async fn submit_all(http: &reqwest::Client, url: &str, plan: Plan, clients: usize) -> Submitted {
    let n = plan.len() as u64;
    let plan = Arc::new(plan);
    let sink = Arc::new(Mutex::new(Vec::with_capacity(plan.len())));
    let (h, u, p, s) = (
        http.clone(),
        url.to_owned(),
        Arc::clone(&plan),
        Arc::clone(&sink),
    );
    let start = Instant::now();
    let r = load::run(clients, Stop::Count(n), move |_, seq| {
        let (h, u, p, s) = (h.clone(), u.clone(), Arc::clone(&p), Arc::clone(&s));
        async move {
            let Some((group, key, body)) = usize::try_from(seq).ok().and_then(|i| p.get(i)) else {
                return Outcome::Err("no_plan".into());
            };
            match submit_one(&h, &u, key, body).await {
                Ok((id, eta)) => {
                    if let Ok(mut v) = s.lock() {
                        v.push(Sub {
                            id,
                            group: *group,
                            eta,
                        });
                    }
                    Outcome::Ok
                }
                Err(kind) => Outcome::Err(kind),
            }
        }
    })
    .await;
    let subs = sink.lock().map(|v| v.clone()).unwrap_or_default();
    Submitted {
        subs,
        errors: r.errors,
        elapsed_s: start.elapsed().as_secs_f64(),
    }
}

/// Submits `plan` one every `every`, each in its own task.
async fn submit_paced(http: &reqwest::Client, url: &str, plan: Plan, every: Duration) -> Submitted {
    let start = Instant::now();
    let mut tick = tokio::time::interval(every);
    let mut tasks = Vec::with_capacity(plan.len());
    for (group, key, body) in plan {
        tick.tick().await;
        let (h, u) = (http.clone(), url.to_owned());
        tasks.push(tokio::spawn(async move {
            (group, submit_one(&h, &u, &key, &body).await)
        }));
    }
    let mut out = Submitted::default();
    for t in tasks {
        match t.await {
            Ok((group, Ok((id, eta)))) => out.subs.push(Sub { id, group, eta }),
            Ok((_, Err(kind))) => *out.errors.entry(kind).or_default() += 1,
            Err(_) => *out.errors.entry("task_panicked".into()).or_default() += 1,
        }
    }
    out.elapsed_s = start.elapsed().as_secs_f64();
    out
}

/// GETs every `step`th of `subs` still queued: (id, queue, when asked).
async fn probe(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    subs: &[Sub],
    step: usize,
) -> Vec<(Uuid, Queue, f64)> {
    let ids: Vec<Uuid> = subs.iter().step_by(step.max(1)).map(|s| s.id).collect();
    let ids = Arc::new(ids);
    let sink = Arc::new(Mutex::new(Vec::new()));
    let (h, u, k, i, s) = (
        http.clone(),
        url.to_owned(),
        key.to_owned(),
        Arc::clone(&ids),
        Arc::clone(&sink),
    );
    load::run(
        PROBE_CLIENTS,
        Stop::Count(ids.len() as u64),
        move |_, seq| {
            let (h, u, k, i, s) = (
                h.clone(),
                u.clone(),
                k.clone(),
                Arc::clone(&i),
                Arc::clone(&s),
            );
            async move {
                let Some(id) = usize::try_from(seq).ok().and_then(|n| i.get(n).copied()) else {
                    return Outcome::Err("no_id".into());
                };
                let resp = match h
                    .get(format!("{u}/v1/jobs/{id}"))
                    .bearer_auth(&k)
                    .send()
                    .await
                {
                    Ok(r) => r,
                    Err(e) => return Outcome::from_reqwest(&e),
                };
                let at = now_epoch();
                let status = resp.status().as_u16();
                let v: Value = resp.json().await.unwrap_or_default();
                if let (Some(eta), Ok(mut out)) = (queue_of(&v), s.lock()) {
                    out.push((id, eta, at));
                }
                Outcome::from_status(status)
            }
        },
    )
    .await;
    sink.lock().map(|v| v.clone()).unwrap_or_default()
}

/// A job's times (epoch s) and sizes, from PostgreSQL.
#[derive(Debug, Clone)]
struct JobRow {
    created: f64,
    started: Option<f64>,
    finished: Option<f64>,
    status: String,
    attempts: i64,
    /// chatq's estimate.
    cost: i64,
    /// The reply's prompt + completion tokens (0 until finished).
    tokens: i64,
    /// Fair-queueing start tag.
    start_tag: f64,
}

type DbRow = (
    Uuid,
    f64,
    Option<f64>,
    Option<f64>,
    String,
    i64,
    i64,
    i64,
    f64,
);

async fn job_rows(db: &PgPool, ids: &[Uuid]) -> anyhow::Result<HashMap<Uuid, JobRow>> {
    let rows: Vec<DbRow> = sqlx::query_as(
        "select id,
                extract(epoch from created_at)::float8,
                extract(epoch from started_at)::float8,
                extract(epoch from finished_at)::float8,
                status,
                attempts::int8,
                cost::int8,
                (coalesce(prompt_tokens, 0) + coalesce(completion_tokens, 0))::int8,
                start_tag
         from jobs where id = any($1)",
    )
    .bind(ids)
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(id, created, started, finished, status, attempts, cost, tokens, start_tag)| {
                (
                    id,
                    JobRow {
                        created,
                        started,
                        finished,
                        status,
                        attempts,
                        cost,
                        tokens,
                        start_tag,
                    },
                )
            },
        )
        .collect())
}

/// Waits until every one of `ids` has started (or `deadline` passes);
/// returns how many have not.
async fn wait_started(db: &PgPool, ids: &[Uuid], deadline: Duration) -> anyhow::Result<i64> {
    let end = Instant::now() + deadline;
    loop {
        let left: i64 = sqlx::query_scalar(
            "select count(*) from jobs where id = any($1) and started_at is null",
        )
        .bind(ids)
        .fetch_one(db)
        .await?;
        if left == 0 || Instant::now() >= end {
            return Ok(left);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Jain's fairness index: (Σx)² / (n·Σx²); 1 = equal.
pub fn jain(xs: &[f64]) -> f64 {
    let sum: f64 = xs.iter().sum();
    let sq: f64 = xs.iter().map(|x| x * x).sum();
    if xs.is_empty() || sq <= 0.0 {
        return 0.0;
    }
    sum * sum / (xs.len() as f64 * sq)
}

/// Nearest-rank quantile of `v` (sorted in place); 0 when empty.
fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// An estimate and what happened: `(eta, asked_at, started, jobs ahead)`.
type EtaSample = (f64, f64, f64, f64);

/// Accuracy of estimates for jobs that then waited at least
/// [`ETA_MIN_WAIT_S`] from `asked_at`.
fn eta_row(run: &str, source: &str, samples: &[EtaSample]) -> EtaRow {
    let mut abs = Vec::new();
    let mut signed = Vec::new();
    let mut waits = Vec::new();
    let mut est_rate = Vec::new();
    let mut real_rate = Vec::new();
    for &(eta, asked, started, ahead) in samples {
        let wait = started - asked;
        if wait < ETA_MIN_WAIT_S {
            continue;
        }
        let e = (eta - started) / wait * 100.0;
        abs.push(e.abs());
        signed.push(e);
        waits.push(wait);
        if ahead > 0.0 && eta - asked > 0.01 {
            est_rate.push(ahead / (eta - asked));
            real_rate.push(ahead / wait);
        }
    }
    EtaRow {
        run: run.into(),
        source: source.into(),
        estimates: samples.len() as u64,
        samples: abs.len() as u64,
        median_abs_err_pct: quantile(&mut abs.clone(), 0.5),
        p90_abs_err_pct: quantile(&mut abs, 0.9),
        median_signed_err_pct: quantile(&mut signed, 0.5),
        median_wait_s: quantile(&mut waits, 0.5),
        median_estimated_rate_per_s: quantile(&mut est_rate, 0.5),
        median_actual_rate_per_s: quantile(&mut real_rate, 0.5),
    }
}

/// The ETA samples of the 202s (`asked_at` = `created_at`) and of a probe.
fn eta_samples(
    subs: &[Sub],
    probed: &[(Uuid, Queue, f64)],
    rows: &HashMap<Uuid, JobRow>,
) -> (Vec<EtaSample>, Vec<EtaSample>) {
    let at_202 = subs
        .iter()
        .filter_map(|s| {
            let r = rows.get(&s.id)?;
            let (eta, ahead) = s.eta?;
            Some((eta, r.created, r.started?, ahead))
        })
        .collect();
    let at_get = probed
        .iter()
        .filter_map(|(id, (eta, ahead), at)| Some((*eta, *at, rows.get(id)?.started?, *ahead)))
        .collect();
    (at_202, at_get)
}

// ------------------------------------------------------------ part 1

async fn saturation(ctx: &Ctx, z: Sizes) -> anyhow::Result<(Saturation, Vec<EtaRow>)> {
    let sys = ctx
        .start(&SystemOptions {
            workers: WORKERS,
            mock_latency_ms: SAT_MOCK_LATENCY_MS,
            worker_env: env(&[
                ("CHATQ_LLM_REQUESTS_PER_MINUTE", z.sat_requests.to_string()),
                ("CHATQ_LLM_RATE_WINDOW_SECS", z.sat_window_s.to_string()),
            ]),
            ..Default::default()
        })
        .await?;
    let r = saturation_on(ctx, &sys, z).await;
    sys.stop().await;
    r
}

async fn saturation_on(
    ctx: &Ctx,
    sys: &System,
    z: Sizes,
) -> anyhow::Result<(Saturation, Vec<EtaRow>)> {
    let http = &ctx.http;
    mock_config(
        http,
        sys,
        json!({
            "requests_per_minute": z.sat_requests,
            "rate_window_ms": z.sat_window_s * 1000,
        }),
    )
    .await?;
    let plan: Plan = (0..z.sat_jobs)
        .map(|i| {
            let body = json!({ "content": format!("flow saturation job {i:05}") });
            (0, sys.key.clone(), body)
        })
        .collect();
    let t0 = Instant::now();
    let sub = submit_all(http, &sys.api_url, plan, SUBMIT_CLIENTS).await;
    let ids: Vec<Uuid> = sub.subs.iter().map(|s| s.id).collect();
    if ids.is_empty() {
        bail!("no submission accepted: {:?}", sub.errors);
    }
    let probe_at = t0 + Duration::from_secs(z.sat_probe_after_s);
    tokio::time::sleep_until(probe_at.into()).await;
    let probed = probe(http, &sys.api_url, &sys.key, &sub.subs, 4).await;
    // The backlog drains at the budget's rate; generous, finite.
    let drain = Duration::from_secs(60)
        + Duration::from_secs_f64(
            2.0 * z.sat_jobs as f64 * z.sat_window_s as f64 / z.sat_requests as f64,
        );
    let end = wait_drained(&sys.db, &ids, drain).await?;
    let (total, limited, peak) = mock_stats(http, sys).await?;
    let rows = job_rows(&sys.db, &ids).await?;

    let mut starts: Vec<f64> = rows.values().filter_map(|r| r.started).collect();
    starts.sort_by(f64::total_cmp);
    let (first, last) = match (starts.first(), starts.last()) {
        (Some(a), Some(b)) => (*a, *b),
        _ => bail!("no job started"),
    };
    let window = z.sat_window_s as f64;
    let budget_per_s = z.sat_requests as f64 / window;
    let steady_from = first + window;
    let steady_s = (last - steady_from).max(0.0);
    let finished_in = |a: f64, b: f64| {
        rows.values()
            .filter(|r| r.status == "succeeded")
            .filter_map(|r| r.finished)
            .filter(|t| *t >= a && *t <= b)
            .count() as u64
    };
    let steady_completed = finished_in(steady_from, last);
    let goodput_per_s = if steady_s > 0.0 {
        steady_completed as f64 / steady_s
    } else {
        0.0
    };
    let saturated_s = last - first;
    let whole = if saturated_s > 0.0 {
        finished_in(first, last) as f64 / saturated_s
    } else {
        0.0
    };
    let mut starts_per_window = vec![0u64; (saturated_s / window) as usize + 1];
    for t in &starts {
        let i = ((t - first) / window) as usize;
        if let Some(c) = starts_per_window.get_mut(i) {
            *c += 1;
        }
    }
    let seen = total + limited;
    let s = Saturation {
        requests_per_window: z.sat_requests,
        window_s: z.sat_window_s,
        workers: WORKERS,
        mock_latency_ms: SAT_MOCK_LATENCY_MS,
        jobs: ids.len() as u64,
        submit_errors: sub.errors,
        submit_s: sub.elapsed_s,
        succeeded: end.succeeded,
        not_succeeded: end.accepted - end.succeeded,
        retried_jobs: rows.values().filter(|r| r.attempts > 1).count() as u64,
        mock_total: total,
        mock_rate_limited: limited,
        rate_429_pct: if seen > 0 {
            100.0 * limited as f64 / seen as f64
        } else {
            0.0
        },
        mock_peak_in_flight: peak,
        saturated_s,
        steady_s,
        steady_completed,
        goodput_per_s,
        budget_per_s,
        goodput_pct: 100.0 * goodput_per_s / budget_per_s,
        whole_period_pct: 100.0 * whole / budget_per_s,
        starts_per_window,
    };
    let (at_202, at_get) = eta_samples(&sub.subs, &probed, &rows);
    let run = "1. rate-limited backlog";
    let eta_rows = vec![
        eta_row(run, "202 (submitted at once)", &at_202),
        eta_row(
            run,
            &format!("GET {} s after the first submission", z.sat_probe_after_s),
            &at_get,
        ),
    ];
    Ok((s, eta_rows))
}

// ------------------------------------------------------------ part 2

async fn fairness_run(ctx: &Ctx, z: Sizes, clients: usize) -> anyhow::Result<Fairness> {
    let sys = ctx
        .start(&SystemOptions {
            workers: WORKERS,
            mock_latency_ms: CAPPED_MOCK_LATENCY_MS,
            worker_env: env(&[("CHATQ_LLM_MAX_CONCURRENCY", CAPPED_CONCURRENCY.to_string())]),
            ..Default::default()
        })
        .await?;
    let r = fairness_on(ctx, &sys, z, clients).await;
    sys.stop().await;
    r
}

async fn fairness_on(
    ctx: &Ctx,
    sys: &System,
    z: Sizes,
    clients: usize,
) -> anyhow::Result<Fairness> {
    let http = &ctx.http;
    let names: Vec<String> = (0..FAIR_TENANTS)
        .map(|t| {
            if t == 0 {
                "heavy".to_owned()
            } else {
                format!("light-{t}")
            }
        })
        .collect();
    let mut keys = Vec::new();
    for name in &names {
        keys.push(tenant_key(http, &sys.api_url, name).await?);
    }
    let per_tenant: Vec<u64> = (0..FAIR_TENANTS)
        .map(|t| {
            if t == 0 {
                z.fair_light_jobs * FAIR_SKEW
            } else {
                z.fair_light_jobs
            }
        })
        .collect();
    let mut order: Vec<usize> = per_tenant
        .iter()
        .enumerate()
        .flat_map(|(t, n)| std::iter::repeat_n(t, *n as usize))
        .collect();
    fastrand::Rng::with_seed(13).shuffle(&mut order);
    let plan: Plan = order
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            let body = json!({ "content": format!("flow fairness {} job {i:05}", names[t]) });
            (t, keys[t].clone(), body)
        })
        .collect();
    sys.set_paused(http, true).await?;
    let sub = submit_all(http, &sys.api_url, plan, clients).await;
    sys.set_paused(http, false).await?;
    let ids: Vec<Uuid> = sub.subs.iter().map(|s| s.id).collect();
    let groups: Vec<i32> = sub.subs.iter().map(|s| s.group as i32).collect();
    // Until the first tenant has nothing queued.
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let left: Vec<(i32, i64)> = sqlx::query_as(
            "select u.g, count(j.id) filter (where j.started_at is null)
             from unnest($1::uuid[], $2::int4[]) u(id, g) join jobs j on j.id = u.id
             group by u.g",
        )
        .bind(&ids)
        .bind(&groups)
        .fetch_all(&sys.db)
        .await?;
        if left.iter().any(|(_, n)| *n == 0) {
            break;
        }
        if Instant::now() >= deadline {
            bail!("no tenant's jobs all started within 180 s: {left:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The period's last calls finish (their usage counts).
    tokio::time::sleep(Duration::from_millis(CAPPED_MOCK_LATENCY_MS * 5 + 500)).await;
    let rows = job_rows(&sys.db, &ids).await?;

    let mut first = f64::INFINITY;
    let mut last_start = [f64::NEG_INFINITY; FAIR_TENANTS];
    let mut unstarted = [0u64; FAIR_TENANTS];
    for s in &sub.subs {
        match rows.get(&s.id).and_then(|r| r.started) {
            Some(t) => {
                first = first.min(t);
                last_start[s.group] = last_start[s.group].max(t);
            }
            None => unstarted[s.group] += 1,
        }
    }
    let end = (0..FAIR_TENANTS)
        .filter(|t| unstarted[*t] == 0)
        .map(|t| last_start[t])
        .fold(f64::INFINITY, f64::min);
    if !(first.is_finite() && end.is_finite()) {
        bail!("no tenant finished starting");
    }
    let mut tenants: Vec<TenantRow> = names
        .iter()
        .zip(&per_tenant)
        .map(|(name, n)| TenantRow {
            tenant: name.clone(),
            submitted: *n,
            ..Default::default()
        })
        .collect();
    let mut period_jobs = 0;
    for s in &sub.subs {
        if let Some(r) = rows.get(&s.id)
            && let Some(t) = r.started
            && t >= first
            && t <= end
        {
            let row = &mut tenants[s.group];
            row.started += 1;
            row.est_tokens += r.cost;
            row.actual_tokens += r.tokens;
            period_jobs += 1;
        }
    }
    let mut tags: Vec<Vec<f64>> = vec![Vec::new(); FAIR_TENANTS];
    for s in &sub.subs {
        if let Some(r) = rows.get(&s.id) {
            tags[s.group].push(r.start_tag);
        }
    }
    for (t, tags) in tenants.iter_mut().zip(&mut tags) {
        tags.sort_by(f64::total_cmp);
        let n = tags.len();
        tags.dedup();
        t.shared_tags = (n - tags.len()) as u64;
        t.max_start_tag = tags.last().copied().unwrap_or(0.0);
    }
    let est: Vec<f64> = tenants.iter().map(|t| t.est_tokens as f64).collect();
    let total_est: f64 = est.iter().sum();
    for t in &mut tenants {
        t.share_pct = 100.0 * t.est_tokens as f64 / total_est.max(1.0);
    }

    // FIFO, computed: the same jobs in created_at order, until the first
    // tenant's last job.
    let mut fifo: Vec<(f64, Uuid, usize, i64)> = sub
        .subs
        .iter()
        .filter_map(|s| rows.get(&s.id).map(|r| (r.created, s.id, s.group, r.cost)))
        .collect();
    fifo.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let mut remaining = [0u64; FAIR_TENANTS];
    for (_, _, g, _) in &fifo {
        remaining[*g] += 1;
    }
    let mut fifo_tokens = vec![0f64; FAIR_TENANTS];
    let mut fifo_jobs = 0u64;
    for (_, _, g, cost) in &fifo {
        fifo_tokens[*g] += *cost as f64;
        tenants[*g].fifo_started += 1;
        fifo_jobs += 1;
        remaining[*g] -= 1;
        if remaining[*g] == 0 {
            break;
        }
    }
    let fifo_total: f64 = fifo_tokens.iter().sum();
    for (t, x) in tenants.iter_mut().zip(&fifo_tokens) {
        t.fifo_share_pct = 100.0 * x / fifo_total.max(1.0);
    }
    let period_s = end - first;
    Ok(Fairness {
        submit_clients: clients,
        submit_s: sub.elapsed_s,
        max_concurrency: CAPPED_CONCURRENCY,
        mock_latency_ms: CAPPED_MOCK_LATENCY_MS,
        jobs: ids.len() as u64,
        submit_errors: sub.errors,
        period_s,
        period_jobs,
        starts_per_s: if period_s > 0.0 {
            period_jobs as f64 / period_s
        } else {
            0.0
        },
        jain_est_tokens: jain(&est),
        jain_actual_tokens: jain(
            &tenants
                .iter()
                .map(|t| t.actual_tokens as f64)
                .collect::<Vec<_>>(),
        ),
        jain_jobs: jain(&tenants.iter().map(|t| t.started as f64).collect::<Vec<_>>()),
        tenants,
        fifo_period_jobs: fifo_jobs,
        fifo_jain_est_tokens: jain(&fifo_tokens),
    })
}

// ------------------------------------------------------------ part 3

async fn lanes(ctx: &Ctx, z: Sizes) -> anyhow::Result<Lanes> {
    let sys = ctx
        .start(&SystemOptions {
            workers: WORKERS,
            mock_latency_ms: CAPPED_MOCK_LATENCY_MS,
            worker_env: env(&[("CHATQ_LLM_MAX_CONCURRENCY", CAPPED_CONCURRENCY.to_string())]),
            ..Default::default()
        })
        .await?;
    let r = lanes_on(ctx, &sys, z).await;
    sys.stop().await;
    r
}

async fn lanes_on(ctx: &Ctx, sys: &System, z: Sizes) -> anyhow::Result<Lanes> {
    let http = &ctx.http;
    let batch_key = tenant_key(http, &sys.api_url, "flood").await?;
    let inter_key = tenant_key(http, &sys.api_url, "interactive").await?;
    let plan: Plan = (0..z.lane_batch_jobs)
        .map(|i| {
            let body = json!({ "content": format!("flow batch job {i:05}"), "priority": "batch" });
            (1, batch_key.clone(), body)
        })
        .collect();
    let batch = submit_all(http, &sys.api_url, plan, SUBMIT_CLIENTS).await;
    let n_inter = z.lane_per_s * z.lane_s;
    let plan: Plan = (0..n_inter)
        .map(|i| {
            let body = json!({
                "content": format!("flow interactive job {i:05}"),
                "priority": "interactive",
            });
            (0, inter_key.clone(), body)
        })
        .collect();
    let every = Duration::from_secs_f64(1.0 / z.lane_per_s as f64);
    let inter = submit_paced(http, &sys.api_url, plan, every).await;
    let ids: Vec<Uuid> = inter.subs.iter().map(|s| s.id).collect();
    let left = wait_started(&sys.db, &ids, Duration::from_secs(60)).await?;
    let rows = job_rows(&sys.db, &ids).await?;
    let mut waits_us: Vec<u64> = rows
        .values()
        .filter_map(|r| Some(((r.started? - r.created).max(0.0) * 1e6) as u64))
        .collect();
    let a = rows
        .values()
        .map(|r| r.created)
        .fold(f64::INFINITY, f64::min);
    let b = rows
        .values()
        .filter_map(|r| r.started)
        .fold(f64::NEG_INFINITY, f64::max);
    if !(a.is_finite() && b.is_finite()) {
        bail!("no interactive job started");
    }
    let (batch_in, inter_in, batch_queued): (i64, i64, i64) = sqlx::query_as(
        "select count(*) filter (where priority = 'batch'
                                   and started_at between to_timestamp($1) and to_timestamp($2)),
                count(*) filter (where priority <> 'batch'
                                   and started_at between to_timestamp($1) and to_timestamp($2)),
                count(*) filter (where priority = 'batch'
                                   and (started_at is null or started_at > to_timestamp($2)))
         from jobs",
    )
    .bind(a)
    .bind(b)
    .fetch_one(&sys.db)
    .await?;
    let mut errors = batch.errors;
    for (k, v) in inter.errors {
        *errors.entry(k).or_default() += v;
    }
    let period_s = b - a;
    let all_in = (batch_in + inter_in) as f64;
    Ok(Lanes {
        max_concurrency: CAPPED_CONCURRENCY,
        mock_latency_ms: CAPPED_MOCK_LATENCY_MS,
        batch_jobs: batch.subs.len() as u64,
        batch_submit_s: batch.elapsed_s,
        interactive_per_s: z.lane_per_s,
        interactive_s: z.lane_s,
        interactive_jobs: ids.len() as u64,
        interactive_started: (ids.len() as i64 - left).max(0) as u64,
        submit_errors: errors,
        interactive_wait: load::percentiles(&mut waits_us),
        period_s,
        batch_started_in_period: batch_in as u64,
        interactive_started_in_period: inter_in as u64,
        batch_share_pct: 100.0 * batch_in as f64 / all_in.max(1.0),
        starts_per_s: if period_s > 0.0 {
            all_in / period_s
        } else {
            0.0
        },
        batch_queued_at_end: batch_queued as u64,
    })
}

// ------------------------------------------------------------ part 4

async fn eta(ctx: &Ctx, z: Sizes) -> anyhow::Result<Eta> {
    let sys = ctx
        .start(&SystemOptions {
            workers: WORKERS,
            mock_latency_ms: ETA_MOCK_LATENCY_MS,
            worker_env: env(&[("CHATQ_LLM_MAX_CONCURRENCY", CAPPED_CONCURRENCY.to_string())]),
            ..Default::default()
        })
        .await?;
    let r = eta_on(ctx, &sys, z).await;
    sys.stop().await;
    r
}

async fn eta_on(ctx: &Ctx, sys: &System, z: Sizes) -> anyhow::Result<Eta> {
    let http = &ctx.http;
    let n = z.eta_per_s * z.eta_s;
    let plan: Plan = (0..n)
        .map(|i| {
            let body = json!({ "content": format!("flow eta job {i:05}") });
            (0, sys.key.clone(), body)
        })
        .collect();
    let every = Duration::from_secs_f64(1.0 / z.eta_per_s as f64);
    let sub = submit_paced(http, &sys.api_url, plan, every).await;
    let arrivals_end = now_epoch();
    let probed = probe(http, &sys.api_url, &sys.key, &sub.subs, 3).await;
    let ids: Vec<Uuid> = sub.subs.iter().map(|s| s.id).collect();
    let capacity = f64::from(CAPPED_CONCURRENCY) * 1000.0 / ETA_MOCK_LATENCY_MS as f64;
    let drain = Duration::from_secs(60) + Duration::from_secs_f64(2.0 * n as f64 / capacity);
    wait_started(&sys.db, &ids, drain).await?;
    let rows = job_rows(&sys.db, &ids).await?;
    let starts: Vec<f64> = rows.values().filter_map(|r| r.started).collect();
    let first = starts.iter().copied().fold(f64::INFINITY, f64::min);
    let last = starts.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let max_wait_s = rows
        .values()
        .filter_map(|r| Some(r.started? - r.created))
        .fold(0.0, f64::max);
    let (at_202, at_get) = eta_samples(&sub.subs, &probed, &rows);
    let run = "4. arrivals above capacity";
    let rate = |a: f64, b: f64| {
        let n = starts.iter().filter(|t| **t >= a && **t <= b).count();
        if b > a { n as f64 / (b - a) } else { 0.0 }
    };
    Ok(Eta {
        max_concurrency: CAPPED_CONCURRENCY,
        mock_latency_ms: ETA_MOCK_LATENCY_MS,
        arrival_per_s: z.eta_per_s,
        arrival_s: z.eta_s,
        jobs: ids.len() as u64,
        submit_errors: sub.errors,
        start_rate_per_s: if last > first {
            (starts.len() as f64 - 1.0) / (last - first)
        } else {
            0.0
        },
        start_rate_arriving_per_s: rate(first, arrivals_end),
        start_rate_after_per_s: rate(arrivals_end, last),
        max_wait_s,
        rows: vec![
            eta_row(run, "202", &at_202),
            eta_row(run, "GET at the end of the arrivals", &at_get),
        ],
    })
}

// ------------------------------------------------------------ output

/// A flow target: what, the figure, met.
pub struct FlowTarget {
    /// The target as stated.
    pub what: String,
    /// The figure.
    pub measured: String,
    /// Met or not.
    pub met: bool,
}

impl FlowResult {
    /// The targets of the scenario.
    pub fn targets(&self) -> Vec<FlowTarget> {
        let s = &self.saturation;
        let worst = self
            .fairness
            .iter()
            .map(|x| x.jain_est_tokens)
            .fold(f64::INFINITY, f64::min);
        let runs: Vec<String> = self
            .fairness
            .iter()
            .map(|x| {
                format!(
                    "{:.3} submitted by {} client(s) (FIFO, computed: {:.3})",
                    x.jain_est_tokens, x.submit_clients, x.fifo_jain_est_tokens
                )
            })
            .collect();
        vec![
            FlowTarget {
                what: "flow: provider 429s at a saturated shared budget < 1%".into(),
                measured: format!(
                    "{:.2}% ({} of {} calls)",
                    s.rate_429_pct,
                    s.mock_rate_limited,
                    s.mock_total + s.mock_rate_limited
                ),
                met: s.rate_429_pct < 1.0,
            },
            FlowTarget {
                what: "flow: goodput at saturation ≥ 90% of the budget".into(),
                measured: format!(
                    "{:.1}/s of {:.1}/s = {:.1}% (chatq uses 95%)",
                    s.goodput_per_s, s.budget_per_s, s.goodput_pct
                ),
                met: s.goodput_pct >= 90.0,
            },
            FlowTarget {
                what: "flow: Jain's index of tenants' tokens under 10:1 load ≥ 0.95".into(),
                measured: runs.join("; "),
                met: worst.is_finite() && worst >= 0.95,
            },
        ]
    }

    /// Part 1's table.
    pub fn saturation_table(&self) -> Table {
        let s = &self.saturation;
        let windows: Vec<String> = s.starts_per_window.iter().map(u64::to_string).collect();
        Table {
            headers: &["what", "value"],
            rows: vec![
                vec![
                    "budget (mock and chatq)".into(),
                    format!(
                        "{} requests / {} s = {:.1}/s",
                        s.requests_per_window, s.window_s, s.budget_per_s
                    ),
                ],
                vec![
                    "backlog".into(),
                    format!("{} jobs submitted in {:.1} s", s.jobs, s.submit_s),
                ],
                vec![
                    "mock: calls / 429s / 429 rate".into(),
                    format!(
                        "{} / {} / {:.2}%",
                        s.mock_total, s.mock_rate_limited, s.rate_429_pct
                    ),
                ],
                vec![
                    "succeeded / not / retried".into(),
                    format!("{} / {} / {}", s.succeeded, s.not_succeeded, s.retried_jobs),
                ],
                vec![
                    "saturated (first → last start)".into(),
                    format!("{:.1} s", s.saturated_s),
                ],
                vec![
                    "goodput, steady part".into(),
                    format!(
                        "{} in {:.1} s = {:.2}/s = {:.1}% of the budget",
                        s.steady_completed, s.steady_s, s.goodput_per_s, s.goodput_pct
                    ),
                ],
                vec![
                    "goodput, whole period (with the initial burst)".into(),
                    format!("{:.1}% of the budget", s.whole_period_pct),
                ],
                vec![
                    format!("starts per {} s window", s.window_s),
                    windows.join(", "),
                ],
            ],
        }
    }
}

impl Fairness {
    /// The run's title.
    pub fn title(&self) -> String {
        format!(
            "{} tenants at 10:1, submitted by {} client(s) in {:.1} s; period {:.1} s, {} jobs, \
             {:.1} starts/s",
            self.tenants.len(),
            self.submit_clients,
            self.submit_s,
            self.period_s,
            self.period_jobs,
            self.starts_per_s
        )
    }

    /// The run's table.
    pub fn table(&self) -> Table {
        let fa = self;
        let mut rows: Vec<Vec<String>> = fa
            .tenants
            .iter()
            .map(|t| {
                vec![
                    t.tenant.clone(),
                    t.submitted.to_string(),
                    t.started.to_string(),
                    t.est_tokens.to_string(),
                    t.actual_tokens.to_string(),
                    f(t.share_pct, 1),
                    t.fifo_started.to_string(),
                    f(t.fifo_share_pct, 1),
                    t.shared_tags.to_string(),
                    f(t.max_start_tag, 0),
                ]
            })
            .collect();
        rows.push(vec![
            "Jain".into(),
            String::new(),
            f(fa.jain_jobs, 3),
            f(fa.jain_est_tokens, 3),
            f(fa.jain_actual_tokens, 3),
            String::new(),
            String::new(),
            f(fa.fifo_jain_est_tokens, 3),
            String::new(),
            String::new(),
        ]);
        Table {
            headers: &[
                "tenant",
                "submitted",
                "started in period",
                "est. tokens",
                "mock tokens",
                "share %",
                "FIFO started (computed)",
                "FIFO share % (computed)",
                "jobs sharing a start tag",
                "last start tag",
            ],
            rows,
        }
    }
}

impl FlowResult {
    /// Part 3's table.
    pub fn lanes_table(&self) -> Table {
        let l = &self.lanes;
        let w = &l.interactive_wait;
        Table {
            headers: &["what", "value"],
            rows: vec![
                vec![
                    "batch flood".into(),
                    format!(
                        "{} jobs submitted in {:.1} s",
                        l.batch_jobs, l.batch_submit_s
                    ),
                ],
                vec![
                    "interactive".into(),
                    format!(
                        "{}/s for {} s: {} accepted, {} started",
                        l.interactive_per_s,
                        l.interactive_s,
                        l.interactive_jobs,
                        l.interactive_started
                    ),
                ],
                vec![
                    "interactive wait p50 / p95 / max".into(),
                    format!("{:.0} / {:.0} / {:.0} ms", w.p50_ms, w.p95_ms, w.max_ms),
                ],
                vec![
                    "period (first interactive submitted → last started)".into(),
                    format!("{:.1} s, {:.1} starts/s", l.period_s, l.starts_per_s),
                ],
                vec![
                    "started in the period: batch / interactive".into(),
                    format!(
                        "{} / {} (batch {:.0}%)",
                        l.batch_started_in_period,
                        l.interactive_started_in_period,
                        l.batch_share_pct
                    ),
                ],
                vec![
                    "batch still queued at the end".into(),
                    l.batch_queued_at_end.to_string(),
                ],
            ],
        }
    }

    /// Part 4's table (and part 1's ETA figures).
    pub fn eta_table(&self) -> Table {
        let rows = self
            .eta
            .rows
            .iter()
            .map(|r| {
                vec![
                    r.run.clone(),
                    r.source.clone(),
                    format!("{} of {}", r.samples, r.estimates),
                    f(r.median_wait_s, 1),
                    f(r.median_abs_err_pct, 1),
                    f(r.p90_abs_err_pct, 1),
                    f(r.median_signed_err_pct, 1),
                    f(r.median_estimated_rate_per_s, 1),
                    f(r.median_actual_rate_per_s, 1),
                ]
            })
            .collect();
        Table {
            headers: &[
                "run",
                "estimate from",
                "waited ≥ 5 s",
                "median wait s",
                "median abs. error % of wait",
                "p90 abs. error %",
                "median signed error %",
                "implied start rate /s",
                "seen start rate /s",
            ],
            rows,
        }
    }

    fn print(&self) {
        self.saturation_table()
            .print("flow 1: saturation against a rate-limited provider");
        for x in &self.fairness {
            x.table().print(&format!("flow 2: fairness, {}", x.title()));
        }
        self.lanes_table()
            .print("flow 3: interactive wait during a batch flood");
        self.eta_table().print(&format!(
            "flow 4: ETA accuracy (run 4: {} jobs, start rate {:.1}/s: {:.1}/s while arriving, \
             {:.1}/s after; longest wait {:.1} s)",
            self.eta.jobs,
            self.eta.start_rate_per_s,
            self.eta.start_rate_arriving_per_s,
            self.eta.start_rate_after_per_s,
            self.eta.max_wait_s
        ));
        println!();
        for t in self.targets() {
            let v = if t.met { "met" } else { "MISSED" };
            println!("  {}: {} — {v}", t.what, t.measured);
        }
    }

    /// The scenario's section of the Markdown report.
    pub fn markdown(&self, s: &mut String) {
        let sat = &self.saturation;
        let _ = writeln!(
            s,
            "### Saturation against a rate-limited provider\n\n\
             The mock allows {} requests per {} s window and chatq's {} workers share the \
             same budget (`CHATQ_LLM_REQUESTS_PER_MINUTE={}`, `CHATQ_LLM_RATE_WINDOW_SECS={}`; \
             chatq uses 95% of it); {} jobs are submitted at once. Goodput counts the jobs \
             completed from one window after the first start (the buckets' initial burst \
             spent) to the last start.\n",
            sat.requests_per_window,
            sat.window_s,
            sat.workers,
            sat.requests_per_window,
            sat.window_s,
            sat.jobs
        );
        self.saturation_table().markdown(s);
        let (lim, lat) = self
            .fairness
            .first()
            .map_or((0, 0), |x| (x.max_concurrency, x.mock_latency_ms));
        let clients: Vec<String> = self
            .fairness
            .iter()
            .map(|x| x.submit_clients.to_string())
            .collect();
        let clients = clients.join(", ");
        let _ = writeln!(
            s,
            "### Fairness between tenants at 10:1\n\n\
             {FAIR_TENANTS} tenants, `heavy` submitting {FAIR_SKEW}× the jobs of each other \
             one, all submitted (shuffled) while the queue is paused, then released against \
             `CHATQ_LLM_MAX_CONCURRENCY={lim}` and a {lat} ms mock; submitted by {clients} \
             concurrent client(s) in turn (a fresh deployment each). The period is the first start to the first tenant's last \
             start; Jain's index is (Σx)² / (n·Σx²) over the tenants' tokens started in it \
             (estimated: chatq's own `cost`, what fair queueing weighs; mock: the reply's \
             usage). The FIFO columns are **computed, not measured**: the same jobs served in \
             `created_at` order until the first tenant's last job.\n"
        );
        for x in &self.fairness {
            let _ = writeln!(s, "{}:\n", x.title());
            x.table().markdown(s);
        }
        let l = &self.lanes;
        let _ = writeln!(
            s,
            "### Interactive wait during a batch flood\n\n\
             {} `batch` jobs, then `interactive` jobs at {}/s for {} s, against \
             `CHATQ_LLM_MAX_CONCURRENCY={}` and a {} ms mock.\n",
            l.batch_jobs,
            l.interactive_per_s,
            l.interactive_s,
            l.max_concurrency,
            l.mock_latency_ms
        );
        self.lanes_table().markdown(s);
        let e = &self.eta;
        let _ = writeln!(
            s,
            "### Queue ETA accuracy\n\n\
             Run 4: jobs arrive at {}/s for {} s against `CHATQ_LLM_MAX_CONCURRENCY={}` and a \
             {} ms mock (measured start rate {:.1}/s: {:.1}/s while jobs arrived, {:.1}/s \
             after; longest wait {:.1} s). Error = |`estimated_start_at` − `started_at`| / the \
             actual wait from the estimate, for jobs that waited at least {ETA_MIN_WAIT_S} s; \
             signed: negative = the estimate was early. Implied start rate = jobs ahead / \
             estimated wait (what the api assumed); seen = jobs ahead / actual wait.\n",
            e.arrival_per_s,
            e.arrival_s,
            e.max_concurrency,
            e.mock_latency_ms,
            e.start_rate_per_s,
            e.start_rate_arriving_per_s,
            e.start_rate_after_per_s,
            e.max_wait_s
        );
        self.eta_table().markdown(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jain_bounds() {
        assert!((jain(&[3.0, 3.0, 3.0]) - 1.0).abs() < 1e-12);
        assert!((jain(&[1.0, 0.0, 0.0, 0.0]) - 0.25).abs() < 1e-12);
        // 10:1:1:1:1 → 196 / 520.
        assert!((jain(&[10.0, 1.0, 1.0, 1.0, 1.0]) - 196.0 / 520.0).abs() < 1e-12);
        assert_eq!(jain(&[]), 0.0);
    }

    #[test]
    fn eta_rows_skip_short_waits_and_sign_errors() {
        // (eta, asked, started): waits 10 s (estimate 2 s early) and 20 s
        // (4 s late); a 1 s wait is left out.
        let r = eta_row(
            "r",
            "s",
            &[
                (8.0, 0.0, 10.0, 80.0),
                (24.0, 0.0, 20.0, 200.0),
                (1.0, 0.0, 1.0, 5.0),
            ],
        );
        assert_eq!((r.estimates, r.samples), (3, 2));
        // Implied rates 10 and 200/24; seen 8 and 10 (nearest rank: the lower).
        assert!((r.median_estimated_rate_per_s - 200.0 / 24.0).abs() < 1e-9);
        assert!((r.median_actual_rate_per_s - 8.0).abs() < 1e-9);
        assert!((r.median_abs_err_pct - 20.0).abs() < 1e-9);
        assert!((r.median_signed_err_pct + 20.0).abs() < 1e-9);
    }
}
