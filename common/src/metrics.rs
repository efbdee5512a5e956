//! Prometheus exposition shared by the api and the worker: each process
//! owns one [`Registry`] (no global recorder), fills it with its own
//! metrics, and serves it as text on `GET /metrics`.
//!
//! Conventions: names start with `chatq_`, counters end in `_total` (the
//! encoder appends it), durations are `_seconds` histograms, and labels take
//! values from closed sets (route templates, status codes, error codes) —
//! never job, tenant or key ids.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// `Content-Type` of [`render`]'s output (OpenMetrics text, which
/// Prometheus scrapes natively and which is a superset of its text format).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Buckets for request handling and database-bound work, in seconds.
pub const FAST_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];
/// Buckets for LLM calls and time to first token, in seconds.
pub const LLM_BUCKETS: [f64; 12] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
];

/// A histogram family whose members are built by a plain function.
pub type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// A histogram with [`FAST_BUCKETS`].
pub fn fast_histogram() -> Histogram {
    Histogram::new(FAST_BUCKETS)
}

/// A histogram with [`LLM_BUCKETS`].
pub fn llm_histogram() -> Histogram {
    Histogram::new(LLM_BUCKETS)
}

/// The registry in the text exposition format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::with_capacity(16 * 1024);
    // Writing to a String cannot fail; an encoder error would be a bug in
    // a label encoder, and a partial page is still worth serving.
    if let Err(err) = encode(&mut out, registry) {
        tracing::error!(error = %err, "encoding metrics failed");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[test]
    fn counters_are_rendered_with_the_total_suffix() {
        let mut registry = Registry::default();
        let counter: Counter = Counter::default();
        registry.register("chatq_things", "Things.", counter.clone());
        counter.inc();
        let text = render(&registry);
        assert!(text.contains("chatq_things_total 1"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
