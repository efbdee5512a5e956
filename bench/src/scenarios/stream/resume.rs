//! Resume after a disconnect. Each client submits a streaming job and reads
//! its events; after every [`DELTAS_BETWEEN_CUTS`] deltas it drops the
//! connection, stays away for a while (0 or 100 ms: the job streams on
//! meanwhile), and reconnects with `Last-Event-ID` set to the last id it
//! received. One sample: reconnect request sent → the first `delta` on the
//! new stream (the first event carrying text the client did not have). At
//! `done` the text the client assembled must equal the job's result.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::ctx::{Ctx, Target};
use crate::load::{self, Outcome, Percentiles, Stop, percentiles};
use crate::sse::Stream;
use crate::system::System;

/// Words of each reply (quick: 60).
const WORDS: u32 = 150;
/// Mock delay before each word, ms.
pub const CHUNK_DELAY_MS: u64 = 10;
/// Deltas read between two disconnects.
pub const DELTAS_BETWEEN_CUTS: usize = 6;
/// How long a client stays away before reconnecting, ms (one row each).
pub const AWAY_MS: [u64; 2] = [0, 100];
/// Concurrent clients (each one job at a time).
const CLIENTS: usize = 8;
/// Deadline of one job, start to `done`.
const JOB_DEADLINE: Duration = Duration::from_secs(60);

/// Resumes after one away time.
#[derive(Debug, Clone, Serialize)]
pub struct ResumeRow {
    /// Time between dropping the connection and reconnecting, ms.
    pub away_ms: u64,
    /// Jobs submitted.
    pub jobs: u64,
    /// Concurrent clients.
    pub clients: usize,
    /// Words of each reply.
    pub words: u32,
    /// Reconnect request sent → response head received.
    pub open: Percentiles,
    /// Reconnect request sent → first `delta` received.
    pub first_text: Percentiles,
    /// Reconnects after which no text was missing (`done` came first).
    pub nothing_missed: u64,
    /// Jobs read to `done`.
    pub jobs_done: u64,
    /// Of those, jobs whose assembled text equals the result exactly.
    pub exact_text: u64,
    /// Failures by kind.
    pub errors: BTreeMap<String, u64>,
}

#[derive(Default)]
struct Samples {
    open: Vec<u64>,
    first_text: Vec<u64>,
    nothing_missed: u64,
    jobs_done: u64,
    exact_text: u64,
}

/// Runs one row per away time (80 jobs each; quick: 4).
pub async fn run(ctx: &Ctx, sys: &System) -> anyhow::Result<Vec<ResumeRow>> {
    let jobs = if ctx.quick { 4 } else { 80 };
    let clients = if ctx.quick { 2 } else { CLIENTS };
    let words = if ctx.quick { 60 } else { WORDS };
    let streams = crate::sse::client()?;
    let mut rows = Vec::new();
    for away_ms in AWAY_MS {
        let samples = Arc::new(Mutex::new(Samples::default()));
        let (t, s, sink) = (ctx.target(sys), streams.clone(), Arc::clone(&samples));
        let away = Duration::from_millis(away_ms);
        let r = load::run(clients, Stop::Count(jobs), move |_, seq| {
            let (t, s, sink) = (t.clone(), s.clone(), Arc::clone(&sink));
            async move {
                let content = format!(
                    "[mock:words={words}][mock:chunk_delay_ms={CHUNK_DELAY_MS}] resume {seq}"
                );
                let job = one_job(&t, &s, &content, away, &sink);
                match tokio::time::timeout(JOB_DEADLINE, job).await {
                    Ok(outcome) => outcome,
                    Err(_) => Outcome::Err("no_done_in_60s".into()),
                }
            }
        })
        .await;
        let mut v = samples
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default();
        rows.push(ResumeRow {
            away_ms,
            jobs,
            clients,
            words,
            open: percentiles(&mut v.open),
            first_text: percentiles(&mut v.first_text),
            nothing_missed: v.nothing_missed,
            jobs_done: v.jobs_done,
            exact_text: v.exact_text,
            errors: r.errors,
        });
    }
    Ok(rows)
}

/// One job: read, cut, stay away, resume, … until `done`; samples go to `sink`.
async fn one_job(
    t: &Target,
    streams: &reqwest::Client,
    content: &str,
    away: Duration,
    sink: &Mutex<Samples>,
) -> Outcome {
    let job = match t.submit(content, None).await {
        Ok(s) => match s.job {
            Some(id) => id,
            None => return Outcome::from_status(s.status),
        },
        Err(e) => return Outcome::from_reqwest(&e),
    };
    let mut stream = match Stream::open(streams, &t.url, &t.key, job, None).await {
        Ok(s) => s,
        Err(e) => return Outcome::Err(format!("open: {}", e.0)),
    };
    let mut text = String::new();
    let mut last_id: Option<String> = None;
    let mut since_cut = 0;
    // When the last reconnect was sent, until its first delta arrives.
    let mut resumed: Option<Instant> = None;
    let (mut open_us, mut first_us) = (Vec::new(), Vec::new());
    let done = loop {
        let event = match stream.next().await {
            Ok(Some(e)) => e,
            Ok(None) => return Outcome::Err("closed_before_done".into()),
            Err(e) => return Outcome::Err(e.0),
        };
        if event.id.is_some() {
            last_id.clone_from(&event.id);
        }
        match event.event.as_str() {
            "reset" => text.clear(),
            "delta" => {
                text.push_str(&event.delta_text().unwrap_or_default());
                if let Some(at) = resumed.take() {
                    first_us.push(event.at.saturating_duration_since(at).as_micros() as u64);
                }
                since_cut += 1;
                if since_cut < DELTAS_BETWEEN_CUTS {
                    continue;
                }
                since_cut = 0;
                // Drop the connection, stay away, reconnect from the last id.
                drop(stream);
                if !away.is_zero() {
                    tokio::time::sleep(away).await;
                }
                let at = Instant::now();
                stream = match Stream::open(streams, &t.url, &t.key, job, last_id.as_deref()).await
                {
                    Ok(s) => s,
                    Err(e) => return Outcome::Err(format!("reopen: {}", e.0)),
                };
                open_us.push(stream.opened_at.saturating_duration_since(at).as_micros() as u64);
                resumed = Some(at);
            }
            "done" => break event.job(),
            _ => {}
        }
    };
    let result = done
        .as_ref()
        .and_then(|j| j["result"]["content"].as_str())
        .unwrap_or_default()
        .to_owned();
    if let Ok(mut v) = sink.lock() {
        v.open.extend(open_us);
        v.first_text.extend(first_us);
        v.nothing_missed += u64::from(resumed.is_some());
        v.jobs_done += 1;
        v.exact_text += u64::from(!result.is_empty() && text == result);
    }
    Outcome::Ok
}
