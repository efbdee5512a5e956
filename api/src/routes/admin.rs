//! Operator routes, behind the admin token.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::json;

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
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    tenant: String,
    rate_limit_per_minute: Option<i64>,
    max_concurrency: Option<i64>,
}

/// `POST /admin/v1/api-keys` → 201 `{id, tenant, key}`; the key is shown
/// only here.
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
    let body = json!({
        "id": id, "tenant": tenant, "tenant_id": tenant_id, "key": key,
        "rate_limit_per_minute": rate_limit, "max_concurrency": max_concurrency,
    });
    Ok((StatusCode::CREATED, Json(body)))
}

/// `DELETE /admin/v1/api-keys/{id}` → 204; the key stops working at once.
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

/// `GET /admin/v1/queues`: broker depths and job counts by status.
pub async fn queues(State(state): State<AppState>, _admin: Admin) -> ApiResult<impl IntoResponse> {
    let broker = state.publisher.broker();
    let depths = broker.depths().await.map_err(|err| {
        tracing::warn!(error = %err, "cannot read queue depths");
        ApiError::Unavailable("the broker")
    })?;
    let stats = chatq_common::db::jobs::stats(&state.db).await?;
    let paused = controls::is_paused(&state.db).await?;
    let by_status: serde_json::Map<String, serde_json::Value> = stats
        .by_status
        .into_iter()
        .map(|(s, n)| (s, json!(n)))
        .collect();
    Ok(Json(json!({
        "queue": broker.topology().work_queue,
        "depth": depths.work_messages,
        "consumers": depths.work_consumers,
        "dead_letter_queue": broker.topology().dead_queue,
        "dead_letter_depth": depths.dead_messages,
        "max_length": broker.topology().max_length,
        "jobs_by_status": by_status,
        "oldest_queued_age_secs": stats.oldest_queued_age_secs,
        "paused": paused,
    })))
}

/// `POST /admin/v1/queues/pause` → `{"paused": true}`: workers stop taking
/// new jobs (within about a second); jobs they hold finish.
pub async fn pause(State(state): State<AppState>, _admin: Admin) -> ApiResult<impl IntoResponse> {
    let paused = controls::set_paused(&state.db, true).await?;
    tracing::info!("consumption paused by an operator");
    Ok(Json(json!({ "paused": paused })))
}

/// `POST /admin/v1/queues/resume` → `{"paused": false}`: workers take jobs again.
pub async fn resume(State(state): State<AppState>, _admin: Admin) -> ApiResult<impl IntoResponse> {
    let paused = controls::set_paused(&state.db, false).await?;
    tracing::info!("consumption resumed by an operator");
    Ok(Json(json!({ "paused": paused })))
}

/// Most dead letters replayed by one call.
const MAX_REPLAY: i64 = 10_000;

/// Body of `POST /admin/v1/dead-letters/replay`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayBody {
    limit: Option<i64>,
}

/// `POST /admin/v1/dead-letters/replay` → `{"replayed": n}`: failed jobs
/// whose messages were dead-lettered go back to `queued` with a fresh
/// attempt budget and are published again. Messages that name no job, or a
/// job that is no longer failed, are discarded; a job whose conversation is
/// busy again stays in the dead-letter queue.
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
    Ok(Json(json!({"replayed": replayed})))
}
