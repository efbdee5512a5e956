//! `chatq-bench`: chatq's load benchmark. Each subcommand is a scenario;
//! `all` runs them in order and writes `REPORT.md`, an SVG beside it, and
//! the raw results as JSON.
//!
//! It starts its own deployments (fresh database and queue prefix each)
//! from the `chatq-api`, `chatq-worker` and `chatq-mock-llm` binaries found
//! next to its own executable, so
//! `cargo build --release --workspace --bins && target/release/chatq-bench all`
//! measures release builds.

mod baseline;
mod ctx;
mod load;
mod procfs;
mod report;
mod report_md;
mod scenarios;
mod sse;
mod svg;
mod system;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use serde::Serialize;

use ctx::{Ctx, External};
use report::AllResults;
use scenarios::{
    burst, concurrency, facade, flow, instrumentation, overhead, reads, scaling, stream, submit,
};
use system::Infra;

/// chatq load benchmark.
#[derive(Debug, Parser)]
#[command(name = "chatq-bench", about)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
    /// Tiny sizes: finishes in seconds (smoke test).
    #[arg(long, global = true)]
    quick: bool,
    /// Where the raw JSON results go.
    #[arg(long, global = true, default_value = "bench/out")]
    out: PathBuf,
    /// Where `all` writes the report (the SVG goes beside it).
    #[arg(long, global = true, default_value = "bench/REPORT.md")]
    report: PathBuf,
    /// Run against this already running api instead of starting one.
    #[arg(long, global = true, requires = "admin_token")]
    url: Option<String>,
    /// Admin token of the `--url` api.
    #[arg(long, global = true)]
    admin_token: Option<String>,
    /// Submissions per burst run (default 20,000; quick 200).
    #[arg(long, global = true)]
    burst: Option<u64>,
    /// Seconds per timed load run (default 10; quick 1).
    #[arg(long, global = true)]
    duration: Option<u64>,
    /// PostgreSQL server (no database).
    #[arg(
        long,
        global = true,
        env = "CHATQ_BENCH_PG_URL",
        default_value = "postgres://postgres@127.0.0.1:5432"
    )]
    pg_url: String,
    /// RabbitMQ.
    #[arg(
        long,
        global = true,
        env = "CHATQ_BENCH_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Subcommand)]
enum Scenario {
    /// Accepted submissions/s vs PostgreSQL and RabbitMQ limits.
    Submit,
    /// End-to-end latency minus the LLM's.
    Overhead,
    /// A burst of N submissions with 1, 2, 4 workers: lost, duplicates, drain time.
    Burst,
    /// One worker at 2,000 concurrency: completions/s and RSS.
    Concurrency,
    /// GET /v1/jobs/{id} requests/s.
    Reads,
    /// Completions/s with 1, 2, 4 workers.
    Scaling,
    /// Event streams: time to first token, subscribers held, deltas/s, resume.
    Stream,
    /// The OpenAI-compatible facade: overhead vs the mock called directly, and a burst of 1,000.
    Facade,
    /// Flow control: 429s and goodput at a saturated budget, fairness, lanes, queue ETA.
    Flow,
    /// Cost of metrics, spans and logs per submit and per job, against the
    /// real cost of each; also replaces its section of the report.
    Instrumentation,
    /// Internal: the in-process half of `instrumentation`, in a child process.
    #[command(hide = true)]
    InstrumentationMicro,
    /// Every scenario, then the report.
    All,
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    if let Err(err) = try_main().await {
        eprintln!("chatq-bench: {err:#}");
        std::process::exit(1);
    }
}

async fn try_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if cli.scenario == Scenario::InstrumentationMicro {
        // Its stderr carries the logs being measured: errors go to stdout.
        if let Err(err) = instrumentation::micro::child_main(cli.quick) {
            println!("error: {err:#}");
            std::process::exit(1);
        }
        return Ok(());
    }
    let external = match (&cli.url, &cli.admin_token) {
        (Some(url), Some(token)) => Some(External {
            url: url.trim_end_matches('/').to_owned(),
            admin_token: token.clone(),
        }),
        _ => None,
    };
    let burst_n = cli.burst.unwrap_or(if cli.quick { 200 } else { 20_000 });
    let duration = Duration::from_secs(cli.duration.unwrap_or(if cli.quick { 1 } else { 10 }));
    let infra = Infra {
        pg_url: cli.pg_url.trim_end_matches('/').to_owned(),
        amqp_url: cli.amqp_url.clone(),
    };
    let ctx = Ctx::new(
        cli.quick,
        infra,
        external,
        burst_n,
        duration,
        cli.out.clone(),
    )?;
    std::fs::create_dir_all(&ctx.out).with_context(|| format!("creating {}", ctx.out.display()))?;
    match cli.scenario {
        Scenario::Submit => save(&ctx.out, "submit", &submit::run(&ctx).await?),
        Scenario::Overhead => save(&ctx.out, "overhead", &overhead::run(&ctx).await?),
        Scenario::Burst => save(&ctx.out, "burst", &burst::run(&ctx).await?),
        Scenario::Concurrency => save(&ctx.out, "concurrency", &concurrency::run(&ctx).await?),
        Scenario::Reads => save(&ctx.out, "reads", &reads::run(&ctx).await?),
        Scenario::Scaling => save(&ctx.out, "scaling", &scaling::run(&ctx).await?),
        Scenario::Stream => save(&ctx.out, "stream", &stream::run(&ctx).await?),
        Scenario::Facade => save(&ctx.out, "facade", &facade::run(&ctx).await?),
        Scenario::Flow => save(&ctx.out, "flow", &flow::run(&ctx).await?),
        Scenario::Instrumentation => {
            let r = instrumentation::run(&ctx).await?;
            save(&ctx.out, "instrumentation", &r)?;
            instrumentation::write_report_section(&r, &cli.report)?;
            println!(
                "\nreport section \"{}\" written to {}",
                instrumentation::HEADING.trim_start_matches("## "),
                cli.report.display()
            );
            Ok(())
        }
        Scenario::InstrumentationMicro => Ok(()),
        Scenario::All => all(&ctx, &cli.report).await,
    }
}

/// Writes `<out>/<name>.json`.
fn save<T: Serialize>(out: &Path, name: &str, value: &T) -> anyhow::Result<()> {
    let path = out.join(format!("{name}.json"));
    let json = serde_json::to_string_pretty(value)?;
    std::fs::write(&path, json).with_context(|| format!("writing {}", path.display()))
}

/// Runs a scenario for `all`: records the result, or the failure, or the skip.
async fn step<T, Fut>(
    ctx: &Ctx,
    r: &mut AllResults,
    name: &str,
    needs_own_system: bool,
    fut: impl FnOnce() -> Fut,
) -> Option<T>
where
    T: Serialize,
    Fut: Future<Output = anyhow::Result<T>>,
{
    if needs_own_system && ctx.external.is_some() {
        r.skipped.push(format!(
            "{name}: it starts and stops workers or sets the mock latency, which --url cannot"
        ));
        return None;
    }
    let t = Instant::now();
    match fut().await {
        Ok(v) => {
            if let Err(e) = save(&ctx.out, name, &v) {
                r.failed.push(format!("{name}: saving the result: {e:#}"));
            }
            println!("({name} took {:.1} s)", t.elapsed().as_secs_f64());
            Some(v)
        }
        Err(e) => {
            eprintln!("chatq-bench: scenario {name} failed: {e:#}");
            r.failed.push(format!("{name}: {e:#}"));
            None
        }
    }
}

async fn all(ctx: &Ctx, report_path: &Path) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut r = AllResults {
        started_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        command_line: report::command_line(),
        profile: report::profile().into(),
        quick: ctx.quick,
        machine: report::machine(&ctx.infra.pg_url).await,
        ..Default::default()
    };
    r.submit = step(ctx, &mut r, "submit", false, || submit::run(ctx)).await;
    r.overhead = step(ctx, &mut r, "overhead", true, || overhead::run(ctx)).await;
    r.burst = step(ctx, &mut r, "burst", true, || burst::run(ctx)).await;
    r.concurrency = step(ctx, &mut r, "concurrency", true, || concurrency::run(ctx)).await;
    r.reads = step(ctx, &mut r, "reads", false, || reads::run(ctx)).await;
    r.scaling = step(ctx, &mut r, "scaling", true, || scaling::run(ctx)).await;
    r.stream = step(ctx, &mut r, "stream", true, || stream::run(ctx)).await;
    r.facade = step(ctx, &mut r, "facade", true, || facade::run(ctx)).await;
    r.flow = step(ctx, &mut r, "flow", true, || flow::run(ctx)).await;
    r.instrumentation = step(ctx, &mut r, "instrumentation", true, || {
        instrumentation::run(ctx)
    })
    .await;
    r.total_s = start.elapsed().as_secs_f64();
    save(&ctx.out, "results", &r)?;
    report::write(&r, report_path)?;
    println!(
        "\nreport: {}  raw results: {}",
        report_path.display(),
        ctx.out.display()
    );
    println!("all took {:.0} s", r.total_s);
    if !r.failed.is_empty() {
        bail!(
            "{} scenario(s) failed: {}",
            r.failed.len(),
            r.failed.join("; ")
        );
    }
    Ok(())
}
