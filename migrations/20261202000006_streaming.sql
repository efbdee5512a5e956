-- Live tokens: the text the current attempt has streamed so far, saved by
-- the worker a few times a second (not per token) so any api replica can
-- join or resume a stream from it; cleared when the attempt ends (an
-- abandoned attempt's text moves into attempt_errors[].partial_content).
alter table jobs add column partial_content text;
alter table jobs add column partial_attempt integer;
