//! `facade`: the OpenAI-compatible front door, `POST /v1/chat/completions`.
//!
//! 1. Overhead at light load: one client, one request at a time, the same
//!    OpenAI chat completion body (model, messages) sent straight to the
//!    mock LLM's `/v1/chat/completions` and to chatq's (bearer: a chatq API
//!    key), alternately, plain (`stream: false`: time to the whole response)
//!    and streamed (`stream: true`: time to the first chunk carrying content
//!    and to `data: [DONE]`). Overhead = chatq − direct, per percentile, the
//!    same mock (latency 0) in the same run. The two replies of a pair are
//!    also compared: chatq must hand back the mock's text unchanged.
//! 2. A burst: N (1,000) concurrent plain requests, as OpenAI SDK clients
//!    would send them, against 2 workers at concurrency 500 each and a mock
//!    answering after 1 s: requests/s (completed / wall time), latency, and
//!    every failure by kind (status and OpenAI error code, timeout,
//!    transport); then the jobs' end states in PostgreSQL.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use uuid::Uuid;

use crate::ctx::{Ctx, wait_idle};
use crate::load::{self, LoadResult, Outcome, Percentiles, Stop, percentiles};
use crate::procfs;
use crate::scenarios::{Table, f};
use crate::system::{System, SystemOptions};

/// The model named in every request (the mock answers any).
pub const MODEL: &str = "gpt-4o-mini";
/// Mock latency of the light-load part, ms: the difference is chatq's own.
pub const LIGHT_MOCK_LATENCY_MS: u64 = 0;
/// Timed rounds of the light-load part (each: one direct and one chatq
/// request of each kind).
pub const LIGHT_ROUNDS: u64 = 200;
/// Untimed rounds before them (connections, caches, the workers' own
/// connections to the mock).
pub const LIGHT_WARMUP: u64 = 20;
/// Concurrent requests of the burst.
pub const BURST_REQUESTS: u64 = 1_000;
/// Worker processes of the burst deployment.
pub const BURST_WORKERS: usize = 2;
/// `CHATQ_WORKER_CONCURRENCY` of each burst worker: room for every request.
pub const BURST_WORKER_CONCURRENCY: u32 = 500;
/// Mock latency of the burst, ms.
pub const BURST_MOCK_LATENCY_MS: u64 = 1_000;
/// Client timeout of one burst request (the OpenAI SDKs default to 600 s;
/// shorter here so a stuck request shows as a timeout in the table).
pub const BURST_CLIENT_TIMEOUT: Duration = Duration::from_secs(120);
/// The same with `--quick` (the smoke test has a deadline).
const QUICK_CLIENT_TIMEOUT: Duration = Duration::from_secs(20);
/// Header naming the chatq job behind a completion.
const JOB_ID_HEADER: &str = "x-chatq-job-id";

/// One measured figure of the light-load part, direct and through chatq.
#[derive(Debug, Clone, Serialize)]
pub struct LightRow {
    /// What was timed (`plain`, `stream: first chunk`, `stream: [DONE]`).
    pub what: String,
    /// The mock called directly.
    pub direct: Percentiles,
    /// The same request through chatq.
    pub chatq: Percentiles,
    /// chatq p50 − direct p50, ms.
    pub overhead_p50_ms: f64,
    /// chatq p99 − direct p99, ms.
    pub overhead_p99_ms: f64,
    /// The job's `started_at − created_at` (PostgreSQL's clock): the
    /// submission's commit and publish, the broker hop and the worker's claim.
    pub queue_claim: Percentiles,
    /// The job's `finished_at − started_at`: prompt read, the upstream call
    /// (the mock answers at once), the result's commit.
    pub worker: Percentiles,
    /// Pairs whose chatq text differed from the direct one.
    pub text_mismatches: u64,
    /// Failures by kind (`direct …` or `chatq …`); a failed pair is not timed.
    pub errors: BTreeMap<String, u64>,
}

/// The light-load part.
#[derive(Debug, Clone, Serialize)]
pub struct LightResult {
    /// Mock latency, ms.
    pub mock_latency_ms: u64,
    /// Worker processes.
    pub workers: usize,
    /// Untimed warm-up rounds.
    pub warmup: u64,
    /// Timed rounds.
    pub rounds: u64,
    /// The machine's CPU use over the timed rounds, % of all cores (one
    /// request at a time uses little of it: the rest is other load).
    pub machine_busy_pct: f64,
    /// Plain, then the two streamed figures.
    pub rows: Vec<LightRow>,
}

/// The burst part.
#[derive(Debug, Clone, Serialize)]
pub struct BurstResult {
    /// Concurrent requests.
    pub requests: u64,
    /// Worker processes.
    pub workers: usize,
    /// Concurrency per worker.
    pub worker_concurrency: u32,
    /// Mock latency, ms.
    pub mock_latency_ms: u64,
    /// Client timeout per request, s.
    pub client_timeout_s: u64,
    /// Completed requests, requests/s (completed / wall time), latency of
    /// the answered ones, failures by kind.
    pub load: LoadResult,
    /// First request sent → last answer read, s (the wall time without the
    /// wait for requests that never got an answer).
    pub last_answer_s: f64,
    /// Answered requests / `last_answer_s`.
    pub answered_per_s: f64,
    /// Most LLM calls in flight at the mock (sampled every 50 ms).
    pub peak_llm_in_flight: u64,
    /// First `created_at` → last `created_at` of the burst's jobs, s: how
    /// long the api took to store them all.
    pub accept_span_s: f64,
    /// First `created_at` → last `finished_at`, s.
    pub finish_span_s: f64,
    /// The deployment's jobs by status once idle (PostgreSQL).
    pub jobs_by_status: BTreeMap<String, u64>,
    /// Jobs with more than one assistant message.
    pub duplicates: u64,
    /// The burst's jobs that did not succeed: how far they got.
    pub unanswered: Unanswered,
}

/// Where the burst's jobs that did not succeed stopped (PostgreSQL).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Unanswered {
    /// Jobs not `succeeded`.
    pub jobs: u64,
    /// Of those, never claimed by a worker (`started_at` null).
    pub never_started: u64,
    /// Of those, with no publish recorded (`published_at` null).
    pub never_published: u64,
    /// Seconds from `created_at` to the recorded publish, largest.
    pub max_publish_s: f64,
}

/// The scenario's result.
#[derive(Debug, Clone, Serialize)]
pub struct FacadeResult {
    /// Overhead against the mock called directly, one client.
    pub light: LightResult,
    /// Concurrent requests against 2 workers and a 1 s mock.
    pub burst: BurstResult,
}

/// Runs the scenario (needs its own systems: it sets the mock latency).
pub async fn run(ctx: &Ctx) -> anyhow::Result<FacadeResult> {
    let light = light(ctx).await?;
    light_table(&light).print(&format!(
        "facade: POST /v1/chat/completions through chatq vs the mock directly, one client, \
         mock latency {} ms",
        light.mock_latency_ms
    ));
    let burst = burst(ctx).await?;
    let r = FacadeResult { light, burst };
    r.burst_table().print(&format!(
        "facade: {} concurrent plain completions, {} workers × {}, mock latency {} ms",
        r.burst.requests, r.burst.workers, r.burst.worker_concurrency, r.burst.mock_latency_ms
    ));
    Ok(r)
}

// ---------------------------------------------------------------- light load

/// Where the two sides of a pair go.
struct Endpoints {
    http: reqwest::Client,
    direct: String,
    chatq: String,
    key: String,
}

/// One answer: when it (and its first text) arrived, its text, its job.
struct Answer {
    /// Request sent → response complete (plain) or `data: [DONE]` (stream).
    total_us: u64,
    /// Request sent → first chunk carrying content (stream only).
    first_us: Option<u64>,
    text: String,
    job: Option<Uuid>,
}

#[derive(Default)]
struct Side {
    total: Vec<u64>,
    first: Vec<u64>,
}

#[derive(Default)]
struct Mode {
    direct: Side,
    chatq: Side,
    jobs: Vec<Uuid>,
    mismatches: u64,
    errors: BTreeMap<String, u64>,
}

async fn light(ctx: &Ctx) -> anyhow::Result<LightResult> {
    let sys = ctx
        .start(&SystemOptions {
            workers: 2,
            mock_latency_ms: LIGHT_MOCK_LATENCY_MS,
            ..Default::default()
        })
        .await?;
    let r = light_on(ctx, &sys).await;
    sys.stop().await;
    r
}

async fn light_on(ctx: &Ctx, sys: &System) -> anyhow::Result<LightResult> {
    let (warmup, rounds) = if ctx.quick {
        (2, 10)
    } else {
        (LIGHT_WARMUP, LIGHT_ROUNDS)
    };
    println!("facade: {rounds} rounds at light load (one request at a time), mock latency 0");
    let ep = Endpoints {
        http: ctx.http.clone(),
        direct: format!("{}/v1/chat/completions", sys.mock_url),
        chatq: format!("{}/v1/chat/completions", sys.api_url),
        key: sys.key.clone(),
    };
    let (mut plain, mut stream) = (Mode::default(), Mode::default());
    for i in 0..warmup {
        round(&ep, i, &mut Mode::default(), &mut Mode::default()).await;
    }
    let ticks0 = procfs::machine_cpu_ticks();
    for i in warmup..warmup + rounds {
        round(&ep, i, &mut plain, &mut stream).await;
    }
    let machine_busy_pct = match (ticks0, procfs::machine_cpu_ticks()) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
            100.0 * b1.saturating_sub(b0) as f64 / (t1 - t0) as f64
        }
        _ => 0.0,
    };
    let plain_split = job_split(sys, &plain.jobs).await?;
    let stream_split = job_split(sys, &stream.jobs).await?;
    let (pm, pe) = (plain.mismatches, plain.errors.clone());
    let (sm, se) = (stream.mismatches, stream.errors.clone());
    let rows = vec![
        light_row(
            "plain: whole response",
            (&mut plain.direct.total, &mut plain.chatq.total),
            plain_split,
            pm,
            pe,
        ),
        light_row(
            "stream: first content chunk",
            (&mut stream.direct.first, &mut stream.chatq.first),
            stream_split.clone(),
            sm,
            se.clone(),
        ),
        light_row(
            "stream: data: [DONE]",
            (&mut stream.direct.total, &mut stream.chatq.total),
            stream_split,
            sm,
            se,
        ),
    ];
    Ok(LightResult {
        mock_latency_ms: LIGHT_MOCK_LATENCY_MS,
        workers: 2,
        warmup,
        rounds,
        machine_busy_pct,
        rows,
    })
}

fn light_row(
    what: &str,
    (direct, chatq): (&mut [u64], &mut [u64]),
    (queue_claim, worker): (Percentiles, Percentiles),
    text_mismatches: u64,
    errors: BTreeMap<String, u64>,
) -> LightRow {
    let (direct, chatq) = (percentiles(direct), percentiles(chatq));
    LightRow {
        what: what.into(),
        overhead_p50_ms: chatq.p50_ms - direct.p50_ms,
        overhead_p99_ms: chatq.p99_ms - direct.p99_ms,
        direct,
        chatq,
        queue_claim,
        worker,
        text_mismatches,
        errors,
    }
}

/// One round: a plain pair, then a streamed pair. Which side goes first
/// alternates by round, so neither always follows the other.
async fn round(ep: &Endpoints, i: u64, plain: &mut Mode, stream: &mut Mode) {
    let content = format!("facade round {i}: how long is a piece of string?");
    let even = i.is_multiple_of(2);
    pair(ep, &content, false, even, plain).await;
    pair(ep, &content, true, !even, stream).await;
}

async fn pair(ep: &Endpoints, content: &str, stream: bool, direct_first: bool, mode: &mut Mode) {
    let direct = || call(&ep.http, &ep.direct, "sk-bench-direct", content, stream);
    let chatq = || call(&ep.http, &ep.chatq, &ep.key, content, stream);
    let (d, c) = if direct_first {
        let d = direct().await;
        (d, chatq().await)
    } else {
        let c = chatq().await;
        (direct().await, c)
    };
    let (d, c) = match (d, c) {
        (Ok(d), Ok(c)) => (d, c),
        (d, c) => {
            for (side, r) in [("direct", d), ("chatq", c)] {
                if let Err(kind) = r {
                    *mode.errors.entry(format!("{side} {kind}")).or_default() += 1;
                }
            }
            return;
        }
    };
    if d.text != c.text {
        mode.mismatches += 1;
    }
    mode.direct.total.push(d.total_us);
    mode.chatq.total.push(c.total_us);
    if let (Some(df), Some(cf)) = (d.first_us, c.first_us) {
        mode.direct.first.push(df);
        mode.chatq.first.push(cf);
    }
    if let Some(job) = c.job {
        mode.jobs.push(job);
    }
}

/// The request body of an OpenAI SDK chat completion.
fn body(content: &str, stream: bool) -> serde_json::Value {
    serde_json::json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "stream": stream,
    })
}

/// `POST url` with the body and bearer; reads the answer to its end.
async fn call(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    content: &str,
    stream: bool,
) -> Result<Answer, String> {
    let t0 = Instant::now();
    let resp = http
        .post(url)
        .bearer_auth(key)
        .json(&body(content, stream))
        .send()
        .await
        .map_err(|e| kind_of(&e))?;
    let status = resp.status();
    let job = resp
        .headers()
        .get(JOB_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| Uuid::parse_str(v).ok());
    if !status.is_success() || !stream {
        let bytes = resp.bytes().await.map_err(|e| kind_of(&e))?;
        let total_us = t0.elapsed().as_micros() as u64;
        if !status.is_success() {
            return Err(status_kind(status.as_u16(), &bytes));
        }
        let v: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|_| "bad_json".to_owned())?;
        let text = v["choices"][0]["message"]["content"]
            .as_str()
            .ok_or("no_content")?
            .to_owned();
        return Ok(Answer {
            total_us,
            first_us: None,
            text,
            job,
        });
    }
    read_stream(resp, t0, job).await
}

/// Reads a `chat.completion.chunk` stream to its end.
async fn read_stream(
    mut resp: reqwest::Response,
    t0: Instant,
    job: Option<Uuid>,
) -> Result<Answer, String> {
    let mut buf: Vec<u8> = Vec::new();
    let (mut first, mut done) = (None, None);
    let mut text = String::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| kind_of(&e))? {
        buf.extend_from_slice(&chunk);
        while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let line = line.strip_suffix(b"\n").unwrap_or(&line);
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let Some(data) = line.strip_prefix(b"data:") else {
                continue;
            };
            let data = data.strip_prefix(b" ").unwrap_or(data);
            if data == b"[DONE]" {
                done.get_or_insert(t0.elapsed().as_micros() as u64);
                continue;
            }
            let v: serde_json::Value =
                serde_json::from_slice(data).map_err(|_| "bad_chunk".to_owned())?;
            if let Some(err) = v.get("error") {
                let code = err["code"].as_str().or(err["type"].as_str());
                return Err(format!("error_event {}", code.unwrap_or("?")));
            }
            if let Some(piece) = v["choices"][0]["delta"]["content"].as_str()
                && !piece.is_empty()
            {
                first.get_or_insert(t0.elapsed().as_micros() as u64);
                text.push_str(piece);
            }
        }
    }
    let total_us = done.ok_or("no_done")?;
    let first_us = first.ok_or("no_content")?;
    Ok(Answer {
        total_us,
        first_us: Some(first_us),
        text,
        job,
    })
}

/// Percentiles of the jobs' `started_at − created_at` and `finished_at −
/// started_at` (PostgreSQL's clock).
async fn job_split(sys: &System, jobs: &[Uuid]) -> anyhow::Result<(Percentiles, Percentiles)> {
    let rows: Vec<(Option<f64>, Option<f64>)> = sqlx::query_as(
        "select (extract(epoch from started_at - created_at) * 1e6)::float8,
                (extract(epoch from finished_at - started_at) * 1e6)::float8
         from jobs where id = any($1)",
    )
    .bind(jobs)
    .fetch_all(&sys.db)
    .await
    .context("reading the light-load jobs' times")?;
    let us = |x: Option<f64>| x.map(|v| v.max(0.0) as u64);
    let mut qc: Vec<u64> = rows.iter().filter_map(|r| us(r.0)).collect();
    let mut w: Vec<u64> = rows.iter().filter_map(|r| us(r.1)).collect();
    Ok((percentiles(&mut qc), percentiles(&mut w)))
}

// --------------------------------------------------------------------- burst

async fn burst(ctx: &Ctx) -> anyhow::Result<BurstResult> {
    let n = if ctx.quick { 50 } else { BURST_REQUESTS };
    let sys = ctx
        .start(&SystemOptions {
            workers: BURST_WORKERS,
            worker_concurrency: BURST_WORKER_CONCURRENCY,
            mock_latency_ms: BURST_MOCK_LATENCY_MS,
            ..Default::default()
        })
        .await?;
    let r = burst_on(ctx, &sys, n).await;
    sys.stop().await;
    r
}

async fn burst_on(ctx: &Ctx, sys: &System, n: u64) -> anyhow::Result<BurstResult> {
    println!(
        "facade: {n} concurrent completions, {BURST_WORKERS} workers at concurrency \
         {BURST_WORKER_CONCURRENCY}, mock latency {BURST_MOCK_LATENCY_MS} ms"
    );
    let timeout = if ctx.quick {
        QUICK_CLIENT_TIMEOUT
    } else {
        BURST_CLIENT_TIMEOUT
    };
    // Its own pool, as many SDK clients would have: one connection per
    // request in flight.
    let http = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(usize::try_from(n).unwrap_or(usize::MAX))
        .tcp_nodelay(true)
        .build()
        .context("building the burst client")?;
    let url = format!("{}/v1/chat/completions", sys.api_url);
    // Warm-up: the workers' first connections to the mock, the api's
    // statements. Its jobs are excluded from the figures below.
    let (warm, _) = burst_load(&http, &url, &sys.key, 4, "warm-up").await;
    if warm.error_total() > 0 {
        anyhow::bail!("the burst warm-up failed: {}", warm.errors_text());
    }
    wait_idle(&sys.db, Duration::from_secs(30)).await?;
    let since: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("select now()")
        .fetch_one(&sys.db)
        .await?;

    let peak = Arc::new(AtomicU64::new(0));
    let sampler = tokio::spawn(sample_in_flight(
        ctx.http.clone(),
        format!("{}/_mock/stats", sys.mock_url),
        Arc::clone(&peak),
    ));
    let (r, last_answer_s) = burst_load(&http, &url, &sys.key, n, "burst").await;
    sampler.abort();
    if r.ok < n {
        println!(
            "facade: {} of {n} burst requests failed: {}",
            n - r.ok,
            r.errors_text()
        );
    }
    // Let abandoned jobs (a client gone: the api cancels them) settle.
    wait_idle(&sys.db, Duration::from_secs(30)).await?;
    let by_status: Vec<(String, i64)> = sqlx::query_as(
        "select status::text, count(*) from jobs where created_at >= $1 group by 1 order by 1",
    )
    .bind(since)
    .fetch_all(&sys.db)
    .await
    .context("counting the burst's jobs")?;
    let (accept_span, finish_span): (Option<f64>, Option<f64>) = sqlx::query_as(
        "select extract(epoch from max(created_at) - min(created_at))::float8,
                extract(epoch from max(finished_at) - min(created_at))::float8
         from jobs where created_at >= $1",
    )
    .bind(since)
    .fetch_one(&sys.db)
    .await?;
    let duplicates: i64 = sqlx::query_scalar(
        "select count(*) from (select job_id from messages where role = 'assistant'
         group by job_id having count(*) > 1) t",
    )
    .fetch_one(&sys.db)
    .await?;
    let (jobs, never_started, never_published, max_publish): (i64, i64, i64, Option<f64>) =
        sqlx::query_as(
            "select count(*), count(*) filter (where started_at is null),
                    count(*) filter (where published_at is null),
                    max(extract(epoch from published_at - created_at))::float8
             from jobs where created_at >= $1 and status <> 'succeeded'",
        )
        .bind(since)
        .fetch_one(&sys.db)
        .await?;
    let unanswered = Unanswered {
        jobs: jobs.max(0) as u64,
        never_started: never_started.max(0) as u64,
        never_published: never_published.max(0) as u64,
        max_publish_s: max_publish.unwrap_or(0.0),
    };
    Ok(BurstResult {
        requests: n,
        workers: BURST_WORKERS,
        worker_concurrency: BURST_WORKER_CONCURRENCY,
        mock_latency_ms: BURST_MOCK_LATENCY_MS,
        client_timeout_s: timeout.as_secs(),
        answered_per_s: if last_answer_s > 0.0 {
            r.ok as f64 / last_answer_s
        } else {
            0.0
        },
        last_answer_s,
        load: r,
        peak_llm_in_flight: peak.load(Ordering::Relaxed),
        accept_span_s: accept_span.unwrap_or(0.0),
        finish_span_s: finish_span.unwrap_or(0.0),
        jobs_by_status: by_status
            .into_iter()
            .map(|(s, c)| (s, c.max(0) as u64))
            .collect(),
        duplicates: duplicates.max(0) as u64,
        unanswered,
    })
}

/// `n` plain completions, all at once (one task each); also the time of
/// the last answer, s.
async fn burst_load(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    n: u64,
    tag: &str,
) -> (LoadResult, f64) {
    let (http, url, key, tag) = (http.clone(), url.to_owned(), key.to_owned(), tag.to_owned());
    let clients = usize::try_from(n).unwrap_or(usize::MAX);
    let t0 = Instant::now();
    let last_ok_us = Arc::new(AtomicU64::new(0));
    let last = Arc::clone(&last_ok_us);
    let load = load::run(clients, Stop::Count(n), move |_, seq| {
        let (http, url, key, last) = (http.clone(), url.clone(), key.clone(), Arc::clone(&last));
        let content = format!("facade {tag} {seq}: say something");
        async move {
            match call(&http, &url, &key, &content, false).await {
                Ok(a) if !a.text.is_empty() => {
                    last.fetch_max(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
                    Outcome::Ok
                }
                Ok(_) => Outcome::Err("empty_text".into()),
                Err(kind) => Outcome::Err(kind),
            }
        }
    })
    .await;
    (load, last_ok_us.load(Ordering::Relaxed) as f64 / 1e6)
}

/// Records the mock's peak `in_flight` until aborted.
async fn sample_in_flight(http: reqwest::Client, url: String, peak: Arc<AtomicU64>) {
    loop {
        if let Ok(r) = http.get(&url).send().await
            && let Ok(v) = r.json::<serde_json::Value>().await
        {
            peak.fetch_max(v["in_flight"].as_u64().unwrap_or(0), Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ------------------------------------------------------------------- helpers

/// `"503 unavailable"`: the status and the OpenAI error's code (or type).
fn status_kind(status: u16, body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let code = v["error"]["code"]
        .as_str()
        .or(v["error"]["type"].as_str())
        .map(str::to_owned);
    match code {
        Some(code) => format!("{status} {code}"),
        None => status.to_string(),
    }
}

fn kind_of(e: &reqwest::Error) -> String {
    match Outcome::from_reqwest(e) {
        Outcome::Err(k) => k,
        Outcome::Ok => "ok".into(),
    }
}

fn pair_ms(p: &Percentiles) -> String {
    format!("{} / {}", f(p.p50_ms, 2), f(p.p99_ms, 2))
}

fn errors_text(errors: &BTreeMap<String, u64>) -> String {
    if errors.is_empty() {
        return "none".into();
    }
    let parts: Vec<String> = errors.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    parts.join(", ")
}

/// The light-load overhead, for stdout and the report.
fn light_table(l: &LightResult) -> Table {
    let rows = l
        .rows
        .iter()
        .map(|r| {
            vec![
                r.what.clone(),
                r.chatq.count.to_string(),
                pair_ms(&r.direct),
                pair_ms(&r.chatq),
                format!("{} / {}", f(r.overhead_p50_ms, 2), f(r.overhead_p99_ms, 2)),
                pair_ms(&r.queue_claim),
                pair_ms(&r.worker),
                r.text_mismatches.to_string(),
                errors_text(&r.errors),
            ]
        })
        .collect();
    Table {
        headers: &[
            "timed to",
            "pairs",
            "direct p50/p99 ms",
            "chatq p50/p99 ms",
            "overhead p50/p99 ms",
            "job queue+claim p50/p99",
            "job claim→finished p50/p99",
            "text differs",
            "errors",
        ],
        rows,
    }
}

impl FacadeResult {
    /// The light-load overhead, for stdout and the report.
    pub fn light_table(&self) -> Table {
        light_table(&self.light)
    }

    /// The burst, for stdout and the report.
    pub fn burst_table(&self) -> Table {
        let b = &self.burst;
        let l = &b.load;
        let statuses = if b.jobs_by_status.is_empty() {
            "none".into()
        } else {
            let parts: Vec<String> = b
                .jobs_by_status
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            parts.join(", ")
        };
        Table {
            headers: &[
                "requests",
                "answered",
                "wall s",
                "requests/s",
                "last answer s",
                "answered/s by then",
                "p50 ms",
                "p99 ms",
                "max ms",
                "errors",
                "peak LLM calls in flight",
                "api stored all in s",
                "first stored → last finished s",
                "jobs (PostgreSQL)",
                "duplicates",
                "not succeeded: never started / never published",
            ],
            rows: vec![vec![
                b.requests.to_string(),
                l.ok.to_string(),
                f(l.elapsed_s, 2),
                f(l.ok_per_s, 0),
                f(b.last_answer_s, 2),
                f(b.answered_per_s, 0),
                f(l.latency.p50_ms, 0),
                f(l.latency.p99_ms, 0),
                f(l.latency.max_ms, 0),
                l.errors_text(),
                b.peak_llm_in_flight.to_string(),
                f(b.accept_span_s, 2),
                f(b.finish_span_s, 2),
                statuses,
                b.duplicates.to_string(),
                format!(
                    "{}: {} / {}",
                    b.unanswered.jobs, b.unanswered.never_started, b.unanswered.never_published
                ),
            ]],
        }
    }
}
