//! `submit`: accepted submissions/s at C clients, against the machine's own
//! limits at the same concurrency (PostgreSQL INSERT+COMMIT/s, RabbitMQ
//! confirmed publishes/s), and the load generator's own ceiling.

use std::time::Duration;

use serde::Serialize;

use crate::baseline;
use crate::ctx::{Ctx, Target, wait_idle};
use crate::load::{self, LoadResult, Outcome, Stop};
use crate::scenarios::{Table, f};
use crate::system::{self, System, SystemOptions};

/// One concurrency level.
#[derive(Debug, Clone, Serialize)]
pub struct SubmitRow {
    /// Concurrent clients.
    pub clients: usize,
    /// `POST /v1/chat` against chatq, no worker running: the queue absorbs
    /// (against `--url`, whatever that deployment runs).
    pub chatq: LoadResult,
    /// The same with two workers draining the queue on the same machine.
    pub with_workers: Option<LoadResult>,
    /// Single-row INSERT+COMMIT on PostgreSQL.
    pub pg_insert: LoadResult,
    /// Confirmed persistent publishes on RabbitMQ.
    pub rabbit_publish: LoadResult,
    /// The lower of the two limits, per second.
    pub limit_per_s: f64,
    /// chatq accepted/s divided by `limit_per_s`.
    pub ratio: f64,
    /// Accepted/s with two workers draining, divided by `limit_per_s`.
    pub ratio_with_workers: Option<f64>,
}

/// The scenario's result.
#[derive(Debug, Clone, Serialize)]
pub struct SubmitResult {
    /// Per concurrency level.
    pub rows: Vec<SubmitRow>,
    /// `GET /healthz` at 64 clients: the load generator's ceiling.
    pub healthz: LoadResult,
    /// Seconds per timed run.
    pub duration_s: f64,
}

/// Runs the scenario.
pub async fn run(ctx: &Ctx) -> anyhow::Result<SubmitResult> {
    if let Some(target) = ctx.external_target().await? {
        let (db_name, db_url) = system::create_database(&ctx.infra).await?;
        let r = measure(ctx, &target, &db_url, None).await;
        system::drop_database(&ctx.infra, &db_name).await;
        return r;
    }
    let mut sys = ctx
        .start(&SystemOptions {
            workers: 0,
            ..Default::default()
        })
        .await?;
    let target = ctx.target(&sys);
    let db_url = sys.db_url.clone();
    let r = measure(ctx, &target, &db_url, Some(&mut sys)).await;
    sys.stop().await;
    r
}

async fn measure(
    ctx: &Ctx,
    target: &Target,
    db_url: &str,
    mut sys: Option<&mut System>,
) -> anyhow::Result<SubmitResult> {
    let levels: &[usize] = if ctx.quick { &[4, 8] } else { &[16, 64, 256] };
    let d = ctx.duration;
    let mut rows = Vec::new();
    for &c in levels {
        println!(
            "submit: {c} clients, {d:?} each for chatq, chatq with 2 workers, PostgreSQL, RabbitMQ"
        );
        let chatq = submit_load(target, c, d).await;
        let with_workers = match sys.as_deref_mut() {
            Some(sys) => Some(with_two_workers(sys, target, c, d).await?),
            None => None,
        };
        let pg_insert = baseline::pg_inserts(db_url, c, d).await?;
        let rabbit_publish = baseline::rabbit_publishes(&ctx.infra.amqp_url, c, d).await?;
        let limit = pg_insert.ok_per_s.min(rabbit_publish.ok_per_s);
        let ratio_of = |r: &LoadResult| if limit > 0.0 { r.ok_per_s / limit } else { 0.0 };
        rows.push(SubmitRow {
            clients: c,
            ratio: ratio_of(&chatq),
            ratio_with_workers: with_workers.as_ref().map(ratio_of),
            chatq,
            with_workers,
            pg_insert,
            rabbit_publish,
            limit_per_s: limit,
        });
    }
    let hc = if ctx.quick { 8 } else { 64 };
    let http = target.http.clone();
    let url = format!("{}/healthz", target.url);
    let healthz = load::run(hc, Stop::After(d), move |_, _| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            match http.get(&url).send().await {
                Ok(r) => {
                    let s = r.status().as_u16();
                    let _ = r.bytes().await;
                    Outcome::from_status(s)
                }
                Err(e) => Outcome::from_reqwest(&e),
            }
        }
    })
    .await;
    let result = SubmitResult {
        rows,
        healthz,
        duration_s: d.as_secs_f64(),
    };
    print(&result);
    Ok(result)
}

/// From an empty queue, C clients submitting while two workers drain; then
/// the backlog is finished and the workers stopped, so the baselines that
/// follow have the machine to themselves.
async fn with_two_workers(
    sys: &mut System,
    target: &Target,
    clients: usize,
    d: Duration,
) -> anyhow::Result<LoadResult> {
    sys.reset().await?;
    sys.start_workers(2)?;
    let r = submit_load(target, clients, d).await;
    wait_idle(&sys.db, Duration::from_secs(120)).await?;
    sys.stop_workers().await;
    sys.reset().await?;
    Ok(r)
}

/// C tasks submitting to fresh conversations (`POST /v1/chat`) for `d`.
pub async fn submit_load(target: &Target, clients: usize, d: Duration) -> LoadResult {
    let t = target.clone();
    load::run(clients, Stop::After(d), move |client, seq| {
        let t = t.clone();
        async move {
            match t
                .submit(
                    &format!("bench {client} {seq}"),
                    Some(Duration::from_secs(30)),
                )
                .await
            {
                Ok(s) => Outcome::from_status(s.status),
                Err(e) => Outcome::from_reqwest(&e),
            }
        }
    })
    .await
}

impl SubmitResult {
    /// The per-concurrency table, for stdout and the report.
    pub fn table(&self) -> Table {
        let rows = self
            .rows
            .iter()
            .map(|row| {
                vec![
                    row.clients.to_string(),
                    f(row.chatq.ok_per_s, 0),
                    f(row.chatq.latency.p50_ms, 1),
                    f(row.chatq.latency.p95_ms, 1),
                    f(row.chatq.latency.p99_ms, 1),
                    row.chatq.errors_text(),
                    row.with_workers
                        .as_ref()
                        .map_or_else(|| "-".into(), |r| f(r.ok_per_s, 0)),
                    format!(
                        "{} ({} conns)",
                        f(row.pg_insert.ok_per_s, 0),
                        row.pg_insert.clients
                    ),
                    f(row.rabbit_publish.ok_per_s, 0),
                    format!("{:.0}%", row.ratio * 100.0),
                    row.ratio_with_workers
                        .map_or_else(|| "-".into(), |r| format!("{:.0}%", r * 100.0)),
                ]
            })
            .collect();
        Table {
            headers: &[
                "clients",
                "accepted/s",
                "p50 ms",
                "p95 ms",
                "p99 ms",
                "errors",
                "accepted/s, 2 workers draining",
                "INSERT+COMMIT/s",
                "confirmed publishes/s",
                "ratio",
                "ratio, 2 workers draining",
            ],
            rows,
        }
    }
}

fn print(r: &SubmitResult) {
    r.table()
        .print("submit: POST /v1/chat accepted/s vs the machine's limits");
    println!(
        "  load generator ceiling: GET /healthz at {} clients: {:.0} req/s (p50 {:.2} ms, p99 {:.2} ms, errors {})",
        r.healthz.clients,
        r.healthz.ok_per_s,
        r.healthz.latency.p50_ms,
        r.healthz.latency.p99_ms,
        r.healthz.errors_text()
    );
}
