//! Conversations and their messages.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde::Deserialize;
use utoipa::ToSchema;

use chatq_common::db::{conversations, messages};
use chatq_common::domain::{Conversation, new_id};

use crate::AppState;
use crate::auth::Tenant;
use crate::error::{ApiError, ApiResult, is_transient};
use crate::extract::{IdPath, OptionalJsonBody, PageQuery};
use crate::validate::{json_without_nul, no_nul};
use crate::views::{ConversationView, MessageView, Page};

/// Longest accepted model name.
pub const MAX_MODEL_CHARS: usize = 200;

/// Body of `POST /v1/conversations`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateConversation {
    /// Instructions sent first to the model, at most `CHATQ_MAX_CONTENT_CHARS`
    /// (default 100,000) characters.
    #[schema(max_length = 100_000)]
    system_prompt: Option<String>,
    /// The conversation's default model (1 to 200 characters; one of
    /// `CHATQ_MODELS` when the operator set it); default `CHATQ_DEFAULT_MODEL`.
    #[schema(min_length = 1, max_length = 200)]
    model: Option<String>,
    /// The client's own data, a JSON object (default `{}`).
    #[schema(value_type = Option<Object>)]
    metadata: Option<serde_json::Value>,
}

/// Validated fields of a new conversation.
pub struct NewConversation {
    /// Instructions sent first to the LLM.
    pub system_prompt: Option<String>,
    /// Default model.
    pub model: String,
    /// Client metadata, a JSON object.
    pub metadata: serde_json::Value,
}

/// Checks a model name.
pub fn validate_model(model: Option<String>) -> ApiResult<Option<String>> {
    if let Some(m) = &model {
        no_nul("model", m)?;
    }
    match model {
        Some(m) if m.trim().is_empty() || m.chars().count() > MAX_MODEL_CHARS => Err(
            ApiError::invalid(format!("model: must be 1 to {MAX_MODEL_CHARS} characters")),
        ),
        other => Ok(other),
    }
}

/// With `CHATQ_MODELS` set, a model the operator does not offer is a 400:
/// a tenant must not pick any model on the operator's upstream key.
pub fn check_model_offered(state: &AppState, model: Option<String>) -> ApiResult<Option<String>> {
    let offered = &state.config.models;
    match model {
        Some(m) if !offered.is_empty() && !offered.iter().any(|o| o.trim() == m) => {
            Err(ApiError::invalid(format!(
                "model: `{m}` is not offered here; use one of: {}",
                offered.join(", ")
            )))
        }
        other => Ok(other),
    }
}

/// Validates the fields shared by `POST /v1/conversations` and `POST /v1/chat`.
pub fn validate_new_conversation(
    state: &AppState,
    system_prompt: Option<String>,
    model: Option<String>,
    metadata: Option<serde_json::Value>,
) -> ApiResult<NewConversation> {
    if let Some(p) = &system_prompt
        && p.chars().count() > state.config.max_content_chars
    {
        return Err(ApiError::invalid(format!(
            "system_prompt: must be at most {} characters",
            state.config.max_content_chars
        )));
    }
    if let Some(p) = &system_prompt {
        no_nul("system_prompt", p)?;
    }
    let metadata = match metadata {
        None | Some(serde_json::Value::Null) => serde_json::json!({}),
        Some(m @ serde_json::Value::Object(_)) => m,
        Some(_) => return Err(ApiError::invalid("metadata: must be a JSON object")),
    };
    json_without_nul("metadata", &metadata)?;
    let model = check_model_offered(state, validate_model(model)?)?
        .unwrap_or_else(|| state.config.default_model.clone());
    Ok(NewConversation {
        system_prompt,
        model,
        metadata,
    })
}

/// Builds the row for a new conversation.
pub fn conversation_row(tenant: &Tenant, c: NewConversation) -> Conversation {
    Conversation {
        id: new_id(),
        tenant_id: tenant.id,
        system_prompt: c.system_prompt,
        model: c.model,
        metadata: c.metadata,
        created_at: chrono::Utc::now(),
    }
}

/// `POST /v1/conversations` → 201 with `Location`.
#[utoipa::path(
    post,
    path = "/v1/conversations",
    operation_id = "createConversation",
    tag = "conversations",
    summary = "Create a conversation",
    request_body(content = Option<CreateConversation>, description = "Optional; an empty body is `{}`."),
    responses(
        (status = 201, description = "Created.", body = ConversationView,
            headers(("Location" = String, description = "`/v1/conversations/{id}`"))),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 413, response = crate::openapi::PayloadTooLarge),
        (status = 415, response = crate::openapi::UnsupportedMediaType),
        (status = 429, response = crate::openapi::RateLimited),
        (status = 503, response = crate::openapi::Unavailable),
    ),
    security(("api_key" = [])),
)]
pub async fn create(
    State(state): State<AppState>,
    tenant: Tenant,
    OptionalJsonBody(body): OptionalJsonBody<CreateConversation>,
) -> ApiResult<impl IntoResponse> {
    let new = validate_new_conversation(&state, body.system_prompt, body.model, body.metadata)?;
    crate::limits::check_rate(&state, &tenant).await?;
    let stored = conversations::insert(&state.db, &conversation_row(&tenant, new)).await?;
    let location = format!("/v1/conversations/{}", stored.id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(ConversationView::from(stored)),
    ))
}

/// The page size budget in bytes (`CHATQ_MAX_PAGE_BYTES`).
fn max_page_bytes(state: &AppState) -> i64 {
    i64::try_from(state.config.max_page_bytes).unwrap_or(i64::MAX)
}

/// `GET /v1/conversations?limit=&after=`, newest first.
#[utoipa::path(
    get,
    path = "/v1/conversations",
    operation_id = "listConversations",
    tag = "conversations",
    summary = "List conversations",
    description = "Newest first. A page may stop early when its content is large (`CHATQ_MAX_PAGE_BYTES`); `next_after` continues.",
    params(PageQuery),
    responses(
        (status = 200, description = "A page of conversations.", body = Page<ConversationView>),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 503, response = crate::openapi::Unavailable),
    ),
    security(("api_key" = [])),
)]
pub async fn list(
    State(state): State<AppState>,
    tenant: Tenant,
    PageQuery { limit, after }: PageQuery,
) -> ApiResult<impl IntoResponse> {
    let rows = conversations::list(
        &state.db,
        tenant.id,
        after,
        limit + 1,
        max_page_bytes(&state),
    )
    .await?;
    Ok(Json(Page::from_rows(
        rows,
        limit,
        |c| c.id,
        ConversationView::from,
    )))
}

/// `GET /v1/conversations/{id}`.
#[utoipa::path(
    get,
    path = "/v1/conversations/{id}",
    operation_id = "getConversation",
    tag = "conversations",
    summary = "Get a conversation",
    params(("id" = Uuid, Path, description = "The conversation's id.")),
    responses(
        (status = 200, description = "The conversation.", body = ConversationView),
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
) -> ApiResult<impl IntoResponse> {
    let c = conversations::get(&state.db, tenant.id, id)
        .await?
        .ok_or(ApiError::NotFound("no such conversation"))?;
    Ok(Json(ConversationView::from(c)))
}

/// `DELETE /v1/conversations/{id}` → 204; messages and jobs go with it.
#[utoipa::path(
    delete,
    path = "/v1/conversations/{id}",
    operation_id = "deleteConversation",
    tag = "conversations",
    summary = "Delete a conversation",
    description = "Its queued jobs are cancelled, running ones as soon as possible; its messages are gone and its jobs answer 404 from then on.",
    params(("id" = Uuid, Path, description = "The conversation's id.")),
    responses(
        (status = 204, description = "Deleted."),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 404, response = crate::openapi::NotFound),
        (status = 429, response = crate::openapi::RateLimited),
        (status = 503, response = crate::openapi::Unavailable),
    ),
    security(("api_key" = [])),
)]
pub async fn delete(
    State(state): State<AppState>,
    tenant: Tenant,
    IdPath(id): IdPath,
) -> ApiResult<impl IntoResponse> {
    crate::limits::check_rate(&state, &tenant).await?;
    // The cascade to the conversation's jobs and messages can deadlock with
    // a worker storing a job's answer at that moment: PostgreSQL aborts one
    // of the two, and the delete, run again, then goes through.
    let mut tries = 1;
    let deleted = loop {
        match conversations::delete(&state.db, tenant.id, id).await {
            Err(err) if is_transient(&err) && tries < MAX_DELETE_TRIES => {
                tracing::debug!(error = %err, "conversation delete aborted; trying again");
                tries += 1;
            }
            result => break result?,
        }
    };
    if deleted {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound("no such conversation"))
    }
}

/// Runs of a conversation delete that PostgreSQL aborted for a deadlock
/// before the api answers 503.
const MAX_DELETE_TRIES: u32 = 3;

/// `GET /v1/conversations/{id}/messages?limit=&after=`, oldest first.
#[utoipa::path(
    get,
    path = "/v1/conversations/{id}/messages",
    operation_id = "listMessages",
    tag = "conversations",
    summary = "List a conversation's messages",
    description = "Oldest first. A page may stop early when its content is large (`CHATQ_MAX_PAGE_BYTES`); `next_after` continues.",
    params(("id" = Uuid, Path, description = "The conversation's id."), PageQuery),
    responses(
        (status = 200, description = "A page of messages.", body = Page<MessageView>),
        (status = 400, response = crate::openapi::BadRequest),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 404, response = crate::openapi::NotFound),
        (status = 503, response = crate::openapi::Unavailable),
    ),
    security(("api_key" = [])),
)]
pub async fn messages(
    State(state): State<AppState>,
    tenant: Tenant,
    IdPath(id): IdPath,
    PageQuery { limit, after }: PageQuery,
) -> ApiResult<impl IntoResponse> {
    conversations::get(&state.db, tenant.id, id)
        .await?
        .ok_or(ApiError::NotFound("no such conversation"))?;
    let rows = messages::list(
        &state.db,
        tenant.id,
        id,
        after,
        limit + 1,
        max_page_bytes(&state),
    )
    .await?;
    Ok(Json(Page::from_rows(
        rows,
        limit,
        |m| m.id,
        MessageView::from,
    )))
}
