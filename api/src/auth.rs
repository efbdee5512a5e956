//! Authentication: API keys (hashed lookup) for `/v1`, the admin token for
//! `/admin/v1`. Neither is accepted in place of the other.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

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
        let hash = keys::hash_key(token);
        let key = match state.keys.get(&hash) {
            Some(key) => key,
            None => {
                let key = keys::find_active(&state.db, &hash)
                    .await?
                    .ok_or(ApiError::Unauthorized)?;
                state.keys.put(hash, key.clone());
                key
            }
        };
        Ok(Self {
            id: key.tenant_id,
            key_id: key.id,
            rate_limit_per_minute: key.rate_limit_per_minute,
        })
    }
}

/// How long a key lookup is reused at most. Revocations evict at once (on
/// the revoking replica synchronously, on the others by `NOTIFY`); the
/// limit bounds staleness if a notification is ever missed.
const KEY_CACHE_TTL: Duration = Duration::from_secs(5);
/// Cached keys at most; the cache is emptied when it is full.
const KEY_CACHE_CAPACITY: usize = 10_000;

type CachedKeys = HashMap<[u8; 32], (keys::ActiveKey, Instant)>;

/// Recent successful key lookups by key hash, so a request costs no query
/// for authentication.
#[derive(Clone, Default)]
pub struct KeyCache {
    keys: Arc<Mutex<CachedKeys>>,
}

impl KeyCache {
    fn get(&self, hash: &[u8; 32]) -> Option<keys::ActiveKey> {
        let keys = self.lock();
        let (key, at) = keys.get(hash)?;
        (at.elapsed() < KEY_CACHE_TTL).then(|| key.clone())
    }

    fn put(&self, hash: [u8; 32], key: keys::ActiveKey) {
        let mut keys = self.lock();
        if keys.len() >= KEY_CACHE_CAPACITY {
            keys.clear();
        }
        keys.insert(hash, (key, Instant::now()));
    }

    /// Forgets every lookup: a key was revoked, or revocations may have been missed.
    pub fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> MutexGuard<'_, CachedKeys> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
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
