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
        json!({
            "total": 0,
            "in_flight": 0,
            "peak_in_flight": 0,
            "rate_limited": 0,
            "disconnected": 0,
            "by_prompt": {},
        })
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

fn header_str<'a>(headers: &'a axum::http::HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .unwrap_or_else(|| panic!("header {name} missing in {headers:?}"))
        .to_str()
        .expect("ascii header")
}

fn with_limits(state: &MockState, config: MockConfig) {
    state.set_config(config).expect("valid config");
}

#[tokio::test]
async fn requests_per_minute_refuses_the_excess_with_openai_429s() {
    let (state, app) = app();
    with_limits(
        &state,
        MockConfig {
            requests_per_minute: Some(3),
            rate_window_ms: 1_000,
            ..MockConfig::default()
        },
    );
    let mut answers = Vec::new();
    for i in 0..5 {
        answers.push(chat(&app, request(&format!("limited {i}"))).await);
    }
    let statuses: Vec<StatusCode> = answers.iter().map(|a| a.0).collect();
    assert_eq!(statuses[..3], [StatusCode::OK; 3]);
    assert_eq!(statuses[3..], [StatusCode::TOO_MANY_REQUESTS; 2]);

    let first = &answers[0].1;
    assert_eq!(header_str(first, "x-ratelimit-limit-requests"), "3");
    assert_eq!(header_str(first, "x-ratelimit-remaining-requests"), "2");
    // One request's worth of refill at 3 per second: at most 334 ms.
    let reset = header_str(first, "x-ratelimit-reset-requests");
    let reset_ms: u64 = reset
        .strip_suffix("ms")
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("reset {reset}"));
    assert!((1..=334).contains(&reset_ms), "{reset}");
    assert!(
        first.get("x-ratelimit-limit-tokens").is_none(),
        "tokens not limited"
    );
    assert_eq!(
        header_str(&answers[2].1, "x-ratelimit-remaining-requests"),
        "0"
    );

    for (_, headers, body) in &answers[3..] {
        let body = json_of(body);
        assert_eq!(body["error"]["type"], "requests");
        assert_eq!(body["error"]["code"], "rate_limit_exceeded");
        assert_eq!(body["error"]["param"], Value::Null);
        let message = body["error"]["message"].as_str().expect("message");
        assert!(
            message.starts_with("Rate limit reached for requests"),
            "{message}"
        );
        assert_eq!(header_str(headers, "retry-after"), "1");
        let wait: u64 = header_str(headers, "retry-after-ms").parse().expect("ms");
        assert!((1..=334).contains(&wait), "{wait}");
        assert_eq!(header_str(headers, "x-ratelimit-limit-requests"), "3");
        assert_eq!(header_str(headers, "x-ratelimit-remaining-requests"), "0");
        assert!(headers.contains_key("x-ratelimit-reset-requests"));
    }
    let stats = stats_of(&app).await;
    assert_eq!(stats["rate_limited"], 2, "{stats}");
    // Refused calls never reached the model.
    assert_eq!(stats["total"], 3, "{stats}");
    assert_eq!(stats["by_prompt"].get("limited 3"), None, "{stats}");
    assert_eq!(stats["in_flight"], 0, "{stats}");

    // After the advised wait the bucket has room again.
    let wait: u64 = header_str(&answers[4].1, "retry-after-ms")
        .parse()
        .expect("ms");
    tokio::time::sleep(Duration::from_millis(wait)).await;
    assert_eq!(
        chat(&app, request("after the wait")).await.0,
        StatusCode::OK
    );

    call(&app, Method::POST, "/_mock/reset", None).await;
    assert_eq!(stats_of(&app).await["rate_limited"], 0);
}

#[tokio::test]
async fn tokens_per_minute_charges_the_budget_and_refunds_the_unused_part() {
    let (state, app) = app();
    with_limits(
        &state,
        MockConfig {
            tokens_per_minute: Some(100),
            // 100 per 10 minutes: no noticeable refill during the test.
            rate_window_ms: 600_000,
            ..MockConfig::default()
        },
    );
    // "be brief" + "t" = 9 chars: 3 prompt tokens; budget 50: charge 53.
    let mut req = request("t");
    req["max_tokens"] = json!(50);
    let (status, headers, body) = chat(&app, req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(header_str(&headers, "x-ratelimit-limit-tokens"), "100");
    assert_eq!(header_str(&headers, "x-ratelimit-remaining-tokens"), "47");
    assert!(headers.get("x-ratelimit-limit-requests").is_none());
    let usage = json_of(&body)["usage"].clone();
    assert_eq!(usage["prompt_tokens"], 3);
    // The default reply has 8 words: 11 used, 42 of the 53 come back.
    assert_eq!(usage["completion_tokens"], 8);

    // 89 left after the refund: a charge of 93 waits, 83 passes.
    let mut big = request("t");
    big["max_tokens"] = json!(90);
    let (status, headers, body) = chat(&app, big).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let body = json_of(&body);
    assert_eq!(body["error"]["type"], "tokens");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(header_str(&headers, "x-ratelimit-remaining-tokens"), "89");
    // 4 tokens at 100 per 600 s: 24 s.
    assert_eq!(header_str(&headers, "retry-after"), "24");
    // (Minus the few microseconds of refill since the first call.)
    let wait: u64 = header_str(&headers, "retry-after-ms").parse().expect("ms");
    assert!((23_000..=24_000).contains(&wait), "{wait}");

    // A streamed call is settled when its body ends: charge 83, used 3 + 8.
    let mut streamed = stream_request("t");
    streamed["max_tokens"] = json!(80);
    let (status, headers, body) = chat(&app, streamed).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(header_str(&headers, "x-ratelimit-remaining-tokens"), "6");
    assert_eq!(content_pieces(&sse_data(&body)).len(), 8);
    let (_, headers, _) = chat(&app, request("t")).await;
    // 89 - 11 (the stream) - 11 (this call, charged its 8-word reply).
    assert_eq!(header_str(&headers, "x-ratelimit-remaining-tokens"), "67");

    // More than the whole bucket can never pass.
    let mut huge = request("t");
    huge["max_completion_tokens"] = json!(1_000);
    let (status, _, body) = chat(&app, huge).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let message = json_of(&body)["error"]["message"].clone();
    assert!(
        message
            .as_str()
            .expect("message")
            .starts_with("Request too large"),
        "{message}"
    );
    let stats = stats_of(&app).await;
    assert_eq!(
        (stats["rate_limited"].clone(), stats["total"].clone()),
        (json!(2), json!(3))
    );
}

#[tokio::test]
async fn max_concurrency_refuses_calls_beyond_it_at_once() {
    let (state, app) = app();
    with_limits(
        &state,
        MockConfig {
            max_concurrency: Some(2),
            latency_ms: 300,
            ..MockConfig::default()
        },
    );
    let start = Instant::now();
    let calls: Vec<_> = (0..5)
        .map(|i| {
            let app = app.clone();
            tokio::spawn(async move {
                let answer = chat(&app, request(&format!("overlap {i}"))).await;
                (answer, start.elapsed())
            })
        })
        .collect();
    let mut ok = 0;
    let mut refused = 0;
    for call in calls {
        let ((status, headers, body), took) = call.await.expect("task");
        assert!(
            headers.get("x-ratelimit-limit-requests").is_none(),
            "no per-minute limits"
        );
        match status {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                refused += 1;
                assert!(
                    took < Duration::from_millis(300),
                    "refused at once, took {took:?}"
                );
                assert_eq!(json_of(&body)["error"]["type"], "requests");
                assert_eq!(header_str(&headers, "retry-after"), "1");
                assert_eq!(header_str(&headers, "retry-after-ms"), "1000");
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!((ok, refused), (2, 3));
    let stats = stats_of(&app).await;
    assert_eq!(stats["peak_in_flight"], 2, "{stats}");
    assert_eq!(stats["rate_limited"], 3, "{stats}");
    assert_eq!(stats["in_flight"], 0, "{stats}");
    assert_eq!(stats["total"], 2, "{stats}");
    // The slots are free again.
    assert_eq!(chat(&app, request("later")).await.0, StatusCode::OK);
}

#[tokio::test]
async fn rate_limits_are_patchable_at_run_time() {
    let (_, app) = app();
    let patch = |body: Value| call(&app, Method::POST, "/_mock/config", Some(body));
    let (status, _, body) =
        patch(json!({"requests_per_minute": 1, "rate_window_ms": 60_000})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json_of(&body)["requests_per_minute"], 1);
    assert_eq!(json_of(&body)["max_concurrency"], Value::Null);
    assert_eq!(chat(&app, request("one")).await.0, StatusCode::OK);
    assert_eq!(
        chat(&app, request("two")).await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    // The reset refills the buckets.
    call(&app, Method::POST, "/_mock/reset", None).await;
    assert_eq!(chat(&app, request("three")).await.0, StatusCode::OK);
    // null removes a limit; a missing field keeps it.
    let (_, _, body) = patch(json!({"latency_ms": 0})).await;
    assert_eq!(json_of(&body)["requests_per_minute"], 1);
    let (_, _, body) = patch(json!({"requests_per_minute": null})).await;
    assert_eq!(json_of(&body)["requests_per_minute"], Value::Null);
    let (status, headers, _) = chat(&app, request("four")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers.get("x-ratelimit-limit-requests").is_none());
    for bad in [
        json!({"max_concurrency": 0}),
        json!({"tokens_per_minute": 0}),
        json!({"rate_window_ms": 0}),
    ] {
        assert_eq!(patch(bad).await.0, StatusCode::BAD_REQUEST);
    }
}
