//! Starting and stopping a private chatq deployment: a fresh database and
//! queue prefix, the mock LLM, the api and N workers, all on free ports of
//! 127.0.0.1. Everything is torn down at the end, also on error (children
//! are `kill_on_drop`).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use sqlx::PgPool;
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};
use uuid::Uuid;

/// The admin token of every api the benchmark starts.
pub const ADMIN_TOKEN: &str = "bench-admin-token";

/// Where the shared services are.
#[derive(Debug, Clone)]
pub struct Infra {
    /// PostgreSQL server URL without a database, e.g. `postgres://postgres@127.0.0.1:5432`.
    pub pg_url: String,
    /// RabbitMQ URL.
    pub amqp_url: String,
}

/// How one deployment is started.
#[derive(Debug, Clone)]
pub struct SystemOptions {
    /// Worker processes started with the system (more can be added later).
    pub workers: usize,
    /// `CHATQ_WORKER_CONCURRENCY` per worker.
    pub worker_concurrency: u32,
    /// `CHATQ_DB_MAX_CONNECTIONS` per worker (`None`: the default).
    pub worker_db_connections: Option<u32>,
    /// `CHATQ_MOCK_LATENCY_MS`.
    pub mock_latency_ms: u64,
    /// `CHATQ_MAX_QUEUE_LENGTH`.
    pub max_queue_length: u64,
    /// Extra environment of the api process (e.g. `CHATQ_MAX_CONNECTIONS`).
    pub api_env: Vec<(String, String)>,
    /// Extra environment of every worker process (e.g. `CHATQ_LLM_MAX_CONCURRENCY`).
    pub worker_env: Vec<(String, String)>,
}

impl Default for SystemOptions {
    fn default() -> Self {
        Self {
            workers: 2,
            worker_concurrency: 64,
            worker_db_connections: None,
            mock_latency_ms: 0,
            max_queue_length: 1_000_000,
            api_env: Vec::new(),
            worker_env: Vec::new(),
        }
    }
}

/// Creates a database `chatq_bench_<random>`, returning (name, url).
pub async fn create_database(infra: &Infra) -> anyhow::Result<(String, String)> {
    let name = format!("chatq_bench_{}", &Uuid::new_v4().simple().to_string()[..16]);
    let admin = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&format!("{}/postgres", infra.pg_url))
        .await
        .with_context(|| {
            format!(
                "connecting to PostgreSQL at {} (is it running?)",
                infra.pg_url
            )
        })?;
    sqlx::query(sqlx::AssertSqlSafe(format!("create database {name}")))
        .execute(&admin)
        .await
        .context("creating the bench database")?;
    admin.close().await;
    let url = format!("{}/{name}", infra.pg_url);
    Ok((name, url))
}

/// Drops a database created by [`create_database`] (errors are ignored).
pub async fn drop_database(infra: &Infra, name: &str) {
    let admin = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&format!("{}/postgres", infra.pg_url))
        .await;
    if let Ok(admin) = admin {
        let sql = format!("drop database if exists {name} with (force)");
        let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&admin).await;
        admin.close().await;
    }
}

/// Deletes the queues and exchange of a queue prefix (errors are ignored).
async fn delete_queues(infra: &Infra, prefix: &str) {
    let props = lapin::ConnectionProperties::default();
    if let Ok(conn) = lapin::Connection::connect(&infra.amqp_url, props).await
        && let Ok(ch) = conn.create_channel().await
    {
        let _ = chatq_common::queue::Topology::with_prefix(prefix, 0)
            .delete(&ch)
            .await;
        let _ = conn.close(200, "bench done".into()).await;
    }
}

/// The directory holding the chatq binaries: the bench executable's own.
fn bin_path(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the bench executable")?;
    let dir = exe
        .parent()
        .context("the bench executable has no directory")?;
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} is missing: build the binaries first (cargo build --release --workspace --bins)",
            path.display()
        );
    }
    Ok(path)
}

fn command(name: &str, envs: &[(String, String)]) -> anyhow::Result<Command> {
    let mut cmd = Command::new(bin_path(name)?);
    // `RUST_LOG` among `envs` wins; else `CHATQ_BENCH_LOG`, else `error`.
    if !envs.iter().any(|(k, _)| k == "RUST_LOG") {
        cmd.env(
            "RUST_LOG",
            std::env::var("CHATQ_BENCH_LOG").unwrap_or_else(|_| "error".into()),
        );
    }
    cmd.envs(envs.iter().cloned())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    Ok(cmd)
}

/// A running private deployment.
pub struct System {
    /// The shared services.
    pub infra: Infra,
    /// Database name.
    pub db_name: String,
    /// Database URL.
    pub db_url: String,
    /// A small pool on the database, for verification queries.
    pub db: PgPool,
    /// Queue prefix.
    pub prefix: String,
    /// Api base URL.
    pub api_url: String,
    /// Mock LLM base URL (without `/v1`).
    pub mock_url: String,
    /// An API key of tenant `bench`.
    pub key: String,
    /// Process id of the api.
    pub api_pid: Option<u32>,
    /// Process id of the mock LLM.
    pub mock_pid: Option<u32>,
    children: Vec<Child>,
    workers: Vec<Child>,
    api_env: Vec<(String, String)>,
    worker_env: Vec<(String, String)>,
    analyzer: Option<tokio::task::JoinHandle<()>>,
}

impl System {
    /// Starts a fresh deployment and waits until the api is ready.
    pub async fn start(
        infra: &Infra,
        http: &reqwest::Client,
        opts: &SystemOptions,
    ) -> anyhow::Result<Self> {
        let (db_name, db_url) = create_database(infra).await?;
        let prefix = format!("bench_{}", &Uuid::new_v4().simple().to_string()[..12]);
        let db = match sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(&db_url)
            .await
        {
            Ok(db) => db,
            Err(err) => {
                drop_database(infra, &db_name).await;
                return Err(err).context("connecting to the bench database");
            }
        };
        let mut sys = Self {
            infra: infra.clone(),
            db_name,
            db_url,
            db,
            prefix,
            api_url: String::new(),
            mock_url: String::new(),
            key: String::new(),
            api_pid: None,
            mock_pid: None,
            children: vec![],
            workers: vec![],
            api_env: vec![],
            worker_env: vec![],
            analyzer: None,
        };
        sys.analyzer = Some(tokio::spawn(analyze_every(sys.db.clone(), ANALYZE_EVERY)));
        match sys.boot(http, opts).await {
            Ok(()) => Ok(sys),
            Err(err) => {
                sys.stop().await;
                Err(err)
            }
        }
    }

    async fn boot(&mut self, http: &reqwest::Client, opts: &SystemOptions) -> anyhow::Result<()> {
        let mock_env = vec![
            ("CHATQ_MOCK_ADDR".to_owned(), "127.0.0.1:0".to_owned()),
            (
                "CHATQ_MOCK_LATENCY_MS".to_owned(),
                opts.mock_latency_ms.to_string(),
            ),
        ];
        let mut mock = command("chatq-mock-llm", &mock_env)?
            .spawn()
            .context("starting chatq-mock-llm")?;
        self.mock_pid = mock.id();
        let mock_url = chatq_tests::read_listen_line(&mut mock, "chatq-mock-llm").await;
        self.children.push(mock);
        self.mock_url = mock_url?;

        let common = vec![
            ("DATABASE_URL".to_owned(), self.db_url.clone()),
            ("AMQP_URL".to_owned(), self.infra.amqp_url.clone()),
            ("CHATQ_QUEUE_PREFIX".to_owned(), self.prefix.clone()),
            (
                "CHATQ_MAX_QUEUE_LENGTH".to_owned(),
                opts.max_queue_length.to_string(),
            ),
        ];
        let mut api_env = common.clone();
        api_env.push(("CHATQ_API_ADDR".into(), "127.0.0.1:0".into()));
        api_env.push(("CHATQ_ADMIN_TOKEN".into(), ADMIN_TOKEN.into()));
        api_env.push(("CHATQ_SHUTDOWN_GRACE_SECS".into(), "2".into()));
        // One tenant here: the queue bound measured is the broker's, not the
        // per-tenant share.
        api_env.push(("CHATQ_TENANT_QUEUE_SHARE".into(), "1".into()));
        api_env.extend(opts.api_env.iter().cloned());
        self.api_env = api_env.clone();
        let mut api = command("chatq-api", &api_env)?
            .spawn()
            .context("starting chatq-api")?;
        self.api_pid = api.id();
        let api_url = chatq_tests::read_listen_line(&mut api, "chatq-api").await;
        self.children.push(api);
        self.api_url = api_url?;

        let mut worker_env = common;
        worker_env.push(("OPENAI_BASE_URL".into(), format!("{}/v1", self.mock_url)));
        worker_env.push((
            "CHATQ_WORKER_CONCURRENCY".into(),
            opts.worker_concurrency.to_string(),
        ));
        worker_env.push(("CHATQ_SHUTDOWN_GRACE_SECS".into(), "2".into()));
        // Each worker's /metrics listener on a free port: several run at once.
        worker_env.push(("CHATQ_WORKER_METRICS_ADDR".into(), "127.0.0.1:0".into()));
        if let Some(n) = opts.worker_db_connections {
            worker_env.push(("CHATQ_DB_MAX_CONNECTIONS".into(), n.to_string()));
        }
        worker_env.extend(opts.worker_env.iter().cloned());
        self.worker_env = worker_env;

        wait_ready(http, &self.api_url).await?;
        self.key = create_key(http, &self.api_url, ADMIN_TOKEN).await?;
        self.start_workers(opts.workers)?;
        Ok(())
    }

    /// Starts `n` more worker processes.
    pub fn start_workers(&mut self, n: usize) -> anyhow::Result<()> {
        for _ in 0..n {
            let child = command("chatq-worker", &self.worker_env)?
                .stdout(Stdio::null())
                .spawn()
                .context("starting chatq-worker")?;
            self.workers.push(child);
        }
        Ok(())
    }

    /// Starts one more api process on the same database and queue, with
    /// `env` added to the first api's environment and its stderr (its
    /// log) going to `stderr`; returns its base URL and process id.
    pub async fn start_extra_api(
        &mut self,
        http: &reqwest::Client,
        env: &[(String, String)],
        stderr: Stdio,
    ) -> anyhow::Result<(String, Option<u32>)> {
        let mut all = self.api_env.clone();
        all.extend(env.iter().cloned());
        let mut api = command("chatq-api", &all)?
            .stderr(stderr)
            .spawn()
            .context("starting another chatq-api")?;
        let pid = api.id();
        let url = chatq_tests::read_listen_line(&mut api, "chatq-api").await;
        self.children.push(api);
        let url = url?;
        wait_ready(http, &url).await?;
        Ok((url, pid))
    }

    /// Starts one worker process with `env` added to the workers'
    /// environment and its stderr (its log) going to `stderr`, and waits
    /// for its metrics listener; returns its process id and `/metrics` URL.
    pub async fn start_watched_worker(
        &mut self,
        env: &[(String, String)],
        stderr: Stdio,
    ) -> anyhow::Result<(Option<u32>, String)> {
        let mut all = self.worker_env.clone();
        all.extend(env.iter().cloned());
        let mut child = command("chatq-worker", &all)?
            .stderr(stderr)
            .spawn()
            .context("starting chatq-worker")?;
        let pid = child.id();
        let stdout = child.stdout.take();
        self.workers.push(child);
        let stdout = stdout.context("worker stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let prefix = "chatq-worker metrics listening on ";
        let url = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(url) = line.strip_prefix(prefix) {
                    return Ok(url.trim().to_owned());
                }
            }
            bail!("chatq-worker exited before its metrics listener started")
        })
        .await
        .context("chatq-worker's metrics listener did not start within 60 s")??;
        // Keep draining stdout so the worker never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok((pid, format!("{url}/metrics")))
    }

    /// Process ids of the running workers.
    pub fn worker_pids(&self) -> Vec<u32> {
        self.workers.iter().filter_map(Child::id).collect()
    }

    /// Sets the mock LLM latency at run time.
    pub async fn set_mock_latency(&self, http: &reqwest::Client, ms: u64) -> anyhow::Result<()> {
        let r = http
            .post(format!("{}/_mock/config", self.mock_url))
            .json(&serde_json::json!({"latency_ms": ms}))
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("setting the mock latency answered {}", r.status());
        }
        Ok(())
    }

    /// Pauses (`true`) or resumes the work queue through the admin api:
    /// once paused, no job is claimed until resumed.
    pub async fn set_paused(&self, http: &reqwest::Client, paused: bool) -> anyhow::Result<()> {
        let action = if paused { "pause" } else { "resume" };
        let r = http
            .post(format!("{}/admin/v1/queues/{action}", self.api_url))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("{action} answered {}", r.status());
        }
        Ok(())
    }

    /// Kills the workers (the measurement that needed them is over).
    pub async fn stop_workers(&mut self) {
        for mut c in self.workers.drain(..) {
            let _ = c.kill().await;
        }
    }

    /// Empties the database's chat tables and the work queue, so the next
    /// measurement starts from the same state as the first.
    pub async fn reset(&self) -> anyhow::Result<()> {
        sqlx::query("truncate conversations, jobs, messages")
            .execute(&self.db)
            .await?;
        let props = lapin::ConnectionProperties::default();
        let conn = lapin::Connection::connect(&self.infra.amqp_url, props).await?;
        let ch = conn.create_channel().await?;
        let topology = chatq_common::queue::Topology::with_prefix(&self.prefix, 0);
        ch.queue_purge(
            topology.work_queue.as_str().into(),
            lapin::options::QueuePurgeOptions::default(),
        )
        .await?;
        let _ = conn.close(200, "reset".into()).await;
        Ok(())
    }

    /// Kills every process, drops the database and deletes the queues.
    pub async fn stop(mut self) {
        if let Some(analyzer) = self.analyzer.take() {
            analyzer.abort();
        }
        for mut c in self.workers.drain(..).chain(self.children.drain(..)) {
            let _ = c.kill().await;
        }
        self.db.close().await;
        drop_database(&self.infra, &self.db_name).await;
        delete_queues(&self.infra, &self.prefix).await;
    }
}

/// How often the bench analyzes its fresh database.
const ANALYZE_EVERY: Duration = Duration::from_secs(5);

/// Stands in for autovacuum's first passes, which on a brand-new database
/// come only after `autovacuum_naptime` (60 s): until then PostgreSQL plans
/// for empty tables (sequential scans, cached in prepared statements), and
/// every scenario here runs on a fresh database for about that long.
async fn analyze_every(db: PgPool, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        if let Err(err) = sqlx::query("analyze conversations, jobs, messages")
            .execute(&db)
            .await
        {
            // 42P01: the api has not applied its migrations yet.
            let undefined_table = err
                .as_database_error()
                .and_then(|e| e.code())
                .is_some_and(|code| code == "42P01");
            if !undefined_table {
                eprintln!("bench: analyze failed: {err}");
            }
        }
    }
}

/// Waits until `GET /readyz` answers 200 (at most 30 s).
pub async fn wait_ready(http: &reqwest::Client, api_url: &str) -> anyhow::Result<()> {
    for _ in 0..300 {
        if let Ok(r) = http.get(format!("{api_url}/readyz")).send().await
            && r.status().as_u16() == 200
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the api at {api_url} never became ready")
}

/// Creates an API key for tenant `bench`, returning the key.
pub async fn create_key(
    http: &reqwest::Client,
    api_url: &str,
    admin_token: &str,
) -> anyhow::Result<String> {
    let r = http
        .post(format!("{api_url}/admin/v1/api-keys"))
        .bearer_auth(admin_token)
        .json(&serde_json::json!({"tenant": "bench"}))
        .send()
        .await?;
    let status = r.status();
    let body: serde_json::Value = r.json().await.unwrap_or_default();
    match body["key"].as_str() {
        Some(k) if status.is_success() => Ok(k.to_owned()),
        _ => bail!("creating an API key answered {status}: {body}"),
    }
}
