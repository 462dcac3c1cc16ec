//! `/healthz`, `/readyz` and `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// Answers `/readyz`: `Ok(())` when ready, otherwise why not.
pub type Readiness = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Errors of the telemetry HTTP server.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The listen address could not be bound.
    #[error("cannot bind the HTTP listener on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
}

#[derive(Clone)]
struct AppState {
    registry: Arc<Registry>,
    ready: Readiness,
    /// One scrape encodes at a time: collectors may read a lot (a
    /// coordinator's state), and concurrent scrapes would only multiply it.
    scrape: Arc<tokio::sync::Semaphore>,
}

/// Serves on an already bound `listener` until `cancel` fires. Returns the
/// bound address and the serving task. (Callers bind first, so that a busy
/// port fails start-up before anything else has started.)
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    registry: Arc<Registry>,
    ready: Readiness,
    cancel: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), TelemetryError> {
    let local = listener
        .local_addr()
        .map_err(|source| TelemetryError::Bind {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(AppState {
            registry,
            ready,
            scrape: Arc::new(tokio::sync::Semaphore::new(1)),
        });
    let task = tokio::spawn(async move {
        let res = axum::serve(listener, app)
            .with_graceful_shutdown(async move { cancel.cancelled().await })
            .await;
        if let Err(e) = res {
            tracing::error!(error = %e, "telemetry HTTP server failed");
        }
    });
    Ok((local, task))
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    match (state.ready)() {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let _turn = state.scrape.acquire_owned().await;
    // Off the async workers: collectors read files and the state.
    let registry = state.registry.clone();
    let encoded = tokio::task::spawn_blocking(move || {
        let mut body = String::new();
        prometheus_client::encoding::text::encode(&mut body, &registry)
            .map(|()| body)
            .map_err(|e| e.to_string())
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()));
    match encoded {
        Ok(body) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            format!("encoding metrics failed: {e}\n"),
        ),
    }
}
