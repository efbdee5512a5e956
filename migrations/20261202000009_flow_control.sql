-- Flow control: the order jobs start in (lanes, then start-time fair
-- queueing between tenants weighted by tokens), retries that may not start
-- before their delay, and the LLM budget shared by every worker.

-- Estimated tokens of a job (prompt and reply), the unit of fairness and
-- the reservation against a tokens-per-minute budget.
alter table jobs add column cost integer not null default 0;
-- Start tag: jobs start in (lane, start_tag, id) order.
alter table jobs add column start_tag double precision not null default 0;
-- A retry waiting out its delay may not start before this.
alter table jobs add column not_before timestamptz;

-- The lane as a number (0 interactive, 1 batch: batch starts after), so the
-- indexes below serve plain equality and order.
alter table jobs add column lane smallint
    generated always as (case when priority = 'batch' then 1 else 0 end) stored;

-- The start order of queued jobs (the claim and the queue position read it).
create index jobs_start_order_idx on jobs (lane, start_tag, id) where status = 'queued';
-- The tenant's last queued start tag in a lane (a new job's tag).
create index jobs_queued_tenant_tag_idx on jobs (tenant_id, lane, (start_tag + cost))
    where status = 'queued';

-- What a turn costs before the LLM said: its text at ~4 characters per
-- token plus the reply cap (256 when the client set none).
create function chatq_estimate_tokens(p_chars integer, p_max_tokens integer)
returns integer language sql immutable as $$
    select least(ceil(greatest(p_chars, 0) / 4.0) + coalesce(greatest(p_max_tokens, 0), 256),
                 2147483647)::integer
$$;

-- Start-time fair queueing (Goyal et al.): a job's start tag is the later of
-- the lane's virtual time (the smallest tag still queued: what starts next)
-- and the end tag (start + cost) of the tenant's last queued job in the lane.
-- So a tenant with 10,000 queued jobs holds tags far ahead and a newcomer's
-- job gets the head's tag: it starts within a few jobs. Two index probes,
-- O(log n). Jobs that come back to the queue (retries, releases) keep their
-- tag, so they are next.
create function chatq_job_start_tag() returns trigger language plpgsql as $$
declare
    l smallint := case when new.priority = 'batch' then 1 else 0 end;
    v double precision;
    f double precision;
begin
    if new.status <> 'queued' then
        return new;
    end if;
    select j.start_tag into v from jobs j
     where j.status = 'queued' and j.lane = l
     order by j.lane, j.start_tag, j.id
     limit 1;
    select j.start_tag + j.cost into f from jobs j
     where j.status = 'queued' and j.tenant_id = new.tenant_id and j.lane = l
     order by j.tenant_id, j.lane, (j.start_tag + j.cost) desc
     limit 1;
    new.start_tag := greatest(coalesce(v, 0), coalesce(f, 0));
    return new;
end $$;
create trigger jobs_start_tag before insert on jobs
    for each row execute function chatq_job_start_tag();

-- Jobs started since the database was created (a counter, never rolled
-- back): the api derives the start rate, hence the queue ETA, from it.
create sequence chatq_jobs_started;
-- Lane turns: every tenth claim serves the batch lane first.
create sequence chatq_lane_turn;

-- Up to p_n startable queued jobs in start order, locked: the first lane
-- first (interactive, or batch when p_batch_first), then the other; only
-- jobs of p_model unless it is null.
create function chatq_pick(p_n integer, p_batch_first boolean, p_model text)
returns table (id uuid, ord bigint) language plpgsql as $$
declare
    taken bigint := 0;
    got bigint;
    l smallint;
begin
    foreach l in array case when p_batch_first then array[1, 0] else array[0, 1] end loop
        exit when taken >= p_n;
        return query
            select p.id, taken + row_number() over (order by p.start_tag, p.id) from (
                select j.id, j.start_tag from jobs j
                 where j.status = 'queued' and j.lane = l
                   and (j.not_before is null or j.not_before <= now())
                   and (p_model is null or j.model = p_model)
                 order by j.lane, j.start_tag, j.id
                 limit p_n - taken
                 for update of j skip locked) p;
        get diagnostics got = row_count;
        taken := taken + got;
    end loop;
end $$;

-- The shared LLM budget, one row per model: token buckets for requests and
-- tokens (level and when it was last refilled), and the provider's pause.
create table llm_budgets (
    model         text primary key,
    requests      double precision,
    tokens        double precision,
    refilled_at   timestamptz not null default clock_timestamp(),
    paused_until  timestamptz,
    ramp_until    timestamptz
);
-- LLM calls holding capacity (a lease, as claims have).
create table llm_calls (
    id               uuid primary key,
    model            text not null,
    reserved_tokens  integer not null,
    expires_at       timestamptz not null
);
create index llm_calls_model_idx on llm_calls (model, expires_at);

-- Takes capacity for one LLM call of p_model: a slot under
-- p_max_concurrency, one request and p_tokens tokens from the buckets
-- (p_requests and p_tokens_limit per p_window_secs; null: unlimited).
-- Returns 0 when taken (the call then holds lease p_call for p_lease_secs),
-- else the seconds to wait before asking again. While the provider's pause
-- lasts nothing is taken; after it, the buckets refill from empty and the
-- concurrency allowed grows linearly until ramp_until, so capacity returns
-- gradually.
create function chatq_llm_acquire(p_model text, p_call uuid, p_tokens integer,
    p_max_concurrency integer, p_requests double precision, p_tokens_limit double precision,
    p_window_secs double precision, p_lease_secs double precision)
returns double precision language plpgsql as $$
declare
    b llm_budgets;
    now_ts timestamptz;
    elapsed double precision;
    allowed integer;
    busy integer;
    need double precision;
    wait double precision := 0;
begin
    insert into llm_budgets (model, requests, tokens) values (p_model, p_requests, p_tokens_limit)
        on conflict (model) do nothing;
    select * into b from llm_budgets where model = p_model for update;
    now_ts := clock_timestamp();
    if b.paused_until > now_ts then
        return extract(epoch from b.paused_until - now_ts);
    end if;
    elapsed := greatest(extract(epoch from now_ts - b.refilled_at), 0);
    b.requests := case when p_requests is null then null
                       else least(p_requests, coalesce(b.requests, p_requests) + elapsed * p_requests / p_window_secs) end;
    b.tokens := case when p_tokens_limit is null then null
                     else least(p_tokens_limit, coalesce(b.tokens, p_tokens_limit) + elapsed * p_tokens_limit / p_window_secs) end;
    if p_max_concurrency is not null then
        delete from llm_calls where model = p_model and expires_at < now_ts;
        select count(*) into busy from llm_calls where model = p_model;
        allowed := p_max_concurrency;
        if b.ramp_until > now_ts then
            allowed := greatest(1, ceil(p_max_concurrency
                * extract(epoch from now_ts - b.paused_until)
                / greatest(extract(epoch from b.ramp_until - b.paused_until), 0.001)))::integer;
        end if;
        if busy >= allowed then
            -- A release notifies the waiters; this is the fallback.
            wait := case when b.ramp_until > now_ts then 0.1 else 1 end;
        end if;
    end if;
    if b.requests is not null and b.requests < 1 then
        wait := greatest(wait, (1 - b.requests) * p_window_secs / p_requests);
    end if;
    need := least(p_tokens, coalesce(p_tokens_limit, 0));
    if b.tokens is not null and b.tokens < need then
        wait := greatest(wait, (need - b.tokens) * p_window_secs / p_tokens_limit);
    end if;
    if wait = 0 then
        b.requests := b.requests - 1;
        b.tokens := b.tokens - p_tokens;
        insert into llm_calls (id, model, reserved_tokens, expires_at)
            values (p_call, p_model, p_tokens, now_ts + make_interval(secs => p_lease_secs))
            on conflict (id) do nothing;
    end if;
    update llm_budgets set requests = b.requests, tokens = b.tokens, refilled_at = now_ts
     where model = p_model;
    return wait;
end $$;

-- Gives a call's capacity back: its slot, and the tokens it reserved beyond
-- p_used (what the provider reported; a call that never went out, p_sent
-- false, gives its request back too). Wakes the waiting workers.
create function chatq_llm_release(p_call uuid, p_used integer, p_sent boolean,
    p_requests double precision, p_tokens_limit double precision)
returns void language plpgsql as $$
declare
    m text;
    reserved integer;
begin
    delete from llm_calls where id = p_call returning model, reserved_tokens into m, reserved;
    if m is null then
        return;
    end if;
    update llm_budgets
       set tokens = case when tokens is null or p_tokens_limit is null then tokens
                         else least(p_tokens_limit, tokens + reserved - coalesce(p_used, reserved)) end,
           requests = case when p_sent or requests is null or p_requests is null then requests
                           else least(p_requests, requests + 1) end
     where model = m;
    perform pg_notify('chatq_llm', m);
end $$;

-- The provider said stop (a 429, or no requests or tokens left): no call of
-- p_model starts for p_secs; after that, the buckets refill from empty and
-- concurrency ramps up over p_spread_secs. Tells every worker.
create function chatq_llm_pause(p_model text, p_secs double precision, p_spread_secs double precision)
returns timestamptz language plpgsql as $$
declare
    until_ts timestamptz := clock_timestamp() + make_interval(secs => p_secs);
begin
    insert into llm_budgets (model) values (p_model) on conflict (model) do nothing;
    update llm_budgets
       set paused_until = greatest(coalesce(paused_until, until_ts), until_ts),
           ramp_until = greatest(coalesce(paused_until, until_ts), until_ts)
                        + make_interval(secs => p_spread_secs),
           requests = case when requests is null then null else least(requests, 0) end,
           tokens = case when tokens is null then null else least(tokens, 0) end,
           refilled_at = greatest(coalesce(paused_until, until_ts), until_ts)
     where model = p_model
    returning paused_until into until_ts;
    perform pg_notify('chatq_llm_pause',
        json_build_object('model', p_model, 'until', extract(epoch from until_ts),
                          'spread', p_spread_secs)::text);
    return until_ts;
end $$;

-- Retries waiting out their delay (a message that finds nothing startable
-- looks for the next one).
create index jobs_queued_not_before_idx on jobs (not_before)
    where status = 'queued' and not_before is not null;
