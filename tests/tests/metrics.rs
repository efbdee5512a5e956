//! Prometheus metrics, end to end: scrape the api and a worker, run jobs
//! that succeed, fail and retry, scrape again, and compare.

use std::time::Duration;

use chatq_tests::{EnvOptions, TestEnv, env_of, eventually};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(60);

/// One scrape of a `/metrics` page.
struct Scrape(String);

impl Scrape {
    /// The value of one series (name with its labels, exactly as
    /// rendered); 0 when the series is absent (not yet created).
    fn value(&self, series: &str) -> f64 {
        self.0
            .lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .map_or(0.0, |v| v.trim().parse().unwrap_or(f64::NAN))
    }

    /// The sum of every series that starts with `prefix` (e.g. a name and
    /// some of its labels).
    fn sum(&self, prefix: &str) -> f64 {
        self.0
            .lines()
            .filter(|line| line.starts_with(prefix))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

async fn scrape(env: &TestEnv, base: &str) -> anyhow::Result<Scrape> {
    // No Authorization header: /metrics is open to the scraper.
    let r = env.api.http.get(format!("{base}/metrics")).send().await?;
    anyhow::ensure!(r.status() == 200, "{base}/metrics answered {}", r.status());
    let content_type = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    anyhow::ensure!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    Ok(Scrape(r.text().await?))
}

const SUBMIT_202: &str = r#"chatq_http_requests_total{method="POST",route="/v1/conversations/{id}/messages",status="202"}"#;
const SUBMIT_409: &str = r#"chatq_http_requests_total{method="POST",route="/v1/conversations/{id}/messages",status="409"}"#;
const SUBMIT_202_LATENCY: &str = r#"chatq_http_request_duration_seconds_count{method="POST",route="/v1/conversations/{id}/messages",status="202"}"#;

#[tokio::test]
async fn counters_move_by_what_jobs_did_on_the_api_and_the_worker() -> anyhow::Result<()> {
    // Arrange
    let (env, key) = TestEnv::start_with_key(EnvOptions {
        worker_env: env_of(&[("CHATQ_WORKER_CONCURRENCY", "4")]),
        ..Default::default()
    })
    .await?;
    let worker = env.worker_metrics_url(0).await?;
    let api_before = scrape(&env, &env.api.url).await?;
    let worker_before = scrape(&env, &worker).await?;

    // Act: a success, a permanent failure, a retried success, and a second
    // turn refused while the first (slow) one is still active.
    let mut ids = Vec::new();
    for prompt in [
        "hello",
        "rejected [mock:status=400]",
        "flaky [mock:fail_first=1]",
    ] {
        let conv = env.api.create_conversation(&key, &json!({})).await?;
        ids.push(env.api.submit(&key, &conv, prompt).await?["id"].clone());
    }
    let busy = env.api.create_conversation(&key, &json!({})).await?;
    let slow = env
        .api
        .submit(&key, &busy, "slow [mock:chunk_delay_ms=300]")
        .await?;
    ids.push(slow["id"].clone());
    let refused = env
        .api
        .post(
            &format!("/v1/conversations/{busy}/messages"),
            &key,
            &json!({"content": "too soon"}),
        )
        .await?;
    assert_eq!(refused.status, 409, "{}", refused.body);
    for id in &ids {
        env.api
            .wait_terminal(&key, id.as_str().unwrap_or_default(), DEADLINE)
            .await?;
    }
    let api_after = scrape(&env, &env.api.url).await?;
    // The worker counts a job just after its commit, which the api may
    // report first: wait for the four ends to be counted.
    let jobs_ended = |s: &Scrape| {
        s.value(r#"chatq_worker_jobs_total{outcome="succeeded"}"#)
            + s.value(r#"chatq_worker_jobs_total{outcome="failed"}"#)
    };
    let worker_after = eventually("the worker to count four job ends", DEADLINE, || async {
        let s = scrape(&env, &worker).await?;
        Ok((jobs_ended(&s) - jobs_ended(&worker_before) >= 4.0).then_some(s))
    })
    .await?;

    // Assert: the api counted the submissions and their requests ...
    let moved =
        |after: &Scrape, before: &Scrape, series: &str| after.value(series) - before.value(series);
    assert_eq!(
        moved(&api_after, &api_before, "chatq_submissions_accepted_total"),
        4.0
    );
    assert_eq!(
        moved(
            &api_after,
            &api_before,
            r#"chatq_submissions_rejected_total{reason="conversation_busy"}"#
        ),
        1.0
    );
    assert_eq!(moved(&api_after, &api_before, SUBMIT_202), 4.0);
    assert_eq!(moved(&api_after, &api_before, SUBMIT_409), 1.0);
    assert_eq!(moved(&api_after, &api_before, SUBMIT_202_LATENCY), 4.0);
    assert!(
        api_after.value(r#"chatq_http_requests_total{method="GET",route="/metrics",status="200"}"#)
            >= 1.0,
        "scrapes are counted under their route template"
    );

    // ... and the worker its jobs, LLM calls, errors and retries.
    let w = |series: &str| moved(&worker_after, &worker_before, series);
    assert_eq!(w(r#"chatq_worker_jobs_total{outcome="succeeded"}"#), 3.0);
    assert_eq!(w(r#"chatq_worker_jobs_total{outcome="failed"}"#), 1.0);
    assert_eq!(w(r#"chatq_llm_errors_total{code="llm_rejected"}"#), 1.0);
    assert_eq!(w(r#"chatq_llm_errors_total{code="llm_unavailable"}"#), 1.0);
    assert_eq!(
        worker_after.sum(r#"chatq_llm_retries_total{reason="llm_unavailable""#)
            - worker_before.sum(r#"chatq_llm_retries_total{reason="llm_unavailable""#),
        1.0
    );
    assert_eq!(
        w(r#"chatq_llm_request_duration_seconds_count{outcome="ok"}"#),
        3.0
    );
    assert_eq!(
        w(r#"chatq_llm_request_duration_seconds_count{outcome="error"}"#),
        2.0
    );
    assert_eq!(w("chatq_llm_time_to_first_token_seconds_count"), 3.0);
    assert!(w(r#"chatq_llm_tokens_total{direction="in"}"#) > 0.0);
    assert!(w(r#"chatq_llm_tokens_total{direction="out"}"#) > 0.0);
    assert_eq!(worker_after.value("chatq_worker_capacity"), 4.0);
    assert_eq!(worker_after.value("chatq_worker_jobs_in_flight"), 0.0);

    // Every series the Grafana dashboard queries exists.
    let dashboard = include_str!("../../deploy/grafana/chatq.json");
    let scraped = format!("{}{}", api_after.0, worker_after.0);
    for name in dashboard
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| word.starts_with("chatq_"))
    {
        assert!(
            scraped.contains(name),
            "the dashboard queries {name}, which no process exports"
        );
    }

    // The sampled gauges catch up within one sampling interval.
    eventually(
        "the api's sampled job and queue gauges",
        Duration::from_secs(20),
        || async {
            let s = scrape(&env, &env.api.url).await?;
            let caught_up = s.value(r#"chatq_jobs{status="succeeded"}"#) == 3.0
                && s.value(r#"chatq_jobs{status="failed"}"#) == 1.0
                && s.value("chatq_dead_letter_messages") == 1.0
                && s.value("chatq_queue_consumers") == 1.0
                && s.value("chatq_queue_messages") == 0.0
                && s.value("chatq_outbox_backlog") == 0.0
                && s.value("chatq_oldest_queued_job_age_seconds") == 0.0;
            Ok(caught_up.then_some(()))
        },
    )
    .await?;
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn the_worker_serves_health_and_readiness_next_to_its_metrics() -> anyhow::Result<()> {
    // Arrange: two workers on one machine, each on its own free port.
    let env = TestEnv::start(EnvOptions {
        workers: 2,
        ..Default::default()
    })
    .await?;
    let first = env.worker_metrics_url(0).await?;
    let second = env.worker_metrics_url(1).await?;
    assert_ne!(first, second);

    for base in [&first, &second] {
        // Act
        let health = env.api.http.get(format!("{base}/healthz")).send().await?;
        let ready = env.api.http.get(format!("{base}/readyz")).send().await?;
        let page = scrape(&env, base).await?;

        // Assert
        assert_eq!(health.status(), 200);
        assert_eq!(ready.status(), 200, "{}", ready.text().await?);
        assert_eq!(page.value("chatq_worker_capacity"), 64.0, "the default");
        assert!(page.0.ends_with("# EOF\n"));
    }
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn the_outbox_gauges_show_the_relays_backlog_and_lag_while_the_broker_is_away()
-> anyhow::Result<()> {
    let proxy = chatq_tests::proxy::FaultProxy::start("127.0.0.1:5672".parse()?).await?;
    let via_proxy = format!("amqp://guest:guest@{}/%2f", proxy.addr);
    // No worker yet: its relay would publish the outbox within a second.
    let (mut env, key) = TestEnv::start_with_key(EnvOptions {
        workers: 0,
        api_env: env_of(&[("AMQP_URL", &via_proxy)]),
        ..Default::default()
    })
    .await?;
    let before = scrape(&env, &env.api.url).await?;
    assert_eq!(before.value("chatq_outbox_backlog"), 0.0);
    assert_eq!(before.value("chatq_outbox_lag_seconds"), 0.0);

    // The api cannot publish: accepted jobs wait in the outbox.
    proxy.cut();
    let mut ids = Vec::new();
    for i in 0..5 {
        let r = env
            .api
            .post("/v1/chat", &key, &json!({"content": format!("outbox {i}")}))
            .await?;
        assert_eq!(r.status, 202, "{}", r.body);
        ids.push(r.str("id"));
    }
    eventually(
        "the outbox gauges show the 5 unpublished jobs",
        Duration::from_secs(30),
        || async {
            let s = scrape(&env, &env.api.url).await?;
            let shown =
                s.value("chatq_outbox_backlog") == 5.0 && s.value("chatq_outbox_lag_seconds") > 0.0;
            Ok(shown.then_some(()))
        },
    )
    .await?;

    // The broker is back and a worker's relay publishes the outbox.
    proxy.restore();
    env.start_worker(&[]).await?;
    for id in &ids {
        let job = env.api.wait_terminal(&key, id, DEADLINE).await?;
        assert_eq!(job["status"], "succeeded");
    }
    eventually(
        "the outbox gauges return to 0",
        Duration::from_secs(30),
        || async {
            let s = scrape(&env, &env.api.url).await?;
            let empty = s.value("chatq_outbox_backlog") == 0.0
                && s.value("chatq_outbox_lag_seconds") == 0.0;
            Ok(empty.then_some(()))
        },
    )
    .await?;
    env.cleanup().await;
    Ok(())
}
