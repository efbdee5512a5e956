//! Resume after a disconnect. Each client submits a streaming job and reads
//! its events; after every [`DELTAS_BETWEEN_CUTS`] deltas it drops the
//! connection and at once reconnects with `Last-Event-ID` set to the last
//! id it received. One sample: reconnect request sent → the first `delta`
//! on the new stream (the first event carrying text the client did not
//! have). At `done` the text the client assembled must equal the result.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::ctx::{Ctx, Target};
use crate::load::{self, Outcome, Percentiles, Stop, percentiles};
use crate::sse::{self, Stream};
use crate::system::System;

/// Words of each reply.
pub const WORDS: u32 = 150;
/// Mock delay before each word, ms.
pub const CHUNK_DELAY_MS: u64 = 10;
/// Deltas read between two disconnects.
pub const DELTAS_BETWEEN_CUTS: usize = 6;
/// Concurrent clients (each one job at a time).
const CLIENTS: usize = 8;
/// Deadline of one job, start to `done`.
const JOB_DEADLINE: Duration = Duration::from_secs(60);

/// The resume measurement.
#[derive(Debug, Clone, Serialize)]
pub struct ResumeResult {
    /// Jobs submitted.
    pub jobs: u64,
    /// Concurrent clients.
    pub clients: usize,
    /// Words of each reply.
    pub words: u32,
    /// Mock delay before each word, ms.
    pub chunk_delay_ms: u64,
    /// Deltas read between two disconnects.
    pub deltas_between_cuts: usize,
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

/// Runs the measurement (80 jobs; quick: 4).
pub async fn run(ctx: &Ctx, sys: &System) -> anyhow::Result<ResumeResult> {
    let jobs = if ctx.quick { 4 } else { 80 };
    let clients = if ctx.quick { 2 } else { CLIENTS };
    let streams = sse::client()?;
    let samples = Arc::new(Mutex::new(Samples::default()));
    let (t, s, sink) = (ctx.target(sys), streams.clone(), Arc::clone(&samples));
    let r = load::run(clients, Stop::Count(jobs), move |_, seq| {
        let (t, s, sink) = (t.clone(), s.clone(), Arc::clone(&sink));
        async move {
            let content =
                format!("[mock:words={WORDS}][mock:chunk_delay_ms={CHUNK_DELAY_MS}] resume {seq}");
            match tokio::time::timeout(JOB_DEADLINE, one_job(&t, &s, &content, &sink)).await {
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
    Ok(ResumeResult {
        jobs,
        clients,
        words: WORDS,
        chunk_delay_ms: CHUNK_DELAY_MS,
        deltas_between_cuts: DELTAS_BETWEEN_CUTS,
        open: percentiles(&mut v.open),
        first_text: percentiles(&mut v.first_text),
        nothing_missed: v.nothing_missed,
        jobs_done: v.jobs_done,
        exact_text: v.exact_text,
        errors: r.errors,
    })
}

/// One job: read, cut, resume, … until `done`; samples go to `sink`.
async fn one_job(
    t: &Target,
    streams: &reqwest::Client,
    content: &str,
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
    let (mut open_us, mut first_us, mut nothing_missed) = (Vec::new(), Vec::new(), 0);
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
                if since_cut >= DELTAS_BETWEEN_CUTS {
                    since_cut = 0;
                    // Drop the connection, then reconnect from the last id.
                    drop(stream);
                    let at = Instant::now();
                    stream = match Stream::open(streams, &t.url, &t.key, job, last_id.as_deref())
                        .await
                    {
                        Ok(s) => s,
                        Err(e) => return Outcome::Err(format!("reopen: {}", e.0)),
                    };
                    open_us.push(stream.opened_at.saturating_duration_since(at).as_micros() as u64);
                    resumed = Some(at);
                }
            }
            "done" => break event.job(),
            _ => {}
        }
    };
    if resumed.is_some() {
        nothing_missed += 1;
    }
    let result = done
        .as_ref()
        .and_then(|j| j["result"]["content"].as_str())
        .unwrap_or_default()
        .to_owned();
    if let Ok(mut v) = sink.lock() {
        v.open.extend(open_us);
        v.first_text.extend(first_us);
        v.nothing_missed += nothing_missed;
        v.jobs_done += 1;
        v.exact_text += u64::from(!result.is_empty() && text == result);
    }
    Outcome::Ok
}
