//! The tracing subscriber: log lines on stderr, and OpenTelemetry traces
//! exported over OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set.

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber. `filter` uses `RUST_LOG` syntax; the
/// `RUST_LOG` environment variable wins when set. Safe to call twice (the
/// second call does nothing), which in-process test clusters rely on.
pub fn init_logging(format: LogFormat, filter: &str) {
    let _ = init(None, format, filter);
}

/// Flushes exported spans when dropped (or on [`Telemetry::shutdown`]).
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are being exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports what is pending and stops the exporter.
    pub fn shutdown(mut self) {
        if let Some(p) = self.provider.take() {
            if let Err(e) = p.shutdown() {
                eprintln!("OTLP trace exporter shutdown: {e}");
            }
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

/// Like [`init_logging`], and with `service` (the `service.name` resource)
/// exports spans over OTLP/gRPC to `OTEL_EXPORTER_OTLP_ENDPOINT` when set.
/// Call it inside the Tokio runtime (the exporter's connection runs there).
pub fn init(service: Option<&'static str>, format: LogFormat, filter: &str) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(filter));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    // The log filter applies to log lines only: traces keep info-level spans
    // (one per API call) whatever the logs show.
    let fmt = match format {
        LogFormat::Text => fmt.with_filter(filter).boxed(),
        LogFormat::Json => fmt.json().with_filter(filter).boxed(),
    };
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT"))
        .ok()
        .filter(|e| !e.trim().is_empty());
    let mut telemetry = Telemetry::default();
    let otel = match (service, endpoint) {
        (Some(service), Some(endpoint)) => match exporter(service, &endpoint) {
            Ok(provider) => {
                let tracer = provider.tracer(service);
                opentelemetry::global::set_text_map_propagator(
                    opentelemetry_sdk::propagation::TraceContextPropagator::new(),
                );
                telemetry.provider = Some(provider);
                Some(
                    tracing_opentelemetry::layer()
                        .with_tracer(tracer)
                        .with_filter(tracing_subscriber::filter::LevelFilter::INFO),
                )
            }
            Err(e) => {
                eprintln!("OTEL_EXPORTER_OTLP_ENDPOINT {endpoint}: {e}; not exporting traces");
                None
            }
        },
        _ => None,
    };
    let installed = tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init();
    if installed.is_err() {
        // Someone else's subscriber: spans would not reach our exporter.
        if let Some(p) = telemetry.provider.take() {
            let _ = p.shutdown();
        }
    }
    telemetry
}

fn exporter(service: &'static str, endpoint: &str) -> Result<SdkTracerProvider, String> {
    use opentelemetry_otlp::WithExportConfig;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| e.to_string())?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service)
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

struct HeaderExtractor<'a>(&'a axum::http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(axum::http::HeaderName::as_str).collect()
    }
}

struct PairInjector<'a>(&'a mut Vec<(String, String)>);

impl Injector for PairInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.push((key.to_owned(), value));
    }
}

/// A span for one gRPC call to `path` (`/package.Service/Method`), child of
/// the W3C trace context in `headers` when the caller sent one.
pub fn grpc_span(path: &str, headers: &axum::http::HeaderMap) -> tracing::Span {
    let name = path.trim_start_matches('/');
    let span =
        tracing::info_span!("grpc", otel.name = %name, rpc.system = "grpc", otel.kind = "server");
    let parent =
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)));
    let _ = span.set_parent(parent);
    span
}

/// The current span's W3C trace context as header pairs (`traceparent`),
/// to send with a call made on its behalf. Empty when not exporting.
pub fn trace_headers() -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let cx = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut PairInjector(&mut pairs));
    });
    pairs
}

/// `span`'s W3C trace context (`traceparent`), to store with what it made
/// so later work, in another process, can join its trace. Empty when not
/// exporting.
pub fn traceparent(span: &tracing::Span) -> String {
    let mut pairs = Vec::new();
    let cx = span.context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut PairInjector(&mut pairs));
    });
    pairs
        .into_iter()
        .find(|(k, _)| k == "traceparent")
        .map(|(_, v)| v)
        .unwrap_or_default()
}

struct TraceparentExtractor<'a>(&'a str);

impl Extractor for TraceparentExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.0)
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

/// Makes `span` a child of the span whose `traceparent` (as
/// [`traceparent`] gave it) is stored with the work it started. An empty or
/// malformed value leaves `span` where it is.
pub fn set_traceparent(span: &tracing::Span, traceparent: &str) {
    if traceparent.is_empty() || traceparent.len() > 128 {
        return;
    }
    let parent = opentelemetry::global::get_text_map_propagator(|p| {
        p.extract(&TraceparentExtractor(traceparent))
    });
    let _ = span.set_parent(parent);
}
