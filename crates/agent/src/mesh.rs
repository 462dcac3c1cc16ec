//! Service traffic between workloads: the agent's overlay endpoint, the
//! upstream listeners inside containers, and the resolver that connects
//! streams arriving from other nodes to local replicas.
//!
//! A workload that lists `upstreams` finds each at `127.0.0.1:localPort` in
//! its containers: the agent binds that address inside the container's
//! network namespace and carries every accepted connection to a Ready replica
//! of the target workload (round robin): over the overlay to the node that
//! runs it, or straight into its namespace when it runs here. The receiving
//! agent connects the stream to `127.0.0.1:<port>` inside the target
//! replica's namespace.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use cloudless_network::proxy::Caller;
use cloudless_network::services::{ServicePort, SharedServices};
use cloudless_overlay::{ConnectFuture, Connected, Overlay, Resolver};
use cloudless_pki::Identity;
use cloudless_proto::v1 as pb;
use cloudless_types::Upstream;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;

/// How the overlay names a port of a replica: `replica/<id>:<port>`.
pub fn target(replica_id: &str, port: u16) -> String {
    format!("replica/{replica_id}:{port}")
}

fn parse_target(target: &str) -> Option<(&str, u16)> {
    let rest = target.strip_prefix("replica/")?;
    let (id, port) = rest.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    (!id.is_empty() && port != 0).then_some((id, port))
}

/// How the overlay names a port of a replica reached through its service,
/// with the caller: `service/<id>:<port>@<namespace>/<workload>` or
/// `service/<id>:<port>@ingress`; a UDP port is `<port>/udp`.
pub fn service_target(replica_id: &str, port: u16, udp: bool, caller: &Caller) -> String {
    let proto = if udp { "/udp" } else { "" };
    format!("service/{replica_id}:{port}{proto}@{caller}")
}

/// A service target: the replica, its port, whether UDP, the caller.
type ServiceTarget<'a> = (&'a str, u16, bool, Caller);

fn parse_service_target(target: &str) -> Option<ServiceTarget<'_>> {
    let rest = target.strip_prefix("service/")?;
    let (dest, caller) = rest.split_once('@')?;
    let (id, port) = dest.rsplit_once(':')?;
    let (port, udp) = match port.strip_suffix("/udp") {
        Some(p) => (p, true),
        None => (port, false),
    };
    let port: u16 = port.parse().ok()?;
    let caller = match caller.split_once('/') {
        None if caller == "ingress" => Caller::Ingress,
        Some((namespace, workload)) if !namespace.is_empty() && !workload.is_empty() => {
            Caller::Workload {
                namespace: namespace.to_owned(),
                workload: workload.to_owned(),
            }
        }
        _ => return None,
    };
    (!id.is_empty() && port != 0).then_some((id, port, udp, caller))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Endpoint {
    replica_id: String,
    node_id: String,
}

/// Replica network namespaces on this node, by replica id (the pid of the
/// container's init process), and who may reach them.
#[derive(Debug, Default)]
struct Local {
    pids: Mutex<HashMap<String, u32>>,
    /// Replica id -> (namespace, workload), from the assignments.
    workloads: Mutex<HashMap<String, (String, String)>>,
    /// (namespace, workload) -> nodes running a workload that lists it as
    /// an upstream.
    callers: Mutex<HashMap<(String, String), HashSet<String>>>,
    /// Local replicas' addresses on the node's bridge.
    addresses: Mutex<HashMap<String, Ipv4Addr>>,
    /// Who may reach services here.
    access: Mutex<ServiceAccess>,
    /// The cluster's services.
    services: SharedServices,
}

/// Who may reach the replicas of a service on this node, from the
/// assignments.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ServiceAccess {
    /// (namespace, workload) -> the nodes running its replicas.
    pub runs: HashMap<(String, String), HashSet<String>>,
    /// The nodes that carry ingress.
    pub ingress_nodes: HashSet<String>,
    /// (namespace, workload, port) routed from ingress.
    pub ingress_routes: HashSet<(String, String, ServicePort)>,
}

impl Local {
    /// Takes the local replicas' workloads and their callers.
    fn update(&self, assigned: &pb::AssignmentSet) {
        *lock(&self.workloads) = assigned
            .assignments
            .iter()
            .map(|a| {
                (
                    a.replica_id.clone(),
                    (a.namespace.clone(), a.workload.clone()),
                )
            })
            .collect();
        *lock(&self.callers) = assigned
            .inbound
            .iter()
            .map(|i| {
                (
                    (i.namespace.clone(), i.workload.clone()),
                    i.node_ids.iter().cloned().collect(),
                )
            })
            .collect();
    }

    /// Whether node `origin` runs a workload that lists the workload of
    /// `replica_id` as an upstream.
    fn allowed(&self, origin: &str, replica_id: &str) -> Result<(), String> {
        let key = lock(&self.workloads)
            .get(replica_id)
            .cloned()
            .ok_or_else(|| format!("replica {replica_id} is not assigned to this node"))?;
        if lock(&self.callers)
            .get(&key)
            .is_some_and(|nodes| nodes.contains(origin))
        {
            Ok(())
        } else {
            Err(format!(
                "node {origin} runs no workload with {}/{} as an upstream",
                key.0, key.1
            ))
        }
    }

    /// Whether node `origin` may reach port `port` of local replica
    /// `replica_id` through its service, for `caller`: the service admits
    /// the caller's namespace and `origin` runs a replica of the caller
    /// (or carries ingress routed to that port).
    fn service_allowed(
        &self,
        origin: &str,
        replica_id: &str,
        port: u16,
        udp: bool,
        caller: &Caller,
    ) -> Result<(), String> {
        let (ns, workload) = lock(&self.workloads)
            .get(replica_id)
            .cloned()
            .ok_or_else(|| format!("replica {replica_id} is not assigned to this node"))?;
        let table = self.services.get();
        let svc = table
            .services()
            .find(|s| s.namespace == ns && s.name == workload)
            .cloned()
            .ok_or_else(|| format!("{ns}/{workload} is no service"))?;
        if !svc.has_port(port, udp) {
            let proto = if udp { "UDP" } else { "TCP" };
            return Err(format!("{ns}/{workload} has no {proto} port {port}"));
        }
        let access = lock(&self.access);
        match caller {
            Caller::Ingress => {
                if access.ingress_nodes.contains(origin)
                    && access.ingress_routes.contains(&(
                        ns.clone(),
                        workload.clone(),
                        ServicePort { port, udp },
                    ))
                {
                    Ok(())
                } else {
                    let proto = if udp { "/udp" } else { "" };
                    Err(format!(
                        "node {origin} carries no ingress to {ns}/{workload}:{port}{proto}"
                    ))
                }
            }
            Caller::Workload {
                namespace,
                workload: w,
            } => {
                if !svc.admits(namespace) {
                    return Err(format!(
                        "{caller} may not connect to {ns}/{workload} (its allowFrom)"
                    ));
                }
                if !access
                    .runs
                    .get(&(namespace.clone(), w.clone()))
                    .is_some_and(|nodes| nodes.contains(origin))
                {
                    return Err(format!("node {origin} runs no replica of {caller}"));
                }
                Ok(())
            }
        }
    }

    /// A UDP socket connected to `port` of local replica `replica_id` at its
    /// address on the bridge.
    async fn connect_udp(&self, replica_id: &str, port: u16) -> Result<UdpSocket, String> {
        let a = lock(&self.addresses)
            .get(replica_id)
            .copied()
            .ok_or_else(|| format!("replica {replica_id} has no address on this node"))?;
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
            .await
            .map_err(|e| format!("a UDP socket: {e}"))?;
        s.connect((a, port))
            .await
            .map_err(|e| format!("replica {replica_id} at {a}:{port}/udp: {e}"))?;
        Ok(s)
    }

    /// A connection to `port` of local replica `replica_id`: at its address
    /// on the bridge (`via_bridge`, services), else on 127.0.0.1 inside its
    /// namespace (upstreams, as before replicas had addresses).
    async fn connect(
        &self,
        replica_id: &str,
        port: u16,
        via_bridge: bool,
    ) -> Result<TcpStream, String> {
        let address = via_bridge
            .then(|| lock(&self.addresses).get(replica_id).copied())
            .flatten();
        if let Some(a) = address {
            let s = TcpStream::connect((a, port))
                .await
                .map_err(|e| format!("replica {replica_id} at {a}:{port}: {e}"))?;
            let _ = s.set_nodelay(true);
            return Ok(s);
        }
        let pid = lock(&self.pids)
            .get(replica_id)
            .copied()
            .ok_or_else(|| format!("replica {replica_id} is not running on this node"))?;
        let std = cloudless_runtime::probe::in_netns(pid, move || {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(3))
                .map_err(|e| format!("port {port}: {e}"))?;
            s.set_nonblocking(true).map_err(|e| e.to_string())?;
            Ok(s)
        })
        .await
        .map_err(|e| format!("replica {replica_id}: {e}"))?;
        TcpStream::from_std(std).map_err(|e| e.to_string())
    }
}

/// Connects streams from other nodes to local replicas.
#[derive(Debug)]
struct ReplicaResolver(Arc<Local>);

impl Resolver for ReplicaResolver {
    fn connect<'a>(&'a self, origin: &'a Identity, target: &'a str) -> ConnectFuture<'a> {
        Box::pin(async move {
            // Streams come only from cluster members (mutual TLS); only nodes
            // running a workload that lists the target's workload as an
            // upstream may reach it.
            let Identity::Node(node) = origin else {
                return Err(format!("{origin} does not carry workload traffic"));
            };
            if let Some((id, port, udp, caller)) = parse_service_target(target) {
                self.0.service_allowed(node, id, port, udp, &caller)?;
                if udp {
                    return self.0.connect_udp(id, port).await.map(Connected::Udp);
                }
                return self.0.connect(id, port, true).await.map(Connected::Tcp);
            }
            let (id, port) =
                parse_target(target).ok_or_else(|| format!("bad target {target:?}"))?;
            self.0.allowed(node, id)?;
            self.0.connect(id, port, false).await.map(Connected::Tcp)
        })
    }

    fn still_allows(&self, origin: &Identity, target: &str) -> bool {
        let Identity::Node(node) = origin else {
            return false;
        };
        if let Some((id, port, udp, caller)) = parse_service_target(target) {
            return self.0.service_allowed(node, id, port, udp, &caller).is_ok();
        }
        match parse_target(target) {
            Some((id, _)) => self.0.allowed(node, id).is_ok(),
            None => false,
        }
    }
}

/// The agent's part in the mesh.
#[derive(Debug)]
pub struct Mesh {
    overlay: Overlay,
    node_id: String,
    local: Arc<Local>,
    upstreams: Mutex<HashMap<(String, String), Vec<Endpoint>>>,
    /// Replica ids of every remote upstream endpoint now: a stream carried
    /// to a replica that leaves them (its node removed, the replica gone)
    /// is cut, not left to whoever still answers on it.
    live_endpoints: LiveEndpoints,
    next: AtomicUsize,
}

/// The replica ids that are remote upstream endpoints now, watched by the
/// streams carried to them.
#[derive(Debug)]
struct LiveEndpoints(tokio::sync::watch::Sender<Arc<HashSet<String>>>);

impl Default for LiveEndpoints {
    fn default() -> Self {
        Self(tokio::sync::watch::Sender::new(Arc::default()))
    }
}

impl LiveEndpoints {
    fn replace(&self, live: HashSet<String>) {
        self.0.send_replace(Arc::new(live));
    }

    /// Resolves once `replica_id` is no longer an endpoint.
    async fn gone(&self, replica_id: &str) {
        let mut live = self.0.subscribe();
        loop {
            if !live.borrow_and_update().contains(replica_id) {
                return;
            }
            if live.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

impl Mesh {
    /// Binds the overlay endpoint.
    pub fn start(
        config: cloudless_overlay::OverlayConfig,
        tls: cloudless_overlay::OverlayTls,
        node_id: &str,
    ) -> Result<Arc<Mesh>, String> {
        let local = Arc::new(Local::default());
        let overlay = Overlay::bind(
            config,
            tls,
            Identity::Node(node_id.to_owned()),
            Arc::new(ReplicaResolver(local.clone())),
        )
        .map_err(|e| e.to_string())?;
        Ok(Arc::new(Mesh {
            overlay,
            node_id: node_id.to_owned(),
            local,
            upstreams: Mutex::default(),
            live_endpoints: LiveEndpoints::default(),
            next: AtomicUsize::new(0),
        }))
    }

    /// The overlay endpoint.
    pub fn overlay(&self) -> &Overlay {
        &self.overlay
    }

    /// Takes the endpoints of upstream workloads, the local replicas'
    /// workloads and who may call them from an assignment set.
    pub fn update(&self, assigned: &pb::AssignmentSet) {
        self.local.update(assigned);
        // Streams from nodes that are no longer callers (a caller removed
        // from the cluster, an upstream dropped) end now, not when they close.
        let cut = self.overlay.recheck_streams();
        if cut > 0 {
            tracing::info!(
                streams = cut,
                "cut overlay streams whose caller is no longer allowed"
            );
        }
        let mut map = HashMap::new();
        for set in &assigned.upstreams {
            let mut endpoints = Vec::new();
            for e in &set.endpoints {
                let addresses: Vec<SocketAddr> = e
                    .overlay_addresses
                    .iter()
                    .filter_map(|a| a.parse().ok())
                    .collect();
                if e.node_id != self.node_id {
                    self.overlay
                        .set_peer(Identity::Node(e.node_id.clone()), addresses);
                }
                endpoints.push(Endpoint {
                    replica_id: e.replica_id.clone(),
                    node_id: e.node_id.clone(),
                });
            }
            map.insert((set.namespace.clone(), set.workload.clone()), endpoints);
        }
        let live: HashSet<String> = map
            .values()
            .flatten()
            .filter(|e| e.node_id != self.node_id)
            .map(|e| e.replica_id.clone())
            .collect();
        *lock(&self.upstreams) = map;
        self.live_endpoints.replace(live);
    }

    /// The cluster's services this node's streams are checked against.
    pub fn services(&self) -> SharedServices {
        self.local.services.clone()
    }

    /// Takes who may reach services here (from the assignments), and cuts
    /// the streams no longer allowed.
    pub fn set_service_access(&self, access: ServiceAccess) {
        *lock(&self.local.access) = access;
        // Also when only a service's allowFrom changed (the table).
        let cut = self.overlay.recheck_streams();
        if cut > 0 {
            tracing::info!(streams = cut, "cut service streams no longer allowed");
        }
    }

    /// Where node `node_id`'s overlay endpoint listens (`ip:port` strings;
    /// ones that do not parse are skipped).
    pub fn set_peer_addresses(&self, node_id: &str, addresses: &[String]) {
        let addresses: Vec<SocketAddr> = addresses.iter().filter_map(|a| a.parse().ok()).collect();
        if !addresses.is_empty() {
            self.overlay
                .set_peer(Identity::Node(node_id.to_owned()), addresses);
        }
    }

    /// Records a local replica's address on the bridge (`None`: it has
    /// none any more).
    pub fn set_address(&self, replica_id: &str, address: Option<Ipv4Addr>) {
        let mut addresses = lock(&self.local.addresses);
        match address {
            Some(a) => addresses.insert(replica_id.to_owned(), a),
            None => addresses.remove(replica_id),
        };
    }

    /// Opens a stream to `port` (UDP: `udp`) of replica `replica_id` on node
    /// `node_id` through its service, for `caller`.
    pub async fn open_service_stream(
        &self,
        node_id: &str,
        replica_id: &str,
        port: u16,
        udp: bool,
        caller: &Caller,
    ) -> Result<cloudless_overlay::OverlayStream, String> {
        let peer = Identity::Node(node_id.to_owned());
        let target = service_target(replica_id, port, udp, caller);
        if udp {
            self.overlay.open_flow(&peer, &target).await
        } else {
            self.overlay.open(&peer, &target).await
        }
        .map_err(|e| e.to_string())
    }

    /// Records where a local replica runs now (`None`: it stopped).
    pub fn set_pid(&self, replica_id: &str, pid: Option<u32>) {
        let mut pids = lock(&self.local.pids);
        match pid {
            Some(p) => pids.insert(replica_id.to_owned(), p),
            None => pids.remove(replica_id),
        };
    }

    /// Binds each upstream's local port inside the namespace of `pid` and
    /// forwards what arrives. Abort the handles when the process goes.
    pub async fn listen_upstreams(
        self: &Arc<Self>,
        replica_id: &str,
        namespace: &str,
        upstreams: &[Upstream],
        pid: u32,
    ) -> Vec<JoinHandle<()>> {
        let mut tasks = Vec::new();
        for u in upstreams {
            let port = u.local_port;
            let bound = cloudless_runtime::probe::in_netns(pid, move || {
                let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port))
                    .map_err(|e| format!("127.0.0.1:{port}: {e}"))?;
                l.set_nonblocking(true).map_err(|e| e.to_string())?;
                Ok(l)
            })
            .await
            .and_then(|l| TcpListener::from_std(l).map_err(|e| e.to_string()));
            let listener = match bound {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(replica = %replica_id, upstream = %u.workload, error = %e, "cannot listen for an upstream");
                    continue;
                }
            };
            let mesh = self.clone();
            let key = (namespace.to_owned(), u.workload.clone());
            let target_port = u.port;
            tasks.push(tokio::spawn(async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    let mesh = mesh.clone();
                    let key = key.clone();
                    tokio::spawn(async move {
                        if let Err(e) = mesh.carry(tcp, &key, target_port).await {
                            tracing::warn!(upstream = %key.1, error = %e, "upstream connection failed");
                        }
                    });
                }
            }));
        }
        tasks
    }

    /// Carries one accepted connection to a Ready replica of `key`, trying
    /// each endpoint once from the next in turn.
    async fn carry(
        &self,
        mut tcp: TcpStream,
        key: &(String, String),
        port: u16,
    ) -> Result<(), String> {
        let _ = tcp.set_nodelay(true);
        let endpoints = lock(&self.upstreams).get(key).cloned().unwrap_or_default();
        if endpoints.is_empty() {
            return Err(format!("{}/{} has no Ready replica", key.0, key.1));
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut errors = Vec::new();
        for i in 0..endpoints.len() {
            let e = &endpoints[(start + i) % endpoints.len()];
            if e.node_id == self.node_id {
                match self.local.connect(&e.replica_id, port, false).await {
                    Ok(mut s) => {
                        let _ = tokio::io::copy_bidirectional(&mut tcp, &mut s).await;
                        return Ok(());
                    }
                    Err(err) => errors.push(err),
                }
            } else {
                let peer = Identity::Node(e.node_id.clone());
                match self.overlay.open(&peer, &target(&e.replica_id, port)).await {
                    Ok(s) => {
                        let gone = async {
                            self.live_endpoints.gone(&e.replica_id).await;
                            tracing::info!(
                                replica = %e.replica_id,
                                node_id = %e.node_id,
                                "cut a stream to a replica that is no longer an endpoint"
                            );
                        };
                        let moved = std::sync::atomic::AtomicU64::new(0);
                        let _ = s.join_tcp_until(&mut tcp, gone, 0, &moved).await;
                        return Ok(());
                    }
                    Err(err) => errors.push(err.to_string()),
                }
            }
        }
        Err(errors.join("; "))
    }
}

/// An overlay stream carrying a replica's connection for the service proxy:
/// the bytes go between the socket and QUIC without a buffer in between.
#[derive(Debug)]
pub struct OverlayCarry(pub cloudless_overlay::OverlayStream);

impl cloudless_network::proxy::Carry for OverlayCarry {
    fn carry<'a>(
        self: Box<Self>,
        tcp: &'a mut TcpStream,
        moved: &'a std::sync::atomic::AtomicU64,
    ) -> cloudless_network::proxy::CarryFuture<'a> {
        Box::pin(async move {
            let _ = self
                .0
                .join_tcp_until(tcp, std::future::pending(), 0, moved)
                .await;
        })
    }
}

/// An overlay stream as a flow of datagrams, for the service proxy.
pub fn overlay_datagrams(
    s: cloudless_overlay::OverlayStream,
) -> cloudless_network::proxy::Datagrams {
    let (tx, rx) = s.into_datagrams();
    cloudless_network::proxy::Datagrams {
        tx: Box::new(DatagramTx(tx)),
        rx: Box::new(DatagramRx(rx)),
    }
}

struct DatagramTx(cloudless_overlay::datagram::DatagramSender);

impl cloudless_network::proxy::DatagramTx for DatagramTx {
    fn send<'a>(
        &'a mut self,
        datagram: bytes::Bytes,
    ) -> cloudless_network::proxy::IoFuture<'a, ()> {
        Box::pin(async move { self.0.send(&datagram).await })
    }
}

struct DatagramRx(cloudless_overlay::datagram::DatagramReceiver);

impl cloudless_network::proxy::DatagramRx for DatagramRx {
    fn recv(&mut self) -> cloudless_network::proxy::IoFuture<'_, Option<bytes::Bytes>> {
        Box::pin(self.0.recv())
    }
}

/// How often the agent asks the coordinators for their relays and redials
/// the relays it lost.
const RELAY_REFRESH: std::time::Duration = std::time::Duration::from_secs(5);

/// Keeps the overlay connected to every coordinator's relay (asked of each
/// coordinator in turn), so that nodes which cannot dial this one directly
/// reach it through them. Runs until `cancel`.
pub async fn keep_relays(
    mesh: Arc<Mesh>,
    addresses: Vec<String>,
    mut identity: tokio::sync::watch::Receiver<crate::NodeIdentity>,
    cancel: tokio_util::sync::CancellationToken,
) {
    let mut coordinators =
        crate::Coordinators::new(addresses.clone(), identity.borrow_and_update().clone());
    let mut known: Vec<Identity> = Vec::new();
    loop {
        if identity.has_changed().unwrap_or(false) {
            coordinators.set_identity(identity.borrow_and_update().clone());
        }
        let mut relays = Vec::new();
        for address in &addresses {
            let Ok(ch) = coordinators.channel(address) else {
                continue;
            };
            let asked = tokio::time::timeout(
                std::time::Duration::from_secs(3),
                pb::agent_service_client::AgentServiceClient::new(ch)
                    .overlay_relay(pb::OverlayRelayRequest {}),
            )
            .await;
            let Ok(Ok(answer)) = asked else { continue };
            let answer = answer.into_inner();
            let Some(id) = Identity::from_uri(&answer.identity) else {
                continue;
            };
            let mut dial = Vec::new();
            for a in &answer.addresses {
                if let Ok(found) = tokio::net::lookup_host(a.as_str()).await {
                    dial.extend(found);
                }
            }
            if !dial.is_empty() {
                mesh.overlay.set_peer(id.clone(), dial);
                relays.push(id);
            }
        }
        // A coordinator that did not answer this round stays a relay while
        // its connection lives.
        for k in &known {
            if !relays.contains(k) && mesh.overlay.connected_peers().contains(k) {
                relays.push(k.clone());
            }
        }
        if relays != known {
            tracing::info!(relays = ?relays.iter().map(Identity::uri).collect::<Vec<_>>(), "overlay relays");
            known = relays.clone();
        }
        mesh.overlay.set_relays(relays);
        for (relay, e) in mesh.overlay.keep_relays_connected().await {
            tracing::debug!(%relay, error = %e, "overlay relay unreachable");
        }
        tokio::select! {
            () = tokio::time::sleep(RELAY_REFRESH) => {}
            () = cancel.cancelled() => return,
        }
    }
}

/// The address other nodes should dial: the listen address when it names
/// one, else this host's address on the route to the first coordinator.
pub fn advertise(listen: SocketAddr, coordinators: &[String]) -> Option<SocketAddr> {
    if !listen.ip().is_unspecified() {
        return Some(listen);
    }
    let first = coordinators.first()?;
    let probe = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    // No packet is sent: connecting a UDP socket only picks the route.
    probe.connect(first.as_str()).ok()?;
    let ip = probe.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(SocketAddr::new(ip, listen.port()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stream_to_a_replica_ends_when_it_stops_being_an_endpoint() {
        let live = LiveEndpoints::default();
        live.replace(["r-on-b".to_owned(), "r-on-c".to_owned()].into());
        let gone = live.gone("r-on-b");
        tokio::pin!(gone);
        // Still an endpoint: the stream goes on, through unrelated changes.
        live.replace(["r-on-b".to_owned()].into());
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), &mut gone)
                .await
                .is_err(),
            "cut while still an endpoint"
        );
        // Its node is removed: the replica leaves every upstream set.
        live.replace(HashSet::new());
        tokio::time::timeout(std::time::Duration::from_secs(1), gone)
            .await
            .expect("the stream was not cut");
    }

    #[test]
    fn targets_round_trip_and_bad_ones_are_refused() {
        assert_eq!(parse_target(&target("r-1", 8080)), Some(("r-1", 8080)));
        let web = Caller::Workload {
            namespace: "prod".into(),
            workload: "web".into(),
        };
        for udp in [false, true] {
            assert_eq!(
                parse_service_target(&service_target("r-1", 53, udp, &web)),
                Some(("r-1", 53, udp, web.clone()))
            );
        }
        assert_eq!(
            service_target("r-1", 53, true, &Caller::Ingress),
            "service/r-1:53/udp@ingress"
        );
        for bad in [
            "service/r-1:53/tcp@ingress",
            "service/r-1:/udp@ingress",
            "service/r-1:0/udp@ingress",
            "service/r-1:53/udp@",
        ] {
            assert_eq!(parse_service_target(bad), None, "{bad}");
        }
        for bad in [
            "replica/:80",
            "replica/r:0",
            "replica/r:x",
            "replica/r",
            "node/r:80",
            "",
        ] {
            assert_eq!(parse_target(bad), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn only_nodes_running_a_caller_of_the_workload_may_reach_its_replicas() {
        let local = Arc::new(Local::default());
        let resolver = ReplicaResolver(local.clone());
        let set = pb::AssignmentSet {
            assignments: vec![pb::Assignment {
                replica_id: "r1".into(),
                workload: "api".into(),
                namespace: "prod".into(),
                ..Default::default()
            }],
            inbound: vec![pb::InboundSet {
                namespace: "prod".into(),
                workload: "api".into(),
                node_ids: vec!["n-web".into()],
            }],
            ..Default::default()
        };
        local.update(&set);
        async fn refusal(r: &ReplicaResolver, origin: Identity, target: &str) -> String {
            r.connect(&origin, target).await.err().unwrap_or_default()
        }
        let err = |origin, target| refusal(&resolver, origin, target);
        // The caller passes the check (and fails only for want of a process).
        let e = err(Identity::Node("n-web".into()), "replica/r1:8080").await;
        assert!(e.contains("not running on this node"), "{e}");
        let e = err(Identity::Node("n-other".into()), "replica/r1:8080").await;
        assert_eq!(
            e,
            "node n-other runs no workload with prod/api as an upstream"
        );
        let e = err(Identity::Node("n-web".into()), "replica/r9:8080").await;
        assert!(e.contains("not assigned to this node"), "{e}");
        let e = err(Identity::Admin("ops".into()), "replica/r1:8080").await;
        assert!(e.contains("does not carry workload traffic"), "{e}");
        let e = err(Identity::Node("n-web".into()), "replica/r1").await;
        assert!(e.contains("bad target"), "{e}");

        // A caller dropped from the inbound set (removed from the cluster)
        // loses the streams it holds.
        let web = Identity::Node("n-web".into());
        assert!(resolver.still_allows(&web, "replica/r1:8080"));
        let mut without = set.clone();
        without.inbound[0].node_ids.clear();
        local.update(&without);
        assert!(!resolver.still_allows(&web, "replica/r1:8080"));
    }

    #[test]
    fn a_service_stream_is_admitted_per_calling_workload_not_per_calling_node() {
        use cloudless_network::services::{
            Endpoint, LoadBalancing, Service, ServicePort, ServiceTable,
        };
        let local = Local::default();
        local.update(&pb::AssignmentSet {
            assignments: vec![pb::Assignment {
                replica_id: "r1".into(),
                workload: "api".into(),
                namespace: "prod".into(),
                ..Default::default()
            }],
            ..Default::default()
        });
        local.services.set(ServiceTable::new(
            "cloudless.local",
            vec![Service {
                namespace: "prod".into(),
                name: "api".into(),
                vip: Ipv4Addr::new(10, 96, 0, 1),
                ports: [(8080, false), (9000, false), (5353, true), (8080, true)]
                    .into_iter()
                    .map(|(port, udp)| ServicePort { port, udp })
                    .collect(),
                policy: LoadBalancing::RoundRobin,
                allow_from: vec!["staging".into()],
                weights: std::collections::BTreeMap::new(),
                endpoints: vec![Endpoint {
                    replica_id: "r1".into(),
                    node_id: "n-here".into(),
                    address: Some(Ipv4Addr::new(10, 244, 0, 2)),
                    zone: String::new(),
                    region: String::new(),
                }],
            }],
        ));
        let nodes =
            |ids: &[&str]| -> HashSet<String> { ids.iter().map(|s| (*s).to_owned()).collect() };
        *lock(&local.access) = ServiceAccess {
            runs: HashMap::from([
                (("prod".into(), "web".into()), nodes(&["n-web"])),
                (("staging".into(), "tool".into()), nodes(&["n-stage"])),
                (("other".into(), "evil".into()), nodes(&["n-evil"])),
            ]),
            ingress_nodes: nodes(&["n-gw"]),
            ingress_routes: HashSet::from([
                (
                    "prod".into(),
                    "api".into(),
                    ServicePort {
                        port: 8080,
                        udp: false,
                    },
                ),
                (
                    "prod".into(),
                    "api".into(),
                    ServicePort {
                        port: 5353,
                        udp: true,
                    },
                ),
            ]),
        };
        let as_ = |namespace: &str, workload: &str| Caller::Workload {
            namespace: namespace.into(),
            workload: workload.into(),
        };
        let check_udp = |origin: &str, port, udp, caller: &Caller| {
            local.service_allowed(origin, "r1", port, udp, caller)
        };
        let check = |origin: &str, port, caller: &Caller| check_udp(origin, port, false, caller);
        // Its own namespace, from a node running the caller.
        assert_eq!(check("n-web", 8080, &as_("prod", "web")), Ok(()));
        // A node may not speak for a workload it does not run, even one the
        // service admits.
        assert_eq!(
            check("n-evil", 8080, &as_("prod", "web")),
            Err("node n-evil runs no replica of prod/web".into())
        );
        assert_eq!(
            check("n-web", 8080, &as_("staging", "tool")),
            Err("node n-web runs no replica of staging/tool".into())
        );
        // Another namespace only through allowFrom.
        assert_eq!(check("n-stage", 8080, &as_("staging", "tool")), Ok(()));
        let refused = check("n-evil", 8080, &as_("other", "evil")).expect_err("other");
        assert!(refused.contains("allowFrom"), "{refused}");
        // Only its declared ports; only replicas assigned here.
        let refused = check("n-web", 9090, &as_("prod", "web")).expect_err("port");
        assert!(refused.contains("no TCP port 9090"), "{refused}");
        // A UDP port by its protocol, under the same rules.
        assert_eq!(check_udp("n-web", 5353, true, &as_("prod", "web")), Ok(()));
        let refused = check_udp("n-web", 5353, false, &as_("prod", "web")).expect_err("tcp");
        assert!(refused.contains("no TCP port 5353"), "{refused}");
        let refused = check_udp("n-web", 9000, true, &as_("prod", "web")).expect_err("udp");
        assert!(refused.contains("no UDP port 9000"), "{refused}");
        assert!(check_udp("n-evil", 5353, true, &as_("other", "evil")).is_err());
        let refused = local
            .service_allowed("n-web", "r9", 8080, false, &as_("prod", "web"))
            .expect_err("r9");
        assert!(refused.contains("not assigned to this node"), "{refused}");
        // Ingress: only from an ingress node, only on a routed port.
        assert_eq!(check("n-gw", 8080, &Caller::Ingress), Ok(()));
        assert!(check("n-web", 8080, &Caller::Ingress).is_err());
        assert!(check("n-gw", 9000, &Caller::Ingress).is_err());
        // UDP ingress by its own route: the TCP route of 8080 admits no UDP
        // flow to UDP port 8080, which the service has but ingress does not
        // route.
        assert_eq!(check_udp("n-gw", 5353, true, &Caller::Ingress), Ok(()));
        assert!(check_udp("n-web", 5353, true, &Caller::Ingress).is_err());
        assert_eq!(
            check_udp("n-gw", 8080, true, &Caller::Ingress),
            Err("node n-gw carries no ingress to prod/api:8080/udp".into())
        );
    }

    #[test]
    fn advertised_address_is_the_listen_address_or_the_route_to_a_coordinator() {
        let fixed: SocketAddr = "10.1.2.3:7600".parse().expect("addr");
        assert_eq!(advertise(fixed, &[]), Some(fixed));
        let any: SocketAddr = "0.0.0.0:7600".parse().expect("addr");
        let a = advertise(any, &["127.0.0.1:7400".into()]).expect("route");
        assert_eq!(a, "127.0.0.1:7600".parse().expect("addr"));
    }
}
