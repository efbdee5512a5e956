//! W3C trace context (`traceparent`): a request that sends one continues
//! its trace, any other starts a new one. The request span carries the
//! `trace_id`, and a submitted job stores the `traceparent` of the request
//! that created it, so the worker's span for the job joins the same trace.
//! It is stored with the job rather than sent in the queue message because
//! a message may start another job than the one it names (flow control).
//! With OTLP export on (`chatq_common::telemetry`), the ids are the
//! exported spans' own, so the worker's span is the child of the submit's.

use axum::extract::Request;
use chatq_common::telemetry;

/// The trace a request belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// 32 lowercase hex digits.
    pub trace_id: String,
    /// This request's span id, 16 lowercase hex digits.
    pub span_id: String,
    /// Trace flags, 2 hex digits.
    pub flags: String,
    /// The client's valid `traceparent`, if it sent one.
    pub incoming: Option<String>,
}

impl TraceContext {
    /// Continues the trace of a valid `traceparent` header, else starts one.
    pub fn from_header(header: Option<&str>) -> Self {
        let span_id = hex_id(8);
        match header.and_then(telemetry::parse_traceparent) {
            Some((trace_id, _, flags)) => Self {
                trace_id: trace_id.to_owned(),
                span_id,
                flags: flags.to_owned(),
                incoming: header.map(str::to_owned),
            },
            None => Self {
                trace_id: hex_id(16),
                span_id,
                flags: "01".to_owned(),
                incoming: None,
            },
        }
    }

    /// The `traceparent` naming this request's span as the parent: the
    /// exported span's ids when traces are exported (the handler runs in
    /// the request span), else this context's.
    pub fn traceparent(&self) -> String {
        telemetry::span_traceparent(&tracing::Span::current())
            .unwrap_or_else(|| format!("00-{}-{}-{}", self.trace_id, self.span_id, self.flags))
    }
}

/// A random id of `bytes` bytes (8 or 16) as lowercase hex, never all
/// zeros (which W3C trace context says is invalid).
fn hex_id(bytes: usize) -> String {
    let id = fastrand::u128(1..);
    match bytes {
        16 => format!("{id:032x}"),
        _ => format!("{:016x}", (id as u64).max(1)),
    }
}

/// Puts the request's [`TraceContext`] in its extensions (a plain request
/// map, `tower::util::MapRequestLayer`: no boxed middleware per request).
pub fn with_context(mut req: Request) -> Request {
    let header = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok());
    let trace = TraceContext::from_header(header);
    req.extensions_mut().insert(trace);
    req
}

/// The span of one request, in its trace: the child of the client's
/// `traceparent` if it sent one. Its `trace_id` field is the exported
/// trace's when traces are exported.
pub fn request_span(req: &Request, route: &str) -> tracing::Span {
    let trace = req.extensions().get::<TraceContext>();
    // Known now unless an exporter starts a new trace for this request:
    // then it is recorded from the exported span (a record costs more than
    // a field given at creation).
    let known = trace.filter(|t| t.incoming.is_some() || !telemetry::exporting());
    let span = tracing::info_span!(
        "request",
        method = %req.method(),
        route = %route,
        trace_id = known.map(|t| t.trace_id.as_str())
    );
    if let Some(incoming) = trace.and_then(|t| t.incoming.as_deref()) {
        telemetry::continue_trace(&span, incoming);
    }
    if known.is_none()
        && let Some(exported) = telemetry::span_traceparent(&span)
    {
        let trace_id = exported.split('-').nth(1).unwrap_or_default();
        span.record("trace_id", trace_id);
    }
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_traceparent_is_continued() {
        let t = TraceContext::from_header(Some(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ));
        assert_eq!(t.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(t.span_id, "00f067aa0ba902b7", "a new span for this request");
        assert!(
            t.traceparent()
                .starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-")
        );
    }

    #[test]
    fn malformed_or_zero_ids_start_a_new_trace() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        ] {
            let t = TraceContext::from_header(Some(bad));
            assert_ne!(t.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736", "{bad}");
            assert_eq!(t.trace_id.len(), 32);
        }
    }
}
