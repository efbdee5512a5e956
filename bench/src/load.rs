//! The load driver: C tasks calling an async operation in a loop, for a
//! fixed duration or a fixed number of operations, with every latency
//! recorded (microseconds) and errors counted by kind.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

/// What one operation ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Success.
    Ok,
    /// A failure, named (e.g. `"503"`, `"timeout"`, `"connect"`).
    Err(String),
}

impl Outcome {
    /// The outcome of an HTTP status: 2xx is success, else the status code.
    pub fn from_status(status: u16) -> Self {
        if (200..300).contains(&status) {
            Self::Ok
        } else {
            Self::Err(status.to_string())
        }
    }

    /// The outcome of a transport error.
    pub fn from_reqwest(err: &reqwest::Error) -> Self {
        if err.is_timeout() {
            Self::Err("timeout".into())
        } else if err.is_connect() {
            Self::Err("connect".into())
        } else {
            Self::Err("transport".into())
        }
    }
}

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    /// Samples.
    pub count: usize,
    /// Median.
    pub p50_ms: f64,
    /// 95th percentile.
    pub p95_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Maximum.
    pub max_ms: f64,
}

/// Percentiles of latencies given in microseconds (nearest rank).
pub fn percentiles(samples_us: &mut [u64]) -> Percentiles {
    if samples_us.is_empty() {
        return Percentiles::default();
    }
    samples_us.sort_unstable();
    let at = |q: f64| -> f64 {
        let rank = ((q * samples_us.len() as f64).ceil() as usize).clamp(1, samples_us.len());
        samples_us[rank - 1] as f64 / 1000.0
    };
    Percentiles {
        count: samples_us.len(),
        p50_ms: at(0.50),
        p95_ms: at(0.95),
        p99_ms: at(0.99),
        max_ms: at(1.0),
    }
}

/// The result of one load run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadResult {
    /// Concurrent clients.
    pub clients: usize,
    /// Wall time of the run, seconds.
    pub elapsed_s: f64,
    /// Successful operations.
    pub ok: u64,
    /// Successful operations per second.
    pub ok_per_s: f64,
    /// Failures by kind.
    pub errors: BTreeMap<String, u64>,
    /// Latency of successful operations.
    pub latency: Percentiles,
}

impl LoadResult {
    /// Failures, all kinds.
    pub fn error_total(&self) -> u64 {
        self.errors.values().sum()
    }

    /// `"503: 2, timeout: 1"` or `"none"`.
    pub fn errors_text(&self) -> String {
        if self.errors.is_empty() {
            return "none".into();
        }
        let parts: Vec<String> = self
            .errors
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        parts.join(", ")
    }
}

/// When a run stops.
#[derive(Debug, Clone, Copy)]
pub enum Stop {
    /// After this long (operations in flight finish and count).
    After(Duration),
    /// After this many operations in total (started).
    Count(u64),
}

/// Runs `op(client, seq)` from `clients` tasks until `stop`. `seq` is the
/// global index of the operation (0, 1, 2, ...).
pub async fn run<F, Fut>(clients: usize, stop: Stop, op: F) -> LoadResult
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(clients);
    for client in 0..clients {
        let op = Arc::clone(&op);
        let next = Arc::clone(&next);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            loop {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                let done = match stop {
                    Stop::After(d) => start.elapsed() >= d,
                    Stop::Count(n) => seq >= n,
                };
                if done {
                    break;
                }
                let t = Instant::now();
                match op(client, seq).await {
                    Outcome::Ok => lat.push(t.elapsed().as_micros() as u64),
                    Outcome::Err(kind) => *errors.entry(kind).or_default() += 1,
                }
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for t in tasks {
        match t.await {
            Ok((lat, errs)) => {
                all.extend(lat);
                for (k, v) in errs {
                    *errors.entry(k).or_default() += v;
                }
            }
            Err(_) => *errors.entry("task_panicked".into()).or_default() += 1,
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let ok = all.len() as u64;
    LoadResult {
        clients,
        elapsed_s: elapsed,
        ok,
        ok_per_s: if elapsed > 0.0 {
            ok as f64 / elapsed
        } else {
            0.0
        },
        errors,
        latency: percentiles(&mut all),
    }
}

/// Prints a table: a header row and rows of cells, columns padded.
pub fn print_table(title: &str, header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    println!("\n== {title}");
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:>w$}", w = widths.get(i).copied().unwrap_or(0)))
            .collect();
        println!("  {}", padded.join("  "));
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_nearest_rank() {
        let mut v: Vec<u64> = (1..=100).map(|i| i * 1000).collect();
        let p = percentiles(&mut v);
        assert_eq!(p.count, 100);
        assert!((p.p50_ms - 50.0).abs() < 1e-9);
        assert!((p.p99_ms - 99.0).abs() < 1e-9);
        assert!((p.max_ms - 100.0).abs() < 1e-9);
        assert_eq!(percentiles(&mut []).count, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn run_counts_exactly() {
        let r = run(4, Stop::Count(37), |_, seq| async move {
            if seq % 10 == 0 {
                Outcome::Err("x".into())
            } else {
                Outcome::Ok
            }
        })
        .await;
        assert_eq!(r.ok + r.error_total(), 37);
        assert_eq!(r.errors.get("x"), Some(&4));
    }
}
