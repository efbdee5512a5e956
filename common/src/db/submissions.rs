//! Submitting a chat turn: the user message and its queued job (and, for a
//! one-shot chat, the conversation) stored by one statement, so a
//! submission costs one round trip and one commit.

use sqlx::PgExecutor;
use uuid::Uuid;

use crate::domain::{Conversation, Job, JobStatus, Priority, Role};

/// Stores one turn (creating its conversation if `turn.new_conversation` is
/// set) with its queued job, in one statement. The job's model defaults to
/// the conversation's when `turn.model` is empty; `idempotency` is the
/// client's key and request hash. `None` if the tenant has no such
/// conversation. Unlike [`submit_many`], constraints are not skipped: a
/// busy conversation violates `jobs_one_active_per_conversation`, a reused
/// key `jobs_tenant_idempotency_key`, so the caller learns exactly why.
pub async fn submit_one(
    db: impl PgExecutor<'_>,
    turn: &NewTurn,
    idempotency: Option<(&str, &[u8])>,
) -> sqlx::Result<Option<Job>> {
    let c = turn.new_conversation.as_ref();
    sqlx::query_as!(
        Job,
        r#"with new_conv as (
             insert into conversations (id, tenant_id, system_prompt, model, metadata)
             select $3, $2, $11, $12, $13 where $14
             returning id, model
         ), conv as (
             select id, model from new_conv
             union all
             select id, model from conversations where tenant_id = $2 and id = $3 and not $14
         ), job as (
             insert into jobs (id, tenant_id, conversation_id, model, max_tokens, temperature,
                               idempotency_key, request_hash, priority, sampling, cost,
                               trace_parent, key_id, key_cap)
             select $1, $2, conv.id, coalesce(nullif($4, ''), conv.model), $5, $6, $7, $8,
                    $15, $16, chatq_estimate_tokens(length($10), $5), $17, $18, $19
             from conv
             returning *
         ), msg as (
             insert into messages (id, tenant_id, conversation_id, role, content, job_id)
             select $9, $2, job.conversation_id, 'user', $10, job.id from job
         )
         select id, tenant_id, conversation_id, status as "status: JobStatus", model, max_tokens,
                temperature, attempts, claim_token, result_message_id, result_content,
                finish_reason, prompt_tokens, completion_tokens, error_code, error_message,
                attempt_errors, created_at, started_at, finished_at, partial_content,
                partial_attempt, sampling, priority as "priority: Priority", cost, start_tag,
                not_before, trace_parent
         from job"#,
        turn.job_id,
        turn.tenant_id,
        turn.conversation_id,
        turn.model,
        turn.max_tokens,
        turn.temperature,
        idempotency.map(|(key, _)| key),
        idempotency.map(|(_, hash)| hash),
        turn.message_id,
        turn.content,
        c.and_then(|c| c.system_prompt.as_deref()),
        c.map(|c| c.model.as_str()),
        c.map(|c| &c.metadata),
        c.is_some(),
        turn.priority as Priority,
        turn.sampling,
        turn.trace_parent,
        turn.key.map(|(id, _)| id),
        turn.key.and_then(|(_, cap)| cap),
    )
    .fetch_optional(db)
    .await
}

/// Stores earlier turns of a conversation being created (the OpenAI facade
/// receives the whole history in one request): the conversation and its
/// messages, in order. Call in the transaction that then submits the last
/// turn to it with [`submit_one`].
pub async fn insert_history(
    db: impl PgExecutor<'_>,
    conversation: &Conversation,
    messages: &[(Role, String)],
) -> sqlx::Result<()> {
    let ids: Vec<Uuid> = messages.iter().map(|_| crate::domain::new_id()).collect();
    let roles: Vec<Role> = messages.iter().map(|(r, _)| *r).collect();
    let contents: Vec<&str> = messages.iter().map(|(_, c)| c.as_str()).collect();
    sqlx::query!(
        "with conv as (
             insert into conversations (id, tenant_id, system_prompt, model, metadata)
             values ($1, $2, $3, $4, $5)
             returning id, tenant_id
         )
         insert into messages (id, tenant_id, conversation_id, role, content)
         select m.id, conv.tenant_id, conv.id, m.role, m.content
         from conv, unnest($6::uuid[], $7::text[], $8::text[]) with ordinality
             as m(id, role, content, n)
         order by m.n",
        conversation.id,
        conversation.tenant_id,
        conversation.system_prompt,
        conversation.model,
        conversation.metadata,
        &ids,
        roles as Vec<Role>,
        &contents as &[&str],
    )
    .execute(db)
    .await?;
    Ok(())
}

/// A turn to submit: for an existing conversation of the tenant, or for a
/// conversation created with it.
#[derive(Debug, Clone)]
pub struct NewTurn {
    /// Job id (uuid v7).
    pub job_id: Uuid,
    /// Owning tenant.
    pub tenant_id: Uuid,
    /// The conversation: existing, or `new_conversation.id`.
    pub conversation_id: Uuid,
    /// A conversation to create with the turn (`POST /v1/chat`).
    pub new_conversation: Option<Conversation>,
    /// Model override; empty means the conversation's.
    pub model: String,
    /// Completion token cap.
    pub max_tokens: Option<i32>,
    /// Sampling temperature.
    pub temperature: Option<f64>,
    /// The user message's id.
    pub message_id: Uuid,
    /// The user's text.
    pub content: String,
    /// Lane: `interactive` or `batch`.
    pub priority: Priority,
    /// Upstream sampling parameters forwarded unchanged (a JSON object).
    pub sampling: Option<serde_json::Value>,
    /// W3C `traceparent` of the submitting request.
    pub trace_parent: Option<String>,
    /// The API key it was submitted with, and that key's `max_concurrency`.
    pub key: Option<(Uuid, Option<i32>)>,
}

/// Stores many turns with one statement (one round trip, one commit) and
/// returns the jobs it stored. A turn whose conversation does not exist or
/// is busy is skipped, not an error: the caller retries it alone to learn
/// why. Callers should order turns by conversation id, so that concurrent
/// batches wait on each other in one order.
pub async fn submit_many(db: impl PgExecutor<'_>, turns: &[NewTurn]) -> sqlx::Result<Vec<Job>> {
    let n = turns.len();
    let mut job_ids = Vec::with_capacity(n);
    let mut tenant_ids = Vec::with_capacity(n);
    let mut conversation_ids = Vec::with_capacity(n);
    let mut is_new = Vec::with_capacity(n);
    let mut system_prompts = Vec::with_capacity(n);
    let mut conversation_models = Vec::with_capacity(n);
    let mut metadata = Vec::with_capacity(n);
    let mut models = Vec::with_capacity(n);
    let mut max_tokens = Vec::with_capacity(n);
    let mut temperatures = Vec::with_capacity(n);
    let mut message_ids = Vec::with_capacity(n);
    let mut contents = Vec::with_capacity(n);
    let mut priorities = Vec::with_capacity(n);
    let mut samplings = Vec::with_capacity(n);
    let mut trace_parents = Vec::with_capacity(n);
    let mut key_ids = Vec::with_capacity(n);
    let mut key_caps = Vec::with_capacity(n);
    for t in turns {
        job_ids.push(t.job_id);
        tenant_ids.push(t.tenant_id);
        conversation_ids.push(t.conversation_id);
        is_new.push(t.new_conversation.is_some());
        let c = t.new_conversation.as_ref();
        system_prompts.push(c.and_then(|c| c.system_prompt.clone()));
        conversation_models.push(c.map(|c| c.model.clone()));
        metadata.push(c.map(|c| c.metadata.clone()));
        models.push(t.model.as_str());
        max_tokens.push(t.max_tokens);
        temperatures.push(t.temperature);
        message_ids.push(t.message_id);
        contents.push(t.content.as_str());
        priorities.push(t.priority);
        samplings.push(t.sampling.clone());
        trace_parents.push(t.trace_parent.as_deref());
        key_ids.push(t.key.map(|(id, _)| id));
        key_caps.push(t.key.and_then(|(_, cap)| cap));
    }
    sqlx::query_as!(
        Job,
        r#"with input as (
             select * from unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::bool[], $5::text[],
                                  $6::text[], $7::jsonb[], $8::text[], $9::int4[], $10::float8[],
                                  $11::uuid[], $12::text[], $13::text[], $14::jsonb[],
                                  $15::text[], $16::uuid[], $17::int4[])
                 as t(job_id, tenant_id, conversation_id, is_new, system_prompt,
                      conversation_model, metadata, model, max_tokens, temperature,
                      message_id, content, priority, sampling, trace_parent, key_id, key_cap)
         ), new_conv as (
             insert into conversations (id, tenant_id, system_prompt, model, metadata)
             select conversation_id, tenant_id, system_prompt, conversation_model, metadata
             from input where is_new
             returning id, tenant_id, model
         ), conv as (
             select id, tenant_id, model from new_conv
             union all
             select c.id, c.tenant_id, c.model from conversations c
             where (c.tenant_id, c.id) in
                   (select tenant_id, conversation_id from input where not is_new)
         ), job as (
             insert into jobs (id, tenant_id, conversation_id, model, max_tokens, temperature,
                               priority, sampling, cost, trace_parent, key_id, key_cap)
             select i.job_id, i.tenant_id, i.conversation_id,
                    coalesce(nullif(i.model, ''), conv.model), i.max_tokens, i.temperature,
                    i.priority, i.sampling, chatq_estimate_tokens(length(i.content), i.max_tokens),
                    i.trace_parent, i.key_id, i.key_cap
             from input i
             join conv on conv.id = i.conversation_id and conv.tenant_id = i.tenant_id
             -- The start-tag trigger locks each tenant's lane: insert in
             -- lock order, so concurrent batches never wait crosswise.
             order by chatq_start_tag_lock_key(i.tenant_id,
                          case when i.priority = 'batch' then 1 else 0 end::smallint)
             on conflict do nothing
             returning *
         ), msg as (
             insert into messages (id, tenant_id, conversation_id, role, content, job_id)
             select i.message_id, i.tenant_id, i.conversation_id, 'user', i.content, i.job_id
             from input i join job on job.id = i.job_id
         )
         select id, tenant_id, conversation_id, status as "status: JobStatus", model, max_tokens,
                temperature, attempts, claim_token, result_message_id, result_content,
                finish_reason, prompt_tokens, completion_tokens, error_code, error_message,
                attempt_errors, created_at, started_at, finished_at, partial_content,
                partial_attempt, sampling, priority as "priority: Priority", cost, start_tag,
                not_before, trace_parent
         from job"#,
        &job_ids,
        &tenant_ids,
        &conversation_ids,
        &is_new,
        &system_prompts as &[Option<String>],
        &conversation_models as &[Option<String>],
        &metadata as &[Option<serde_json::Value>],
        &models as &[&str],
        &max_tokens as &[Option<i32>],
        &temperatures as &[Option<f64>],
        &message_ids,
        &contents as &[&str],
        priorities as Vec<Priority>,
        &samplings as &[Option<serde_json::Value>],
        &trace_parents as &[Option<&str>],
        &key_ids as &[Option<Uuid>],
        &key_caps as &[Option<i32>],
    )
    .fetch_all(db)
    .await
}
