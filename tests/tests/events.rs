//! Server-sent job events (`GET /v1/jobs/{id}/events`) end to end: the
//! streamed text is exact for every subscriber, across reconnects on any
//! replica, retries, cancellation and upstream quirks, checked against the
//! final job and PostgreSQL.

use std::time::Duration;

use anyhow::Context;
use chatq_tests::sse::{Event, SseClient, apply, kinds, text_of};
use chatq_tests::{Api, EnvOptions, TestEnv, eventually, spawn_api};
use futures_util::{StreamExt, stream};
use serde_json::{Value, json};

/// Generous bound for anything that waits on a job (the machine is noisy).
const DEADLINE: Duration = Duration::from_secs(120);

/// Submits a one-shot chat through `api`, returning the job id.
async fn submit(api: &Api, key: &str, content: &str) -> anyhow::Result<String> {
    let r = api
        .post("/v1/chat", key, &json!({ "content": content }))
        .await?;
    anyhow::ensure!(
        r.status == 202,
        "submitting answered {}: {}",
        r.status,
        r.body
    );
    Ok(r.str("id"))
}

/// The reply content of a succeeded job object.
fn content_of(job: &Value) -> String {
    job["result"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// The assistant message stored for `job_id`, if any.
async fn stored_reply(env: &TestEnv, job_id: &str) -> anyhow::Result<Option<String>> {
    Ok(sqlx::query_scalar(
        "select content from messages where role = 'assistant' and job_id = $1::uuid",
    )
    .bind(job_id)
    .fetch_optional(&env.db)
    .await?)
}

/// Checks the shape every subscription has: each event carries an id and
/// a known name, the first is `status` and `done` comes last, once.
fn assert_well_formed(events: &[Event], job_id: &str) {
    let names = kinds(events);
    assert!(
        events.iter().all(|e| e.id.is_some()),
        "every event has an id: {events:?}"
    );
    assert!(
        names
            .iter()
            .all(|n| matches!(*n, "status" | "delta" | "reset" | "done")),
        "only known events: {names:?}"
    );
    assert_eq!(
        names.first(),
        Some(&"status"),
        "status comes first: {names:?}"
    );
    assert_eq!(names.last(), Some(&"done"), "done comes last: {names:?}");
    assert_eq!(names.iter().filter(|n| **n == "done").count(), 1);
    for e in events
        .iter()
        .filter(|e| e.event != "delta" && e.event != "reset")
    {
        assert_eq!(e.data["id"], job_id, "{} carries the job: {e:?}", e.event);
    }
}

/// The job as the `done` event of `events` carries it.
fn done_job(events: &[Event]) -> Value {
    events
        .last()
        .filter(|e| e.event == "done")
        .map(|e| e.data.clone())
        .unwrap_or(Value::Null)
}

fn delta_count(events: &[Event]) -> usize {
    events.iter().filter(|e| e.event == "delta").count()
}

#[tokio::test]
async fn streamed_deltas_concatenate_to_the_final_content_byte_for_byte() -> anyhow::Result<()> {
    // Arrange
    let (env, key) = TestEnv::start_with_key(EnvOptions::default()).await?;
    let sse = SseClient::new();

    // Act: subscribe right after submitting, read to the end.
    let job_id = submit(
        &env.api,
        &key,
        "stream to me [mock:words=40][mock:chunk_delay_ms=20]",
    )
    .await?;
    let mut sub = sse.subscribe(&env.api.url, &key, &job_id, None).await?;
    let events = sub.read_until_done(DEADLINE).await?;

    // Assert: the stream ...
    assert_well_formed(&events, &job_id);
    let done = done_job(&events);
    assert_eq!(done["status"], "succeeded", "{done}");
    let content = content_of(&done);
    let streamed = text_of(&events);
    assert_eq!(streamed.as_bytes(), content.as_bytes(), "byte for byte");
    assert_eq!(content.split_whitespace().count(), 40, "{content}");
    assert!(
        ["héllo", "世界", "🌍"].iter().any(|w| content.contains(w)),
        "multi-byte words streamed: {content}"
    );
    assert!(
        delta_count(&events) > 1,
        "a subscriber present from the start sees the text arrive in pieces: {:?}",
        kinds(&events)
    );
    assert!(!kinds(&events).contains(&"reset"), "no retry happened");
    // ... agrees with the job and with PostgreSQL.
    let job = env.api.wait_terminal(&key, &job_id, DEADLINE).await?;
    assert_eq!(content_of(&job), content);
    assert_eq!(stored_reply(&env, &job_id).await?, Some(content));
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn a_subscriber_resumes_on_another_replica_without_gap_or_duplicate() -> anyhow::Result<()> {
    // Arrange: two api replicas; the job is submitted through B.
    let (env, key) = TestEnv::start_with_key(EnvOptions::default()).await?;
    let replica_b = spawn_api(&env, &[]).await?;
    let sse = SseClient::new();
    let job_id = submit(
        &replica_b.api,
        &key,
        "resume me [mock:words=200][mock:chunk_delay_ms=20]",
    )
    .await?;

    // Act: read some text on A, disconnect, resume on B with Last-Event-ID.
    let mut on_a = sse.subscribe(&env.api.url, &key, &job_id, None).await?;
    let before = on_a
        .read_while(DEADLINE, |events| delta_count(events) < 5)
        .await?;
    let last_id = on_a
        .last_event_id()
        .context("events before the cut carry ids")?
        .to_owned();
    drop(on_a);
    let job_now = replica_b
        .api
        .get(&format!("/v1/jobs/{job_id}"), &key)
        .await?;
    assert_eq!(
        job_now.body["status"], "running",
        "the resume happens while the job streams: {}",
        job_now.body
    );
    let mut on_b = sse
        .subscribe(&replica_b.api.url, &key, &job_id, Some(&last_id))
        .await?;
    let after = on_b.read_until_done(DEADLINE).await?;

    // Assert
    let done = done_job(&after);
    assert_eq!(done["status"], "succeeded", "{done}");
    let content = content_of(&done);
    let text_before = text_of(&before);
    assert!(!text_before.is_empty(), "some text arrived before the cut");
    let mut joined = text_before;
    apply(&mut joined, &after);
    assert_eq!(joined, content, "text before the cut + resumed text");
    assert!(after.iter().all(|e| e.id.is_some()), "{after:?}");
    assert!(
        !kinds(&after).contains(&"reset"),
        "no retry, so no reset: the missing text only: {:?}",
        kinds(&after)
    );
    assert_eq!(content.split_whitespace().count(), 200);
    assert_eq!(stored_reply(&env, &job_id).await?, Some(content));
    // Stop the replica before its database is dropped.
    drop(replica_b);
    env.cleanup().await;
    Ok(())
}

/// Resumes from `id` on `api_url` and returns the text `text_before` grows
/// to (honouring resets), with the resumed events.
async fn resume_text(
    sse: &SseClient,
    api_url: &str,
    key: &str,
    job_id: &str,
    id: &str,
    text_before: String,
) -> anyhow::Result<(String, Vec<Event>)> {
    let mut sub = sse.subscribe(api_url, key, job_id, Some(id)).await?;
    let events = sub
        .read_until_done(DEADLINE)
        .await
        .with_context(|| format!("resuming from {id} on {api_url}"))?;
    let mut text = text_before;
    apply(&mut text, &events);
    Ok((text, events))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_from_any_event_id_yields_exactly_the_missing_text() -> anyhow::Result<()> {
    // Arrange
    let (env, key) = TestEnv::start_with_key(EnvOptions::default()).await?;
    let replica_b = spawn_api(&env, &[]).await?;
    let sse = SseClient::new();
    // 60 ms between words: slower than the worker's coalescing of pieces
    // (at most one publish per 40 ms), so nearly every word is an event of
    // its own and there are well over 200 cut points.
    let job_id = submit(
        &env.api,
        &key,
        "a long one [mock:words=300][mock:chunk_delay_ms=60]",
    )
    .await?;

    // Act 1: one full subscription on A; at a few points while the job
    // still streams, resume on B from the id just received.
    let mut full = sse.subscribe(&env.api.url, &key, &job_id, None).await?;
    let live_cuts = [3_usize, 20, 60, 120, 200];
    let mut events: Vec<Event> = Vec::new();
    let mut live = Vec::new();
    let end = tokio::time::Instant::now() + DEADLINE;
    while events.last().is_none_or(|e| e.event != "done") {
        let left = end.saturating_duration_since(tokio::time::Instant::now());
        let event = full
            .next_within(left)
            .await?
            .context("the stream ended before done")?;
        events.push(event);
        let last = events.last().filter(|e| e.event != "done");
        if let Some(last) = last
            && live_cuts.contains(&events.len())
        {
            let (sse, url, key, job_id) = (
                sse.clone(),
                replica_b.api.url.clone(),
                key.clone(),
                job_id.clone(),
            );
            let id = last.id.clone().context("every event has an id")?;
            let before = text_of(&events);
            live.push(tokio::spawn(async move {
                resume_text(&sse, &url, &key, &job_id, &id, before).await
            }));
        }
    }
    assert_well_formed(&events, &job_id);
    let content = content_of(&done_job(&events));
    assert_eq!(text_of(&events), content, "the full subscription is exact");
    assert_eq!(content.split_whitespace().count(), 300);

    // Act 2: after the job finished, resume from every event before `done`,
    // alternating replicas.
    let cuts: Vec<(usize, String)> = events[..events.len() - 1]
        .iter()
        .enumerate()
        .map(|(i, e)| (i, e.id.clone().unwrap_or_default()))
        .collect();
    assert!(
        cuts.len() >= 200,
        "at least 200 cut points (one per event; did deltas get coalesced more?): got {}",
        cuts.len()
    );
    let urls = [env.api.url.clone(), replica_b.api.url.clone()];
    let results: Vec<_> = stream::iter(cuts.iter().cloned())
        .map(|(i, id)| {
            let (sse, url, key, job_id) = (&sse, &urls[i % 2], &key, &job_id);
            let before = text_of(&events[..=i]);
            async move { (i, resume_text(sse, url, key, job_id, &id, before).await) }
        })
        .buffer_unordered(16)
        .collect()
        .await;

    // Assert: every resume yields exactly the missing text.
    let mut wrong = Vec::new();
    for (i, result) in results {
        let (text, resumed) = result?;
        // No attempt was retried, so a resume has no reason to start the
        // text over: it must send exactly the missing text.
        if text != content || kinds(&resumed).contains(&"reset") {
            wrong.push(format!("cut after event {i}: {:?}", kinds(&resumed)));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} resumes were not exact: {wrong:?}",
        wrong.len(),
        cuts.len()
    );
    assert!(!live.is_empty(), "resumes happened while streaming");
    for task in live {
        let (text, resumed) = task.await??;
        assert_eq!(text, content, "a live resume: {:?}", kinds(&resumed));
        assert!(!kinds(&resumed).contains(&"reset"), "{:?}", kinds(&resumed));
    }
    // Resuming from `done` itself adds no text: the stream ends at once
    // (or, as EventSource's stop signal, 204).
    let done_id = events.last().and_then(|e| e.id.clone()).unwrap_or_default();
    let resp = sse
        .request(&env.api.url, &key, &job_id, Some(&done_id))
        .await?;
    if resp.status() != 204 {
        let mut sub = chatq_tests::sse::Subscription::from_response(resp, Some(&done_id))?;
        let after_done = sub.read_while(DEADLINE, |_| true).await?;
        assert_eq!(delta_count(&after_done), 0, "{:?}", kinds(&after_done));
    }
    assert_eq!(stored_reply(&env, &job_id).await?, Some(content));
    // Stop the replica before its database is dropped.
    drop(replica_b);
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn a_retry_after_partial_output_resets_the_text_and_ends_exact() -> anyhow::Result<()> {
    // Arrange: the first attempt streams 5 words then fails mid-stream.
    let (env, key) = TestEnv::start_with_key(EnvOptions::default()).await?;
    let sse = SseClient::new();
    let prompt = "retry me [mock:words=30][mock:chunk_delay_ms=100][mock:cut_after=5]";

    // Act
    let job_id = submit(&env.api, &key, prompt).await?;
    let mut sub = sse.subscribe(&env.api.url, &key, &job_id, None).await?;
    let events = sub.read_until_done(DEADLINE).await?;

    // Assert: the subscriber saw the reset, its text after it is exact.
    assert_well_formed(&events, &job_id);
    let done = done_job(&events);
    assert_eq!(done["status"], "succeeded", "{done}");
    let content = content_of(&done);
    let first_reset = events
        .iter()
        .position(|e| e.event == "reset")
        .with_context(|| format!("a reset event: {:?}", kinds(&events)))?;
    assert!(
        events[first_reset].data["attempt"].as_i64().is_some(),
        "reset names the attempt: {:?}",
        events[first_reset]
    );
    assert_eq!(text_of(&events), content, "text after the last reset");
    assert_eq!(content.split_whitespace().count(), 30);
    // The job records the retry and what the failed attempt streamed.
    assert_eq!(done["attempts"], 2, "{done}");
    let partial = done["attempt_errors"][0]["partial_content"]
        .as_str()
        .with_context(|| format!("partial_content of attempt 1: {done}"))?;
    assert!(!partial.is_empty());
    assert!(
        partial.split_whitespace().count() <= 5,
        "at most the 5 words attempt 1 streamed: {partial:?}"
    );
    let before_reset = text_of(&events[..first_reset]);
    assert!(
        partial.starts_with(&before_reset),
        "the text seen before the reset ({before_reset:?}) is what attempt 1 streamed ({partial:?})"
    );
    // The mock's failed call streams other words than its retry, so only
    // honouring the reset gives the exact text.
    assert!(
        !content.starts_with(partial),
        "attempt 1's words differ from the final text: {partial:?}"
    );
    // PostgreSQL agrees, and the mock was called twice.
    let attempts: i32 = sqlx::query_scalar("select attempts from jobs where id = $1::uuid")
        .bind(&job_id)
        .fetch_one(&env.db)
        .await?;
    assert_eq!(attempts, 2);
    assert_eq!(stored_reply(&env, &job_id).await?, Some(content));
    assert_eq!(env.mock_stats().await?["by_prompt"][prompt], 2);
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_across_a_retry_from_any_event_id_honours_the_reset() -> anyhow::Result<()> {
    // Arrange: attempt 1 streams 10 words then fails; attempt 2 streams
    // other words.
    let (env, key) = TestEnv::start_with_key(EnvOptions::default()).await?;
    let replica_b = spawn_api(&env, &[]).await?;
    let sse = SseClient::new();
    let job_id = submit(
        &env.api,
        &key,
        "retry and resume [mock:words=40][mock:chunk_delay_ms=60][mock:cut_after=10]",
    )
    .await?;
    let events = sse
        .subscribe(&env.api.url, &key, &job_id, None)
        .await?
        .read_until_done(DEADLINE)
        .await?;
    assert_well_formed(&events, &job_id);
    let reset_at = events
        .iter()
        .position(|e| e.event == "reset")
        .with_context(|| format!("a reset event: {:?}", kinds(&events)))?;
    let content = content_of(&done_job(&events));
    assert_eq!(text_of(&events), content);
    assert!(
        delta_count(&events[..reset_at]) > 1,
        "cut points inside attempt 1: {:?}",
        kinds(&events)
    );

    // Act: after the job finished, resume from every event before `done`
    // (before, at and after the reset), alternating replicas.
    let urls = [env.api.url.clone(), replica_b.api.url.clone()];
    let results: Vec<_> = stream::iter(0..events.len() - 1)
        .map(|i| {
            let (sse, url, key, job_id) = (&sse, &urls[i % 2], &key, &job_id);
            let id = events[i].id.clone().unwrap_or_default();
            let before = text_of(&events[..=i]);
            async move { (i, resume_text(sse, url, key, job_id, &id, before).await) }
        })
        .buffer_unordered(8)
        .collect()
        .await;

    // Assert
    let mut wrong = Vec::new();
    for (i, result) in results {
        let (text, resumed) = result?;
        if text != content {
            wrong.push(format!("cut after event {i}: {:?}", kinds(&resumed)));
        }
    }
    assert!(wrong.is_empty(), "resumes not exact: {wrong:?}");
    assert_eq!(done_job(&events)["attempts"], 2);
    assert_eq!(stored_reply(&env, &job_id).await?, Some(content));
    // Stop the replica before its database is dropped.
    drop(replica_b);
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn a_subscriber_after_completion_gets_status_delta_and_done_at_once() -> anyhow::Result<()> {
    // Arrange: a finished job.
    let (env, key) = TestEnv::start_with_key(EnvOptions::default()).await?;
    let job_id = submit(&env.api, &key, "already done [mock:words=25]").await?;
    let job = env.api.wait_terminal(&key, &job_id, DEADLINE).await?;
    assert_eq!(job["status"], "succeeded", "{job}");

    // Act
    let mut sub = SseClient::new()
        .subscribe(&env.api.url, &key, &job_id, None)
        .await?;
    let events = sub.read_until_done(Duration::from_secs(30)).await?;

    // Assert
    assert_well_formed(&events, &job_id);
    assert_eq!(kinds(&events), ["status", "delta", "done"]);
    assert_eq!(events[0].job_status(), Some("succeeded"));
    assert_eq!(events[1].delta(), Some(content_of(&job).as_str()));
    let done = &events[2].data;
    for field in ["id", "status", "attempts", "result", "finished_at"] {
        assert_eq!(done[field], job[field], "{field} of done matches the job");
    }
    assert_eq!(stored_reply(&env, &job_id).await?, Some(content_of(&job)));
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_subscribers_all_receive_the_exact_text() -> anyhow::Result<()> {
    // Arrange
    let (env, key) = TestEnv::start_with_key(EnvOptions::default()).await?;
    let sse = SseClient::new();
    let n = 1_000;
    let job_id = submit(
        &env.api,
        &key,
        "for everyone [mock:words=50][mock:chunk_delay_ms=20]",
    )
    .await?;

    // Act: all subscribe to the same api process at once.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (sse, url, key, job_id) = (
            sse.clone(),
            env.api.url.clone(),
            key.clone(),
            job_id.clone(),
        );
        tasks.spawn(async move {
            let mut sub = sse.subscribe(&url, &key, &job_id, None).await?;
            sub.read_until_done(DEADLINE).await
        });
    }
    let mut all = Vec::with_capacity(n);
    while let Some(joined) = tasks.join_next().await {
        all.push(joined?);
    }

    // Assert
    let job = env.api.wait_terminal(&key, &job_id, DEADLINE).await?;
    assert_eq!(job["status"], "succeeded", "{job}");
    let content = content_of(&job);
    let mut failures = Vec::new();
    let mut live = 0;
    for (i, result) in all.into_iter().enumerate() {
        match result {
            Ok(events) => {
                if delta_count(&events) > 1 {
                    live += 1;
                }
                if text_of(&events) != content || done_job(&events)["status"] != "succeeded" {
                    failures.push(format!("subscriber {i}: {:?}", kinds(&events)));
                }
            }
            Err(err) => failures.push(format!("subscriber {i}: {err:#}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {n} subscribers did not get the exact text and done ({live} saw it live); first: {:?}",
        failures.len(),
        failures.iter().take(5).collect::<Vec<_>>()
    );
    assert_eq!(content.split_whitespace().count(), 50);
    assert_eq!(stored_reply(&env, &job_id).await?, Some(content));
    assert_eq!(env.mock_stats().await?["total"], 1, "one LLM call for all");
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn cancelling_a_streaming_job_ends_its_stream_and_abandons_the_llm_call() -> anyhow::Result<()>
{
    // Arrange: a job that would stream for 100 s.
    let (env, key) = TestEnv::start_with_key(EnvOptions::default()).await?;
    let job_id = submit(
        &env.api,
        &key,
        "a very long one [mock:words=2000][mock:chunk_delay_ms=50]",
    )
    .await?;
    let mut sub = SseClient::new()
        .subscribe(&env.api.url, &key, &job_id, None)
        .await?;
    let mut events = sub
        .read_while(DEADLINE, |events| delta_count(events) < 3)
        .await?;
    assert_eq!(delta_count(&events), 3, "{:?}", kinds(&events));

    // Act
    let r = env
        .api
        .post(&format!("/v1/jobs/{job_id}/cancel"), &key, &json!({}))
        .await?;

    // Assert: the cancel answer, then the stream ends with `done` cancelled.
    assert_eq!(
        (r.status, r.body["status"].as_str()),
        (200, Some("cancelled")),
        "{}",
        r.body
    );
    events.extend(sub.read_until_done(DEADLINE).await?);
    assert_well_formed(&events, &job_id);
    assert_eq!(done_job(&events)["status"], "cancelled");
    // The worker hung up on the LLM.
    let stats = eventually("the mock to see the call abandoned", DEADLINE, || async {
        let stats = env.mock_stats().await?;
        let abandoned = stats["in_flight"] == 0 && stats["disconnected"].as_u64() >= Some(1);
        Ok(abandoned.then_some(stats))
    })
    .await?;
    assert_eq!(stats["total"], 1, "{stats}");
    // No reply was written, and the job stays cancelled.
    let job = env.api.wait_terminal(&key, &job_id, DEADLINE).await?;
    assert_eq!(job["status"], "cancelled", "{job}");
    assert!(job.get("result").is_none(), "{job}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(stored_reply(&env, &job_id).await?, None);
    let status: String = sqlx::query_scalar("select status from jobs where id = $1::uuid")
        .bind(&job_id)
        .fetch_one(&env.db)
        .await?;
    assert_eq!(status, "cancelled");
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn events_of_another_tenants_job_or_an_unknown_id_answer_404() -> anyhow::Result<()> {
    // Arrange
    let (env, key) = TestEnv::start_with_key(EnvOptions::default()).await?;
    let (_, other_key) = env.create_key("globex").await?;
    let job_id = submit(&env.api, &key, "mine [mock:words=5]").await?;
    env.api.wait_terminal(&key, &job_id, DEADLINE).await?;
    let unknown = uuid::Uuid::now_v7().to_string();

    // Act + Assert: the same 404 for another tenant's job and no job.
    for (what, k, id) in [
        ("another tenant's job", other_key.as_str(), job_id.as_str()),
        ("an unknown id", key.as_str(), unknown.as_str()),
    ] {
        let r = env.api.get(&format!("/v1/jobs/{id}/events"), k).await?;
        assert_eq!(
            (r.status, r.error_code()),
            (404, "not_found"),
            "{what}: {}",
            r.body
        );
        assert!(
            r.header("content-type")
                .is_some_and(|t| t.starts_with("application/json")),
            "{what}: a JSON error"
        );
    }
    let r = env
        .api
        .get(&format!("/v1/jobs/{job_id}/events"), "not-a-key")
        .await?;
    assert_eq!((r.status, r.error_code()), (401, "unauthorized"));
    let r = env.api.get("/v1/jobs/not-a-uuid/events", &key).await?;
    assert_eq!((r.status, r.error_code()), (400, "invalid_request"));
    // The owner gets the stream.
    let mut sub = SseClient::new()
        .subscribe(&env.api.url, &key, &job_id, None)
        .await?;
    assert_eq!(
        done_job(&sub.read_until_done(DEADLINE).await?)["status"],
        "succeeded"
    );
    env.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn closing_the_event_stream_does_not_cancel_the_job() -> anyhow::Result<()> {
    // Arrange
    let (env, key) = TestEnv::start_with_key(EnvOptions::default()).await?;
    let job_id = submit(
        &env.api,
        &key,
        "keep going [mock:words=60][mock:chunk_delay_ms=20]",
    )
    .await?;
    let mut sub = SseClient::new()
        .subscribe(&env.api.url, &key, &job_id, None)
        .await?;
    let events = sub
        .read_while(DEADLINE, |events| delta_count(events) < 2)
        .await?;
    assert_eq!(delta_count(&events), 2, "{:?}", kinds(&events));

    // Act: hang up mid-stream.
    drop(sub);

    // Assert: the job finishes normally; the LLM call was not abandoned.
    let job = env.api.wait_terminal(&key, &job_id, DEADLINE).await?;
    assert_eq!(job["status"], "succeeded", "{job}");
    let content = content_of(&job);
    assert_eq!(content.split_whitespace().count(), 60);
    assert!(content.starts_with(&text_of(&events)));
    assert_eq!(stored_reply(&env, &job_id).await?, Some(content));
    let stats = env.mock_stats().await?;
    assert_eq!(
        (stats["total"].as_u64(), stats["disconnected"].as_u64()),
        (Some(1), Some(0)),
        "{stats}"
    );
    env.cleanup().await;
    Ok(())
}

/// Runs one job whose upstream stream has a quirk and checks it succeeds
/// with exactly the text its subscriber saw; returns (job, events).
async fn run_quirky_job(prompt: &str, words: usize) -> anyhow::Result<(Value, Vec<Event>)> {
    let (env, key) = TestEnv::start_with_key(EnvOptions::default()).await?;
    let job_id = submit(&env.api, &key, prompt).await?;
    let mut sub = SseClient::new()
        .subscribe(&env.api.url, &key, &job_id, None)
        .await?;
    let events = sub.read_until_done(DEADLINE).await?;
    assert_well_formed(&events, &job_id);
    let job = env.api.wait_terminal(&key, &job_id, DEADLINE).await?;
    assert_eq!(job["status"], "succeeded", "{prompt}: {job}");
    let content = content_of(&job);
    assert_eq!(text_of(&events), content, "{prompt}: {:?}", kinds(&events));
    assert_eq!(content_of(&done_job(&events)), content);
    assert_eq!(content.split_whitespace().count(), words, "{content}");
    assert_eq!(stored_reply(&env, &job_id).await?, Some(content));
    env.cleanup().await;
    Ok((job, events))
}

#[tokio::test]
async fn a_stream_without_done_still_ends_succeeded_with_the_exact_text() -> anyhow::Result<()> {
    let (job, events) = run_quirky_job(
        "no done [mock:words=20][mock:chunk_delay_ms=10][mock:no_done]",
        20,
    )
    .await?;
    assert_eq!(job["attempts"], 1, "{job}");
    assert!(!kinds(&events).contains(&"reset"));
    Ok(())
}

#[tokio::test]
async fn a_plain_json_answer_to_a_streamed_call_arrives_as_one_delta() -> anyhow::Result<()> {
    let (job, events) = run_quirky_job("plain [mock:words=30][mock:plain]", 30).await?;
    assert_eq!(job["attempts"], 1, "{job}");
    assert_eq!(delta_count(&events), 1, "{:?}", kinds(&events));
    Ok(())
}

#[tokio::test]
async fn a_connection_dropped_mid_stream_is_retried_to_the_exact_text() -> anyhow::Result<()> {
    let (job, _) = run_quirky_job(
        "dropped [mock:words=20][mock:chunk_delay_ms=20][mock:drop_after=3]",
        20,
    )
    .await?;
    assert_eq!(job["attempts"], 2, "{job}");
    assert!(
        job["attempt_errors"][0]["code"].is_string(),
        "the dropped attempt is recorded: {job}"
    );
    Ok(())
}
