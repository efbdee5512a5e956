//! W3C trace context (`traceparent`): a request that sends one continues
//! its trace, any other starts a new one. The request span carries the
//! `trace_id`, and a submitted job stores the `traceparent` of the request
//! that created it, so the worker's span for the job joins the same trace.
//! It is stored with the job rather than sent in the queue message because
//! a message may start another job than the one it names (flow control).
//! With OTLP export on (`chatq_common::telemetry`), the ids are the
//! exported spans' own, so the worker's span is the child of the submit's.

use axum::http::Method;
use chatq_common::telemetry;

/// The trace a request belongs to. The ids are kept as numbers and written
/// as hex only where they are shown (the span's `trace_id`, the stored
/// `traceparent`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    trace_id: u128,
    span_id: u64,
    flags: u8,
    /// The client's valid `traceparent`, if it sent one.
    incoming: Option<String>,
}

impl TraceContext {
    /// Continues the trace of a valid `traceparent` header, else starts one.
    pub fn from_header(header: Option<&str>) -> Self {
        let span_id = fastrand::u64(1..);
        let parsed = header.and_then(|h| {
            let (trace_id, _, flags) = telemetry::parse_traceparent(h)?;
            Some((
                u128::from_str_radix(trace_id, 16).ok()?,
                u8::from_str_radix(flags, 16).ok()?,
            ))
        });
        match parsed {
            Some((trace_id, flags)) => Self {
                trace_id,
                span_id,
                flags,
                incoming: header.map(str::to_owned),
            },
            None => Self {
                trace_id: fastrand::u128(1..),
                span_id,
                flags: 1,
                incoming: None,
            },
        }
    }

    /// The trace id: 32 lowercase hex digits when shown.
    pub fn trace_id(&self) -> impl std::fmt::Display + use<> {
        TraceId(self.trace_id)
    }

    /// The `traceparent` naming this request's span as the parent: the
    /// exported span's ids when traces are exported (the handler runs in
    /// the request span), else this context's.
    pub fn traceparent(&self) -> String {
        telemetry::span_traceparent(&tracing::Span::current()).unwrap_or_else(|| {
            let mut s = String::with_capacity(55);
            s.push_str("00-");
            s.push_str(hex(self.trace_id, &mut [0; 32]));
            s.push('-');
            s.push_str(hex(u128::from(self.span_id), &mut [0; 16]));
            s.push('-');
            s.push_str(hex(u128::from(self.flags), &mut [0; 2]));
            s
        })
    }
}

/// A trace id shown as 32 lowercase hex digits.
#[derive(Clone, Copy)]
struct TraceId(u128);

impl std::fmt::Display for TraceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(hex(self.0, &mut [0; 32]))
    }
}

/// The low `out.len()` hex digits of `n`, lowercase, zero-padded, written
/// into `out` (what `{:032x}` writes, without the formatting machinery:
/// this runs on every request).
fn hex(n: u128, out: &mut [u8]) -> &str {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let len = out.len();
    for (i, digit) in out.iter_mut().enumerate() {
        *digit = DIGITS[((n >> (4 * (len - 1 - i))) & 0xf) as usize];
    }
    std::str::from_utf8(out).unwrap_or_default()
}

/// The span of one request, in its trace: the child of the client's
/// `traceparent` if it sent one. Its `trace_id` field is the exported
/// trace's when traces are exported.
pub fn request_span(method: &Method, route: &str, trace: &TraceContext) -> tracing::Span {
    // Known now unless an exporter starts a new trace for this request:
    // then it is recorded from the exported span (a record costs more than
    // a field given at creation).
    let known = trace.incoming.is_some() || !telemetry::exporting();
    let span = tracing::info_span!(
        "request",
        method = method.as_str(),
        route,
        trace_id = known.then(|| tracing::field::display(trace.trace_id()))
    );
    if let Some(incoming) = trace.incoming.as_deref() {
        telemetry::continue_trace(&span, incoming);
    }
    if !known && let Some(exported) = telemetry::span_traceparent(&span) {
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
        assert_eq!(t.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(
            t.span_id, 0x00f0_67aa_0ba9_02b7,
            "a new span for this request"
        );
        assert!(
            t.traceparent()
                .starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-")
        );
    }

    #[test]
    fn ids_are_written_as_zero_padded_lowercase_hex() {
        assert_eq!(hex(0xab, &mut [0; 32]), format!("{:032x}", 0xab));
        assert_eq!(hex(u128::MAX, &mut [0; 2]), "ff");
        let t = TraceContext {
            trace_id: u128::MAX - 1,
            span_id: 0x0a,
            flags: 1,
            incoming: None,
        };
        assert_eq!(t.trace_id().to_string(), format!("{:032x}", u128::MAX - 1));
        assert_eq!(
            t.traceparent(),
            format!("00-{:032x}-{:016x}-01", u128::MAX - 1, 0x0a)
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
            let id = t.trace_id().to_string();
            assert_ne!(id, "4bf92f3577b34da6a3ce929d0e0e4736", "{bad}");
            assert_eq!(id.len(), 32);
            assert!(t.traceparent().starts_with(&format!("00-{id}-")), "{bad}");
        }
    }
}
