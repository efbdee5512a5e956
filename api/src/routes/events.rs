//! `GET /v1/jobs/{id}/events`: a job's state changes and streamed text as
//! server-sent events, resumable with `Last-Event-ID` on any api replica
//! (how: [`crate::follow`]).

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::stream;
use serde::Serialize;
use utoipa::ToSchema;

use chatq_common::db::jobs;

use crate::AppState;
use crate::auth::Tenant;
use crate::error::{ApiError, ApiResult};
use crate::extract::IdPath;
use crate::follow::{self, Position, StreamItem};
use crate::views::JobView;

/// Keep-alive comment interval, so proxies do not cut an idle stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The data of a `delta` event.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeltaEventData {
    /// The next tokens of the answer.
    pub content: String,
}

/// The data of a `reset` event.
#[derive(Debug, Serialize, ToSchema)]
pub struct ResetEventData {
    /// The attempt whose text the following deltas start from its beginning.
    pub attempt: i32,
}

/// `GET /v1/jobs/{id}/events` (header `Last-Event-ID` to resume).
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/events",
    operation_id = "followJob",
    tag = "jobs",
    summary = "Follow a job (server-sent events)",
    description = "A `text/event-stream` of the job's changes; every event has an `id`. \
`event: status`, `data:` the job object, on every state change; \
`event: delta`, `data:` a `DeltaEventData`, while the model streams; \
`event: reset`, `data:` a `ResetEventData`, when an attempt that had already streamed text is retried: the deltas that follow start the new attempt's text from its beginning; \
`event: done`, `data:` the final job object, then the stream closes. \
A new subscriber first gets a `status` event with the job as it is now and, if the job already produced text, one `delta` with all the text so far. \
Reconnecting with `Last-Event-ID` resumes with no gap and no duplicate text, on any replica. Closing the stream never cancels the job.",
    params(
        ("id" = Uuid, Path, description = "The job's id (a completion id `chatcmpl-<job id>` works too)."),
        ("Last-Event-ID" = Option<String>, Header, description = "The `id` of the last event received, to resume after it."),
    ),
    responses(
        (status = 200, description = "The event stream.", content_type = "text/event-stream", body = crate::openapi::JobEvent),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 404, response = crate::openapi::NotFound),
        (status = 503, response = crate::openapi::Unavailable),
    ),
    security(("api_key" = [])),
)]
pub async fn events(
    State(state): State<AppState>,
    tenant: Tenant,
    IdPath(id): IdPath,
    headers: HeaderMap,
) -> ApiResult<impl IntoResponse> {
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(Position::parse);
    // Subscribe before the first read, so nothing between them is missed.
    let sub = state.hub.subscribe_with_text(id).await;
    let job = jobs::get(&state.db, tenant.id, id)
        .await?
        .ok_or(ApiError::NotFound("no such job"))?;
    let views = state.clone();
    let items = follow::start(state, tenant, sub, job, resume.unwrap_or_default());
    let events = stream::unfold((items, views), |(mut items, views)| async move {
        let item = items.recv().await?;
        let event = event(&views, item).await;
        Some((Ok::<_, Infallible>(event), (items, views)))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}

/// The event of a stream item; a queued job's `status` carries its place
/// in the queue, as everywhere a job is returned.
async fn event(state: &AppState, item: StreamItem) -> Event {
    let (name, data, at) = match item {
        StreamItem::Status(job, at) => ("status", to_json(&state.job_view(*job).await), at),
        StreamItem::Delta(content, at) => ("delta", to_json(&DeltaEventData { content }), at),
        StreamItem::Reset(attempt, at) => ("reset", to_json(&ResetEventData { attempt }), at),
        StreamItem::Done(job, at) => ("done", to_json(&JobView::from(*job)), at),
    };
    Event::default().event(name).id(at.id()).data(data)
}

/// The JSON of an event's data (these types always serialize).
fn to_json(value: &impl Serialize) -> String {
    serde_json::to_string(value).unwrap_or_default()
}
