//! DESIGN.md's guarantees under injected faults: each test breaks something
//! (kill -9, broker cut, LLM failures, poison, overload, SIGTERM) and checks
//! the end state in PostgreSQL.

use std::time::Duration;

use chatq_tests::proxy::FaultProxy;
use chatq_tests::{EnvOptions, TestEnv, env_of, eventually};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(90);

/// Submits `n` one-shot chats; returns their job ids.
async fn submit_chats(
    env: &TestEnv,
    key: &str,
    n: usize,
    tag: &str,
) -> anyhow::Result<Vec<String>> {
    let posts = (0..n).map(|i| {
        let (api, key) = (env.api.clone(), key.to_owned());
        let content = format!("{tag} {i}");
        async move {
            let r = api
                .post("/v1/chat", &key, &json!({"content": content}))
                .await?;
            anyhow::ensure!(r.status == 202, "submit answered {}: {}", r.status, r.body);
            Ok::<_, anyhow::Error>(r.str("id"))
        }
    });
    futures_util::future::try_join_all(posts).await
}

async fn wait_terminal_count(env: &TestEnv, n: i64) -> anyhow::Result<()> {
    env.wait_terminal_count(n, DEADLINE).await
}

async fn mock_in_flight(env: &TestEnv) -> anyhow::Result<i64> {
    Ok(env.mock_stats().await?["in_flight"].as_i64().unwrap_or(0))
}

#[tokio::test]
async fn jobs_of_a_killed_worker_are_finished_by_another() -> anyhow::Result<()> {
    let (mut env, key) = TestEnv::start_with_key(EnvOptions {
        workers: 0,
        mock_env: env_of(&[("CHATQ_MOCK_LATENCY_MS", "2000")]),
        worker_env: env_of(&[("CHATQ_LEASE_SECS", "3")]),
        ..Default::default()
    })
    .await?;
    let first = env.start_worker(&[]).await?;
    submit_chats(&env, &key, 50, "kill").await?;
    eventually("50 calls in flight", DEADLINE, || async {
        Ok((mock_in_flight(&env).await? >= 50).then_some(()))
    })
    .await?;

    env.signal_worker(first, "KILL").await?;
    env.start_worker(&[]).await?;
    wait_terminal_count(&env, 50).await?;

    env.job_summary().await?.assert_all_succeeded_once(50);
    let second_attempts: i64 = sqlx::query_scalar("select count(*) from jobs where attempts >= 2")
        .fetch_one(&env.db)
        .await?;
    assert_eq!(
        second_attempts, 50,
        "every job was reclaimed after its lease lapsed"
    );
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn submissions_while_the_broker_is_unreachable_are_accepted_and_finish_later()
-> anyhow::Result<()> {
    let proxy = FaultProxy::start("127.0.0.1:5672".parse()?).await?;
    let via_proxy = format!("amqp://guest:guest@{}/%2f", proxy.addr);
    let mut env = TestEnv::start(EnvOptions {
        workers: 0,
        api_env: env_of(&[("AMQP_URL", &via_proxy)]),
        worker_env: env_of(&[("AMQP_URL", &via_proxy)]),
        ..Default::default()
    })
    .await?;
    env.start_worker(&[]).await?;
    let (_, key) = env.create_key("acme").await?;

    proxy.cut();
    let ids = submit_chats(&env, &key, 50, "outage").await?;
    assert_eq!(ids.len(), 50, "all 50 accepted while the broker is away");
    let ready = env
        .api
        .raw(reqwest::Method::GET, "/readyz", None, None, &[])
        .await?;
    assert_eq!(ready.status, 503, "{}", ready.body);
    assert_eq!(ready.body["checks"]["rabbitmq"], "unavailable");
    let queued: i64 = sqlx::query_scalar("select count(*) from jobs where status = 'queued'")
        .fetch_one(&env.db)
        .await?;
    assert_eq!(queued, 50, "accepted means stored");

    proxy.restore();
    wait_terminal_count(&env, 50).await?;
    env.job_summary().await?.assert_all_succeeded_once(50);
    assert_eq!(env.mock_stats().await?["total"], 50, "one LLM call per job");
    // The worker consumes again after the outage: a new job goes through.
    let conv = env.api.create_conversation(&key, &json!({})).await?;
    let job = env.api.submit(&key, &conv, "after the outage").await?;
    let job = env
        .api
        .wait_terminal(&key, job["id"].as_str().unwrap_or_default(), DEADLINE)
        .await?;
    assert_eq!(job["status"], "succeeded");
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn worker_reconnects_and_consumes_after_its_broker_connection_is_cut() -> anyhow::Result<()> {
    let proxy = FaultProxy::start("127.0.0.1:5672".parse()?).await?;
    let via_proxy = format!("amqp://guest:guest@{}/%2f", proxy.addr);
    let mut env = TestEnv::start(EnvOptions {
        workers: 0,
        worker_env: env_of(&[("AMQP_URL", &via_proxy)]),
        ..Default::default()
    })
    .await?;
    env.start_worker(&[]).await?;
    let (_, key) = env.create_key("acme").await?;
    let before = submit_chats(&env, &key, 5, "before").await?;
    wait_terminal_count(&env, 5).await?;

    proxy.cut();
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.restore();
    // Jobs submitted after the cut are taken by the reconnected consumer.
    let after = submit_chats(&env, &key, 10, "after").await?;
    wait_terminal_count(&env, (before.len() + after.len()) as i64).await?;
    env.job_summary().await?.assert_all_succeeded_once(15);
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn flaky_llm_is_retried_until_every_job_succeeds() -> anyhow::Result<()> {
    let (env, key) = TestEnv::start_with_key(EnvOptions {
        workers: 2,
        mock_env: env_of(&[
            ("CHATQ_MOCK_RATE_429", "0.3"),
            ("CHATQ_MOCK_RATE_500", "0.2"),
            ("CHATQ_MOCK_RETRY_AFTER_SECS", "0"),
        ]),
        worker_env: env_of(&[("CHATQ_MAX_ATTEMPTS", "20")]),
        ..Default::default()
    })
    .await?;
    let ids = submit_chats(&env, &key, 40, "flaky").await?;
    wait_terminal_count(&env, 40).await?;

    env.job_summary().await?.assert_all_succeeded_once(40);
    let retried: i64 = sqlx::query_scalar("select count(*) from jobs where attempts > 1")
        .fetch_one(&env.db)
        .await?;
    assert!(
        retried > 0,
        "with half the calls failing, some jobs needed more than one attempt"
    );
    // Attempt history is visible to pollers.
    let retried_id: String =
        sqlx::query_scalar("select id::text from jobs where attempts > 1 limit 1")
            .fetch_one(&env.db)
            .await?;
    let job = env.api.get(&format!("/v1/jobs/{retried_id}"), &key).await?;
    let errors = job.body["attempt_errors"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        errors.len() as i64,
        job.body["attempts"].as_i64().unwrap_or(0) - 1,
        "{}",
        job.body
    );
    assert!(errors.iter().all(|e| matches!(
        e["code"].as_str(),
        Some("llm_rate_limited" | "llm_unavailable")
    )));
    assert_eq!(ids.len(), 40);
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn permanent_and_malformed_llm_answers_fail_cleanly_and_are_dead_lettered()
-> anyhow::Result<()> {
    let (env, key) = TestEnv::start_with_key(EnvOptions {
        workers: 1,
        worker_env: env_of(&[("CHATQ_MAX_ATTEMPTS", "2"), ("CHATQ_LLM_TIMEOUT_SECS", "1")]),
        ..Default::default()
    })
    .await?;
    // (directive, expected code, expected attempts)
    let cases = [
        ("[mock:status=400]", "llm_rejected", 1),
        ("[mock:redirect]", "llm_bad_response", 1),
        ("[mock:malformed]", "llm_bad_response", 2),
        ("[mock:oversize]", "llm_bad_response", 2),
        ("[mock:hang]", "llm_timeout", 2),
    ];
    for (directive, code, attempts) in cases {
        let conv = env.api.create_conversation(&key, &json!({})).await?;
        let job = env.api.submit(&key, &conv, directive).await?;
        let job = env
            .api
            .wait_terminal(&key, job["id"].as_str().unwrap_or_default(), DEADLINE)
            .await?;
        assert_eq!(job["status"], "failed", "{directive}: {job}");
        assert_eq!(job["error"]["code"], code, "{directive}: {job}");
        assert_eq!(job["attempts"], attempts, "{directive}: {job}");
        assert!(
            job["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    let summary = env.job_summary().await?;
    assert_eq!(summary.count("failed"), 5);
    assert_eq!(
        summary.orphan_replies, 0,
        "a failed job has no assistant message"
    );
    eventually("5 dead letters", DEADLINE, || async {
        Ok((env.queue_depth("dead").await? == 5).then_some(()))
    })
    .await?;

    // Replay puts them back with a fresh budget; they fail again the same way.
    let r = env
        .api
        .admin_post("/admin/v1/dead-letters/replay", &json!({"limit": 2}))
        .await?;
    assert_eq!(
        (r.status, r.body["replayed"].as_i64()),
        (200, Some(2)),
        "{}",
        r.body
    );
    eventually("replayed jobs fail again", DEADLINE, || async {
        Ok((env.queue_depth("dead").await? == 5).then_some(()))
    })
    .await?;
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn poison_messages_are_dead_lettered_and_the_worker_keeps_going() -> anyhow::Result<()> {
    let (env, key) = TestEnv::start_with_key(EnvOptions::default()).await?;
    env.publish_raw(b"this is not json").await?;
    env.publish_raw(
        format!(
            r#"{{"type":"chat_v1","job_id":"{}"}}"#,
            uuid::Uuid::now_v7()
        )
        .as_bytes(),
    )
    .await?;

    let conv = env.api.create_conversation(&key, &json!({})).await?;
    let job = env.api.submit(&key, &conv, "still working?").await?;
    let job = env
        .api
        .wait_terminal(&key, job["id"].as_str().unwrap_or_default(), DEADLINE)
        .await?;
    assert_eq!(job["status"], "succeeded");
    eventually("2 dead letters", DEADLINE, || async {
        Ok((env.queue_depth("dead").await? == 2).then_some(()))
    })
    .await?;
    let r = env
        .api
        .admin_post("/admin/v1/dead-letters/replay", &json!({}))
        .await?;
    assert_eq!(
        r.body["replayed"], 0,
        "poison names no job: discarded, not replayed"
    );
    assert_eq!(env.queue_depth("dead").await?, 0);
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn duplicate_deliveries_cost_one_llm_call_per_job() -> anyhow::Result<()> {
    let (env, key) = TestEnv::start_with_key(EnvOptions {
        workers: 4,
        mock_env: env_of(&[("CHATQ_MOCK_LATENCY_MS", "200")]),
        ..Default::default()
    })
    .await?;
    let ids = submit_chats(&env, &key, 40, "dup").await?;
    for id in &ids {
        env.publish_raw(format!(r#"{{"type":"chat_v1","job_id":"{id}"}}"#).as_bytes())
            .await?;
    }
    wait_terminal_count(&env, 40).await?;
    // Let the duplicates drain too, then count.
    eventually("work queue empty", DEADLINE, || async {
        Ok((env.queue_depth("work").await? == 0).then_some(()))
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    env.job_summary().await?.assert_all_succeeded_once(40);
    let stats = env.mock_stats().await?;
    assert_eq!(stats["total"], 40, "exactly one LLM call per job: {stats}");
    let results: Vec<String> = sqlx::query_scalar("select result_content from jobs")
        .fetch_all(&env.db)
        .await?;
    assert!(results.iter().all(|r| r.starts_with("mock reply")));
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn full_queue_and_rate_limit_answer_429_with_retry_after_and_store_nothing()
-> anyhow::Result<()> {
    let (env, key) = TestEnv::start_with_key(EnvOptions {
        workers: 0,
        // One tenant may take the whole queue here: this checks the broker's bound.
        api_env: env_of(&[
            ("CHATQ_MAX_QUEUE_LENGTH", "5"),
            ("CHATQ_TENANT_QUEUE_SHARE", "1"),
        ]),
        ..Default::default()
    })
    .await?;
    let mut statuses = vec![];
    for i in 0..8 {
        let r = env
            .api
            .post("/v1/chat", &key, &json!({"content": format!("q {i}")}))
            .await?;
        if r.status == 429 {
            assert_eq!(r.error_code(), "queue_full");
            assert!(
                r.header("retry-after")
                    .is_some_and(|v| v.parse::<u64>().is_ok())
            );
        }
        statuses.push(r.status);
    }
    // A quorum queue enforces its length after the fact: it may take one
    // message past the limit before it starts refusing.
    let accepted = statuses.iter().filter(|&&s| s == 202).count() as i64;
    assert!(statuses[..5].iter().all(|&s| s == 202), "{statuses:?}");
    assert!(statuses[6..].iter().all(|&s| s == 429), "{statuses:?}");
    let counts: (i64, i64, i64) = sqlx::query_as(
        "select (select count(*) from jobs), (select count(*) from messages), (select count(*) from conversations)",
    )
    .fetch_one(&env.db)
    .await?;
    assert_eq!(
        counts,
        (accepted, accepted, accepted),
        "refused submissions left nothing behind"
    );

    // Rate limit: 3 writes per minute for this key (creating the
    // conversation is the first); invalid requests are not counted.
    let r = env
        .api
        .admin_post(
            "/admin/v1/api-keys",
            &json!({"tenant": "slow", "rate_limit_per_minute": 3}),
        )
        .await?;
    let slow = r.str("key");
    let conv = env.api.create_conversation(&slow, &json!({})).await?;
    let path = format!("/v1/conversations/{conv}/messages");
    let mut codes = vec![];
    for (content, max_tokens) in [("x", 0), ("x", 0), ("y", 5), ("z", 5), ("w", 5)] {
        let r = env
            .api
            .post(
                &path,
                &slow,
                &json!({"content": content, "max_tokens": max_tokens}),
            )
            .await?;
        if r.status == 429 {
            assert!(
                r.header("retry-after")
                    .and_then(|v| v.parse::<u64>().ok())
                    .is_some_and(|s| (1..=61).contains(&s))
            );
        }
        codes.push(r.error_code().to_owned());
    }
    // The second write is accepted; the third counts (and finds the
    // conversation busy); the fourth is over the limit before its
    // conversation is even looked at.
    assert_eq!(
        codes,
        vec![
            "invalid_request",
            "invalid_request",
            "",
            "conversation_busy",
            "rate_limited"
        ]
    );
    let stored: i64 =
        sqlx::query_scalar("select count(*) from jobs where conversation_id = $1::uuid")
            .bind(&conv)
            .fetch_one(&env.db)
            .await?;
    assert_eq!(stored, 1);
    env.cleanup().await;
    Ok(())
}

/// An environment with one worker (with `grace`) holding `n` LLM calls of
/// `latency_ms` each in flight; returns it, the worker's index and the key.
async fn worker_with_calls_in_flight(
    latency_ms: &str,
    grace: &str,
    n: usize,
) -> anyhow::Result<(TestEnv, usize, String)> {
    let (mut env, key) = TestEnv::start_with_key(EnvOptions {
        workers: 0,
        mock_env: env_of(&[("CHATQ_MOCK_LATENCY_MS", latency_ms)]),
        ..Default::default()
    })
    .await?;
    let w = env
        .start_worker(&[("CHATQ_SHUTDOWN_GRACE_SECS", grace)])
        .await?;
    submit_chats(&env, &key, n, "in flight").await?;
    eventually("calls in flight", DEADLINE, || async {
        Ok((mock_in_flight(&env).await? >= n as i64).then_some(()))
    })
    .await?;
    Ok((env, w, key))
}

#[tokio::test]
async fn sigterm_finishes_in_flight_jobs_and_exits_zero() -> anyhow::Result<()> {
    let (mut env, w, _) = worker_with_calls_in_flight("1500", "20", 20).await?;

    env.signal_worker(w, "TERM").await?;
    assert_eq!(env.wait_worker(w, DEADLINE).await?, Some(0), "clean exit");
    env.job_summary().await?.assert_all_succeeded_once(20);
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn sigterm_past_the_grace_period_returns_jobs_to_the_queue() -> anyhow::Result<()> {
    let (mut env, w, _) = worker_with_calls_in_flight("4000", "1", 10).await?;

    env.signal_worker(w, "TERM").await?;
    assert_eq!(env.wait_worker(w, DEADLINE).await?, Some(0), "clean exit");
    let queued: i64 = sqlx::query_scalar("select count(*) from jobs where status = 'queued'")
        .fetch_one(&env.db)
        .await?;
    assert_eq!(queued, 10, "unfinished jobs went back to the queue");

    env.start_worker(&[]).await?;
    wait_terminal_count(&env, 10).await?;
    env.job_summary().await?.assert_all_succeeded_once(10);
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn drain_mode_works_the_queue_until_empty_then_exits_zero() -> anyhow::Result<()> {
    let (mut env, key) = TestEnv::start_with_key(EnvOptions {
        workers: 0,
        ..Default::default()
    })
    .await?;
    submit_chats(&env, &key, 30, "drain").await?;
    let queues = env
        .api
        .get("/admin/v1/queues", chatq_tests::ADMIN_TOKEN)
        .await?;
    assert_eq!(queues.status, 200, "{}", queues.body);
    assert_eq!(queues.body["depth"], 30, "{}", queues.body);
    assert_eq!(queues.body["jobs_by_status"]["queued"], 30);
    assert!(
        queues.body["oldest_queued_age_secs"]
            .as_f64()
            .is_some_and(|a| a >= 0.0)
    );

    let w = env.start_worker_with_args(&["--drain"], &[]).await?;
    assert_eq!(env.wait_worker(w, DEADLINE).await?, Some(0));
    env.job_summary().await?.assert_all_succeeded_once(30);
    assert_eq!(env.queue_depth("work").await?, 0);
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn long_retry_delays_wait_in_the_broker_without_holding_a_worker_slot() -> anyhow::Result<()>
{
    let (env, key) = TestEnv::start_with_key(EnvOptions {
        workers: 1,
        mock_env: env_of(&[("CHATQ_MOCK_RETRY_AFTER_SECS", "2")]),
        worker_env: env_of(&[
            ("CHATQ_MAX_ATTEMPTS", "3"),
            ("CHATQ_WORKER_CONCURRENCY", "1"),
        ]),
        ..Default::default()
    })
    .await?;
    // Another model than the quick job's: the provider's 429 pauses every
    // call of its model (flow control), which is not what this test is about.
    let slow_conv = env
        .api
        .create_conversation(&key, &json!({"model": "limited-model"}))
        .await?;
    let slow = env
        .api
        .submit(&key, &slow_conv, "always limited [mock:status=429]")
        .await?;
    let slow_id = slow["id"].as_str().unwrap_or_default().to_owned();

    // After the first 429 the job waits in the delay queue, queued again ...
    let waiting = eventually("first attempt recorded", DEADLINE, || async {
        let r = env.api.get(&format!("/v1/jobs/{slow_id}"), &key).await?;
        let recorded = r.body["attempt_errors"].as_array().map_or(0, Vec::len);
        Ok((recorded == 1 && r.body["status"] == "queued").then_some(r.body))
    })
    .await?;
    assert_eq!(waiting["attempt_errors"][0]["code"], "llm_rate_limited");
    // ... and the single worker slot is free for other work meanwhile.
    let quick_conv = env.api.create_conversation(&key, &json!({})).await?;
    let quick = env.api.submit(&key, &quick_conv, "quick").await?;
    let quick = env
        .api
        .wait_terminal(&key, quick["id"].as_str().unwrap_or_default(), DEADLINE)
        .await?;
    assert_eq!(quick["status"], "succeeded");
    let slow_now = env.api.get(&format!("/v1/jobs/{slow_id}"), &key).await?;
    assert_ne!(
        slow_now.body["status"], "failed",
        "the quick job finished while the slow one was still retrying"
    );

    let slow = env.api.wait_terminal(&key, &slow_id, DEADLINE).await?;
    assert_eq!(
        (slow["status"].as_str(), slow["attempts"].as_i64()),
        (Some("failed"), Some(3)),
        "{slow}"
    );
    assert_eq!(slow["error"]["code"], "llm_rate_limited");
    assert_eq!(slow["attempt_errors"].as_array().map(Vec::len), Some(3));
    let stats = env.mock_stats().await?;
    assert_eq!(
        stats["by_prompt"]["always limited [mock:status=429]"], 3,
        "one LLM call per attempt: {stats}"
    );
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn a_message_redelivered_after_the_commit_is_acked_without_a_second_call()
-> anyhow::Result<()> {
    let (mut env, key) = TestEnv::start_with_key(EnvOptions {
        workers: 0,
        ..Default::default()
    })
    .await?;
    let doomed = env
        .start_worker(&[("CHATQ_FAILPOINT", "exit_before_ack")])
        .await?;
    let conv = env.api.create_conversation(&key, &json!({})).await?;
    let job = env.api.submit(&key, &conv, "commit then crash").await?;
    let id = job["id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(
        env.wait_worker(doomed, DEADLINE).await?,
        Some(3),
        "the worker died at the failpoint"
    );
    let before = env.api.get(&format!("/v1/jobs/{id}"), &key).await?.body;
    assert_eq!(
        before["status"], "succeeded",
        "the result was committed before the crash"
    );
    // The broker requeues the unacked message once it notices the dead connection.
    eventually(
        "the unacked message back in the queue",
        DEADLINE,
        || async { Ok((env.queue_depth("work").await? == 1).then_some(())) },
    )
    .await?;

    env.start_worker(&[]).await?;
    eventually("redelivery settled", DEADLINE, || async {
        Ok((env.queue_depth("work").await? == 0).then_some(()))
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let after = env.api.get(&format!("/v1/jobs/{id}"), &key).await?.body;
    assert_eq!(after, before, "the stored result is unchanged");
    assert_eq!(env.mock_stats().await?["total"], 1, "no second LLM call");
    env.job_summary().await?.assert_all_succeeded_once(1);
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn database_connection_cut_mid_run_every_job_still_ends_once() -> anyhow::Result<()> {
    let proxy = FaultProxy::start("127.0.0.1:5432".parse()?).await?;
    let mut env = TestEnv::start(EnvOptions {
        workers: 0,
        mock_env: env_of(&[("CHATQ_MOCK_LATENCY_MS", "1000")]),
        ..Default::default()
    })
    .await?;
    // The worker's database connections go through the proxy; the test's
    // own pool (for the assertions) connects directly.
    let via_proxy = format!("postgres://postgres@{}/{}", proxy.addr, env.db_name);
    env.start_worker(&[("DATABASE_URL", &via_proxy)]).await?;
    let (_, key) = env.create_key("acme").await?;
    submit_chats(&env, &key, 30, "dbcut").await?;
    eventually("calls in flight", DEADLINE, || async {
        Ok((mock_in_flight(&env).await? > 0).then_some(()))
    })
    .await?;

    proxy.cut();
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.restore();

    wait_terminal_count(&env, 30).await?;
    env.job_summary().await?.assert_all_succeeded_once(30);
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn api_answers_503_not_500_while_the_database_is_unreachable() -> anyhow::Result<()> {
    let proxy = FaultProxy::start("127.0.0.1:5432".parse()?).await?;
    let (env, key) = TestEnv::start_with_key(EnvOptions {
        workers: 0,
        ..Default::default()
    })
    .await?;
    // A second api process whose database goes through the proxy.
    let via_proxy = format!("postgres://postgres@{}/{}", proxy.addr, env.db_name);
    let api2 = chatq_tests::spawn_api(&env, &[("DATABASE_URL", &via_proxy)]).await?;
    let conv = api2.api.create_conversation(&key, &json!({})).await?;

    proxy.cut();
    let r = api2
        .api
        .post(
            &format!("/v1/conversations/{conv}/messages"),
            &key,
            &json!({"content": "hi"}),
        )
        .await?;
    assert_eq!(
        (r.status, r.error_code()),
        (503, "unavailable"),
        "{}",
        r.body
    );
    assert!(r.header("retry-after").is_some());
    let ready = api2
        .api
        .raw(reqwest::Method::GET, "/readyz", None, None, &[])
        .await?;
    assert_eq!(
        (ready.status, ready.body["checks"]["postgres"].as_str()),
        (503, Some("unavailable"))
    );
    proxy.restore();

    let r = eventually("the api recovers", DEADLINE, || async {
        let r = api2
            .api
            .post(
                &format!("/v1/conversations/{conv}/messages"),
                &key,
                &json!({"content": "hi"}),
            )
            .await?;
        Ok((r.status == 202).then_some(r))
    })
    .await?;
    assert_eq!(r.body["status"], "queued");
    let jobs: i64 = sqlx::query_scalar("select count(*) from jobs")
        .fetch_one(&env.db)
        .await?;
    assert_eq!(jobs, 1, "the refused submission stored nothing");
    drop(api2);
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn burst_of_5000_submissions_from_200_clients_loses_and_duplicates_nothing()
-> anyhow::Result<()> {
    let (env, key) = TestEnv::start_with_key(EnvOptions {
        workers: 2,
        api_env: env_of(&[("CHATQ_DB_MAX_CONNECTIONS", "10")]),
        ..Default::default()
    })
    .await?;
    let (clients, per_client) = (200, 25);
    let tasks = (0..clients).map(|c| {
        let (api, key) = (env.api.clone(), key.clone());
        tokio::spawn(async move {
            let mut codes = Vec::with_capacity(per_client);
            for i in 0..per_client {
                let r = api
                    .post(
                        "/v1/chat",
                        &key,
                        &json!({"content": format!("burst {c}/{i}")}),
                    )
                    .await?;
                codes.push(r.status);
            }
            Ok::<_, anyhow::Error>(codes)
        })
    });
    let mut codes = vec![];
    for t in futures_util::future::join_all(tasks).await {
        codes.extend(t??);
    }
    let accepted = codes.iter().filter(|&&c| c == 202).count() as i64;
    let server_errors = codes.iter().filter(|&&c| c >= 500).count();
    assert_eq!(server_errors, 0, "no 5xx");
    assert_eq!(
        accepted,
        5000,
        "all accepted (the queue is far from full): {:?}",
        codes.iter().filter(|&&c| c != 202).collect::<Vec<_>>()
    );
    wait_terminal_count(&env, accepted).await?;
    env.job_summary().await?.assert_all_succeeded_once(accepted);
    assert_eq!(env.mock_stats().await?["total"], accepted);
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn api_started_before_its_database_waits_for_it_then_serves() -> anyhow::Result<()> {
    let (env, key) = TestEnv::start_with_key(EnvOptions {
        workers: 1,
        ..Default::default()
    })
    .await?;
    let proxy = FaultProxy::start("127.0.0.1:5432".parse()?).await?;
    proxy.cut();
    let via_proxy = format!("postgres://postgres@{}/{}", proxy.addr, env.db_name);
    let api_env = [("DATABASE_URL", via_proxy.as_str())];
    let starting = chatq_tests::spawn_api(&env, &api_env);
    let restore_later = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        proxy.restore();
    };
    let (api2, ()) = tokio::join!(starting, restore_later);
    let api2 = api2?;

    let r = api2
        .api
        .post("/v1/chat", &key, &json!({"content": "late start"}))
        .await?;
    assert_eq!(r.status, 202, "{}", r.body);
    let job = api2.api.wait_terminal(&key, &r.str("id"), DEADLINE).await?;
    assert_eq!(job["status"], "succeeded");
    env.job_summary().await?.assert_all_succeeded_once(1);
    drop(api2);
    env.cleanup().await;
    Ok(())
}
