//! Liveness and readiness.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;
use utoipa::ToSchema;

use crate::AppState;
use crate::error::ErrorDetail;

/// Longest a readiness probe waits on each dependency.
const READY_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The answer of `GET /healthz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    pub status: CheckStatus,
}

/// The answer of `GET /readyz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// `ready`, or `unavailable` when a dependency does not answer.
    pub status: ReadyStatus,
    /// Each dependency's state.
    pub checks: ReadinessChecks,
    /// Present only when not ready: `unavailable`, naming what is not reachable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDetail>,
}

/// Whether the api can serve.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReadyStatus {
    /// Every dependency answers.
    Ready,
    /// A dependency does not answer.
    Unavailable,
}

/// The dependencies `GET /readyz` checks.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReadinessChecks {
    /// PostgreSQL.
    pub postgres: CheckStatus,
    /// RabbitMQ.
    pub rabbitmq: CheckStatus,
}

/// The state of one check.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum CheckStatus {
    /// It answers.
    Ok,
    /// It does not answer (in time).
    Unavailable,
}

/// `GET /healthz`: 200 while the process runs.
#[utoipa::path(
    get,
    path = "/healthz",
    operation_id = "healthz",
    tag = "operations",
    summary = "Liveness",
    description = "200 while the process runs. Exempt from load shedding: it answers even at capacity.",
    responses((status = 200, description = "The process runs.", body = Health)),
)]
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: CheckStatus::Ok,
    })
}

/// `GET /readyz`: 200 when PostgreSQL and RabbitMQ answer, else 503 naming
/// the one that does not.
#[utoipa::path(
    get,
    path = "/readyz",
    operation_id = "readyz",
    tag = "operations",
    summary = "Readiness",
    description = "200 when PostgreSQL and RabbitMQ are reachable, else 503 naming which one is not.",
    responses(
        (status = 200, description = "PostgreSQL and RabbitMQ are reachable.", body = Readiness),
        (status = 503, description = "A dependency is not reachable (a `Readiness` with `error`), or the api is at capacity (an `ErrorBody`); with `Retry-After` in the second case.",
            body = crate::openapi::ReadinessOrError,
            headers(("Retry-After" = Option<u64>, description = "Seconds to wait, when the api sheds load."))),
    ),
)]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let db = async { sqlx::query("select 1").execute(&state.db).await.is_ok() };
    let broker = state.publisher.broker().is_ready();
    let (db_ok, broker_ok) = tokio::join!(
        tokio::time::timeout(READY_CHECK_TIMEOUT, db),
        tokio::time::timeout(READY_CHECK_TIMEOUT, broker)
    );
    let db_ok = db_ok.unwrap_or(false);
    let broker_ok = broker_ok.unwrap_or(false);
    let word = |ok: bool| {
        if ok {
            CheckStatus::Ok
        } else {
            CheckStatus::Unavailable
        }
    };
    let mut body = Readiness {
        status: if db_ok && broker_ok {
            ReadyStatus::Ready
        } else {
            ReadyStatus::Unavailable
        },
        checks: ReadinessChecks {
            postgres: word(db_ok),
            rabbitmq: word(broker_ok),
        },
        error: None,
    };
    if db_ok && broker_ok {
        (StatusCode::OK, Json(body))
    } else {
        let down: Vec<&str> = [(db_ok, "postgres"), (broker_ok, "rabbitmq")]
            .into_iter()
            .filter_map(|(ok, name)| (!ok).then_some(name))
            .collect();
        body.error = Some(ErrorDetail {
            code: "unavailable",
            message: format!("not reachable: {}", down.join(", ")),
        });
        (StatusCode::SERVICE_UNAVAILABLE, Json(body))
    }
}
