//! Reading jobs (with long-poll) and cancelling them.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::response::IntoResponse;
use tokio::time::Instant;

use chatq_common::db::jobs;
use chatq_common::domain::Job;

use crate::AppState;
use crate::auth::Tenant;
use crate::error::{ApiError, ApiResult};
use crate::extract::{IdPath, QueryParams};
use crate::views::JobView;

/// Longest long-poll, in seconds.
const MAX_WAIT_SECS: i64 = 60;
/// A waiting long-poll re-reads its job at least this often, in case an
/// announcement was missed.
const WAIT_RECHECK: Duration = Duration::from_secs(5);

async fn load(state: &AppState, tenant: &Tenant, id: uuid::Uuid) -> ApiResult<Job> {
    jobs::get(&state.db, tenant.id, id)
        .await?
        .ok_or(ApiError::NotFound("no such job"))
}

/// `GET /v1/jobs/{id}?wait=N`: the job now, or as soon as it is terminal
/// within N seconds. No database connection is held while waiting.
pub async fn get(
    State(state): State<AppState>,
    tenant: Tenant,
    IdPath(id): IdPath,
    q: QueryParams,
) -> ApiResult<impl IntoResponse> {
    q.only(&["wait"])?;
    let wait = q.int("wait", 0, MAX_WAIT_SECS, 0)?;
    let deadline = Instant::now() + Duration::from_secs(wait.unsigned_abs());
    // Subscribe before the first read so a change in between is not missed.
    let mut changes = (wait > 0).then(|| state.hub.subscribe(id));
    let mut job = load(&state, &tenant, id).await?;
    while let Some(sub) = changes.as_mut() {
        if job.status.is_terminal() || Instant::now() >= deadline {
            break;
        }
        let recheck = (Instant::now() + WAIT_RECHECK).min(deadline);
        tokio::select! {
            () = sub.changed() => {}
            () = tokio::time::sleep_until(recheck) => {}
        }
        job = load(&state, &tenant, id).await?;
    }
    Ok(Json(JobView::from(job)))
}

/// `POST /v1/jobs/{id}/cancel`: 200 cancelled if it was queued or running,
/// 409 if it was already terminal.
pub async fn cancel(
    State(state): State<AppState>,
    tenant: Tenant,
    IdPath(id): IdPath,
) -> ApiResult<impl IntoResponse> {
    crate::limits::check_rate(&state, &tenant).await?;
    match jobs::cancel(&state.db, tenant.id, id).await? {
        Some(job) => Ok(Json(JobView::from(job))),
        None => {
            load(&state, &tenant, id).await?;
            Err(ApiError::Conflict("the job is already finished"))
        }
    }
}
