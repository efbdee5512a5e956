//! Jobs: submission, claiming, completion, cancellation and recovery. Every
//! state change is a guarded transition, so a repeated or late call is a
//! harmless no-op, and announces itself on [`super::JOB_CHANNEL`].

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

use crate::domain::{Job, JobStatus, Priority, StartKey};

/// The tenant's job with this id.
pub async fn get(db: impl PgExecutor<'_>, tenant_id: Uuid, id: Uuid) -> sqlx::Result<Option<Job>> {
    sqlx::query_as!(
        Job,
        r#"select id, tenant_id, conversation_id, status as "status: JobStatus", model,
                max_tokens, temperature, attempts, claim_token, result_message_id,
                result_content, finish_reason, prompt_tokens, completion_tokens,
                error_code, error_message, attempt_errors, created_at, started_at,
                finished_at, partial_content, partial_attempt, sampling,
                priority as "priority: Priority", cost, start_tag, not_before,
                trace_parent
           from jobs where tenant_id = $1 and id = $2"#,
        tenant_id,
        id,
    )
    .fetch_optional(db)
    .await
}

/// The job with this id, whoever owns it (for the worker, which only knows
/// the id from the queue message).
pub async fn get_any(db: impl PgExecutor<'_>, id: Uuid) -> sqlx::Result<Option<Job>> {
    sqlx::query_as!(
        Job,
        r#"select id, tenant_id, conversation_id, status as "status: JobStatus", model,
                max_tokens, temperature, attempts, claim_token, result_message_id,
                result_content, finish_reason, prompt_tokens, completion_tokens,
                error_code, error_message, attempt_errors, created_at, started_at,
                finished_at, partial_content, partial_attempt, sampling,
                priority as "priority: Priority", cost, start_tag, not_before,
                trace_parent
           from jobs where id = $1"#,
        id,
    )
    .fetch_optional(db)
    .await
}

/// The tenant's job submitted with this idempotency key, with the hash of
/// the request that created it.
pub async fn find_by_idempotency_key(
    db: impl PgExecutor<'_>,
    tenant_id: Uuid,
    key: &str,
) -> sqlx::Result<Option<(Job, Option<Vec<u8>>)>> {
    let row = sqlx::query!(
        r#"select id, tenant_id, conversation_id, status as "status: JobStatus", model,
                max_tokens, temperature, attempts, claim_token, result_message_id,
                result_content, finish_reason, prompt_tokens, completion_tokens,
                error_code, error_message, attempt_errors, created_at, started_at,
                finished_at, partial_content, partial_attempt, sampling,
                priority as "priority: Priority", cost, start_tag, not_before,
                trace_parent, request_hash
           from jobs where tenant_id = $1 and idempotency_key = $2"#,
        tenant_id,
        key,
    )
    .fetch_optional(db)
    .await?;
    Ok(row.map(|r| {
        let job = Job {
            id: r.id,
            tenant_id: r.tenant_id,
            conversation_id: r.conversation_id,
            status: r.status,
            model: r.model,
            max_tokens: r.max_tokens,
            temperature: r.temperature,
            attempts: r.attempts,
            claim_token: r.claim_token,
            result_message_id: r.result_message_id,
            result_content: r.result_content,
            finish_reason: r.finish_reason,
            prompt_tokens: r.prompt_tokens,
            completion_tokens: r.completion_tokens,
            error_code: r.error_code,
            error_message: r.error_message,
            attempt_errors: r.attempt_errors,
            created_at: r.created_at,
            started_at: r.started_at,
            finished_at: r.finished_at,
            partial_content: r.partial_content,
            partial_attempt: r.partial_attempt,
            sampling: r.sampling,
            priority: r.priority,
            cost: r.cost,
            start_tag: r.start_tag,
            not_before: r.not_before,
            trace_parent: r.trace_parent,
        };
        (job, r.request_hash)
    }))
}

/// Records that the broker confirmed a publish of the job.
pub async fn mark_published(db: impl PgExecutor<'_>, id: Uuid) -> sqlx::Result<()> {
    sqlx::query!(
        "update jobs set published_at = now() where id = $1 and published_at is null",
        id
    )
    .execute(db)
    .await?;
    Ok(())
}

/// Records confirmed publishes of many jobs at once.
pub async fn mark_published_many(db: impl PgExecutor<'_>, ids: &[Uuid]) -> sqlx::Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    // Only queued jobs: a claimed job is out of the relay's sight already, so
    // recording its publish would be a write for nothing.
    sqlx::query!(
        "update jobs set published_at = now()
         where id = any($1) and status = 'queued' and published_at is null",
        ids,
    )
    .execute(db)
    .await?;
    Ok(())
}

/// Removes a job the broker refused (queue full) together with its user
/// message, as if it had never been submitted. Only an unpublished queued
/// job can be withdrawn; false if it was not.
pub async fn withdraw(db: impl PgExecutor<'_>, id: Uuid) -> sqlx::Result<bool> {
    let gone: i64 = sqlx::query_scalar!(
        r#"with gone as (
             delete from jobs where id = $1 and status = 'queued' and published_at is null
             returning id, conversation_id
         ), messages_gone as (
             -- By conversation first: messages are indexed by conversation, not by job.
             delete from messages m using gone
             where m.conversation_id = gone.conversation_id and m.job_id = gone.id
               and m.role = 'user'
             returning m.id
         )
         select count(*) as "count!" from gone"#,
        id,
    )
    .fetch_one(db)
    .await?;
    Ok(gone == 1)
}

/// Cancels the tenant's job if it is queued or running; `None` if it was
/// not (missing or already terminal).
pub async fn cancel(
    db: impl PgExecutor<'_>,
    tenant_id: Uuid,
    id: Uuid,
) -> sqlx::Result<Option<Job>> {
    // The notifications are columns of the update's RETURNING (evaluated
    // once per cancelled row); the outer select keeps the job's columns.
    sqlx::query_as!(
        Job,
        r#"with done as (
             update jobs set status = 'cancelled', finished_at = now(), updated_at = now(),
                             claim_token = null, lease_expires_at = null,
                             partial_content = null, partial_attempt = null
             where tenant_id = $1 and id = $2 and status in ('queued', 'running')
             returning *, pg_notify($3, id::text)::text as notified,
                       pg_notify($4, id::text)::text as cancelled
         )
         select id, tenant_id, conversation_id, status as "status: JobStatus", model,
                max_tokens, temperature, attempts, claim_token, result_message_id,
                result_content, finish_reason, prompt_tokens, completion_tokens,
                error_code, error_message, attempt_errors, created_at, started_at,
                finished_at, partial_content, partial_attempt, sampling,
                priority as "priority: Priority", cost, start_tag, not_before,
                trace_parent
         from done"#,
        tenant_id,
        id,
        super::JOB_CHANNEL,
        super::CANCEL_CHANNEL,
    )
    .fetch_optional(db)
    .await
}

/// Claims the next job in start order for one attempt: `running`, one more
/// attempt, owned by `token` until `lease` passes without a heartbeat.
///
/// A queue message is a token of work, not an order: every queued job has
/// one message, and whichever job is first in the start order (lanes, then
/// fair queueing between tenants, see migration `flow_control`) is the one
/// a message starts. `hint` is the job the message was published for; a
/// message whose hint names no job at all (poison) claims nothing. `None`
/// when nothing startable is queued (claimed meanwhile, retries waiting out
/// their delay) and while an operator has paused consumption. `model`
/// restricts the claim to one model's jobs (the shared LLM budget is per
/// model). A claimed job is never claimed again until it is given back.
pub async fn claim(
    db: impl PgExecutor<'_>,
    hint: Uuid,
    token: Uuid,
    model: Option<&str>,
    lease: Duration,
) -> sqlx::Result<Option<Job>> {
    Ok(claim_many(db, &[(hint, token)], model, lease).await?.pop())
}

/// [`claim`] for many messages in one statement: `(hint, claim token)`
/// pairs. Returns the jobs claimed, each under one of the tokens (its
/// `claim_token`); tokens beyond the startable jobs claim nothing. One
/// statement in ten serves the batch lane first (its starvation bound).
pub async fn claim_many(
    db: impl PgExecutor<'_>,
    claims: &[(Uuid, Uuid)],
    model: Option<&str>,
    lease: Duration,
) -> sqlx::Result<Vec<Job>> {
    let (hints, tokens): (Vec<Uuid>, Vec<Uuid>) = claims.iter().copied().unzip();
    sqlx::query_as!(
        Job,
        r#"with takers as (
             select h.token, row_number() over (order by h.n) as ord
             from unnest($1::uuid[], $2::uuid[]) with ordinality as h(hint, token, n)
             where exists (select 1 from jobs k where k.id = h.hint)
         ), picked as (
             select p.id, p.ord
             from chatq_pick(
                 -- An operator's pause holds from the moment it is committed.
                 (select count(*) from takers
                   where not exists (select 1 from queue_controls where paused))::integer,
                 nextval('chatq_lane_turn') % 10 = 0, $4) as p
         ), claimed as (
             update jobs j set status = 'running', attempts = j.attempts + 1,
                               claim_token = t.token,
                               lease_expires_at = now() + make_interval(secs => $3),
                               started_at = coalesce(j.started_at, now()), updated_at = now(),
                               not_before = null
             from picked p join takers t on t.ord = p.ord
             where j.id = p.id and j.status = 'queued'
             returning j.*, pg_notify($5, j.id::text)::text as notified,
                       nextval('chatq_jobs_started') as started_seq
         )
         select id, tenant_id, conversation_id, status as "status: JobStatus", model,
                max_tokens, temperature, attempts, claim_token, result_message_id,
                result_content, finish_reason, prompt_tokens, completion_tokens,
                error_code, error_message, attempt_errors, created_at, started_at,
                finished_at, partial_content, partial_attempt, sampling,
                priority as "priority: Priority", cost, start_tag, not_before,
                trace_parent
         from claimed"#,
        &hints,
        &tokens,
        lease.as_secs_f64(),
        model,
        super::JOB_CHANNEL,
    )
    .fetch_all(db)
    .await
}

/// The first startable queued job in start order, without claiming it: its
/// model and estimated tokens (what to reserve from the LLM budget before
/// claiming). `None` if nothing is startable.
pub async fn peek_next(db: impl PgExecutor<'_>) -> sqlx::Result<Option<(String, i32)>> {
    let next = sqlx::query!(
        "select model, cost from jobs
         where status = 'queued' and not parked and (not_before is null or not_before <= now())
         order by lane, start_tag, id
         limit 1",
    )
    .fetch_optional(db)
    .await?;
    Ok(next.map(|r| (r.model, r.cost)))
}

/// The start order of the queue as one reading: the first `head` keys
/// exactly and every `sample`th key beyond, each with its rank (1 = next
/// to start); the number of queued jobs; and how many jobs have started
/// since the database was created (the `chatq_jobs_started` counter).
pub async fn start_order_sample(
    db: impl PgExecutor<'_>,
    head: i64,
    sample: i64,
) -> sqlx::Result<(Vec<(StartKey, i64)>, i64, i64)> {
    // `o` is the null side of the left join; the counts are always there.
    let rows = sqlx::query!(
        r#"with ordered as (
             select lane = 1 as batch, start_tag, id,
                    row_number() over (order by lane, start_tag, id) as rank
             from jobs where status = 'queued' and not parked
         ), counts as (
             select (select count(*) from jobs where status = 'queued') as total,
                    (select last_value from chatq_jobs_started) as started
         )
         select o.batch as "batch?", o.start_tag as "start_tag?", o.id as "id?",
                o.rank as "rank?", c.total as "total!", c.started as "started!"
         from counts c left join ordered o on o.rank <= $1 or o.rank % $2 = 0
         order by o.rank"#,
        head,
        sample.max(1),
    )
    .fetch_all(db)
    .await?;
    let (total, started) = rows.first().map_or((0, 0), |r| (r.total, r.started));
    // An empty queue is one row of counts with no key.
    let keys = rows
        .into_iter()
        .filter_map(|r| {
            Some((
                StartKey {
                    batch: r.batch?,
                    tag: r.start_tag?,
                    id: r.id?,
                },
                r.rank?,
            ))
        })
        .collect();
    Ok((keys, total, started))
}

/// Whether a queued job could start now (locked or not): a claim that
/// found nothing while this holds skipped rows another transaction had
/// locked, and must try again rather than drop its message.
pub async fn has_startable(db: impl PgExecutor<'_>) -> sqlx::Result<bool> {
    sqlx::query_scalar!(
        r#"select exists (select 1 from jobs
                          where status = 'queued' and not parked
                            and (not_before is null or not_before <= now())) as "exists!""#,
    )
    .fetch_one(db)
    .await
}

/// Whether queued jobs wait for a slot of their key (its `max_concurrency`
/// reached): they start when a job of that key stops running, announced
/// on [`super::KEY_SLOT_CHANNEL`], so a message must wait for them, not drop.
pub async fn has_parked(db: impl PgExecutor<'_>) -> sqlx::Result<bool> {
    sqlx::query_scalar!(
        r#"select exists (select 1 from jobs where status = 'queued' and parked) as "exists!""#
    )
    .fetch_one(db)
    .await
}

/// Lets parked jobs of keys with free slots start (the backstop of the
/// wake-up a finishing job gives, which a concurrent claim can miss); how
/// many.
pub async fn unpark_free_slots(db: impl PgExecutor<'_>) -> sqlx::Result<i32> {
    // The function always returns a count.
    sqlx::query_scalar!(r#"select chatq_unpark_free_slots() as "unparked!""#)
        .fetch_one(db)
        .await
}

/// When the first queued retry that is still waiting out its delay may
/// start, if any.
pub async fn next_not_before(db: impl PgExecutor<'_>) -> sqlx::Result<Option<DateTime<Utc>>> {
    sqlx::query_scalar!(
        r#"select min(not_before) as "min?" from jobs
           where status = 'queued' and not_before > now()"#,
    )
    .fetch_one(db)
    .await
}

/// Extends the lease of a claim; false if the claim is no longer held
/// (cancelled, deleted, or reclaimed after it lapsed).
pub async fn heartbeat(
    db: impl PgExecutor<'_>,
    id: Uuid,
    token: Uuid,
    lease: Duration,
) -> sqlx::Result<bool> {
    let done = sqlx::query!(
        "update jobs set lease_expires_at = now() + make_interval(secs => $3)
         where id = $1 and claim_token = $2 and status = 'running'",
        id,
        token,
        lease.as_secs_f64(),
    )
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Marks a claimed job succeeded and appends its reply to the conversation
/// as the assistant message, in one statement (one commit). False, with
/// nothing written, if the claim is no longer held.
pub async fn succeed(db: impl PgExecutor<'_>, result: &Success) -> sqlx::Result<bool> {
    let written = succeed_many(db, std::slice::from_ref(result)).await?;
    Ok(!written.is_empty())
}

/// A result to write with [`succeed_many`].
#[derive(Debug, Clone)]
pub struct Success {
    /// The job.
    pub id: Uuid,
    /// The claim it was computed under.
    pub token: Uuid,
    /// The assistant message to write.
    pub message_id: Uuid,
    /// Reply text.
    pub content: String,
    /// The LLM's finish reason.
    pub finish_reason: String,
    /// Prompt tokens reported.
    pub prompt_tokens: Option<i32>,
    /// Completion tokens reported.
    pub completion_tokens: Option<i32>,
}

/// [`succeed`] for many jobs in one statement; returns `(job id, claim
/// token)` of the results whose claim was still held, which are now
/// succeeded with their reply.
pub async fn succeed_many(
    db: impl PgExecutor<'_>,
    results: &[Success],
) -> sqlx::Result<Vec<(Uuid, Uuid)>> {
    let n = results.len();
    let mut ids = Vec::with_capacity(n);
    let mut tokens = Vec::with_capacity(n);
    let mut message_ids = Vec::with_capacity(n);
    let mut contents = Vec::with_capacity(n);
    let mut finish_reasons = Vec::with_capacity(n);
    let mut prompt_tokens = Vec::with_capacity(n);
    let mut completion_tokens = Vec::with_capacity(n);
    for r in results {
        ids.push(r.id);
        tokens.push(r.token);
        message_ids.push(r.message_id);
        contents.push(r.content.as_str());
        finish_reasons.push(r.finish_reason.as_str());
        prompt_tokens.push(r.prompt_tokens);
        completion_tokens.push(r.completion_tokens);
    }
    let written = sqlx::query!(
        r#"with input as (
             select * from unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[],
                                  $6::int4[], $7::int4[])
                 as t(id, token, message_id, content, finish_reason, prompt_tokens,
                      completion_tokens)
         ), done as (
             update jobs j set status = 'succeeded', finished_at = now(), updated_at = now(),
                               result_message_id = i.message_id, result_content = i.content,
                               finish_reason = i.finish_reason, prompt_tokens = i.prompt_tokens,
                               completion_tokens = i.completion_tokens,
                               claim_token = null, lease_expires_at = null,
                               partial_content = null, partial_attempt = null
             from input i
             where j.id = i.id and j.claim_token = i.token and j.status = 'running'
             returning j.id, i.token, j.tenant_id, j.conversation_id, i.message_id, i.content,
                       pg_notify($8, j.id::text)::text as notified
         ), reply as (
             insert into messages (id, tenant_id, conversation_id, role, content, job_id)
             select message_id, tenant_id, conversation_id, 'assistant', content, id from done
         )
         select id as "id!", token as "token!" from done"#,
        &ids,
        &tokens,
        &message_ids,
        &contents as &[&str],
        &finish_reasons as &[&str],
        &prompt_tokens as &[Option<i32>],
        &completion_tokens as &[Option<i32>],
        super::JOB_CHANNEL,
    )
    .fetch_all(db)
    .await?;
    Ok(written.into_iter().map(|r| (r.id, r.token)).collect())
}

/// How an attempt that produced no result ended, for the job's attempt
/// history.
#[derive(Debug, Clone, Copy)]
pub struct AttemptEnd<'a> {
    /// Error code.
    pub code: &'a str,
    /// What happened (bounded, fit for the tenant).
    pub message: &'a str,
    /// The text the attempt had streamed before it failed (kept up to
    /// [`super::MAX_PARTIAL_CHARS`]); empty if none.
    pub partial: &'a str,
}

/// Marks a claimed job failed; false if the claim is no longer held.
pub async fn fail(
    db: impl PgExecutor<'_>,
    id: Uuid,
    token: Uuid,
    ended: &AttemptEnd<'_>,
) -> sqlx::Result<bool> {
    // With output columns `query!` gives a `Map`, which has no `execute`:
    // the executor runs it, for the rows affected.
    let query = sqlx::query!(
        "update jobs set status = 'failed', finished_at = now(), updated_at = now(),
                         error_code = $3, error_message = $4,
                         attempt_errors = attempt_errors || jsonb_strip_nulls(jsonb_build_object(
                             'attempt', attempts, 'code', $3::text, 'message', $4::text, 'at', now(),
                             'partial_content', nullif(left($5, $6), ''))),
                         claim_token = null, lease_expires_at = null,
                         partial_content = null, partial_attempt = null
         where id = $1 and claim_token = $2 and status = 'running'
         returning pg_notify($7, id::text)::text",
        id,
        token,
        ended.code,
        ended.message,
        ended.partial,
        super::MAX_PARTIAL_CHARS,
        super::JOB_CHANNEL,
    );
    let done = db.execute(query).await?;
    Ok(done.rows_affected() == 1)
}

/// Error code of an attempt whose worker stopped answering (its lease lapsed).
pub const WORKER_LOST: &str = "worker_lost";

/// Running jobs whose lease lapsed, as [`requeue_expired`] left them.
#[derive(Debug, Default)]
pub struct Lapsed {
    /// Back to `queued`, unpublished: publish them again.
    pub requeued: Vec<Uuid>,
    /// Their last allowed attempt was the one that lapsed: now `failed`.
    pub failed: Vec<Uuid>,
}

/// Ends the attempt of every running job whose lease lapsed (its worker
/// died, or kept failing to write): the attempt is recorded as
/// [`WORKER_LOST`], then the job goes back to `queued` and unpublished, so
/// it is published again, or, if that was its last allowed attempt
/// (`max_attempts`), it fails. So a job whose attempts keep ending without a
/// result still ends within its budget. Safe in every replica at once.
pub async fn requeue_expired(
    db: impl PgExecutor<'_>,
    limit: i64,
    max_attempts: i32,
) -> sqlx::Result<Lapsed> {
    let rows = sqlx::query!(
        r#"with lapsed as (
             select id from jobs
             where status = 'running' and lease_expires_at < now()
             order by lease_expires_at
             for update skip locked limit $1
         )
         update jobs j set
             status = case when j.attempts >= $2 then 'failed' else 'queued' end,
             finished_at = case when j.attempts >= $2 then now() end,
             error_code = case when j.attempts >= $2 then $3 end,
             error_message = case when j.attempts >= $2 then $4 end,
             attempt_errors = j.attempt_errors || jsonb_strip_nulls(jsonb_build_object(
                 'attempt', j.attempts, 'code', $3::text, 'message', $4::text, 'at', now(),
                 'partial_content', nullif(left(j.partial_content, $5), ''))),
             partial_content = null, partial_attempt = null,
             claim_token = null, lease_expires_at = null, published_at = null, updated_at = now()
         from lapsed
         where j.id = lapsed.id
         returning j.id, j.status = 'failed' as "failed!",
                   pg_notify($6, j.id::text)::text as notified"#,
        limit,
        max_attempts,
        WORKER_LOST,
        "the attempt's worker stopped answering before it finished",
        super::MAX_PARTIAL_CHARS,
        super::JOB_CHANNEL,
    )
    .fetch_all(db)
    .await?;
    let mut lapsed = Lapsed::default();
    for r in rows {
        if r.failed {
            lapsed.failed.push(r.id);
        } else {
            lapsed.requeued.push(r.id);
        }
    }
    Ok(lapsed)
}

/// Locks up to `limit` queued jobs whose publish was never confirmed and
/// that are older than `grace` (the submitting api is given that long to
/// publish them itself). Call inside a transaction, publish, then
/// [`mark_published`] and commit; other replicas skip the locked rows.
pub async fn lock_unpublished(
    db: impl PgExecutor<'_>,
    grace: Duration,
    limit: i64,
) -> sqlx::Result<Vec<Uuid>> {
    sqlx::query_scalar!(
        "select id from jobs
         where status = 'queued' and published_at is null
           and updated_at < now() - make_interval(secs => $1)
         order by created_at
         for update skip locked limit $2",
        grace.as_secs_f64(),
        limit,
    )
    .fetch_all(db)
    .await
}

/// Deletes up to `limit` jobs that finished more than `age` ago (their
/// messages stay: they are the conversation); returns how many.
pub async fn delete_finished_before(
    db: impl PgExecutor<'_>,
    age: Duration,
    limit: i64,
) -> sqlx::Result<u64> {
    let done = sqlx::query!(
        "delete from jobs where id in (
             select id from jobs
             where status in ('succeeded', 'failed', 'cancelled')
               and created_at < now() - make_interval(secs => $1)
               and finished_at < now() - make_interval(secs => $1)
             limit $2)",
        age.as_secs_f64(),
        limit,
    )
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}

/// Job counts for operators.
#[derive(Debug, Clone)]
pub struct JobStats {
    /// Jobs per status (every status present, zero included).
    pub by_status: Vec<(String, i64)>,
    /// Age of the oldest queued job, in seconds.
    pub oldest_queued_age_secs: Option<f64>,
}

/// Counts jobs by status across all tenants.
pub async fn stats(db: impl PgExecutor<'_> + Copy) -> sqlx::Result<JobStats> {
    let by_status = sqlx::query!(
        r#"select s.status as "status!", count(j.id) as "count!"
           from unnest(array['queued', 'running', 'succeeded', 'failed', 'cancelled']) as s(status)
           left join jobs j on j.status = s.status
           group by s.status order by s.status"#
    )
    .fetch_all(db)
    .await?;
    let oldest_queued_age_secs: Option<f64> = sqlx::query_scalar!(
        r#"select extract(epoch from now() - min(created_at))::float8 as "age?"
           from jobs where status = 'queued'"#
    )
    .fetch_one(db)
    .await?;
    Ok(JobStats {
        by_status: by_status.into_iter().map(|r| (r.status, r.count)).collect(),
        oldest_queued_age_secs,
    })
}

/// Records why the current attempt of a claimed job failed and counts one
/// more attempt (an in-process retry); false if the claim is no longer held.
pub async fn retry_attempt(
    db: impl PgExecutor<'_>,
    id: Uuid,
    token: Uuid,
    lease: Duration,
    ended: &AttemptEnd<'_>,
) -> sqlx::Result<bool> {
    let query = sqlx::query!(
        "update jobs set attempts = attempts + 1, updated_at = now(),
                         lease_expires_at = now() + make_interval(secs => $3),
                         attempt_errors = attempt_errors || jsonb_strip_nulls(jsonb_build_object(
                             'attempt', attempts, 'code', $4::text, 'message', $5::text, 'at', now(),
                             'partial_content', nullif(left($6, $7), ''))),
                         partial_content = null, partial_attempt = null
         where id = $1 and claim_token = $2 and status = 'running'
         returning pg_notify($8, id::text)::text",
        id,
        token,
        lease.as_secs_f64(),
        ended.code,
        ended.message,
        ended.partial,
        super::MAX_PARTIAL_CHARS,
        super::JOB_CHANNEL,
    );
    let done = db.execute(query).await?;
    Ok(done.rows_affected() == 1)
}

/// Gives a claimed job back to the queue unfinished (worker shutting down
/// past its grace period). The attempt it had started counts, like every
/// attempt that ended without a result (it may have cost an LLM call, and
/// each attempt number names one stream of text for subscribers); it is
/// recorded as `worker_stopped` with the text saved so far. False if the
/// claim is gone.
pub async fn release(db: impl PgExecutor<'_>, id: Uuid, token: Uuid) -> sqlx::Result<bool> {
    let query = sqlx::query!(
        "update jobs set status = 'queued',
                         attempt_errors = attempt_errors || jsonb_strip_nulls(jsonb_build_object(
                             'attempt', attempts, 'code', 'worker_stopped',
                             'message', 'the worker stopped before the attempt finished',
                             'at', now(), 'partial_content', nullif(left(partial_content, $3), ''))),
                         claim_token = null, lease_expires_at = null, updated_at = now(),
                         partial_content = null, partial_attempt = null,
                         -- Its message goes back to the queue (nack or connection loss):
                         -- the relay must not publish another.
                         published_at = coalesce(published_at, now())
         where id = $1 and claim_token = $2 and status = 'running'
         returning pg_notify($4, id::text)::text",
        id,
        token,
        super::MAX_PARTIAL_CHARS,
        super::JOB_CHANNEL,
    );
    let done = db.execute(query).await?;
    Ok(done.rows_affected() == 1)
}

/// Puts a failed job back in the queue with a fresh attempt budget (an
/// operator replaying dead letters). False if the job is not failed, or its
/// conversation has another active job by now.
pub async fn requeue_failed(db: impl PgExecutor<'_>, id: Uuid) -> sqlx::Result<bool> {
    let query = sqlx::query!(
        "update jobs set status = 'queued', attempts = 0, error_code = null, error_message = null,
                         finished_at = null, published_at = null, updated_at = now()
         where id = $1 and status = 'failed'
           and not exists (select 1 from jobs o where o.conversation_id = jobs.conversation_id
                           and o.status in ('queued', 'running'))
         returning pg_notify($2, id::text)::text",
        id,
        super::JOB_CHANNEL,
    );
    let done = db.execute(query).await?;
    Ok(done.rows_affected() == 1)
}

/// Gives a claimed job back to the queue to wait for a delayed retry,
/// recording why this attempt failed. It is left unpublished until the
/// delayed message is confirmed, so the relay covers a lost publish.
/// False if the claim is no longer held.
pub async fn defer(
    db: impl PgExecutor<'_>,
    id: Uuid,
    token: Uuid,
    ended: &AttemptEnd<'_>,
    delay: Duration,
) -> sqlx::Result<bool> {
    let query = sqlx::query!(
        "update jobs set status = 'queued', claim_token = null, lease_expires_at = null,
                         published_at = null, updated_at = now(),
                         not_before = now() + make_interval(secs => $7),
                         attempt_errors = attempt_errors || jsonb_strip_nulls(jsonb_build_object(
                             'attempt', attempts, 'code', $3::text, 'message', $4::text, 'at', now(),
                             'partial_content', nullif(left($5, $6), ''))),
                         partial_content = null, partial_attempt = null
         where id = $1 and claim_token = $2 and status = 'running'
         returning pg_notify($8, id::text)::text",
        id,
        token,
        ended.code,
        ended.message,
        ended.partial,
        super::MAX_PARTIAL_CHARS,
        delay.as_secs_f64(),
        super::JOB_CHANNEL,
    );
    let done = db.execute(query).await?;
    Ok(done.rows_affected() == 1)
}

/// Queued jobs whose message was published more than `after` ago (see the
/// worker's republish rule). Parked jobs are left out: their messages may
/// be held, unacked, by workers waiting for their key's slot.
pub async fn count_published_before(db: impl PgExecutor<'_>, after: Duration) -> sqlx::Result<i64> {
    sqlx::query_scalar!(
        r#"select count(*) as "count!" from jobs
           where status = 'queued' and not parked
             and published_at < now() - make_interval(secs => $1)"#,
        after.as_secs_f64(),
    )
    .fetch_one(db)
    .await
}

/// Locks up to `limit` queued jobs published more than `after` ago, oldest
/// first; call in a transaction, publish, then [`mark_republished_many`].
pub async fn lock_published_before(
    db: impl PgExecutor<'_>,
    after: Duration,
    limit: i64,
) -> sqlx::Result<Vec<Uuid>> {
    sqlx::query_scalar!(
        "select id from jobs
         where status = 'queued' and not parked
           and published_at < now() - make_interval(secs => $1)
         order by published_at
         for update skip locked limit $2",
        after.as_secs_f64(),
        limit,
    )
    .fetch_all(db)
    .await
}

/// Records that queued jobs were published again just now.
pub async fn mark_republished_many(db: impl PgExecutor<'_>, ids: &[Uuid]) -> sqlx::Result<()> {
    sqlx::query!(
        "update jobs set published_at = now() where id = any($1) and status = 'queued'",
        ids
    )
    .execute(db)
    .await?;
    Ok(())
}

/// Queued jobs of one tenant (the per-tenant share of the queue).
pub async fn queued_count_of_tenant(db: impl PgExecutor<'_>, tenant_id: Uuid) -> sqlx::Result<i64> {
    sqlx::query_scalar!(
        r#"select count(*) as "count!" from jobs where tenant_id = $1 and status = 'queued'"#,
        tenant_id
    )
    .fetch_one(db)
    .await
}

/// The outbox: queued jobs whose publish was never confirmed, and the age
/// in seconds of the oldest of them (the relay's lag; 0 when none).
pub async fn outbox(db: impl PgExecutor<'_>) -> sqlx::Result<(i64, f64)> {
    let row = sqlx::query!(
        r#"select count(*) as "backlog!",
                  coalesce(extract(epoch from now() - min(created_at)), 0)::float8 as "lag!"
           from jobs
           where status = 'queued' and published_at is null"#
    )
    .fetch_one(db)
    .await?;
    Ok((row.backlog, row.lag.max(0.0)))
}

/// Saves the text the running attempt has streamed so far (no `NOTIFY`:
/// subscribers hear the text itself over the events exchange; this copy is
/// for those who join or resume later). False if the claim is gone.
pub async fn save_partial(
    db: impl PgExecutor<'_>,
    id: Uuid,
    token: Uuid,
    attempt: i32,
    text: &str,
) -> sqlx::Result<bool> {
    let done = sqlx::query!(
        "update jobs set partial_content = $4, partial_attempt = $3
         where id = $1 and claim_token = $2 and status = 'running'",
        id,
        token,
        attempt,
        text,
    )
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}
