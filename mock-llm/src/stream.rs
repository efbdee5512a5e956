//! Streamed bodies: server-sent events for `stream: true` and the oversize fault.

use std::{convert::Infallible, time::Duration};

use axum::{
    body::Body,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use futures_util::{StreamExt, stream};
use serde_json::{Value, json};

use crate::{
    reply::{Reply, completion_id, split_pieces, unix_now},
    stats::InFlightGuard,
};

/// Size of the oversize body (50 MiB), not counting its short prefix.
pub(crate) const OVERSIZE_BYTES: usize = 50 * 1024 * 1024;
const FILL_LEN: usize = 64 * 1024;
static FILL: [u8; FILL_LEN] = [b'a'; FILL_LEN];
const OVERSIZE_PREFIX: &[u8] = b"{\"id\":\"chatcmpl-oversize\",\"x\":\"";

/// 200 `application/json` with a 50 MiB body streamed from one static buffer.
pub(crate) fn oversize_response(guard: InFlightGuard) -> Response {
    let chunks = std::iter::once(Bytes::from_static(OVERSIZE_PREFIX)).chain(std::iter::repeat_n(
        Bytes::from_static(&FILL),
        OVERSIZE_BYTES / FILL_LEN,
    ));
    let body = stream::iter(chunks).map(move |chunk| {
        let _in_flight = &guard;
        Ok::<Bytes, Infallible>(chunk)
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(body),
    )
        .into_response()
}

/// One SSE event line.
fn event(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

/// A `chat.completion.chunk` with a single choice.
fn chunk(id: &str, created: u64, model: &str, delta: Value, finish: Option<&str>) -> Value {
    json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    })
}

/// Builds the events of a streamed reply; the flag says whether to sleep before it.
fn events(model: &str, reply: &Reply, include_usage: bool) -> Vec<(Bytes, bool)> {
    let id = completion_id();
    let created = unix_now();
    let pieces = split_pieces(&reply.content);
    let mut out = Vec::with_capacity(pieces.len() + 4);
    let role = json!({"role": "assistant", "content": ""});
    out.push((event(&chunk(&id, created, model, role, None)), false));
    for piece in pieces {
        let delta = json!({ "content": piece });
        out.push((event(&chunk(&id, created, model, delta, None)), true));
    }
    let finish = chunk(&id, created, model, json!({}), Some(reply.finish_reason));
    out.push((event(&finish), false));
    if include_usage {
        let usage = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [],
            "usage": reply.usage(),
        });
        out.push((event(&usage), false));
    }
    out.push((Bytes::from_static(b"data: [DONE]\n\n"), false));
    out
}

/// 200 `text/event-stream` with the reply split into one chunk per word,
/// sleeping `chunk_delay_ms` before each content chunk.
pub(crate) fn sse_response(
    model: &str,
    reply: &Reply,
    include_usage: bool,
    chunk_delay_ms: u64,
    guard: InFlightGuard,
) -> Response {
    let delay = Duration::from_millis(chunk_delay_ms);
    let events = events(model, reply, include_usage).into_iter();
    let body = stream::unfold((events, guard), move |(mut events, guard)| async move {
        let (bytes, sleep_before) = events.next()?;
        if sleep_before && !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Some((Ok::<Bytes, Infallible>(bytes), (events, guard)))
    });
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}
