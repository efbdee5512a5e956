//! Routes, one module per resource.

pub(crate) mod admin;
pub(crate) mod conversations;
pub(crate) mod events;
pub(crate) mod health;
pub(crate) mod jobs;
pub(crate) mod openai;
pub(crate) mod submit;

use axum::Router;
use axum::handler::Handler;
use axum::http::Method;
use axum::routing::{self, MethodRouter};

use crate::AppState;
use crate::error::ApiError;
use crate::openapi;

/// One route: a method, a path in axum's syntax, and its handler.
struct Route {
    method: Method,
    path: &'static str,
    handler: MethodRouter<AppState>,
}

fn get<H: Handler<T, AppState>, T: 'static>(path: &'static str, handler: H) -> Route {
    Route {
        method: Method::GET,
        path,
        handler: routing::get(handler),
    }
}

fn post<H: Handler<T, AppState>, T: 'static>(path: &'static str, handler: H) -> Route {
    Route {
        method: Method::POST,
        path,
        handler: routing::post(handler),
    }
}

fn delete<H: Handler<T, AppState>, T: 'static>(path: &'static str, handler: H) -> Route {
    Route {
        method: Method::DELETE,
        path,
        handler: routing::delete(handler),
    }
}

/// Every route of API.md, and the docs. The router is built from this list
/// and nothing else, so [`route_table`] is what it serves (each `GET` also
/// answers `HEAD`); `GET /openapi.json` must document each of them (a test
/// checks it).
fn routes() -> Vec<Route> {
    vec![
        get("/healthz", health::healthz),
        get("/readyz", health::readyz),
        get("/metrics", crate::metrics::metrics),
        get("/openapi.json", openapi::openapi_json),
        get("/docs", openapi::docs),
        get("/docs/{file}", openapi::docs_file),
        post("/v1/conversations", conversations::create),
        get("/v1/conversations", conversations::list),
        get("/v1/conversations/{id}", conversations::get),
        delete("/v1/conversations/{id}", conversations::delete),
        post("/v1/conversations/{id}/messages", submit::submit),
        get("/v1/conversations/{id}/messages", conversations::messages),
        post("/v1/chat", submit::chat),
        get("/v1/jobs/{id}", jobs::get),
        post("/v1/jobs/{id}/cancel", jobs::cancel),
        get("/v1/jobs/{id}/events", events::events),
        post("/v1/chat/completions", openai::chat_completions),
        get("/v1/models", openai::models),
        get("/v1/models/{*id}", openai::model),
        post("/admin/v1/api-keys", admin::create_key),
        delete("/admin/v1/api-keys/{id}", admin::revoke_key),
        get("/admin/v1/queues", admin::queues),
        post("/admin/v1/queues/pause", admin::pause),
        post("/admin/v1/queues/resume", admin::resume),
        post("/admin/v1/dead-letters/replay", admin::replay_dead_letters),
    ]
}

/// Every (method, path) the router serves, paths in axum's syntax
/// (`{id}`, `{*id}` for a parameter that may contain `/`).
pub fn route_table() -> Vec<(Method, &'static str)> {
    routes().into_iter().map(|r| (r.method, r.path)).collect()
}

/// Every route of [`routes`], with JSON 404 and 405 fallbacks.
pub fn router() -> Router<AppState> {
    routes()
        .into_iter()
        // Routes of one path merge: `.route(p, get(a)).route(p, post(b))`.
        .fold(Router::new(), |router, r| router.route(r.path, r.handler))
        .fallback(|| async { ApiError::NotFound("no such route") })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
}
