//! W3C trace context (`traceparent`): a request that sends one continues
//! its trace, any other starts a new one. The request span carries the
//! `trace_id`, and a submitted job stores the `traceparent` of the request
//! that created it, so the worker's span for the job joins the same trace.
//! It is stored with the job rather than sent in the queue message because
//! a message may start another job than the one it names (flow control).

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;

/// The trace a request belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// 32 lowercase hex digits.
    pub trace_id: String,
    /// This request's span id, 16 lowercase hex digits.
    pub span_id: String,
    /// Trace flags, 2 hex digits.
    pub flags: String,
}

impl TraceContext {
    /// Continues the trace of a valid `traceparent` header, else starts one.
    pub fn from_header(header: Option<&str>) -> Self {
        let span_id = hex_id(8);
        match header.and_then(parse) {
            Some((trace_id, flags)) => Self {
                trace_id,
                span_id,
                flags,
            },
            None => Self {
                trace_id: hex_id(16),
                span_id,
                flags: "01".to_owned(),
            },
        }
    }

    /// The `traceparent` naming this request's span as the parent.
    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-{}", self.trace_id, self.span_id, self.flags)
    }
}

/// `(trace id, flags)` of a version-00 `traceparent`; `None` if malformed
/// or all-zero ids (which the spec says to ignore).
fn parse(header: &str) -> Option<(String, String)> {
    let mut parts = header.trim().split('-');
    let (version, trace_id, parent_id, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let ok = version == "00"
        && parts.next().is_none()
        && hex(trace_id, 32)
        && hex(parent_id, 16)
        && hex(flags, 2)
        && trace_id.bytes().any(|b| b != b'0')
        && parent_id.bytes().any(|b| b != b'0');
    ok.then(|| (trace_id.to_owned(), flags.to_owned()))
}

fn hex_id(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", fastrand::u8(..)))
        .collect()
}

/// Middleware: puts the request's [`TraceContext`] in its extensions.
pub async fn layer(mut req: Request, next: Next) -> Response {
    let header = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok());
    let trace = TraceContext::from_header(header);
    req.extensions_mut().insert(trace);
    next.run(req).await
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
