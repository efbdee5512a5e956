//! Flow control against real processes: the LLM budget shared by every
//! worker (concurrency, requests per window, the provider's 429 pausing
//! everyone, capacity of a killed worker given back), fairness between
//! tenants, the interactive and batch lanes, and the queue position.
//! `chatq-mock-llm` enforces limits as a provider does and counts its 429s.
//! Time is compressed where a test needs several windows: the mock's
//! "minute" (`CHATQ_MOCK_RATE_WINDOW_MS`) and chatq's
//! (`CHATQ_LLM_RATE_WINDOW_SECS`) are both 2 s.

use std::time::Duration;

use chatq_tests::{EnvOptions, TestEnv, env_of, eventually};
use serde_json::{Value, json};
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(120);

/// Submits `n` one-shot chats with at most 32 requests at once; returns
/// their ids in submission order.
async fn submit(
    env: &TestEnv,
    key: &str,
    n: usize,
    tag: &str,
    extra: Value,
) -> anyhow::Result<Vec<Uuid>> {
    let mut ids = Vec::with_capacity(n);
    let mut start = 0;
    while start < n {
        let end = (start + 32).min(n);
        let posts = (start..end).map(|i| {
            let (api, key) = (env.api.clone(), key.to_owned());
            let mut body = json!({"content": format!("{tag} {i}")});
            if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
                b.extend(e.clone());
            }
            async move {
                let r = api.post("/v1/chat", &key, &body).await?;
                anyhow::ensure!(r.status == 202, "submit answered {}: {}", r.status, r.body);
                Ok::<_, anyhow::Error>(r.str("id").parse::<Uuid>()?)
            }
        });
        for id in futures_util::future::join_all(posts).await {
            ids.push(id?);
        }
        start = end;
    }
    Ok(ids)
}

async fn wait_succeeded(env: &TestEnv, n: i64) -> anyhow::Result<()> {
    env.wait_terminal_count(n, DEADLINE).await?;
    env.job_summary().await?.assert_all_succeeded_once(n);
    Ok(())
}

fn stat(stats: &Value, name: &str) -> i64 {
    stats[name].as_i64().unwrap_or(-1)
}

#[tokio::test]
async fn the_concurrency_cap_holds_across_all_workers() -> anyhow::Result<()> {
    let (env, key) = TestEnv::start_with_key(EnvOptions {
        workers: 3,
        mock_env: env_of(&[("CHATQ_MOCK_LATENCY_MS", "300")]),
        worker_env: env_of(&[
            ("CHATQ_WORKER_CONCURRENCY", "64"),
            ("CHATQ_LLM_MAX_CONCURRENCY", "10"),
        ]),
        ..Default::default()
    })
    .await?;
    submit(&env, &key, 90, "capped", json!({})).await?;
    wait_succeeded(&env, 90).await?;
    let stats = env.mock_stats().await?;
    let peak = stat(&stats, "peak_in_flight");
    assert!(
        (2..=10).contains(&peak),
        "192 worker slots, 10 shared: the mock saw {peak} calls at once: {stats}"
    );
    assert_eq!(stat(&stats, "total"), 90, "one call per job: {stats}");
    let held: i64 = sqlx::query_scalar("select count(*) from llm_calls")
        .fetch_one(&env.db)
        .await?;
    assert_eq!(held, 0, "every call gave its capacity back");
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn a_budget_equal_to_the_providers_limit_gets_no_429() -> anyhow::Result<()> {
    // 10 requests per 2 s window on both sides; 40 jobs span four windows.
    let (env, key) = TestEnv::start_with_key(EnvOptions {
        workers: 3,
        mock_env: env_of(&[
            ("CHATQ_MOCK_REQUESTS_PER_MINUTE", "10"),
            ("CHATQ_MOCK_RATE_WINDOW_MS", "2000"),
        ]),
        worker_env: env_of(&[
            ("CHATQ_LLM_REQUESTS_PER_MINUTE", "10"),
            ("CHATQ_LLM_RATE_WINDOW_SECS", "2"),
        ]),
        ..Default::default()
    })
    .await?;
    submit(&env, &key, 40, "paced", json!({})).await?;
    wait_succeeded(&env, 40).await?;
    let stats = env.mock_stats().await?;
    assert_eq!(stat(&stats, "rate_limited"), 0, "{stats}");
    assert_eq!(stat(&stats, "total"), 40, "{stats}");
    let retried: i64 = sqlx::query_scalar("select count(*) from jobs where attempts > 1")
        .fetch_one(&env.db)
        .await?;
    assert_eq!(retried, 0, "no job needed a second attempt");
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn the_providers_429_pauses_every_worker() -> anyhow::Result<()> {
    // chatq believes it may send twice what the provider allows.
    let (env, key) = TestEnv::start_with_key(EnvOptions {
        workers: 3,
        mock_env: env_of(&[
            ("CHATQ_MOCK_REQUESTS_PER_MINUTE", "10"),
            ("CHATQ_MOCK_RATE_WINDOW_MS", "2000"),
        ]),
        worker_env: env_of(&[
            ("CHATQ_LLM_REQUESTS_PER_MINUTE", "20"),
            ("CHATQ_LLM_RATE_WINDOW_SECS", "2"),
            ("CHATQ_MAX_ATTEMPTS", "20"),
        ]),
        ..Default::default()
    })
    .await?;
    let started = std::time::Instant::now();
    submit(&env, &key, 60, "overbooked", json!({})).await?;
    wait_succeeded(&env, 60).await?;
    let windows = (started.elapsed().as_secs_f64() / 2.0).ceil() as i64;
    let stats = env.mock_stats().await?;
    let limited = stat(&stats, "rate_limited");
    assert!(limited >= 1, "the budget is above the provider's: {stats}");
    // Without a shared pause, three workers with 64 slots each keep
    // calling: one 429 per job and retry. With it, a few per window.
    assert!(
        limited <= 4 * windows,
        "{limited} 429s over {windows} windows of 2 s: {stats}"
    );
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn a_killed_workers_capacity_comes_back_when_its_lease_lapses() -> anyhow::Result<()> {
    let (mut env, key) = TestEnv::start_with_key(EnvOptions {
        workers: 0,
        mock_env: env_of(&[("CHATQ_MOCK_LATENCY_MS", "30000")]),
        worker_env: env_of(&[
            ("CHATQ_LLM_MAX_CONCURRENCY", "2"),
            ("CHATQ_LLM_TIMEOUT_SECS", "4"),
            ("CHATQ_LEASE_SECS", "2"),
        ]),
        ..Default::default()
    })
    .await?;
    let first = env.start_worker(&[]).await?;
    submit(&env, &key, 4, "holding", json!({})).await?;
    eventually("2 calls holding the capacity", DEADLINE, || async {
        let stats = env.mock_stats().await?;
        Ok((stat(&stats, "in_flight") == 2).then_some(()))
    })
    .await?;
    env.signal_worker(first, "KILL").await?;
    let held: i64 = sqlx::query_scalar("select count(*) from llm_calls")
        .fetch_one(&env.db)
        .await?;
    assert_eq!(held, 2, "the killed worker's calls still hold the capacity");
    reqwest::Client::new()
        .post(format!("{}/_mock/config", env.mock_url))
        .json(&json!({"latency_ms": 0}))
        .send()
        .await?;
    env.start_worker(&[]).await?;
    wait_succeeded(&env, 4).await?;
    let stats = env.mock_stats().await?;
    assert!(stat(&stats, "peak_in_flight") <= 2, "{stats}");
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn a_second_tenants_job_starts_within_a_few_jobs_of_a_flood() -> anyhow::Result<()> {
    let (env, flooder) = TestEnv::start_with_key(EnvOptions {
        workers: 1,
        mock_env: env_of(&[("CHATQ_MOCK_LATENCY_MS", "50")]),
        worker_env: env_of(&[("CHATQ_WORKER_CONCURRENCY", "2")]),
        ..Default::default()
    })
    .await?;
    let (_, other) = env.create_key("other").await?;
    submit(&env, &flooder, 2000, "flood", json!({})).await?;
    let single = submit(&env, &other, 1, "single", json!({})).await?[0];
    let job = env
        .api
        .wait_terminal(&other, &single.to_string(), DEADLINE)
        .await?;
    assert_eq!(job["status"], "succeeded");
    let (overtaking, left): (i64, i64) = sqlx::query_as(
        "select count(*) filter (where j.started_at > s.created_at and j.started_at < s.started_at),
                count(*) filter (where j.status = 'queued')
         from jobs j, jobs s where s.id = $1 and j.id <> s.id",
    )
    .bind(single)
    .fetch_one(&env.db)
    .await?;
    assert!(left > 100, "the flood was still queued: {left}");
    assert!(
        overtaking <= 5,
        "{overtaking} of the flood's jobs started between the single job's submission and its start"
    );
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn interactive_work_goes_first_and_batch_still_progresses() -> anyhow::Result<()> {
    let (env, key) = TestEnv::start_with_key(EnvOptions {
        workers: 1,
        mock_env: env_of(&[("CHATQ_MOCK_LATENCY_MS", "50")]),
        worker_env: env_of(&[("CHATQ_WORKER_CONCURRENCY", "1")]),
        ..Default::default()
    })
    .await?;
    submit(&env, &key, 300, "batch", json!({"priority": "batch"})).await?;
    let urgent = submit(&env, &key, 1, "urgent", json!({})).await?[0];
    env.api
        .wait_terminal(&key, &urgent.to_string(), DEADLINE)
        .await?;
    let overtaking: i64 = sqlx::query_scalar(
        "select count(*) from jobs j, jobs u
         where u.id = $1 and j.priority = 'batch'
           and j.started_at > u.created_at and j.started_at < u.started_at",
    )
    .bind(urgent)
    .fetch_one(&env.db)
    .await?;
    assert!(
        overtaking <= 1,
        "{overtaking} batch jobs started before the interactive one"
    );

    // Continuous interactive work: batch still gets its share.
    let mark: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("select now()")
        .fetch_one(&env.db)
        .await?;
    for id in submit(&env, &key, 100, "steady", json!({})).await? {
        env.api
            .wait_terminal(&key, &id.to_string(), DEADLINE)
            .await?;
    }
    let (interactive, batch): (i64, i64) = sqlx::query_as(
        "select count(*) filter (where priority = 'interactive'),
                count(*) filter (where priority = 'batch')
         from jobs where started_at > $1
           and started_at <= (select max(started_at) from jobs where priority = 'interactive')",
    )
    .bind(mark)
    .fetch_one(&env.db)
    .await?;
    assert_eq!(interactive, 100);
    assert!(
        batch >= 3,
        "batch started {batch} jobs while 100 interactive ones ran: it must keep a share"
    );
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn queue_position_counts_down_to_one_then_disappears() -> anyhow::Result<()> {
    let (env, key) = TestEnv::start_with_key(EnvOptions {
        workers: 1,
        mock_env: env_of(&[("CHATQ_MOCK_LATENCY_MS", "700")]),
        worker_env: env_of(&[("CHATQ_LLM_MAX_CONCURRENCY", "1")]),
        ..Default::default()
    })
    .await?;
    let conv = env.api.create_conversation(&key, &json!({})).await?;
    // Paused, so that the six ahead are all still queued when ours comes.
    let paused = env
        .api
        .admin_post("/admin/v1/queues/pause", &json!({}))
        .await?;
    assert_eq!(paused.status, 200, "{}", paused.body);
    let ids = submit(&env, &key, 6, "ahead", json!({})).await?;
    // Positions come from a snapshot of the start order at most 200 ms old.
    tokio::time::sleep(Duration::from_millis(250)).await;
    let accepted = env.api.submit(&key, &conv, "mine").await?;
    let id = accepted["id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(
        accepted["queue"]["position"], 7,
        "202 carries the position: {accepted}"
    );
    assert!(
        accepted["queue"]["estimated_start_at"].is_string(),
        "{accepted}"
    );
    let resumed = env
        .api
        .admin_post("/admin/v1/queues/resume", &json!({}))
        .await?;
    assert_eq!(resumed.status, 200, "{}", resumed.body);

    let mut seen = Vec::new();
    let job = loop {
        let r = env.api.get(&format!("/v1/jobs/{id}"), &key).await?;
        if r.body["status"] != "queued" {
            assert!(
                r.body.get("queue").is_none(),
                "only queued jobs: {}",
                r.body
            );
            break r.body;
        }
        let p = r.body["queue"]["position"].as_i64().unwrap_or(0);
        let eta = r.body["queue"]["estimated_start_at"]
            .as_str()
            .unwrap_or_default();
        assert!(
            chrono::DateTime::parse_from_rfc3339(eta).is_ok(),
            "RFC 3339 estimate: {}",
            r.body
        );
        seen.push(p);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(job["status"] == "running" || job["status"] == "succeeded");
    assert!(
        seen.windows(2).all(|w| w[1] <= w[0]),
        "the position never goes up: {seen:?}"
    );
    assert_eq!(seen.last(), Some(&1), "1 just before it started: {seen:?}");
    assert!(
        seen.first().is_some_and(|p| (3..=7).contains(p)),
        "{seen:?}"
    );
    let (_, done) = (ids, env.api.wait_terminal(&key, &id, DEADLINE).await?);
    assert_eq!(done["status"], "succeeded");
    // Its estimated tokens: 4 characters at 4 per token, plus 256 for a
    // reply without max_tokens.
    let cost: i32 = sqlx::query_scalar("select cost from jobs where id = $1::uuid")
        .bind(&id)
        .fetch_one(&env.db)
        .await?;
    assert_eq!(cost, 257);
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn a_keys_max_concurrency_holds_across_workers_without_blocking_other_keys()
-> anyhow::Result<()> {
    let (env, _) = TestEnv::start_with_key(EnvOptions {
        workers: 2,
        mock_env: env_of(&[("CHATQ_MOCK_LATENCY_MS", "400")]),
        worker_env: env_of(&[("CHATQ_WORKER_CONCURRENCY", "8")]),
        ..Default::default()
    })
    .await?;
    let r = env
        .api
        .admin_post(
            "/admin/v1/api-keys",
            &json!({"tenant": "capped", "max_concurrency": 2}),
        )
        .await?;
    assert_eq!(r.status, 201, "{}", r.body);
    let capped = r.str("key");
    let (_, free) = env.create_key("free").await?;

    // 16 worker slots, a key allowed 2: the mock never sees more than 2.
    submit(&env, &capped, 12, "capped", json!({})).await?;
    wait_succeeded(&env, 12).await?;
    let stats = env.mock_stats().await?;
    let peak = stat(&stats, "peak_in_flight");
    assert!(
        (1..=2).contains(&peak),
        "a key with max_concurrency 2 had {peak} calls at once: {stats}"
    );

    // Its backlog does not hold up another key's job.
    let backlog = submit(&env, &capped, 16, "backlog", json!({})).await?;
    let single = submit(&env, &free, 1, "free", json!({})).await?[0];
    let job = env
        .api
        .wait_terminal(&free, &single.to_string(), DEADLINE)
        .await?;
    assert_eq!(job["status"], "succeeded");
    wait_succeeded(&env, 29).await?;
    let started_after: i64 = sqlx::query_scalar(
        "select count(*) from jobs j, jobs s
         where s.id = $1 and j.id = any($2) and j.started_at > s.started_at",
    )
    .bind(single)
    .bind(&backlog)
    .fetch_one(&env.db)
    .await?;
    assert!(
        started_after >= 8,
        "the other key's job started after {} of the capped key's 16 queued jobs",
        16 - started_after
    );
    let parked: i64 = sqlx::query_scalar("select count(*) from jobs where status = 'queued'")
        .fetch_one(&env.db)
        .await?;
    assert_eq!(parked, 0, "nothing is left waiting for a slot");
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn concurrent_submissions_of_one_tenant_get_distinct_start_tags() -> anyhow::Result<()> {
    // No worker: every job stays queued with the tag it got on insert.
    let (env, key) = TestEnv::start_with_key(EnvOptions {
        workers: 0,
        ..Default::default()
    })
    .await?;
    // Keyed submissions are stored one statement each (not batched), so
    // concurrent ones are concurrent transactions.
    let posts = (0..60).map(|i| {
        let (api, key) = (env.api.clone(), key.clone());
        async move {
            let body = json!({"content": format!("race {i}")});
            let r = api
                .raw(
                    reqwest::Method::POST,
                    "/v1/chat",
                    Some(&key),
                    Some(("application/json", serde_json::to_vec(&body)?)),
                    &[("idempotency-key", &format!("race-{i}"))],
                )
                .await?;
            anyhow::ensure!(r.status == 202, "submit answered {}: {}", r.status, r.body);
            Ok::<_, anyhow::Error>(())
        }
    });
    for r in futures_util::future::join_all(posts).await {
        r?;
    }
    let (jobs, tags): (i64, i64) = sqlx::query_as(
        "select count(*), count(distinct start_tag) from jobs where status = 'queued'",
    )
    .fetch_one(&env.db)
    .await?;
    assert_eq!(jobs, 60);
    assert_eq!(
        tags, 60,
        "each of a tenant's jobs starts after the one before: no two share a start tag"
    );
    env.cleanup().await;
    Ok(())
}
