//! What every scenario shares: options, the HTTP client, the target, and
//! small helpers for submitting, polling and verifying end states.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::system::{Infra, System, SystemOptions};

/// An already running service given with `--url`.
#[derive(Debug, Clone)]
pub struct External {
    /// Its base URL.
    pub url: String,
    /// Its admin token.
    pub admin_token: String,
}

/// Options and shared state of a benchmark run.
pub struct Ctx {
    /// Tiny sizes.
    pub quick: bool,
    /// Where the shared services are.
    pub infra: Infra,
    /// Run against this service instead of starting one.
    pub external: Option<External>,
    /// Submissions per burst run.
    pub burst_n: u64,
    /// Duration of each timed load run.
    pub duration: Duration,
    /// Raw results directory.
    pub out: PathBuf,
    /// The one HTTP client (large pool, 60 s timeout).
    pub http: reqwest::Client,
}

impl Ctx {
    /// Builds the context and its HTTP client.
    pub fn new(
        quick: bool,
        infra: Infra,
        external: Option<External>,
        burst_n: u64,
        duration: Duration,
        out: PathBuf,
    ) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .connect_timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(1024)
            .tcp_nodelay(true)
            .build()
            .context("building the HTTP client")?;
        Ok(Self {
            quick,
            infra,
            external,
            burst_n,
            duration,
            out,
            http,
        })
    }

    /// Starts a private system (fails in `--url` mode).
    pub async fn start(&self, opts: &SystemOptions) -> anyhow::Result<System> {
        if self.external.is_some() {
            bail!("this scenario starts its own system and cannot run with --url");
        }
        System::start(&self.infra, &self.http, opts).await
    }

    /// A client handle on the target (api URL and key).
    pub fn target(&self, sys: &System) -> Target {
        Target {
            http: self.http.clone(),
            url: sys.api_url.clone(),
            key: sys.key.clone(),
        }
    }
}

/// A service and a key to load it with.
#[derive(Clone)]
pub struct Target {
    /// The shared client.
    pub http: reqwest::Client,
    /// Api base URL.
    pub url: String,
    /// API key.
    pub key: String,
}

/// What a submission got back.
#[derive(Debug, Clone)]
pub struct Submitted {
    /// HTTP status.
    pub status: u16,
    /// The job id (202 only).
    pub job: Option<Uuid>,
    /// `Retry-After` seconds, if present.
    pub retry_after: Option<u64>,
}

impl Target {
    /// `POST /v1/chat {"content"}`, with an optional per-request timeout.
    pub async fn submit(
        &self,
        content: &str,
        timeout: Option<Duration>,
    ) -> Result<Submitted, reqwest::Error> {
        let mut req = self
            .http
            .post(format!("{}/v1/chat", self.url))
            .bearer_auth(&self.key)
            .json(&serde_json::json!({"content": content}));
        if let Some(t) = timeout {
            req = req.timeout(t);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        let job = if status == 202 {
            body["id"].as_str().and_then(|s| Uuid::parse_str(s).ok())
        } else {
            None
        };
        Ok(Submitted {
            status,
            job,
            retry_after,
        })
    }

    /// `GET /v1/jobs/{id}?wait=N`: (HTTP status, job status).
    pub async fn poll(&self, job: Uuid, wait_s: u32) -> Result<(u16, String), reqwest::Error> {
        let mut url = format!("{}/v1/jobs/{job}", self.url);
        if wait_s > 0 {
            url.push_str(&format!("?wait={wait_s}"));
        }
        let resp = self.http.get(url).bearer_auth(&self.key).send().await?;
        let status = resp.status().as_u16();
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        Ok((
            status,
            body["status"].as_str().unwrap_or_default().to_owned(),
        ))
    }
}

/// A job status that never changes again.
pub fn is_terminal(status: &str) -> bool {
    matches!(status, "succeeded" | "failed" | "cancelled")
}

/// Submits `n` jobs from `clients` tasks (202 expected, retried on 429),
/// returning the accepted ids.
pub async fn prefill(target: &Target, n: u64, clients: usize) -> anyhow::Result<Vec<Uuid>> {
    let ids = std::sync::Arc::new(std::sync::Mutex::new(Vec::with_capacity(n as usize)));
    let t = target.clone();
    let sink = std::sync::Arc::clone(&ids);
    let r = crate::load::run(clients, crate::load::Stop::Count(n), move |_, seq| {
        let t = t.clone();
        let sink = std::sync::Arc::clone(&sink);
        async move {
            for _ in 0..20 {
                match t.submit(&format!("prefill {seq}"), None).await {
                    Ok(s) if s.job.is_some() => {
                        if let (Some(id), Ok(mut v)) = (s.job, sink.lock()) {
                            v.push(id);
                        }
                        return crate::load::Outcome::Ok;
                    }
                    Ok(s) if s.status == 429 || s.status == 503 => {
                        let secs = s.retry_after.unwrap_or(1).min(5);
                        tokio::time::sleep(Duration::from_secs(secs)).await;
                    }
                    Ok(s) => return crate::load::Outcome::from_status(s.status),
                    Err(e) => return crate::load::Outcome::from_reqwest(&e),
                }
            }
            crate::load::Outcome::Err("gave_up".into())
        }
    })
    .await;
    if r.error_total() > 0 {
        bail!("prefilling {n} jobs failed: {}", r.errors_text());
    }
    let v = ids.lock().map(|v| v.clone()).unwrap_or_default();
    Ok(v)
}

/// End state of a set of accepted jobs, from PostgreSQL.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EndState {
    /// Accepted jobs.
    pub accepted: u64,
    /// Accepted jobs in a terminal state.
    pub terminal: u64,
    /// Accepted jobs that `succeeded`.
    pub succeeded: u64,
    /// Accepted jobs not terminal (lost, if the deadline has passed).
    pub not_terminal: u64,
    /// Jobs with more than one assistant message.
    pub duplicates: u64,
}

/// Counts the end states of `ids` in the jobs table.
pub async fn end_state(db: &PgPool, ids: &[Uuid]) -> anyhow::Result<EndState> {
    let (terminal, succeeded): (i64, i64) = sqlx::query_as(
        "select count(*) filter (where status in ('succeeded','failed','cancelled')),
                count(*) filter (where status = 'succeeded')
         from jobs where id = any($1)",
    )
    .bind(ids)
    .fetch_one(db)
    .await?;
    let duplicates: i64 = sqlx::query_scalar(
        "select count(*) from (select job_id from messages where role = 'assistant'
         group by job_id having count(*) > 1) t",
    )
    .fetch_one(db)
    .await?;
    let accepted = ids.len() as u64;
    Ok(EndState {
        accepted,
        terminal: terminal as u64,
        succeeded: succeeded as u64,
        not_terminal: accepted.saturating_sub(terminal as u64),
        duplicates: duplicates as u64,
    })
}

/// Polls PostgreSQL until every one of `ids` is terminal or `deadline` passes.
pub async fn wait_drained(
    db: &PgPool,
    ids: &[Uuid],
    deadline: Duration,
) -> anyhow::Result<EndState> {
    let end = tokio::time::Instant::now() + deadline;
    loop {
        let s = end_state(db, ids).await?;
        if s.not_terminal == 0 || tokio::time::Instant::now() >= end {
            return Ok(s);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Steady-state completion rate from `finished_at`: the jobs finished
/// between the 10th and the 90th percentile of finish times, per second
/// (drops the ramp-up and the tail). Also returns the first-to-last span.
pub async fn completion_rate(db: &PgPool) -> anyhow::Result<(f64, f64)> {
    let (t10, t90, first, last, n): (Option<f64>, Option<f64>, Option<f64>, Option<f64>, i64) = sqlx::query_as(
        "select percentile_cont(0.1) within group (order by extract(epoch from finished_at))::float8,
                percentile_cont(0.9) within group (order by extract(epoch from finished_at))::float8,
                min(extract(epoch from finished_at))::float8,
                max(extract(epoch from finished_at))::float8,
                count(*)
         from jobs where finished_at is not null",
    )
    .fetch_one(db)
    .await?;
    let span = match (first, last) {
        (Some(a), Some(b)) => b - a,
        _ => 0.0,
    };
    let rate = match (t10, t90) {
        (Some(a), Some(b)) if b > a => 0.8 * n as f64 / (b - a),
        _ => 0.0,
    };
    Ok((rate, span))
}

impl Ctx {
    /// The `--url` service with a fresh key, if running in that mode.
    pub async fn external_target(&self) -> anyhow::Result<Option<Target>> {
        let Some(ext) = &self.external else {
            return Ok(None);
        };
        crate::system::wait_ready(&self.http, &ext.url).await?;
        let key = crate::system::create_key(&self.http, &ext.url, &ext.admin_token).await?;
        Ok(Some(Target {
            http: self.http.clone(),
            url: ext.url.clone(),
            key,
        }))
    }
}

/// Waits (at most `deadline`) until no job is queued or running, so the
/// next measurement does not share the machine with a draining backlog.
pub async fn wait_idle(db: &PgPool, deadline: Duration) -> anyhow::Result<()> {
    let end = tokio::time::Instant::now() + deadline;
    loop {
        let busy: i64 =
            sqlx::query_scalar("select count(*) from jobs where status in ('queued', 'running')")
                .fetch_one(db)
                .await?;
        if busy == 0 || tokio::time::Instant::now() >= end {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
