//! Logging set-up and the operational HTTP endpoints shared by every daemon.

mod http;
mod logging;

pub use http::{serve_http, Readiness, TelemetryError};
pub use logging::{grpc_span, init, init_logging, trace_headers, LogFormat, Telemetry};
