//! Liveness and readiness.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::AppState;

/// Longest a readiness probe waits on each dependency.
const READY_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// `GET /healthz`: 200 while the process runs.
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /readyz`: 200 when PostgreSQL and RabbitMQ answer, else 503 naming
/// the one that does not.
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let db = async { sqlx::query("select 1").execute(&state.db).await.is_ok() };
    let broker = state.publisher.broker().is_ready();
    let (db_ok, broker_ok) = tokio::join!(
        tokio::time::timeout(READY_CHECK_TIMEOUT, db),
        tokio::time::timeout(READY_CHECK_TIMEOUT, broker)
    );
    let db_ok = db_ok.unwrap_or(false);
    let broker_ok = broker_ok.unwrap_or(false);
    let word = |ok: bool| if ok { "ok" } else { "unavailable" };
    let body = json!({
        "status": if db_ok && broker_ok { "ready" } else { "unavailable" },
        "checks": {"postgres": word(db_ok), "rabbitmq": word(broker_ok)},
    });
    if db_ok && broker_ok {
        (StatusCode::OK, Json(body))
    } else {
        let mut body = body;
        let down: Vec<&str> = [(db_ok, "postgres"), (broker_ok, "rabbitmq")]
            .into_iter()
            .filter_map(|(ok, name)| (!ok).then_some(name))
            .collect();
        body["error"] = json!({"code": "unavailable", "message": format!("not reachable: {}", down.join(", "))});
        (StatusCode::SERVICE_UNAVAILABLE, Json(body))
    }
}
