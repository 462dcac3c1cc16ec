//! Refusals that need no request body: a node's write call is answered
//! before its (up to 1 MiB) message is read and decoded when this coordinator
//! is not the leader or the node is over its write rate, so a node flooding
//! at or past its limits costs the coordinators a few bytes of headers per
//! call instead of a decode on the workers that also serve everyone else.
//! The handlers check the same things again; this layer only answers sooner.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use cloudless_pki::Identity;
use tonic::server::NamedService;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::error::CoordinatorError;
use crate::handle::CoordinatorHandle;

/// Agent calls only the leader serves (followers answer UNAVAILABLE with
/// the leader hint).
const LEADER_ONLY: &[&str] = &["ReportStatus", "Renew", "Heartbeat"];
/// Agent calls that write through Raft and count against the node's rates.
const WRITES: &[&str] = &["ReportStatus", "Renew"];

/// Wraps a service with the early refusals above.
#[derive(Clone)]
pub(crate) struct NodeAdmission<S> {
    inner: S,
    handle: CoordinatorHandle,
}

impl<S> NodeAdmission<S> {
    pub(crate) fn new(inner: S, handle: CoordinatorHandle) -> Self {
        Self { inner, handle }
    }

    /// Why `method` from the caller with `extensions` is refused now, if it is.
    fn refusal(&self, method: &str, extensions: &http::Extensions) -> Option<tonic::Status> {
        if !LEADER_ONLY.contains(&method) {
            return None;
        }
        if let Err(e) = self.handle.ensure_leader() {
            return Some(e.into());
        }
        if !WRITES.contains(&method) {
            return None;
        }
        let node = node_of(&self.handle, extensions)?;
        self.handle
            .node_write_bytes_left(&node)
            .err()
            .map(CoordinatorError::into)
    }
}

/// The node whose verified certificate opened this connection, if any (the
/// handler refuses everything else with the full reason).
fn node_of(handle: &CoordinatorHandle, extensions: &http::Extensions) -> Option<String> {
    let ca_pem = handle.tls_ca_pem()?;
    let certs = extensions
        .get::<TlsConnectInfo<TcpConnectInfo>>()?
        .peer_certs()?;
    let leaf = certs.first()?;
    match handle
        .peer_cache()
        .identity(ca_pem, leaf.as_ref())
        .ok()?
        .identity
    {
        Identity::Node(id) => Some(id),
        _ => None,
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for NodeAdmission<S>
where
    S: tower::Service<
            http::Request<B>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
        > + NamedService
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // `/<service>/<method>` exactly: a longer path is no method of
        // this service (the router answers it Unimplemented).
        let path = req.uri().path();
        let method = path
            .strip_prefix('/')
            .and_then(|p| p.strip_prefix(S::NAME))
            .and_then(|p| p.strip_prefix('/'))
            .filter(|m| !m.contains('/'))
            .unwrap_or_default();
        if let Some(status) = self.refusal(method, req.extensions()) {
            tracing::debug!(method, code = ?status.code(), "refused before reading the request");
            return Box::pin(std::future::ready(Ok(status.into_http())));
        }
        Box::pin(self.inner.call(req))
    }
}

impl<S: NamedService> NamedService for NodeAdmission<S> {
    const NAME: &'static str = S::NAME;
}
