//! The overlay endpoint: connections by peer identity, streams, relaying.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use cloudless_pki::Identity;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use crate::admission::{Admission, AdmitAll};
use crate::datagram::{DatagramPath, FlowRouter, Room};
use crate::tls::OverlayTls;
use crate::wire::{read_frame, write_frame, StreamReply, StreamRequest};
use crate::OverlayError;

/// The server name a dialer sends; certificates are checked by identity.
const SERVER_NAME: &str = "overlay.cloudless";
/// Close code for a connection that reached the wrong node.
const WRONG_PEER: u32 = 1;
/// Close code on shutdown.
const SHUTDOWN: u32 = 0;
/// Close code for a peer the admission policy refuses.
const NOT_ADMITTED: u32 = 2;
/// How long an opener has to send its request frame.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How long an opener (or a relay, for the next node) waits for the answer
/// to its request: the target's connect, or the relay's onward open. A node
/// that never answers holds no stream, and no flow's place, for longer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// After a failed direct dial, streams to that peer go through relays
/// without dialing again for this long (unless its addresses change).
const DIRECT_RETRY: Duration = Duration::from_secs(30);
/// How long both sides keep dialing after a relay's introduction.
const PUNCH_WINDOW: Duration = Duration::from_secs(3);
/// One dial attempt within that window (quinn resends its Initial meanwhile).
const PUNCH_ATTEMPT: Duration = Duration::from_millis(1000);

/// Settings of an overlay endpoint.
#[derive(Debug, Clone)]
pub struct OverlayConfig {
    /// UDP address to bind (port 0 picks one).
    pub listen: SocketAddr,
    /// A connection without traffic for this long is closed; keep-alives go
    /// every third of it, which also holds NAT mappings open.
    pub idle_timeout: Duration,
    /// How long one dial (one address) may take.
    pub connect_timeout: Duration,
    /// Whether this node relays streams for other nodes.
    pub relay: bool,
    /// Whether to try NAT hole punching (through a relay's introduction)
    /// before relaying a stream.
    pub hole_punching: bool,
    /// Whether to offer UDP flows' datagrams in QUIC DATAGRAM frames
    /// ([`crate::ALPN_DATAGRAMS`]); off, the node speaks the protocol of two
    /// releases ago, every datagram on its flow's stream.
    pub datagram_flows: bool,
    /// With `datagram_flows`, whether to offer them through relays too
    /// ([`crate::ALPN_RELAYED_DATAGRAMS`]); off, the node speaks the
    /// previous release's protocol (a relayed flow's datagrams on its
    /// stream).
    pub relayed_datagrams: bool,
}

impl Default for OverlayConfig {
    fn default() -> Self {
        OverlayConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 7600)),
            idle_timeout: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(3),
            relay: false,
            hole_punching: true,
            datagram_flows: true,
            relayed_datagrams: true,
        }
    }
}

impl OverlayConfig {
    fn protocols(&self) -> crate::tls::Protocols {
        crate::tls::Protocols {
            datagrams: self.datagram_flows,
            relayed_datagrams: self.relayed_datagrams,
        }
    }
}

/// What a stream's target is on the receiving node.
#[derive(Debug)]
pub enum Connected {
    /// A TCP connection: the stream carries its bytes.
    Tcp(TcpStream),
    /// A UDP socket connected to its one peer: the stream carries its
    /// datagrams (see [`crate::datagram`]).
    Udp(UdpSocket),
}

impl From<TcpStream> for Connected {
    fn from(s: TcpStream) -> Self {
        Self::Tcp(s)
    }
}

/// A boxed connect future.
pub type ConnectFuture<'a> = Pin<Box<dyn Future<Output = Result<Connected, String>> + Send + 'a>>;

/// Turns a stream's target into a local TCP connection or UDP flow on the
/// receiving node (for example to a container's address). `origin` is the
/// node that opened the stream; an error is sent back to it as the refusal
/// reason.
pub trait Resolver: Send + Sync + 'static {
    /// Connects to `target` for `origin`.
    fn connect<'a>(&'a self, origin: &'a Identity, target: &'a str) -> ConnectFuture<'a>;

    /// Whether a stream `origin` opened to `target` may go on (asked by
    /// [`Overlay::recheck_streams`] for every stream being served).
    fn still_allows(&self, _origin: &Identity, _target: &str) -> bool {
        true
    }
}

/// A fixed table of targets to local addresses.
#[derive(Debug, Default, Clone)]
pub struct StaticResolver {
    targets: HashMap<String, SocketAddr>,
}

impl StaticResolver {
    /// Adds `target` -> `address`.
    pub fn with(mut self, target: &str, address: SocketAddr) -> Self {
        self.targets.insert(target.to_owned(), address);
        self
    }
}

impl Resolver for StaticResolver {
    fn connect<'a>(&'a self, _origin: &'a Identity, target: &'a str) -> ConnectFuture<'a> {
        Box::pin(async move {
            let addr = self
                .targets
                .get(target)
                .ok_or_else(|| format!("no target {target:?} on this node"))?;
            TcpStream::connect(addr)
                .await
                .map(Connected::Tcp)
                .map_err(|e| format!("target {target:?} ({addr}): {e}"))
        })
    }
}

/// Counters of an endpoint.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OverlayStats {
    /// Streams this node opened.
    pub streams_opened: u64,
    /// Streams this node accepted and connected to a local target.
    pub streams_served: u64,
    /// Streams this node relayed between two others.
    pub streams_relayed: u64,
    /// Streams refused (bad request, unknown target, not a relay...).
    pub streams_refused: u64,
    /// Connections accepted whose peer certificate was checked.
    pub connections_accepted: u64,
    /// Payload bytes written into streams (a relay counts what it forwards).
    pub bytes_sent: u64,
    /// Payload bytes read from streams.
    pub bytes_received: u64,
    /// UDP flows' datagrams this node sent as QUIC DATAGRAM frames.
    pub datagrams_as_frames: u64,
    /// UDP flows' datagrams this node sent on their flow's stream: too large
    /// for a packet or for the rest of a relayed path, through a relay of an
    /// earlier release, or to a peer of one.
    pub datagrams_on_streams: u64,
    /// UDP flows' datagrams this node did not send (or, as a relay, did not
    /// forward): the connection's queue of QUIC datagrams held
    /// [`crate::datagram::QUEUE_LIMIT`] bytes.
    pub datagrams_queue_full: u64,
    /// QUIC datagrams this node forwarded as a relay, from one node's flow
    /// to the other's.
    pub datagrams_relayed: u64,
    /// QUIC datagrams received for no open flow of their connection, for a
    /// flow whose queue was full, malformed, or (as a relay) too large for
    /// the next connection's packets: dropped, as a full UDP socket or a
    /// router drops.
    pub datagrams_dropped: u64,
    /// How this node tried to reach peers for its streams, by method, and
    /// how often each worked: see [`Traversal`].
    pub traversal: [Traversal; 3],
}

/// One way of reaching a peer with no live connection, and its outcomes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Traversal {
    /// `direct` (a dial of the peer's addresses), `hole_punch` (a dial
    /// after a relay's introduction) or `relay` (a stream through a relay).
    pub method: &'static str,
    /// Attempts that reached the peer.
    pub succeeded: u64,
    /// Attempts that did not.
    pub failed: u64,
}

#[derive(Default)]
struct Counters {
    opened: AtomicU64,
    served: AtomicU64,
    relayed: AtomicU64,
    refused: AtomicU64,
    accepted: AtomicU64,
    /// By method (direct, hole_punch, relay): succeeded, failed.
    traversal: [[AtomicU64; 2]; 3],
    /// Bytes of every stream, shared with the streams.
    bytes: Arc<StreamBytes>,
}

/// Bytes the endpoint's streams carried (payload, not QUIC's overhead).
#[derive(Debug, Default)]
pub(crate) struct StreamBytes {
    /// Written into streams (a relay counts what it forwards).
    pub(crate) sent: AtomicU64,
    /// Read from streams.
    pub(crate) received: AtomicU64,
    /// UDP flows' datagrams sent as QUIC datagrams.
    pub(crate) datagrams_as_frames: AtomicU64,
    /// UDP flows' datagrams sent on their stream.
    pub(crate) datagrams_on_streams: AtomicU64,
    /// QUIC datagrams received and dropped.
    pub(crate) datagrams_dropped: AtomicU64,
    /// UDP flows' datagrams not sent: the connection's queue was full.
    pub(crate) datagrams_queue_full: AtomicU64,
    /// QUIC datagrams forwarded as a relay.
    pub(crate) datagrams_relayed: AtomicU64,
}

impl StreamBytes {
    pub(crate) fn sent(&self, n: u64) {
        self.sent.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn received(&self, n: u64) {
        self.received.fetch_add(n, Ordering::Relaxed);
    }
}

/// The methods of [`Traversal`], in the order of [`Counters::traversal`].
const TRAVERSAL_METHODS: [&str; 3] = ["direct", "hole_punch", "relay"];

impl Counters {
    fn traversed(&self, method: usize, ok: bool) {
        self.traversal[method][usize::from(!ok)].fetch_add(1, Ordering::Relaxed);
    }
}

/// A node's overlay endpoint. Cheap to clone.
#[derive(Clone)]
pub struct Overlay {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Overlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overlay")
            .field("me", &self.inner.me)
            .field("local", &self.inner.endpoint.local_addr().ok())
            .finish_non_exhaustive()
    }
}

struct Inner {
    me: Identity,
    tls: OverlayTls,
    config: OverlayConfig,
    endpoint: quinn::Endpoint,
    client: Mutex<quinn::ClientConfig>,
    resolver: Arc<dyn Resolver>,
    /// Who may hold a connection besides having a cluster certificate.
    admission: Mutex<Arc<dyn Admission>>,
    /// Known addresses of peers.
    addresses: Mutex<HashMap<Identity, Vec<SocketAddr>>>,
    /// Live connections by peer, whichever side dialed.
    connections: Mutex<HashMap<Identity, quinn::Connection>>,
    /// Nodes asked to relay when a peer cannot be dialed; kept connected.
    relays: Mutex<Vec<Identity>>,
    /// Streams being served to a local target: (origin, target, cut).
    served: Mutex<HashMap<u64, (Identity, String, tokio_util::sync::CancellationToken)>>,
    next_served: AtomicU64,
    /// When a direct dial to a peer last failed.
    direct_failed: Mutex<HashMap<Identity, std::time::Instant>>,
    /// Where each connection's QUIC datagrams go, by its stable id (only
    /// connections that speak [`crate::ALPN_DATAGRAMS`]).
    routers: Mutex<HashMap<usize, Arc<FlowRouter>>>,
    counters: Counters,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Overlay {
    /// Binds the endpoint and starts accepting connections.
    pub fn bind(
        config: OverlayConfig,
        tls: OverlayTls,
        me: Identity,
        resolver: Arc<dyn Resolver>,
    ) -> Result<Overlay, OverlayError> {
        let socket = std::net::UdpSocket::bind(config.listen)
            .map_err(|e| OverlayError::Io(format!("binding UDP {}: {e}", config.listen)))?;
        Self::bind_socket(config, tls, me, resolver, socket)
    }

    /// Like [`Overlay::bind`], on a socket made by the caller (for example
    /// in another network namespace); `config.listen` is not used.
    pub fn bind_socket(
        config: OverlayConfig,
        tls: OverlayTls,
        me: Identity,
        resolver: Arc<dyn Resolver>,
        socket: std::net::UdpSocket,
    ) -> Result<Overlay, OverlayError> {
        let server = tls.server_config(config.idle_timeout, config.protocols())?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|e| OverlayError::Io(format!("UDP endpoint: {e}")))?;
        let client = Mutex::new(tls.client_config(config.idle_timeout, config.protocols())?);
        let overlay = Overlay {
            inner: Arc::new(Inner {
                me,
                tls,
                config,
                endpoint,
                client,
                resolver,
                admission: Mutex::new(Arc::new(AdmitAll)),
                addresses: Mutex::default(),
                connections: Mutex::default(),
                relays: Mutex::default(),
                served: Mutex::default(),
                next_served: AtomicU64::new(0),
                direct_failed: Mutex::default(),
                routers: Mutex::default(),
                counters: Counters::default(),
            }),
        };
        let weak = Arc::downgrade(&overlay.inner);
        let endpoint = overlay.inner.endpoint.clone();
        tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let Some(inner) = weak.upgrade() else { break };
                let overlay = Overlay { inner };
                tokio::spawn(async move {
                    match incoming.await {
                        Ok(conn) => overlay.adopt(conn, None).await,
                        Err(e) => tracing::debug!(error = %e, "overlay handshake failed"),
                    }
                });
            }
        });
        Ok(overlay)
    }

    /// Presents a renewed certificate from now on (same identity, same CA);
    /// live connections keep the one they were made with.
    pub fn reload_tls(&self, tls: &OverlayTls) -> Result<(), OverlayError> {
        let config = &self.inner.config;
        let server = tls.server_config(config.idle_timeout, config.protocols())?;
        let client = tls.client_config(config.idle_timeout, config.protocols())?;
        self.inner.endpoint.set_server_config(Some(server));
        *lock(&self.inner.client) = client;
        Ok(())
    }

    /// This node's identity.
    pub fn identity(&self) -> &Identity {
        &self.inner.me
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> Result<SocketAddr, OverlayError> {
        self.inner
            .endpoint
            .local_addr()
            .map_err(|e| OverlayError::Io(e.to_string()))
    }

    /// Sets the addresses `peer` may be dialed at (replacing earlier ones).
    pub fn set_peer(&self, peer: Identity, addresses: Vec<SocketAddr>) {
        let mut known = lock(&self.inner.addresses);
        if known.get(&peer) != Some(&addresses) {
            lock(&self.inner.direct_failed).remove(&peer);
            known.insert(peer, addresses);
        }
    }

    /// Forgets `peer`: its addresses, and closes a live connection.
    pub fn remove_peer(&self, peer: &Identity) {
        lock(&self.inner.addresses).remove(peer);
        if let Some(c) = lock(&self.inner.connections).remove(peer) {
            c.close(SHUTDOWN.into(), b"removed");
        }
    }

    /// Refuses peers `admission` does not admit from now on (connections,
    /// streams and relay targets); see [`Overlay::enforce_admission`] for
    /// connections already open.
    pub fn set_admission(&self, admission: Arc<dyn Admission>) {
        *lock(&self.inner.admission) = admission;
    }

    /// Closes the live connections of peers the admission policy refuses
    /// now (call it when the policy's answers may have changed); returns them.
    pub fn enforce_admission(&self) -> Vec<Identity> {
        let mut refused = Vec::new();
        let mut conns = lock(&self.inner.connections);
        conns.retain(|peer, conn| match self.admit(peer) {
            Ok(()) => true,
            Err(why) => {
                tracing::info!(%peer, reason = %why, "closing the overlay connection of a peer no longer admitted");
                conn.close(NOT_ADMITTED.into(), b"not admitted");
                refused.push(peer.clone());
                false
            }
        });
        refused
    }

    /// Cuts the streams being served whose origin the resolver no longer
    /// allows to reach their target (for example a caller removed from the
    /// cluster); returns how many.
    pub fn recheck_streams(&self) -> usize {
        let mut cut = 0;
        lock(&self.inner.served).retain(|_, (origin, target, token)| {
            if self.inner.resolver.still_allows(origin, target) {
                true
            } else {
                tracing::info!(%origin, target = %target, "cutting an overlay stream no longer allowed");
                token.cancel();
                cut += 1;
                false
            }
        });
        cut
    }

    fn admit(&self, peer: &Identity) -> Result<(), String> {
        let admission = lock(&self.inner.admission).clone();
        admission.admit(peer)
    }

    /// The nodes to relay through when a peer cannot be dialed. This node
    /// keeps a connection to each (see [`Overlay::keep_relays_connected`]),
    /// so they can reach it even behind NAT; streams they open to it may
    /// name their origin.
    pub fn set_relays(&self, relays: Vec<Identity>) {
        *lock(&self.inner.relays) = relays;
    }

    /// Counters so far.
    pub fn stats(&self) -> OverlayStats {
        let c = &self.inner.counters;
        OverlayStats {
            streams_opened: c.opened.load(Ordering::Relaxed),
            streams_served: c.served.load(Ordering::Relaxed),
            streams_relayed: c.relayed.load(Ordering::Relaxed),
            streams_refused: c.refused.load(Ordering::Relaxed),
            connections_accepted: c.accepted.load(Ordering::Relaxed),
            bytes_sent: c.bytes.sent.load(Ordering::Relaxed),
            bytes_received: c.bytes.received.load(Ordering::Relaxed),
            datagrams_as_frames: c.bytes.datagrams_as_frames.load(Ordering::Relaxed),
            datagrams_on_streams: c.bytes.datagrams_on_streams.load(Ordering::Relaxed),
            datagrams_dropped: c.bytes.datagrams_dropped.load(Ordering::Relaxed),
            datagrams_queue_full: c.bytes.datagrams_queue_full.load(Ordering::Relaxed),
            datagrams_relayed: c.bytes.datagrams_relayed.load(Ordering::Relaxed),
            traversal: std::array::from_fn(|i| Traversal {
                method: TRAVERSAL_METHODS[i],
                succeeded: c.traversal[i][0].load(Ordering::Relaxed),
                failed: c.traversal[i][1].load(Ordering::Relaxed),
            }),
        }
    }

    /// Peers with a live connection now.
    pub fn connected_peers(&self) -> Vec<Identity> {
        lock(&self.inner.connections)
            .iter()
            .filter(|(_, c)| c.close_reason().is_none())
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// Closes every connection and stops accepting new ones.
    pub fn close(&self) {
        self.inner.endpoint.close(SHUTDOWN.into(), b"shutdown");
        lock(&self.inner.connections).clear();
    }

    /// Closes every connection and the endpoint, and waits for the peers to
    /// hear of it.
    pub async fn shutdown(&self) {
        self.inner.endpoint.close(SHUTDOWN.into(), b"shutdown");
        lock(&self.inner.connections).clear();
        self.inner.endpoint.wait_idle().await;
    }

    /// Dials every relay without a live connection; returns the failures.
    /// Run it periodically (a node behind NAT must hold these connections).
    pub async fn keep_relays_connected(&self) -> Vec<(Identity, OverlayError)> {
        let relays = lock(&self.inner.relays).clone();
        let mut failed = Vec::new();
        for r in relays {
            if let Err(e) = self.connection(&r).await {
                failed.push((r, e));
            }
        }
        failed
    }

    /// Asks `peer` which address it sees this node at (the public address
    /// when `peer` is outside our NAT).
    pub async fn observed_address(&self, peer: &Identity) -> Result<SocketAddr, OverlayError> {
        let conn = self.connection(peer).await?;
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| OverlayError::Io(format!("opening a stream to {peer}: {e}")))?;
        write_frame(&mut send, &StreamRequest::WhoAmI).await?;
        let reply: StreamReply = read_frame(&mut recv).await?;
        let _ = send.finish();
        reply
            .observed
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| OverlayError::Protocol(format!("{peer} sent no observed address")))
    }

    /// Opens a stream to `target` on `peer`: directly when a connection
    /// exists or an address answers, else through each relay in turn.
    pub async fn open(&self, peer: &Identity, target: &str) -> Result<OverlayStream, OverlayError> {
        self.open_stream(peer, target, false).await
    }

    /// [`Overlay::open`] for a UDP flow ([`OverlayStream::into_datagrams`]):
    /// on a connection that speaks QUIC datagrams (to the target's node, or
    /// to a relay of this release, which then forwards them) the flow takes
    /// them from before its request, so a target that sends first loses
    /// nothing.
    pub async fn open_flow(
        &self,
        peer: &Identity,
        target: &str,
    ) -> Result<OverlayStream, OverlayError> {
        self.open_stream(peer, target, true).await
    }

    async fn open_stream(
        &self,
        peer: &Identity,
        target: &str,
        flow: bool,
    ) -> Result<OverlayStream, OverlayError> {
        let recently_failed = lock(&self.inner.direct_failed)
            .get(peer)
            .is_some_and(|t| t.elapsed() < DIRECT_RETRY);
        let attempt = if recently_failed && self.live(peer).is_none() {
            Err(OverlayError::Unreachable {
                peer: peer.uri(),
                detail: format!("a direct dial failed within the last {DIRECT_RETRY:?}"),
            })
        } else {
            let counters = &self.inner.counters;
            let dialed = self.live(peer).is_none();
            let r = match self.connection(peer).await {
                Ok(c) => {
                    if dialed {
                        counters.traversed(0, true);
                    }
                    Ok(c)
                }
                Err(e) if self.inner.config.hole_punching => {
                    counters.traversed(0, false);
                    let punched = self.punch(peer).await;
                    counters.traversed(1, punched.is_ok());
                    match punched {
                        Ok(c) => Ok(c),
                        Err(p) => Err(OverlayError::Unreachable {
                            peer: peer.uri(),
                            detail: format!("{e}; hole punching: {p}"),
                        }),
                    }
                }
                Err(e) => {
                    counters.traversed(0, false);
                    Err(e)
                }
            };
            if r.is_err() {
                lock(&self.inner.direct_failed).insert(peer.clone(), std::time::Instant::now());
            }
            r
        };
        let direct = match attempt {
            Ok(conn) => {
                let request = StreamRequest::Open {
                    target: target.to_owned(),
                    origin: None,
                    datagrams: None,
                };
                match self.request(&conn, peer, &request, flow).await {
                    Ok(stream) => return Ok(stream),
                    // The target refused: a relay would be refused too.
                    Err(e @ OverlayError::Refused { .. }) => return Err(e),
                    Err(e) => e,
                }
            }
            Err(e) => e,
        };
        let mut detail = format!("direct: {direct}");
        let relays = lock(&self.inner.relays).clone();
        for relay in relays.iter().filter(|r| *r != peer) {
            let counters = &self.inner.counters;
            match self.connection(relay).await {
                Ok(conn) => {
                    // A UDP flow asks the relay to forward its QUIC datagrams
                    // when the relay's protocol has the word for it.
                    let datagrams = flow && crate::tls::relays_datagrams(&conn);
                    let request = StreamRequest::Relay {
                        to: peer.uri(),
                        target: target.to_owned(),
                        datagrams,
                    };
                    match self.request(&conn, relay, &request, datagrams).await {
                        Ok(stream) => {
                            counters.traversed(2, true);
                            return Ok(stream);
                        }
                        Err(e) => {
                            counters.traversed(2, false);
                            detail.push_str(&format!("; via {relay}: {e}"));
                        }
                    }
                }
                Err(e) => {
                    counters.traversed(2, false);
                    detail.push_str(&format!("; via {relay}: {e}"));
                }
            }
        }
        Err(OverlayError::Unreachable {
            peer: peer.uri(),
            detail,
        })
    }

    /// NAT traversal: asks each relay in turn to introduce this node to
    /// `peer`, then dials the address the relay sees `peer` at while `peer`
    /// dials ours, until one side's handshake gets through.
    async fn punch(&self, peer: &Identity) -> Result<quinn::Connection, String> {
        let relays = lock(&self.inner.relays).clone();
        let mut errors = Vec::new();
        for relay in relays.iter().filter(|r| *r != peer) {
            let answer = async {
                let conn = self.connection(relay).await.map_err(|e| e.to_string())?;
                let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
                write_frame(&mut send, &StreamRequest::Punch { to: peer.uri() })
                    .await
                    .map_err(|e| e.to_string())?;
                let reply: StreamReply = read_frame(&mut recv).await.map_err(|e| e.to_string())?;
                let _ = send.finish();
                if !reply.ok {
                    return Err(reply.error);
                }
                reply
                    .observed
                    .and_then(|a| a.parse::<SocketAddr>().ok())
                    .ok_or_else(|| "no address in the answer".to_owned())
            }
            .await;
            let address = match answer {
                Ok(a) => a,
                Err(e) => {
                    errors.push(format!("{relay}: {e}"));
                    continue;
                }
            };
            let deadline = tokio::time::Instant::now() + PUNCH_WINDOW;
            loop {
                if let Some(c) = self.live(peer) {
                    return Ok(c);
                }
                match self.dial_within(address, peer, PUNCH_ATTEMPT).await {
                    Ok(c) => return Ok(c),
                    Err(e) if tokio::time::Instant::now() >= deadline => {
                        errors.push(format!("{relay} gave {address}: {e}"));
                        break;
                    }
                    Err(_) => {}
                }
            }
        }
        if errors.is_empty() {
            errors.push("no relay to introduce us".into());
        }
        Err(errors.join("; "))
    }

    /// Accepts TCP connections on `listener` and forwards each to `target`
    /// on `peer` until the listener fails or the task is aborted.
    pub fn forward(
        &self,
        listener: TcpListener,
        peer: Identity,
        target: String,
    ) -> tokio::task::JoinHandle<()> {
        let overlay = self.clone();
        tokio::spawn(async move {
            loop {
                let (mut tcp, from) = match listener.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "overlay forward listener failed");
                        return;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let overlay = overlay.clone();
                let (peer, target) = (peer.clone(), target.clone());
                tokio::spawn(async move {
                    match overlay.open(&peer, &target).await {
                        Ok(stream) => {
                            let _ = stream.join_tcp(&mut tcp).await;
                        }
                        Err(e) => {
                            tracing::warn!(%from, %peer, %target, error = %e, "overlay forward failed");
                        }
                    }
                });
            }
        })
    }

    /// Opens a stream on `conn` with `request`; for a UDP `flow` opened
    /// straight at its target or through a relay that forwards QUIC
    /// datagrams, with its place for them taken first.
    async fn request(
        &self,
        conn: &quinn::Connection,
        peer: &Identity,
        request: &StreamRequest,
        flow: bool,
    ) -> Result<OverlayStream, OverlayError> {
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| OverlayError::Io(format!("opening a stream to {peer}: {e}")))?;
        // A flow opened straight at its target may carry datagrams beside
        // the stream; one through a relay when the relay forwards them (the
        // opener asked, and so does the relay of the next node).
        let direct = matches!(request, StreamRequest::Open { origin: None, .. });
        let relayed = request.relays_datagrams();
        let mut datagrams = (direct || relayed)
            .then(|| self.datagram_path(conn))
            .flatten();
        if let Some(p) = datagrams.as_mut().filter(|_| flow) {
            p.register(u64::from(send.id()));
        }
        write_frame(&mut send, request).await?;
        let reply: StreamReply = tokio::time::timeout(REPLY_TIMEOUT, read_frame(&mut recv))
            .await
            .map_err(|_| {
                let _ = send.reset(0u32.into());
                let _ = recv.stop(0u32.into());
                OverlayError::Io(format!("{peer} did not answer within {REPLY_TIMEOUT:?}"))
            })??;
        if !reply.ok {
            return Err(OverlayError::Refused {
                peer: peer.uri(),
                reason: reply.error,
            });
        }
        match reply.datagrams {
            // The far side says how large a datagram the rest of the path
            // carries as a QUIC datagram.
            Some(max) => {
                if let Some(p) = datagrams.as_mut() {
                    p.limit(max as usize);
                }
            }
            // A relayed flow without the far side's word: on the stream
            // (its place for datagrams given up).
            None if !direct => datagrams = None,
            // A direct peer of the release before says nothing: the
            // connection's own limit holds.
            None => {}
        }
        self.inner.counters.opened.fetch_add(1, Ordering::Relaxed);
        Ok(OverlayStream {
            send,
            recv,
            bytes: self.inner.counters.bytes.clone(),
            datagrams,
            room: Room::of(self.router(conn)),
        })
    }

    /// How a flow on `conn` sends and receives QUIC datagrams, if `conn`
    /// speaks them: its router, made (with the task that reads the
    /// connection's datagrams) the first time.
    fn datagram_path(&self, conn: &quinn::Connection) -> Option<DatagramPath> {
        Some(DatagramPath::new(conn.clone(), self.router(conn)?))
    }

    /// The router of `conn`'s QUIC datagrams, if `conn` speaks them: made
    /// (with the task that reads the connection's datagrams) the first time.
    fn router(&self, conn: &quinn::Connection) -> Option<Arc<FlowRouter>> {
        let id = conn.stable_id();
        let router = {
            let mut routers = lock(&self.inner.routers);
            if let Some(r) = routers.get(&id) {
                r.clone()
            } else {
                if !crate::tls::speaks_datagrams(conn) {
                    return None;
                }
                let router = Arc::new(FlowRouter::new(self.inner.counters.bytes.clone()));
                routers.insert(id, router.clone());
                let (weak, conn, r) = (Arc::downgrade(&self.inner), conn.clone(), router.clone());
                tokio::spawn(async move {
                    while let Ok(d) = conn.read_datagram().await {
                        r.dispatch(&d);
                    }
                    if let Some(inner) = weak.upgrade() {
                        lock(&inner.routers).remove(&id);
                    }
                });
                router
            }
        };
        Some(router)
    }

    /// A live connection to `peer`, dialing its addresses if needed.
    async fn connection(&self, peer: &Identity) -> Result<quinn::Connection, OverlayError> {
        if let Some(c) = self.live(peer) {
            return Ok(c);
        }
        let addresses = lock(&self.inner.addresses)
            .get(peer)
            .cloned()
            .unwrap_or_default();
        if addresses.is_empty() {
            return Err(OverlayError::Unreachable {
                peer: peer.uri(),
                detail: "no known address".into(),
            });
        }
        let mut detail = Vec::new();
        for addr in addresses {
            match self.dial(addr, peer).await {
                Ok(c) => return Ok(c),
                Err(e) => detail.push(format!("{addr}: {e}")),
            }
        }
        Err(OverlayError::Unreachable {
            peer: peer.uri(),
            detail: detail.join("; "),
        })
    }

    async fn dial(
        &self,
        addr: SocketAddr,
        expected: &Identity,
    ) -> Result<quinn::Connection, OverlayError> {
        self.dial_within(addr, expected, self.inner.config.connect_timeout)
            .await
    }

    async fn dial_within(
        &self,
        addr: SocketAddr,
        expected: &Identity,
        timeout: Duration,
    ) -> Result<quinn::Connection, OverlayError> {
        let client = lock(&self.inner.client).clone();
        let connecting = self
            .inner
            .endpoint
            .connect_with(client, addr, SERVER_NAME)
            .map_err(|e| OverlayError::Io(e.to_string()))?;
        let conn = tokio::time::timeout(timeout, connecting)
            .await
            .map_err(|_| OverlayError::Io(format!("no answer within {timeout:?}")))?
            .map_err(|e| OverlayError::Io(e.to_string()))?;
        let found = self.inner.tls.identity_of(&conn)?;
        if &found != expected {
            conn.close(WRONG_PEER.into(), b"wrong peer");
            return Err(OverlayError::WrongPeer {
                address: addr.to_string(),
                expected: expected.uri(),
                found: found.uri(),
            });
        }
        let overlay = self.clone();
        let c = conn.clone();
        tokio::spawn(async move { overlay.adopt(c, Some(found)).await });
        Ok(conn)
    }

    /// Registers `conn` under its peer's identity and serves the streams the
    /// peer opens on it until it closes.
    ///
    /// Boxed: serving a stream may dial (relaying), which adopts again.
    fn adopt(
        &self,
        conn: quinn::Connection,
        known: Option<Identity>,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        let overlay = self.clone();
        Box::pin(async move { overlay.adopt_inner(conn, known).await })
    }

    async fn adopt_inner(&self, conn: quinn::Connection, known: Option<Identity>) {
        let peer = match known {
            Some(p) => p,
            None => match self.inner.tls.identity_of(&conn) {
                Ok(p) => {
                    self.inner.counters.accepted.fetch_add(1, Ordering::Relaxed);
                    p
                }
                Err(e) => {
                    tracing::warn!(remote = %conn.remote_address(), error = %e, "overlay peer refused");
                    conn.close(WRONG_PEER.into(), b"bad certificate");
                    return;
                }
            },
        };
        if let Err(why) = self.admit(&peer) {
            tracing::info!(%peer, remote = %conn.remote_address(), reason = %why, "overlay peer not admitted");
            conn.close(NOT_ADMITTED.into(), b"not admitted");
            return;
        }
        lock(&self.inner.connections).insert(peer.clone(), conn.clone());
        while let Ok((send, recv)) = conn.accept_bi().await {
            let overlay = self.clone();
            let (peer, conn) = (peer.clone(), conn.clone());
            tokio::spawn(async move { overlay.serve_stream(peer, conn, send, recv).await });
        }
        let mut conns = lock(&self.inner.connections);
        if conns
            .get(&peer)
            .is_some_and(|c| c.stable_id() == conn.stable_id())
        {
            conns.remove(&peer);
        }
    }

    /// A live connection to `peer`, if there is one.
    fn live(&self, peer: &Identity) -> Option<quinn::Connection> {
        lock(&self.inner.connections)
            .get(peer)
            .filter(|c| c.close_reason().is_none())
            .cloned()
    }

    /// The node a `relay` or `punch` request names, if this node relays.
    fn relay_target(&self, to: &str) -> Result<Identity, String> {
        if !self.inner.config.relay {
            return Err(format!("{} does not relay", self.inner.me));
        }
        let to = Identity::from_uri(to).ok_or_else(|| format!("{to:?} is not a node identity"))?;
        self.admit(&to)?;
        Ok(to)
    }

    async fn refuse(&self, send: &mut quinn::SendStream, why: String) {
        self.inner.counters.refused.fetch_add(1, Ordering::Relaxed);
        let _ = write_frame(send, &StreamReply::refused(why)).await;
        let _ = send.finish();
    }

    async fn serve_stream(
        &self,
        peer: Identity,
        conn: quinn::Connection,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        let remote = conn.remote_address();
        let request =
            match tokio::time::timeout(REQUEST_TIMEOUT, read_frame::<_, StreamRequest>(&mut recv))
                .await
            {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => return self.refuse(&mut send, e.to_string()).await,
                Err(_) => return self.refuse(&mut send, "no request in time".into()).await,
            };
        // Admission can change while a connection lives (a node removed
        // from the cluster): every stream asks again.
        if let Err(why) = self.admit(&peer) {
            return self.refuse(&mut send, why).await;
        }
        // The words of cloudless-overlay/3 on a connection that did not
        // agree on it, as a node of an earlier release refuses them.
        if request.relays_datagrams() && !crate::tls::relays_datagrams(&conn) {
            return self
                .refuse(
                    &mut send,
                    "`datagrams` is not part of this connection's protocol".into(),
                )
                .await;
        }
        match request {
            StreamRequest::WhoAmI => {
                let reply = StreamReply {
                    observed: Some(remote.to_string()),
                    ..StreamReply::ok()
                };
                let _ = write_frame(&mut send, &reply).await;
                let _ = send.finish();
            }
            StreamRequest::Open {
                target,
                origin,
                datagrams: forwarded,
            } => {
                let relayed = origin.is_some();
                // Only a relay this node chose may speak for someone else.
                let origin = match origin.as_deref().and_then(Identity::from_uri) {
                    Some(o) if lock(&self.inner.relays).contains(&peer) => o,
                    _ => peer,
                };
                match self.inner.resolver.connect(&origin, &target).await {
                    Ok(connected) => {
                        let mut datagrams = match &connected {
                            Connected::Tcp(tcp) => {
                                let _ = tcp.set_nodelay(true);
                                None
                            }
                            // The flow is registered before the answer:
                            // the opener's first datagram may follow it at
                            // once. Through a relay only when the relay
                            // forwards QUIC datagrams (else it joins the
                            // two streams' bytes and nothing more).
                            Connected::Udp(_) if !relayed || forwarded.is_some() => {
                                self.datagram_path(&conn).map(|mut p| {
                                    p.register(u64::from(recv.id()));
                                    p
                                })
                            }
                            Connected::Udp(_) => None,
                        };
                        // A relay is told how large a datagram this node
                        // sends it as a QUIC datagram; without an answer it
                        // forwards none.
                        let mut reply = StreamReply::ok();
                        if relayed {
                            // What this leg carries; what this node sends
                            // is held to what the relay's leg to the opener
                            // carries.
                            reply.datagrams = datagrams.as_ref().and_then(|p| p.max_payload());
                            match (reply.datagrams, forwarded, datagrams.as_mut()) {
                                (Some(_), Some(max), Some(p)) => p.limit(max as usize),
                                _ => datagrams = None,
                            }
                        }
                        if write_frame(&mut send, &reply).await.is_err() {
                            return;
                        }
                        self.inner.counters.served.fetch_add(1, Ordering::Relaxed);
                        let key = self.inner.next_served.fetch_add(1, Ordering::Relaxed);
                        let cut = tokio_util::sync::CancellationToken::new();
                        lock(&self.inner.served).insert(key, (origin, target, cut.clone()));
                        let stream = OverlayStream {
                            send,
                            recv,
                            bytes: self.inner.counters.bytes.clone(),
                            datagrams,
                            room: Room::of(self.router(&conn)),
                        };
                        let moved = AtomicU64::new(0);
                        match connected {
                            Connected::Tcp(mut tcp) => {
                                let _ = stream
                                    .join_tcp_until(&mut tcp, cut.cancelled(), NOT_ADMITTED, &moved)
                                    .await;
                            }
                            Connected::Udp(udp) => {
                                let _ = stream
                                    .join_udp_until(&udp, cut.cancelled(), NOT_ADMITTED, &moved)
                                    .await;
                            }
                        }
                        lock(&self.inner.served).remove(&key);
                    }
                    Err(why) => self.refuse(&mut send, why).await,
                }
            }
            StreamRequest::Punch { to } => {
                let to = match self.relay_target(&to) {
                    Ok(to) => to,
                    Err(why) => return self.refuse(&mut send, why).await,
                };
                // Only a node already connected here can be introduced.
                let Some(far) = self.live(&to) else {
                    return self
                        .refuse(&mut send, format!("{to} is not connected to this relay"))
                        .await;
                };
                let tell = StreamRequest::PunchFrom {
                    from: peer.uri(),
                    address: remote.to_string(),
                };
                let told = async {
                    let (mut s, mut r) = far.open_bi().await.map_err(|e| e.to_string())?;
                    write_frame(&mut s, &tell)
                        .await
                        .map_err(|e| e.to_string())?;
                    let reply: StreamReply = read_frame(&mut r).await.map_err(|e| e.to_string())?;
                    let _ = s.finish();
                    if reply.ok {
                        Ok(())
                    } else {
                        Err(reply.error)
                    }
                }
                .await;
                match told {
                    Ok(()) => {
                        let reply = StreamReply {
                            observed: Some(far.remote_address().to_string()),
                            ..StreamReply::ok()
                        };
                        let _ = write_frame(&mut send, &reply).await;
                        let _ = send.finish();
                    }
                    Err(e) => self.refuse(&mut send, format!("{to}: {e}")).await,
                }
            }
            StreamRequest::PunchFrom { from, address } => {
                if !lock(&self.inner.relays).contains(&peer) {
                    return self
                        .refuse(
                            &mut send,
                            "only a relay this node chose may introduce".into(),
                        )
                        .await;
                }
                let (Some(from), Ok(address)) =
                    (Identity::from_uri(&from), address.parse::<SocketAddr>())
                else {
                    return self.refuse(&mut send, "bad introduction".into()).await;
                };
                let _ = write_frame(&mut send, &StreamReply::ok()).await;
                let _ = send.finish();
                let overlay = self.clone();
                tokio::spawn(async move {
                    let deadline = tokio::time::Instant::now() + PUNCH_WINDOW;
                    while tokio::time::Instant::now() < deadline {
                        if overlay.live(&from).is_some()
                            || overlay
                                .dial_within(address, &from, PUNCH_ATTEMPT)
                                .await
                                .is_ok()
                        {
                            return;
                        }
                    }
                });
            }
            StreamRequest::Relay {
                to,
                target,
                datagrams,
            } => {
                let to = match self.relay_target(&to) {
                    Ok(to) => to,
                    Err(why) => return self.refuse(&mut send, why).await,
                };
                // The opener asked for the flow's QUIC datagrams: this relay
                // forwards them when the next node's protocol has the word
                // for it, and tells it how large a one it carries on to
                // the opener.
                let onward = match self.connection(&to).await {
                    Ok(far) => {
                        let near_path = (datagrams && crate::tls::relays_datagrams(&far))
                            .then(|| self.datagram_path(&conn))
                            .flatten()
                            .map(|mut p| {
                                p.register(u64::from(recv.id()));
                                p
                            });
                        let max = near_path.as_ref().and_then(|p| p.max_payload());
                        let request = StreamRequest::Open {
                            target,
                            origin: Some(peer.uri()),
                            datagrams: max,
                        };
                        self.request(&far, &to, &request, max.is_some())
                            .await
                            .map(|far| (far, near_path.filter(|_| max.is_some())))
                    }
                    Err(e) => Err(e),
                };
                match onward {
                    Ok((mut far, near_path)) => {
                        // Both ends take QUIC datagrams, each at most what
                        // the next node's leg carries: the opener is told.
                        let forwarding = match (near_path, far.datagrams.take()) {
                            (Some(near), Some(far_path)) => match far_path.max_payload() {
                                Some(m) => Some((near, far_path, m)),
                                // The target's node sends QUIC datagrams
                                // this relay cannot carry on: no flow.
                                None => {
                                    return self
                                        .refuse(
                                            &mut send,
                                            format!("{to} takes QUIC datagrams this relay cannot forward"),
                                        )
                                        .await;
                                }
                            },
                            _ => None,
                        };
                        let reply = StreamReply {
                            datagrams: forwarding.as_ref().map(|(_, _, m)| *m),
                            ..StreamReply::ok()
                        };
                        if write_frame(&mut send, &reply).await.is_err() {
                            return;
                        }
                        self.inner.counters.relayed.fetch_add(1, Ordering::Relaxed);
                        let near = OverlayStream {
                            send,
                            recv,
                            bytes: self.inner.counters.bytes.clone(),
                            datagrams: None,
                            room: Room::of(self.router(&conn)),
                        };
                        match forwarding {
                            Some((near_path, far_path, _)) => {
                                crate::datagram::relay(near_path, far_path, near.join(far)).await;
                            }
                            None => {
                                let _ = near.join(far).await;
                            }
                        }
                    }
                    Err(OverlayError::Refused { reason, .. }) => {
                        self.refuse(&mut send, reason).await;
                    }
                    Err(e) => self.refuse(&mut send, e.to_string()).await,
                }
            }
        }
    }
}

/// One forwarded connection: read what the far end's target sends, write to it.
#[derive(Debug)]
pub struct OverlayStream {
    pub(crate) send: quinn::SendStream,
    pub(crate) recv: quinn::RecvStream,
    /// Where its bytes are counted (its endpoint's counters).
    pub(crate) bytes: Arc<StreamBytes>,
    /// How a UDP flow on it sends datagrams as QUIC datagrams (when the
    /// connection, and a relay on the way, speak them).
    pub(crate) datagrams: Option<DatagramPath>,
    /// Tells its connection while it waits for room to send.
    pub(crate) room: Room,
}

impl AsyncRead for OverlayStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.recv).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            self.bytes.received((buf.filled().len() - before) as u64);
        }
        polled
    }
}

impl AsyncWrite for OverlayStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = AsyncWrite::poll_write(Pin::new(&mut self.send), cx, buf);
        self.room.waiting(polled.is_pending());
        if let Poll::Ready(Ok(n)) = polled {
            self.bytes.sent(n as u64);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.send), cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.room.waiting(false);
        AsyncWrite::poll_shutdown(Pin::new(&mut self.send), cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudless_pki::ClusterCa;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn now() -> i64 {
        crate::tls::now_secs()
    }

    fn issue(ca: &ClusterCa, who: &Identity) -> (String, zeroize::Zeroizing<String>) {
        let c = ca.issue(who, &[], 3600, now()).expect("issue");
        (c.cert_pem, c.key_pem.expect("key"))
    }

    fn config() -> OverlayConfig {
        OverlayConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            connect_timeout: Duration::from_millis(700),
            ..OverlayConfig::default()
        }
    }

    struct Origins(Mutex<Vec<Identity>>);

    impl Resolver for Origins {
        fn connect<'a>(&'a self, origin: &'a Identity, _target: &'a str) -> ConnectFuture<'a> {
            lock(&self.0).push(origin.clone());
            Box::pin(async {
                let l = TcpListener::bind("127.0.0.1:0")
                    .await
                    .map_err(|e| e.to_string())?;
                let addr = l.local_addr().map_err(|e| e.to_string())?;
                tokio::spawn(async move {
                    if let Ok((mut s, _)) = l.accept().await {
                        let _ = s.write_all(b"hello").await;
                    }
                });
                TcpStream::connect(addr)
                    .await
                    .map(Connected::Tcp)
                    .map_err(|e| e.to_string())
            })
        }
    }

    fn start(ca: &ClusterCa, id: &str) -> (Overlay, Arc<Origins>) {
        start_with(ca, id, config())
    }

    fn start_with(ca: &ClusterCa, id: &str, config: OverlayConfig) -> (Overlay, Arc<Origins>) {
        let me = Identity::Node(id.into());
        let (cert, key) = issue(ca, &me);
        let (tls, _) = OverlayTls::new(ca.cert_pem(), &cert, key).expect("tls");
        let origins = Arc::new(Origins(Mutex::default()));
        let o = Overlay::bind(config, tls, me, origins.clone()).expect("bind");
        (o, origins)
    }

    #[tokio::test]
    async fn a_client_certificate_from_another_ca_is_refused_by_the_server() {
        let ca = ClusterCa::generate("t", now()).expect("ca");
        let other = ClusterCa::generate("t", now()).expect("other");
        let (b, origins) = start(&ca, "b");
        // Trusts the real CA (so it accepts B's certificate) but presents
        // one from another CA: only B's client check can stop it.
        let me = Identity::Node("a".into());
        let (cert, key) = issue(&other, &me);
        let tls = OverlayTls {
            ca_pem: ca.cert_pem().to_owned(),
            cert_pem: cert,
            key_pem: key,
        };
        let intruder =
            Overlay::bind(config(), tls, me, Arc::new(StaticResolver::default())).expect("bind");
        intruder.set_peer(
            Identity::Node("b".into()),
            vec![b.local_addr().expect("addr")],
        );
        let e = intruder.open(&Identity::Node("b".into()), "x").await;
        assert!(e.is_err(), "an intruder got a stream");
        assert_eq!(b.stats().connections_accepted, 0);
        assert!(lock(&origins.0).is_empty());
    }

    #[tokio::test]
    async fn garbage_is_refused_and_a_non_relay_cannot_speak_for_another_node() {
        let ca = ClusterCa::generate("t", now()).expect("ca");
        let (a, _) = start(&ca, "a");
        let (b, origins) = start(&ca, "b");
        let bid = Identity::Node("b".into());
        a.set_peer(bid.clone(), vec![b.local_addr().expect("addr")]);
        let conn = a.connection(&bid).await.expect("connect");

        // An oversized frame length.
        let (mut send, mut recv) = conn.open_bi().await.expect("stream");
        send.write_all(&[0xff, 0xff, b'{']).await.expect("write");
        let reply: StreamReply = read_frame(&mut recv).await.expect("reply");
        assert!(!reply.ok && reply.error.contains("exceeds"), "{reply:?}");
        // Not JSON.
        let (mut send, mut recv) = conn.open_bi().await.expect("stream");
        send.write_all(&[0, 3, b'a', b'b', b'c'])
            .await
            .expect("write");
        let reply: StreamReply = read_frame(&mut recv).await.expect("reply");
        assert!(!reply.ok && reply.error.contains("bad frame"), "{reply:?}");
        assert_eq!(b.stats().streams_refused, 2);

        // A claims to open on behalf of X: B is not A's relay client, so the
        // claim is ignored and the origin is A.
        let (mut send, mut recv) = conn.open_bi().await.expect("stream");
        let spoof = StreamRequest::Open {
            target: "t".into(),
            origin: Some("cloudless://node/x".into()),
            datagrams: None,
        };
        write_frame(&mut send, &spoof).await.expect("write");
        let reply: StreamReply = read_frame(&mut recv).await.expect("reply");
        assert!(reply.ok, "{reply:?}");
        let mut got = Vec::new();
        AsyncReadExt::read_to_end(&mut recv, &mut got)
            .await
            .expect("read");
        assert_eq!(got, b"hello");
        assert_eq!(lock(&origins.0).as_slice(), &[Identity::Node("a".into())]);

        // Only a relay B chose may make it dial someone.
        let (mut send, mut recv) = conn.open_bi().await.expect("stream");
        let intro = StreamRequest::PunchFrom {
            from: "cloudless://node/x".into(),
            address: "127.0.0.1:9".into(),
        };
        write_frame(&mut send, &intro).await.expect("write");
        let reply: StreamReply = read_frame(&mut recv).await.expect("reply");
        assert!(
            !reply.ok && reply.error.contains("only a relay this node chose"),
            "{reply:?}"
        );
        // Nor does a node that is not a relay introduce anyone.
        let (mut send, mut recv) = conn.open_bi().await.expect("stream");
        let ask = StreamRequest::Punch {
            to: "cloudless://node/x".into(),
        };
        write_frame(&mut send, &ask).await.expect("write");
        let reply: StreamReply = read_frame(&mut recv).await.expect("reply");
        assert!(
            !reply.ok && reply.error.contains("does not relay"),
            "{reply:?}"
        );

        // B still serves normally.
        let mut s = a.open(&bid, "t").await.expect("open");
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"hello");
    }

    #[tokio::test]
    async fn the_words_of_relayed_datagrams_are_refused_on_an_earlier_protocol() {
        let ca = ClusterCa::generate("t", now()).expect("ca");
        let previous = OverlayConfig {
            relayed_datagrams: false,
            ..config()
        };
        let (a, _) = start_with(&ca, "a", previous);
        let (b, _) = start_with(&ca, "b", config());
        let (c, _) = start_with(&ca, "c", config());
        let (bid, cid) = (Identity::Node("b".into()), Identity::Node("c".into()));
        // A node of the previous release and one of this: /2, as a node of
        // the previous release refuses the fields /3 added, so does this one
        // on a /2 connection; on /3 the same request goes on (and is
        // refused only because the node does not relay).
        for (from, to, expected) in [
            (&a, &bid, "is not part of this connection's protocol"),
            (&c, &bid, "does not relay"),
        ] {
            from.set_peer(to.clone(), vec![b.local_addr().expect("addr")]);
            let conn = from.connection(to).await.expect("connect");
            assert_eq!(
                crate::tls::relays_datagrams(&conn),
                expected == "does not relay"
            );
            for request in [
                StreamRequest::Relay {
                    to: cid.uri(),
                    target: "t".into(),
                    datagrams: true,
                },
                StreamRequest::Open {
                    target: "t".into(),
                    origin: None,
                    datagrams: Some(1_000),
                },
            ] {
                let (mut send, mut recv) = conn.open_bi().await.expect("stream");
                write_frame(&mut send, &request).await.expect("write");
                let reply: StreamReply = read_frame(&mut recv).await.expect("reply");
                let open = matches!(request, StreamRequest::Open { .. });
                if open && expected == "does not relay" {
                    assert!(reply.ok, "{reply:?}");
                } else {
                    assert!(!reply.ok && reply.error.contains(expected), "{reply:?}");
                }
            }
        }
    }

    /// Admits every node but the ones listed.
    struct Refuse(Mutex<Vec<Identity>>);

    impl Admission for Refuse {
        fn admit(&self, peer: &Identity) -> Result<(), String> {
            if lock(&self.0).contains(peer) {
                Err(format!("{peer} has been removed"))
            } else {
                Ok(())
            }
        }
    }

    #[tokio::test]
    async fn a_peer_no_longer_admitted_loses_its_connection_and_cannot_come_back() {
        let ca = ClusterCa::generate("t", now()).expect("ca");
        // Every stream goes through the relay (no direct path is punched).
        let relayed_only = || OverlayConfig {
            hole_punching: false,
            ..config()
        };
        let (a, _) = start_with(&ca, "a", relayed_only());
        let me = Identity::Node("relay".into());
        let (cert, key) = issue(&ca, &me);
        let (tls, _) = OverlayTls::new(ca.cert_pem(), &cert, key).expect("tls");
        let relay_config = OverlayConfig {
            relay: true,
            ..config()
        };
        let relay = Overlay::bind(
            relay_config,
            tls,
            me.clone(),
            Arc::new(StaticResolver::default()),
        )
        .expect("bind");
        let (c, origins) = start_with(&ca, "c", relayed_only());
        let refused = Arc::new(Refuse(Mutex::default()));
        relay.set_admission(refused.clone());
        a.set_peer(me.clone(), vec![relay.local_addr().expect("addr")]);
        a.set_relays(vec![me.clone()]);
        c.set_peer(me.clone(), vec![relay.local_addr().expect("addr")]);
        c.set_relays(vec![me.clone()]);
        assert!(a.keep_relays_connected().await.is_empty());
        assert!(c.keep_relays_connected().await.is_empty());
        let (aid, cid) = (Identity::Node("a".into()), Identity::Node("c".into()));
        // Admitted: a reaches c through the relay.
        let mut s = a.open(&cid, "t").await.expect("relayed while admitted");
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"hello");

        // c is removed: its live connection is closed, streams to it are refused.
        lock(&refused.0).push(cid.clone());
        assert_eq!(relay.enforce_admission(), vec![cid.clone()]);
        assert!(!relay.connected_peers().contains(&cid));
        let e = a
            .open(&cid, "t")
            .await
            .expect_err("relayed to a removed node");
        assert!(e.to_string().contains("has been removed"), "{e}");
        // Nor can it connect again: the relay closes the connection at once.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = c.keep_relays_connected().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !relay.connected_peers().contains(&cid),
            "a removed node reconnected"
        );
        assert_eq!(lock(&origins.0).len(), 1, "only the first stream reached c");

        // A removed opener's streams are refused on a connection it still holds.
        lock(&refused.0).push(aid.clone());
        let conn = a.live(&me).expect("a's connection, not yet enforced");
        let (mut send, mut recv) = conn.open_bi().await.expect("stream");
        write_frame(&mut send, &StreamRequest::WhoAmI)
            .await
            .expect("write");
        let reply: StreamReply = read_frame(&mut recv).await.expect("reply");
        assert!(
            !reply.ok && reply.error.contains("has been removed"),
            "{reply:?}"
        );
    }

    /// Connects every target to a TCP server that keeps the connection
    /// open; allows streams while `open` is set.
    struct Gate {
        server: SocketAddr,
        open: std::sync::atomic::AtomicBool,
    }

    impl Resolver for Gate {
        fn connect<'a>(&'a self, _origin: &'a Identity, _target: &'a str) -> ConnectFuture<'a> {
            Box::pin(async move {
                TcpStream::connect(self.server)
                    .await
                    .map(Connected::Tcp)
                    .map_err(|e| e.to_string())
            })
        }

        fn still_allows(&self, _origin: &Identity, _target: &str) -> bool {
            self.open.load(Ordering::Relaxed)
        }
    }

    #[tokio::test]
    async fn a_stream_whose_origin_is_no_longer_allowed_is_cut() {
        let ca = ClusterCa::generate("t", now()).expect("ca");
        let (a, _) = start(&ca, "a");
        let server = TcpListener::bind("127.0.0.1:0").await.expect("listen");
        let server_addr = server.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = server.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let gate = Arc::new(Gate {
            server: server_addr,
            open: std::sync::atomic::AtomicBool::new(true),
        });
        let bid = Identity::Node("b".into());
        let (cert, key) = issue(&ca, &bid);
        let (tls, _) = OverlayTls::new(ca.cert_pem(), &cert, key).expect("tls");
        let b = Overlay::bind(config(), tls, bid.clone(), gate.clone()).expect("bind");
        a.set_peer(bid.clone(), vec![b.local_addr().expect("addr")]);
        let mut s = a.open(&bid, "t").await.expect("open");
        s.write_all(b"ping").await.expect("write");
        let mut got = [0u8; 4];
        s.read_exact(&mut got).await.expect("echo");
        assert_eq!(&got, b"ping");
        assert_eq!(b.recheck_streams(), 0, "an allowed stream was cut");

        gate.open.store(false, Ordering::Relaxed);
        assert_eq!(b.recheck_streams(), 1);
        let mut rest = Vec::new();
        let ended = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut rest)).await;
        assert!(
            matches!(ended, Ok(Err(_)) | Ok(Ok(0))),
            "the cut stream still carries data: {ended:?}"
        );
    }
}
