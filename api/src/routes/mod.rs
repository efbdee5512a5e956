//! Routes, one module per resource.

mod admin;
pub(crate) mod conversations;
mod events;
mod health;
mod jobs;
mod openai;
pub(crate) mod submit;

use axum::Router;
use axum::routing::{get, post};

use crate::AppState;
use crate::error::ApiError;

/// Every route of API.md, with JSON 404 and 405 fallbacks.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(crate::metrics::metrics))
        .route(
            "/v1/conversations",
            post(conversations::create).get(conversations::list),
        )
        .route(
            "/v1/conversations/{id}",
            get(conversations::get).delete(conversations::delete),
        )
        .route(
            "/v1/conversations/{id}/messages",
            post(submit::submit).get(conversations::messages),
        )
        .route("/v1/chat", post(submit::chat))
        .route("/v1/jobs/{id}", get(jobs::get))
        .route("/v1/jobs/{id}/cancel", post(jobs::cancel))
        .route("/v1/jobs/{id}/events", get(events::events))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/models", get(openai::models))
        .route("/v1/models/{*id}", get(openai::model))
        .route("/admin/v1/api-keys", post(admin::create_key))
        .route(
            "/admin/v1/api-keys/{id}",
            axum::routing::delete(admin::revoke_key),
        )
        .route("/admin/v1/queues", get(admin::queues))
        .route("/admin/v1/queues/pause", post(admin::pause))
        .route("/admin/v1/queues/resume", post(admin::resume))
        .route(
            "/admin/v1/dead-letters/replay",
            post(admin::replay_dead_letters),
        )
        .fallback(|| async { ApiError::NotFound("no such route") })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
}
