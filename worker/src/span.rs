//! The worker's span for one queue message and the job it starts (public
//! so the benchmark measures exactly what the worker does).

use uuid::Uuid;

use chatq_common::telemetry;

/// The span of one delivery: `job`, with the job the message named; the
/// job it actually starts is recorded by [`record_claim`].
pub fn job_span(message_job_id: Uuid) -> tracing::Span {
    tracing::info_span!(
        "job",
        job_id = tracing::field::Empty,
        trace_id = tracing::field::Empty,
        message.job_id = %message_job_id,
        job.attempt = tracing::field::Empty
    )
}

/// Records the claimed job on `span`: its id and attempt, and the trace of
/// the request that submitted it (`trace_parent`, W3C); with traces
/// exported, `span` becomes the child of the submit's span.
pub fn record_claim(span: &tracing::Span, id: Uuid, attempt: i32, trace_parent: Option<&str>) {
    span.record("job_id", tracing::field::display(id));
    span.record("job.attempt", attempt);
    if let Some(parent) = trace_parent
        && let Some((trace_id, _, _)) = telemetry::parse_traceparent(parent)
    {
        span.record("trace_id", trace_id);
        if !telemetry::continue_trace(span, parent) && telemetry::span_traceparent(span).is_some() {
            tracing::debug!("the job's span had started: it is not linked to the submit's trace");
        }
    }
}
