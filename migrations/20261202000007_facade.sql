-- The OpenAI facade and priority lanes: upstream sampling parameters
-- forwarded unchanged (top_p, stop, seed, penalties, user,
-- max_completion_tokens), and the lane a job waits in.
alter table jobs add column sampling jsonb;
alter table jobs add column priority text not null default 'interactive'
    check (priority in ('interactive', 'batch'));
