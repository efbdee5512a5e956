//! Tenants and their API keys. Keys are stored as a sha256 hash only.

use sqlx::PgExecutor;
use uuid::Uuid;

/// The LISTEN/NOTIFY channel on which key revocations are announced, with
/// the key id as payload.
pub const KEY_CHANNEL: &str = "chatq_key";

/// An API key that may be used right now.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ActiveKey {
    /// Key id.
    pub id: Uuid,
    /// The tenant it belongs to.
    pub tenant_id: Uuid,
    /// Submissions allowed per minute, if limited.
    pub rate_limit_per_minute: Option<i32>,
    /// Jobs of this key running at once, if limited.
    pub max_concurrency: Option<i32>,
}

/// Returns the id of the tenant called `name`, creating it if needed.
pub async fn upsert_tenant(db: impl PgExecutor<'_>, id: Uuid, name: &str) -> sqlx::Result<Uuid> {
    sqlx::query_scalar!(
        "insert into tenants (id, name) values ($1, $2)
         on conflict (name) do update set updated_at = tenants.updated_at
         returning id",
        id,
        name,
    )
    .fetch_one(db)
    .await
}

/// The limits an operator set on a key.
#[derive(Debug, Clone, Copy, Default)]
pub struct KeyLimits {
    /// Write requests allowed per minute, if limited.
    pub rate_limit_per_minute: Option<i32>,
    /// Jobs of this key running at once, if limited.
    pub max_concurrency: Option<i32>,
}

/// Stores a new key by its hash.
pub async fn insert_key(
    db: impl PgExecutor<'_>,
    id: Uuid,
    tenant_id: Uuid,
    key_hash: &[u8],
    limits: KeyLimits,
) -> sqlx::Result<()> {
    sqlx::query!(
        "insert into api_keys (id, tenant_id, key_hash, rate_limit_per_minute, max_concurrency)
         values ($1, $2, $3, $4, $5)",
        id,
        tenant_id,
        key_hash,
        limits.rate_limit_per_minute,
        limits.max_concurrency,
    )
    .execute(db)
    .await?;
    Ok(())
}

/// The unrevoked key with this hash, if any.
pub async fn find_active(
    db: impl PgExecutor<'_>,
    key_hash: &[u8],
) -> sqlx::Result<Option<ActiveKey>> {
    sqlx::query_as!(
        ActiveKey,
        "select id, tenant_id, rate_limit_per_minute, max_concurrency from api_keys
         where key_hash = $1 and revoked_at is null",
        key_hash,
    )
    .fetch_optional(db)
    .await
}

/// Revokes a key and announces it on [`KEY_CHANNEL`] so api replicas drop
/// cached lookups; false if there is no such unrevoked key.
pub async fn revoke(db: impl PgExecutor<'_>, id: Uuid) -> sqlx::Result<bool> {
    let announced = sqlx::query!(
        "with revoked as (
             update api_keys set revoked_at = now(), updated_at = now()
             where id = $1 and revoked_at is null
             returning id
         )
         select pg_notify($2, id::text) from revoked",
        id,
        KEY_CHANNEL,
    )
    .fetch_all(db)
    .await?;
    Ok(announced.len() == 1)
}

/// A new random API key: `cq_` and 64 hex characters (256 bits).
pub fn generate_key() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("cq_{}", hex::encode(bytes))
}

/// The stored form of a key: its sha256. Keys carry 256 random bits, so a
/// fast unsalted hash is enough to make a leaked table useless.
pub fn hash_key(key: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(key.as_bytes()).into()
}
