//! Conversations, scoped by tenant.

use sqlx::PgExecutor;
use uuid::Uuid;

use crate::domain::Conversation;

/// Stores a new conversation.
pub async fn insert(db: impl PgExecutor<'_>, c: &Conversation) -> sqlx::Result<Conversation> {
    sqlx::query_as!(
        Conversation,
        "insert into conversations (id, tenant_id, system_prompt, model, metadata)
         values ($1, $2, $3, $4, $5)
         returning id, tenant_id, system_prompt, model, metadata, created_at",
        c.id,
        c.tenant_id,
        c.system_prompt,
        c.model,
        c.metadata,
    )
    .fetch_one(db)
    .await
}

/// The tenant's conversation with this id.
pub async fn get(
    db: impl PgExecutor<'_>,
    tenant_id: Uuid,
    id: Uuid,
) -> sqlx::Result<Option<Conversation>> {
    sqlx::query_as!(
        Conversation,
        "select id, tenant_id, system_prompt, model, metadata, created_at
         from conversations where tenant_id = $1 and id = $2",
        tenant_id,
        id,
    )
    .fetch_optional(db)
    .await
}

/// Up to `limit` of the tenant's conversations, newest first, older than
/// `after` when given (keyset pagination on the time-ordered id), and no
/// more than about `max_bytes` of system prompts and metadata (the first
/// conversation always comes). The cut is made in PostgreSQL.
pub async fn list(
    db: impl PgExecutor<'_>,
    tenant_id: Uuid,
    after: Option<Uuid>,
    limit: i64,
    max_bytes: i64,
) -> sqlx::Result<super::Cut<Conversation>> {
    let rows = sqlx::query!(
        r#"with page as (
             select id, tenant_id, system_prompt, model, metadata, created_at,
                    octet_length(coalesce(system_prompt, '')) + octet_length(metadata::text)
                        + octet_length(model) as bytes
             from conversations
             where tenant_id = $1 and ($2::uuid is null or id < $2)
             order by id desc limit $3
         ), sized as (
             select *, sum(bytes) over (order by id desc) - bytes as bytes_before from page
         )
         select id, tenant_id, system_prompt, model, metadata, created_at,
                (select count(*) from page) as "fetched!"
         from sized where bytes_before < $4 order by id desc"#,
        tenant_id,
        after,
        limit,
        max_bytes,
    )
    .fetch_all(db)
    .await?;
    Ok(super::Cut::from_rows(rows.into_iter().map(|r| {
        let c = Conversation {
            id: r.id,
            tenant_id: r.tenant_id,
            system_prompt: r.system_prompt,
            model: r.model,
            metadata: r.metadata,
            created_at: r.created_at,
        };
        (c, r.fetched)
    })))
}

/// Deletes the conversation with its messages and jobs (cascade), first
/// announcing its active jobs (on [`super::JOB_CHANNEL`] and
/// [`super::CANCEL_CHANNEL`]) so waiting clients re-read them. False if the
/// tenant has no such conversation.
pub async fn delete(db: impl PgExecutor<'_>, tenant_id: Uuid, id: Uuid) -> sqlx::Result<bool> {
    // `a` is selected so that the `announced` CTE runs.
    let done = sqlx::query!(
        r#"with gone as (
             delete from conversations where tenant_id = $1 and id = $2 returning id
         ), announced as (
             select pg_notify($3, j.id::text), pg_notify($4, j.id::text)
             from jobs j
             where j.conversation_id in (select id from gone)
               and j.status in ('queued', 'running')
         )
         select (select count(*) from gone) as "n!", (select count(*) from announced) as "a!""#,
        tenant_id,
        id,
        super::JOB_CHANNEL,
        super::CANCEL_CHANNEL,
    )
    .fetch_one(db)
    .await?;
    Ok(done.n == 1)
}
