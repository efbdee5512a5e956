//! Restarts of the machine's real RabbitMQ and PostgreSQL. They share these
//! services with every other test, so this binary holds one lock for both
//! tests (cargo runs test binaries one after another, so no other binary
//! runs meanwhile), and a guard brings the service back even when a test
//! fails.

use std::process::Command;
use std::time::Duration;

use chatq_tests::{EnvOptions, TestEnv, eventually};
use serde_json::json;
use tokio::sync::Mutex;

const DEADLINE: Duration = Duration::from_secs(120);
static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

/// Runs a service command; on drop, runs the command that brings it back.
struct ServiceGuard {
    restore: Vec<String>,
}

impl Drop for ServiceGuard {
    fn drop(&mut self) {
        let _ = Command::new(&self.restore[0])
            .args(&self.restore[1..])
            .status();
        let _ = Command::new("scripts/services.sh")
            .current_dir(workspace_root())
            .status();
    }
}

fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(cmd: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(cmd[0]).args(&cmd[1..]).status()?;
    anyhow::ensure!(status.success(), "{cmd:?} failed: {status}");
    Ok(())
}

fn pg_cluster_version() -> anyhow::Result<String> {
    let mut versions: Vec<String> = std::fs::read_dir("/etc/postgresql")?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    versions.sort();
    versions
        .pop()
        .ok_or_else(|| anyhow::anyhow!("no PostgreSQL cluster under /etc/postgresql"))
}

async fn submit_many(env: &TestEnv, key: &str, n: usize, tag: &str) -> anyhow::Result<usize> {
    let mut accepted = 0;
    for i in 0..n {
        let r = env
            .api
            .post("/v1/chat", key, &json!({"content": format!("{tag} {i}")}))
            .await?;
        anyhow::ensure!(
            r.status == 202 || r.status == 503,
            "submit answered {}: {}",
            r.status,
            r.body
        );
        accepted += usize::from(r.status == 202);
    }
    Ok(accepted)
}

async fn wait_all_succeeded(env: &TestEnv, n: i64) -> anyhow::Result<()> {
    eventually("every accepted job succeeded", DEADLINE, || async {
        let done: i64 = sqlx::query_scalar("select count(*) from jobs where status = 'succeeded'")
            .fetch_one(&env.db)
            .await?;
        Ok((done >= n).then_some(()))
    })
    .await?;
    env.job_summary().await?.assert_all_succeeded_once(n);
    Ok(())
}

#[tokio::test]
async fn rabbitmq_restart_loses_nothing_and_workers_consume_again() -> anyhow::Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (env, key) = TestEnv::start_with_key(EnvOptions {
        workers: 2,
        mock_env: vec![("CHATQ_MOCK_LATENCY_MS".into(), "500".into())],
        ..Default::default()
    })
    .await?;
    let before = submit_many(&env, &key, 20, "before").await?;

    let _guard = ServiceGuard {
        restore: vec!["rabbitmqctl".into(), "start_app".into()],
    };
    run(&["rabbitmqctl", "-q", "stop_app"])?;
    let during = submit_many(&env, &key, 10, "during").await?;
    assert_eq!(
        during, 10,
        "the database is up: submissions are accepted while the broker is down"
    );
    run(&["rabbitmqctl", "-q", "start_app"])?;
    run(&["rabbitmqctl", "-q", "await_startup"])?;

    let after = submit_many(&env, &key, 10, "after").await?;
    wait_all_succeeded(&env, (before + during + after) as i64).await?;
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn postgresql_restart_mid_run_every_job_still_ends_once() -> anyhow::Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let version = pg_cluster_version()?;
    let (env, key) = TestEnv::start_with_key(EnvOptions {
        workers: 2,
        mock_env: vec![("CHATQ_MOCK_LATENCY_MS".into(), "1000".into())],
        ..Default::default()
    })
    .await?;
    let accepted = submit_many(&env, &key, 30, "pg").await?;

    let _guard = ServiceGuard {
        restore: [
            "pg_ctlcluster",
            "--skip-systemctl-redirect",
            &version,
            "main",
            "start",
        ]
        .map(String::from)
        .to_vec(),
    };
    run(&[
        "pg_ctlcluster",
        "--skip-systemctl-redirect",
        &version,
        "main",
        "restart",
    ])?;

    // The test's own pool reconnects too; wait until every job ended.
    wait_all_succeeded(&env, accepted as i64).await?;
    env.cleanup().await;
    Ok(())
}
