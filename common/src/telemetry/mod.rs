//! Tracing setup: a `RUST_LOG` filter (default `info`), `LOG_FORMAT=json` for JSON
//! lines, and, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, every span
//! exported over OTLP/HTTP (nothing is exported, and no exporter runs, when
//! it is not). The standard `OTEL_*` variables configure the exporter:
//! `OTEL_EXPORTER_OTLP_PROTOCOL` (`http/protobuf`, the default, or
//! `http/json`), `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_SERVICE_NAME` (default:
//! the executable's name), `OTEL_BSP_SCHEDULE_DELAY` and the other batch
//! settings.
//!
//! W3C trace context: [`continue_trace`] makes a span the child of a
//! `traceparent`, [`span_traceparent`] names a span as the parent of work
//! done elsewhere (a job stores its submitting request's).

mod json_fields;

use std::sync::OnceLock;

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{FilterExt, Targets};
use tracing_subscriber::layer::Filter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// What is exported: chatq's own spans and events from `info` up, other
/// crates' warnings.
const EXPORTED_SPANS: &str = "warn,chatq_api=info,chatq_worker=info,chatq_common=info";

/// The exporting tracer provider, when OTLP export is on.
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Installs the global subscriber. Call once, first thing in `main`, and
/// [`shutdown`] last.
pub fn init() {
    let json = std::env::var("LOG_FORMAT").is_ok_and(|v| v == "json");
    let filter = log_filter();
    let (otel, failed) = match otlp_provider() {
        Ok(Some(provider)) => {
            let tracer = provider.tracer("chatq");
            let _ = PROVIDER.set(provider);
            // Built when the span closes or a child needs it, not on entry:
            // a worker's span for a job learns its parent (the submit's)
            // only once it has claimed the job.
            let layer = tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_context_activation(false);
            (Some(layer), None)
        }
        Ok(None) => (None, None),
        Err(err) => (None, Some(err)),
    };
    let registry = tracing_subscriber::registry();
    match (otel, filter) {
        // The usual case: one filter for the whole subscriber, so a span or
        // event RUST_LOG leaves out costs nothing further.
        (None, LogFilter::Static(f)) => registry.with(f).with(fmt_layer(json)).init(),
        (None, LogFilter::Dynamic(f)) => registry.with(*f).with(fmt_layer(json)).init(),
        // Spans are exported whatever RUST_LOG keeps in the log: an operator
        // quieting logs still gets every request's and job's span (and the
        // info events in them). So each layer has its own filter.
        (Some(otel), filter) => {
            let exported = EXPORTED_SPANS
                .parse::<Targets>()
                .unwrap_or_else(|_| Targets::new().with_default(tracing::Level::INFO));
            registry
                .with(fmt_layer(json).with_filter(filter.boxed()))
                .with(otel.with_filter(exported))
                .init();
        }
    }
    if let Some(err) = failed {
        tracing::error!(error = %err, "OTLP trace export is off: the exporter could not be built");
    } else if PROVIDER.get().is_some() {
        tracing::info!("exporting traces over OTLP");
    }
}

/// The log lines, to stderr: text, or JSON objects with `json`.
fn fmt_layer<S>(json: bool) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    // JSON: the current span's fields only (`span`), not the list of every
    // enclosing span again: chatq's spans do not nest, and each span
    // serialized costs a parse of its stored fields per line. A span's
    // fields are kept as JSON by `JsonSpanFields` (cheaper to make and to
    // add to than tracing-subscriber's own).
    if json {
        fmt.json()
            .with_span_list(false)
            .fmt_fields(json_fields::JsonSpanFields)
            .boxed()
    } else {
        fmt.boxed()
    }
}

/// What `RUST_LOG` (default `info`) keeps in the log.
enum LogFilter {
    /// Targets and levels only (`info`, `warn,chatq_worker=debug`): no state
    /// per span, so entering and leaving a span costs no lock.
    Static(Targets),
    /// With span or field directives (`[job]=debug`): the full `EnvFilter`.
    Dynamic(Box<EnvFilter>),
}

impl LogFilter {
    fn boxed(self) -> Box<dyn Filter<Registry> + Send + Sync> {
        match self {
            Self::Static(f) => FilterExt::boxed(f),
            Self::Dynamic(f) => FilterExt::boxed(*f),
        }
    }
}

fn log_filter() -> LogFilter {
    let spec = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "info".to_owned());
    if !spec.contains(['[', '{'])
        && let Ok(targets) = spec.parse::<Targets>()
    {
        return LogFilter::Static(targets);
    }
    LogFilter::Dynamic(Box::new(
        EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new("info")),
    ))
}

/// The OTLP exporting provider if `OTEL_EXPORTER_OTLP_ENDPOINT` (or the
/// traces-only `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set.
fn otlp_provider() -> Result<Option<SdkTracerProvider>, opentelemetry_otlp::ExporterBuildError> {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    if !set("OTEL_EXPORTER_OTLP_ENDPOINT") && !set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        return Ok(None);
    }
    use opentelemetry_otlp::{Protocol, WithExportConfig};
    // The workspace's reqwest has no default TLS provider (https endpoints).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_http();
    // OTLP's default encoding unless the operator chose one.
    if !set("OTEL_EXPORTER_OTLP_PROTOCOL") && !set("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") {
        exporter = exporter.with_protocol(Protocol::HttpBinary);
    }
    let exporter = exporter.build()?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if !set("OTEL_SERVICE_NAME") {
        let name = std::env::current_exe()
            .ok()
            .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "chatq".to_owned());
        resource = resource.with_service_name(name);
    }
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build(),
    ))
}

/// Sends the spans not exported yet and stops the exporter. Call last in
/// `main`; a no-op without OTLP export.
pub fn shutdown() {
    if let Some(provider) = PROVIDER.get()
        && let Err(err) = provider.shutdown()
    {
        tracing::warn!(error = %err, "flushing the last spans failed");
    }
}

/// `(trace id, span id, flags)` of a W3C version-00 `traceparent`, lowercase
/// hex; `None` if malformed or an id is all zeros (which the spec says to
/// ignore).
pub fn parse_traceparent(header: &str) -> Option<(&str, &str, &str)> {
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
    ok.then_some((trace_id, parent_id, flags))
}

/// Makes `span` (not started yet) the child of the span a `traceparent`
/// names, in the exported trace. False when nothing is exported or the
/// span had already started.
pub fn continue_trace(span: &tracing::Span, traceparent: &str) -> bool {
    if !exporting() {
        return false;
    }
    let Some((trace_id, parent_id, flags)) = parse_traceparent(traceparent) else {
        return false;
    };
    let (Ok(trace_id), Ok(parent_id), Ok(flags)) = (
        TraceId::from_hex(trace_id),
        SpanId::from_hex(parent_id),
        u8::from_str_radix(flags, 16),
    ) else {
        return false;
    };
    let parent = SpanContext::new(
        trace_id,
        parent_id,
        TraceFlags::new(flags),
        true,
        TraceState::default(),
    );
    span.set_parent(opentelemetry::Context::new().with_remote_span_context(parent))
        .is_ok()
}

/// Whether spans are exported (OTLP).
pub fn exporting() -> bool {
    PROVIDER.get().is_some()
}

/// The `traceparent` naming `span` as the parent, as exported (its trace
/// and span ids); `None` when nothing is exported.
pub fn span_traceparent(span: &tracing::Span) -> Option<String> {
    PROVIDER.get()?;
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

/// Cancels `shutdown` on Ctrl-C or SIGTERM (the one shutdown signal every
/// chatq process obeys).
pub async fn cancel_on_signal(shutdown: tokio_util::sync::CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(err) => {
            tracing::error!(error = %err, "cannot listen for SIGTERM; only Ctrl-C stops this process");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("shutdown requested");
    shutdown.cancel();
}
