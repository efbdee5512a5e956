//! Streamed bodies: server-sent events for `stream: true` and the oversize fault.

use std::{convert::Infallible, io, time::Duration};

use axum::{
    body::Body,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use futures_util::{StreamExt, stream};
use serde_json::{Value, json};

use crate::{
    faults::StreamEnding,
    limits::Charge,
    reply::{Reply, completion_id, split_pieces, unix_now},
    stats::{InFlightGuard, StreamGuard},
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

/// One step of a streamed reply.
enum Step {
    /// Send these bytes; sleep the chunk delay first if the flag is set.
    Send(Bytes, bool),
    /// Fail the body so the connection is aborted mid-stream.
    Abort,
}

/// How a streamed reply is paced and ended.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StreamPlan {
    /// Whether a final usage chunk was requested.
    pub(crate) include_usage: bool,
    /// Delay before each content chunk.
    pub(crate) chunk_delay: Duration,
    /// How the stream ends.
    pub(crate) ending: StreamEnding,
}

/// Pause before a planned abort, so the chunks sent before it are flushed.
const ABORT_FLUSH_PAUSE: Duration = Duration::from_millis(50);

/// The error event of a stream that fails mid-way, as OpenAI sends it.
const MID_STREAM_ERROR: &[u8] =
    b"data: {\"error\":{\"message\":\"mock: failed mid-stream\",\"type\":\"server_error\"}}\n\n";

/// Builds the steps of a streamed reply.
fn steps(model: &str, reply: &Reply, plan: &StreamPlan) -> Vec<Step> {
    let id = completion_id();
    let created = unix_now();
    let pieces = split_pieces(&reply.content);
    let mut out = Vec::with_capacity(pieces.len() + 4);
    let role = json!({"role": "assistant", "content": ""});
    out.push(Step::Send(
        event(&chunk(&id, created, model, role, None)),
        false,
    ));
    let content_chunks = match plan.ending {
        StreamEnding::ErrorAfter(n) | StreamEnding::DropAfter(n) => n.min(pieces.len()),
        StreamEnding::Complete { .. } => pieces.len(),
    };
    for piece in &pieces[..content_chunks] {
        let delta = json!({ "content": piece });
        out.push(Step::Send(
            event(&chunk(&id, created, model, delta, None)),
            true,
        ));
    }
    let done = match plan.ending {
        StreamEnding::ErrorAfter(_) => {
            out.push(Step::Send(Bytes::from_static(MID_STREAM_ERROR), false));
            return out;
        }
        StreamEnding::DropAfter(_) => {
            out.push(Step::Abort);
            return out;
        }
        StreamEnding::Complete { done } => done,
    };
    let finish = chunk(&id, created, model, json!({}), Some(reply.finish_reason));
    out.push(Step::Send(event(&finish), false));
    if plan.include_usage {
        let usage = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [],
            "usage": reply.usage(),
        });
        out.push(Step::Send(event(&usage), false));
    }
    if done {
        out.push(Step::Send(Bytes::from_static(b"data: [DONE]\n\n"), false));
    }
    out
}

/// 200 `text/event-stream` with the reply split into one chunk per word,
/// sleeping the plan's chunk delay before each content chunk and ending as
/// the plan says. A body dropped before its last step (the client went
/// away) is counted as disconnected. The call's token `charge` is settled
/// when the body ends or is dropped.
pub(crate) fn sse_response(
    model: &str,
    reply: &Reply,
    plan: StreamPlan,
    in_flight: InFlightGuard,
    charge: Charge,
) -> Response {
    let delay = plan.chunk_delay;
    let steps = steps(model, reply, &plan).into_iter();
    let guard = StreamGuard::new(in_flight);
    let state = (steps, guard, charge);
    let body = stream::unfold(state, move |(mut steps, mut guard, charge)| async move {
        let step = steps.next()?;
        let item = match step {
            Step::Send(bytes, sleep_before) => {
                if sleep_before && !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                Ok(bytes)
            }
            // Planned: the abort is the mock's doing, not a disconnect.
            Step::Abort => {
                // hyper writes buffered chunks out only when the body is
                // pending: pause so the chunks before the abort reach the
                // client, else it sees no response at all.
                tokio::time::sleep(ABORT_FLUSH_PAUSE).await;
                Err(io::Error::other("mock: connection dropped mid-stream"))
            }
        };
        if steps.as_slice().is_empty() {
            guard.finish();
        }
        Some((item, (steps, guard, charge)))
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
