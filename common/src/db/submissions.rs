//! Submitting a chat turn: the user message and its queued job (and, for a
//! one-shot chat, the conversation) stored by one statement, so a
//! submission costs one round trip and one commit.

use sqlx::PgExecutor;
use uuid::Uuid;

use crate::db::jobs::NewJob;
use crate::domain::{Conversation, Job};

/// The user message that starts a job.
#[derive(Debug, Clone, Copy)]
pub struct UserTurn<'a> {
    /// Message id (uuid v7).
    pub message_id: Uuid,
    /// The user's text.
    pub content: &'a str,
}

/// Stores the turn in the tenant's existing conversation `job.conversation_id`.
/// The job's model defaults to the conversation's when `job.model` is empty.
/// `None` if the tenant has no such conversation. Violates
/// `jobs_one_active_per_conversation` when it is busy.
pub async fn submit_to_conversation(
    db: impl PgExecutor<'_>,
    job: &NewJob<'_>,
    turn: UserTurn<'_>,
) -> sqlx::Result<Option<Job>> {
    sqlx::query_as(
        "with conv as (
             select id, model from conversations where tenant_id = $2 and id = $3
         ), job as (
             insert into jobs (id, tenant_id, conversation_id, model, max_tokens, temperature,
                               idempotency_key, request_hash)
             select $1, $2, conv.id, coalesce(nullif($4, ''), conv.model), $5, $6, $7, $8 from conv
             returning *
         ), msg as (
             insert into messages (id, tenant_id, conversation_id, role, content, job_id)
             select $9, $2, job.conversation_id, 'user', $10, job.id from job
         )
         select * from job",
    )
    .bind(job.id)
    .bind(job.tenant_id)
    .bind(job.conversation_id)
    .bind(job.model)
    .bind(job.max_tokens)
    .bind(job.temperature)
    .bind(job.idempotency_key)
    .bind(job.request_hash)
    .bind(turn.message_id)
    .bind(turn.content)
    .fetch_optional(db)
    .await
}

/// Stores a new conversation `c` with the turn and its job (`POST /v1/chat`).
pub async fn submit_with_new_conversation(
    db: impl PgExecutor<'_>,
    c: &Conversation,
    job: &NewJob<'_>,
    turn: UserTurn<'_>,
) -> sqlx::Result<Job> {
    sqlx::query_as(
        "with conv as (
             insert into conversations (id, tenant_id, system_prompt, model, metadata)
             values ($3, $2, $11, $12, $13)
             returning id, model
         ), job as (
             insert into jobs (id, tenant_id, conversation_id, model, max_tokens, temperature,
                               idempotency_key, request_hash)
             select $1, $2, conv.id, coalesce(nullif($4, ''), conv.model), $5, $6, $7, $8 from conv
             returning *
         ), msg as (
             insert into messages (id, tenant_id, conversation_id, role, content, job_id)
             select $9, $2, job.conversation_id, 'user', $10, job.id from job
         )
         select * from job",
    )
    .bind(job.id)
    .bind(job.tenant_id)
    .bind(c.id)
    .bind(job.model)
    .bind(job.max_tokens)
    .bind(job.temperature)
    .bind(job.idempotency_key)
    .bind(job.request_hash)
    .bind(turn.message_id)
    .bind(turn.content)
    .bind(&c.system_prompt)
    .bind(&c.model)
    .bind(&c.metadata)
    .fetch_one(db)
    .await
}
