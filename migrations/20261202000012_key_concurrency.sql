-- Per-key concurrency (`max_concurrency` of an API key: jobs of that key
-- running at once). A job remembers its key and the key's cap when it was
-- submitted. A queued job that comes up while its key is at its cap is
-- parked: out of the start order (so the claim never walks past a capped
-- key's backlog again), until a job of that key stops running and unparks
-- the key's next one. Each job is parked and unparked at most once per
-- wait: the cost per job stays O(log n).
alter table jobs add column key_id uuid;
alter table jobs add column key_cap integer;
alter table jobs add column parked boolean not null default false;

-- Jobs of a capped key running now (the cap check counts them: at most cap).
create index jobs_key_running_idx on jobs (key_id) where status = 'running' and key_cap is not null;
-- A capped key's parked jobs, in their start order.
create index jobs_key_parked_idx on jobs (key_id, lane, start_tag, id)
    where status = 'queued' and parked;

-- The start order holds startable jobs only.
drop index jobs_start_order_idx;
create index jobs_start_order_idx on jobs (lane, start_tag, id) where status = 'queued' and not parked;

-- The lane's virtual time is the smallest tag of what can start.
create or replace function chatq_job_start_tag() returns trigger language plpgsql as $$
declare
    l smallint := case when new.priority = 'batch' then 1 else 0 end;
    v double precision;
    f double precision;
begin
    if new.status <> 'queued' then
        return new;
    end if;
    select j.start_tag into v from jobs j
     where j.status = 'queued' and not j.parked and j.lane = l
     order by j.lane, j.start_tag, j.id
     limit 1;
    select j.start_tag + j.cost into f from jobs j
     where j.status = 'queued' and j.tenant_id = new.tenant_id and j.lane = l
     order by j.tenant_id, j.lane, (j.start_tag + j.cost) desc
     limit 1;
    new.start_tag := greatest(coalesce(v, 0), coalesce(f, 0));
    return new;
end $$;

-- Advisory lock namespace (first key) of the per-key cap check.
-- 7301: the claim deciding for one capped key.

-- Up to p_n startable queued jobs in start order, locked: the first lane
-- first (interactive, or batch when p_batch_first), then the other; only
-- jobs of p_model unless it is null. A job whose key is at its cap is
-- parked instead (at most 64 per call, so one call stays short; the next
-- call goes on). The cap check of a key is made under a transaction-level
-- advisory lock taken without waiting: a job whose key another claim is
-- deciding for right now is skipped, as a locked row is, so concurrent
-- claims never start more than the cap and never wait on each other.
create or replace function chatq_pick(p_n integer, p_batch_first boolean, p_model text)
returns table (id uuid, ord bigint) language plpgsql as $$
declare
    taken bigint := 0;
    parks integer := 0;
    l smallint;
    c record;
    cur refcursor;
    busy integer;
    picked uuid[] := '{}';
begin
    if p_n <= 0 then
        return;
    end if;
    foreach l in array case when p_batch_first then array[1, 0] else array[0, 1] end loop
        -- One row at a time: FETCH locks only the rows it returns.
        open cur for
            select j.id, j.key_id, j.key_cap from jobs j
             where j.status = 'queued' and not j.parked and j.lane = l
               and (j.not_before is null or j.not_before <= now())
               and (p_model is null or j.model = p_model)
             order by j.lane, j.start_tag, j.id
             for update of j skip locked;
        loop
            fetch cur into c;
            exit when not found;
            if c.key_cap is not null then
                continue when not pg_try_advisory_xact_lock(7301, hashtext(c.key_id::text));
                select count(*) into busy from jobs r
                 where r.key_id = c.key_id and r.status = 'running' and r.key_cap is not null;
                busy := busy + coalesce(cardinality(array_positions(picked, c.key_id)), 0);
                if busy >= c.key_cap then
                    update jobs set parked = true where jobs.id = c.id;
                    parks := parks + 1;
                    exit when parks >= 64;
                    continue;
                end if;
                picked := picked || c.key_id;
            end if;
            taken := taken + 1;
            id := c.id;
            ord := taken;
            return next;
            exit when taken >= p_n;
        end loop;
        close cur;
        exit when taken >= p_n or parks >= 64;
    end loop;
end $$;

-- A job of a capped key stopped running (finished, failed, cancelled, or
-- back in the queue): the key's first parked job may start again, and the
-- workers holding messages for parked work are told.
create function chatq_key_slot_freed() returns trigger language plpgsql as $$
begin
    update jobs set parked = false
     where id = (select p.id from jobs p
                  where p.key_id = old.key_id and p.status = 'queued' and p.parked
                  order by p.key_id, p.lane, p.start_tag, p.id
                  limit 1);
    perform pg_notify('chatq_key_slot', '');
    return null;
end $$;
create trigger jobs_key_slot_freed after update of status on jobs
    for each row when (old.status = 'running' and new.status <> 'running' and old.key_cap is not null)
    execute function chatq_key_slot_freed();

-- The backstop of that wake-up (a claim that parked a job while the slot
-- was being freed, unseen by the trigger): every capped key with parked
-- jobs gets as many unparked as it has free slots. Keys are visited by a
-- skip scan of the parked index, O(keys log n). Returns how many were
-- unparked.
create function chatq_unpark_free_slots() returns integer language plpgsql as $$
declare
    n integer;
begin
    with recursive k(key_id) as (
        (select key_id from jobs where status = 'queued' and parked order by key_id limit 1)
        union all
        select (select j.key_id from jobs j
                 where j.status = 'queued' and j.parked and j.key_id > k.key_id
                 order by j.key_id limit 1)
          from k where k.key_id is not null
    ), free as (
        select k.key_id,
               greatest(coalesce(a.max_concurrency, 2147483647)
                        - (select count(*) from jobs r
                            where r.key_id = k.key_id and r.status = 'running'
                              and r.key_cap is not null), 0) as slots
          from k left join api_keys a on a.id = k.key_id
         where k.key_id is not null
    ), woken as (
        update jobs j set parked = false
          from free f cross join lateral (
                   select p.id from jobs p
                    where p.key_id = f.key_id and p.status = 'queued' and p.parked
                    order by p.key_id, p.lane, p.start_tag, p.id
                    limit f.slots) w
         where j.id = w.id
        returning j.id
    )
    select count(*) into n from woken;
    if n > 0 then
        perform pg_notify('chatq_key_slot', '');
    end if;
    return n;
end $$;
