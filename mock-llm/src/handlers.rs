//! HTTP handlers.

use std::time::Duration;

use axum::{
    Json,
    extract::State,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{
    MockState,
    config::MockConfigPatch,
    faults::{Outcome, StreamEnding, choose, parse_directives, stream_ending},
    limits::Limits,
    reply::{ChatRequest, Reply, completion_body, error_response, invalid_request},
    stream::{StreamPlan, oversize_response, sse_response},
};

/// Where the redirect fault points (nothing listens there).
const REDIRECT_LOCATION: &str = "http://127.0.0.2:9/v1/chat/completions";

/// `POST /v1/chat/completions`.
///
/// A valid request first passes the rate limits (429 at once if refused,
/// not counted in `total`, `by_prompt` or the recorded requests); every
/// answer to it carries the `x-ratelimit-*` headers.
pub(crate) async fn chat_completions(State(state): State<MockState>, body: Bytes) -> Response {
    let stats = state.stats();
    let value: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(err) => {
            stats.record(None, None);
            return invalid_request(format!("invalid JSON body: {err}"));
        }
    };
    let req = match ChatRequest::deserialize(&value) {
        Ok(req) => req,
        Err(err) => {
            stats.record(Some(value), None);
            return invalid_request(format!("invalid chat completion request: {err}"));
        }
    };
    if req.messages.is_empty() {
        stats.record(Some(value), None);
        return invalid_request("messages must contain at least one message");
    }
    let prompt = req.last_user_text();
    let config = state.config();
    let directives = parse_directives(&prompt);
    // Charged at admission: prompt tokens plus the completion budget.
    let estimate = Reply::build(&req, directives.words, false);
    let charge = estimate
        .prompt_tokens
        .saturating_add(req.completion_limit().unwrap_or(estimate.completion_tokens));
    let admission = match state.limiter().admit(stats, &Limits::of(&config), charge) {
        Ok(admission) => admission,
        Err(rejection) => {
            stats.count_rate_limited();
            return rejection.into_response();
        }
    };
    let (guard, mut charge, rate_headers) =
        (admission.in_flight, admission.charge, admission.headers);
    let count = stats.record(Some(value), Some(&prompt));
    let outcome = choose(&directives, count, &config);
    tracing::debug!(?outcome, count, "chat completion");

    let latency = directives.latency_ms.unwrap_or(config.latency_ms);
    if latency > 0 && outcome != Outcome::Hang {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }

    let mut response = match outcome {
        Outcome::Status(status) => status_response(status, config.retry_after_secs),
        Outcome::Hang => {
            state.hang_released().await;
            error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                None,
                "mock: hung request released because the server is shutting down",
            )
        }
        Outcome::Oversize => oversize_response(guard),
        Outcome::Malformed => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            r#"{"id": "chatcmpl-broken", "choices": ["#,
        )
            .into_response(),
        Outcome::Redirect => (
            StatusCode::TEMPORARY_REDIRECT,
            [(header::LOCATION, REDIRECT_LOCATION)],
        )
            .into_response(),
        Outcome::HostileReply => {
            let mut body = completion_body(req.model(), &Reply::build(&req, None, false));
            body["choices"][0]["message"]["content"] = json!("before\u{0}after \u{0}");
            body["usage"] = json!({"prompt_tokens": 99_999_999_999_u64, "completion_tokens": -7});
            Json(body).into_response()
        }
        Outcome::NulError => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            None,
            "mock: broken \u{0} error at http://10.1.2.3:8443/internal",
        ),
        Outcome::RawNulError => (
            StatusCode::BAD_GATEWAY,
            [(header::CONTENT_TYPE, "text/plain")],
            &b"upstream \0\0 failed"[..],
        )
            .into_response(),
        Outcome::HugeError => error_response(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            None,
            "x".repeat(7 * 1024 * 1024),
        ),
        Outcome::Success => {
            if req.is_stream() && !directives.plain {
                let ending = stream_ending(&directives, count);
                let failing = !matches!(ending, StreamEnding::Complete { .. });
                let reply = Reply::build(&req, directives.words, failing);
                let plan = StreamPlan {
                    include_usage: req.include_usage(),
                    chunk_delay: Duration::from_millis(
                        directives.chunk_delay_ms.unwrap_or(config.chunk_delay_ms),
                    ),
                    ending,
                };
                charge.set_used(reply.prompt_tokens.saturating_add(reply.completion_tokens));
                sse_response(req.model(), &reply, plan, guard, charge)
            } else {
                // The same reply the charge was estimated from.
                let reply = estimate;
                charge.set_used(reply.prompt_tokens.saturating_add(reply.completion_tokens));
                Json(completion_body(req.model(), &reply)).into_response()
            }
        }
    };
    response.headers_mut().extend(rate_headers);
    response
}

/// An injected error status with an OpenAI error body.
fn status_response(status: StatusCode, retry_after_secs: u64) -> Response {
    match status {
        StatusCode::TOO_MANY_REQUESTS => {
            let mut resp = error_response(
                status,
                "rate_limit_error",
                Some("rate_limit_exceeded"),
                "mock: rate limit exceeded, retry later",
            );
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            resp
        }
        s if s.is_server_error() => error_response(
            s,
            "server_error",
            None,
            format!("mock: the server had an error ({})", s.as_u16()),
        ),
        s => error_response(
            s,
            "invalid_request_error",
            None,
            "mock: the request was rejected",
        ),
    }
}

/// `GET /v1/models`.
pub(crate) async fn models() -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [
            {"id": "gpt-4o-mini", "object": "model", "created": 0, "owned_by": "chatq-mock"},
            {"id": "gpt-4o", "object": "model", "created": 0, "owned_by": "chatq-mock"},
        ],
    }))
}

/// `GET /_mock/stats`.
pub(crate) async fn stats(State(state): State<MockState>) -> Json<Value> {
    Json(state.stats().snapshot())
}

/// `GET /_mock/requests`.
pub(crate) async fn requests(State(state): State<MockState>) -> Json<Value> {
    Json(state.stats().requests())
}

/// `GET /_mock/config`.
pub(crate) async fn get_config(State(state): State<MockState>) -> Response {
    Json(state.config()).into_response()
}

/// `POST /_mock/config`: merges a partial config and returns the full result.
pub(crate) async fn patch_config(State(state): State<MockState>, body: Bytes) -> Response {
    let patch: MockConfigPatch = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(err) => return invalid_request(format!("invalid config patch: {err}")),
    };
    match state.update_config(|current| patch.apply(current)) {
        Ok(new) => Json(new).into_response(),
        Err(err) => invalid_request(err),
    }
}

/// `POST /_mock/reset`.
pub(crate) async fn reset(State(state): State<MockState>) -> StatusCode {
    state.stats().reset();
    state.limiter().reset();
    StatusCode::NO_CONTENT
}

/// `GET /healthz`.
pub(crate) async fn healthz() -> &'static str {
    "ok"
}
