//! Time to first token. One chatq sample: the client sends `POST /v1/chat`,
//! opens `GET /v1/jobs/{id}/events` as soon as the 202 arrives, and stops
//! the clock at the first `delta` event (then reads on to `done`, so each
//! client has one job in flight). One mock sample, taken by the same client
//! right after: `POST {mock}/v1/chat/completions` with `stream: true` and
//! the same prompt, clock stopped at the first chunk carrying content.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::ctx::{Ctx, Target};
use crate::load::{self, Outcome, Percentiles, Stop, percentiles};
use crate::sse::{self, Stream};
use crate::system::System;

/// Words of each reply.
pub const WORDS: u32 = 8;
/// Mock delay before each streamed word, ms. Zero: the mock writes its
/// whole reply at once, because with a delay its small writes meet Nagle's
/// algorithm and the client's delayed ACK (the mock does not set
/// `TCP_NODELAY`), which adds 40 ms to its own TTFT at random.
pub const CHUNK_DELAY_MS: u64 = 0;

/// One load level.
#[derive(Debug, Clone, Serialize)]
pub struct TtftRow {
    /// Concurrent clients (each one job at a time).
    pub clients: usize,
    /// Submit → first `delta` event.
    pub chatq: Percentiles,
    /// Mock called directly: request → first content chunk.
    pub mock: Percentiles,
    /// chatq p50 − mock p50, ms.
    pub overhead_p50_ms: f64,
    /// chatq p99 − mock p99, ms.
    pub overhead_p99_ms: f64,
    /// `POST /v1/chat` → 202.
    pub submit: Percentiles,
    /// The job's `started_at − created_at` (PostgreSQL clock): publish,
    /// broker, and the worker's claim.
    pub queue_claim: Percentiles,
    /// `started_at` → first delta at the client (same host clock): prompt,
    /// the mock's TTFT, the worker's publish, the api's fan-out, the SSE write.
    pub claim_to_first_delta: Percentiles,
    /// Failures by kind.
    pub errors: BTreeMap<String, u64>,
}

#[derive(Default)]
struct Samples {
    chatq: Vec<u64>,
    mock: Vec<u64>,
    submit: Vec<u64>,
    queue_claim: Vec<u64>,
    claim_to_first: Vec<u64>,
}

/// Runs 1 and 4 clients.
pub async fn run(ctx: &Ctx, sys: &System) -> anyhow::Result<Vec<TtftRow>> {
    let streams = sse::client()?;
    let target = ctx.target(sys);
    let jobs = if ctx.quick { 6 } else { 300 };
    // Warm up connections, caches and the workers' mock connections.
    level(&target, &streams, &sys.mock_url, 2, 8).await;
    let mut rows = Vec::new();
    for clients in [1, 4] {
        rows.push(level(&target, &streams, &sys.mock_url, clients, jobs).await);
    }
    Ok(rows)
}

async fn level(
    target: &Target,
    streams: &reqwest::Client,
    mock_url: &str,
    clients: usize,
    jobs: u64,
) -> TtftRow {
    let samples = Arc::new(Mutex::new(Samples::default()));
    let (t, s, m, sink) = (
        target.clone(),
        streams.clone(),
        mock_url.to_owned(),
        Arc::clone(&samples),
    );
    let r = load::run(clients, Stop::Count(jobs), move |_, seq| {
        let (t, s, m, sink) = (t.clone(), s.clone(), m.clone(), Arc::clone(&sink));
        async move {
            let content =
                format!("[mock:words={WORDS}][mock:chunk_delay_ms={CHUNK_DELAY_MS}] ttft {seq}");
            let chatq = match chatq_once(&t, &s, &content).await {
                Ok(x) => x,
                Err(kind) => return Outcome::Err(kind),
            };
            let mock = match mock_once(&t.http, &m, &content).await {
                Ok(x) => x,
                Err(kind) => return Outcome::Err(format!("mock {kind}")),
            };
            if let Ok(mut v) = sink.lock() {
                v.chatq.push(chatq.ttft_us);
                v.submit.push(chatq.submit_us);
                v.mock.push(mock);
                if let Some((qc, cf)) = chatq.split_us {
                    v.queue_claim.push(qc);
                    v.claim_to_first.push(cf);
                }
            }
            Outcome::Ok
        }
    })
    .await;
    let mut v = samples
        .lock()
        .map(|mut v| std::mem::take(&mut *v))
        .unwrap_or_default();
    let chatq = percentiles(&mut v.chatq);
    let mock = percentiles(&mut v.mock);
    TtftRow {
        clients,
        overhead_p50_ms: chatq.p50_ms - mock.p50_ms,
        overhead_p99_ms: chatq.p99_ms - mock.p99_ms,
        chatq,
        mock,
        submit: percentiles(&mut v.submit),
        queue_claim: percentiles(&mut v.queue_claim),
        claim_to_first_delta: percentiles(&mut v.claim_to_first),
        errors: r.errors,
    }
}

struct ChatqSample {
    ttft_us: u64,
    submit_us: u64,
    /// (queue + claim, claim → first delta), when the job carried its times.
    split_us: Option<(u64, u64)>,
}

/// Deadline of one job, start to `done`.
const JOB_DEADLINE: Duration = Duration::from_secs(30);

async fn chatq_once(
    t: &Target,
    streams: &reqwest::Client,
    content: &str,
) -> Result<ChatqSample, String> {
    let wall0 = chrono::Utc::now();
    let t0 = Instant::now();
    let job = match t.submit(content, None).await {
        Ok(s) => s.job.ok_or_else(|| s.status.to_string())?,
        Err(e) => return Err(kind_of(&e)),
    };
    let submit_us = t0.elapsed().as_micros() as u64;
    let read = async {
        let mut stream = Stream::open(streams, &t.url, &t.key, job, None).await?;
        let mut first: Option<Instant> = None;
        loop {
            let Some(e) = stream.next().await? else {
                return Err(sse::StreamError::kind("closed_before_done"));
            };
            if e.event == "delta" && first.is_none() {
                first = Some(e.at);
            }
            if e.event == "done" {
                return Ok((first, e.job()));
            }
        }
    };
    let (first, done) = match tokio::time::timeout(JOB_DEADLINE, read).await {
        Err(_) => return Err("no_done_in_30s".into()),
        Ok(Err(e)) => return Err(e.0),
        Ok(Ok(x)) => x,
    };
    let first = first.ok_or("no_delta")?;
    if done.as_ref().and_then(|j| j["status"].as_str()) != Some("succeeded") {
        return Err("not_succeeded".into());
    }
    let ttft = first.duration_since(t0);
    // Server times are PostgreSQL's `now()`; the host clock is the same one.
    let split_us = done.as_ref().and_then(|j| {
        let created = sse::job_time(j, "created_at")?;
        let started = sse::job_time(j, "started_at")?;
        let first_wall = wall0 + chrono::Duration::from_std(ttft).ok()?;
        let us = |d: chrono::Duration| d.num_microseconds().unwrap_or(0).max(0) as u64;
        Some((us(started - created), us(first_wall - started)))
    });
    Ok(ChatqSample {
        ttft_us: ttft.as_micros() as u64,
        submit_us,
        split_us,
    })
}

/// The mock's own TTFT, in µs: request sent → first chunk with content.
async fn mock_once(http: &reqwest::Client, mock_url: &str, content: &str) -> Result<u64, String> {
    let body = serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": content}],
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let t0 = Instant::now();
    let mut resp = http
        .post(format!("{mock_url}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .map_err(|e| kind_of(&e))?;
    if !resp.status().is_success() {
        return Err(resp.status().as_u16().to_string());
    }
    let mut buf: Vec<u8> = Vec::new();
    let mut first: Option<u64> = None;
    // Read to the end, so the connection goes back to the pool.
    while let Some(chunk) = resp.chunk().await.map_err(|e| kind_of(&e))? {
        if first.is_some() {
            continue;
        }
        buf.extend_from_slice(&chunk);
        while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            if has_content(&line) {
                first = Some(t0.elapsed().as_micros() as u64);
                break;
            }
        }
    }
    first.ok_or_else(|| "no_content_chunk".into())
}

/// Whether an SSE line is a chunk whose delta carries text.
fn has_content(line: &[u8]) -> bool {
    let Some(json) = line.strip_prefix(b"data: ") else {
        return false;
    };
    serde_json::from_slice::<serde_json::Value>(json)
        .ok()
        .and_then(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(|s| !s.is_empty())
        })
        .unwrap_or(false)
}

fn kind_of(e: &reqwest::Error) -> String {
    match Outcome::from_reqwest(e) {
        Outcome::Err(k) => k,
        Outcome::Ok => "ok".into(),
    }
}
