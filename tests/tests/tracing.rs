//! Logs as an operator reads them (`LOG_FORMAT=json`): a client's W3C
//! `traceparent` continues into the worker's span for the job, and no
//! prompt, reply or key ever appears in any chatq process's log.

use std::time::Duration;

use chatq_tests::{EnvOptions, TestEnv, env_of};
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(60);

/// Both chatq processes log JSON, chatq's own modules at debug, into one
/// file per test.
fn logged(file: &str) -> Vec<(String, String)> {
    env_of(&[
        ("LOG_FORMAT", "json"),
        (
            "RUST_LOG",
            "info,chatq_api=debug,chatq_worker=debug,chatq_common=debug,sqlx=warn",
        ),
        ("CHATQ_TEST_LOG_FILE", file),
    ])
}

/// Submits a one-shot chat with a `traceparent` header; its job id.
async fn submit_traced(
    env: &TestEnv,
    key: &str,
    content: &str,
    traceparent: &str,
) -> anyhow::Result<String> {
    let body = serde_json::to_vec(&json!({ "content": content }))?;
    let r = env
        .api
        .raw(
            reqwest::Method::POST,
            "/v1/chat",
            Some(key),
            Some(("application/json", body)),
            &[("traceparent", traceparent)],
        )
        .await?;
    assert_eq!(r.status, 202, "{}", r.body);
    Ok(r.str("id"))
}

fn log_lines(file: &str) -> anyhow::Result<Vec<Value>> {
    let text = std::fs::read_to_string(file)?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

#[tokio::test]
async fn a_clients_traceparent_continues_into_the_workers_span_for_the_job() -> anyhow::Result<()> {
    let file = format!("/tmp/chatq-trace-{}.log", uuid::Uuid::new_v4());
    let (env, key) = TestEnv::start_with_key(EnvOptions {
        workers: 1,
        api_env: logged(&file),
        worker_env: logged(&file),
        ..Default::default()
    })
    .await?;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let id = submit_traced(
        &env,
        &key,
        "traced",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    )
    .await?;
    let done = env.api.wait_terminal(&key, &id, DEADLINE).await?;
    assert_eq!(done["status"], "succeeded");
    // Another job, without a traceparent, gets a trace of its own.
    let conv = env.api.create_conversation(&key, &json!({})).await?;
    let other = env.api.submit(&key, &conv, "untraced").await?;
    let other = other["id"].as_str().unwrap_or_default().to_owned();
    env.api.wait_terminal(&key, &other, DEADLINE).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let lines = log_lines(&file)?;
    let in_job_span = |job: &str| {
        lines
            .iter()
            .filter(|l| {
                l["target"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("chatq_worker"))
                    && l["span"]["job_id"] == job
            })
            .collect::<Vec<_>>()
    };
    let worker = in_job_span(&id);
    assert!(!worker.is_empty(), "the worker logged in the job's span");
    assert!(
        worker.iter().all(|l| l["span"]["trace_id"] == trace_id),
        "every worker line of the job carries the client's trace id: {worker:?}"
    );
    let api_traced = lines.iter().any(|l| {
        l["target"]
            .as_str()
            .is_some_and(|t| t.starts_with("chatq_api"))
            && l["span"]["trace_id"] == trace_id
    });
    assert!(api_traced, "the api's request span carries it too");
    let other_lines = in_job_span(&other);
    assert!(!other_lines.is_empty());
    let other_trace = other_lines[0]["span"]["trace_id"]
        .as_str()
        .unwrap_or_default();
    assert_eq!(other_trace.len(), 32, "{other_lines:?}");
    assert_ne!(other_trace, trace_id);
    env.cleanup().await;
    let _ = std::fs::remove_file(&file);
    Ok(())
}

#[tokio::test]
async fn no_prompt_reply_or_key_reaches_any_log() -> anyhow::Result<()> {
    let file = format!("/tmp/chatq-leak-{}.log", uuid::Uuid::new_v4());
    let (env, key) = TestEnv::start_with_key(EnvOptions {
        workers: 1,
        api_env: logged(&file),
        worker_env: logged(&file),
        ..Default::default()
    })
    .await?;
    let marker = "ZEBRA-7f3a-SECRET";
    // The mock's reply quotes the prompt, so the marker is in both.
    let conv = env
        .api
        .create_conversation(&key, &json!({"system_prompt": format!("system {marker}")}))
        .await?;
    let job = env
        .api
        .submit(&key, &conv, &format!("user {marker}"))
        .await?;
    let id = job["id"].as_str().unwrap_or_default().to_owned();
    let done = env.api.wait_terminal(&key, &id, DEADLINE).await?;
    assert!(
        done["result"]["content"]
            .as_str()
            .is_some_and(|c| c.contains(marker)),
        "the reply holds the marker: {done}"
    );
    // The facade, streamed, too.
    let r = env
        .api
        .raw(
            reqwest::Method::POST,
            "/v1/chat/completions",
            Some(&key),
            Some((
                "application/json",
                serde_json::to_vec(&json!({
                    "model": "gpt-4o-mini",
                    "stream": true,
                    "messages": [{"role": "user", "content": format!("facade {marker}")}]
                }))?,
            )),
            &[],
        )
        .await?;
    assert_eq!(r.status, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let text = std::fs::read_to_string(&file)?;
    assert!(
        text.lines().count() > 10,
        "the processes logged: {} lines",
        text.lines().count()
    );
    assert!(!text.contains(marker), "a prompt or reply reached the logs");
    assert!(!text.contains(&key), "the API key reached the logs");
    let secret = key.split('_').next_back().unwrap_or(&key);
    assert!(
        !text.contains(secret),
        "part of the API key reached the logs"
    );
    env.cleanup().await;
    let _ = std::fs::remove_file(&file);
    Ok(())
}

/// Every span an OTLP/HTTP (JSON) exporter sent to a collector in this test.
#[derive(Clone, Default)]
struct Collector {
    spans: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
    bodies: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Collector {
    /// Serves `POST /v1/traces` on an ephemeral port; returns its base URL.
    async fn start(&self) -> anyhow::Result<String> {
        let me = self.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: String| async move {
                if let Ok(export) = serde_json::from_str::<Value>(&body) {
                    let mut spans = me.spans.lock().unwrap_or_else(|e| e.into_inner());
                    for rs in export["resourceSpans"].as_array().into_iter().flatten() {
                        for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                            spans.extend(ss["spans"].as_array().into_iter().flatten().cloned());
                        }
                    }
                }
                me.bodies
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push_str(&body);
                ([("content-type", "application/json")], "{}")
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(url)
    }

    fn spans(&self) -> Vec<Value> {
        self.spans.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn text(&self) -> String {
        self.bodies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The value of a span's string attribute.
fn attribute<'a>(span: &'a Value, key: &str) -> Option<&'a str> {
    span["attributes"]
        .as_array()?
        .iter()
        .find(|a| a["key"] == key)?["value"]["stringValue"]
        .as_str()
}

#[tokio::test]
async fn with_an_otlp_endpoint_the_workers_span_is_exported_as_the_child_of_the_submits()
-> anyhow::Result<()> {
    let collector = Collector::default();
    let endpoint = collector.start().await?;
    let otel = env_of(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ]);
    let (env, key) = TestEnv::start_with_key(EnvOptions {
        workers: 1,
        api_env: otel.clone(),
        worker_env: otel,
        ..Default::default()
    })
    .await?;
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let client_span = "b7ad6b7169203331";
    let marker = "OKAPI-91c2-SECRET";
    let id = submit_traced(
        &env,
        &key,
        &format!("traced {marker}"),
        &format!("00-{trace_id}-{client_span}-01"),
    )
    .await?;
    let done = env.api.wait_terminal(&key, &id, DEADLINE).await?;
    assert_eq!(done["status"], "succeeded");

    let job_span = |spans: &[Value]| {
        spans
            .iter()
            .find(|s| s["name"] == "job" && attribute(s, "job_id") == Some(id.as_str()))
            .cloned()
    };
    let deadline = std::time::Instant::now() + DEADLINE;
    let spans = loop {
        let spans = collector.spans();
        if job_span(&spans).is_some() {
            break spans;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the worker's span for the job was never exported: {} spans",
            spans.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let submit = spans
        .iter()
        .find(|s| s["name"] == "request" && s["traceId"] == trace_id)
        .ok_or_else(|| anyhow::anyhow!("no request span in the client's trace: {spans:?}"))?;
    assert_eq!(
        submit["parentSpanId"], client_span,
        "the submit's span is the child of the client's: {submit}"
    );
    let job = job_span(&spans).unwrap_or_default();
    assert_eq!(job["traceId"], trace_id, "{job}");
    assert_eq!(
        job["parentSpanId"], submit["spanId"],
        "the worker's span for the job is the child of the submit's: {job}"
    );
    let text = collector.text();
    assert!(
        !text.contains(marker),
        "a prompt or reply reached an exported span"
    );
    assert!(!text.contains(&key), "the API key reached an exported span");
    env.cleanup().await;
    Ok(())
}
