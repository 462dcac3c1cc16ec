//! UDP through service VIPs. The node's firewall redirects datagrams a
//! replica sends to `VIP:port/udp` to a socket of the proxy kept for that
//! service port (one per port, on the bridge's address); the kernel's
//! connection tracking turns the source of the proxy's answers back into
//! `VIP:port`, so the replica sees its service answer.
//!
//! Each caller address and port is a flow, held by one endpoint that the
//! service's policy picks when the flow starts (as conntrack pins a UDP
//! mapping): a connected UDP socket to an endpoint on this node, an overlay
//! stream of datagrams to an endpoint elsewhere (at most
//! [`ProxyLimits::udp_flows_per_node`] per other node). Ingress ports of
//! UDP are served the same way, from a socket on the node's addresses,
//! each outside address and port (and address called) a flow of a pool of
//! their own. A flow counts as a connection of its pool (its per-source
//! and pool limits), and ends when it has been quiet for
//! [`ProxyLimits::udp_idle_timeout`] once assured (its caller sent again
//! after an answer), for [`ProxyLimits::udp_unassured_timeout`] before or
//! while its pool is under pressure (from outside only the caller's
//! datagrams count), when a new flow from outside takes its place in a full
//! pool before it is assured ([`Unassured`]), when its endpoint leaves the service or the service
//! no longer admits its caller, when its port is no longer served, when its
//! address no longer belongs to a replica of its caller's workload (checked
//! every [`CALLER_CHECK`]), or when its endpoint's side fails; the caller's
//! next datagram then starts a new flow. Datagrams a flow cannot take at
//! once are dropped, as a congested link would: at most
//! [`FLOW_QUEUE_BYTES`] wait per flow and [`QUEUED_BYTES`] for the
//! replicas' flows, as much again for those from outside.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};

use cloudless_types::rate_limit::address_key;

use super::{
    Admitted, Caller, Closed, OpenGuard, Pool, ProxyLimits, ServiceProxy, CONNECT_TIMEOUT,
    MAX_TRIES,
};
use crate::services::{LoadBalancing, Service, ServicePort};

/// Largest datagram carried (a UDP payload is at most 65,507 bytes over
/// IPv4).
pub const MAX_DATAGRAM: usize = u16::MAX as usize;

/// Bytes of datagrams one flow may have waiting (each counted with
/// [`DATAGRAM_OVERHEAD`]); more are dropped, as a congested link drops.
const FLOW_QUEUE_BYTES: usize = 256 * 1024;
/// Bytes of datagrams all flows of the proxy may have waiting together.
const QUEUED_BYTES: usize = 32 * 1024 * 1024;
/// What a queued datagram costs besides its bytes (so empty ones count).
const DATAGRAM_OVERHEAD: usize = 64;
/// How often a flow checks that its caller still runs here (an address
/// taken over by another replica is not its caller).
const CALLER_CHECK: Duration = Duration::from_secs(2);

/// A boxed I/O future.
pub type IoFuture<'a, T> = Pin<Box<dyn Future<Output = io::Result<T>> + Send + 'a>>;

/// Sends datagrams to an endpoint.
pub trait DatagramTx: Send {
    /// Sends one datagram.
    fn send<'a>(&'a mut self, datagram: Bytes) -> IoFuture<'a, ()>;
}

/// Receives an endpoint's datagrams.
pub trait DatagramRx: Send {
    /// The next datagram, or `None` once the endpoint's side ended.
    fn recv(&mut self) -> IoFuture<'_, Option<Bytes>>;
}

/// A flow of datagrams to an endpoint, both ways.
pub struct Datagrams {
    /// Towards the endpoint.
    pub tx: Box<dyn DatagramTx>,
    /// From it.
    pub rx: Box<dyn DatagramRx>,
}

impl std::fmt::Debug for Datagrams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Datagrams")
    }
}

/// What a datagram dial returns.
pub type DatagramDialFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Datagrams, String>> + Send + 'a>>;

struct SocketTx(Arc<UdpSocket>);

impl DatagramTx for SocketTx {
    fn send<'a>(&'a mut self, datagram: Bytes) -> IoFuture<'a, ()> {
        Box::pin(async move {
            match self.0.send(&datagram).await {
                Ok(_) => Ok(()),
                // The endpoint said nothing listens there (ICMP): this
                // datagram is lost, as it would be without the proxy.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(()),
                Err(e) => Err(e),
            }
        })
    }
}

struct SocketRx(Arc<UdpSocket>);

thread_local! {
    /// Where a flow's socket reads into: one buffer per thread, not one of
    /// 64 KiB per flow (it is never held across an await).
    static RECEIVED: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; MAX_DATAGRAM]);
}

impl DatagramRx for SocketRx {
    fn recv(&mut self) -> IoFuture<'_, Option<Bytes>> {
        Box::pin(async move {
            loop {
                self.0.readable().await?;
                let read = RECEIVED.with(|buf| {
                    let mut buf = buf.borrow_mut();
                    self.0
                        .try_recv(&mut buf)
                        .map(|n| Bytes::copy_from_slice(&buf[..n]))
                });
                match read {
                    Ok(d) => return Ok(Some(d)),
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::ConnectionRefused
                        ) => {}
                    Err(e) => return Err(e),
                }
            }
        })
    }
}

impl Datagrams {
    /// A UDP socket connected to its endpoint, as a flow.
    pub fn socket(s: UdpSocket) -> Self {
        let s = Arc::new(s);
        Self {
            tx: Box::new(SocketTx(s.clone())),
            rx: Box::new(SocketRx(s)),
        }
    }
}

/// Bytes queued for flows, proxy-wide, and datagrams dropped for want of
/// room.
#[derive(Debug, Default)]
pub(super) struct UdpQueued(AtomicUsize, AtomicU64);

impl UdpQueued {
    /// Datagrams dropped so far.
    pub(super) fn dropped(&self) -> u64 {
        self.1.load(Ordering::Relaxed)
    }

    fn drop_one(&self) {
        self.1.fetch_add(1, Ordering::Relaxed);
    }
}

/// Where a flow takes its caller's datagrams: a queue bounded in bytes, per
/// flow and for the whole proxy.
#[derive(Clone)]
struct FlowQueue {
    tx: mpsc::UnboundedSender<Queued>,
    queued: Arc<AtomicUsize>,
}

/// A datagram in a flow's queue; what it costs is given back when it is
/// dropped, however it leaves the queue (taken, or dropped with the queue).
struct Queued {
    d: Bytes,
    cost: usize,
    flow: Arc<AtomicUsize>,
    total: Arc<UdpQueued>,
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.flow.fetch_sub(self.cost, Ordering::Relaxed);
        self.total.0.fetch_sub(self.cost, Ordering::Relaxed);
    }
}

/// The flows of one service port, by key.
type Flows = Arc<Mutex<HashMap<FlowKey, FlowQueue>>>;

impl FlowQueue {
    /// Queues `d`, unless the flow's or the proxy's queued bytes would
    /// pass their bounds: then it is dropped. `Err` with it if the flow has
    /// ended.
    fn push(&self, d: Bytes, total: &Arc<UdpQueued>) -> Result<(), Bytes> {
        if self.tx.is_closed() {
            return Err(d);
        }
        let cost = d.len() + DATAGRAM_OVERHEAD;
        if self.queued.load(Ordering::Relaxed) + cost > FLOW_QUEUE_BYTES {
            total.drop_one();
            return Ok(());
        }
        if total.0.fetch_add(cost, Ordering::Relaxed) + cost > QUEUED_BYTES {
            total.0.fetch_sub(cost, Ordering::Relaxed);
            total.drop_one();
            return Ok(());
        }
        self.queued.fetch_add(cost, Ordering::Relaxed);
        let queued = Queued {
            d,
            cost,
            flow: self.queued.clone(),
            total: total.clone(),
        };
        self.tx
            .send(queued)
            // Dropping the refused one gives its cost back.
            .map_err(|e| e.0.d.clone())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ServiceProxy {
    /// Carries the datagrams replicas send to UDP port `port` of the
    /// service at `vip`, which the node's firewall redirects to `socket`,
    /// until aborted (its flows end with it).
    pub async fn serve_udp(self: Arc<Self>, socket: UdpSocket, vip: Ipv4Addr, port: u16) {
        let socket = Arc::new(socket);
        let flows: Flows = Arc::default();
        // Dropped with this future: every flow sees it and ends.
        let (serving, _) = watch::channel(());
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            let (n, from) = match socket.recv_from(&mut buf).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(error = %e, %vip, port, "UDP receive failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let Some(datagram) = self.to_flow(&flows, (from, None), &buf[..n], &self.udp_queued)
            else {
                continue;
            };
            let flow = Flow {
                port,
                from,
                local: None,
                socket: socket.clone(),
                ended: serving.subscribe(),
            };
            if let Err(e) = self.start_vip_flow(vip, flow, &flows, datagram) {
                tracing::debug!(from = %from, %vip, port, error = %e, "UDP datagram refused");
            }
        }
    }

    /// Carries datagrams from outside to UDP port `port` of service
    /// `namespace/name` (an ingress port of this node, `socket` made by
    /// [`ingress_socket`]), until aborted (its flows end with it; the
    /// socket may serve the next route of its port). Each source address
    /// and port is a flow of the ingress UDP pool (its limit per source,
    /// the ingress rate of new flows per source), answered from the address
    /// it was sent to.
    pub async fn serve_ingress_udp(
        self: Arc<Self>,
        socket: Arc<UdpSocket>,
        namespace: String,
        name: String,
        port: u16,
    ) {
        let flows: Flows = Arc::default();
        let (serving, _) = watch::channel(());
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            let (n, from, local) = match recv_with_local(&socket, &mut buf).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(error = %e, port, "ingress UDP receive failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let Some(datagram) =
                self.to_flow(&flows, (from, local), &buf[..n], &self.udp_ingress_queued)
            else {
                continue;
            };
            let flow = Flow {
                port,
                from,
                local,
                socket: socket.clone(),
                ended: serving.subscribe(),
            };
            if let Err(e) = self.start_ingress_flow(&namespace, &name, flow, &flows, datagram) {
                tracing::debug!(from = %from, service = %format!("{namespace}/{name}"), port, error = %e, "ingress UDP datagram refused");
            }
        }
    }

    /// Queues `datagram` on the flow of `key` (queueing never waits,
    /// counting against `budget`); the datagram back when there is none (or
    /// it has just ended): it starts the next one.
    fn to_flow(
        &self,
        flows: &Flows,
        key: FlowKey,
        datagram: &[u8],
        budget: &Arc<UdpQueued>,
    ) -> Option<Bytes> {
        let datagram = Bytes::copy_from_slice(datagram);
        let mut flows = lock(flows);
        match flows.get(&key) {
            Some(flow) => match flow.push(datagram, budget) {
                Ok(()) => None,
                Err(d) => {
                    flows.remove(&key);
                    Some(d)
                }
            },
            None => Some(datagram),
        }
    }

    /// Starts `flow`, sent by a replica to `vip`, with its first datagram.
    fn start_vip_flow(
        self: &Arc<Self>,
        vip: Ipv4Addr,
        flow: Flow,
        flows: &Flows,
        first: Bytes,
    ) -> Result<(), String> {
        let (port, from) = (flow.port, flow.from);
        let svc = self
            .services
            .get()
            .by_vip(vip)
            .filter(|s| s.has_port(port, true))
            .ok_or_else(|| format!("{vip} has no UDP port {port}"))?;
        let caller = (self.callers)(from.ip())
            .ok_or_else(|| format!("{} is no replica of this node", from.ip()))?;
        if let Caller::Workload { namespace, .. } = &caller {
            if !svc.admits(namespace) {
                return Err(format!(
                    "{caller} may not reach {}/{} (its allowFrom)",
                    svc.namespace, svc.name
                ));
            }
        }
        let admitted = self.vips.admit(address_key(from.ip())).map_err(|why| {
            self.vips.count(why);
            format!("closed: {}", why.as_str())
        })?;
        self.spawn_flow(svc, caller, flow, admitted, flows, first);
        Ok(())
    }

    /// Starts `flow`, from outside to service `namespace/name`, with its
    /// first datagram. The source's rate is checked first: a refused
    /// datagram costs a lookup, not a scan of the services.
    fn start_ingress_flow(
        self: &Arc<Self>,
        namespace: &str,
        name: &str,
        flow: Flow,
        flows: &Flows,
        first: Bytes,
    ) -> Result<(), String> {
        let port = flow.port;
        let source = address_key(flow.from.ip());
        if !self
            .ingress_udp_rate
            .try_take(&source, std::time::Instant::now())
        {
            self.ingress_udp.count(Closed::SourceRate);
            return Err("its source starts flows faster than it may".into());
        }
        let svc = self
            .services
            .get()
            .services()
            .find(|s| s.namespace == namespace && s.name == name && s.has_port(port, true))
            .cloned()
            .ok_or_else(|| format!("no service {namespace}/{name} with UDP port {port}"))?;
        // A full pool gives the place of its oldest flow not assured yet
        // to this one (as conntrack drops an unassured mapping early), at
        // most at the rate the pool's own flows would end.
        let admitted = match self.ingress_udp.admit(source.clone()) {
            Err(Closed::Full)
                if self
                    .ingress_give_way_rate
                    .try_take("", std::time::Instant::now())
                    && self.ingress_unassured.give_way() =>
            {
                self.ingress_udp.count(Closed::GaveWay);
                self.ingress_udp.admit(source)
            }
            admitted => admitted,
        }
        .map_err(|why| {
            self.ingress_udp.count(why);
            format!("closed: {}", why.as_str())
        })?;
        self.spawn_flow(svc, Caller::Ingress, flow, admitted, flows, first);
        Ok(())
    }

    /// The pool of `caller`'s UDP flows and the room for their datagrams.
    fn udp_pool(&self, caller: &Caller) -> (&Arc<Pool>, &Arc<UdpQueued>) {
        match caller {
            Caller::Ingress => (&self.ingress_udp, &self.udp_ingress_queued),
            Caller::Workload { .. } => (&self.vips, &self.udp_queued),
        }
    }

    /// Runs `flow` of `caller` to `svc` on a task of its own, holding its
    /// place in its pool until it ends.
    fn spawn_flow(
        self: &Arc<Self>,
        svc: Arc<Service>,
        caller: Caller,
        flow: Flow,
        admitted: Admitted,
        flows: &Flows,
        first: Bytes,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        let queue = FlowQueue {
            tx,
            queued: Arc::default(),
        };
        let _ = queue.push(first, self.udp_pool(&caller).1);
        let key = (flow.from, flow.local);
        lock(flows).insert(key, queue.clone());
        let (me, flows) = (self.clone(), flows.clone());
        let mut ended = flow.ended.clone();
        // A flow from outside may give its place to a newer one until it
        // is assured.
        let place = Arc::new(Place {
            admitted: Mutex::new(Some(admitted)),
            taken: tokio::sync::Notify::new(),
        });
        let unassured = (caller == Caller::Ingress).then(|| self.ingress_unassured.add(&place));
        tokio::spawn(async move {
            let mut rx = rx;
            let assured = || {
                if let Some(id) = unassured {
                    me.ingress_unassured.remove(id);
                }
            };
            // The port no longer served ends the flow wherever it is, also
            // while it dials (an overlay read dropped halfway is fine: the
            // flow ends with it); so does a newer flow taking its place.
            tokio::select! {
                // A flow whose place was taken carries nothing more.
                biased;
                () = place.taken.notified() => {
                    tracing::debug!(from = %flow.from, service = %svc.name, port = flow.port, "ended a UDP flow not yet assured: a new one took its place in the full pool");
                }
                done = me.udp_flow(&svc, &caller, &flow, &mut rx, &assured) => {
                    if let Err(e) = done {
                        tracing::debug!(from = %flow.from, service = %svc.name, port = flow.port, error = %e, "UDP flow failed");
                    }
                }
                _ = ended.changed() => {}
            }
            assured();
            // What the flow did not take is dropped with it (and given
            // back).
            drop(rx);
            drop(place);
            let mut flows = lock(&flows);
            if flows
                .get(&key)
                .is_some_and(|f| f.tx.same_channel(&queue.tx))
            {
                flows.remove(&key);
            }
        });
    }

    /// A place for one more UDP flow of `caller` to an endpoint on node
    /// `node`, unless it carries its share already
    /// ([`ProxyLimits::udp_flows_per_node`], half as many from outside).
    fn remote_udp_place(&self, node: &str, caller: &Caller) -> Option<RemoteUdp<'_>> {
        let outside = *caller == Caller::Ingress;
        let most = if outside {
            (self.limits.udp_flows_per_node / 2).max(1)
        } else {
            self.limits.udp_flows_per_node
        };
        let key = (node.to_owned(), outside);
        let mut open = lock(&self.remote_udp);
        let n = open.entry(key.clone()).or_insert(0);
        if *n >= most {
            return None;
        }
        *n += 1;
        Some(RemoteUdp {
            open: &self.remote_udp,
            key,
        })
    }

    /// Carries `flow` to an endpoint of `svc` until it is quiet, its
    /// endpoint leaves, its caller is no longer the replica at its address,
    /// or either side fails.
    async fn udp_flow(
        &self,
        svc: &Service,
        caller: &Caller,
        flow: &Flow,
        queue: &mut mpsc::UnboundedReceiver<Queued>,
        assured: &(dyn Fn() + Sync),
    ) -> Result<(), String> {
        let here = lock(&self.here).clone();
        let open = if svc.policy == LoadBalancing::LeastConnections {
            self.open_connections()
        } else {
            HashMap::new()
        };
        let lane = ServicePort {
            port: flow.port,
            udp: true,
        };
        let order = self.balancer.order(svc, lane, &here, &open);
        if order.is_empty() {
            return Err(format!(
                "{}/{} has no Ready endpoint",
                svc.namespace, svc.name
            ));
        }
        let mut errors = Vec::new();
        for e in order.into_iter().take(MAX_TRIES) {
            let _remote = if e.node_id == here.node_id {
                None
            } else {
                match self.remote_udp_place(&e.node_id, caller) {
                    Some(place) => Some(place),
                    None => {
                        errors.push(format!(
                            "{}: node {} carries its most UDP flows from here",
                            e.replica_id, e.node_id
                        ));
                        continue;
                    }
                }
            };
            let dialed = tokio::time::timeout(
                CONNECT_TIMEOUT,
                self.dialer.dial_datagrams(e, flow.port, caller),
            )
            .await;
            let Datagrams { mut tx, mut rx } = match dialed {
                Ok(Ok(d)) => d,
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
            *lock(&self.open).entry(e.replica_id.clone()).or_insert(0) += 1;
            let _guard = OpenGuard {
                open: &self.open,
                replica: e.replica_id.clone(),
            };
            let activity = Activity::default();
            // Each direction is one loop for the flow's life: a read is
            // never dropped halfway (an overlay flow's reads are not
            // cancel-safe).
            let up = async {
                while let Some(q) = queue.recv().await {
                    let d = q.d.clone();
                    drop(q);
                    if activity.caller_sent() {
                        assured();
                    }
                    if tx.send(d).await.is_err() {
                        return;
                    }
                }
            };
            // From outside, an answer keeps nothing alive: only the
            // caller's datagrams do.
            let answers_count = *caller != Caller::Ingress;
            let down = async {
                while let Ok(Some(d)) = rx.recv().await {
                    activity.answered(answers_count);
                    let _ = flow.answer(&d).await;
                }
            };
            // Ingress comes from outside: no replica address to check.
            let caller_left = async {
                if *caller == Caller::Ingress {
                    return std::future::pending().await;
                }
                let mut every = tokio::time::interval(CALLER_CHECK);
                loop {
                    every.tick().await;
                    if (self.callers)(flow.from.ip()).as_ref() != Some(caller) {
                        return;
                    }
                }
            };
            let pool = self.udp_pool(caller).0;
            tokio::select! {
                () = up => {}
                () = down => {}
                () = self.left(svc.vip, &e.replica_id, caller) => {
                    tracing::info!(replica = %e.replica_id, service = %svc.name, caller = %caller, "ended a UDP flow: its endpoint left the service or the service no longer admits the caller");
                }
                why = udp_idle(&activity, &self.limits, pool) => {
                    if why != Closed::Idle {
                        pool.count(why);
                    }
                }
                () = caller_left => {
                    tracing::debug!(from = %flow.from, "ended a UDP flow: its caller is no longer the replica at its address");
                }
            }
            return Ok(());
        }
        Err(errors.join("; "))
    }
}

/// A flow's place in its pool; a newer flow may take it (and end the flow)
/// while the flow is among the [`Unassured`].
struct Place {
    admitted: Mutex<Option<Admitted>>,
    taken: tokio::sync::Notify,
}

/// Places a full ingress UDP pool gives to new flows at least each second.
const MIN_GIVE_WAY_PER_S: u32 = 100;

/// How fast a full ingress UDP pool gives places of flows not yet assured
/// to new ones: as fast as its flows would end under pressure (all of them
/// within [`ProxyLimits::udp_unassured_timeout`]), so a flood from forged
/// sources reaches the services at most about twice as fast as when every
/// new flow was refused; at least [`MIN_GIVE_WAY_PER_S`].
pub(super) fn give_way_rate(limits: &ProxyLimits) -> cloudless_types::rate_limit::Rate {
    let secs = limits.udp_unassured_timeout.as_secs_f64().max(0.001);
    let per_s = ((limits.max_connections as f64 / secs) as u32).max(MIN_GIVE_WAY_PER_S);
    cloudless_types::rate_limit::Rate {
        per_s,
        burst: per_s,
    }
}

/// The flows from outside not assured yet, oldest first. When the ingress
/// UDP pool is full, a new flow takes the place of the oldest of them (as
/// conntrack drops an unassured mapping early when its table is full): a
/// flood from forged sources (a datagram from each address, never followed
/// up after an answer) then takes places from its own flows, assured flows
/// keep theirs, and a real new caller still gets in (unless the flood
/// starts flows so fast that the caller's is taken before its answer and
/// next datagram make it assured).
#[derive(Default)]
pub(super) struct Unassured {
    next: AtomicU64,
    flows: Mutex<std::collections::BTreeMap<u64, std::sync::Weak<Place>>>,
}

impl Unassured {
    /// Adds the flow holding `place`; its id.
    fn add(&self, place: &Arc<Place>) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.flows).insert(id, Arc::downgrade(place));
        id
    }

    /// The flow `id` is assured, or ended.
    fn remove(&self, id: u64) {
        lock(&self.flows).remove(&id);
    }

    /// Ends the oldest flow not assured yet and frees its place at once;
    /// whether there was one.
    fn give_way(&self) -> bool {
        loop {
            let Some((_, oldest)) = lock(&self.flows).pop_first() else {
                return false;
            };
            let Some(place) = oldest.upgrade() else {
                continue;
            };
            let freed = lock(&place.admitted).take();
            place.taken.notify_one();
            if freed.is_some() {
                return true;
            }
        }
    }
}

/// A UDP flow's place among those carried to one other node.
struct RemoteUdp<'a> {
    open: &'a Mutex<HashMap<(String, bool), usize>>,
    key: (String, bool),
}

impl Drop for RemoteUdp<'_> {
    fn drop(&mut self) {
        let mut open = lock(self.open);
        if let Some(n) = open.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// What a flow has carried: datagrams that keep it alive, and whether it
/// is assured (its caller sent again after an answer, as conntrack's UDP
/// mappings are).
#[derive(Default)]
struct Activity {
    moved: AtomicU64,
    answered: std::sync::atomic::AtomicBool,
    assured: std::sync::atomic::AtomicBool,
}

impl Activity {
    /// A datagram from the caller; whether it made the flow assured.
    fn caller_sent(&self) -> bool {
        self.moved.fetch_add(1, Ordering::Relaxed);
        self.answered.load(Ordering::Relaxed) && !self.assured.swap(true, Ordering::Relaxed)
    }

    /// An answer; it keeps the flow alive when `counts`.
    fn answered(&self, counts: bool) {
        self.answered.store(true, Ordering::Relaxed);
        if counts {
            self.moved.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Resolves once `activity` has not moved for its timeout: the UDP idle
/// timeout of `limits` for an assured flow while `pool` is not under
/// pressure, else the shorter unassured one; says why. It wakes once per
/// timeout (and when pressure starts), so a flow ends between one and two
/// timeouts after its last datagram.
async fn udp_idle(activity: &Activity, limits: &ProxyLimits, pool: &Pool) -> Closed {
    let timeout_of = |assured: bool, under: bool| {
        if assured && !under {
            limits.udp_idle_timeout
        } else {
            limits.udp_unassured_timeout.min(limits.udp_idle_timeout)
        }
    };
    let mut pressure = pool.pressure.subscribe();
    let mut seen = activity.moved.load(Ordering::Relaxed);
    let mut quiet_since = tokio::time::Instant::now();
    loop {
        let under = *pressure.borrow_and_update();
        let timeout = timeout_of(activity.assured.load(Ordering::Relaxed), under);
        tokio::select! {
            () = tokio::time::sleep_until(quiet_since + timeout) => {
                let now = activity.moved.load(Ordering::Relaxed);
                if now != seen {
                    seen = now;
                    quiet_since = tokio::time::Instant::now();
                    continue;
                }
                // Pressure may have ended while this slept (its end wakes
                // no one): its timeout may have grown.
                let under = *pressure.borrow();
                let assured = activity.assured.load(Ordering::Relaxed);
                if quiet_since.elapsed() < timeout_of(assured, under) {
                    continue;
                }
                return if under && assured {
                    Closed::IdleUnderPressure
                } else {
                    Closed::Idle
                };
            }
            changed = pressure.changed() => {
                if changed.is_err() {
                    return Closed::Idle;
                }
            }
        }
    }
}

/// A flow's key: its caller's address and port, and (ingress) the node's
/// address it was sent to.
type FlowKey = (SocketAddr, Option<Ipv4Addr>);

/// One flow: the service port it was sent to and from where.
struct Flow {
    port: u16,
    from: SocketAddr,
    /// The node's address it was sent to, where answers must come from
    /// (ingress; `None`: the socket's own).
    local: Option<Ipv4Addr>,
    /// The port's socket (answers leave from it).
    socket: Arc<UdpSocket>,
    /// Changes (its sender dropped) when the port is no longer served.
    ended: watch::Receiver<()>,
}

impl Flow {
    /// Sends an endpoint's answer to the caller.
    async fn answer(&self, d: &[u8]) -> io::Result<()> {
        match (self.local, self.from) {
            (Some(local), SocketAddr::V4(to)) => send_from(&self.socket, d, to, local).await,
            _ => self.socket.send_to(d, self.from).await.map(drop),
        }
    }
}

/// A UDP socket for an ingress port: bound to every IPv4 address of the
/// node (port 53 shared with the node's resolver on its bridge address:
/// see [`crate::sockets`]), told the address each datagram was sent to (so
/// answers leave from it, as the caller expects, on a node with several).
pub fn ingress_socket(port: u16) -> io::Result<UdpSocket> {
    let s = crate::sockets::udp(
        std::net::SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port),
        crate::sockets::ingress_shared(port, true)?,
    )?;
    nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Ipv4PacketInfo, &true)
        .map_err(io::Error::from)?;
    UdpSocket::from_std(s)
}

/// Receives a datagram into `buf`: its length, its source, and the node's
/// address it was sent to (from `IP_PKTINFO`, set by [`ingress_socket`]).
async fn recv_with_local(
    socket: &UdpSocket,
    buf: &mut [u8],
) -> io::Result<(usize, SocketAddr, Option<Ipv4Addr>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, SockaddrIn};
    use std::os::fd::AsRawFd;
    socket
        .async_io(tokio::io::Interest::READABLE, || {
            let mut iov = [io::IoSliceMut::new(&mut *buf)];
            let mut space = nix::cmsg_space!(nix::libc::in_pktinfo);
            let msg = recvmsg::<SockaddrIn>(
                socket.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::empty(),
            )
            .map_err(io::Error::from)?;
            let from = msg
                .address
                .map(|a| SocketAddr::from((a.ip(), a.port())))
                .ok_or_else(|| io::Error::other("a datagram without a source address"))?;
            let local = msg.cmsgs().map_err(io::Error::from)?.find_map(|c| match c {
                ControlMessageOwned::Ipv4PacketInfo(i) => {
                    Some(Ipv4Addr::from(u32::from_be(i.ipi_spec_dst.s_addr)))
                }
                _ => None,
            });
            Ok((msg.bytes, from, local))
        })
        .await
}

/// Sends `d` to `to` from the node's address `local`.
async fn send_from(
    socket: &UdpSocket,
    d: &[u8],
    to: std::net::SocketAddrV4,
    local: Ipv4Addr,
) -> io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, SockaddrIn};
    use std::os::fd::AsRawFd;
    let info = nix::libc::in_pktinfo {
        ipi_ifindex: 0,
        ipi_spec_dst: nix::libc::in_addr {
            s_addr: u32::from(local).to_be(),
        },
        ipi_addr: nix::libc::in_addr { s_addr: 0 },
    };
    let to = SockaddrIn::from(to);
    socket
        .async_io(tokio::io::Interest::WRITABLE, || {
            sendmsg(
                socket.as_raw_fd(),
                &[io::IoSlice::new(d)],
                &[ControlMessage::Ipv4PacketInfo(&info)],
                MsgFlags::empty(),
                Some(&to),
            )
            .map(drop)
            .map_err(io::Error::from)
        })
        .await
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::balancer::Here;
    use crate::proxy::tests::on_n1;
    use crate::proxy::{DialFuture, Dialer};
    use crate::services::{Endpoint, ServicePort, ServiceTable, SharedServices};

    const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);

    /// A UDP server at `ip` on a port free there (`port`, or any) that
    /// answers each datagram with `<name>:` and the datagram; its port.
    async fn named_echo(ip: Ipv4Addr, port: u16, name: &'static str) -> u16 {
        let s = UdpSocket::bind((ip, port)).await.expect("bind");
        let port = s.local_addr().expect("addr").port();
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                let mut answer = format!("{name}:").into_bytes();
                answer.extend_from_slice(&buf[..n]);
                let _ = s.send_to(&answer, from).await;
            }
        });
        port
    }

    fn service(port: u16, endpoints: &[(&str, Ipv4Addr)], allow_from: &[&str]) -> Service {
        Service {
            namespace: "ns".into(),
            name: "dns".into(),
            vip: VIP,
            ports: vec![ServicePort { port, udp: true }],
            policy: LoadBalancing::RoundRobin,
            allow_from: allow_from.iter().map(|s| (*s).to_owned()).collect(),
            weights: BTreeMap::new(),
            endpoints: endpoints
                .iter()
                .map(|(id, ip)| Endpoint {
                    replica_id: (*id).into(),
                    node_id: "n1".into(),
                    address: Some(*ip),
                    zone: String::new(),
                    region: String::new(),
                })
                .collect(),
        }
    }

    /// Two endpoints (a at 127.0.0.2, b at 127.0.0.3, the same port) behind
    /// a proxy socket on 127.0.0.1; callers on 127.0.0.1 are of the
    /// service's namespace, on 127.0.0.4 of another. The socket's address,
    /// the table, the proxy and the port.
    async fn udp_service(
        limits: ProxyLimits,
    ) -> (SocketAddr, SharedServices, Arc<ServiceProxy>, u16) {
        let a = Ipv4Addr::new(127, 0, 0, 2);
        let port = named_echo(a, 0, "a").await;
        named_echo(Ipv4Addr::new(127, 0, 0, 3), port, "b").await;
        let services = SharedServices::default();
        services.set(ServiceTable::new(
            "cluster.local",
            vec![service(
                port,
                &[("a", a), ("b", Ipv4Addr::new(127, 0, 0, 3))],
                &[],
            )],
        ));
        let proxy = on_n1(
            services.clone(),
            Arc::new(move |ip| {
                let outsider = ip == std::net::IpAddr::V4(Ipv4Addr::new(127, 0, 0, 4));
                Some(Caller::Workload {
                    namespace: if outsider { "other" } else { "ns" }.into(),
                    workload: "client".into(),
                })
            }),
            limits,
        );
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let at = socket.local_addr().expect("addr");
        tokio::spawn(proxy.clone().serve_udp(socket, VIP, port));
        (at, services, proxy, port)
    }

    /// A caller's socket at `ip` connected to the proxy.
    async fn caller_at(ip: &str, at: SocketAddr) -> UdpSocket {
        let s = UdpSocket::bind((ip, 0)).await.expect("bind");
        s.connect(at).await.expect("connect");
        s
    }

    /// A caller's socket (of the service's namespace) connected to the
    /// proxy.
    async fn caller(at: SocketAddr) -> UdpSocket {
        let s = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        s.connect(at).await.expect("connect");
        s
    }

    /// Waits until `holds`, failing with `what` after `limit`.
    async fn within(limit: Duration, what: &str, holds: impl Fn() -> bool) {
        let since = std::time::Instant::now();
        while !holds() {
            assert!(since.elapsed() < limit, "{what} after {limit:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends `msg`; the answer within a second, if any.
    async fn ask(s: &UdpSocket, msg: &str) -> Option<String> {
        s.send(msg.as_bytes()).await.expect("send");
        let mut buf = vec![0u8; MAX_DATAGRAM];
        match tokio::time::timeout(Duration::from_secs(1), s.recv(&mut buf)).await {
            Ok(Ok(n)) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            _ => None,
        }
    }

    #[tokio::test]
    async fn each_flow_keeps_its_endpoint_and_flows_are_spread() {
        let (at, _, proxy, _) = udp_service(ProxyLimits::default()).await;
        let (one, two) = (caller(at).await, caller(at).await);
        let first = ask(&one, "1").await.expect("an answer");
        let second = ask(&two, "1").await.expect("an answer");
        let (e1, e2) = (&first[..2], &second[..2]);
        assert_ne!(
            e1, e2,
            "round robin: the two flows went to different endpoints"
        );
        for i in 0..20 {
            let msg = format!("msg {i}");
            assert_eq!(ask(&one, &msg).await, Some(format!("{e1}{msg}")));
            assert_eq!(ask(&two, &msg).await, Some(format!("{e2}{msg}")));
        }
        // The largest datagram goes through whole.
        let big = "x".repeat(65_000);
        assert_eq!(ask(&one, &big).await.map(|a| a.len()), Some(65_002));
        assert_eq!(proxy.stats().vips.open, 2, "two flows in the VIP pool");
    }

    #[tokio::test]
    async fn a_flow_moves_within_a_second_once_its_endpoint_leaves() {
        let (at, services, _, port) = udp_service(ProxyLimits::default()).await;
        let s = caller(at).await;
        let first = ask(&s, "hello").await.expect("an answer");
        let (gone, stays) = if first.starts_with("a:") {
            (("a", "127.0.0.2"), ("b", Ipv4Addr::new(127, 0, 0, 3)))
        } else {
            (("b", "127.0.0.3"), ("a", Ipv4Addr::new(127, 0, 0, 2)))
        };
        services.set(ServiceTable::new(
            "cluster.local",
            vec![service(port, &[stays], &[])],
        ));
        let left = std::time::Instant::now();
        loop {
            let answer = ask(&s, "again").await;
            if answer.as_deref() == Some(&format!("{}:again", stays.0)) {
                break;
            }
            assert!(
                left.elapsed() < Duration::from_secs(1),
                "still answered by {} ({answer:?}) a second after it left",
                gone.1
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // And it stays there.
        for _ in 0..5 {
            assert_eq!(ask(&s, "x").await, Some(format!("{}:x", stays.0)));
        }
    }

    #[tokio::test]
    async fn callers_the_service_does_not_admit_get_nothing() {
        let (at, _, proxy, _) = udp_service(ProxyLimits::default()).await;
        let outsider = caller_at("127.0.0.4", at).await;
        assert_eq!(ask(&outsider, "hello").await, None);
        assert_eq!(proxy.stats().vips.open, 0, "no flow for the outsider");
        // The same proxy answers a caller it admits.
        assert!(ask(&caller(at).await, "hello").await.is_some());
        assert_eq!(ask(&outsider, "again").await, None);
    }

    #[tokio::test]
    async fn queued_bytes_are_given_back_however_flows_end() {
        let (at, services, proxy, port) = udp_service(ProxyLimits::default()).await;
        let callers: Vec<UdpSocket> = callers_at(at, 8).await;
        let big = vec![7u8; 1000];
        for _ in 0..200 {
            for c in &callers {
                let _ = c.send(&big).await;
            }
        }
        // Every endpoint leaves while datagrams may still be queued: the
        // flows end and what they held is given back.
        services.set(ServiceTable::new(
            "cluster.local",
            vec![service(port, &[], &[])],
        ));
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        loop {
            let queued = proxy.udp_queued.0.load(Ordering::Relaxed);
            if queued == 0 && proxy.stats().vips.open == 0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{queued} bytes still counted as queued, {} flows open",
                proxy.stats().vips.open
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Dials that never answer (an endpoint whose node is slow to reply).
    struct Stall;

    impl Dialer for Stall {
        fn dial<'a>(&'a self, _: &'a Endpoint, _: u16, _: &'a Caller) -> DialFuture<'a> {
            Box::pin(std::future::pending())
        }

        fn dial_datagrams<'a>(
            &'a self,
            _: &'a Endpoint,
            _: u16,
            _: &'a Caller,
        ) -> DatagramDialFuture<'a> {
            Box::pin(std::future::pending())
        }
    }

    #[tokio::test]
    async fn a_flow_queues_at_most_its_share_and_counts_what_it_drops() {
        let services = SharedServices::default();
        services.set(ServiceTable::new(
            "cluster.local",
            vec![service(53, &[("slow", Ipv4Addr::new(127, 0, 0, 2))], &[])],
        ));
        let proxy = ServiceProxy::new(
            services,
            Here::default(),
            Arc::new(Stall),
            Arc::new(|_| {
                Some(Caller::Workload {
                    namespace: "ns".into(),
                    workload: "client".into(),
                })
            }),
        );
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let at = socket.local_addr().expect("addr");
        tokio::spawn(proxy.clone().serve_udp(socket, VIP, 53));
        let s = caller(at).await;
        let datagram = vec![1u8; 1000];
        // Each datagram is sent once the proxy has taken the one before
        // (queued or dropped it), so the socket's receive buffer never
        // overflows: only the proxy drops.
        let cost = 1000 + DATAGRAM_OVERHEAD;
        let taken = || {
            proxy.udp_queued.0.load(Ordering::Relaxed) / cost
                + usize::try_from(proxy.stats().dropped_datagrams).unwrap_or(usize::MAX)
        };
        for i in 1..=400 {
            s.send(&datagram).await.expect("send");
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while taken() < i {
                assert!(
                    std::time::Instant::now() < deadline,
                    "datagram {i} not taken"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        // The flow waits for its endpoint with at most 256 KiB queued (each
        // datagram counted with 64 bytes more): 246 of 1,064 bytes.
        let fits = FLOW_QUEUE_BYTES / cost;
        assert_eq!(proxy.stats().dropped_datagrams, (400 - fits) as u64);
        assert_eq!(proxy.udp_queued.0.load(Ordering::Relaxed), fits * cost);
    }

    /// `n` callers' sockets connected to the proxy.
    async fn callers_at(at: SocketAddr, n: usize) -> Vec<UdpSocket> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(caller(at).await);
        }
        out
    }

    #[tokio::test]
    async fn a_flow_ends_with_its_port() {
        let (at, _, proxy, port) = udp_service(ProxyLimits::default()).await;
        let s = caller(at).await;
        assert!(ask(&s, "1").await.is_some());
        assert_eq!(proxy.stats().vips.open, 1);
        // Its port no longer served: the flow ends with it.
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let at = socket.local_addr().expect("addr");
        let serving = tokio::spawn(proxy.clone().serve_udp(socket, VIP, port));
        let s = caller(at).await;
        assert!(ask(&s, "2").await.is_some());
        assert_eq!(proxy.stats().vips.open, 2);
        serving.abort();
        within(Duration::from_secs(2), "the flow outlived its port", || {
            proxy.stats().vips.open == 1
        })
        .await;
    }

    #[tokio::test]
    async fn a_source_holds_at_most_its_share_of_flows_and_quiet_ones_end() {
        let (at, _, proxy, _) = udp_service(ProxyLimits {
            per_source: 2,
            udp_idle_timeout: Duration::from_millis(300),
            ..ProxyLimits::default()
        })
        .await;
        let (one, two, three) = (caller(at).await, caller(at).await, caller(at).await);
        assert!(ask(&one, "1").await.is_some());
        assert!(ask(&two, "2").await.is_some());
        assert_eq!(
            ask(&three, "3").await,
            None,
            "a third flow from one address"
        );
        assert_eq!(proxy.stats().vips.closed_for(Closed::SourceLimit), 1);
        // Once the two are quiet for the idle timeout (checked once per
        // timeout: gone within two), their places are free again.
        within(Duration::from_secs(3), "quiet flows still open", || {
            proxy.stats().vips.open == 0
        })
        .await;
        assert!(ask(&three, "3").await.is_some());
    }

    /// The service of [`udp_service`] at an ingress socket of a proxy with
    /// `limits` (on every local address, on a port of its own); the port.
    async fn udp_ingress(limits: ProxyLimits) -> (u16, Arc<ServiceProxy>) {
        let (_, _, proxy, port) = udp_service(limits).await;
        let socket = Arc::new(ingress_socket(0).expect("an ingress socket"));
        let at = socket.local_addr().expect("addr").port();
        tokio::spawn(
            proxy
                .clone()
                .serve_ingress_udp(socket, "ns".into(), "dns".into(), port),
        );
        (at, proxy)
    }

    #[tokio::test]
    async fn ingress_flows_reach_every_endpoint_answered_from_the_address_called() {
        let (port, proxy) = udp_ingress(ProxyLimits::default()).await;
        // The outside world at 127.0.0.9 calls the node at 127.0.0.7, which
        // is not the address the kernel would pick to answer from (127.0.0.1
        // for the loopback): a connected socket takes answers only from the
        // address it called.
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..4 {
            let s = caller_at("127.0.0.9", SocketAddr::from(([127, 0, 0, 7], port))).await;
            let answer = ask(&s, &format!("q{i}"))
                .await
                .expect("an answer from the address called");
            assert!(answer.ends_with(&format!(":q{i}")), "{answer}");
            seen.insert(answer[..1].to_owned());
            // The flow keeps its endpoint.
            assert_eq!(
                ask(&s, "again").await,
                Some(format!("{}:again", &answer[..1]))
            );
        }
        assert_eq!(seen.len(), 2, "flows spread over both endpoints: {seen:?}");
        let stats = proxy.stats();
        assert_eq!(
            stats.ingress_udp.open, 4,
            "four flows in the ingress UDP pool"
        );
        assert_eq!(stats.ingress.open, 0, "none in TCP ingress's pool");
        assert_eq!(stats.vips.open, 0, "none in the VIP pool");
        // A service without the port (or another name) answers nothing.
        let other = Arc::new(ingress_socket(0).expect("an ingress socket"));
        let other_port = other.local_addr().expect("addr").port();
        tokio::spawn(
            proxy
                .clone()
                .serve_ingress_udp(other, "ns".into(), "dns".into(), 9),
        );
        let s = caller_at("127.0.0.9", SocketAddr::from(([127, 0, 0, 7], other_port))).await;
        assert_eq!(ask(&s, "q").await, None, "no UDP port 9");
    }

    #[tokio::test]
    async fn an_ingress_source_holds_its_share_of_flows_and_starts_them_at_its_rate() {
        let (port, proxy) = udp_ingress(ProxyLimits {
            udp_ingress_per_source: 2,
            ingress_rate: cloudless_types::rate_limit::Rate { per_s: 1, burst: 3 },
            ..ProxyLimits::default()
        })
        .await;
        let at = SocketAddr::from(([127, 0, 0, 7], port));
        let mut callers = Vec::new();
        for _ in 0..4 {
            callers.push(caller_at("127.0.0.9", at).await);
        }
        assert!(ask(&callers[0], "1").await.is_some());
        assert!(ask(&callers[1], "2").await.is_some());
        // The third flow takes the source's last new-flow token of its
        // burst of three and finds its two places taken; the fourth finds
        // no token left (one comes back a second later).
        callers[2].send(b"3").await.expect("send");
        callers[3].send(b"4").await.expect("send");
        let stats = || {
            let s = proxy.stats().ingress_udp;
            (
                s.closed_for(Closed::SourceLimit),
                s.closed_for(Closed::SourceRate),
            )
        };
        within(
            Duration::from_secs(2),
            "one refused for each reason",
            || stats() == (1, 1),
        )
        .await;
        // Another source has places and tokens of its own.
        let elsewhere = caller_at("127.0.0.10", at).await;
        assert!(ask(&elsewhere, "x").await.is_some(), "another source");
        let mut buf = [0u8; 64];
        for refused in &callers[2..] {
            assert!(
                tokio::time::timeout(Duration::from_millis(200), refused.recv(&mut buf))
                    .await
                    .is_err(),
                "a refused flow was answered"
            );
        }
    }

    #[tokio::test]
    async fn a_full_ingress_pool_gives_the_place_of_a_flow_not_yet_assured_to_a_new_one() {
        let (port, proxy) = udp_ingress(ProxyLimits {
            max_connections: 8,
            ..ProxyLimits::default()
        })
        .await;
        let at = SocketAddr::from(([127, 0, 0, 7], port));
        // An assured flow: asked, answered, asked again.
        let steady = caller_at("127.0.0.20", at).await;
        assert!(ask(&steady, "1").await.is_some());
        assert!(ask(&steady, "2").await.is_some());
        // A flood from 150 addresses, a datagram from each and never
        // another (as from forged sources): the first 7 take the free
        // places; of the other 143, each takes the place of the oldest of
        // the flood's flows while the pool gives places (100 at once, 100 a
        // second: `give_way_rate` for a pool of 8), the rest are refused.
        let mut flood = Vec::new();
        for i in 0..150 {
            let s = caller_at(&format!("127.0.1.{}", i + 1), at).await;
            s.send(b"x").await.expect("send");
            flood.push(s);
        }
        let counts = || {
            let s = proxy.stats().ingress_udp;
            (s.closed_for(Closed::GaveWay), s.closed_for(Closed::Full))
        };
        within(Duration::from_secs(2), "143 taken or refused", || {
            let (gave, full) = counts();
            gave + full == 143
        })
        .await;
        let (gave, _) = counts();
        assert!((100..=130).contains(&gave), "{gave} places given");
        assert_eq!(proxy.stats().ingress_udp.open, 8);
        // The flows that gave their places ended: 8 carried, no more.
        let carried = || proxy.open_connections().values().sum::<usize>();
        within(
            Duration::from_secs(2),
            "the flows that gave way ended",
            || carried() == 8,
        )
        .await;
        // A new caller still gets in, in place of one of the flood's; the
        // assured flow kept its place and its endpoint.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let new = caller_at("127.0.0.21", at).await;
        assert!(ask(&new, "q").await.is_some(), "the new caller is answered");
        assert_eq!(counts().0, gave + 1);
        let again = ask(&steady, "3").await.expect("the assured flow answers");
        assert!(again.ends_with(":3"), "{again}");
        assert_eq!(proxy.stats().ingress_udp.open, 8);
        // A pool full of assured flows gives no place: a new caller is
        // refused.
        let (port, proxy) = udp_ingress(ProxyLimits {
            max_connections: 2,
            ..ProxyLimits::default()
        })
        .await;
        let at = SocketAddr::from(([127, 0, 0, 7], port));
        let mut assured = Vec::new();
        for ip in ["127.0.0.30", "127.0.0.31"] {
            let s = caller_at(ip, at).await;
            assert!(ask(&s, "1").await.is_some());
            assert!(ask(&s, "2").await.is_some());
            assured.push(s);
        }
        let late = caller_at("127.0.0.32", at).await;
        assert_eq!(ask(&late, "q").await, None, "no place for a third");
        let s = proxy.stats().ingress_udp;
        assert_eq!(
            (s.closed_for(Closed::GaveWay), s.closed_for(Closed::Full)),
            (0, 1)
        );
        for s in &assured {
            assert!(
                ask(s, "3").await.is_some(),
                "an assured flow lost its place"
            );
        }
    }

    #[tokio::test]
    async fn one_shot_flows_end_soon_and_assured_ones_last() {
        let (at, _, proxy, _) = udp_service(ProxyLimits {
            udp_unassured_timeout: Duration::from_millis(200),
            udp_idle_timeout: Duration::from_millis(1500),
            ..ProxyLimits::default()
        })
        .await;
        // A question and its answer (a DNS query from a port of its own).
        let once = caller(at).await;
        assert!(ask(&once, "q").await.is_some());
        // A caller that sent again after an answer: assured.
        let twice = caller(at).await;
        assert!(ask(&twice, "1").await.is_some());
        assert!(ask(&twice, "2").await.is_some());
        assert_eq!(proxy.stats().vips.open, 2);
        // The one-shot flow ends within two short timeouts (400 ms), long
        // before the assured one (1.5 to 3 s).
        let asked = std::time::Instant::now();
        within(
            Duration::from_millis(1200),
            "the one-shot flow outlived its short timeout",
            || proxy.stats().vips.open == 1,
        )
        .await;
        assert!(asked.elapsed() < Duration::from_millis(1500));
        within(
            Duration::from_secs(4),
            "the assured flow outlived two idle timeouts",
            || proxy.stats().vips.open == 0,
        )
        .await;
    }

    /// A UDP server at `ip` that answers each datagram with 60 datagrams,
    /// one every 50 ms (a stream a single question starts); its port.
    async fn chatty(ip: Ipv4Addr) -> u16 {
        let s = Arc::new(UdpSocket::bind((ip, 0)).await.expect("bind"));
        let port = s.local_addr().expect("addr").port();
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            while let Ok((_, from)) = s.recv_from(&mut buf).await {
                let s = s.clone();
                tokio::spawn(async move {
                    for _ in 0..60 {
                        let _ = s.send_to(b"more", from).await;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                });
            }
        });
        port
    }

    #[tokio::test]
    async fn a_service_answering_alone_keeps_no_ingress_flow_alive() {
        let ip = Ipv4Addr::new(127, 0, 0, 2);
        let port = chatty(ip).await;
        let services = SharedServices::default();
        services.set(ServiceTable::new(
            "cluster.local",
            vec![service(port, &[("stream", ip)], &[])],
        ));
        let proxy = on_n1(
            services,
            Arc::new(|_: std::net::IpAddr| None),
            ProxyLimits {
                udp_unassured_timeout: Duration::from_millis(200),
                ..ProxyLimits::default()
            },
        );
        let socket = Arc::new(ingress_socket(0).expect("an ingress socket"));
        let at = socket.local_addr().expect("addr").port();
        tokio::spawn(
            proxy
                .clone()
                .serve_ingress_udp(socket, "ns".into(), "dns".into(), port),
        );
        // One datagram (its source could be forged): the stream it starts
        // reaches the caller only until the flow ends, 200 to 400 ms on,
        // though the service goes on for three seconds.
        let s = caller_at("127.0.0.9", SocketAddr::from(([127, 0, 0, 7], at))).await;
        s.send(b"start").await.expect("send");
        let start = std::time::Instant::now();
        let mut buf = [0u8; 64];
        let mut last = None;
        while let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_millis(500), s.recv(&mut buf)).await
        {
            last = Some(start.elapsed());
        }
        let last = last.expect("the stream reached the caller");
        assert!(
            last < Duration::from_millis(1200),
            "answers went on for {last:?} after a single datagram"
        );
        assert_eq!(proxy.stats().ingress_udp.open, 0);
    }

    /// Dials every endpoint's UDP port at its address, as if through the
    /// overlay (the endpoints are "on other nodes").
    struct Loopback;

    impl Dialer for Loopback {
        fn dial<'a>(&'a self, _: &'a Endpoint, _: u16, _: &'a Caller) -> DialFuture<'a> {
            Box::pin(async { Err("TCP is not dialed here".to_owned()) })
        }

        fn dial_datagrams<'a>(
            &'a self,
            e: &'a Endpoint,
            port: u16,
            _: &'a Caller,
        ) -> DatagramDialFuture<'a> {
            Box::pin(async move {
                let ip = e.address.ok_or("no address")?;
                let s = UdpSocket::bind("127.0.0.1:0")
                    .await
                    .map_err(|e| e.to_string())?;
                s.connect((ip, port)).await.map_err(|e| e.to_string())?;
                Ok(Datagrams::socket(s))
            })
        }
    }

    #[tokio::test]
    async fn flows_to_another_node_are_capped_per_node_and_go_to_the_next_endpoint() {
        let a = Ipv4Addr::new(127, 0, 0, 2);
        let port = named_echo(a, 0, "a").await;
        named_echo(Ipv4Addr::new(127, 0, 0, 3), port, "b").await;
        let mut svc = service(port, &[("a", a), ("b", Ipv4Addr::new(127, 0, 0, 3))], &[]);
        svc.endpoints[0].node_id = "n2".into();
        svc.endpoints[1].node_id = "n3".into();
        let services = SharedServices::default();
        services.set(ServiceTable::new("cluster.local", vec![svc]));
        let proxy = ServiceProxy::with_limits(
            services,
            Here {
                node_id: "n1".into(),
                ..Here::default()
            },
            Arc::new(Loopback),
            Arc::new(|_| {
                Some(Caller::Workload {
                    namespace: "ns".into(),
                    workload: "client".into(),
                })
            }),
            ProxyLimits {
                udp_flows_per_node: 1,
                ..ProxyLimits::default()
            },
        );
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let at = socket.local_addr().expect("addr");
        tokio::spawn(proxy.clone().serve_udp(socket, VIP, port));
        // Each node takes one flow; whichever node a flow's turn picks, a
        // full one sends it to the other; a third finds both full.
        let (one, two, three) = (caller(at).await, caller(at).await, caller(at).await);
        let first = ask(&one, "1").await.expect("an answer");
        let second = ask(&two, "2").await.expect("an answer");
        assert_ne!(first[..2], second[..2], "{first} {second}");
        assert_eq!(
            ask(&three, "3").await,
            None,
            "a third flow, both nodes full"
        );
        assert_eq!(proxy.stats().vips.open, 2);
    }
}
