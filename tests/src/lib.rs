//! The end-to-end test harness: each test gets its own PostgreSQL database
//! and RabbitMQ queue prefix, and starts the real `chatq-api`,
//! `chatq-worker` and `chatq-mock-llm` binaries as processes on free ports.
//! Tests need the real PostgreSQL and RabbitMQ and fail loudly without them.
//!
//! The binaries must be built first (`cargo build --workspace --bins`, as
//! `scripts/test.sh` does).

pub mod client;
pub mod proxy;
pub mod sse;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use sqlx::PgPool;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use uuid::Uuid;

use chatq_common::queue::Topology;
pub use client::{Api, Response};

/// The PostgreSQL server tests create their databases on.
pub fn pg_base_url() -> String {
    std::env::var("CHATQ_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
}

/// The RabbitMQ server tests use.
pub fn amqp_url() -> String {
    std::env::var("CHATQ_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// Environment pairs for [`EnvOptions`].
pub fn env_of(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// The admin token every test api is started with.
pub const ADMIN_TOKEN: &str = "test-admin-token";

/// Where the workspace's binaries are (next to the test executable's `deps/`).
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary has a path");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("test binary lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (cargo build --workspace --bins)",
        path.display()
    );
    path
}

/// Installs the TLS provider reqwest needs (once per process).
pub fn init_tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// How a test environment is started.
#[derive(Debug, Clone)]
pub struct EnvOptions {
    /// Worker processes to start.
    pub workers: usize,
    /// Extra environment for the mock LLM.
    pub mock_env: Vec<(String, String)>,
    /// Extra environment for the workers.
    pub worker_env: Vec<(String, String)>,
    /// Extra environment for the api.
    pub api_env: Vec<(String, String)>,
}

impl Default for EnvOptions {
    fn default() -> Self {
        Self {
            workers: 1,
            mock_env: vec![],
            worker_env: vec![],
            api_env: vec![],
        }
    }
}

/// One test's private chatq deployment.
pub struct TestEnv {
    /// This test's database name.
    pub db_name: String,
    /// URL of this test's database.
    pub db_url: String,
    /// A pool on this test's database, for asserting end states.
    pub db: PgPool,
    /// This test's queue prefix.
    pub prefix: String,
    /// Base URL of the mock LLM (without `/v1`).
    pub mock_url: String,
    /// The api client.
    pub api: Api,
    api_proc: Child,
    mock_proc: Child,
    workers: Vec<Child>,
    /// Each worker's metrics URL, once it has printed it.
    worker_metrics: Vec<tokio::sync::watch::Receiver<Option<String>>>,
    worker_env: Vec<(String, String)>,
    cleaned: bool,
}

/// Reads the first stdout line of `chatq-api` or `chatq-mock-llm`
/// (`… listening on http://IP:PORT`) and returns the URL; stdout keeps being
/// drained afterwards.
pub async fn read_listen_line(child: &mut Child, what: &str) -> anyhow::Result<String> {
    let stdout = child.stdout.take().context("child stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .with_context(|| format!("{what} did not start within 60 s"))??
        .with_context(|| format!("{what} exited before listening"))?;
    let url = line.rsplit(' ').next().unwrap_or_default().to_owned();
    if !url.starts_with("http://") {
        bail!("{what} printed an unexpected first line: {line}");
    }
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(url)
}

/// Drains a worker's stdout, publishing the URL of its
/// `chatq-worker metrics listening on http://IP:PORT` line.
fn watch_metrics_line(child: &mut Child) -> tokio::sync::watch::Receiver<Option<String>> {
    let (tx, rx) = tokio::sync::watch::channel(None);
    if let Some(stdout) = child.stdout.take() {
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(url) = line.strip_prefix("chatq-worker metrics listening on ") {
                    tx.send_replace(Some(url.trim().to_owned()));
                }
            }
        });
    }
    rx
}

fn command(name: &str, envs: &[(String, String)]) -> Command {
    let mut cmd = Command::new(bin_path(name));
    // A test's own RUST_LOG (in `envs`) wins over the default.
    cmd.env(
        "RUST_LOG",
        std::env::var("CHATQ_TEST_LOG").unwrap_or_else(|_| "warn".into()),
    )
    .envs(envs.iter().cloned())
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(log_sink(envs))
    .kill_on_drop(true);
    cmd
}

/// Where a process's log goes: appended to the file named by
/// `CHATQ_TEST_LOG_FILE` in its environment (for tests that read logs),
/// else the test's stderr.
fn log_sink(envs: &[(String, String)]) -> Stdio {
    envs.iter()
        .rev()
        .find(|(k, _)| k == "CHATQ_TEST_LOG_FILE")
        .and_then(|(_, path)| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .ok()
        })
        .map_or_else(Stdio::inherit, Stdio::from)
}

impl TestEnv {
    /// Starts a fresh deployment: database, mock LLM, api, workers.
    pub async fn start(opts: EnvOptions) -> anyhow::Result<Self> {
        init_tls();
        let id = Uuid::new_v4().simple().to_string();
        let db_name = format!("chatq_test_{}", &id[..16]);
        let admin = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&format!("{}/postgres", pg_base_url()))
            .await
            .context("connecting to PostgreSQL on 127.0.0.1:5432 (is it running?)")?;
        sqlx::query(sqlx::AssertSqlSafe(format!("create database {db_name}")))
            .execute(&admin)
            .await?;
        admin.close().await;
        let db_url = format!("{}/{db_name}", pg_base_url());
        let prefix = format!("test_{}", &id[..12]);

        let mut mock_env = vec![("CHATQ_MOCK_ADDR".to_owned(), "127.0.0.1:0".to_owned())];
        mock_env.extend(opts.mock_env.iter().cloned());
        let mut mock_proc = command("chatq-mock-llm", &mock_env)
            .spawn()
            .context("starting chatq-mock-llm")?;
        let mock_url = read_listen_line(&mut mock_proc, "chatq-mock-llm").await?;

        let common = vec![
            ("DATABASE_URL".to_owned(), db_url.clone()),
            ("AMQP_URL".to_owned(), amqp_url()),
            ("CHATQ_QUEUE_PREFIX".to_owned(), prefix.clone()),
        ];
        let mut api_env = common.clone();
        api_env.push(("CHATQ_API_ADDR".into(), "127.0.0.1:0".into()));
        api_env.push(("CHATQ_ADMIN_TOKEN".into(), ADMIN_TOKEN.into()));
        api_env.push(("CHATQ_SHUTDOWN_GRACE_SECS".into(), "2".into()));
        // Small pools: several tests run at once against one PostgreSQL
        // (max_connections 100 by default).
        api_env.push(("CHATQ_DB_MAX_CONNECTIONS".into(), "5".into()));
        api_env.extend(opts.api_env.iter().cloned());
        let mut api_proc = command("chatq-api", &api_env)
            .spawn()
            .context("starting chatq-api")?;
        let api_url = read_listen_line(&mut api_proc, "chatq-api").await?;

        let mut worker_env = common;
        worker_env.push(("OPENAI_BASE_URL".into(), format!("{mock_url}/v1")));
        worker_env.push(("CHATQ_RELAY_GRACE_SECS".into(), "2".into()));
        worker_env.push(("CHATQ_DB_MAX_CONNECTIONS".into(), "4".into()));
        // Several workers (and tests) share this machine: any free port.
        worker_env.push(("CHATQ_WORKER_METRICS_ADDR".into(), "127.0.0.1:0".into()));
        worker_env.extend(opts.worker_env.iter().cloned());

        let db = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(&db_url)
            .await?;
        let mut env = Self {
            db_name,
            db_url,
            db,
            prefix,
            mock_url,
            api: Api::new(api_url),
            api_proc,
            mock_proc,
            workers: vec![],
            worker_metrics: vec![],
            worker_env,
            cleaned: false,
        };
        for _ in 0..opts.workers {
            env.start_worker(&[]).await?;
        }
        env.api.wait_ready().await?;
        Ok(env)
    }

    /// Starts a deployment and creates an API key for tenant `acme`.
    pub async fn start_with_key(opts: EnvOptions) -> anyhow::Result<(Self, String)> {
        let env = Self::start(opts).await?;
        let (_, key) = env.create_key("acme").await?;
        Ok((env, key))
    }

    /// Starts one more worker process, with extra environment.
    pub async fn start_worker(&mut self, extra: &[(&str, &str)]) -> anyhow::Result<usize> {
        self.start_worker_with_args(&[], extra).await
    }

    /// Starts one more worker process with arguments and extra environment.
    pub async fn start_worker_with_args(
        &mut self,
        args: &[&str],
        extra: &[(&str, &str)],
    ) -> anyhow::Result<usize> {
        let mut envs = self.worker_env.clone();
        envs.extend(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        let mut child = command("chatq-worker", &envs)
            .args(args)
            .spawn()
            .context("starting chatq-worker")?;
        self.worker_metrics.push(watch_metrics_line(&mut child));
        self.workers.push(child);
        Ok(self.workers.len() - 1)
    }

    /// Base URL of worker `i`'s metrics listener (`/metrics`, `/healthz`,
    /// `/readyz`), as the worker printed it.
    pub async fn worker_metrics_url(&self, i: usize) -> anyhow::Result<String> {
        let mut rx = self.worker_metrics[i].clone();
        let url = tokio::time::timeout(Duration::from_secs(60), rx.wait_for(Option::is_some))
            .await
            .with_context(|| format!("worker {i} printed no metrics address within 60 s"))?
            .with_context(|| format!("worker {i} exited before printing its metrics address"))?;
        Ok(url.clone().unwrap_or_default())
    }

    /// Sends a signal (`"TERM"`, `"KILL"`) to worker `i`.
    pub async fn signal_worker(&mut self, i: usize, signal: &str) -> anyhow::Result<()> {
        let pid = self.workers[i].id().context("worker already exited")?;
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .await?;
        anyhow::ensure!(status.success(), "kill -{signal} {pid} failed");
        Ok(())
    }

    /// Waits for worker `i` to exit, returning its exit code.
    pub async fn wait_worker(
        &mut self,
        i: usize,
        deadline: Duration,
    ) -> anyhow::Result<Option<i32>> {
        let status = tokio::time::timeout(deadline, self.workers[i].wait())
            .await
            .with_context(|| format!("worker {i} still running after {deadline:?}"))??;
        Ok(status.code())
    }

    /// The name of one of this test's queues (`work`, `dead`).
    pub fn queue(&self, name: &str) -> String {
        format!("{}.{name}", self.prefix)
    }

    /// Publishes raw bytes straight to the work queue, as a broken or
    /// duplicating publisher would.
    pub async fn publish_raw(&self, body: &[u8]) -> anyhow::Result<()> {
        let conn =
            lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default()).await?;
        let ch = conn.create_channel().await?;
        ch.confirm_select(lapin::options::ConfirmSelectOptions::default())
            .await?;
        let props = lapin::BasicProperties::default().with_delivery_mode(2);
        let confirm = ch
            .basic_publish(
                "".into(),
                self.queue("work").as_str().into(),
                lapin::options::BasicPublishOptions::default(),
                body,
                props,
            )
            .await?
            .await?;
        anyhow::ensure!(confirm.is_ack(), "the broker refused the raw publish");
        conn.close(200, "done".into()).await?;
        Ok(())
    }

    /// Messages ready in one of this test's queues.
    pub async fn queue_depth(&self, name: &str) -> anyhow::Result<u32> {
        let conn =
            lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default()).await?;
        let ch = conn.create_channel().await?;
        let q = ch
            .queue_declare(
                self.queue(name).as_str().into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await?;
        conn.close(200, "done".into()).await?;
        Ok(q.message_count())
    }

    /// Waits until at least `n` jobs are terminal.
    pub async fn wait_terminal_count(&self, n: i64, deadline: Duration) -> anyhow::Result<()> {
        eventually("every job terminal", deadline, || async {
            let done: i64 = sqlx::query_scalar(
                "select count(*) from jobs where status in ('succeeded', 'failed', 'cancelled')",
            )
            .fetch_one(&self.db)
            .await?;
            Ok((done >= n).then_some(()))
        })
        .await
    }

    /// Counts of jobs in PostgreSQL by status, and assistant messages per job.
    pub async fn job_summary(&self) -> anyhow::Result<JobSummary> {
        let by_status: Vec<(String, i64)> =
            sqlx::query_as("select status, count(*) from jobs group by status order by status")
                .fetch_all(&self.db)
                .await?;
        let max_replies: Option<i64> = sqlx::query_scalar(
            "select max(n) from (select count(*) as n from messages where role = 'assistant' group by job_id) t",
        )
        .fetch_one(&self.db)
        .await?;
        let orphan_replies: i64 = sqlx::query_scalar(
            "select count(*) from messages m where role = 'assistant'
             and not exists (select 1 from jobs j where j.id = m.job_id and j.status = 'succeeded')",
        )
        .fetch_one(&self.db)
        .await?;
        let succeeded_without_reply: i64 = sqlx::query_scalar(
            "select count(*) from jobs j where status = 'succeeded'
             and not exists (select 1 from messages m where m.job_id = j.id and m.role = 'assistant')",
        )
        .fetch_one(&self.db)
        .await?;
        Ok(JobSummary {
            by_status,
            max_replies_per_job: max_replies.unwrap_or(0),
            orphan_replies,
            succeeded_without_reply,
        })
    }

    /// The worker process `i`.
    pub fn worker(&mut self, i: usize) -> &mut Child {
        &mut self.workers[i]
    }

    /// Creates an API key for `tenant`, returning (key id, key).
    pub async fn create_key(&self, tenant: &str) -> anyhow::Result<(String, String)> {
        let r = self
            .api
            .admin_post("/admin/v1/api-keys", &serde_json::json!({"tenant": tenant}))
            .await?;
        if r.status != 201 {
            bail!("creating a key answered {}: {}", r.status, r.body);
        }
        Ok((r.str("id"), r.str("key")))
    }

    /// Mock LLM counters: `{"total", "in_flight", "by_prompt"}`.
    pub async fn mock_stats(&self) -> anyhow::Result<serde_json::Value> {
        Ok(self
            .api
            .http
            .get(format!("{}/_mock/stats", self.mock_url))
            .send()
            .await?
            .json()
            .await?)
    }

    /// The request bodies the mock LLM received, oldest first.
    pub async fn mock_requests(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        let v: serde_json::Value = self
            .api
            .http
            .get(format!("{}/_mock/requests", self.mock_url))
            .send()
            .await?
            .json()
            .await?;
        Ok(v["data"].as_array().cloned().unwrap_or_default())
    }

    /// Stops everything and removes the database and queues. Also done
    /// (blocking) on drop, so a failed test cleans up too.
    pub async fn cleanup(mut self) {
        self.cleaned = true;
        self.db.close().await;
        cleanup(
            self.take_children(),
            self.db_name.clone(),
            self.prefix.clone(),
        )
        .await;
    }

    fn take_children(&mut self) -> Vec<Child> {
        let mut all = std::mem::take(&mut self.workers);
        all.push(std::mem::replace(&mut self.api_proc, dummy_child()));
        all.push(std::mem::replace(&mut self.mock_proc, dummy_child()));
        all
    }
}

fn dummy_child() -> Child {
    Command::new("true")
        .kill_on_drop(true)
        .spawn()
        .expect("`true` runs")
}

async fn cleanup(children: Vec<Child>, db_name: String, prefix: String) {
    for mut c in children {
        let _ = c.kill().await;
    }
    let server = format!("{}/postgres", pg_base_url());
    let admin = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&server);
    if let Ok(admin) = admin.await {
        let drop_db = format!("drop database if exists {db_name} with (force)");
        let _ = sqlx::query(sqlx::AssertSqlSafe(drop_db))
            .execute(&admin)
            .await;
        admin.close().await;
    }
    if let Ok(conn) =
        lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default()).await
        && let Ok(ch) = conn.create_channel().await
    {
        let _ = Topology::with_prefix(&prefix, 0).delete(&ch).await;
        let _ = conn.close(200, "test done".into()).await;
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        // Kill without awaiting: the runtime that reaps these children may
        // be the one unwinding right now.
        for mut child in self.take_children() {
            let _ = child.start_kill();
        }
        let (db_name, prefix) = (self.db_name.clone(), self.prefix.clone());
        // Drop may run inside a runtime (or while unwinding): clean up on a
        // thread with a runtime of its own.
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(cleanup(Vec::new(), db_name, prefix));
            }
        })
        .join();
    }
}

/// An extra api process of a test environment.
pub struct ApiProcess {
    /// Its client.
    pub api: Api,
    _child: Child,
}

/// Starts another `chatq-api` on the environment's database and queues,
/// with extra environment (e.g. a proxied `DATABASE_URL`).
pub async fn spawn_api(env: &TestEnv, extra: &[(&str, &str)]) -> anyhow::Result<ApiProcess> {
    let mut envs: Vec<(String, String)> = vec![
        ("DATABASE_URL".into(), env.db_url.clone()),
        ("AMQP_URL".into(), amqp_url()),
        ("CHATQ_QUEUE_PREFIX".into(), env.prefix.clone()),
        ("CHATQ_API_ADDR".into(), "127.0.0.1:0".into()),
        ("CHATQ_ADMIN_TOKEN".into(), ADMIN_TOKEN.into()),
        ("CHATQ_DB_MAX_CONNECTIONS".into(), "5".into()),
    ];
    envs.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    let mut child = command("chatq-api", &envs)
        .spawn()
        .context("starting chatq-api")?;
    let url = read_listen_line(&mut child, "chatq-api").await?;
    let api = Api::new(url);
    api.wait_ready().await?;
    Ok(ApiProcess { api, _child: child })
}

/// Job end states in PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSummary {
    /// (status, count), sorted by status.
    pub by_status: Vec<(String, i64)>,
    /// The most assistant messages any one job has (1 is right).
    pub max_replies_per_job: i64,
    /// Assistant messages whose job is not `succeeded` (0 is right).
    pub orphan_replies: i64,
    /// Succeeded jobs without an assistant message (0 is right).
    pub succeeded_without_reply: i64,
}

impl JobSummary {
    /// How many jobs have `status`.
    pub fn count(&self, status: &str) -> i64 {
        self.by_status
            .iter()
            .find(|(s, _)| s == status)
            .map_or(0, |(_, n)| *n)
    }

    /// Asserts every job succeeded with exactly one reply.
    pub fn assert_all_succeeded_once(&self, expected: i64) {
        assert_eq!(
            self.by_status,
            vec![("succeeded".to_owned(), expected)],
            "every accepted job succeeded: {self:?}"
        );
        assert_eq!(
            self.max_replies_per_job, 1,
            "one assistant message per job: {self:?}"
        );
        assert_eq!(
            (self.orphan_replies, self.succeeded_without_reply),
            (0, 0),
            "{self:?}"
        );
    }
}

/// Polls `check` every 100 ms until it returns `Some`, failing after `deadline`.
pub async fn eventually<T, F, Fut>(
    what: &str,
    deadline: Duration,
    mut check: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= end {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
