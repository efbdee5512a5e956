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
use serde_json::json;

use chatq_common::db::jobs;

use crate::AppState;
use crate::auth::Tenant;
use crate::error::{ApiError, ApiResult};
use crate::extract::IdPath;
use crate::follow::{self, Position, StreamItem};
use crate::views::JobView;

/// Keep-alive comment interval, so proxies do not cut an idle stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// `GET /v1/jobs/{id}/events` (header `Last-Event-ID` to resume).
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
    let items = follow::start(state, tenant, sub, job, resume.unwrap_or_default());
    let events = stream::unfold(items, |mut items| async move {
        let item = items.recv().await?;
        Some((Ok::<_, Infallible>(event(item)), items))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}

fn event(item: StreamItem) -> Event {
    let (name, data, at) = match item {
        StreamItem::Status(job, at) => ("status", json!(JobView::from(*job)), at),
        StreamItem::Delta(content, at) => ("delta", json!({ "content": content }), at),
        StreamItem::Reset(attempt, at) => ("reset", json!({ "attempt": attempt }), at),
        StreamItem::Done(job, at) => ("done", json!(JobView::from(*job)), at),
    };
    Event::default()
        .event(name)
        .id(at.id())
        .data(data.to_string())
}
