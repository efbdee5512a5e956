//! The OpenAPI 3.1 document of every route (`GET /openapi.json`), built by
//! utoipa from the handlers' `#[utoipa::path]` attributes and the request,
//! response and query types they use; and the interactive page on it
//! (`GET /docs`): Swagger UI, whose files are compiled into the binary
//! (`utoipa-swagger-ui` with its `vendored` feature: no download at build
//! time, no CDN at run time).
//!
//! Which routes are served is [`crate::routes::route_table`]; a test
//! (`tests/tests/openapi.rs`) checks that this document has exactly those.

use std::borrow::Cow;
use std::sync::{Arc, OnceLock};

use axum::body::{Body, Bytes};
use axum::extract::Path;
use axum::http::{HeaderValue, header};
use axum::response::{Html, IntoResponse, Response};
use serde::Serialize;
use utoipa::openapi::extensions::Extensions;
use utoipa::openapi::schema::{
    AnyOfBuilder, ObjectBuilder, OneOfBuilder, Schema, SchemaType, Type,
};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{self, Ref, RefOr};
use utoipa::{IntoParams, Modify, OpenApi, PartialSchema, ToResponse, ToSchema};

use crate::error::{ApiError, ErrorBody};
use crate::openai::{ChatCompletionChunk, OpenAiErrorBody};
use crate::routes::events::{DeltaEventData, ResetEventData};
use crate::routes::health::Readiness;
use crate::views::JobView;

/// The document's root: every handler, and what they share.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "chatq",
        description = "An LLM job queue: chat requests are stored in PostgreSQL, queued on RabbitMQ and answered by workers. \
Every `/v1` route needs `Authorization: Bearer <api key>`; `/admin/v1` routes need the admin token. \
A resource of another tenant is answered 404, as one that does not exist. \
Errors have the body `{\"error\": {\"code\", \"message\"}}` (the OpenAI-compatible routes use OpenAI's error shape). \
Any route answers `405 method_not_allowed` to a method it does not serve, and an unknown path is `404 not_found`. \
Under load, requests other than `/healthz`, `/metrics`, event streams, long polls and chat completions may be refused at once with `503 unavailable` and `Retry-After`.",
        license(name = "MIT"),
    ),
    paths(
        crate::routes::health::healthz,
        crate::routes::health::readyz,
        crate::metrics::metrics,
        openapi_json,
        docs,
        docs_file,
        crate::routes::conversations::create,
        crate::routes::conversations::list,
        crate::routes::conversations::get,
        crate::routes::conversations::delete,
        crate::routes::conversations::messages,
        crate::routes::submit::submit,
        crate::routes::submit::chat,
        crate::routes::jobs::get,
        crate::routes::jobs::cancel,
        crate::routes::events::events,
        crate::routes::openai::chat_completions,
        crate::routes::openai::models,
        crate::routes::openai::model,
        crate::routes::admin::create_key,
        crate::routes::admin::revoke_key,
        crate::routes::admin::queues,
        crate::routes::admin::pause,
        crate::routes::admin::resume,
        crate::routes::admin::replay_dead_letters,
    ),
    components(
        schemas(
            ErrorBody,
            OpenAiErrorBody,
            OpenAiOrApiError,
        ),
        responses(
            BadRequest,
            Unauthorized,
            AdminUnauthorized,
            NotFound,
            Conflict,
            PayloadTooLarge,
            UnsupportedMediaType,
            RateLimited,
            TooManyRequests,
            Unavailable,
            OpenAiBadRequest,
            OpenAiUnauthorized,
            OpenAiNotFound,
            OpenAiConflict,
            OpenAiPayloadTooLarge,
            OpenAiUnsupportedMediaType,
            OpenAiTooManyRequests,
            OpenAiJobError,
            OpenAiBadGateway,
            OpenAiUnavailable,
            OpenAiGatewayTimeout,
            OpenAiOrApiUnavailable,
        ),
    ),
    modifiers(&SecuritySchemes, &OptionalBodies, &HeadTooLarge),
    tags(
        (name = "conversations", description = "Conversations and their messages."),
        (name = "jobs", description = "Submitting messages and following the jobs that answer them."),
        (name = "openai", description = "The OpenAI-compatible facade."),
        (name = "admin", description = "Operator routes, behind the admin token."),
        (name = "operations", description = "Health, readiness and metrics."),
        (name = "docs", description = "This document and the page that shows it."),
    ),
)]
pub struct ApiDoc;

/// Adds the two bearer schemes.
struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, doc: &mut openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        let bearer = |description: &str| {
            let mut http = Http::new(HttpAuthScheme::Bearer);
            http.description = Some(description.to_owned());
            SecurityScheme::Http(http)
        };
        components.add_security_scheme(
            "api_key",
            bearer(
                "An API key (`POST /admin/v1/api-keys`) as `Authorization: Bearer <key>`. A key belongs to one tenant; the admin token is not a key.",
            ),
        );
        components.add_security_scheme(
            "admin_token",
            bearer(
                "The admin token the api was started with (`CHATQ_ADMIN_TOKEN`) as `Authorization: Bearer <token>`; an API key is refused.",
            ),
        );
    }
}

/// An optional body (`Option<T>` in `request_body`) is one that may be
/// absent, not JSON `null` (which is a 400): its schema is `T`'s, and the
/// body is not required.
struct OptionalBodies;

impl Modify for OptionalBodies {
    fn modify(&self, doc: &mut openapi::OpenApi) {
        for item in doc.paths.paths.values_mut() {
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ];
            for body in operations
                .into_iter()
                .flatten()
                .filter_map(|op| op.request_body.as_mut())
            {
                for content in body.content.values_mut() {
                    if let Some(RefOr::T(Schema::OneOf(one_of))) = &content.schema
                        && let [first, second] = one_of.items.as_slice()
                        && is_null(first)
                    {
                        content.schema = Some(second.clone());
                        body.required = Some(openapi::Required::False);
                    }
                }
            }
        }
    }
}

/// Whether `schema` is `{"type": "null"}`.
fn is_null(schema: &RefOr<Schema>) -> bool {
    matches!(
        schema,
        RefOr::T(Schema::Object(o))
            if o.schema_type == SchemaType::Type(Type::Null)
    )
}

/// Every operation: hyper answers `431` (no body) to a request whose head
/// (request line and headers) is over 64 KiB, before any route is chosen.
struct HeadTooLarge;

impl Modify for HeadTooLarge {
    fn modify(&self, doc: &mut openapi::OpenApi) {
        let response = openapi::ResponseBuilder::new()
            .description(
                "The request line and headers are over 64 KiB (answered by the HTTP layer, with no body).",
            )
            .build();
        for item in doc.paths.paths.values_mut() {
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ];
            for op in operations.into_iter().flatten() {
                op.responses
                    .responses
                    .insert("431".to_owned(), RefOr::T(response.clone()));
            }
        }
    }
}

/// The document, built once.
pub fn document() -> &'static openapi::OpenApi {
    static DOC: OnceLock<openapi::OpenApi> = OnceLock::new();
    DOC.get_or_init(ApiDoc::openapi)
}

/// `GET /openapi.json`.
#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "openapi",
    tag = "docs",
    summary = "This OpenAPI 3.1 document",
    responses(
        (status = 200, description = "The OpenAPI document.", content_type = "application/json", body = Object),
        (status = 503, response = Unavailable),
    ),
)]
pub async fn openapi_json() -> Response {
    // Serialized once; each answer shares the bytes.
    static JSON: OnceLock<Result<Bytes, String>> = OnceLock::new();
    let json = JSON.get_or_init(|| {
        document()
            .to_json()
            .map(Bytes::from)
            .map_err(|err| err.to_string())
    });
    match json {
        Ok(json) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            json.clone(),
        )
            .into_response(),
        Err(err) => ApiError::Internal(anyhow::anyhow!("serializing the OpenAPI document: {err}"))
            .into_response(),
    }
}

/// The page of `GET /docs`: Swagger UI on `/openapi.json`. Paths are
/// relative, so it works behind a proxy that mounts the api under a prefix.
const DOCS_PAGE: &str = include_str!("../assets/docs.html");

/// `GET /docs`: an interactive page on this document.
#[utoipa::path(
    get,
    path = "/docs",
    operation_id = "docs",
    tag = "docs",
    summary = "Interactive API documentation",
    description = "Swagger UI on `/openapi.json`. Its files are served by this api (`/docs/{file}`): nothing is loaded from elsewhere.",
    responses(
        (status = 200, description = "The page.", content_type = "text/html", body = String),
        (status = 503, response = Unavailable),
    ),
)]
pub async fn docs() -> Html<&'static str> {
    Html(DOCS_PAGE)
}

/// `GET /docs/{file}`: a file of Swagger UI, compiled into the binary.
#[utoipa::path(
    get,
    path = "/docs/{file}",
    operation_id = "docsFile",
    tag = "docs",
    summary = "A file of the documentation page",
    params(("file" = String, Path, min_length = 1, example = "swagger-ui.css", description = "A file of Swagger UI's distribution, e.g. `swagger-ui-bundle.js`.")),
    responses(
        (status = 200, description = "The file.",
            content(
                (String = "text/javascript"),
                (String = "text/css"),
                (String = "text/html"),
                (String = "application/json"),
                (String = "image/png"),
            )),
        (status = 404, response = NotFound),
        (status = 503, response = Unavailable),
    ),
)]
pub async fn docs_file(Path(file): Path<String>) -> Response {
    // Only the initializer (not served) reads the config.
    static CONFIG: OnceLock<Arc<utoipa_swagger_ui::Config<'static>>> = OnceLock::new();
    let config = CONFIG.get_or_init(|| Arc::new(utoipa_swagger_ui::Config::default()));
    // The initializer is ours (docs.html); the rest are Swagger UI's files.
    let found = match file.as_str() {
        "" | "index.html" | "swagger-initializer.js" => Ok(None),
        name => utoipa_swagger_ui::serve(name, Arc::clone(config)),
    };
    match found {
        Ok(Some(file)) => {
            let content_type = HeaderValue::from_str(&file.content_type)
                .unwrap_or(HeaderValue::from_static("application/octet-stream"));
            (
                [
                    (header::CONTENT_TYPE, content_type),
                    (
                        header::CACHE_CONTROL,
                        HeaderValue::from_static("public, max-age=86400"),
                    ),
                ],
                match file.bytes {
                    Cow::Borrowed(bytes) => Body::from(Bytes::from_static(bytes)),
                    Cow::Owned(bytes) => Body::from(bytes),
                },
            )
                .into_response()
        }
        Ok(None) => ApiError::NotFound("no such file").into_response(),
        Err(err) => {
            ApiError::Internal(anyhow::anyhow!("serving a Swagger UI file: {err}")).into_response()
        }
    }
}

// --- Schemas of types defined elsewhere -----------------------------------

/// The status of a job (`chatq_common::domain::JobStatus`, which the api
/// crate cannot give a schema: this mirror is checked against it in tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[schema(as = JobStatus)]
pub enum JobStatusSchema {
    /// Stored and waiting for a worker.
    Queued,
    /// Claimed by a worker, LLM call in progress.
    Running,
    /// The assistant reply is stored (terminal).
    Succeeded,
    /// Gave up; `error` says why (terminal).
    Failed,
    /// Cancelled by the client or by deleting its conversation (terminal).
    Cancelled,
}

/// Who wrote a message (`chatq_common::domain::Role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[schema(as = Role)]
pub enum RoleSchema {
    /// The conversation's system prompt.
    System,
    /// The client.
    User,
    /// The model's answer, written by a worker.
    Assistant,
}

/// The lane a job waits in (`chatq_common::domain::Priority`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[schema(as = Priority)]
pub enum PrioritySchema {
    /// A person is waiting (the default).
    Interactive,
    /// Nobody is waiting: runs on capacity interactive work leaves idle.
    Batch,
}

/// A failed attempt of a job, as the worker records it.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = AttemptError)]
pub struct AttemptErrorSchema {
    /// The attempt (1 = the first).
    pub attempt: i32,
    /// Why it failed, e.g. `llm_timeout`, `llm_unavailable`.
    pub code: String,
    /// For people.
    pub message: String,
    /// When it failed.
    pub at: chrono::DateTime<chrono::Utc>,
    /// The text the attempt had streamed before failing, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partial_content: Option<String>,
}

/// The optional `Idempotency-Key` header of a submission.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Header)]
pub struct IdempotencyKey {
    /// 1 to 255 visible ASCII characters. The same key with the same body
    /// returns the original job (for at least 24 h); with a different body
    /// it is `409 conflict`. Scoped to the tenant.
    #[param(
        rename = "Idempotency-Key",
        required = false,
        min_length = 1,
        max_length = 255,
        pattern = "^[\\x21-\\x7E]+$"
    )]
    pub key: String,
}

/// The body of a `503` of `GET /readyz`: a [`Readiness`] naming what is not
/// reachable, or an [`ErrorBody`] when the api sheds load.
pub struct ReadinessOrError;

/// The body of a `503` of the facade's model routes: OpenAI's shape when
/// the database is unavailable, the API's when the api sheds load.
pub struct OpenAiOrApiError;

fn any_of(names: [&str; 2]) -> RefOr<Schema> {
    let mut any = AnyOfBuilder::new();
    for name in names {
        any = any.item(Ref::from_schema_name(name));
    }
    any.into()
}

/// Adds `T` and what it refers to.
fn collect<T: ToSchema>(schemas: &mut Vec<(String, RefOr<Schema>)>) {
    schemas.push((T::name().into_owned(), T::schema()));
    T::schemas(schemas);
}

impl PartialSchema for ReadinessOrError {
    fn schema() -> RefOr<Schema> {
        any_of([&Readiness::name(), &ErrorBody::name()])
    }
}

impl ToSchema for ReadinessOrError {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("ReadinessOrError")
    }

    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        collect::<Readiness>(schemas);
        collect::<ErrorBody>(schemas);
    }
}

impl PartialSchema for OpenAiOrApiError {
    fn schema() -> RefOr<Schema> {
        any_of([&OpenAiErrorBody::name(), &ErrorBody::name()])
    }
}

impl ToSchema for OpenAiOrApiError {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("OpenAiOrApiError")
    }

    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        collect::<OpenAiErrorBody>(schemas);
        collect::<ErrorBody>(schemas);
    }
}

// --- Event streams ---------------------------------------------------------
//
// A `text/event-stream` schema describes one event, as OpenAPI 3.2's
// `itemSchema` does (and as schemathesis reads an OpenAPI 3.1 `schema`): an
// object of the event's fields, whose `data` is a string holding JSON of the
// given schema (`contentMediaType` and `contentSchema`, JSON Schema 2020-12;
// utoipa has no field for `contentSchema`, so it is added as an extension,
// which serializes as any other keyword).

/// One event of `GET /v1/jobs/{id}/events`.
pub struct JobEvent;

/// One event of a streamed `POST /v1/chat/completions`: a
/// `chat.completion.chunk`, an error in OpenAI's shape, or `[DONE]`.
pub struct CompletionEvent;

/// The schema of a `data` field holding JSON of `schema`.
fn json_data(schema: &str) -> ObjectBuilder {
    let content_schema = serde_json::json!({ "$ref": format!("#/components/schemas/{schema}") });
    ObjectBuilder::new()
        .schema_type(Type::String)
        .content_media_type("application/json")
        .extensions(Some(Extensions::from_iter([(
            "contentSchema",
            content_schema,
        )])))
}

/// A named event (`event`, `id`, `data` of `data_schema`).
fn named_event(name: &str, data_schema: &str, description: &str) -> RefOr<Schema> {
    ObjectBuilder::new()
        .description(Some(description))
        .property(
            "event",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some([name])),
        )
        .required("event")
        .property(
            "id",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .description(Some(
                    "Send it back as `Last-Event-ID` to resume after this event.",
                )),
        )
        .required("id")
        .property("data", json_data(data_schema))
        .required("data")
        .into()
}

impl PartialSchema for JobEvent {
    fn schema() -> RefOr<Schema> {
        let job = JobView::name();
        OneOfBuilder::new()
            .description(Some("One server-sent event of a job's stream."))
            .item(named_event("status", &job, "The job changed (or, first, the job as it is now)."))
            .item(named_event(
                "delta",
                &DeltaEventData::name(),
                "The next tokens of the answer (first, all the text so far).",
            ))
            .item(named_event(
                "reset",
                &ResetEventData::name(),
                "An attempt that had streamed text is retried: the deltas that follow start its text anew.",
            ))
            .item(named_event("done", &job, "The job is terminal; the stream closes."))
            .into()
    }
}

impl ToSchema for JobEvent {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("JobEvent")
    }

    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        collect::<JobView>(schemas);
        collect::<DeltaEventData>(schemas);
        collect::<ResetEventData>(schemas);
    }
}

impl PartialSchema for CompletionEvent {
    fn schema() -> RefOr<Schema> {
        let done = ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(["[DONE]"]));
        let data = AnyOfBuilder::new()
            .item(json_data(&ChatCompletionChunk::name()))
            .item(json_data(&OpenAiErrorBody::name()))
            .item(done);
        ObjectBuilder::new()
            .description(Some(
                "One server-sent event of a streamed completion: a `chat.completion.chunk`, then `[DONE]`; or an error in OpenAI's shape, which ends the stream.",
            ))
            .property("data", data)
            .required("data")
            .into()
    }
}

impl ToSchema for CompletionEvent {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("CompletionEvent")
    }

    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        collect::<ChatCompletionChunk>(schemas);
        collect::<OpenAiErrorBody>(schemas);
    }
}

// --- Shared error answers --------------------------------------------------

/// `invalid_request`: malformed JSON, wrong types, unknown fields, a value
/// out of range, bad query parameters, a bad UUID in the path; the message
/// names the field. Also a body not received within
/// `CHATQ_BODY_READ_TIMEOUT_SECS`.
#[derive(ToResponse)]
#[response(example = json!({"error": {"code": "invalid_request", "message": "content: must not be empty"}}))]
pub struct BadRequest(pub ErrorBody);

/// `unauthorized`: missing, malformed, unknown or revoked API key (the
/// admin token is not an API key).
#[derive(ToResponse)]
#[response(example = json!({"error": {"code": "unauthorized", "message": "missing or invalid credentials"}}))]
pub struct Unauthorized(pub ErrorBody);

/// `unauthorized`: missing or wrong admin token (an API key is not the
/// admin token), or no admin token configured.
#[derive(ToResponse)]
#[response(example = json!({"error": {"code": "unauthorized", "message": "missing or invalid credentials"}}))]
pub struct AdminUnauthorized(pub ErrorBody);

/// `not_found`: no such resource for this tenant (a resource of another
/// tenant included).
#[derive(ToResponse)]
#[response(example = json!({"error": {"code": "not_found", "message": "no such job"}}))]
pub struct NotFound(pub ErrorBody);

/// `conversation_busy`: the conversation already has a queued or running
/// job; or `conflict`: the job is already terminal, or the
/// `Idempotency-Key` was used with a different request.
#[derive(ToResponse)]
#[response(example = json!({"error": {"code": "conversation_busy", "message": "the conversation already has a queued or running job"}}))]
pub struct Conflict(pub ErrorBody);

/// `payload_too_large`: the body is over `CHATQ_MAX_BODY_BYTES` (default
/// 256 KiB); the connection is closed after the answer.
#[derive(ToResponse)]
#[response(example = json!({"error": {"code": "payload_too_large", "message": "request body is larger than 262144 bytes"}}))]
pub struct PayloadTooLarge(pub ErrorBody);

/// `unsupported_media_type`: the body is not JSON (`Content-Type` must be
/// `application/json` or `application/*+json`).
#[derive(ToResponse)]
#[response(example = json!({"error": {"code": "unsupported_media_type", "message": "request body must be JSON (Content-Type: application/json)"}}))]
pub struct UnsupportedMediaType(pub ErrorBody);

/// `rate_limited`: the key is over its rate limit.
#[derive(ToResponse)]
#[response(
    headers(("Retry-After" = u64, description = "Seconds until a retry can succeed.")),
    example = json!({"error": {"code": "rate_limited", "message": "rate limit exceeded"}})
)]
pub struct RateLimited(pub ErrorBody);

/// `rate_limited`: the key is over its rate limit; or `queue_full`: the
/// queue, or the tenant's share of it, is at its maximum length.
#[derive(ToResponse)]
#[response(
    headers(("Retry-After" = u64, description = "Seconds to wait before retrying.")),
    example = json!({"error": {"code": "queue_full", "message": "the work queue is full, retry later"}})
)]
pub struct TooManyRequests(pub ErrorBody);

/// `unavailable`: the database or the broker cannot take the request now,
/// the api is at capacity (`CHATQ_MAX_IN_FLIGHT_REQUESTS`) or the request
/// was not handled within `CHATQ_REQUEST_TIMEOUT_SECS`.
#[derive(ToResponse)]
#[response(
    headers(("Retry-After" = u64, description = "Seconds to wait before retrying.")),
    example = json!({"error": {"code": "unavailable", "message": "the database is unavailable, retry later"}})
)]
pub struct Unavailable(pub ErrorBody);

/// `invalid_request_error`: a malformed request; `param` names the
/// parameter, `code` is `unsupported_parameter` for a parameter chatq does
/// not support; or the model refused the request (`code` `llm_rejected`).
#[derive(ToResponse)]
pub struct OpenAiBadRequest(pub OpenAiErrorBody);

/// `invalid_api_key`: missing, unknown or revoked API key.
#[derive(ToResponse)]
pub struct OpenAiUnauthorized(pub OpenAiErrorBody);

/// `model_not_found`: the model is not offered here.
#[derive(ToResponse)]
pub struct OpenAiNotFound(pub OpenAiErrorBody);

/// `conflict`: the `Idempotency-Key` was used with a different request.
#[derive(ToResponse)]
pub struct OpenAiConflict(pub OpenAiErrorBody);

/// `payload_too_large`: the body is over `CHATQ_MAX_BODY_BYTES`.
#[derive(ToResponse)]
pub struct OpenAiPayloadTooLarge(pub OpenAiErrorBody);

/// `unsupported_media_type`: the body is not JSON.
#[derive(ToResponse)]
pub struct OpenAiUnsupportedMediaType(pub OpenAiErrorBody);

/// `rate_limit_exceeded` or `queue_full`.
#[derive(ToResponse)]
#[response(headers(("Retry-After" = u64, description = "Seconds to wait before retrying.")))]
pub struct OpenAiTooManyRequests(pub OpenAiErrorBody);

/// The job ended without an answer for another reason than the model's:
/// `job_cancelled` (cancelled, or deleted with its conversation, while the
/// request waited), or the job's error code.
#[derive(ToResponse)]
pub struct OpenAiJobError(pub OpenAiErrorBody);

/// The model failed (`code` is the job's error code, `llm_...`), after the
/// job's retries.
#[derive(ToResponse)]
pub struct OpenAiBadGateway(pub OpenAiErrorBody);

/// `unavailable`: the database or the broker cannot take the request now,
/// or the api is shutting down.
#[derive(ToResponse)]
#[response(headers(("Retry-After" = u64, description = "Seconds to wait before retrying.")))]
pub struct OpenAiUnavailable(pub OpenAiErrorBody);

/// `timeout`: the job did not finish within
/// `CHATQ_COMPLETIONS_TIMEOUT_SECS`; it was cancelled.
#[derive(ToResponse)]
pub struct OpenAiGatewayTimeout(pub OpenAiErrorBody);

/// `unavailable`: the database cannot take the request now (OpenAI's
/// shape), or the api is at capacity or timed out (the API's shape).
#[derive(ToResponse)]
#[response(headers(("Retry-After" = u64, description = "Seconds to wait before retrying.")))]
pub struct OpenAiOrApiUnavailable(pub OpenAiOrApiError);

#[cfg(test)]
mod tests {
    use chatq_common::domain::{JobStatus, Priority, Role};

    use super::*;

    // Exhaustive matches: a variant added to a domain enum does not compile
    // until its mirror has it too.
    fn status(s: JobStatus) -> JobStatusSchema {
        match s {
            JobStatus::Queued => JobStatusSchema::Queued,
            JobStatus::Running => JobStatusSchema::Running,
            JobStatus::Succeeded => JobStatusSchema::Succeeded,
            JobStatus::Failed => JobStatusSchema::Failed,
            JobStatus::Cancelled => JobStatusSchema::Cancelled,
        }
    }

    fn role(r: Role) -> RoleSchema {
        match r {
            Role::System => RoleSchema::System,
            Role::User => RoleSchema::User,
            Role::Assistant => RoleSchema::Assistant,
        }
    }

    fn priority(p: Priority) -> PrioritySchema {
        match p {
            Priority::Interactive => PrioritySchema::Interactive,
            Priority::Batch => PrioritySchema::Batch,
        }
    }

    fn same_json(a: impl Serialize, b: impl Serialize) {
        let (a, b) = (serde_json::to_value(a), serde_json::to_value(b));
        assert_eq!(a.ok(), b.ok());
    }

    #[test]
    fn the_mirrored_enums_serialize_as_the_domain_ones() {
        for s in [
            JobStatus::Queued,
            JobStatus::Running,
            JobStatus::Succeeded,
            JobStatus::Failed,
            JobStatus::Cancelled,
        ] {
            same_json(s, status(s));
        }
        for r in [Role::System, Role::User, Role::Assistant] {
            same_json(r, role(r));
        }
        for p in [Priority::Interactive, Priority::Batch] {
            same_json(p, priority(p));
        }
    }

    #[test]
    fn the_document_is_openapi_3_1_and_serializes() {
        let json = document().to_json().expect("the document serializes");
        assert!(json.starts_with(r#"{"openapi":"3.1"#), "{}", &json[..40]);
    }
}
