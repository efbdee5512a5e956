-- Start tags of one tenant's concurrent submissions: two transactions
-- inserting jobs of the same tenant and lane at once both read the same
-- "last queued end tag" (neither sees the other's uncommitted job) and got
-- the same tag, so a tenant submitting in parallel was served ahead of its
-- fair share. The trigger now takes a transaction-level advisory lock per
-- (tenant, lane) first: the second transaction waits until the first
-- commits and then sees its job. (Within one statement, rows inserted
-- earlier are already visible to the trigger.) Multi-row inserts must
-- insert in lock order, `chatq_start_tag_lock_key` ascending, so two of
-- them never wait on each other crosswise.

-- Advisory lock namespace (first key) 7302: a tenant's lane, for its tags.
create function chatq_start_tag_lock_key(p_tenant uuid, p_lane smallint)
returns integer language sql immutable as $$
    select hashtext(p_tenant::text || ':' || p_lane::text)
$$;

create or replace function chatq_job_start_tag() returns trigger language plpgsql as $$
declare
    l smallint := case when new.priority = 'batch' then 1 else 0 end;
    v double precision;
    f double precision;
begin
    if new.status <> 'queued' then
        return new;
    end if;
    perform pg_advisory_xact_lock(7302, chatq_start_tag_lock_key(new.tenant_id, l));
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
