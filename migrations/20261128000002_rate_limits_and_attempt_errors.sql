-- Per-key submission counters, one row per key and minute (fixed window),
-- shared by every api replica.
create table rate_windows (
    key_id        uuid not null references api_keys (id) on delete cascade,
    window_start  timestamptz not null,
    count         integer not null default 0,
    created_at    timestamptz not null default now(),
    updated_at    timestamptz not null default now(),
    primary key (key_id, window_start)
);
create index rate_windows_window_start_idx on rate_windows (window_start);

-- Why each failed LLM attempt failed, so a poller can see why a job is slow:
-- [{"attempt": n, "code": "...", "message": "...", "at": "..."}].
alter table jobs add column attempt_errors jsonb not null default '[]'::jsonb;
