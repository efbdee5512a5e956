//! Hardening found by a security probe: a hostile LLM can never wedge a
//! job, pause holds from its answer, per-tenant bounds, the outbox bound,
//! vanished messages are republished. Real processes, end states checked
//! in PostgreSQL.

use std::time::Duration;

use chatq_tests::proxy::FaultProxy;
use chatq_tests::{EnvOptions, TestEnv, env_of, eventually};
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(90);

async fn chat(env: &TestEnv, key: &str, content: &str) -> anyhow::Result<String> {
    let r = env
        .api
        .post("/v1/chat", key, &json!({"content": content}))
        .await?;
    anyhow::ensure!(r.status == 202, "submit answered {}: {}", r.status, r.body);
    Ok(r.str("id"))
}

async fn count(env: &TestEnv, sql: &'static str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(sql).fetch_one(&env.db).await?)
}

fn message_of(job: &Value) -> String {
    job["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn hostile_llm_answers_end_within_the_attempt_budget_with_bounded_clean_errors()
-> anyhow::Result<()> {
    let (env, key) = TestEnv::start_with_key(EnvOptions {
        worker_env: env_of(&[("CHATQ_MAX_ATTEMPTS", "3")]),
        ..Default::default()
    })
    .await?;

    let hostile = chat(&env, &key, "[mock:hostile_reply]").await?;
    let nul_error = chat(&env, &key, "[mock:nul_error]").await?;
    let raw_nul = chat(&env, &key, "[mock:raw_nul_error]").await?;
    let huge = chat(&env, &key, "[mock:huge_error]").await?;

    // U+0000 in the reply becomes U+FFFD; usage is clamped, never negative.
    let job = env.api.wait_terminal(&key, &hostile, DEADLINE).await?;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(
        job["result"]["content"], "before\u{FFFD}after \u{FFFD}",
        "{job}"
    );
    assert_eq!(job["result"]["usage"]["prompt_tokens"], i64::from(i32::MAX));
    assert_eq!(job["result"]["usage"]["completion_tokens"], 0);
    let stored: String = sqlx::query_scalar(
        "select content from messages where job_id = $1::uuid and role = 'assistant'",
    )
    .bind(&hostile)
    .fetch_one(&env.db)
    .await?;
    assert_eq!(stored, "before\u{FFFD}after \u{FFFD}");

    // Errors holding U+0000 (in JSON, or raw bytes) fail after exactly the budget.
    for id in [&nul_error, &raw_nul] {
        let job = env.api.wait_terminal(&key, id, DEADLINE).await?;
        assert_eq!(job["status"], "failed", "{job}");
        assert_eq!(job["attempts"], 3, "{job}");
        let message = message_of(&job);
        assert!(!message.is_empty() && !message.contains('\0'), "{job}");
    }
    // A 7 MB provider message is stored cut short.
    let job = env.api.wait_terminal(&key, &huge, DEADLINE).await?;
    assert_eq!(
        (job["status"].as_str(), job["attempts"].as_i64()),
        (Some("failed"), Some(1)),
        "{job}"
    );
    assert!(
        message_of(&job).chars().count() <= 501,
        "error message is bounded"
    );
    let longest: i32 = sqlx::query_scalar(
        "select coalesce(max(length(error_message)), 0) from jobs where id = $1::uuid",
    )
    .bind(&huge)
    .fetch_one(&env.db)
    .await?;
    assert!(longest <= 501, "stored error message is bounded: {longest}");
    let attempt_text: i32 =
        sqlx::query_scalar("select coalesce(max(length(attempt_errors::text)), 0) from jobs")
            .fetch_one(&env.db)
            .await?;
    assert!(
        attempt_text < 10_000,
        "attempt history is bounded: {attempt_text}"
    );

    // No job is left running, and the conversations take new messages.
    assert_eq!(
        count(
            &env,
            "select count(*) from jobs where status in ('queued', 'running')"
        )
        .await?,
        0
    );
    let conv: String =
        sqlx::query_scalar("select conversation_id::text from jobs where id = $1::uuid")
            .bind(&nul_error)
            .fetch_one(&env.db)
            .await?;
    env.api.submit(&key, &conv, "next turn").await?;
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn a_job_whose_last_attempt_lost_its_worker_fails_instead_of_running_again()
-> anyhow::Result<()> {
    let (mut env, key) = TestEnv::start_with_key(EnvOptions {
        workers: 0,
        worker_env: env_of(&[("CHATQ_MAX_ATTEMPTS", "1"), ("CHATQ_LEASE_SECS", "2")]),
        ..Default::default()
    })
    .await?;
    let first = env.start_worker(&[]).await?;
    let id = chat(&env, &key, "[mock:hang]").await?;
    // Running, and its call reached the LLM (the claim comes first).
    eventually("the job's LLM call to be in flight", DEADLINE, || async {
        let running = count(&env, "select count(*) from jobs where status = 'running'").await?;
        let calls = env.mock_stats().await?["total"].as_i64().unwrap_or(0);
        Ok((running == 1 && calls == 1).then_some(()))
    })
    .await?;
    env.signal_worker(first, "KILL").await?;
    env.start_worker(&[]).await?;

    let job = env.api.wait_terminal(&key, &id, DEADLINE).await?;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "worker_lost", "{job}");
    assert_eq!(job["attempts"], 1, "{job}");
    assert_eq!(env.mock_stats().await?["total"], 1, "no second LLM call");
    eventually("the failed job dead-lettered", DEADLINE, || async {
        Ok((env.queue_depth("dead").await? == 1).then_some(()))
    })
    .await?;
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn pause_holds_from_its_answer_and_held_jobs_run_once_after_resume() -> anyhow::Result<()> {
    let (env, key) = TestEnv::start_with_key(EnvOptions {
        workers: 3,
        ..Default::default()
    })
    .await?;
    // The workers are consuming: one job goes through first.
    let warm = chat(&env, &key, "warm up").await?;
    env.api.wait_terminal(&key, &warm, DEADLINE).await?;

    let paused = env
        .api
        .admin_post("/admin/v1/queues/pause", &json!({}))
        .await?;
    assert_eq!(paused.status, 200);
    let posts = (0..20).map(|i| {
        let (env, key) = (&env, &key);
        async move { chat(env, key, &format!("right after pause {i}")).await }
    });
    let ids = futures_util::future::try_join_all(posts).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let started = count(
        &env,
        "select count(*) from jobs where status <> 'queued' or attempts > 0 or started_at is not null",
    )
    .await?;
    assert_eq!(started, 1, "only the warm-up job ever started");
    assert_eq!(
        env.mock_stats().await?["total"],
        1,
        "no LLM call while paused"
    );

    env.api
        .admin_post("/admin/v1/queues/resume", &json!({}))
        .await?;
    for id in &ids {
        let job = env.api.wait_terminal(&key, id, DEADLINE).await?;
        assert_eq!(
            (job["status"].as_str(), job["attempts"].as_i64()),
            (Some("succeeded"), Some(1)),
            "{job}"
        );
    }
    env.job_summary().await?.assert_all_succeeded_once(21);
    assert_eq!(env.mock_stats().await?["total"], 21);
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn one_tenant_cannot_fill_the_queue_for_the_others() -> anyhow::Result<()> {
    let (env, key_a) = TestEnv::start_with_key(EnvOptions {
        workers: 0,
        api_env: env_of(&[("CHATQ_MAX_QUEUE_LENGTH", "20")]),
        ..Default::default()
    })
    .await?;
    let (_, key_b) = env.create_key("other").await?;
    let mut accepted = 0;
    let mut refused = 0;
    for i in 0..15 {
        let r = env
            .api
            .post("/v1/chat", &key_a, &json!({"content": format!("a {i}")}))
            .await?;
        match r.status {
            202 => accepted += 1,
            429 => {
                assert_eq!(r.error_code(), "queue_full", "{}", r.body);
                assert!(r.header("retry-after").is_some());
                refused += 1;
            }
            other => anyhow::bail!("unexpected {other}: {}", r.body),
        }
    }
    assert_eq!(
        (accepted, refused),
        (10, 5),
        "half of the queue for tenant a"
    );
    chat(&env, &key_b, "b gets in").await?;
    assert_eq!(
        count(&env, "select count(*) from jobs").await?,
        11,
        "refused submissions stored nothing"
    );
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn rate_limits_cover_every_write_slide_and_skip_invalid_and_replayed_requests()
-> anyhow::Result<()> {
    let env = TestEnv::start(EnvOptions {
        workers: 0,
        ..Default::default()
    })
    .await?;
    let created = env
        .api
        .admin_post(
            "/admin/v1/api-keys",
            &json!({"tenant": "slow", "rate_limit_per_minute": 3, "max_concurrency": 4}),
        )
        .await?;
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(created.body["max_concurrency"], 4);
    let stored: Option<i32> = sqlx::query_scalar("select max_concurrency from api_keys")
        .fetch_one(&env.db)
        .await?;
    assert_eq!(stored, Some(4));
    let bad = env
        .api
        .admin_post(
            "/admin/v1/api-keys",
            &json!({"tenant": "x", "max_concurrency": 0}),
        )
        .await?;
    assert_eq!((bad.status, bad.error_code()), (400, "invalid_request"));
    let key = created.str("key");

    // 1: a submission with an idempotency key; its replay is not counted.
    let post_keyed = || {
        env.api.raw(
            reqwest::Method::POST,
            "/v1/chat",
            Some(&key),
            Some(("application/json", br#"{"content":"hi"}"#.to_vec())),
            &[("idempotency-key", "same")],
        )
    };
    assert_eq!(post_keyed().await?.status, 202);
    assert_eq!(post_keyed().await?.status, 202, "replay");
    // An invalid request is not counted either.
    let invalid = env
        .api
        .post("/v1/chat", &key, &json!({"content": ""}))
        .await?;
    assert_eq!(invalid.status, 400);
    // 2 and 3: creating and deleting a conversation are writes too.
    let conv = env.api.create_conversation(&key, &json!({})).await?;
    let deleted = env
        .api
        .delete(&format!("/v1/conversations/{conv}"), &key)
        .await?;
    assert_eq!(deleted.status, 204);
    // 4: over the limit.
    let refused = env.api.post("/v1/conversations", &key, &json!({})).await?;
    assert_eq!(
        (refused.status, refused.error_code()),
        (429, "rate_limited"),
        "{}",
        refused.body
    );
    let wait: u64 = refused
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!((1..=61).contains(&wait), "Retry-After {wait}");
    assert_eq!(count(&env, "select count(*) from conversations").await?, 1);
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn only_the_models_the_operator_offers_are_accepted() -> anyhow::Result<()> {
    let (env, key) = TestEnv::start_with_key(EnvOptions {
        workers: 0,
        api_env: env_of(&[("CHATQ_MODELS", "gpt-4o-mini,small")]),
        ..Default::default()
    })
    .await?;
    for (path, body) in [
        (
            "/v1/chat",
            json!({"content": "x", "model": "gpt-expensive"}),
        ),
        ("/v1/conversations", json!({"model": "gpt-expensive"})),
    ] {
        let r = env.api.post(path, &key, &body).await?;
        assert_eq!(
            (r.status, r.error_code()),
            (400, "invalid_request"),
            "{path}"
        );
        assert!(
            r.body["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .starts_with("model")
        );
    }
    let ok = env
        .api
        .post("/v1/chat", &key, &json!({"content": "x", "model": "small"}))
        .await?;
    assert_eq!(ok.status, 202, "{}", ok.body);
    assert_eq!(count(&env, "select count(*) from conversations").await?, 1);
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn list_pages_are_bounded_in_bytes_and_continue_with_next_after() -> anyhow::Result<()> {
    let (env, key) = TestEnv::start_with_key(EnvOptions {
        workers: 0,
        api_env: env_of(&[("CHATQ_MAX_PAGE_BYTES", "250000")]),
        ..Default::default()
    })
    .await?;
    let big = "x".repeat(100_000);
    for _ in 0..5 {
        env.api
            .create_conversation(&key, &json!({"system_prompt": big}))
            .await?;
    }
    let mut seen = 0;
    let mut after = String::new();
    let mut pages = 0;
    loop {
        let path = if after.is_empty() {
            "/v1/conversations?limit=100".to_owned()
        } else {
            format!("/v1/conversations?limit=100&after={after}")
        };
        let page = env.api.get(&path, &key).await?;
        assert_eq!(page.status, 200, "{}", page.body);
        let n = page.body["data"].as_array().map_or(0, Vec::len);
        assert!((1..=3).contains(&n), "page of {n} conversations of 100 KB");
        seen += n;
        pages += 1;
        match page.body["next_after"].as_str() {
            Some(next) => after = next.to_owned(),
            None => break,
        }
    }
    assert_eq!((seen, pages > 1), (5, true));
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn the_outbox_is_bounded_while_the_broker_is_unreachable() -> anyhow::Result<()> {
    let proxy = FaultProxy::start("127.0.0.1:5672".parse()?).await?;
    let via_proxy = format!("amqp://guest:guest@{}/%2f", proxy.addr);
    let (env, key) = TestEnv::start_with_key(EnvOptions {
        workers: 1,
        api_env: env_of(&[("AMQP_URL", &via_proxy), ("CHATQ_MAX_OUTBOX", "5")]),
        worker_env: env_of(&[("AMQP_URL", &via_proxy)]),
        ..Default::default()
    })
    .await?;
    proxy.cut();
    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 0..12 {
        let r = env
            .api
            .post("/v1/chat", &key, &json!({"content": format!("outage {i}")}))
            .await?;
        match r.status {
            202 => accepted.push(r.str("id")),
            503 => {
                assert_eq!(r.error_code(), "unavailable", "{}", r.body);
                assert!(r.header("retry-after").is_some());
                refused += 1;
            }
            other => anyhow::bail!("unexpected {other}: {}", r.body),
        }
    }
    // The first submission finds the broker gone only when it publishes.
    assert!(
        (5..=6).contains(&accepted.len()),
        "accepted {} while the broker was away",
        accepted.len()
    );
    assert_eq!(accepted.len() + refused, 12);
    assert_eq!(
        count(&env, "select count(*) from jobs").await?,
        i64::try_from(accepted.len())?,
        "refused submissions stored nothing"
    );
    proxy.restore();
    for id in &accepted {
        let job = env.api.wait_terminal(&key, id, DEADLINE).await?;
        assert_eq!(job["status"], "succeeded", "{job}");
    }
    // Once the broker is back, submissions are accepted again.
    eventually(
        "a submission accepted after the outage",
        DEADLINE,
        || async {
            let r = env
                .api
                .post("/v1/chat", &key, &json!({"content": "after"}))
                .await?;
            Ok((r.status == 202).then_some(()))
        },
    )
    .await?;
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn jobs_whose_messages_were_purged_from_the_queue_are_republished_and_run_once()
-> anyhow::Result<()> {
    let (mut env, key) = TestEnv::start_with_key(EnvOptions {
        workers: 0,
        worker_env: env_of(&[("CHATQ_REPUBLISH_AFTER_SECS", "2")]),
        ..Default::default()
    })
    .await?;
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(chat(&env, &key, &format!("purged {i}")).await?);
    }
    eventually("every publish recorded", DEADLINE, || async {
        let unpublished =
            count(&env, "select count(*) from jobs where published_at is null").await?;
        Ok((unpublished == 0).then_some(()))
    })
    .await?;
    // An operator mistake: the work queue is purged.
    let conn = lapin::Connection::connect(
        &chatq_tests::amqp_url(),
        lapin::ConnectionProperties::default(),
    )
    .await?;
    let ch = conn.create_channel().await?;
    let purged = ch
        .queue_purge(
            env.queue("work").as_str().into(),
            lapin::options::QueuePurgeOptions::default(),
        )
        .await?;
    assert_eq!(purged, 10);
    conn.close(200, "done".into()).await?;

    env.start_worker(&[]).await?;
    env.start_worker(&[]).await?;
    for id in &ids {
        let job = env.api.wait_terminal(&key, id, DEADLINE).await?;
        assert_eq!(job["status"], "succeeded", "{job}");
    }
    env.job_summary().await?.assert_all_succeeded_once(10);
    assert_eq!(env.mock_stats().await?["total"], 10, "one LLM call per job");
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn help_never_prints_the_secrets_in_connection_urls() -> anyhow::Result<()> {
    for bin in ["chatq-api", "chatq-worker"] {
        let out = tokio::process::Command::new(chatq_tests::bin_path(bin))
            .arg("--help")
            .env("DATABASE_URL", "postgres://u:db-secret-pw@127.0.0.1/x")
            .env("AMQP_URL", "amqp://u:amqp-secret-pw@127.0.0.1/%2f")
            .env("OPENAI_API_KEY", "sk-llm-secret")
            .env("CHATQ_ADMIN_TOKEN", "admin-secret")
            .output()
            .await?;
        assert!(out.status.success(), "{bin} --help failed");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("DATABASE_URL"),
            "{bin} documents its settings"
        );
        for secret in [
            "db-secret-pw",
            "amqp-secret-pw",
            "sk-llm-secret",
            "admin-secret",
        ] {
            assert!(!text.contains(secret), "{bin} --help shows {secret}");
        }
    }
    Ok(())
}
