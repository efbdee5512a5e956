//! The results of `all`, the machine they were measured on, the targets,
//! and the Markdown report with its SVG picture.

use std::fmt::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use crate::scenarios::{
    burst, concurrency, facade, flow, instrumentation, overhead, reads, scaling, stream, submit,
};
use crate::svg::{self, Panel};

/// The machine the run happened on.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Machine {
    /// Logical CPUs.
    pub cpus: usize,
    /// `MemTotal` from /proc/meminfo, MB.
    pub memory_mb: u64,
    /// PostgreSQL `select version()`.
    pub postgres: String,
    /// PostgreSQL durability settings (`synchronous_commit`, `fsync`, `max_connections`).
    pub postgres_settings: String,
    /// `rabbitmqctl version`.
    pub rabbitmq: String,
}

/// Everything `all` measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AllResults {
    /// When the run started (RFC 3339).
    pub started_at: String,
    /// The exact command line.
    pub command_line: String,
    /// `release` or `debug` (of the bench binary; the others come from the same build).
    pub profile: String,
    /// Tiny sizes (`--quick`).
    pub quick: bool,
    /// The machine.
    pub machine: Machine,
    /// Scenario 1.
    pub submit: Option<submit::SubmitResult>,
    /// Scenario 2.
    pub overhead: Option<overhead::OverheadResult>,
    /// Scenario 3.
    pub burst: Option<burst::BurstResult>,
    /// Scenario 4.
    pub concurrency: Option<concurrency::ConcurrencyResult>,
    /// Scenario 5.
    pub reads: Option<reads::ReadsResult>,
    /// Scenario 6.
    pub scaling: Option<scaling::ScalingResult>,
    /// Scenario 7.
    pub stream: Option<stream::StreamResult>,
    /// Scenario 8.
    pub facade: Option<facade::FacadeResult>,
    /// Scenario 9.
    pub flow: Option<flow::FlowResult>,
    /// Scenario 10.
    pub instrumentation: Option<instrumentation::InstrumentationResult>,
    /// Scenarios not run, with why.
    pub skipped: Vec<String>,
    /// Scenarios that failed, with the error.
    pub failed: Vec<String>,
    /// Wall time of the whole run, seconds.
    pub total_s: f64,
}

/// Probes the machine (best effort, never fails).
pub async fn machine(pg_url: &str) -> Machine {
    let memory_mb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let line = m.lines().find(|l| l.starts_with("MemTotal:"))?.to_owned();
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kb| kb / 1024);
    let postgres = async {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&format!("{pg_url}/postgres"))
            .await?;
        let v: String = sqlx::query_scalar("select version()")
            .fetch_one(&pool)
            .await?;
        let settings: String = sqlx::query_scalar(
            "select string_agg(name || ' = ' || setting, ', ' order by name) from pg_settings
             where name in ('synchronous_commit', 'fsync', 'max_connections', 'shared_buffers')",
        )
        .fetch_one(&pool)
        .await?;
        pool.close().await;
        Ok::<_, anyhow::Error>((v, settings))
    }
    .await
    .unwrap_or_else(|e| (format!("unknown ({e})"), "unknown".into()));
    let (postgres, postgres_settings) = postgres;
    let rabbitmq = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new("rabbitmqctl")
            .arg("version")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .ok()
    .and_then(Result::ok)
    .filter(|o| o.status.success())
    .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    .filter(|v| !v.is_empty())
    .unwrap_or_else(|| "unknown (rabbitmqctl version failed)".into());
    Machine {
        cpus: std::thread::available_parallelism().map_or(0, usize::from),
        memory_mb,
        postgres,
        postgres_settings,
        rabbitmq,
    }
}

/// One target: what, the figure, met or not (`None`: not measured).
pub struct Target {
    /// The target as stated.
    pub what: String,
    /// What was measured.
    pub measured: String,
    /// Met?
    pub met: Option<bool>,
}

/// Evaluates the targets (they are reported, never asserted).
pub fn targets(r: &AllResults) -> Vec<Target> {
    let mut t = Vec::new();
    let row64 = r.submit.as_ref().and_then(|s| {
        s.rows
            .iter()
            .find(|row| row.clients == 64)
            .or_else(|| s.rows.last())
    });
    t.push(match row64 {
        Some(row) => {
            let ratio = row.chatq.ok_per_s / row.pg_insert.ok_per_s.max(1e-9);
            Target {
                what: "submit/s at 64 clients ≥ 50% of the INSERT+COMMIT limit".into(),
                measured: format!(
                    "{:.0}/s vs {:.0}/s at {} clients = {:.0}%",
                    row.chatq.ok_per_s,
                    row.pg_insert.ok_per_s,
                    row.clients,
                    ratio * 100.0
                ),
                met: Some(ratio >= 0.5),
            }
        }
        None => missing("submit/s at 64 clients ≥ 50% of the INSERT+COMMIT limit"),
    });
    let light = r.overhead.as_ref().and_then(|o| o.rows.first());
    t.push(match light {
        Some(l) => Target {
            what: "overhead at light load: p50 < 5 ms and p99 < 25 ms".into(),
            measured: format!(
                "p50 {:.1} ms, p99 {:.1} ms",
                l.overhead_p50_ms, l.overhead_p99_ms
            ),
            met: Some(l.overhead_p50_ms < 5.0 && l.overhead_p99_ms < 25.0 && l.e2e.ok > 0),
        },
        None => missing("overhead at light load: p50 < 5 ms and p99 < 25 ms"),
    });
    t.push(match &r.burst {
        Some(b) => {
            let sum = |f: fn(&burst::BurstRun) -> u64| b.runs.iter().map(f).sum::<u64>();
            let (lost, dup, to, e5) = (
                sum(|x| x.lost),
                sum(|x| x.duplicates),
                sum(|x| x.timeouts),
                sum(|x| x.status_5xx),
            );
            Target {
                what: "burst: 0 lost, 0 duplicates, 0 timeouts, 0 5xx".into(),
                measured: format!(
                    "{lost} lost, {dup} duplicates, {to} timeouts, {e5} 5xx over {} runs",
                    b.runs.len()
                ),
                met: Some(lost + dup + to + e5 == 0),
            }
        }
        None => missing("burst: 0 lost, 0 duplicates, 0 timeouts, 0 5xx"),
    });
    t.push(match &r.concurrency {
        Some(c) => Target {
            what: "one worker ≥ 1,500 completions/s at concurrency 2,000 and 1 s mock latency, RSS < 150 MB".into(),
            measured: format!(
                "{:.0} completions/s, peak RSS {:.1} MB",
                c.completions_per_s, c.worker_peak_rss_mb
            ),
            met: Some(c.completions_per_s >= 1500.0 && c.worker_peak_rss_mb < 150.0),
        },
        None => missing("one worker ≥ 1,500 completions/s at concurrency 2,000, RSS < 150 MB"),
    });
    stream_targets(r, &mut t);
    facade_targets(r, &mut t);
    match &r.flow {
        Some(x) => t.extend(x.targets().into_iter().map(|f| Target {
            what: f.what,
            measured: f.measured,
            met: Some(f.met),
        })),
        None => t.push(missing("flow: 429s < 1%, goodput ≥ 90%, Jain ≥ 0.95")),
    }
    t.push(match &r.instrumentation {
        Some(x) => {
            let (what, measured, met) = x.target();
            Target {
                what,
                measured,
                met: Some(met),
            }
        }
        None => missing(
            "instrumentation (metrics, spans, logs) < 3% of the api's CPU per submit and of the \
             worker's CPU per job",
        ),
    });
    t
}

/// The event-stream targets: TTFT overhead at light load, subscribers held.
fn stream_targets(r: &AllResults, t: &mut Vec<Target>) {
    let ttft_what = "time to first token through chatq minus the mock's, p50 < 10 ms at light load";
    let light = r.stream.as_ref().and_then(|s| s.ttft.first());
    t.push(match light {
        Some(l) => Target {
            what: ttft_what.into(),
            measured: format!(
                "{} client(s): chatq {:.1} ms − mock {:.1} ms = {:.1} ms (p99 {:.1} ms)",
                l.clients, l.chatq.p50_ms, l.mock.p50_ms, l.overhead_p50_ms, l.overhead_p99_ms
            ),
            met: Some(l.overhead_p50_ms < 10.0 && l.chatq.count > 0),
        },
        None => missing(ttft_what),
    });
    let held_what = "one api holds 10,000 event-stream subscribers, each gets `done`";
    t.push(match r.stream.as_ref().map(|s| &s.held) {
        Some(h) => Target {
            what: held_what.into(),
            measured: format!(
                "{} of {} held, {} got `done`; api RSS {:.0} → {:.0} MB",
                h.held, h.subscribers, h.done, h.rss_before_mb, h.rss_holding_mb
            ),
            met: Some(h.held >= 10_000 && h.done == h.held),
        },
        None => missing(held_what),
    });
}

/// The facade targets: overhead at light load, every burst request answered.
fn facade_targets(r: &AllResults, t: &mut Vec<Target>) {
    let overhead_what = "`/v1/chat/completions` through chatq minus the mock called directly, \
                         p50 < 10 ms at light load (plain, and streamed to the first chunk and \
                         to `[DONE]`)";
    t.push(match &r.facade {
        Some(x) if !x.light.rows.is_empty() => {
            let parts: Vec<String> = x
                .light
                .rows
                .iter()
                .map(|row| {
                    format!(
                        "{}: {:.1} ms (p99 {:.1} ms)",
                        row.what, row.overhead_p50_ms, row.overhead_p99_ms
                    )
                })
                .collect();
            Target {
                what: overhead_what.into(),
                measured: parts.join("; "),
                met: Some(
                    x.light
                        .rows
                        .iter()
                        .all(|row| row.overhead_p50_ms < 10.0 && row.chatq.count > 0),
                ),
            }
        }
        _ => missing(overhead_what),
    });
    let burst_what =
        "1,000 concurrent `/v1/chat/completions` (2 workers, 1 s mock): every one answered";
    t.push(match r.facade.as_ref().map(|x| &x.burst) {
        Some(b) => Target {
            what: burst_what.into(),
            measured: format!(
                "{} of {} answered, {:.0} requests/s over {:.2} s ({:.0}/s up to the last \
                 answer at {:.2} s), p99 {:.0} ms; errors: {}",
                b.load.ok,
                b.requests,
                b.load.ok_per_s,
                b.load.elapsed_s,
                b.answered_per_s,
                b.last_answer_s,
                b.load.latency.p99_ms,
                b.load.errors_text()
            ),
            met: Some(b.load.ok == b.requests && b.load.error_total() == 0),
        },
        None => missing(burst_what),
    });
}

fn missing(what: &str) -> Target {
    Target {
        what: what.into(),
        measured: "not measured".into(),
        met: None,
    }
}

/// The SVG: submit latency percentiles by clients, burst drain time by workers.
pub fn picture(r: &AllResults) -> Option<String> {
    let mut panels = Vec::new();
    if let Some(s) = &r.submit {
        panels.push(Panel {
            title: "submit latency (POST /v1/chat)".into(),
            x_label: "concurrent clients".into(),
            y_label: "ms".into(),
            categories: s.rows.iter().map(|x| x.clients.to_string()).collect(),
            series: vec![
                (
                    "p50".into(),
                    s.rows.iter().map(|x| x.chatq.latency.p50_ms).collect(),
                ),
                (
                    "p95".into(),
                    s.rows.iter().map(|x| x.chatq.latency.p95_ms).collect(),
                ),
                (
                    "p99".into(),
                    s.rows.iter().map(|x| x.chatq.latency.p99_ms).collect(),
                ),
            ],
        });
    }
    if let Some(b) = &r.burst {
        // The capped-queue run measures overflow, not drain time by workers.
        let runs: Vec<_> = b.runs.iter().filter(|x| x.queue_max.is_none()).collect();
        panels.push(Panel {
            title: format!("burst of {}: time to submit and drain", b.n),
            x_label: "worker processes".into(),
            y_label: "seconds".into(),
            categories: runs.iter().map(|x| x.workers.to_string()).collect(),
            series: vec![
                ("submit".into(), runs.iter().map(|x| x.submit_s).collect()),
                ("drain".into(), runs.iter().map(|x| x.drain_s).collect()),
            ],
        });
    }
    (!panels.is_empty()).then(|| svg::render(&panels))
}

/// Writes the report (and the SVG beside it, as `latency.svg`).
pub fn write(r: &AllResults, path: &Path) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let svg_name = "latency.svg";
    let has_svg = match picture(r) {
        Some(svg) => {
            std::fs::write(dir.join(svg_name), svg).context("writing the SVG")?;
            true
        }
        None => false,
    };
    let md = crate::report_md::markdown(r, has_svg.then_some(svg_name));
    std::fs::write(path, md).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Markdown cell for met / missed / not measured.
/// The command line this bench was run with.
pub fn command_line() -> String {
    std::env::args().collect::<Vec<_>>().join(" ")
}

/// The build profile of this bench binary: `debug` or `release`.
pub fn profile() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}

pub fn verdict(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "met",
        Some(false) => "**missed**",
        None => "not measured",
    }
}

/// Appends a Markdown table.
pub fn table(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let _ = writeln!(out, "| {} |", header.join(" | "));
    let _ = writeln!(out, "|{}", " --- |".repeat(header.len()));
    for row in rows {
        let _ = writeln!(out, "| {} |", row.join(" | "));
    }
    out.push('\n');
}
