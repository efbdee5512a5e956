//! Authentication: API keys (hashed lookup) for `/v1`, the admin token for
//! `/admin/v1`. Neither is accepted in place of the other.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use secrecy::ExposeSecret;
use sha2::Digest;
use uuid::Uuid;

use crate::AppState;
use crate::error::ApiError;
use chatq_common::db::keys;

/// The tenant a request's API key belongs to.
#[derive(Debug, Clone, Copy)]
pub struct Tenant {
    /// Tenant id: every query is scoped by it.
    pub id: Uuid,
    /// The key used.
    pub key_id: Uuid,
    /// The key's submission limit per minute, if any.
    pub rate_limit_per_minute: Option<i32>,
}

fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

impl FromRequestParts<AppState> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts).ok_or(ApiError::Unauthorized)?;
        let key = keys::find_active(&state.db, &keys::hash_key(token))
            .await?
            .ok_or(ApiError::Unauthorized)?;
        Ok(Self {
            id: key.tenant_id,
            key_id: key.id,
            rate_limit_per_minute: key.rate_limit_per_minute,
        })
    }
}

/// Proof that the request carries the admin token.
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let expected = state
            .config
            .admin_token
            .as_ref()
            .ok_or(ApiError::Unauthorized)?;
        let given = bearer(parts).ok_or(ApiError::Unauthorized)?;
        // Compare digests so the comparison time does not depend on where they differ.
        let same = sha2::Sha256::digest(given.as_bytes())
            == sha2::Sha256::digest(expected.expose_secret().as_bytes());
        if same {
            Ok(Self)
        } else {
            Err(ApiError::Unauthorized)
        }
    }
}
