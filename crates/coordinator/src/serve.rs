//! The gRPC server: every service on one listener, with TLS accepted here.

use std::time::Duration;

use cloudless_proto::v1::agent_service_server::AgentServiceServer;
use cloudless_proto::v1::cluster_service_server::ClusterServiceServer;
use cloudless_proto::v1::node_service_server::NodeServiceServer;
use cloudless_proto::v1::raft_service_server::RaftServiceServer;
use cloudless_proto::v1::secret_service_server::SecretServiceServer;
use cloudless_proto::v1::workload_service_server::WorkloadServiceServer;
use tokio_util::sync::CancellationToken;

use crate::agent_service::AgentApi;
use crate::cluster_service::ClusterApi;
use crate::handle::CoordinatorHandle;
use crate::node_service::NodeApi;
use crate::raft_network::MAX_RAFT_MESSAGE;
use crate::raft_service::RaftGrpc;
use crate::secret_service::SecretApi;
use crate::workload_service::WorkloadApi;

/// Largest message a NodeService call may send (enrollment: a token and a CSR).
const MAX_NODE_SERVICE_MESSAGE: usize = 256 * 1024;
/// Largest message an agent may send: a status report of
/// [`crate::agent_service::status_report::MAX_STATUS_ENTRIES`] replicas, or a
/// tunnel frame.
const MAX_AGENT_MESSAGE: usize = 1024 * 1024;

/// TLS handshakes in progress at once.
const MAX_HANDSHAKES: usize = 256;
/// TLS handshakes in progress at once from one source address; more
/// connections from it wait their turn, so silent connections from one
/// address cannot hold the handshake slots other callers need.
const MAX_HANDSHAKES_PER_ADDRESS: usize = 8;
/// Connections accepted and not yet through their handshake, from one
/// address and in all; beyond these a new connection is closed at once.
const MAX_PENDING_PER_ADDRESS: usize = 1024;
const MAX_PENDING: usize = 8192;
/// How long a client may take to finish its TLS handshake once it started.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an accepted connection may wait for a handshake slot.
const HANDSHAKE_QUEUE_TIMEOUT: Duration = Duration::from_secs(15);

type AddressSlots =
    std::collections::HashMap<std::net::IpAddr, (std::sync::Arc<tokio::sync::Semaphore>, usize)>;

/// Connections waiting for or in their handshake, per source address.
#[derive(Default)]
struct Pending {
    by_address: std::sync::Mutex<AddressSlots>,
    total: std::sync::atomic::AtomicUsize,
}

impl Pending {
    fn lock(&self) -> std::sync::MutexGuard<'_, AddressSlots> {
        self.by_address
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts a connection from `ip` and hands out its address's handshake
    /// slots; `None` when too many are pending.
    fn start(&self, ip: std::net::IpAddr) -> Option<std::sync::Arc<tokio::sync::Semaphore>> {
        use std::sync::atomic::Ordering;
        if self.total.load(Ordering::Relaxed) >= MAX_PENDING {
            return None;
        }
        let mut map = self.lock();
        let entry = map.entry(ip).or_insert_with(|| {
            (
                std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES_PER_ADDRESS)),
                0,
            )
        });
        if entry.1 >= MAX_PENDING_PER_ADDRESS {
            return None;
        }
        entry.1 += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        Some(entry.0.clone())
    }

    fn finish(&self, ip: std::net::IpAddr) {
        let mut map = self.lock();
        if let Some(entry) = map.get_mut(&ip) {
            entry.1 -= 1;
            if entry.1 == 0 {
                map.remove(&ip);
            }
        }
        self.total
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Accepts TCP connections on `listener` and yields them once their TLS
/// handshake is done. The server certificate is looked up at each handshake
/// (`tls::TlsMaterial::server_config`), so a renewed certificate is served
/// at once. Handshakes are bounded in number, per source address and in
/// time, and the listener never stops accepting.
fn tls_incoming(
    listener: tokio::net::TcpListener,
    config: std::sync::Arc<rustls::ServerConfig>,
    cancel: CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<
    Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>, std::io::Error>,
> {
    let (tx, rx) = tokio::sync::mpsc::channel(MAX_HANDSHAKES);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let pending = std::sync::Arc::new(Pending::default());
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = cancel.cancelled() => return,
                a = listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(address_slots) = pending.start(peer.ip()) else {
                tracing::debug!(%peer, "too many connections waiting for a TLS handshake; closed");
                continue;
            };
            // Without it, Nagle holds a response's trailing TLS record until
            // the client's delayed ACK (~40 ms tails under load).
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx, slots, pending) =
                (acceptor.clone(), tx.clone(), slots.clone(), pending.clone());
            tokio::spawn(async move {
                let handshake = tokio::time::timeout(HANDSHAKE_QUEUE_TIMEOUT, async {
                    let _mine = address_slots.acquire_owned().await.ok()?;
                    let _any = slots.acquire_owned().await.ok()?;
                    tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                        .await
                        .ok()
                })
                .await;
                pending.finish(peer.ip());
                match handshake {
                    Ok(Some(Ok(stream))) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Some(Err(e))) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    _ => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Serves Raft and the public API on `listener` until `cancel` fires: mTLS
/// with `tls`, plaintext without.
pub async fn serve(
    handle: CoordinatorHandle,
    listener: tokio::net::TcpListener,
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    metrics: cloudless_telemetry::GrpcMetrics,
    cancel: CancellationToken,
) {
    // A span per API call (Raft's own traffic is left out), continuing the
    // caller's trace when it sent a `traceparent`.
    let builder = tonic::transport::Server::builder().trace_fn(|req| {
        let path = req.uri().path();
        if path.starts_with("/cloudless.v1.RaftService/") {
            tracing::Span::none()
        } else {
            cloudless_telemetry::grpc_span(path, req.headers())
        }
    });
    let mut builder = builder.layer(metrics.layer());
    let router = builder
        .add_service(
            RaftServiceServer::new(RaftGrpc::new(handle.clone()))
                .max_decoding_message_size(MAX_RAFT_MESSAGE)
                .max_encoding_message_size(MAX_RAFT_MESSAGE),
        )
        .add_service(ClusterServiceServer::new(ClusterApi::new(handle.clone())))
        // Enrollment needs no client certificate: a join token and a CSR
        // fit in a few KiB.
        .add_service(
            NodeServiceServer::new(NodeApi::new(handle.clone()))
                .max_decoding_message_size(MAX_NODE_SERVICE_MESSAGE),
        )
        .add_service(crate::admission::NodeAdmission::new(
            AgentServiceServer::new(AgentApi::new(handle.clone()))
                .max_decoding_message_size(MAX_AGENT_MESSAGE),
            handle.clone(),
        ))
        .add_service(SecretServiceServer::new(SecretApi::new(handle.clone())))
        .add_service(WorkloadServiceServer::new(WorkloadApi::new(handle)));
    let result = match tls {
        Some(config) => {
            let incoming = tls_incoming(listener, config, cancel.clone());
            router
                .serve_with_incoming_shutdown(incoming, cancel.cancelled())
                .await
        }
        None => {
            // The builder's `tcp_nodelay` is ignored for a listener we bind
            // ourselves.
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            router
                .serve_with_incoming_shutdown(incoming, cancel.cancelled())
                .await
        }
    };
    if let Err(e) = result {
        tracing::error!(error = %e, "gRPC server failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_address_waits_for_its_own_handshake_slots_and_others_are_not_held_up() {
        let pending = Pending::default();
        let (a, b): (std::net::IpAddr, std::net::IpAddr) = (
            "192.0.2.1".parse().expect("ip"),
            "192.0.2.2".parse().expect("ip"),
        );
        // A's silent connections take all of A's slots...
        let slots_a = pending.start(a).expect("counted");
        let held: Vec<_> = (0..MAX_HANDSHAKES_PER_ADDRESS)
            .map(|_| slots_a.clone().try_acquire_owned().expect("slot"))
            .collect();
        assert!(
            slots_a.clone().try_acquire_owned().is_err(),
            "A's next connection waits"
        );
        // ...and B still gets one at once.
        let slots_b = pending.start(b).expect("counted");
        assert!(slots_b.try_acquire_owned().is_ok());
        drop(held);
        assert!(slots_a.try_acquire_owned().is_ok(), "A's turn comes");

        // Beyond the pending bound of one address, its connections are closed.
        for _ in 1..MAX_PENDING_PER_ADDRESS {
            pending.start(a).expect("counted");
        }
        assert!(pending.start(a).is_none());
        assert!(
            pending.start(b).is_some(),
            "another address is not affected"
        );
        pending.finish(a);
        assert!(
            pending.start(a).is_some(),
            "a finished handshake frees a place"
        );
    }
}
