//! The load half of `instrumentation`: CPU time per accepted submit of an
//! api process and per completed job of a worker process, from `/proc`,
//! with one process logging at `info` (JSON) and one with logs off, side by
//! side on one deployment under the same load.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use crate::ctx::{Ctx, Target};
use crate::procfs;
use crate::scenarios::submit::submit_load;
use crate::system::{System, SystemOptions};

/// `CHATQ_WORKER_CONCURRENCY` of the two workers.
const WORKER_CONCURRENCY: u32 = 64;
/// The headline process's log settings.
const ON: [(&str, &str); 2] = [("RUST_LOG", "info"), ("LOG_FORMAT", "json")];
/// The A/B baseline's.
const OFF: [(&str, &str); 2] = [("RUST_LOG", "off"), ("LOG_FORMAT", "json")];

/// One api or worker process under load.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Process {
    /// `api` or `worker`.
    pub what: String,
    /// Its `RUST_LOG`.
    pub rust_log: String,
    /// Accepted submissions (api) or completed jobs (worker, in the drain's
    /// steady part).
    pub ops: u64,
    /// Jobs the worker completed in the whole run (api: submissions
    /// accepted, warm-up included).
    pub ops_total: u64,
    /// Per second of the phase.
    pub ops_per_s: f64,
    /// User + system CPU time over the phase, s.
    pub cpu_s: f64,
    /// `cpu_s / ops`, µs.
    pub cpu_us_per_op: f64,
    /// Bytes of log (stderr) it wrote over the whole run, per operation.
    pub log_bytes_per_op: f64,
    /// Submit latency (api only).
    pub p50_ms: Option<f64>,
    /// Failed submissions by kind (api only).
    pub errors: Option<String>,
}

/// The load part's result.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadPart {
    /// Submitting clients per api.
    pub clients_per_api: usize,
    /// Seconds of the measured submit phase.
    pub submit_s: f64,
    /// Api on, api off, worker on, worker off.
    pub processes: Vec<Process>,
    /// Accepted submissions, both apis.
    pub submitted: u64,
    /// Busy CPU time of the whole machine over the submit phase, s.
    pub machine_cpu_s_submit: f64,
    /// ... per accepted submission, µs.
    pub machine_cpu_us_per_submit: f64,
    /// `CHATQ_WORKER_CONCURRENCY` per worker.
    pub worker_concurrency: u32,
    /// Seconds from resume to the last job.
    pub drain_s: f64,
    /// Seconds of the drain's steady part, where both workers completed
    /// jobs in every sampling interval (the worker rows cover it).
    pub window_s: f64,
    /// Jobs completed by the two workers in that window.
    pub completed: u64,
    /// Busy CPU time of the whole machine over that window, s.
    pub machine_cpu_s_drain: f64,
    /// ... per completed job, µs.
    pub machine_cpu_us_per_job: f64,
    /// Jobs in the deployment (warm-up included).
    pub jobs_total: u64,
    /// Of which succeeded.
    pub jobs_succeeded: u64,
}

impl LoadPart {
    /// The `n`th process (from 0) of kind `what` with `RUST_LOG` `rust_log`.
    fn find(&self, what: &str, rust_log: &str, n: usize) -> Process {
        self.processes
            .iter()
            .filter(|p| p.what == what && p.rust_log == rust_log)
            .nth(n)
            .cloned()
            .unwrap_or_default()
    }

    /// The api logging at `info`.
    pub fn api_on(&self) -> Process {
        self.find("api", &rust_log(&ON), 0)
    }

    /// The api with logs off.
    pub fn api_off(&self) -> Process {
        self.find("api", &rust_log(&OFF), 0)
    }

    /// The second api with logs off: the A/A control, how far two
    /// processes of the same configuration differ under the same load.
    pub fn api_off_again(&self) -> Process {
        self.find("api", &rust_log(&OFF), 1)
    }

    /// The worker logging at `info`.
    pub fn worker_on(&self) -> Process {
        self.find("worker", &rust_log(&ON), 0)
    }

    /// The worker with logs off.
    pub fn worker_off(&self) -> Process {
        self.find("worker", &rust_log(&OFF), 0)
    }

    /// The second worker with logs off: the workers' A/A control.
    pub fn worker_off_again(&self) -> Process {
        self.find("worker", &rust_log(&OFF), 1)
    }
}

/// A directory for the processes' logs, removed at the end.
struct LogDir(PathBuf);

impl LogDir {
    fn new() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "chatq-bench-instrumentation-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn stderr(&self, name: &str) -> anyhow::Result<Stdio> {
        let path = self.path(name);
        let file =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Stdio::from(file))
    }

    /// The last lines of a log, for an error message.
    fn tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.path(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    }

    fn size(&self, name: &str) -> u64 {
        std::fs::metadata(self.path(name)).map_or(0, |m| m.len())
    }
}

impl Drop for LogDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn rust_log(pairs: &[(&str, &str)]) -> String {
    let level = pairs
        .iter()
        .find(|(k, _)| *k == "RUST_LOG")
        .map_or("", |(_, v)| *v);
    if level == "off" {
        "off".into()
    } else {
        format!("{level}, JSON")
    }
}

fn cpu(pid: u32) -> anyhow::Result<f64> {
    procfs::cpu_seconds(pid).with_context(|| format!("reading the CPU time of process {pid}"))
}

/// Busy CPU seconds of the whole machine so far.
fn machine_busy_s() -> anyhow::Result<f64> {
    let (busy, _) = procfs::machine_cpu_ticks().context("reading /proc/stat")?;
    Ok(busy as f64 / procfs::USER_HZ)
}

fn per(x: f64, n: u64) -> f64 {
    if n > 0 { x / n as f64 } else { 0.0 }
}

/// Runs the load part on a fresh deployment.
pub async fn run(ctx: &Ctx) -> anyhow::Result<LoadPart> {
    let mut sys = ctx
        .start(&SystemOptions {
            workers: 0,
            worker_concurrency: WORKER_CONCURRENCY,
            ..Default::default()
        })
        .await?;
    let logs = match LogDir::new() {
        Ok(logs) => logs,
        Err(e) => {
            sys.stop().await;
            return Err(e);
        }
    };
    let r = measure(ctx, &mut sys, &logs).await;
    sys.stop().await;
    drop(logs);
    r
}

async fn measure(ctx: &Ctx, sys: &mut System, logs: &LogDir) -> anyhow::Result<LoadPart> {
    let clients = if ctx.quick { 4 } else { 32 };
    let d = ctx.duration;
    println!(
        "instrumentation: 3 apis (info JSON, off, off again) × {clients} clients, {d:?}; \
         then 3 workers (info JSON, off, off again) drain the backlog"
    );
    let mut apis = Vec::new();
    for (name, settings) in [
        ("api-on.log", ON),
        ("api-off.log", OFF),
        ("api-off-again.log", OFF),
    ] {
        let (url, pid) = sys
            .start_extra_api(&ctx.http, &env(&settings), logs.stderr(name)?)
            .await
            .with_context(|| format!("its log: {}", logs.tail(name)))?;
        let target = Target {
            http: ctx.http.clone(),
            url,
            key: sys.key.clone(),
        };
        apis.push((name, settings, target, pid.context("an api has no pid")?));
    }
    // Warm-up: connections, pools, caches, page-cold code.
    let warmup = futures_util::future::join_all(
        apis.iter()
            .map(|(_, _, t, _)| submit_load(t, clients, Duration::from_secs(1))),
    )
    .await;

    let cpu0: Vec<f64> = apis.iter().map(|a| cpu(a.3)).collect::<Result<_, _>>()?;
    let m0 = machine_busy_s()?;
    let t0 = Instant::now();
    let loads =
        futures_util::future::join_all(apis.iter().map(|(_, _, t, _)| submit_load(t, clients, d)))
            .await;
    let submit_s = t0.elapsed().as_secs_f64();
    let m1 = machine_busy_s()?;
    let cpu1: Vec<f64> = apis.iter().map(|a| cpu(a.3)).collect::<Result<_, _>>()?;
    let submitted: u64 = loads.iter().map(|l| l.ok).sum();
    if submitted == 0 {
        bail!("no submission was accepted");
    }

    // The workers, started on the backlog while the queue is paused.
    sys.set_paused(&ctx.http, true).await?;
    let mut workers = Vec::new();
    for (name, settings) in [
        ("worker-on.log", ON),
        ("worker-off.log", OFF),
        ("worker-off-again.log", OFF),
    ] {
        let (pid, metrics_url) = sys
            .start_watched_worker(&env(&settings), logs.stderr(name)?)
            .await
            .with_context(|| format!("its log: {}", logs.tail(name)))?;
        workers.push(Worker {
            log: name,
            settings,
            pid: pid.context("a worker has no pid")?,
            metrics_url,
        });
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let w_t0 = Instant::now();
    sys.set_paused(&ctx.http, false).await?;
    let mut samples = Vec::new();
    let deadline = w_t0 + Duration::from_secs(300);
    loop {
        samples.push(sample(&ctx.http, &workers).await?);
        let busy: i64 =
            sqlx::query_scalar("select count(*) from jobs where status in ('queued', 'running')")
                .fetch_one(&sys.db)
                .await?;
        if busy == 0 || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    let drain_s = w_t0.elapsed().as_secs_f64();
    samples.push(sample(&ctx.http, &workers).await?);
    let (first, last) = steady_window(&samples);
    let (a, b) = (&samples[first], &samples[last]);
    let window_s = b.at.duration_since(a.at).as_secs_f64();
    let done: Vec<u64> = (0..workers.len()).map(|i| b.jobs[i] - a.jobs[i]).collect();
    let wcpu: Vec<f64> = (0..workers.len()).map(|i| b.cpu[i] - a.cpu[i]).collect();
    let machine_drain = b.machine - a.machine;
    let total_done: Vec<u64> = samples.last().map_or_else(Vec::new, |s| s.jobs.clone());
    let (jobs_total, jobs_succeeded): (i64, i64) =
        sqlx::query_as("select count(*), count(*) filter (where status = 'succeeded') from jobs")
            .fetch_one(&sys.db)
            .await?;

    let mut processes = Vec::new();
    for (i, ((name, settings, _, _), load)) in apis.iter().zip(&loads).enumerate() {
        let cpu_s = cpu1[i] - cpu0[i];
        processes.push(Process {
            what: "api".into(),
            rust_log: rust_log(settings),
            ops: load.ok,
            ops_total: load.ok + warmup[i].ok,
            ops_per_s: load.ok_per_s,
            cpu_s,
            cpu_us_per_op: per(cpu_s * 1e6, load.ok),
            log_bytes_per_op: per(logs.size(name) as f64, load.ok),
            p50_ms: Some(load.latency.p50_ms),
            errors: Some(load.errors_text()),
        });
    }
    for (i, (w, jobs)) in workers.iter().zip(&done).enumerate() {
        let cpu_s = wcpu[i];
        processes.push(Process {
            what: "worker".into(),
            rust_log: rust_log(&w.settings),
            ops: *jobs,
            ops_total: total_done.get(i).copied().unwrap_or(0),
            ops_per_s: *jobs as f64 / window_s.max(1e-9),
            cpu_s,
            cpu_us_per_op: per(cpu_s * 1e6, *jobs),
            log_bytes_per_op: per(
                logs.size(w.log) as f64,
                total_done.get(i).copied().unwrap_or(0),
            ),
            p50_ms: None,
            errors: None,
        });
    }
    let completed: u64 = done.iter().sum();
    Ok(LoadPart {
        clients_per_api: clients,
        submit_s,
        processes,
        submitted,
        machine_cpu_s_submit: m1 - m0,
        machine_cpu_us_per_submit: per((m1 - m0) * 1e6, submitted),
        worker_concurrency: WORKER_CONCURRENCY,
        drain_s,
        window_s,
        completed,
        machine_cpu_s_drain: machine_drain,
        machine_cpu_us_per_job: per(machine_drain * 1e6, completed),
        jobs_total: jobs_total as u64,
        jobs_succeeded: jobs_succeeded as u64,
    })
}

/// A worker under measurement.
struct Worker {
    /// Its log file's name.
    log: &'static str,
    settings: [(&'static str, &'static str); 2],
    pid: u32,
    metrics_url: String,
}

/// How often the drain is sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// The workers' CPU time and completed jobs, and the machine's busy time,
/// at one instant.
struct Sample {
    at: Instant,
    cpu: Vec<f64>,
    jobs: Vec<u64>,
    machine: f64,
}

async fn sample(http: &reqwest::Client, workers: &[Worker]) -> anyhow::Result<Sample> {
    let mut jobs = Vec::with_capacity(workers.len());
    for w in workers {
        jobs.push(succeeded(http, &w.metrics_url).await?);
    }
    Ok(Sample {
        at: Instant::now(),
        cpu: workers
            .iter()
            .map(|w| cpu(w.pid))
            .collect::<Result<_, _>>()?,
        jobs,
        machine: machine_busy_s()?,
    })
}

/// The samples bounding the drain's steady part: from the first sample by
/// which every worker had started completing jobs to the last one before
/// any of them ran out (each completed jobs in every interval between);
/// the whole drain if there is no such part.
fn steady_window(samples: &[Sample]) -> (usize, usize) {
    let busy = |i: usize| {
        i > 0
            && samples[i]
                .jobs
                .iter()
                .zip(&samples[i - 1].jobs)
                .all(|(now, before)| now > before)
    };
    let first = (1..samples.len()).find(|&i| busy(i));
    let last = (1..samples.len()).rev().find(|&i| busy(i));
    match (first, last) {
        (Some(a), Some(b)) if b > a + 1 => (a, b - 1),
        _ => (0, samples.len().saturating_sub(1)),
    }
}

/// `chatq_worker_jobs_total{outcome="succeeded"}` of a worker's `/metrics`.
async fn succeeded(http: &reqwest::Client, url: &str) -> anyhow::Result<u64> {
    let text = http
        .get(url)
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .with_context(|| format!("scraping {url}"))?
        .text()
        .await
        .with_context(|| format!("reading {url}"))?;
    let prefix = r#"chatq_worker_jobs_total{outcome="succeeded"} "#;
    let value = text
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .map_or(Ok(0.0), |v| v.trim().parse::<f64>())
        .with_context(|| format!("parsing the succeeded jobs of {url}"))?;
    Ok(value as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(jobs: &[[u64; 2]]) -> Vec<Sample> {
        jobs.iter()
            .map(|j| Sample {
                at: Instant::now(),
                cpu: vec![0.0, 0.0],
                jobs: j.to_vec(),
                machine: 0.0,
            })
            .collect()
    }

    #[test]
    fn the_window_is_where_both_workers_complete_jobs() {
        // Worker 2 starts late, worker 1 finishes early.
        let s = at(&[
            [0, 0],
            [5, 0],
            [9, 3],
            [14, 8],
            [19, 13],
            [20, 18],
            [20, 19],
        ]);
        assert_eq!(steady_window(&s), (2, 4));
        // No steady part: the whole drain.
        let s = at(&[[0, 0], [5, 0], [9, 0]]);
        assert_eq!(steady_window(&s), (0, 2));
    }
}
