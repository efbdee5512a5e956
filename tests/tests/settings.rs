//! DESIGN.md's fixed settings that change where things live: the direct
//! connection used for `LISTEN`, and the retention of finished jobs.

use std::time::Duration;

use chatq_tests::{EnvOptions, TestEnv, env_of, eventually};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(60);

#[tokio::test]
async fn listen_connections_use_chatq_listen_database_url() -> anyhow::Result<()> {
    let (env, key) = TestEnv::start_with_key(EnvOptions {
        workers: 0,
        ..Default::default()
    })
    .await?;
    let sep = if env.db_url.contains('?') { '&' } else { '?' };
    let listen_url = format!("{}{sep}application_name=chatq-listen", env.db_url);
    let listen = [("CHATQ_LISTEN_DATABASE_URL", listen_url.as_str())];
    let api = chatq_tests::spawn_api(&env, &listen).await?;
    let mut env = env;
    env.start_worker(&listen).await?;

    // A long-poll on the second api is answered through its listener.
    let conv = api.api.create_conversation(&key, &json!({})).await?;
    let job = api.api.submit(&key, &conv, "hello").await?;
    let id = job["id"].as_str().unwrap_or_default().to_owned();
    let done = api.api.get(&format!("/v1/jobs/{id}?wait=30"), &key).await?;
    assert_eq!(done.body["status"], "succeeded", "{}", done.body);

    let listening: i64 = sqlx::query_scalar(
        "select count(*) from pg_stat_activity
         where datname = current_database() and application_name = 'chatq-listen'
           and query ilike 'listen%'",
    )
    .fetch_one(&env.db)
    .await?;
    // The api's listener and the worker's (cancellations, LLM budget).
    assert!(
        listening >= 2,
        "LISTEN connections on CHATQ_LISTEN_DATABASE_URL: {listening}"
    );
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn finished_jobs_past_chatq_retention_days_are_deleted_and_messages_stay()
-> anyhow::Result<()> {
    let (env, key) = TestEnv::start_with_key(EnvOptions {
        workers: 1,
        // About 1.7 s.
        worker_env: env_of(&[("CHATQ_RETENTION_DAYS", "0.00002")]),
        ..Default::default()
    })
    .await?;
    let conv = env.api.create_conversation(&key, &json!({})).await?;
    let job = env.api.submit(&key, &conv, "short-lived").await?;
    let id = job["id"].as_str().unwrap_or_default().to_owned();
    let done = env.api.wait_terminal(&key, &id, DEADLINE).await?;
    assert_eq!(done["status"], "succeeded");
    // The sweep runs at start and every minute: restart it by starting a
    // second worker once the job is old enough.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut env = env;
    env.start_worker(&[("CHATQ_RETENTION_DAYS", "0.00002")])
        .await?;
    eventually("the job deleted", DEADLINE, || async {
        let r = env.api.get(&format!("/v1/jobs/{id}"), &key).await?;
        Ok((r.status == 404).then_some(()))
    })
    .await?;
    let messages = env
        .api
        .get(&format!("/v1/conversations/{conv}/messages"), &key)
        .await?;
    let roles: Vec<&str> = messages.body["data"]
        .as_array()
        .map(|m| m.iter().filter_map(|m| m["role"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(roles, ["user", "assistant"], "{}", messages.body);
    // A job that has not finished is never deleted, whatever its age.
    env.api
        .admin_post("/admin/v1/queues/pause", &json!({}))
        .await?;
    let waiting = env.api.submit(&key, &conv, "still waiting").await?;
    let waiting = waiting["id"].as_str().unwrap_or_default().to_owned();
    tokio::time::sleep(Duration::from_secs(2)).await;
    env.start_worker(&[("CHATQ_RETENTION_DAYS", "0.00002")])
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r = env.api.get(&format!("/v1/jobs/{waiting}"), &key).await?;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"], "queued");
    env.cleanup().await;
    Ok(())
}
