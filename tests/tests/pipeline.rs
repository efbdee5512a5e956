//! The core pipeline end to end: submit → RabbitMQ → worker → PostgreSQL →
//! poll, with real processes, checked in PostgreSQL.

use std::time::Duration;

use chatq_tests::{EnvOptions, TestEnv};
use serde_json::json;
use sqlx::Row;

const DEADLINE: Duration = Duration::from_secs(60);

#[tokio::test]
async fn submitted_message_gets_one_assistant_reply_stored_in_postgres() -> anyhow::Result<()> {
    // Arrange
    let (env, key) = TestEnv::start_with_key(EnvOptions::default()).await?;
    let conv = env
        .api
        .create_conversation(&key, &json!({"system_prompt": "be brief"}))
        .await?;

    // Act
    let r = env
        .api
        .post(
            &format!("/v1/conversations/{conv}/messages"),
            &key,
            &json!({"content": "hello"}),
        )
        .await?;
    assert_eq!(r.status, 202, "{}", r.body);
    let job_id = r.str("id");
    assert_eq!(
        r.header("location").as_deref(),
        Some(format!("/v1/jobs/{job_id}").as_str())
    );
    assert_eq!(r.body["status"], "queued");
    let job = env.api.wait_terminal(&key, &job_id, DEADLINE).await?;

    // Assert: the API's view ...
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["attempts"], 1);
    let content = job["result"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(content.starts_with("mock reply"), "{content}");
    assert!(job.get("error").is_none());
    assert_eq!(
        job["result"]["usage"]["total_tokens"].as_i64(),
        Some(
            job["result"]["usage"]["prompt_tokens"]
                .as_i64()
                .unwrap_or(-1)
                + job["result"]["usage"]["completion_tokens"]
                    .as_i64()
                    .unwrap_or(-1)
        )
    );
    // ... matches PostgreSQL: one user and one assistant message, the job succeeded.
    let rows =
        sqlx::query("select role, content, job_id::text as job_id from messages order by seq")
            .fetch_all(&env.db)
            .await?;
    let got: Vec<(String, String)> = rows
        .iter()
        .map(|r| (r.get("role"), r.get("content")))
        .collect();
    assert_eq!(
        got,
        vec![
            ("user".to_owned(), "hello".to_owned()),
            ("assistant".to_owned(), content.clone())
        ]
    );
    let status: String = sqlx::query_scalar("select status from jobs where id = $1::uuid")
        .bind(&job_id)
        .fetch_one(&env.db)
        .await?;
    assert_eq!(status, "succeeded");
    // The mock saw exactly one call, with the system prompt first.
    assert_eq!(env.mock_stats().await?["total"], 1);
    let reqs = env.mock_requests().await?;
    assert_eq!(
        reqs[0]["messages"][0],
        json!({"role": "system", "content": "be brief"})
    );
    // The messages endpoint shows the same conversation.
    let msgs = env
        .api
        .get(&format!("/v1/conversations/{conv}/messages"), &key)
        .await?;
    assert_eq!(msgs.body["data"].as_array().map(Vec::len), Some(2));
    assert_eq!(msgs.body["data"][1]["role"], "assistant");
    assert_eq!(msgs.body["data"][1]["job_id"], job_id.as_str());
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn second_turn_prompt_contains_the_first_reply() -> anyhow::Result<()> {
    let (env, key) = TestEnv::start_with_key(EnvOptions::default()).await?;
    let conv = env.api.create_conversation(&key, &json!({})).await?;

    let first = env.api.submit(&key, &conv, "first question").await?;
    let first = env
        .api
        .wait_terminal(&key, first["id"].as_str().unwrap_or_default(), DEADLINE)
        .await?;
    let first_reply = first["result"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let second = env.api.submit(&key, &conv, "second question").await?;
    let second = env
        .api
        .wait_terminal(&key, second["id"].as_str().unwrap_or_default(), DEADLINE)
        .await?;
    assert_eq!(second["status"], "succeeded");

    let reqs = env.mock_requests().await?;
    assert_eq!(reqs.len(), 2);
    assert_eq!(
        reqs[1]["messages"],
        json!([
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": first_reply},
            {"role": "user", "content": "second question"},
        ])
    );
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn two_hundred_concurrent_conversations_each_get_exactly_one_reply() -> anyhow::Result<()> {
    let (env, key) = TestEnv::start_with_key(EnvOptions {
        workers: 2,
        ..Default::default()
    })
    .await?;
    let n = 200;

    let submissions = (0..n).map(|i| {
        let (api, key) = (env.api.clone(), key.clone());
        async move {
            let r = api
                .post(
                    "/v1/chat",
                    &key,
                    &json!({"content": format!("question {i}")}),
                )
                .await?;
            anyhow::ensure!(
                r.status == 202,
                "submit {i} answered {}: {}",
                r.status,
                r.body
            );
            let job = api.wait_terminal(&key, &r.str("id"), DEADLINE).await?;
            Ok::<_, anyhow::Error>(job)
        }
    });
    let jobs = futures_util::future::try_join_all(submissions).await?;

    assert!(
        jobs.iter().all(|j| j["status"] == "succeeded"),
        "every job succeeds"
    );
    let succeeded: i64 = sqlx::query_scalar("select count(*) from jobs where status = 'succeeded'")
        .fetch_one(&env.db)
        .await?;
    assert_eq!(succeeded, n);
    let per_job: Vec<i64> = sqlx::query_scalar(
        "select count(m.id) from jobs j left join messages m on m.job_id = j.id and m.role = 'assistant'
         group by j.id",
    )
    .fetch_all(&env.db)
    .await?;
    assert_eq!(per_job.len(), 200);
    assert!(
        per_job.iter().all(|&c| c == 1),
        "exactly one assistant message per job: {per_job:?}"
    );
    assert_eq!(env.mock_stats().await?["total"], n, "one LLM call per job");
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn llm_errors_are_retried_or_fail_the_job_with_a_clear_code() -> anyhow::Result<()> {
    let (env, key) = TestEnv::start_with_key(EnvOptions::default()).await?;

    // Two 500s, then success: retried in-process, three attempts.
    let conv = env.api.create_conversation(&key, &json!({})).await?;
    let job = env
        .api
        .submit(&key, &conv, "flaky [mock:fail_first=2]")
        .await?;
    let job = env
        .api
        .wait_terminal(&key, job["id"].as_str().unwrap_or_default(), DEADLINE)
        .await?;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["attempts"], 3);

    // A 400 fails at once: one attempt, the provider's message kept.
    let conv = env.api.create_conversation(&key, &json!({})).await?;
    let job = env
        .api
        .submit(&key, &conv, "rejected [mock:status=400]")
        .await?;
    let job = env
        .api
        .wait_terminal(&key, job["id"].as_str().unwrap_or_default(), DEADLINE)
        .await?;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["attempts"], 1);
    assert_eq!(job["error"]["code"], "llm_rejected");
    assert!(job.get("result").is_none());
    let assistant: i64 = sqlx::query_scalar(
        "select count(*) from messages where role = 'assistant' and job_id = $1::uuid",
    )
    .bind(job["id"].as_str().unwrap_or_default())
    .fetch_one(&env.db)
    .await?;
    assert_eq!(assistant, 0, "a failed job writes no assistant message");
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn long_poll_returns_when_the_job_finishes_and_cancel_stops_a_queued_job()
-> anyhow::Result<()> {
    // No workers: jobs stay queued until we say so.
    let (mut env, key) = TestEnv::start_with_key(EnvOptions {
        workers: 0,
        ..Default::default()
    })
    .await?;

    let conv = env.api.create_conversation(&key, &json!({})).await?;
    let job = env.api.submit(&key, &conv, "to be cancelled").await?;
    let id = job["id"].as_str().unwrap_or_default().to_owned();
    let waited = env.api.get(&format!("/v1/jobs/{id}?wait=1"), &key).await?;
    assert_eq!(
        waited.body["status"], "queued",
        "after the wait, the current state"
    );
    let c = env
        .api
        .post(&format!("/v1/jobs/{id}/cancel"), &key, &json!({}))
        .await?;
    assert_eq!(
        (c.status, c.body["status"].as_str()),
        (200, Some("cancelled"))
    );
    let again = env
        .api
        .post(&format!("/v1/jobs/{id}/cancel"), &key, &json!({}))
        .await?;
    assert_eq!((again.status, again.error_code()), (409, "conflict"));

    // The conversation is free again; a long-poll started before any worker
    // exists returns once a worker finishes the job.
    let job = env.api.submit(&key, &conv, "answered later").await?;
    let id = job["id"].as_str().unwrap_or_default().to_owned();
    let poll = {
        let (api, key, id) = (env.api.clone(), key.clone(), id.clone());
        tokio::spawn(async move { api.get(&format!("/v1/jobs/{id}?wait=60"), &key).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    env.start_worker(&[]).await?;
    let polled = poll.await??;
    assert_eq!(polled.body["status"], "succeeded", "{}", polled.body);
    // The cancelled job was never sent to the LLM.
    assert_eq!(env.mock_stats().await?["total"], 1);
    let statuses: Vec<String> = sqlx::query_scalar("select status from jobs order by created_at")
        .fetch_all(&env.db)
        .await?;
    assert_eq!(statuses, vec!["cancelled", "succeeded"]);
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn pause_stops_taking_new_jobs_lets_in_flight_finish_and_resume_continues()
-> anyhow::Result<()> {
    let (mut env, key) = TestEnv::start_with_key(EnvOptions {
        mock_env: vec![("CHATQ_MOCK_LATENCY_MS".into(), "2000".into())],
        ..Default::default()
    })
    .await?;
    let api = env.api.clone();
    let job_status = |id: String| {
        let (api, key) = (api.clone(), key.clone());
        async move {
            let r = api.get(&format!("/v1/jobs/{id}"), &key).await?;
            anyhow::Ok(r.str("status"))
        }
    };

    // A job in flight when the operator pauses.
    let first = api
        .post("/v1/chat", &key, &json!({"content": "in flight"}))
        .await?;
    let first = first.str("id");
    chatq_tests::eventually("the first job to be running", DEADLINE, || async {
        Ok((job_status(first.clone()).await? == "running").then_some(()))
    })
    .await?;
    let refused = api
        .raw(
            reqwest::Method::POST,
            "/admin/v1/queues/pause",
            Some(&key),
            None,
            &[],
        )
        .await?;
    assert_eq!(
        (refused.status, refused.error_code()),
        (401, "unauthorized")
    );
    let paused = api.admin_post("/admin/v1/queues/pause", &json!({})).await?;
    assert_eq!(
        (paused.status, paused.body["paused"].as_bool()),
        (200, Some(true))
    );
    // Workers read the switch every second; one started during the pause
    // reads it before it consumes.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    env.start_worker(&[]).await?;

    let second = api
        .post("/v1/chat", &key, &json!({"content": "after pause"}))
        .await?;
    let second = second.str("id");
    let done = api.wait_terminal(&key, &first, DEADLINE).await?;
    assert_eq!(done["status"], "succeeded", "the in-flight job finished");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        job_status(second.clone()).await?,
        "queued",
        "no new job taken"
    );
    let stats = env.mock_stats().await?;
    assert_eq!(stats["total"].as_u64(), Some(1), "{stats}");
    let queues = api
        .get("/admin/v1/queues", chatq_tests::ADMIN_TOKEN)
        .await?;
    assert_eq!(
        (
            queues.body["paused"].as_bool(),
            queues.body["depth"].as_u64()
        ),
        (Some(true), Some(1))
    );

    let resumed = api
        .admin_post("/admin/v1/queues/resume", &json!({}))
        .await?;
    assert_eq!(
        (resumed.status, resumed.body["paused"].as_bool()),
        (200, Some(false))
    );
    let done = api.wait_terminal(&key, &second, DEADLINE).await?;
    assert_eq!(done["status"], "succeeded");
    env.job_summary().await?.assert_all_succeeded_once(2);
    env.cleanup().await;
    Ok(())
}
