//! Messages of a conversation, read back in commit (seq) order.

use sqlx::PgExecutor;
use uuid::Uuid;

use crate::domain::{Message, Role};

/// A message to store.
#[derive(Debug, Clone)]
pub struct NewMessage<'a> {
    /// Message id (uuid v7).
    pub id: Uuid,
    /// Owning tenant.
    pub tenant_id: Uuid,
    /// Conversation it belongs to.
    pub conversation_id: Uuid,
    /// Author.
    pub role: Role,
    /// Text.
    pub content: &'a str,
    /// The job it started or answered.
    pub job_id: Option<Uuid>,
}

/// Stores a message.
pub async fn insert(db: impl PgExecutor<'_>, m: &NewMessage<'_>) -> sqlx::Result<()> {
    sqlx::query(
        "insert into messages (id, tenant_id, conversation_id, role, content, job_id)
         values ($1, $2, $3, $4, $5, $6)",
    )
    .bind(m.id)
    .bind(m.tenant_id)
    .bind(m.conversation_id)
    .bind(m.role)
    .bind(m.content)
    .bind(m.job_id)
    .execute(db)
    .await?;
    Ok(())
}

/// Up to `limit` messages of the tenant's conversation, oldest first, after
/// the message `after` when given (an unknown `after` yields nothing).
pub async fn list(
    db: impl PgExecutor<'_>,
    tenant_id: Uuid,
    conversation_id: Uuid,
    after: Option<Uuid>,
    limit: i64,
) -> sqlx::Result<Vec<Message>> {
    sqlx::query_as(
        "select id, role, content, job_id, created_at from messages
         where tenant_id = $1 and conversation_id = $2
           and ($3::uuid is null
                or seq > (select seq from messages where id = $3 and conversation_id = $2))
         order by seq limit $4",
    )
    .bind(tenant_id)
    .bind(conversation_id)
    .bind(after)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// The whole conversation in order, for building a prompt. The worker
/// trims it to its history budget.
pub async fn history(
    db: impl PgExecutor<'_>,
    tenant_id: Uuid,
    conversation_id: Uuid,
) -> sqlx::Result<Vec<Message>> {
    sqlx::query_as(
        "select id, role, content, job_id, created_at from messages
         where tenant_id = $1 and conversation_id = $2 order by seq",
    )
    .bind(tenant_id)
    .bind(conversation_id)
    .fetch_all(db)
    .await
}
