//! Everything the api records about a request, in one layer: the request
//! metrics (count and latency by method, route template and status), the
//! W3C trace context (a [`TraceContext`] extension) and the `request` span,
//! entered at every poll of the handler and of the response body and closed
//! when the body ends, with one `debug` line per answered request (target
//! `chatq_api::observe`).
//!
//! One layer rather than three (metrics, trace context, tower-http's
//! `TraceLayer`): every layer a router carries is one more boxed service
//! cloned and one more future wrapped per request, and this runs on every
//! request. It is the outermost layer, so requests shed for load and
//! requests that time out are counted and traced too.

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{MatchedPath, Request};
use axum::response::Response;
use futures_util::future::BoxFuture;

use crate::metrics::ApiMetrics;
use crate::trace::{self, TraceContext};

/// Layer: see the module docs.
#[derive(Clone)]
pub struct ObserveLayer {
    metrics: Option<Arc<ApiMetrics>>,
    spans: bool,
}

impl ObserveLayer {
    /// Metrics into `metrics`, trace context and spans.
    pub fn new(metrics: Arc<ApiMetrics>) -> Self {
        Self::parts(Some(metrics), true)
    }

    /// Only some parts: metrics if given, trace context and spans if
    /// `spans` (what the benchmark uses to tell what each part costs).
    pub fn parts(metrics: Option<Arc<ApiMetrics>>, spans: bool) -> Self {
        Self { metrics, spans }
    }
}

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service of [`ObserveLayer`].
#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    layer: ObserveLayer,
}

impl<S> tower::Service<Request> for Observe<S>
where
    S: tower::Service<Request, Response = Response>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        let started = Instant::now();
        let method = req.method().clone();
        let route = req.extensions().get::<MatchedPath>().cloned();
        let span = if self.layer.spans {
            let header = req
                .headers()
                .get("traceparent")
                .and_then(|v| v.to_str().ok());
            let context = TraceContext::from_header(header);
            let route = route.as_ref().map_or("unmatched", MatchedPath::as_str);
            let span = trace::request_span(&method, route, &context);
            req.extensions_mut().insert(context);
            span
        } else {
            tracing::Span::none()
        };
        let answer = {
            let _entered = span.enter();
            self.inner.call(req)
        };
        let metrics = self.layer.metrics.clone();
        Box::pin(async move {
            let mut answer = pin!(answer);
            let response = std::future::poll_fn(|cx| {
                let _entered = span.enter();
                answer.as_mut().poll(cx)
            })
            .await?;
            let elapsed = started.elapsed();
            let status = response.status().as_u16();
            let route = route.as_ref().map_or("unmatched", MatchedPath::as_str);
            if let Some(metrics) = &metrics {
                metrics.record_request(&method, route, status, elapsed);
            }
            if span.is_none() {
                return Ok(response);
            }
            // In the span without entering it: at `info` this line is off,
            // and entering the span for it would cost an enter and an exit
            // per request for nothing.
            tracing::debug!(
                parent: &span,
                status,
                latency_ms = elapsed.as_secs_f64() * 1e3,
                "request answered"
            );
            Ok(response.map(|body| Body::new(SpanBody { body, span })))
        })
    }
}

/// A response body polled inside its request's span, which it keeps open
/// until the body is dropped (a streamed answer's lines are in the span).
struct SpanBody {
    body: Body,
    span: tracing::Span,
}

impl HttpBody for SpanBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        let _entered = this.span.enter();
        Pin::new(&mut this.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use axum::Router;
    use axum::extract::Extension;
    use axum::http::StatusCode;
    use axum::routing::post;
    use tower::ServiceExt;

    async fn handler(Extension(trace): Extension<TraceContext>) -> (StatusCode, String) {
        (StatusCode::ACCEPTED, trace.traceparent())
    }

    #[tokio::test]
    async fn a_request_is_counted_by_route_template_and_continues_the_clients_trace() {
        let metrics = Arc::new(ApiMetrics::new());
        let router = Router::new()
            .route("/v1/things/{id}", post(handler))
            .layer(ObserveLayer::new(Arc::clone(&metrics)));
        let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        for _ in 0..2 {
            let req = Request::post("/v1/things/42")
                .header("traceparent", incoming)
                .body(Body::empty())
                .expect("a request");
            let response = router.clone().oneshot(req).await.expect("infallible");
            assert_eq!(response.status(), StatusCode::ACCEPTED);
            let body = axum::body::to_bytes(response.into_body(), 1024).await;
            let body = String::from_utf8(body.expect("a body").to_vec()).unwrap_or_default();
            assert!(
                body.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
                "the handler's trace context continues the client's: {body}"
            );
            assert!(!body.contains("00f067aa0ba902b7"), "with a span of its own");
        }
        let text = metrics.render();
        assert!(
            text.contains(
                r#"chatq_http_requests_total{method="POST",route="/v1/things/{id}",status="202"} 2"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"chatq_http_request_duration_seconds_count{method="POST",route="/v1/things/{id}",status="202"} 2"#));
    }
}
