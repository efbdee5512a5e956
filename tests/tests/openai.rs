//! The OpenAI-compatible facade, proved with clients nobody on this team
//! wrote: the official `openai` Python SDK (in the venv `scripts/test.sh`
//! creates) and the `async-openai` crate; plus a client that leaves, and a
//! burst of SDK-style requests.

use std::path::PathBuf;
use std::time::Duration;

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequestArgs,
};
use chatq_tests::{EnvOptions, TestEnv, env_of, eventually};
use futures_util::StreamExt;
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(120);
const MODEL: &str = "gpt-4o-mini";

/// The Python of the venv `scripts/test.sh` makes (`CHATQ_TEST_PYTHON`).
fn python() -> PathBuf {
    let path = std::env::var("CHATQ_TEST_PYTHON").map_or_else(
        |_| PathBuf::from("/var/tmp/chatq-venv/bin/python"),
        PathBuf::from,
    );
    assert!(
        path.exists(),
        "{} is missing: run scripts/test.sh, which creates the venv with the openai SDK",
        path.display()
    );
    path
}

/// Runs checks of `tests/python/openai_sdk.py` against `env` with `key`.
async fn run_sdk_checks(env: &TestEnv, key: &str, checks: &str) -> anyhow::Result<()> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/openai_sdk.py");
    let out = tokio::time::timeout(
        Duration::from_secs(300),
        tokio::process::Command::new(python())
            .arg(script)
            .env("CHATQ_BASE_URL", format!("{}/v1", env.api.url))
            .env("CHATQ_KEY", key)
            .env("CHATQ_MODEL", MODEL)
            .env("CHATQ_CHECKS", checks)
            .output(),
    )
    .await??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(
        out.status.success(),
        "SDK checks failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for check in checks.split(',') {
        anyhow::ensure!(
            stdout.contains(&format!("ok {check}")),
            "check {check} did not run: {stdout}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn the_official_python_sdk_works_unchanged() -> anyhow::Result<()> {
    let (env, key) = TestEnv::start_with_key(EnvOptions {
        workers: 2,
        ..Default::default()
    })
    .await?;
    run_sdk_checks(
        &env,
        &key,
        "plain,options,stream_plain,stream_usage,async,errors,models",
    )
    .await?;
    // Every completion was an ordinary job: stored, run once, succeeded.
    let (jobs, failed): (i64, i64) =
        sqlx::query_as("select count(*), count(*) filter (where status <> 'succeeded') from jobs")
            .fetch_one(&env.db)
            .await?;
    assert_eq!((jobs, failed), (10, 0), "jobs of the accepted requests");
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn the_python_sdk_retries_through_429_until_every_request_is_answered() -> anyhow::Result<()>
{
    let small_queue = [
        ("CHATQ_MAX_QUEUE_LENGTH", "2"),
        ("CHATQ_TENANT_QUEUE_SHARE", "1"),
    ];
    let mut worker = small_queue.to_vec();
    worker.push(("CHATQ_WORKER_CONCURRENCY", "1"));
    let (env, key) = TestEnv::start_with_key(EnvOptions {
        workers: 1,
        api_env: env_of(&small_queue),
        worker_env: env_of(&worker),
        ..Default::default()
    })
    .await?;
    run_sdk_checks(&env, &key, "retries_through_429").await?;
    let succeeded: i64 = sqlx::query_scalar("select count(*) from jobs where status = 'succeeded'")
        .fetch_one(&env.db)
        .await?;
    assert_eq!(succeeded, 6, "one job per answered request, none for a 429");
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn the_async_openai_crate_gets_plain_and_streamed_completions() -> anyhow::Result<()> {
    let (env, key) = TestEnv::start_with_key(EnvOptions::default()).await?;
    let config = OpenAIConfig::new()
        .with_api_base(format!("{}/v1", env.api.url))
        .with_api_key(key);
    let client = Client::with_config(config);
    let request = |content: &str| {
        CreateChatCompletionRequestArgs::default()
            .model(MODEL)
            .messages([ChatCompletionRequestUserMessageArgs::default()
                .content(content)
                .build()
                .expect("a user message builds")
                .into()])
            .build()
    };

    let plain = client.chat().create(request("plain from rust")?).await?;
    let content = plain.choices[0].message.content.clone().unwrap_or_default();
    assert!(content.contains("plain from rust"), "{content}");

    let mut stream = client
        .chat()
        .create_stream(request("streamed from rust [mock:words=25]")?)
        .await?;
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        for choice in chunk?.choices {
            text.push_str(choice.delta.content.as_deref().unwrap_or_default());
        }
    }
    assert_eq!(text.split_whitespace().count(), 25, "{text}");
    let stored: String = sqlx::query_scalar(
        "select result_content from jobs where status = 'succeeded' order by created_at desc limit 1",
    )
    .fetch_one(&env.db)
    .await?;
    assert_eq!(stored, text, "the streamed text is the stored reply");
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn a_client_that_leaves_before_its_answer_cancels_the_job() -> anyhow::Result<()> {
    let (env, key) = TestEnv::start_with_key(EnvOptions::default()).await?;
    for stream in [false, true] {
        let body = json!({
            "model": MODEL, "stream": stream,
            "messages": [{"role": "user", "content": format!("leave {stream} [mock:words=500][mock:chunk_delay_ms=100][mock:latency_ms=300]")}],
        });
        let request = env
            .api
            .http
            .post(format!("{}/v1/chat/completions", env.api.url))
            .bearer_auth(&key)
            .json(&body)
            .send();
        // A client reading its answer; it leaves once the LLM call is in flight.
        let call = tokio::spawn(async move {
            let mut body = request.await?.bytes_stream();
            while body.next().await.transpose()?.is_some() {}
            anyhow::Ok(())
        });
        eventually("the job to be running", DEADLINE, || async {
            let running: i64 =
                sqlx::query_scalar("select count(*) from jobs where status = 'running'")
                    .fetch_one(&env.db)
                    .await?;
            Ok((running == 1).then_some(()))
        })
        .await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        call.abort();
        let _ = call.await;
        eventually(
            "the job cancelled and the call dropped",
            DEADLINE,
            || async {
                let active: i64 = sqlx::query_scalar(
                    "select count(*) from jobs where status in ('queued', 'running')",
                )
                .fetch_one(&env.db)
                .await?;
                let in_flight = env.mock_stats().await?["in_flight"].as_i64().unwrap_or(-1);
                Ok((active == 0 && in_flight == 0).then_some(()))
            },
        )
        .await?;
    }
    let (cancelled, replies): (i64, i64) = sqlx::query_as(
        "select (select count(*) from jobs where status = 'cancelled'),
                (select count(*) from messages where role = 'assistant')",
    )
    .fetch_one(&env.db)
    .await?;
    assert_eq!((cancelled, replies), (2, 0));
    env.cleanup().await;
    Ok(())
}

/// A load test: `scripts/test.sh` runs it on its own, after the others
/// (`--ignored`), so that it measures chatq, not three neighbouring
/// deployments sharing the same 2 cores and PostgreSQL.
#[tokio::test]
#[ignore = "a load test: scripts/test.sh runs it alone"]
async fn a_burst_of_1000_sdk_style_requests_all_get_their_answer() -> anyhow::Result<()> {
    let (env, key) = TestEnv::start_with_key(EnvOptions {
        workers: 2,
        mock_env: env_of(&[("CHATQ_MOCK_LATENCY_MS", "1000")]),
        // The api's production pool size (tests default to 5 to share PostgreSQL).
        api_env: env_of(&[("CHATQ_DB_MAX_CONNECTIONS", "16")]),
        ..Default::default()
    })
    .await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .pool_max_idle_per_host(1000)
        .build()?;
    let url = format!("{}/v1/chat/completions", env.api.url);
    let calls = (0..1000).map(|i| {
        let (http, url, key) = (http.clone(), url.clone(), key.clone());
        async move {
            let body = json!({"model": MODEL, "messages": [{"role": "user", "content": format!("burst {i}")}]});
            let r = http.post(&url).bearer_auth(&key).json(&body).send().await?;
            let status = r.status().as_u16();
            let body: serde_json::Value = r.json().await?;
            anyhow::Ok((i, status, body))
        }
    });
    let answers = futures_util::future::join_all(calls).await;
    let mut failures = Vec::new();
    for answer in answers {
        match answer {
            Ok((i, 200, body))
                if body["choices"][0]["message"]["content"]
                    .as_str()
                    .is_some_and(|c| c.contains(&format!("burst {i}\""))) => {}
            Ok((i, status, body)) => failures.push(format!("{i}: {status} {body}")),
            Err(err) => failures.push(err.to_string()),
        }
    }
    assert!(
        failures.is_empty(),
        "{} failed, e.g. {:?}",
        failures.len(),
        failures.first()
    );
    env.job_summary().await?.assert_all_succeeded_once(1000);
    env.cleanup().await;
    Ok(())
}
