-- chatq initial schema: tenants and keys, conversations, messages, jobs.
-- Every tenant-owned row carries tenant_id so every query can be scoped by it.

create table tenants (
    id          uuid primary key,
    name        text not null unique,
    created_at  timestamptz not null default now(),
    updated_at  timestamptz not null default now()
);

create table api_keys (
    id                      uuid primary key,
    tenant_id               uuid not null references tenants (id) on delete cascade,
    -- sha256 of the key; the key itself is never stored.
    key_hash                bytea not null,
    rate_limit_per_minute   integer check (rate_limit_per_minute > 0),
    revoked_at              timestamptz,
    created_at              timestamptz not null default now(),
    updated_at              timestamptz not null default now(),
    constraint api_keys_key_hash_key unique (key_hash)
);
create index api_keys_tenant_id_idx on api_keys (tenant_id);

create table conversations (
    id             uuid primary key,
    tenant_id      uuid not null references tenants (id) on delete cascade,
    system_prompt  text,
    model          text not null,
    metadata       jsonb not null default '{}'::jsonb,
    created_at     timestamptz not null default now(),
    updated_at     timestamptz not null default now()
);
-- Listing is newest first, keyset-paginated by id (uuid v7 is time ordered).
create index conversations_tenant_id_id_idx on conversations (tenant_id, id desc);

create table jobs (
    id                 uuid primary key,
    tenant_id          uuid not null references tenants (id) on delete cascade,
    conversation_id    uuid not null references conversations (id) on delete cascade,
    status             text not null default 'queued'
                       check (status in ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    model              text not null,
    max_tokens         integer,
    temperature        double precision,
    attempts           integer not null default 0,
    -- Idempotency: the client's key and a hash of the request it came with.
    idempotency_key    text,
    request_hash       bytea,
    -- Outbox: null until the broker confirmed a publish of this job.
    published_at       timestamptz,
    -- Ownership of a running job: the claim token of the current attempt and
    -- when it lapses without a heartbeat.
    claim_token        uuid,
    lease_expires_at   timestamptz,
    result_message_id  uuid,
    result_content     text,
    finish_reason      text,
    prompt_tokens      integer,
    completion_tokens  integer,
    error_code         text,
    error_message      text,
    created_at         timestamptz not null default now(),
    started_at         timestamptz,
    finished_at        timestamptz,
    updated_at         timestamptz not null default now()
);
create index jobs_conversation_id_idx on jobs (conversation_id);
-- One active job per conversation, enforced by the schema.
create unique index jobs_one_active_per_conversation
    on jobs (conversation_id) where status in ('queued', 'running');
create unique index jobs_tenant_idempotency_key
    on jobs (tenant_id, idempotency_key) where idempotency_key is not null;
-- Recovery loop: unpublished queued jobs, and running jobs by lease.
create index jobs_unpublished_idx on jobs (created_at) where status = 'queued' and published_at is null;
create index jobs_running_lease_idx on jobs (lease_expires_at) where status = 'running';
create index jobs_status_idx on jobs (status, created_at);

create table messages (
    id               uuid primary key,
    -- Commit order within the database: ids are minted by different processes,
    -- so a conversation is read back in seq order, not id order.
    seq              bigint generated always as identity,
    tenant_id        uuid not null references tenants (id) on delete cascade,
    conversation_id  uuid not null references conversations (id) on delete cascade,
    role             text not null check (role in ('system', 'user', 'assistant')),
    content          text not null,
    job_id           uuid,
    created_at       timestamptz not null default now(),
    updated_at       timestamptz not null default now()
);
create index messages_conversation_id_seq_idx on messages (conversation_id, seq);
-- Effectively once: at most one assistant message per job.
create unique index messages_one_assistant_per_job on messages (job_id) where role = 'assistant';
