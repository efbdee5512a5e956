-- chatq_estimate_tokens never added its 256-token default for a reply
-- without max_tokens: greatest(null, 0) is 0 in PostgreSQL (it ignores
-- nulls), so the coalesce never applied.
create or replace function chatq_estimate_tokens(p_chars integer, p_max_tokens integer)
returns integer language sql immutable as $$
    select least(ceil(greatest(p_chars, 0) / 4.0)
                 + case when p_max_tokens is null then 256 else greatest(p_max_tokens, 0) end,
                 2147483647)::integer
$$;
