//! Messages of a conversation, read back in commit (seq) order.

use std::collections::HashMap;

use sqlx::PgExecutor;
use uuid::Uuid;

use crate::domain::{Message, Role};

/// Up to `limit` messages of the tenant's conversation, oldest first, after
/// the message `after` when given (an unknown `after` yields nothing), and
/// no more than `max_bytes` of content (the first message always comes).
/// The cut is made in PostgreSQL, so big pages are never loaded here.
pub async fn list(
    db: impl PgExecutor<'_>,
    tenant_id: Uuid,
    conversation_id: Uuid,
    after: Option<Uuid>,
    limit: i64,
    max_bytes: i64,
) -> sqlx::Result<super::Cut<Message>> {
    let rows = sqlx::query!(
        r#"with page as (
             select id, seq, role, content, job_id, created_at,
                    sum(octet_length(content)) over (order by seq) - octet_length(content)
                        as bytes_before
             from messages
             where tenant_id = $1 and conversation_id = $2
               and ($3::uuid is null
                    or seq > (select seq from messages where id = $3 and conversation_id = $2))
             order by seq limit $4
         )
         select id, role as "role: Role", content, job_id, created_at,
                (select count(*) from page) as "fetched!"
         from page where bytes_before < $5 order by seq"#,
        tenant_id,
        conversation_id,
        after,
        limit,
        max_bytes,
    )
    .fetch_all(db)
    .await?;
    Ok(super::Cut::from_rows(rows.into_iter().map(|r| {
        let m = Message {
            id: r.id,
            role: r.role,
            content: r.content,
            job_id: r.job_id,
            created_at: r.created_at,
        };
        (m, r.fetched)
    })))
}

/// What a prompt is built from: the conversation's system prompt and its
/// whole history in order (the worker trims it to its budget), read in one
/// query. `None` if the conversation is gone.
pub async fn prompt_source(
    db: impl PgExecutor<'_>,
    tenant_id: Uuid,
    conversation_id: Uuid,
) -> sqlx::Result<Option<PromptSource>> {
    let mut sources = prompt_sources(db, &[(tenant_id, conversation_id)]).await?;
    Ok(sources.remove(&conversation_id))
}

/// A conversation's system prompt and history, as [`prompt_source`] reads it.
pub type PromptSource = (Option<String>, Vec<Message>);

/// [`prompt_source`] for many `(tenant id, conversation id)` pairs in one
/// query, by conversation id; conversations that are gone are absent.
pub async fn prompt_sources(
    db: impl PgExecutor<'_>,
    conversations: &[(Uuid, Uuid)],
) -> sqlx::Result<HashMap<Uuid, PromptSource>> {
    struct Row {
        conversation_id: Uuid,
        system_prompt: Option<String>,
        id: Option<Uuid>,
        role: Option<Role>,
        content: Option<String>,
        job_id: Option<Uuid>,
        created_at: Option<chrono::DateTime<chrono::Utc>>,
    }
    let (tenants, ids): (Vec<Uuid>, Vec<Uuid>) = conversations.iter().copied().unzip();
    // The message columns are null for a conversation without messages
    // (left join).
    let rows = sqlx::query_as!(
        Row,
        r#"select c.id as conversation_id, c.system_prompt,
                  m.id as "id?", m.role as "role?: Role", m.content as "content?",
                  m.job_id, m.created_at as "created_at?"
           from conversations c left join messages m on m.conversation_id = c.id
           where (c.tenant_id, c.id) in (select * from unnest($1::uuid[], $2::uuid[]))
           order by c.id, m.seq"#,
        &tenants,
        &ids,
    )
    .fetch_all(db)
    .await?;
    let mut sources: HashMap<Uuid, PromptSource> = HashMap::new();
    for r in rows {
        let (_, history) = sources
            .entry(r.conversation_id)
            .or_insert_with(|| (r.system_prompt.clone(), Vec::new()));
        if let (Some(id), Some(role), Some(content), Some(created_at)) =
            (r.id, r.role, r.content, r.created_at)
        {
            history.push(Message {
                id,
                role,
                content,
                job_id: r.job_id,
                created_at,
            });
        }
    }
    Ok(sources)
}
