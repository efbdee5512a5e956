//! Router-level tests of the mock LLM (no network).

use std::time::{Duration, Instant};

use axum::{
    Router,
    body::{Body, to_bytes},
    http::{Method, Request, StatusCode, header},
};
use chatq_mock_llm::{MockConfig, MockState, router};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tower::ServiceExt;

fn app() -> (MockState, Router) {
    let state = MockState::new(MockConfig::default());
    (state.clone(), router(state))
}

async fn call(
    app: &Router,
    method: Method,
    uri: &str,
    body: Option<Value>,
) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let mut builder = Request::builder().method(method).uri(uri);
    let body = match body {
        Some(v) => {
            builder = builder.header(header::CONTENT_TYPE, "application/json");
            Body::from(v.to_string())
        }
        None => Body::empty(),
    };
    let resp = app
        .clone()
        .oneshot(builder.body(body).expect("request"))
        .await
        .expect("infallible");
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = to_bytes(resp.into_body(), 64 * 1024 * 1024)
        .await
        .expect("body");
    (status, headers, bytes.to_vec())
}

async fn chat(app: &Router, body: Value) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    call(app, Method::POST, "/v1/chat/completions", Some(body)).await
}

fn json_of(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).expect("json body")
}

fn request(prompt: &str) -> Value {
    json!({
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": prompt},
        ],
    })
}

#[tokio::test]
async fn non_streaming_reply_is_deterministic_with_usage() {
    let (_, app) = app();
    let (status, _, a) = chat(&app, request("hello there")).await;
    assert_eq!(status, StatusCode::OK);
    let (_, _, b) = chat(&app, request("hello there")).await;
    let (a, b) = (json_of(&a), json_of(&b));
    let content = a["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    assert_eq!(content, b["choices"][0]["message"]["content"]);
    assert!(content.starts_with("mock reply "), "{content}");
    assert!(
        content.ends_with(" to \"hello there\" after 2 messages"),
        "{content}"
    );
    assert_eq!(a["object"], "chat.completion");
    assert_eq!(a["model"], "gpt-4o-mini");
    assert_eq!(a["choices"][0]["finish_reason"], "stop");
    assert!(a["id"].as_str().expect("id").starts_with("chatcmpl-"));
    // "be brief" + "hello there" = 19 chars -> 5 tokens; reply has 9 words.
    assert_eq!(a["usage"]["prompt_tokens"], 5);
    assert_eq!(a["usage"]["completion_tokens"], 9);
    assert_eq!(a["usage"]["total_tokens"], 14);
    let (_, _, c) = chat(&app, request("something else")).await;
    assert_ne!(json_of(&c)["choices"][0]["message"]["content"], content);
}

#[tokio::test]
async fn streaming_deltas_match_non_streaming_content() {
    let (_, app) = app();
    let (_, _, plain) = chat(&app, request("stream  me\nplease")).await;
    let plain = json_of(&plain);
    let mut req = request("stream  me\nplease");
    req["stream"] = json!(true);
    req["stream_options"] = json!({"include_usage": true});
    let (status, headers, body) = chat(&app, req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "text/event-stream");
    let text = String::from_utf8(body).expect("utf8");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let events: Vec<&str> = text
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").expect("data prefix"))
        .collect();
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| json_of(e.as_bytes()))
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, plain["choices"][0]["message"]["content"]);
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    assert_eq!(finish["choices"][0]["delta"], json!({}));
    let usage = &chunks[chunks.len() - 1];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"], plain["usage"]);
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
}

#[tokio::test]
async fn status_429_directive_sets_retry_after() {
    let (state, app) = app();
    state
        .set_config(MockConfig {
            retry_after_secs: 7,
            ..MockConfig::default()
        })
        .expect("valid config");
    let (status, headers, body) = chat(&app, request("please [mock:status=429]")).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers[header::RETRY_AFTER], "7");
    let body = json_of(&body);
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
}

#[tokio::test]
async fn fail_first_fails_twice_then_succeeds() {
    let (_, app) = app();
    let prompt = "flaky [mock:fail_first=2]";
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(chat(&app, request(prompt)).await.0);
    }
    assert_eq!(
        statuses,
        [
            StatusCode::INTERNAL_SERVER_ERROR,
            StatusCode::INTERNAL_SERVER_ERROR,
            StatusCode::OK,
            StatusCode::OK
        ]
    );
}

#[tokio::test]
async fn stats_count_calls_per_prompt_and_reset() {
    let (_, app) = app();
    chat(&app, request("a")).await;
    chat(&app, request("a")).await;
    chat(&app, request("b [mock:status=500]")).await;
    let (status, _, _) = call(&app, Method::POST, "/v1/chat/completions", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let stats = json_of(&call(&app, Method::GET, "/_mock/stats", None).await.2);
    assert_eq!(stats["total"], 4);
    assert_eq!(stats["in_flight"], 0);
    assert_eq!(
        stats["by_prompt"],
        json!({"a": 2, "b [mock:status=500]": 1})
    );
    let requests = json_of(&call(&app, Method::GET, "/_mock/requests", None).await.2);
    assert_eq!(requests["data"].as_array().expect("data").len(), 3);
    assert_eq!(requests["data"][0], request("a"));

    let (status, _, _) = call(&app, Method::POST, "/_mock/reset", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let stats = json_of(&call(&app, Method::GET, "/_mock/stats", None).await.2);
    assert_eq!(
        stats,
        json!({"total": 0, "in_flight": 0, "disconnected": 0, "by_prompt": {}})
    );
}

#[tokio::test]
async fn config_patch_changes_latency_and_rates() {
    let (_, app) = app();
    let (status, _, body) = call(
        &app,
        Method::POST,
        "/_mock/config",
        Some(json!({"latency_ms": 150})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let cfg = json_of(&body);
    assert_eq!(cfg["latency_ms"], 150);
    assert_eq!(cfg["retry_after_secs"], 1);
    let start = Instant::now();
    assert_eq!(chat(&app, request("slow")).await.0, StatusCode::OK);
    assert!(start.elapsed() >= Duration::from_millis(150));

    let (_, _, body) = call(
        &app,
        Method::POST,
        "/_mock/config",
        Some(json!({"rate_500": 1.0, "latency_ms": 0})),
    )
    .await;
    let cfg = json_of(&body);
    assert_eq!(cfg["rate_500"], 1.0);
    let (status, _, body) = chat(&app, request("doomed")).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(json_of(&body)["error"]["type"], "server_error");

    let (status, _, _) = call(
        &app,
        Method::POST,
        "/_mock/config",
        Some(json!({"rate_429": 2.0})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let cfg = json_of(&call(&app, Method::GET, "/_mock/config", None).await.2);
    assert_eq!(cfg["rate_429"], 0.0);
    assert_eq!(cfg["rate_500"], 1.0);
}

#[tokio::test]
async fn max_tokens_truncates_with_length() {
    let (_, app) = app();
    let mut req = request("truncate me");
    req["max_tokens"] = json!(3);
    let (_, _, body) = chat(&app, req.clone()).await;
    let body = json_of(&body);
    let content = body["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    assert_eq!(content.split_whitespace().count(), 3);
    assert!(content.starts_with("mock reply ") && !content.ends_with(' '));
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["completion_tokens"], 3);

    req["stream"] = json!(true);
    let (_, _, stream) = chat(&app, req).await;
    let text = String::from_utf8(stream).expect("utf8");
    assert!(text.contains(r#""finish_reason":"length""#), "{text}");
}

#[tokio::test]
async fn fault_directives_and_misc_routes() {
    let (_, app) = app();
    let (status, headers, body) = chat(&app, request("[mock:malformed]")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "application/json");
    assert!(serde_json::from_slice::<Value>(&body).is_err());

    let (status, headers, _) = chat(&app, request("[mock:redirect]")).await;
    assert_eq!(status, StatusCode::TEMPORARY_REDIRECT);
    assert_eq!(
        headers[header::LOCATION],
        "http://127.0.0.2:9/v1/chat/completions"
    );

    let (status, _, body) = chat(&app, request("[mock:oversize]")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.len() >= 50 * 1024 * 1024);

    let (status, _, body) = chat(&app, request("[mock:status=400]")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        json_of(&body)["error"]["message"],
        "mock: the request was rejected"
    );

    let (status, _, body) = call(
        &app,
        Method::POST,
        "/v1/chat/completions",
        Some(json!({"model": "x"})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(json_of(&body)["error"]["type"], "invalid_request_error");

    let models = json_of(&call(&app, Method::GET, "/v1/models", None).await.2);
    assert_eq!(models["data"][1]["id"], "gpt-4o");
    let (status, _, body) = call(&app, Method::GET, "/healthz", None).await;
    assert_eq!(
        (status, body.as_slice()),
        (StatusCode::OK, b"ok".as_slice())
    );
}

#[tokio::test]
async fn hang_never_answers_until_released() {
    let (state, app) = app();
    let pending = tokio::spawn({
        let app = app.clone();
        async move { chat(&app, request("[mock:hang]")).await.0 }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!pending.is_finished());
    let stats = json_of(&call(&app, Method::GET, "/_mock/stats", None).await.2);
    assert_eq!(stats["in_flight"], 1);
    state.release_hung();
    let status = pending.await.expect("task");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
}

fn stream_request(prompt: &str) -> Value {
    let mut req = request(prompt);
    req["stream"] = json!(true);
    req
}

/// The `data:` payloads of an SSE body, in order (`[DONE]` kept as a string).
fn sse_data(body: &[u8]) -> Vec<Value> {
    let text = std::str::from_utf8(body).expect("utf8 stream");
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let data = e.strip_prefix("data: ").expect("data prefix");
            serde_json::from_str(data).unwrap_or_else(|_| Value::String(data.to_owned()))
        })
        .collect()
}

/// The content pieces of streamed chunks.
fn content_pieces(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .filter(|c| !c.is_empty())
        .map(str::to_owned)
        .collect()
}

async fn stats_of(app: &Router) -> Value {
    json_of(&call(app, Method::GET, "/_mock/stats", None).await.2)
}

#[tokio::test]
async fn words_directive_replies_n_words_including_multi_byte_ones() {
    let (_, app) = app();
    let prompt = "long one [mock:words=40]";
    let (status, _, body) = chat(&app, request(prompt)).await;
    assert_eq!(status, StatusCode::OK);
    let body = json_of(&body);
    let content = body["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_owned();
    assert_eq!(content.split_whitespace().count(), 40, "{content}");
    assert_eq!(body["usage"]["completion_tokens"], 40);
    for word in ["héllo", "世界", "🌍"] {
        assert!(content.contains(word), "{word} missing in {content}");
    }

    let (_, headers, stream) = chat(&app, stream_request(prompt)).await;
    assert_eq!(headers[header::CONTENT_TYPE], "text/event-stream");
    let events = sse_data(&stream);
    let pieces = content_pieces(&events);
    assert_eq!(pieces.len(), 40, "one chunk per word");
    assert_eq!(pieces.concat(), content, "same text streamed and plain");

    // Over the limit: ignored, the default reply.
    let (_, _, body) = chat(&app, request("[mock:words=5001]")).await;
    let content = json_of(&body)["choices"][0]["message"]["content"].clone();
    assert!(
        content
            .as_str()
            .expect("content")
            .starts_with("mock reply "),
        "{content}"
    );
}

#[tokio::test]
async fn chunk_delay_directive_overrides_the_configured_delay() {
    let (state, app) = app();
    let start = Instant::now();
    let (_, _, body) = chat(
        &app,
        stream_request("[mock:words=5] [mock:chunk_delay_ms=60]"),
    )
    .await;
    assert_eq!(content_pieces(&sse_data(&body)).len(), 5);
    assert!(
        start.elapsed() >= Duration::from_millis(300),
        "5 chunks × 60 ms, took {:?}",
        start.elapsed()
    );

    // A configured delay of a minute per chunk is overridden to none.
    state
        .set_config(MockConfig {
            chunk_delay_ms: 60_000,
            ..MockConfig::default()
        })
        .expect("valid config");
    let fast = tokio::time::timeout(
        Duration::from_secs(30),
        chat(
            &app,
            stream_request("[mock:words=5] [mock:chunk_delay_ms=0]"),
        ),
    )
    .await
    .expect("no configured delay applied");
    assert_eq!(content_pieces(&sse_data(&fast.2)).len(), 5);
}

#[tokio::test]
async fn cut_after_fails_the_first_stream_mid_way_then_succeeds() {
    let (_, app) = app();
    let prompt = "[mock:words=20] [mock:cut_after=5]";
    let (status, _, first) = chat(&app, stream_request(prompt)).await;
    assert_eq!(status, StatusCode::OK);
    let events = sse_data(&first);
    assert_eq!(content_pieces(&events).len(), 5);
    assert_eq!(
        events.last(),
        Some(&json!({"error": {"message": "mock: failed mid-stream", "type": "server_error"}}))
    );
    assert!(
        events
            .iter()
            .all(|e| e["choices"][0]["finish_reason"].is_null() && *e != json!("[DONE]")),
        "no finish and no [DONE] after the error: {events:?}"
    );

    let (_, _, second) = chat(&app, stream_request(prompt)).await;
    let events = sse_data(&second);
    let pieces = content_pieces(&events);
    assert_eq!(pieces.len(), 20);
    assert_eq!(events.last(), Some(&json!("[DONE]")));
    // The failed call's text differs from the retry's, as a real model's
    // would: a client must start over, not continue.
    let first_pieces = content_pieces(&sse_data(&first));
    assert_ne!(pieces[..5], first_pieces[..]);
    let (_, _, third) = chat(&app, stream_request(prompt)).await;
    assert_eq!(content_pieces(&sse_data(&third)), pieces, "successes agree");
    assert_eq!(stats_of(&app).await["by_prompt"][prompt], 3);
}

#[tokio::test]
async fn drop_after_aborts_the_first_stream_then_succeeds() {
    let (_, app) = app();
    let prompt = "[mock:words=20] [mock:drop_after=3]";
    let resp = app
        .clone()
        .oneshot(
            Request::builder()
                .method(Method::POST)
                .uri("/v1/chat/completions")
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(stream_request(prompt).to_string()))
                .expect("request"),
        )
        .await
        .expect("infallible");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut frames = resp.into_body().into_data_stream();
    let mut received = Vec::new();
    let mut failed = false;
    while let Some(frame) = frames.next().await {
        match frame {
            Ok(bytes) => received.extend_from_slice(&bytes),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "the body ends with an error, not a clean end");
    let events = sse_data(&received);
    assert_eq!(content_pieces(&events).len(), 3);
    assert!(!events.contains(&json!("[DONE]")));

    let (_, _, second) = chat(&app, stream_request(prompt)).await;
    let events = sse_data(&second);
    assert_eq!(content_pieces(&events).len(), 20);
    assert_ne!(
        content_pieces(&events)[..3],
        content_pieces(&sse_data(&received))[..]
    );
    assert_eq!(events.last(), Some(&json!("[DONE]")));
    // A planned abort is not a client disconnect.
    assert_eq!(stats_of(&app).await["disconnected"], 0);
}

#[tokio::test]
async fn no_done_streams_the_finish_chunk_without_done() {
    let (_, app) = app();
    let mut req = stream_request("[mock:words=8] [mock:no_done]");
    req["stream_options"] = json!({"include_usage": true});
    let (status, _, body) = chat(&app, req).await;
    assert_eq!(status, StatusCode::OK);
    let events = sse_data(&body);
    assert_eq!(content_pieces(&events).len(), 8);
    assert!(!events.contains(&json!("[DONE]")), "{events:?}");
    let finish = &events[events.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    assert_eq!(events[events.len() - 1]["usage"]["completion_tokens"], 8);
    // Every call, not only the first.
    let (_, _, again) = chat(&app, stream_request("[mock:words=8] [mock:no_done]")).await;
    assert!(!sse_data(&again).contains(&json!("[DONE]")));
}

#[tokio::test]
async fn plain_answers_one_json_completion_even_when_asked_to_stream() {
    let (_, app) = app();
    let (status, headers, body) = chat(&app, stream_request("[mock:words=12] [mock:plain]")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "application/json");
    let body = json_of(&body);
    assert_eq!(body["object"], "chat.completion");
    let content = body["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    assert_eq!(content.split_whitespace().count(), 12);
}

#[tokio::test]
async fn a_stream_dropped_by_the_client_counts_as_disconnected() {
    let (_, app) = app();
    // A complete stream is not a disconnect.
    chat(&app, stream_request("[mock:words=3]")).await;
    assert_eq!(stats_of(&app).await["disconnected"], 0);

    let resp = app
        .clone()
        .oneshot(
            Request::builder()
                .method(Method::POST)
                .uri("/v1/chat/completions")
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(
                    stream_request("[mock:words=100] [mock:chunk_delay_ms=50]").to_string(),
                ))
                .expect("request"),
        )
        .await
        .expect("infallible");
    let mut frames = resp.into_body().into_data_stream();
    for _ in 0..3 {
        frames.next().await.expect("a frame").expect("no error");
    }
    assert_eq!(stats_of(&app).await["in_flight"], 1);
    drop(frames);
    let stats = stats_of(&app).await;
    assert_eq!(stats["disconnected"], 1, "{stats}");
    assert_eq!(stats["in_flight"], 0, "{stats}");
    assert_eq!(stats["total"], 2);
}
