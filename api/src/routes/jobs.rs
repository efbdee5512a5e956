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
use crate::extract::{IdPath, WaitQuery};
use crate::views::JobView;

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
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}",
    operation_id = "getJob",
    tag = "jobs",
    summary = "Get a job",
    description = "With `wait=N` (0 to 60), a long poll: the answer comes as soon as the job is terminal, or after N seconds with its current state.",
    params(("id" = Uuid, Path, description = "The job's id (a completion id `chatcmpl-<job id>` works too)."), WaitQuery),
    responses(
        (status = 200, description = "The job.", body = JobView),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 404, response = crate::openapi::NotFound),
        (status = 503, response = crate::openapi::Unavailable),
    ),
    security(("api_key" = [])),
)]
pub async fn get(
    State(state): State<AppState>,
    tenant: Tenant,
    IdPath(id): IdPath,
    WaitQuery { wait }: WaitQuery,
) -> ApiResult<impl IntoResponse> {
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
    Ok(Json(state.job_view(job).await))
}

/// `POST /v1/jobs/{id}/cancel`: 200 cancelled if it was queued or running,
/// 409 if it was already terminal.
#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/cancel",
    operation_id = "cancelJob",
    tag = "jobs",
    summary = "Cancel a job",
    description = "A running job's LLM call is abandoned and no assistant message is written. Takes no body.",
    params(("id" = Uuid, Path, description = "The job's id (a completion id `chatcmpl-<job id>` works too).")),
    responses(
        (status = 200, description = "The job, `cancelled`.", body = JobView),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 404, response = crate::openapi::NotFound),
        (status = 409, response = crate::openapi::Conflict),
        (status = 429, response = crate::openapi::RateLimited),
        (status = 503, response = crate::openapi::Unavailable),
    ),
    security(("api_key" = [])),
)]
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
