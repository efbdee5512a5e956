-- Hardening (issue 9).

-- The republish rule counts queued jobs published long ago: only queued,
-- published rows are in this index.
create index jobs_queued_published_idx on jobs (published_at)
    where status = 'queued' and published_at is not null;

-- Per-tenant share of the queue: queued jobs by tenant.
create index jobs_queued_tenant_idx on jobs (tenant_id) where status = 'queued';

-- Per-key rate limits as a sliding window: one row per key holding the
-- counts of its last 61 one-second buckets (replaces the fixed one-minute
-- windows, which let a key through twice its limit across a minute boundary).
create table key_rates (
    key_id      uuid primary key references api_keys (id) on delete cascade,
    -- Epoch second of buckets[1]; buckets[i] counts second base_sec + i - 1.
    base_sec    bigint not null,
    buckets     integer[] not null,
    created_at  timestamptz not null default now(),
    updated_at  timestamptz not null default now()
);
drop table rate_windows;

-- Counts one request of a key against `p_limit` per minute. Allowed when
-- fewer than p_limit requests were allowed in the current second and the 60
-- before it, so no 60-second window, wherever it starts, holds more than
-- p_limit (at the price of up to one second of extra caution). When refused,
-- retry_after_secs is the wait until enough old requests leave the window.
create function chatq_rate_hit(p_key uuid, p_limit integer,
                               out allowed boolean, out retry_after_secs float8)
language plpgsql as $$
declare
    now_ts    float8 := extract(epoch from clock_timestamp());
    start_sec bigint := floor(now_ts)::bigint - 60;
    base      bigint;
    b         integer[];
    shift     bigint;
    total     integer;
    excess    integer;
    cum       integer := 0;
begin
    -- A lost count after a crash is harmless: do not wait for the WAL flush.
    perform set_config('synchronous_commit', 'off', true);
    insert into key_rates (key_id, base_sec, buckets)
        values (p_key, start_sec, array_fill(0, array[61]))
        on conflict (key_id) do nothing;
    select k.base_sec, k.buckets into base, b from key_rates k where k.key_id = p_key for update;
    shift := start_sec - base;
    if shift >= 61 then
        b := array_fill(0, array[61]);
    elsif shift > 0 then
        b := b[shift + 1 : 61] || array_fill(0, array[shift::integer]);
    end if;
    select coalesce(sum(x), 0) into total from unnest(b) as x;
    if total < p_limit then
        b[61] := b[61] + 1;
        allowed := true;
        retry_after_secs := 0;
    else
        allowed := false;
        excess := total - p_limit + 1;
        retry_after_secs := 1;
        for i in 1 .. 61 loop
            cum := cum + b[i];
            if cum >= excess then
                -- Bucket i (second start_sec + i - 1) leaves the window then.
                retry_after_secs := greatest(start_sec + i + 60 - now_ts, 0.001);
                exit;
            end if;
        end loop;
    end if;
    update key_rates set base_sec = start_sec, buckets = b, updated_at = now()
        where key_id = p_key;
end
$$;

-- Jobs of one key running at once (enforced by the flow-control work).
alter table api_keys add column max_concurrency integer check (max_concurrency > 0);
