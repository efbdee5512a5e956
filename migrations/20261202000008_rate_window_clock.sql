-- chatq_rate_hit read the clock before taking the key's row lock, so a
-- call that waited behind a newer one could move the window back a second.
-- Read it again under the lock, and never move the window back.
create or replace function chatq_rate_hit(p_key uuid, p_limit integer,
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
    -- The clock was read before the lock: a transaction that waited behind a
    -- newer one must not move the window back.
    now_ts := greatest(extract(epoch from clock_timestamp()), base + 60);
    start_sec := greatest(floor(now_ts)::bigint - 60, base);
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
