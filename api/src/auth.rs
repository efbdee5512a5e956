//! Authentication: API keys (hashed lookup) for `/v1`, the admin token for
//! `/admin/v1`. Neither is accepted in place of the other.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
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
    /// Jobs of this key running at once, if limited.
    pub max_concurrency: Option<i32>,
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
        let Some(token) = bearer(parts) else {
            state.keys.count_refusal();
            return Err(ApiError::Unauthorized);
        };
        let hash = keys::hash_key(token);
        let key = match state.keys.get(&hash) {
            Some(Lookup::Known(key)) => key,
            Some(Lookup::Unknown) => {
                state.keys.count_refusal();
                return Err(ApiError::Unauthorized);
            }
            None => match state.keys.look_up(&state.db, hash).await? {
                Some(key) => key,
                None => {
                    state.keys.count_refusal();
                    return Err(ApiError::Unauthorized);
                }
            },
        };
        Ok(Self {
            id: key.tenant_id,
            key_id: key.id,
            rate_limit_per_minute: key.rate_limit_per_minute,
            max_concurrency: key.max_concurrency,
        })
    }
}

/// How long a key lookup is reused at most. Revocations evict at once (on
/// the revoking replica synchronously, on the others by `NOTIFY`); the
/// limit bounds staleness if a notification is ever missed.
const KEY_CACHE_TTL: Duration = Duration::from_secs(5);
/// Cached keys at most; the cache is emptied when it is full.
const KEY_CACHE_CAPACITY: usize = 10_000;

/// How often refused credentials are summed up in the log.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// What a lookup of a key hash found.
#[derive(Debug, Clone)]
enum Lookup {
    /// An active key.
    Known(keys::ActiveKey),
    /// No active key has this hash: answered 401 without a query while
    /// cached (a flood of one bad key costs the database nothing). Keys are
    /// 256 random bits, so no key created later can have been looked up
    /// before it existed.
    Unknown,
}

type CachedKeys = HashMap<[u8; 32], (Lookup, Instant)>;

/// Recent key lookups by key hash, found or not, so a request costs no
/// query for authentication; and a tally of refused credentials.
#[derive(Clone, Default)]
pub struct KeyCache {
    keys: Arc<Mutex<CachedKeys>>,
    refusals: Arc<Mutex<RefusalTally>>,
    /// Held while a key is looked up in PostgreSQL, so a burst of requests
    /// with a key not cached yet costs one query, not one per request.
    looking_up: Arc<tokio::sync::Mutex<()>>,
}

/// Refused credentials since the last log line.
#[derive(Default)]
struct RefusalTally {
    count: u64,
    since: Option<Instant>,
}

impl KeyCache {
    /// Looks the key up in PostgreSQL (and caches what it found), unless a
    /// concurrent lookup just did.
    async fn look_up(
        &self,
        db: &sqlx::PgPool,
        hash: [u8; 32],
    ) -> sqlx::Result<Option<keys::ActiveKey>> {
        let _one_at_a_time = self.looking_up.lock().await;
        match self.get(&hash) {
            Some(Lookup::Known(key)) => Ok(Some(key)),
            Some(Lookup::Unknown) => Ok(None),
            None => {
                let found = keys::find_active(db, &hash).await?;
                let lookup = found.clone().map_or(Lookup::Unknown, Lookup::Known);
                self.put(hash, lookup);
                Ok(found)
            }
        }
    }

    fn get(&self, hash: &[u8; 32]) -> Option<Lookup> {
        let keys = self.lock();
        let (key, at) = keys.get(hash)?;
        (at.elapsed() < KEY_CACHE_TTL).then(|| key.clone())
    }

    /// Counts a 401; the audit log gets one line per [`REFUSAL_LOG_EVERY`]
    /// with the count, not one per request (never the key itself).
    fn count_refusal(&self) {
        let mut tally = chatq_common::sync::lock(&self.refusals);
        tally.count += 1;
        let since = *tally.since.get_or_insert_with(Instant::now);
        if tally.count == 1 {
            tracing::info!("request refused: missing, unknown or revoked api key");
        } else if since.elapsed() >= REFUSAL_LOG_EVERY {
            tracing::info!(
                refused = tally.count,
                over_secs = since.elapsed().as_secs(),
                "requests refused with missing, unknown or revoked api keys"
            );
            *tally = RefusalTally::default();
        }
    }

    fn put(&self, hash: [u8; 32], key: Lookup) {
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
        chatq_common::sync::lock(&self.keys)
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
