-- The W3C traceparent of the request that submitted the job: the worker's
-- span for the job continues that trace.
alter table jobs add column trace_parent text;
