//! Logging set-up and the operational HTTP endpoints shared by every daemon.

mod grpc;
mod http;
mod logging;
mod process;

pub use grpc::{GrpcMetrics, GrpcMetricsLayer, GrpcMetricsService, MeteredBody};
pub use http::{serve_http, Readiness, TelemetryError};
pub use logging::{
    grpc_span, init, init_logging, set_traceparent, trace_headers, traceparent, LogFormat,
    Telemetry,
};
pub use process::register_process_metrics;
