//! The node's service proxy. Connections from replicas to a service's
//! virtual IP are redirected by the node's firewall to this proxy (one
//! listener on the bridge's address); it reads where the connection was
//! headed (`SO_ORIGINAL_DST`), checks that the calling workload may reach
//! the service, and carries the connection to an endpoint picked by the
//! service's policy: over the bridge when the endpoint runs here, over the
//! overlay when it runs elsewhere (the [`Dialer`] decides how). Ingress
//! listeners hand their connections to the same path. A connection to an
//! endpoint that leaves the service (its replica stopped or no longer
//! Ready, its node Suspect, Down or removed) is cut at once.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use cloudless_types::rate_limit::{address_key, Rate, RateLimiter};

use crate::balancer::{Balancer, Here};
use crate::services::{Endpoint, Service, SharedServices};

mod udp;

pub use udp::{
    ingress_socket, DatagramDialFuture, DatagramRx, DatagramTx, Datagrams, IoFuture, MAX_DATAGRAM,
};

/// A connection to an endpoint.
pub enum Dialed {
    /// A TCP connection (an endpoint on this node): bytes are spliced
    /// between the two sockets inside the kernel.
    Tcp(TcpStream),
    /// A stream that carries the connection by itself (the overlay hands
    /// what it reads from the socket to QUIC without copying it again).
    Carry(Box<dyn Carry>),
}

/// What a stream that carries a connection by itself must do.
pub trait Carry: Send {
    /// Carries bytes both ways between `tcp` and this stream until both
    /// directions have ended or either fails, adding the bytes it moves to
    /// `moved` as it goes (how the proxy sees a connection is idle).
    fn carry<'a>(self: Box<Self>, tcp: &'a mut TcpStream, moved: &'a AtomicU64) -> CarryFuture<'a>;
}

/// What [`Carry::carry`] returns.
pub type CarryFuture<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// What a dial returns.
pub type DialFuture<'a> = Pin<Box<dyn Future<Output = Result<Dialed, String>> + Send + 'a>>;

impl std::fmt::Debug for Dialed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(t) => f.debug_tuple("Tcp").field(t).finish(),
            Self::Carry(_) => f.write_str("Carry"),
        }
    }
}

/// Who opens a connection to a service.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Caller {
    /// A replica of this workload.
    Workload {
        /// Its namespace.
        namespace: String,
        /// Its workload.
        workload: String,
    },
    /// The outside world, through this node's ingress.
    Ingress,
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Workload {
                namespace,
                workload,
            } => write!(f, "{namespace}/{workload}"),
            Self::Ingress => f.write_str("ingress"),
        }
    }
}

/// Opens streams to endpoints.
pub trait Dialer: Send + Sync + 'static {
    /// A stream to `port` of endpoint `e` for `caller`.
    fn dial<'a>(&'a self, e: &'a Endpoint, port: u16, caller: &'a Caller) -> DialFuture<'a>;

    /// A flow of datagrams to UDP port `port` of endpoint `e` for `caller`.
    fn dial_datagrams<'a>(
        &'a self,
        e: &'a Endpoint,
        port: u16,
        caller: &'a Caller,
    ) -> DatagramDialFuture<'a> {
        let _ = (port, caller);
        Box::pin(async move {
            Err(format!(
                "UDP is not carried to {} on node {}",
                e.replica_id, e.node_id
            ))
        })
    }
}

/// Finds the workload of a replica on this node by its address.
pub type CallerLookup = Arc<dyn Fn(IpAddr) -> Option<Caller> + Send + Sync>;

/// The longest a connection to one endpoint may take before the next is
/// tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Most endpoints tried for one connection.
const MAX_TRIES: usize = 3;
/// What one source may hold of the proxy, how fast it may open connections,
/// and how long a connection may stay quiet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyLimits {
    /// Most connections to service VIPs open at once from one replica
    /// address; more are closed as accepted, so no one replica takes every
    /// slot.
    pub per_source: usize,
    /// Most ingress connections open at once from one source (an address,
    /// or an IPv6 /64).
    pub ingress_per_source: usize,
    /// A connection that carries no byte either way for this long is
    /// closed (its slot freed; checked once per this long, so within one
    /// to two of it after its last byte).
    pub idle_timeout: Duration,
    /// Most connections carried at once by each of the proxy's pools:
    /// replicas' connections to service VIPs (and their UDP flows), ingress
    /// connections from outside, and UDP flows from outside (which so
    /// cannot take the slots of the node's own callers, nor of each other).
    /// More are closed as accepted (as Envoy's connection limit does).
    pub max_connections: usize,
    /// Once a pool holds more than three quarters of `max_connections`, and
    /// until it holds less than five eighths, a connection in it that has
    /// been quiet this long is closed (as Envoy's
    /// overload manager shortens idle timeouts): idle connections, however
    /// many sources hold them, cannot keep the slots from live ones.
    pub idle_timeout_under_pressure: Duration,
    /// New ingress connections one source (an address, or an IPv6 /64) may
    /// open: more are closed as accepted.
    pub ingress_rate: Rate,
    /// A UDP flow (a caller's address and port to one endpoint) that is
    /// *assured* (its caller sent again after an answer) and carries no
    /// datagram for this long ends; the caller's next datagram starts a new
    /// one (as conntrack forgets a UDP mapping). From outside only the
    /// caller's datagrams count: a service's answers alone keep no ingress
    /// flow (nor its forged sender's place) alive.
    pub udp_idle_timeout: Duration,
    /// A UDP flow not yet assured (a one-shot question and answer, as a
    /// DNS query from a new port; or a datagram with a forged source,
    /// never followed up) ends after this long quiet; so does every flow
    /// while its pool is under pressure.
    pub udp_unassured_timeout: Duration,
    /// Most UDP flows open at once from outside through ingress per source
    /// (an address, or an IPv6 /64), in a pool of their own: a forged
    /// source costs no TCP ingress connection its place.
    pub udp_ingress_per_source: usize,
    /// Most UDP flows of the node's replicas carried at once to endpoints
    /// on one other node; flows from outside may hold half as many more
    /// (each holds an overlay stream, and a connection between two nodes
    /// has 1,024: the rest stay for TCP; the outside world cannot take the
    /// replicas' share). A flow the endpoint's node has no room for goes to
    /// the next endpoint.
    pub udp_flows_per_node: usize,
}

/// Most connections per pool.
const MAX_CONNECTIONS: usize = 16_384;
/// Open files kept for everything but the proxy's connections (streams
/// other nodes open to this node's replicas among them).
const RESERVED_FILES: u64 = 1024;
/// Open files one carried connection may take: its two sockets and, spliced
/// to an endpoint on this node, a pipe (two descriptors) each way.
const FILES_PER_CONNECTION: u64 = 6;
/// Open files one place of each pool may take together: a connection in
/// each TCP pool and a UDP flow from outside (its socket to an endpoint
/// here; the ingress socket is shared).
const FILES_PER_SLOT: u64 = 2 * FILES_PER_CONNECTION + 1;

impl Default for ProxyLimits {
    fn default() -> Self {
        Self {
            per_source: 1024,
            ingress_per_source: 256,
            idle_timeout: Duration::from_secs(3600),
            max_connections: MAX_CONNECTIONS,
            idle_timeout_under_pressure: Duration::from_secs(30),
            ingress_rate: Rate {
                per_s: 500,
                burst: 1000,
            },
            udp_idle_timeout: Duration::from_secs(30),
            udp_unassured_timeout: Duration::from_secs(5),
            udp_ingress_per_source: 1024,
            udp_flows_per_node: 512,
        }
    }
}

impl ProxyLimits {
    /// The defaults with as many connections per pool as `open_files`
    /// descriptors allow (six per TCP connection at most in each of two
    /// pools, one per UDP flow from outside, some kept for the rest of the
    /// process): 16,384 from 214,016 open files up.
    pub fn for_open_files(open_files: u64) -> Self {
        let usable = open_files
            .saturating_sub(RESERVED_FILES)
            .max(open_files / 2);
        let max = usize::try_from(usable / FILES_PER_SLOT).unwrap_or(MAX_CONNECTIONS);
        Self {
            max_connections: max.clamp(16, MAX_CONNECTIONS),
            ..Self::default()
        }
    }

    /// Open files the proxy's pools need at most, with the reserve.
    pub fn open_files_needed(&self) -> u64 {
        (self.max_connections as u64) * FILES_PER_SLOT + RESERVED_FILES
    }
}

/// Why the proxy closed a connection it had accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Closed {
    /// Its source already held its most connections
    /// ([`ProxyLimits::per_source`], [`ProxyLimits::ingress_per_source`]).
    SourceLimit = 0,
    /// Its source opened connections faster than
    /// [`ProxyLimits::ingress_rate`].
    SourceRate = 1,
    /// Its pool held [`ProxyLimits::max_connections`].
    Full = 2,
    /// Quiet for [`ProxyLimits::idle_timeout`].
    Idle = 3,
    /// Quiet for [`ProxyLimits::idle_timeout_under_pressure`] while its pool
    /// was nearly full.
    IdleUnderPressure = 4,
    /// A UDP flow from outside, not yet assured, that gave its place in the
    /// full pool to a new one.
    GaveWay = 5,
}

impl Closed {
    /// Every reason, in the order of [`PoolStats::closed`].
    pub const ALL: [Self; 6] = [
        Self::SourceLimit,
        Self::SourceRate,
        Self::Full,
        Self::Idle,
        Self::IdleUnderPressure,
        Self::GaveWay,
    ];

    /// Its name in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SourceLimit => "source_limit",
            Self::SourceRate => "source_rate",
            Self::Full => "full",
            Self::Idle => "idle",
            Self::IdleUnderPressure => "idle_under_pressure",
            Self::GaveWay => "gave_way",
        }
    }
}

/// One pool of connection slots and what happened in it.
#[derive(Debug)]
struct Pool {
    max: usize,
    per_source: usize,
    state: Mutex<PoolState>,
    /// Whether more than three quarters of the slots are taken.
    pressure: tokio::sync::watch::Sender<bool>,
    closed: [AtomicU64; 6],
}

#[derive(Debug, Default)]
struct PoolState {
    open: usize,
    by_source: HashMap<String, usize>,
}

/// A connection's place in its pool, given back when dropped.
struct Admitted {
    pool: Arc<Pool>,
    source: String,
}

impl Pool {
    fn new(max: usize, per_source: usize) -> Arc<Self> {
        Arc::new(Self {
            max: max.max(1),
            per_source: per_source.max(1),
            state: Mutex::default(),
            pressure: tokio::sync::watch::channel(false).0,
            closed: Default::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A place for one more connection from `source`, unless it holds its
    /// most or the pool is full.
    fn admit(self: &Arc<Self>, source: String) -> Result<Admitted, Closed> {
        let mut st = self.lock();
        let held = st.by_source.get(&source).copied().unwrap_or(0);
        if held >= self.per_source {
            return Err(Closed::SourceLimit);
        }
        if st.open >= self.max {
            return Err(Closed::Full);
        }
        st.open += 1;
        *st.by_source.entry(source.clone()).or_insert(0) += 1;
        let open = st.open;
        drop(st);
        self.set_pressure(open);
        Ok(Admitted {
            pool: self.clone(),
            source,
        })
    }

    /// Pressure starts above three quarters of the most and ends below
    /// five eighths (so a pool near the mark does not flip at each
    /// connection). Only its start wakes the connections' idle checks;
    /// they see its end when they next wake.
    fn set_pressure(&self, open: usize) {
        let (open, max) = (open.saturating_mul(8), self.max.saturating_mul(8));
        self.pressure.send_if_modified(|p| {
            if !*p && open > max / 4 * 3 {
                *p = true;
                true
            } else if *p && open < max / 8 * 5 {
                *p = false;
                false
            } else {
                false
            }
        });
    }

    fn count(&self, why: Closed) {
        self.closed[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    fn stats(&self) -> PoolStats {
        PoolStats {
            open: self.lock().open,
            closed: std::array::from_fn(|i| self.closed[i].load(Ordering::Relaxed)),
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut st = self.pool.lock();
        st.open = st.open.saturating_sub(1);
        if let Some(n) = st.by_source.get_mut(&self.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                st.by_source.remove(&self.source);
            }
        }
        let open = st.open;
        drop(st);
        self.pool.set_pressure(open);
    }
}

/// A pool's connections now and those it closed, by reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStats {
    /// Connections accepted and not yet closed (being dialed or carried).
    pub open: usize,
    /// Connections closed by the proxy, in the order of [`Closed::ALL`].
    pub closed: [u64; 6],
}

impl PoolStats {
    /// Connections the proxy closed for `why`.
    pub fn closed_for(&self, why: Closed) -> u64 {
        self.closed[why as usize]
    }
}

/// What the proxy carries and has refused, by pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProxyStats {
    /// Replicas' connections to service VIPs.
    pub vips: PoolStats,
    /// Connections from outside through this node's ingress.
    pub ingress: PoolStats,
    /// UDP flows from outside through this node's ingress.
    pub ingress_udp: PoolStats,
    /// Datagrams to UDP service ports dropped because a flow's queue or
    /// the proxy's was full.
    pub dropped_datagrams: u64,
}

/// The node's service proxy.
pub struct ServiceProxy {
    services: SharedServices,
    balancer: Balancer,
    here: Mutex<Here>,
    open: Mutex<HashMap<String, usize>>,
    dialer: Arc<dyn Dialer>,
    callers: CallerLookup,
    limits: ProxyLimits,
    vips: Arc<Pool>,
    ingress: Arc<Pool>,
    /// UDP flows from outside.
    ingress_udp: Arc<Pool>,
    /// Those of them not assured yet, which a new flow may take the place of
    /// when the pool is full, at most so many a second.
    ingress_unassured: udp::Unassured,
    ingress_give_way_rate: RateLimiter,
    ingress_rate: RateLimiter,
    /// New UDP flows from outside, per source (apart from TCP's: a forged
    /// source spends no real one's TCP connections).
    ingress_udp_rate: RateLimiter,
    /// Bytes of datagrams waiting for replicas' UDP flows.
    udp_queued: Arc<udp::UdpQueued>,
    /// Bytes of datagrams waiting for UDP flows from outside (apart: the
    /// outside world cannot take the replicas' room).
    udp_ingress_queued: Arc<udp::UdpQueued>,
    /// UDP flows carried to endpoints on other nodes, by node and whether
    /// from outside.
    remote_udp: Mutex<HashMap<(String, bool), usize>>,
}

impl std::fmt::Debug for ServiceProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceProxy").finish_non_exhaustive()
    }
}

/// Counts an open connection to a replica while it lives.
struct OpenGuard<'a> {
    open: &'a Mutex<HashMap<String, usize>>,
    replica: String,
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.replica) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.replica);
            }
        }
    }
}

impl ServiceProxy {
    /// A proxy for `services` on the node `here`, dialing through `dialer`
    /// and telling callers apart with `callers`.
    pub fn new(
        services: SharedServices,
        here: Here,
        dialer: Arc<dyn Dialer>,
        callers: CallerLookup,
    ) -> Arc<Self> {
        Self::with_limits(services, here, dialer, callers, ProxyLimits::default())
    }

    /// [`new`](Self::new) with other limits.
    pub fn with_limits(
        services: SharedServices,
        here: Here,
        dialer: Arc<dyn Dialer>,
        callers: CallerLookup,
        limits: ProxyLimits,
    ) -> Arc<Self> {
        Arc::new(Self {
            services,
            balancer: Balancer::default(),
            here: Mutex::new(here),
            open: Mutex::default(),
            dialer,
            callers,
            limits,
            vips: Pool::new(limits.max_connections, limits.per_source),
            ingress: Pool::new(limits.max_connections, limits.ingress_per_source),
            ingress_udp: Pool::new(limits.max_connections, limits.udp_ingress_per_source),
            ingress_unassured: udp::Unassured::default(),
            ingress_give_way_rate: RateLimiter::new(udp::give_way_rate(&limits)),
            ingress_rate: RateLimiter::new(limits.ingress_rate),
            ingress_udp_rate: RateLimiter::new(limits.ingress_rate),
            udp_queued: Arc::default(),
            udp_ingress_queued: Arc::default(),
            remote_udp: Mutex::default(),
        })
    }

    /// Where this node is (its zone and region may change with its labels).
    pub fn set_here(&self, here: Here) {
        *self.here.lock().unwrap_or_else(PoisonError::into_inner) = here;
    }

    /// Open connections from this node, by replica.
    pub fn open_connections(&self) -> HashMap<String, usize> {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Connections carried now and those closed, by pool.
    pub fn stats(&self) -> ProxyStats {
        ProxyStats {
            vips: self.vips.stats(),
            ingress: self.ingress.stats(),
            ingress_udp: self.ingress_udp.stats(),
            dropped_datagrams: self.udp_queued.dropped() + self.udp_ingress_queued.dropped(),
        }
    }

    fn pool(&self, caller: &Caller) -> &Pool {
        match caller {
            Caller::Ingress => &self.ingress,
            Caller::Workload { .. } => &self.vips,
        }
    }

    /// Accepts on `listener` until aborted, handling each connection on a
    /// task of its own; one the pool of `kind` has no place for is closed
    /// at once (so the loop never stops refusing sources over their limits).
    async fn accept_loop<F, Fut>(self: Arc<Self>, listener: TcpListener, kind: Kind, handle: F)
    where
        F: Fn(Arc<Self>, TcpStream, SocketAddr) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let pool = match kind {
            Kind::Vips => self.vips.clone(),
            Kind::Ingress => self.ingress.clone(),
        };
        loop {
            let Ok((conn, from)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let source = address_key(from.ip());
            if kind == Kind::Ingress
                && !self
                    .ingress_rate
                    .try_take(&source, std::time::Instant::now())
            {
                pool.count(Closed::SourceRate);
                tracing::debug!(from = %from, "closed a connection: its source opens them faster than it may");
                continue;
            }
            let admitted = match pool.admit(source) {
                Ok(a) => a,
                Err(why) => {
                    pool.count(why);
                    tracing::debug!(from = %from, reason = why.as_str(), "closed a connection as accepted");
                    continue;
                }
            };
            let work = handle(self.clone(), conn, from);
            tokio::spawn(async move {
                work.await;
                drop(admitted);
            });
        }
    }

    /// Carries connections redirected from service VIPs, until aborted.
    pub async fn serve_vips(self: Arc<Self>, listener: TcpListener) {
        self.accept_loop(listener, Kind::Vips, |me, conn, from| async move {
            if let Err(e) = me.vip_connection(conn, from).await {
                tracing::debug!(from = %from, error = %e, "service connection refused");
            }
        })
        .await;
    }

    async fn vip_connection(&self, conn: TcpStream, from: SocketAddr) -> Result<(), String> {
        let to = original_dst(&conn).ok_or("no original destination")?;
        let table = self.services.get();
        let svc = table
            .by_vip(*to.ip())
            .ok_or_else(|| format!("{} is no service", to.ip()))?;
        if !svc.has_tcp_port(to.port()) {
            return Err(format!(
                "{}/{} has no TCP port {}",
                svc.namespace,
                svc.name,
                to.port()
            ));
        }
        let caller = (self.callers)(from.ip())
            .ok_or_else(|| format!("{} is no replica of this node", from.ip()))?;
        self.carry(conn, &svc, to.port(), &caller).await
    }

    /// Carries ingress connections to port `port` of service
    /// `namespace/name`, until aborted.
    pub async fn serve_ingress(
        self: Arc<Self>,
        listener: TcpListener,
        namespace: String,
        name: String,
        port: u16,
    ) {
        self.accept_loop(listener, Kind::Ingress, move |me, conn, from| {
            let (ns, n) = (namespace.clone(), name.clone());
            async move {
                let found = me
                    .services
                    .get()
                    .services()
                    .find(|s| s.namespace == ns && s.name == n)
                    .cloned();
                let done = match found {
                    Some(svc) => me.carry(conn, &svc, port, &Caller::Ingress).await,
                    None => Err(format!("no service {ns}/{n}")),
                };
                if let Err(e) = done {
                    tracing::debug!(from = %from, error = %e, "ingress connection failed");
                }
            }
        })
        .await;
    }

    /// Carries `conn` to an endpoint of `svc` (the policy's pick, else the
    /// next ones), until either side closes or the endpoint leaves.
    pub async fn carry(
        &self,
        mut conn: TcpStream,
        svc: &Service,
        port: u16,
        caller: &Caller,
    ) -> Result<(), String> {
        if let Caller::Workload { namespace, .. } = caller {
            if !svc.admits(namespace) {
                return Err(format!(
                    "{caller} may not connect to {}/{} (its allowFrom)",
                    svc.namespace, svc.name
                ));
            }
        }
        let _ = conn.set_nodelay(true);
        let mut errors = Vec::new();
        let here = self
            .here
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        // Only least connections reads the counts: no copy per connection
        // otherwise.
        let open = if svc.policy == crate::services::LoadBalancing::LeastConnections {
            self.open_connections()
        } else {
            HashMap::new()
        };
        let order = self.balancer.order(
            svc,
            crate::services::ServicePort { port, udp: false },
            &here,
            &open,
        );
        if order.is_empty() {
            return Err(format!(
                "{}/{} has no Ready endpoint",
                svc.namespace, svc.name
            ));
        }
        for e in order.into_iter().take(MAX_TRIES) {
            let dialed =
                tokio::time::timeout(CONNECT_TIMEOUT, self.dialer.dial(e, port, caller)).await;
            let upstream = match dialed {
                Ok(Ok(s)) => s,
                Ok(Err(err)) => {
                    errors.push(format!("{}: {err}", e.replica_id));
                    continue;
                }
                Err(_) => {
                    errors.push(format!(
                        "{}: no answer in {CONNECT_TIMEOUT:?}",
                        e.replica_id
                    ));
                    continue;
                }
            };
            *self
                .open
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(e.replica_id.clone())
                .or_insert(0) += 1;
            let _guard = OpenGuard {
                open: &self.open,
                replica: e.replica_id.clone(),
            };
            let moved = AtomicU64::new(0);
            let copy = async {
                match upstream {
                    Dialed::Tcp(t) => {
                        let _ = crate::splice::splice_bidirectional(&conn, &t, &moved).await;
                    }
                    Dialed::Carry(c) => c.carry(&mut conn, &moved).await,
                }
            };
            tokio::select! {
                () = copy => {}
                () = self.left(svc.vip, &e.replica_id, caller) => {
                    tracing::info!(replica = %e.replica_id, service = %svc.name, caller = %caller, "cut a connection: its endpoint left the service or the service no longer admits the caller");
                }
                why = idle(&moved, &self.limits, self.pool(caller)) => {
                    self.pool(caller).count(why);
                    tracing::debug!(replica = %e.replica_id, service = %svc.name, caller = %caller, reason = why.as_str(), "closed an idle connection");
                }
            }
            return Ok(());
        }
        Err(errors.join("; "))
    }

    /// Resolves once `replica` is no longer an endpoint of the service at
    /// `vip`, or the service no longer admits `caller`.
    async fn left(&self, vip: Ipv4Addr, replica: &str, caller: &Caller) {
        let mut rx = self.services.subscribe();
        loop {
            let still = rx.borrow_and_update().by_vip(vip).is_some_and(|s| {
                s.endpoints.iter().any(|e| e.replica_id == replica)
                    && match caller {
                        Caller::Workload { namespace, .. } => s.admits(namespace),
                        Caller::Ingress => true,
                    }
            });
            if !still {
                return;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Which of the proxy's listeners accepted a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Vips,
    Ingress,
}

/// Resolves once `moved` has not changed for the idle timeout of `limits`,
/// or for the shorter one while `pool` is under pressure; says which. It
/// wakes once per timeout (and when pressure starts), so a connection is
/// closed between one and two timeouts after its last byte.
async fn idle(moved: &AtomicU64, limits: &ProxyLimits, pool: &Pool) -> Closed {
    let mut pressure = pool.pressure.subscribe();
    let mut seen = moved.load(Ordering::Relaxed);
    let mut quiet_since = tokio::time::Instant::now();
    let shorter = limits.idle_timeout_under_pressure < limits.idle_timeout;
    loop {
        let under = *pressure.borrow_and_update() && shorter;
        let timeout = if under {
            limits.idle_timeout_under_pressure
        } else {
            limits.idle_timeout
        };
        tokio::select! {
            () = tokio::time::sleep_until(quiet_since + timeout) => {
                let now = moved.load(Ordering::Relaxed);
                if now != seen {
                    seen = now;
                    quiet_since = tokio::time::Instant::now();
                    continue;
                }
                // Pressure may have ended while this slept (its end wakes
                // no one): read it again.
                let quiet = quiet_since.elapsed();
                if quiet >= limits.idle_timeout {
                    return Closed::Idle;
                }
                if *pressure.borrow() && shorter {
                    return Closed::IdleUnderPressure;
                }
            }
            changed = pressure.changed() => {
                if changed.is_err() {
                    // Never: the pool, which holds the sender, outlives
                    // this borrow.
                    return Closed::Idle;
                }
            }
        }
    }
}

/// Where a redirected connection was headed.
fn original_dst(s: &TcpStream) -> Option<SocketAddrV4> {
    let a = nix::sys::socket::getsockopt(s, nix::sys::socket::sockopt::OriginalDst).ok()?;
    Some(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
        u16::from_be(a.sin_port),
    ))
}

/// Dials endpoints on this node straight over the bridge (their address),
/// and hands the others to `remote`.
#[derive(Debug)]
pub struct BridgeDialer<R> {
    /// This node.
    pub node_id: String,
    /// Dials endpoints on other nodes.
    pub remote: R,
}

impl<R: Dialer> Dialer for BridgeDialer<R> {
    fn dial<'a>(&'a self, e: &'a Endpoint, port: u16, caller: &'a Caller) -> DialFuture<'a> {
        Box::pin(async move {
            match (e.node_id == self.node_id, e.address) {
                (true, Some(addr)) => {
                    let s = TcpStream::connect((addr, port))
                        .await
                        .map_err(|err| format!("{addr}:{port}: {err}"))?;
                    let _ = s.set_nodelay(true);
                    Ok(Dialed::Tcp(s))
                }
                _ => self.remote.dial(e, port, caller).await,
            }
        })
    }

    fn dial_datagrams<'a>(
        &'a self,
        e: &'a Endpoint,
        port: u16,
        caller: &'a Caller,
    ) -> DatagramDialFuture<'a> {
        Box::pin(async move {
            match (e.node_id == self.node_id, e.address) {
                (true, Some(addr)) => {
                    let s = tokio::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
                        .await
                        .map_err(|err| format!("a UDP socket: {err}"))?;
                    s.connect((addr, port))
                        .await
                        .map_err(|err| format!("{addr}:{port}/udp: {err}"))?;
                    Ok(Datagrams::socket(s))
                }
                _ => self.remote.dial_datagrams(e, port, caller).await,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::services::{LoadBalancing, ServicePort, ServiceTable};

    /// Endpoints on other nodes are out of reach here.
    pub(super) struct NoRemote;

    impl Dialer for NoRemote {
        fn dial<'a>(&'a self, _: &'a Endpoint, _: u16, _: &'a Caller) -> DialFuture<'a> {
            Box::pin(async { Err("no other node".to_owned()) })
        }
    }

    /// A proxy of node `n1` for `services` with `limits`, telling callers
    /// apart with `callers`; endpoints on other nodes are out of reach.
    pub(super) fn on_n1(
        services: SharedServices,
        callers: CallerLookup,
        limits: ProxyLimits,
    ) -> Arc<ServiceProxy> {
        ServiceProxy::with_limits(
            services,
            Here {
                node_id: "n1".into(),
                ..Here::default()
            },
            Arc::new(BridgeDialer {
                node_id: "n1".into(),
                remote: NoRemote,
            }),
            callers,
            limits,
        )
    }

    /// An echo server on 127.0.0.1; its port.
    async fn echo_server() -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = l.local_addr().expect("addr").port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        port
    }

    /// An ingress listener of a proxy with `limits`, carrying to a service
    /// whose one endpoint is the echo server; the listener's address and
    /// the proxy.
    async fn ingress(limits: ProxyLimits) -> (SocketAddr, Arc<ServiceProxy>) {
        let port = echo_server().await;
        let svc = Service {
            namespace: "ns".into(),
            name: "api".into(),
            vip: Ipv4Addr::new(10, 96, 0, 1),
            ports: vec![ServicePort { port, udp: false }],
            policy: LoadBalancing::RoundRobin,
            allow_from: vec![],
            weights: BTreeMap::new(),
            endpoints: vec![Endpoint {
                replica_id: "r1".into(),
                node_id: "n1".into(),
                address: Some(Ipv4Addr::LOCALHOST),
                zone: String::new(),
                region: String::new(),
            }],
        };
        let services = SharedServices::default();
        services.set(ServiceTable::new("cluster.local", vec![svc]));
        let proxy = on_n1(services, Arc::new(|_| None), limits);
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(
            proxy
                .clone()
                .serve_ingress(l, "ns".into(), "api".into(), port),
        );
        (addr, proxy)
    }

    /// Sends `msg` and reads the echo; `None` if the connection is closed.
    async fn exchange(s: &mut TcpStream, msg: &[u8]) -> Option<Vec<u8>> {
        s.write_all(msg).await.ok()?;
        let mut back = vec![0u8; msg.len()];
        match tokio::time::timeout(Duration::from_secs(3), s.read_exact(&mut back)).await {
            Ok(Ok(_)) => Some(back),
            _ => None,
        }
    }

    /// Whether the proxy closed `s` (an end or a reset within 3 s).
    async fn closed(s: &mut TcpStream) -> bool {
        let mut b = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(3), s.read(&mut b)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn one_source_holds_at_most_its_share_of_connections() {
        let (at, _) = ingress(ProxyLimits {
            ingress_per_source: 2,
            ..ProxyLimits::default()
        })
        .await;
        let mut c1 = TcpStream::connect(at).await.expect("connect");
        let mut c2 = TcpStream::connect(at).await.expect("connect");
        assert_eq!(
            exchange(&mut c1, b"one").await.as_deref(),
            Some(&b"one"[..])
        );
        assert_eq!(
            exchange(&mut c2, b"two").await.as_deref(),
            Some(&b"two"[..])
        );
        let mut c3 = TcpStream::connect(at).await.expect("connect");
        assert!(closed(&mut c3).await, "a third connection was carried");
        // The first two still work; once one closes, there is room again.
        assert_eq!(
            exchange(&mut c1, b"again").await.as_deref(),
            Some(&b"again"[..])
        );
        drop(c1);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        loop {
            let mut c4 = TcpStream::connect(at).await.expect("connect");
            if exchange(&mut c4, b"four").await.as_deref() == Some(&b"four"[..]) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no room after a connection closed"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn a_quiet_connection_is_closed_and_a_busy_one_kept() {
        let (at, proxy) = ingress(ProxyLimits {
            idle_timeout: Duration::from_secs(1),
            ..ProxyLimits::default()
        })
        .await;
        let mut quiet = TcpStream::connect(at).await.expect("connect");
        let mut busy = TcpStream::connect(at).await.expect("connect");
        assert!(exchange(&mut quiet, b"hi").await.is_some());
        // Busy: a message every 100 ms for 2.5 s, each echoed; the quiet
        // one is closed within two timeouts (2 s).
        for i in 0..25u8 {
            assert_eq!(
                exchange(&mut busy, &[i]).await.as_deref(),
                Some(&[i][..]),
                "the busy connection was cut"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            closed(&mut quiet).await,
            "the quiet connection is still open"
        );
        let closed_idle = proxy.stats().ingress.closed_for(Closed::Idle);
        assert_eq!(closed_idle, 1, "{:?}", proxy.stats());
    }

    #[tokio::test]
    async fn a_full_pool_refuses_and_a_nearly_full_one_closes_quiet_connections_sooner() {
        let (at, proxy) = ingress(ProxyLimits {
            max_connections: 4,
            idle_timeout_under_pressure: Duration::from_secs(1),
            ..ProxyLimits::default()
        })
        .await;
        let mut quiet = TcpStream::connect(at).await.expect("connect");
        assert!(exchange(&mut quiet, b"hi").await.is_some());
        // Below pressure, a quiet connection stays (its timeout is an hour;
        // under pressure it would be gone within 2 s).
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(exchange(&mut quiet, b"still").await.is_some());
        let mut busy = Vec::new();
        for _ in 0..3 {
            let mut c = TcpStream::connect(at).await.expect("connect");
            assert!(exchange(&mut c, b"x").await.is_some());
            busy.push(c);
        }
        assert_eq!(proxy.stats().ingress.open, 4);
        // Full: a fifth is closed as accepted.
        let mut fifth = TcpStream::connect(at).await.expect("connect");
        assert!(closed(&mut fifth).await, "a fifth connection was carried");
        // Nearly full: the quiet one goes within two of its shorter
        // timeouts, the busy ones (a byte every 50 ms) stay.
        for round in 0..50u8 {
            for c in &mut busy {
                assert_eq!(
                    exchange(c, &[round]).await.as_deref(),
                    Some(&[round][..]),
                    "a busy connection was cut"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            closed(&mut quiet).await,
            "the quiet connection kept its slot"
        );
        let mut sixth = TcpStream::connect(at).await.expect("connect");
        assert_eq!(
            exchange(&mut sixth, b"sixth").await.as_deref(),
            Some(&b"sixth"[..]),
            "no room after the quiet connection was closed"
        );
        let stats = proxy.stats().ingress;
        assert_eq!(stats.closed_for(Closed::Full), 1, "{stats:?}");
        assert_eq!(stats.closed_for(Closed::IdleUnderPressure), 1, "{stats:?}");
        assert_eq!(stats.closed_for(Closed::Idle), 0, "{stats:?}");
    }

    #[test]
    fn pressure_starts_above_three_quarters_and_ends_below_five_eighths() {
        let pool = Pool::new(8, 16);
        let under = || *pool.pressure.borrow();
        let mut held = Vec::new();
        for _ in 0..6 {
            held.push(pool.admit("a".into()).expect("room"));
            assert!(!under(), "pressure at {}", held.len());
        }
        held.push(pool.admit("a".into()).expect("room"));
        assert!(under(), "no pressure at 7 of 8");
        held.push(pool.admit("a".into()).expect("room"));
        assert_eq!(pool.admit("a".into()).err(), Some(Closed::Full));
        // Down to 5: still under pressure; at 4 it ends.
        held.truncate(5);
        assert!(under(), "pressure ended at 5 of 8");
        held.truncate(4);
        assert!(!under(), "pressure still on at 4 of 8");
        assert_eq!(pool.stats().open, 4);
        drop(held);
        assert_eq!(pool.stats().open, 0);
        assert!(
            pool.lock().by_source.is_empty(),
            "a source's count was left"
        );
    }

    #[test]
    fn the_pools_fit_the_open_files_limit() {
        // Six files per TCP connection (two sockets, two pipes), two TCP
        // pools, and one per UDP flow from outside.
        assert_eq!(ProxyLimits::for_open_files(1 << 20).max_connections, 16_384);
        assert_eq!(ProxyLimits::default().open_files_needed(), 214_016);
        assert_eq!(ProxyLimits::for_open_files(214_016).max_connections, 16_384);
        assert_eq!(ProxyLimits::for_open_files(65_536).max_connections, 4962);
        assert_eq!(ProxyLimits::for_open_files(1024).max_connections, 39);
        assert_eq!(ProxyLimits::for_open_files(0).max_connections, 16);
    }

    #[tokio::test]
    async fn an_ingress_source_opening_connections_too_fast_is_refused() {
        let (at, proxy) = ingress(ProxyLimits {
            ingress_rate: Rate { per_s: 1, burst: 3 },
            ..ProxyLimits::default()
        })
        .await;
        let mut kept = Vec::new();
        for i in 0..3u8 {
            let mut c = TcpStream::connect(at).await.expect("connect");
            assert_eq!(exchange(&mut c, &[i]).await.as_deref(), Some(&[i][..]));
            kept.push(c);
        }
        let mut fourth = TcpStream::connect(at).await.expect("connect");
        assert!(
            closed(&mut fourth).await,
            "a fourth connection at once was carried"
        );
        assert_eq!(
            proxy.stats().ingress.closed_for(Closed::SourceRate),
            1,
            "{:?}",
            proxy.stats()
        );
        // The rate refills: a second later there is room for one more, and
        // the open connections were never touched.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let mut later = TcpStream::connect(at).await.expect("connect");
        assert_eq!(
            exchange(&mut later, b"later").await.as_deref(),
            Some(&b"later"[..])
        );
        for c in &mut kept {
            assert_eq!(exchange(c, b"ok").await.as_deref(), Some(&b"ok"[..]));
        }
    }
}
