//! Operator routes, behind the admin token.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use chatq_common::db::{controls, keys};
use chatq_common::domain::new_id;

use crate::AppState;
use crate::auth::Admin;
use crate::error::{ApiError, ApiResult};
use crate::extract::{IdPath, JsonBody, OptionalJsonBody};

/// Longest tenant name.
const MAX_TENANT_CHARS: usize = 200;
/// Highest per-key submission rate.
const MAX_RATE_LIMIT_PER_MINUTE: i64 = 1_000_000;
/// Highest per-key `max_concurrency`.
const MAX_KEY_CONCURRENCY: i64 = 100_000;

/// Body of `POST /admin/v1/api-keys`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    /// The tenant the key belongs to (1 to 200 characters, trimmed); created
    /// on first use.
    #[schema(min_length = 1, max_length = 200)]
    tenant: String,
    /// Write requests (submissions, cancels, creations, deletions) per
    /// minute; default `CHATQ_DEFAULT_RATE_LIMIT_PER_MINUTE` (unset: no limit).
    #[schema(minimum = 1, maximum = 1_000_000)]
    rate_limit_per_minute: Option<i64>,
    /// Jobs of this key running at once; unset: no limit of its own.
    #[schema(minimum = 1, maximum = 100_000)]
    max_concurrency: Option<i64>,
}

/// A new API key: the only answer that shows the key.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedKey {
    /// The key's id (to revoke it).
    pub id: Uuid,
    /// The tenant's name.
    pub tenant: String,
    /// The tenant's id.
    pub tenant_id: Uuid,
    /// The key, shown once: only its hash is stored.
    pub key: String,
    /// The key's own rate limit, if any.
    pub rate_limit_per_minute: Option<i32>,
    /// The key's own concurrency limit, if any.
    pub max_concurrency: Option<i32>,
}

/// `POST /admin/v1/api-keys` → 201 `{id, tenant, key}`; the key is shown
/// only here.
#[utoipa::path(
    post,
    path = "/admin/v1/api-keys",
    operation_id = "createApiKey",
    tag = "admin",
    summary = "Create an API key",
    request_body = CreateKey,
    responses(
        (status = 201, description = "The key, shown only in this answer.", body = CreatedKey),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::AdminUnauthorized),
        (status = 413, response = crate::openapi::PayloadTooLarge),
        (status = 415, response = crate::openapi::UnsupportedMediaType),
        (status = 503, response = crate::openapi::Unavailable),
    ),
    security(("admin_token" = [])),
)]
pub async fn create_key(
    State(state): State<AppState>,
    _admin: Admin,
    JsonBody(body): JsonBody<CreateKey>,
) -> ApiResult<impl IntoResponse> {
    let tenant = body.tenant.trim();
    if tenant.is_empty() || tenant.chars().count() > MAX_TENANT_CHARS {
        return Err(ApiError::invalid(format!(
            "tenant: must be 1 to {MAX_TENANT_CHARS} characters"
        )));
    }
    crate::validate::no_nul("tenant", tenant)?;
    let rate_limit = match body.rate_limit_per_minute {
        None => None,
        Some(n) if (1..=MAX_RATE_LIMIT_PER_MINUTE).contains(&n) => i32::try_from(n).ok(),
        Some(_) => {
            return Err(ApiError::invalid(format!(
                "rate_limit_per_minute: must be an integer from 1 to {MAX_RATE_LIMIT_PER_MINUTE}"
            )));
        }
    };
    let max_concurrency = match body.max_concurrency {
        None => None,
        Some(n) if (1..=MAX_KEY_CONCURRENCY).contains(&n) => i32::try_from(n).ok(),
        Some(_) => {
            return Err(ApiError::invalid(format!(
                "max_concurrency: must be an integer from 1 to {MAX_KEY_CONCURRENCY}"
            )));
        }
    };
    let key = keys::generate_key();
    let id = new_id();
    let limits = keys::KeyLimits {
        rate_limit_per_minute: rate_limit,
        max_concurrency,
    };
    let mut tx = state.db.begin().await?;
    let tenant_id = keys::upsert_tenant(&mut *tx, new_id(), tenant).await?;
    keys::insert_key(&mut *tx, id, tenant_id, &keys::hash_key(&key), limits).await?;
    tx.commit().await?;
    // Audit trail: who got a key, never the key itself.
    tracing::info!(key_id = %id, %tenant_id, tenant, ?rate_limit, ?max_concurrency, "api key created");
    let body = CreatedKey {
        id,
        tenant: tenant.to_owned(),
        tenant_id,
        key,
        rate_limit_per_minute: rate_limit,
        max_concurrency,
    };
    Ok((StatusCode::CREATED, Json(body)))
}

/// `DELETE /admin/v1/api-keys/{id}` → 204; the key stops working at once.
#[utoipa::path(
    delete,
    path = "/admin/v1/api-keys/{id}",
    operation_id = "revokeApiKey",
    tag = "admin",
    summary = "Revoke an API key",
    description = "The key stops working at once, on every replica.",
    params(("id" = Uuid, Path, description = "The key's id.")),
    responses(
        (status = 204, description = "Revoked."),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::AdminUnauthorized),
        (status = 404, response = crate::openapi::NotFound),
        (status = 503, response = crate::openapi::Unavailable),
    ),
    security(("admin_token" = [])),
)]
pub async fn revoke_key(
    State(state): State<AppState>,
    _admin: Admin,
    IdPath(id): IdPath,
) -> ApiResult<impl IntoResponse> {
    if keys::revoke(&state.db, id).await? {
        tracing::info!(key_id = %id, "api key revoked");
        // Other replicas forget it when the revocation's NOTIFY arrives.
        state.keys.clear();
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound("no such api key"))
    }
}

/// The answer of `GET /admin/v1/queues`.
#[derive(Debug, Serialize, ToSchema)]
pub struct QueueStats {
    /// The work queue's name.
    pub queue: String,
    /// Messages ready in the work queue.
    pub depth: u32,
    /// Consumers (worker channels) of the work queue.
    pub consumers: u32,
    /// The dead-letter queue's name.
    pub dead_letter_queue: String,
    /// Messages in the dead-letter queue.
    pub dead_letter_depth: u32,
    /// The work queue's maximum length (`CHATQ_MAX_QUEUE_LENGTH`).
    pub max_length: u32,
    /// Jobs of every tenant by status (every status present, zeros included).
    pub jobs_by_status: BTreeMap<String, i64>,
    /// Age of the oldest queued job in seconds; `null` when none is queued.
    pub oldest_queued_age_secs: Option<f64>,
    /// Whether consumption is paused.
    pub paused: bool,
}

/// `GET /admin/v1/queues`: broker depths and job counts by status.
#[utoipa::path(
    get,
    path = "/admin/v1/queues",
    operation_id = "getQueues",
    tag = "admin",
    summary = "Queue depths and job counts",
    responses(
        (status = 200, description = "Broker depths, job counts by status, the oldest queued job's age.", body = QueueStats),
        (status = 401, response = crate::openapi::AdminUnauthorized),
        (status = 503, response = crate::openapi::Unavailable),
    ),
    security(("admin_token" = [])),
)]
pub async fn queues(State(state): State<AppState>, _admin: Admin) -> ApiResult<impl IntoResponse> {
    let broker = state.publisher.broker();
    let depths = broker.depths().await.map_err(|err| {
        tracing::warn!(error = %err, "cannot read queue depths");
        ApiError::Unavailable("the broker")
    })?;
    let stats = chatq_common::db::jobs::stats(&state.db).await?;
    let paused = controls::is_paused(&state.db).await?;
    let topology = broker.topology();
    Ok(Json(QueueStats {
        queue: topology.work_queue.clone(),
        depth: depths.work_messages,
        consumers: depths.work_consumers,
        dead_letter_queue: topology.dead_queue.clone(),
        dead_letter_depth: depths.dead_messages,
        max_length: topology.max_length,
        jobs_by_status: stats.by_status.into_iter().collect(),
        oldest_queued_age_secs: stats.oldest_queued_age_secs,
        paused,
    }))
}

/// The answer of `POST /admin/v1/queues/pause` and `/resume`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Paused {
    /// Whether consumption is now paused.
    pub paused: bool,
}

/// `POST /admin/v1/queues/pause` → `{"paused": true}`: workers stop taking
/// new jobs (within about a second); jobs they hold finish.
#[utoipa::path(
    post,
    path = "/admin/v1/queues/pause",
    operation_id = "pauseQueues",
    tag = "admin",
    summary = "Pause consumption",
    description = "Once this has answered, no job is claimed until `resume`; in-flight jobs finish. Takes no body.",
    responses(
        (status = 200, description = "Paused.", body = Paused),
        (status = 401, response = crate::openapi::AdminUnauthorized),
        (status = 503, response = crate::openapi::Unavailable),
    ),
    security(("admin_token" = [])),
)]
pub async fn pause(State(state): State<AppState>, _admin: Admin) -> ApiResult<impl IntoResponse> {
    let paused = controls::set_paused(&state.db, true).await?;
    tracing::info!("consumption paused by an operator");
    Ok(Json(Paused { paused }))
}

/// `POST /admin/v1/queues/resume` → `{"paused": false}`: workers take jobs again.
#[utoipa::path(
    post,
    path = "/admin/v1/queues/resume",
    operation_id = "resumeQueues",
    tag = "admin",
    summary = "Resume consumption",
    description = "Workers take jobs again. Takes no body.",
    responses(
        (status = 200, description = "Resumed.", body = Paused),
        (status = 401, response = crate::openapi::AdminUnauthorized),
        (status = 503, response = crate::openapi::Unavailable),
    ),
    security(("admin_token" = [])),
)]
pub async fn resume(State(state): State<AppState>, _admin: Admin) -> ApiResult<impl IntoResponse> {
    let paused = controls::set_paused(&state.db, false).await?;
    tracing::info!("consumption resumed by an operator");
    Ok(Json(Paused { paused }))
}

/// Most dead letters replayed by one call.
const MAX_REPLAY: i64 = 10_000;

/// Body of `POST /admin/v1/dead-letters/replay`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayBody {
    /// Most dead letters to replay (default 100).
    #[schema(minimum = 1, maximum = 10_000)]
    limit: Option<i64>,
}

/// The answer of `POST /admin/v1/dead-letters/replay`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Replayed {
    /// Jobs put back in the queue.
    pub replayed: u64,
}

/// `POST /admin/v1/dead-letters/replay` → `{"replayed": n}`: failed jobs
/// whose messages were dead-lettered go back to `queued` with a fresh
/// attempt budget and are published again. Messages that name no job, or a
/// job that is no longer failed, are discarded; a job whose conversation is
/// busy again stays in the dead-letter queue.
#[utoipa::path(
    post,
    path = "/admin/v1/dead-letters/replay",
    operation_id = "replayDeadLetters",
    tag = "admin",
    summary = "Replay dead letters",
    description = "Failed jobs whose messages were dead-lettered go back to `queued` with a fresh attempt budget and are published again. The body may be empty.",
    request_body(content = Option<ReplayBody>, description = "Optional; an empty body is `{}`."),
    responses(
        (status = 200, description = "How many jobs were replayed.", body = Replayed),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::AdminUnauthorized),
        (status = 413, response = crate::openapi::PayloadTooLarge),
        (status = 415, response = crate::openapi::UnsupportedMediaType),
        (status = 503, response = crate::openapi::Unavailable),
    ),
    security(("admin_token" = [])),
)]
pub async fn replay_dead_letters(
    State(state): State<AppState>,
    _admin: Admin,
    OptionalJsonBody(body): OptionalJsonBody<ReplayBody>,
) -> ApiResult<impl IntoResponse> {
    let limit = body.limit.unwrap_or(100);
    if !(1..=MAX_REPLAY).contains(&limit) {
        return Err(ApiError::invalid(format!(
            "limit: must be an integer from 1 to {MAX_REPLAY}"
        )));
    }
    let replayed = crate::replay::replay(&state, limit).await?;
    Ok(Json(Replayed { replayed }))
}
