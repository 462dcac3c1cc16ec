//! Logging set-up and the operational HTTP endpoints shared by every daemon.

mod http;
mod logging;

pub use http::{serve_http, Readiness, TelemetryError};
pub use logging::{init_logging, LogFormat};
