//! Conversations and their messages.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde::Deserialize;

use chatq_common::db::{conversations, messages};
use chatq_common::domain::{Conversation, new_id};

use crate::AppState;
use crate::auth::Tenant;
use crate::error::{ApiError, ApiResult};
use crate::extract::{IdPath, OptionalJsonBody, QueryParams};
use crate::validate::{json_without_nul, no_nul};
use crate::views::{ConversationView, MessageView, Page};

/// Longest accepted model name.
pub const MAX_MODEL_CHARS: usize = 200;

/// Body of `POST /v1/conversations`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateConversation {
    system_prompt: Option<String>,
    model: Option<String>,
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
pub async fn list(
    State(state): State<AppState>,
    tenant: Tenant,
    q: QueryParams,
) -> ApiResult<impl IntoResponse> {
    let (limit, after) = q.page()?;
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
pub async fn delete(
    State(state): State<AppState>,
    tenant: Tenant,
    IdPath(id): IdPath,
) -> ApiResult<impl IntoResponse> {
    crate::limits::check_rate(&state, &tenant).await?;
    if conversations::delete(&state.db, tenant.id, id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound("no such conversation"))
    }
}

/// `GET /v1/conversations/{id}/messages?limit=&after=`, oldest first.
pub async fn messages(
    State(state): State<AppState>,
    tenant: Tenant,
    IdPath(id): IdPath,
    q: QueryParams,
) -> ApiResult<impl IntoResponse> {
    let (limit, after) = q.page()?;
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
