-- Operators pause and resume consumption (POST /admin/v1/queues/pause|resume):
-- one row per deployment, read by every worker.
create table queue_controls (
    id          boolean primary key default true check (id),
    paused      boolean not null default false,
    updated_at  timestamptz not null default now()
);

insert into queue_controls default values;
