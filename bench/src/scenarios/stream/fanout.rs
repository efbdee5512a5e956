//! Many subscribers on one api: how many it holds and at what memory
//! (`held`), and how many delta events/s it delivers (`rate`).
//!
//! Both follow one plan: pause the queue, submit the jobs, open every
//! subscriber (each counts as held once its first event, the job's
//! `queued` status, has arrived), measure the idle api, resume the queue
//! so every job streams at once, and read each stream to `done`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use tokio::sync::Semaphore;
use uuid::Uuid;

use super::WORKER_COALESCE_MS;
use crate::ctx::{Ctx, Target};
use crate::procfs;
use crate::sse::{self, Stream, StreamError};
use crate::system::System;

/// Subscribers per job in the `held` run.
const HELD_PER_JOB: usize = 100;
/// Streams being opened at once (the api's accept backlog stays short).
pub const OPEN_CONCURRENCY: usize = 256;
/// Longest wait for every subscriber to be open.
const OPEN_DEADLINE: Duration = Duration::from_secs(120);
/// Longest wait, after resuming, for every stream to end.
const DONE_DEADLINE: Duration = Duration::from_secs(60);
/// How often the api's RSS is sampled while the jobs stream.
const RSS_EVERY: Duration = Duration::from_millis(100);

/// Subscribers held by one api.
#[derive(Debug, Clone, Serialize)]
pub struct HeldResult {
    /// Subscribers opened.
    pub subscribers: usize,
    /// Jobs they follow.
    pub jobs: usize,
    /// Words of each reply.
    pub words: u32,
    /// Mock delay before each word, ms.
    pub chunk_delay_ms: u64,
    /// Subscribers whose stream opened and sent its first event.
    pub held: usize,
    /// Seconds to open them all.
    pub open_s: f64,
    /// Subscribers that received `done`.
    pub done: usize,
    /// api VmRSS before any subscriber, MB.
    pub rss_before_mb: f64,
    /// api VmRSS holding every subscriber (jobs queued, no text), MB.
    pub rss_holding_mb: f64,
    /// Highest api VmRSS sampled while the jobs streamed, MB.
    pub rss_streaming_max_mb: f64,
    /// (holding − before) / held, KB.
    pub kb_per_subscriber: f64,
    /// The api's open file descriptors while holding them.
    pub api_fds_holding: usize,
    /// Resuming the queue → the last `done` received, s.
    pub resume_to_all_done_s: f64,
    /// Delta events received per second (10th–90th percentile of arrivals).
    pub delta_events_per_s: f64,
    /// Failures by kind (opening, or a stream ending without `done`).
    pub errors: BTreeMap<String, u64>,
}

/// Delta events/s through one api.
#[derive(Debug, Clone, Serialize)]
pub struct RateRow {
    /// Subscribers.
    pub subscribers: usize,
    /// Jobs they follow (subscribers / jobs per job).
    pub jobs: usize,
    /// Words of each reply.
    pub words: u32,
    /// Mock delay before each word, ms.
    pub chunk_delay_ms: u64,
    /// Subscribers that received `done`.
    pub done: usize,
    /// Delta events received, all subscribers.
    pub delta_events: u64,
    /// Delta events per second, between the 10th and 90th percentile of arrivals.
    pub delta_events_per_s: f64,
    /// What the pipeline can offer: subscribers × min(words/s, 1000/coalesce ms).
    pub ceiling_per_s: f64,
    /// Delta `data` received per second, KB (same window).
    pub text_kb_per_s: f64,
    /// api CPU time over resume → last `done`, % of one core.
    pub api_cpu_pct: f64,
    /// api CPU time per delta event delivered, µs.
    pub api_cpu_us_per_event: f64,
    /// The bench's own CPU time over the same span, % of one core.
    pub bench_cpu_pct: f64,
    /// The whole machine's busy time over the same span, % of all cores.
    pub machine_busy_pct: f64,
    /// Failures by kind.
    pub errors: BTreeMap<String, u64>,
}

/// One fan-out run.
struct Plan {
    subscribers: usize,
    jobs: usize,
    words: u32,
    chunk_delay_ms: u64,
}

/// What a fan-out run saw.
struct Seen {
    held: usize,
    open_s: f64,
    done: usize,
    rss_before: u64,
    rss_holding: u64,
    rss_streaming_max: u64,
    fds_holding: usize,
    resume_to_all_done_s: f64,
    delta_events: u64,
    events_per_s: f64,
    bytes_per_s: f64,
    api_cpu_s: f64,
    bench_cpu_s: f64,
    machine_busy_pct: f64,
    errors: BTreeMap<String, u64>,
}

/// 10,000 subscribers (quick: 200), 100 per job.
pub async fn held(ctx: &Ctx, sys: &System) -> anyhow::Result<HeldResult> {
    let subscribers = if ctx.quick { 200 } else { 10_000 };
    // Slow words: this run is about holding streams, not about throughput.
    let (words, chunk_delay_ms) = if ctx.quick { (4, 100) } else { (10, 500) };
    let plan = Plan {
        subscribers,
        jobs: subscribers.div_ceil(HELD_PER_JOB),
        words,
        chunk_delay_ms,
    };
    let s = fan_out(ctx, sys, &plan).await?;
    let mb = |b: u64| b as f64 / (1024.0 * 1024.0);
    Ok(HeldResult {
        subscribers,
        jobs: plan.jobs,
        words: plan.words,
        chunk_delay_ms: plan.chunk_delay_ms,
        held: s.held,
        open_s: s.open_s,
        done: s.done,
        rss_before_mb: mb(s.rss_before),
        rss_holding_mb: mb(s.rss_holding),
        rss_streaming_max_mb: mb(s.rss_streaming_max),
        kb_per_subscriber: s.rss_holding.saturating_sub(s.rss_before) as f64
            / 1024.0
            / s.held.max(1) as f64,
        api_fds_holding: s.fds_holding,
        resume_to_all_done_s: s.resume_to_all_done_s,
        delta_events_per_s: s.events_per_s,
        errors: s.errors,
    })
}

/// 1,000 subscribers on 10 and on 100 jobs, then 5,000 on 50 jobs (more
/// than the machine can deliver); quick: 100 on 1 and on 10 jobs.
pub async fn rate(ctx: &Ctx, sys: &System) -> anyhow::Result<Vec<RateRow>> {
    let (runs, words): (&[(usize, usize)], u32) = if ctx.quick {
        (&[(100, 100), (100, 10)], 60)
    } else {
        (&[(1_000, 100), (1_000, 10), (10_000, 100)], 500)
    };
    let mut rows = Vec::new();
    for &(subscribers, per_job) in runs {
        let plan = Plan {
            subscribers,
            jobs: subscribers.div_ceil(per_job),
            words,
            chunk_delay_ms: 10,
        };
        let s = fan_out(ctx, sys, &plan).await?;
        let words_per_s = 1000.0 / plan.chunk_delay_ms.max(1) as f64;
        let coalesced_per_s = 1000.0 / WORKER_COALESCE_MS as f64;
        rows.push(RateRow {
            subscribers,
            jobs: plan.jobs,
            words,
            chunk_delay_ms: plan.chunk_delay_ms,
            done: s.done,
            delta_events: s.delta_events,
            delta_events_per_s: s.events_per_s,
            ceiling_per_s: subscribers as f64 * words_per_s.min(coalesced_per_s),
            text_kb_per_s: s.bytes_per_s / 1024.0,
            api_cpu_pct: 100.0 * s.api_cpu_s / s.resume_to_all_done_s.max(1e-9),
            api_cpu_us_per_event: 1e6 * s.api_cpu_s / s.delta_events.max(1) as f64,
            bench_cpu_pct: 100.0 * s.bench_cpu_s / s.resume_to_all_done_s.max(1e-9),
            machine_busy_pct: s.machine_busy_pct,
            errors: s.errors,
        });
    }
    Ok(rows)
}

/// What the subscribers of one run share.
struct Shared {
    /// Bounds the streams being opened at once.
    opening: Semaphore,
    /// Streams open with their first event received.
    held: AtomicUsize,
    /// Streams that failed to open.
    failed: AtomicUsize,
    /// When the queue was resumed: delta arrival times count from here.
    resumed_at: std::sync::OnceLock<Instant>,
}

/// What one subscriber saw.
#[derive(Default)]
struct SubOutcome {
    done: bool,
    error: Option<String>,
    /// Arrival of each delta, µs after the queue was resumed.
    delta_at_us: Vec<u64>,
    delta_bytes: u64,
    last_at: Option<Instant>,
}

async fn fan_out(ctx: &Ctx, sys: &System, plan: &Plan) -> anyhow::Result<Seen> {
    let api_pid = sys.api_pid.context("the api has no process id")?;
    let target = ctx.target(sys);
    sys.set_paused(&ctx.http, true).await?;
    let content = format!(
        "[mock:words={}][mock:chunk_delay_ms={}] fan-out",
        plan.words, plan.chunk_delay_ms
    );
    let ids = submit_all(&target, &content, plan.jobs).await?;
    // Let the api settle after the submissions before the baseline.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = procfs::rss_bytes(api_pid).unwrap_or(0);

    let streams = sse::client()?;
    let shared = Arc::new(Shared {
        opening: Semaphore::new(OPEN_CONCURRENCY),
        held: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        resumed_at: std::sync::OnceLock::new(),
    });
    let open_start = Instant::now();
    let tasks: Vec<_> = (0..plan.subscribers)
        .map(|i| {
            let job = ids[i % ids.len()];
            let (streams, t, shared) = (streams.clone(), target.clone(), Arc::clone(&shared));
            tokio::spawn(async move { subscriber(&streams, &t, job, &shared).await })
        })
        .collect();
    let (held, failed) = (&shared.held, &shared.failed);
    let open_end = Instant::now() + OPEN_DEADLINE;
    while held.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < plan.subscribers
        && Instant::now() < open_end
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let open_s = open_start.elapsed().as_secs_f64();
    let held_n = held.load(Ordering::Relaxed);
    // Idle holding: let allocations settle before reading the RSS.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_holding = procfs::rss_bytes(api_pid).unwrap_or(0);
    let fds_holding = procfs::open_fds(api_pid).unwrap_or(0);

    let cpu0 = procfs::cpu_seconds(api_pid).unwrap_or(0.0);
    let bench0 = procfs::cpu_seconds(std::process::id()).unwrap_or(0.0);
    let machine0 = procfs::machine_cpu_ticks();
    let t_resume = Instant::now();
    let _ = shared.resumed_at.set(t_resume);
    sys.set_paused(&ctx.http, false).await?;
    let sampling = Arc::new(AtomicBool::new(true));
    let max_rss = Arc::new(AtomicU64::new(rss_holding));
    let sampler = {
        let (sampling, max_rss) = (Arc::clone(&sampling), Arc::clone(&max_rss));
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                if let Some(rss) = procfs::rss_bytes(api_pid) {
                    max_rss.fetch_max(rss, Ordering::Relaxed);
                }
                tokio::time::sleep(RSS_EVERY).await;
            }
        })
    };

    let done_end = tokio::time::Instant::now() + DONE_DEADLINE;
    let mut outcomes = Vec::with_capacity(tasks.len());
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for mut task in tasks {
        match tokio::time::timeout_at(done_end, &mut task).await {
            Ok(Ok(o)) => outcomes.push(o),
            Ok(Err(_)) => *errors.entry("task_panicked".into()).or_default() += 1,
            Err(_) => {
                task.abort();
                *errors.entry("no_done_by_deadline".into()).or_default() += 1;
            }
        }
    }
    let cpu1 = procfs::cpu_seconds(api_pid).unwrap_or(cpu0);
    let bench1 = procfs::cpu_seconds(std::process::id()).unwrap_or(bench0);
    let machine_busy_pct = match (machine0, procfs::machine_cpu_ticks()) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => 100.0 * (b1 - b0) as f64 / (t1 - t0) as f64,
        _ => 0.0,
    };
    sampling.store(false, Ordering::Relaxed);
    let _ = sampler.await;
    drop(streams);

    let mut times = Vec::new();
    let (mut done, mut bytes) = (0, 0u64);
    let mut last: Option<Instant> = None;
    for o in outcomes {
        done += usize::from(o.done);
        bytes += o.delta_bytes;
        times.extend(o.delta_at_us);
        last = last.max(o.last_at);
        if let Some(e) = o.error {
            *errors.entry(e).or_default() += 1;
        }
    }
    let resume_to_all_done_s =
        last.map_or(0.0, |l| l.saturating_duration_since(t_resume).as_secs_f64());
    let delta_events = times.len() as u64;
    let events_per_s = steady_rate(&mut times);
    Ok(Seen {
        held: held_n,
        open_s,
        done,
        rss_before,
        rss_holding,
        rss_streaming_max: max_rss.load(Ordering::Relaxed),
        fds_holding,
        resume_to_all_done_s,
        delta_events,
        events_per_s,
        // The window's event rate times the mean size of a delta.
        bytes_per_s: events_per_s * bytes as f64 / delta_events.max(1) as f64,
        api_cpu_s: cpu1 - cpu0,
        bench_cpu_s: bench1 - bench0,
        machine_busy_pct,
        errors,
    })
}

/// One subscriber: opens its stream (counted as held at the first event),
/// then reads it to `done`, noting when each delta arrived.
async fn subscriber(
    streams: &reqwest::Client,
    t: &Target,
    job: Uuid,
    shared: &Shared,
) -> SubOutcome {
    let mut out = SubOutcome::default();
    let first = {
        let _permit = shared.opening.acquire().await;
        async {
            let mut s = Stream::open(streams, &t.url, &t.key, job, None).await?;
            let first = s.next().await?;
            Ok::<_, StreamError>((s, first))
        }
        .await
    };
    let mut stream = match first {
        Ok((s, Some(_))) => {
            shared.held.fetch_add(1, Ordering::Relaxed);
            s
        }
        Ok((_, None)) => {
            shared.failed.fetch_add(1, Ordering::Relaxed);
            out.error = Some("open: closed".into());
            return out;
        }
        Err(e) => {
            shared.failed.fetch_add(1, Ordering::Relaxed);
            out.error = Some(format!("open: {}", e.0));
            return out;
        }
    };
    loop {
        let e = match stream.next().await {
            Ok(Some(e)) => e,
            Ok(None) => {
                out.error = Some("closed_before_done".into());
                return out;
            }
            Err(e) => {
                out.error = Some(e.0);
                return out;
            }
        };
        out.last_at = Some(e.at);
        match e.event.as_str() {
            "delta" => {
                let base = shared.resumed_at.get().copied().unwrap_or(e.at);
                out.delta_at_us
                    .push(e.at.saturating_duration_since(base).as_micros() as u64);
                out.delta_bytes += e.data.len() as u64;
            }
            "done" => {
                out.done = true;
                return out;
            }
            _ => {}
        }
    }
}

/// Events per second between the 10th and 90th percentile of arrival
/// times (µs), dropping the ramp-up and the tail.
fn steady_rate(times: &mut [u64]) -> f64 {
    if times.len() < 10 {
        return 0.0;
    }
    times.sort_unstable();
    let (lo, hi) = (times.len() / 10, times.len() * 9 / 10);
    let span_s = (times[hi] - times[lo]) as f64 / 1e6;
    if span_s <= 0.0 {
        return 0.0;
    }
    (hi - lo) as f64 / span_s
}

/// Submits `n` jobs with `content` (fails on any refusal).
async fn submit_all(target: &Target, content: &str, n: usize) -> anyhow::Result<Vec<Uuid>> {
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        let s = target.submit(content, None).await?;
        match s.job {
            Some(id) => ids.push(id),
            None => bail!("submitting a fan-out job answered {}", s.status),
        }
    }
    Ok(ids)
}
