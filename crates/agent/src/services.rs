//! The node's service plane: the resolver and the service proxy on the
//! bridge's address, the ingress listeners of an ingress node, and what
//! each replica is told about names (its `resolv.conf`). Fed by the
//! assignment watch: every service with its Ready endpoints, which nodes run
//! which workloads, which nodes carry ingress.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use cloudless_network::balancer::Here;
use cloudless_network::dns::Resolver;
use cloudless_network::firewall::UdpRoute;
use cloudless_network::proxy::{
    BridgeDialer, Caller, DatagramDialFuture, DialFuture, Dialed, Dialer, ProxyLimits, ServiceProxy,
};
use cloudless_network::services::{
    Endpoint, LoadBalancing, Service, ServicePort, ServiceTable, SharedServices,
};
use cloudless_network::{fastpath, sockets, NodeNetwork};
use cloudless_proto::v1 as pb;
use tokio::task::JoinHandle;

use crate::mesh::{overlay_datagrams, Mesh, OverlayCarry, ServiceAccess};

/// Replicas on this node by address: who a connection to a VIP comes from.
type Callers = Arc<Mutex<HashMap<IpAddr, Caller>>>;

/// An open ingress listener: the service (namespace, workload), its port,
/// the task, and (UDP) its socket, kept for the port's next route (the
/// flows of the last one may still hold it).
type IngressListener = (
    String,
    String,
    u16,
    JoinHandle<()>,
    Option<Arc<tokio::net::UdpSocket>>,
);

/// An ingress port of this node and whether it is UDP.
type IngressPort = (u16, bool);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Dials endpoints on other nodes through the overlay.
struct OverlayDialer(Option<Arc<Mesh>>);

impl OverlayDialer {
    /// A service stream to `port` (UDP: `udp`) of endpoint `e` for `caller`.
    async fn open(
        &self,
        e: &Endpoint,
        port: u16,
        udp: bool,
        caller: &Caller,
    ) -> Result<cloudless_overlay::OverlayStream, String> {
        let mesh = self
            .0
            .as_ref()
            .ok_or("this agent runs no overlay (other nodes' replicas are out of reach)")?;
        mesh.open_service_stream(&e.node_id, &e.replica_id, port, udp, caller)
            .await
    }
}

impl Dialer for OverlayDialer {
    fn dial<'a>(&'a self, e: &'a Endpoint, port: u16, caller: &'a Caller) -> DialFuture<'a> {
        Box::pin(async move {
            let s = self.open(e, port, false, caller).await?;
            Ok(Dialed::Carry(Box::new(OverlayCarry(s))))
        })
    }

    fn dial_datagrams<'a>(
        &'a self,
        e: &'a Endpoint,
        port: u16,
        caller: &'a Caller,
    ) -> DatagramDialFuture<'a> {
        Box::pin(async move { Ok(overlay_datagrams(self.open(e, port, true, caller).await?)) })
    }
}

/// The node's service plane.
pub(crate) struct ServicePlane {
    services: SharedServices,
    callers: Callers,
    proxy: Arc<ServiceProxy>,
    mesh: Option<Arc<Mesh>>,
    node_id: String,
    gateway: Ipv4Addr,
    resolv_dir: PathBuf,
    domain: Mutex<String>,
    /// The resolver's and the proxy's tasks.
    tasks: Vec<JoinHandle<()>>,
    /// Ingress listeners (TCP) and sockets (UDP) by port, with the route
    /// they carry.
    ingress: Mutex<HashMap<IngressPort, IngressListener>>,
    /// Told when a replica comes or goes (the kernel path's callers).
    callers_changed: Arc<tokio::sync::Notify>,
}

/// The proxy's sockets for UDP service ports, and the redirects installed.
#[derive(Debug, Default)]
struct UdpPorts {
    /// (VIP, port) -> the socket's address and the task serving it.
    sockets: HashMap<(Ipv4Addr, u16), (SocketAddrV4, JoinHandle<()>)>,
    /// What the firewall redirects now (`None`: nothing installed yet).
    routed: Option<Vec<UdpRoute>>,
}

impl Drop for UdpPorts {
    fn drop(&mut self) {
        for (_, (_, t)) in self.sockets.drain() {
            t.abort();
        }
    }
}

impl std::fmt::Debug for ServicePlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServicePlane")
            .field("gateway", &self.gateway)
            .finish_non_exhaustive()
    }
}

impl Drop for ServicePlane {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        for (_, (_, _, _, t, _)) in lock(&self.ingress).drain() {
            t.abort();
        }
    }
}

/// The proxy's limits for this process's limit of open files.
fn proxy_limits() -> ProxyLimits {
    use nix::sys::resource::{getrlimit, Resource};
    let files = getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft);
    let limits = ProxyLimits::for_open_files(files);
    if files < ProxyLimits::default().open_files_needed() {
        tracing::warn!(
            open_files = files,
            connections = limits.max_connections,
            "the limit of open files is low: the service proxy carries at most this many connections per pool (raise LimitNOFILE)"
        );
    }
    limits
}

impl ServicePlane {
    /// The node's service proxy.
    pub(crate) fn proxy(&self) -> Arc<ServiceProxy> {
        self.proxy.clone()
    }

    /// Starts the resolver and the proxy on `net`'s bridge address for the
    /// node `here`. What cannot listen is logged (replicas then lack names
    /// or VIPs, not their network).
    pub(crate) async fn start(net: &NodeNetwork, here: Here, mesh: Option<Arc<Mesh>>) -> Self {
        let services = mesh
            .as_ref()
            .map_or_else(SharedServices::default, |m| m.services());
        let callers: Callers = Arc::default();
        let lookup = callers.clone();
        let proxy = ServiceProxy::with_limits(
            services.clone(),
            here.clone(),
            Arc::new(BridgeDialer {
                node_id: here.node_id.clone(),
                remote: OverlayDialer(mesh.clone()),
            }),
            Arc::new(move |ip| lock(&lookup).get(&ip).cloned()),
            proxy_limits(),
        );
        let gateway = net.gateway();
        let config = net.config();
        let mut tasks = Vec::new();
        let upstreams = cloudless_network::dns::upstreams(
            &std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
        );
        let dns_at = SocketAddr::from((gateway, config.dns_port));
        let resolver =
            Resolver::new(services.clone(), upstreams).only_from(ipnet::IpNet::V4(config.subnet));
        match resolver.serve(dns_at).await {
            Ok(t) => tasks.extend(t),
            Err(e) => tracing::warn!(
                reason = "ResolverUnavailable",
                error = %e,
                "!!! the node's resolver cannot listen: replicas cannot resolve service names !!!"
            ),
        }
        let proxy_at = SocketAddr::from((gateway, config.proxy_port));
        match tokio::net::TcpListener::bind(proxy_at).await {
            Ok(l) => tasks.push(tokio::spawn(proxy.clone().serve_vips(l))),
            Err(e) => tracing::warn!(
                reason = "ServiceProxyUnavailable",
                error = %e,
                at = %proxy_at,
                "!!! the service proxy cannot listen: connections to service addresses fail !!!"
            ),
        }
        let callers_changed = Arc::new(tokio::sync::Notify::new());
        tasks.push(tokio::spawn(kernel_path(
            net.clone(),
            services.clone(),
            callers.clone(),
            callers_changed.clone(),
            here.node_id.clone(),
        )));
        tasks.push(tokio::spawn(udp_ports(
            net.clone(),
            services.clone(),
            proxy.clone(),
            gateway,
        )));
        tracing::info!(resolver = %dns_at, proxy = %proxy_at, "service plane ready");
        Self {
            services,
            callers,
            proxy,
            mesh,
            node_id: here.node_id,
            gateway,
            resolv_dir: config.state_dir.join("resolv"),
            domain: Mutex::new(String::new()),
            tasks,
            ingress: Mutex::default(),
            callers_changed,
        }
    }

    /// Takes the services, who runs what and the ingress routes from an
    /// assignment set.
    pub(crate) async fn update(&self, set: &pb::AssignmentSet) {
        let domain = set
            .network
            .as_ref()
            .map(|n| n.cluster_domain.clone())
            .unwrap_or_default();
        *lock(&self.domain) = domain.clone();
        if let Some(n) = &set.network {
            self.proxy.set_here(Here {
                node_id: self.node_id.clone(),
                zone: n.zone.clone(),
                region: n.region.clone(),
            });
        }
        let table = table_of(&domain, &set.services);
        if let Some(m) = &self.mesh {
            for s in &set.services {
                for e in &s.endpoints {
                    if e.node_id != self.node_id {
                        m.set_peer_addresses(&e.node_id, &e.overlay_addresses);
                    }
                }
            }
        }
        // The new table first: streams are rechecked against it.
        self.services.set(table);
        if let Some(m) = &self.mesh {
            m.set_service_access(access_of(set));
        }
        self.update_ingress(set).await;
    }

    /// Opens, keeps or closes ingress listeners to match `set` (only on an
    /// ingress node).
    async fn update_ingress(&self, set: &pb::AssignmentSet) {
        let wanted: BTreeMap<IngressPort, (String, String, u16)> = if set.ingress {
            set.services
                .iter()
                .flat_map(|s| {
                    s.ports.iter().filter_map(|p| {
                        let ingress = u16::try_from(p.ingress_port).ok().filter(|p| *p != 0)?;
                        let port = u16::try_from(p.port).ok()?;
                        let udp = p.protocol() == pb::Protocol::Udp;
                        Some((
                            (ingress, udp),
                            (s.namespace.clone(), s.workload.clone(), port),
                        ))
                    })
                })
                .collect()
        } else {
            BTreeMap::new()
        };
        let (closed, mut kept_udp) = {
            let mut ingress = lock(&self.ingress);
            let gone: Vec<IngressPort> = ingress
                .iter()
                .filter(|(port, (ns, w, target, _, _))| {
                    wanted.get(port) != Some(&(ns.clone(), w.clone(), *target))
                })
                .map(|(port, _)| *port)
                .collect();
            let mut closed = Vec::new();
            let mut kept_udp = HashMap::new();
            for port in gone {
                if let Some((_, _, _, task, socket)) = ingress.remove(&port) {
                    task.abort();
                    closed.push(task);
                    // A UDP port whose route changed keeps its socket.
                    if let Some(socket) = socket.filter(|_| wanted.contains_key(&port)) {
                        kept_udp.insert(port.0, socket);
                    }
                }
            }
            (closed, kept_udp)
        };
        // A closed listener's socket is gone once its task has ended: only
        // then can its port be bound again (for a changed route).
        for task in closed {
            let _ = task.await;
            tracing::info!("ingress listener closed");
        }
        let mut open: HashSet<IngressPort> = lock(&self.ingress).keys().copied().collect();
        for ((port, udp), (ns, w, target)) in wanted {
            if !open.insert((port, udp)) {
                continue;
            }
            let proto = if udp { "UDP" } else { "TCP" };
            let proxy = self.proxy.clone();
            let (n, m) = (ns.clone(), w.clone());
            let bound = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port);
            let task = if udp {
                match kept_udp.remove(&port) {
                    Some(s) => Ok(s),
                    None => cloudless_network::proxy::ingress_socket(port).map(Arc::new),
                }
                .map(|s| {
                    (
                        tokio::spawn(proxy.serve_ingress_udp(s.clone(), n, m, target)),
                        Some(s),
                    )
                })
            } else {
                // Port 53 shared with the node's resolver (on the bridge's
                // address): see cloudless_network::sockets.
                sockets::ingress_shared(port, false)
                    .and_then(|shared| sockets::tcp_listener(bound, shared))
                    .map(|l| (tokio::spawn(proxy.serve_ingress(l, n, m, target)), None))
            };
            match task {
                Ok((task, socket)) => {
                    tracing::info!(port, protocol = proto, service = %format!("{ns}/{w}"), target, "ingress listening");
                    lock(&self.ingress).insert((port, udp), (ns, w, target, task, socket));
                }
                Err(e) => {
                    tracing::warn!(port, protocol = proto, error = %e, "cannot listen for ingress");
                    open.remove(&(port, udp));
                }
            }
        }
    }

    /// Records that replica `replica_id` of `namespace/workload` has
    /// `address` on this node (its connections to VIPs are its), and writes
    /// its `resolv.conf`: this node's resolver, the search path of its
    /// namespace. The file to mount at `/etc/resolv.conf`.
    pub(crate) fn register(
        &self,
        replica_id: &str,
        container_id: &str,
        address: Ipv4Addr,
        namespace: &str,
        workload: &str,
    ) -> std::io::Result<PathBuf> {
        lock(&self.callers).insert(
            IpAddr::V4(address),
            Caller::Workload {
                namespace: namespace.to_owned(),
                workload: workload.to_owned(),
            },
        );
        self.callers_changed.notify_one();
        if let Some(m) = &self.mesh {
            m.set_address(replica_id, Some(address));
        }
        let domain = lock(&self.domain).clone();
        write_resolv_conf(
            &self.resolv_dir,
            container_id,
            self.gateway,
            namespace,
            &domain,
        )
    }

    /// Forgets a replica registered before.
    pub(crate) fn unregister(&self, replica_id: &str, container_id: &str, address: Ipv4Addr) {
        lock(&self.callers).remove(&IpAddr::V4(address));
        self.callers_changed.notify_one();
        if let Some(m) = &self.mesh {
            m.set_address(replica_id, None);
        }
        let _ = std::fs::remove_file(self.resolv_dir.join(container_id));
    }
}

/// Keeps a proxy socket for every UDP service port of the services and the
/// firewall redirecting each port to its socket; what fails is tried again
/// at the next change of the services, else after 1, 2, 4 ... up to 60 s.
/// When where a port's datagrams go changes (and once after a start), the
/// kernel's UDP mappings to it are forgotten: a mapping lives as long as
/// its caller keeps sending, and would hold on to a socket that is gone.
async fn udp_ports(
    net: NodeNetwork,
    services: SharedServices,
    proxy: Arc<ServiceProxy>,
    gateway: Ipv4Addr,
) {
    let mut rx = services.subscribe();
    let mut ports = UdpPorts::default();
    let first = std::time::Duration::from_secs(1);
    let (mut backoff, mut said) = (first, String::new());
    loop {
        let table = rx.borrow_and_update().clone();
        match ports.update(&table, &net, &proxy, gateway).await {
            Ok(()) => (backoff, said) = (first, String::new()),
            Err(e) => {
                if e != said {
                    tracing::warn!(error = %e, "UDP service ports: trying again (after up to a minute)");
                    said = e;
                }
                // A change of the services is tried at once, else again
                // after the backoff.
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    changed = rx.changed() => {
                        if changed.is_err() {
                            return;
                        }
                    }
                }
                backoff = (backoff * 2).min(std::time::Duration::from_secs(60));
                continue;
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

impl UdpPorts {
    /// Makes the sockets and redirects match `table`.
    async fn update(
        &mut self,
        table: &ServiceTable,
        net: &NodeNetwork,
        proxy: &Arc<ServiceProxy>,
        gateway: Ipv4Addr,
    ) -> Result<(), String> {
        let wanted: HashSet<(Ipv4Addr, u16)> = table
            .services()
            .flat_map(|s| {
                s.ports
                    .iter()
                    .filter(|p| p.udp)
                    .map(move |p| (s.vip, p.port))
            })
            .collect();
        self.sockets.retain(|key, (_, task)| {
            let keep = wanted.contains(key);
            if !keep {
                task.abort();
            }
            keep
        });
        let mut unbound = Vec::new();
        for &(vip, port) in &wanted {
            if self.sockets.contains_key(&(vip, port)) {
                continue;
            }
            let bound = tokio::net::UdpSocket::bind((gateway, 0))
                .await
                .and_then(|s| Ok((s.local_addr()?, s)));
            match bound {
                Ok((SocketAddr::V4(at), socket)) => {
                    let task = tokio::spawn(proxy.clone().serve_udp(socket, vip, port));
                    self.sockets.insert((vip, port), (at, task));
                }
                Ok(_) => unbound.push(format!("{vip}:{port}: not an IPv4 socket")),
                Err(e) => unbound.push(format!("{vip}:{port}: {e}")),
            }
        }
        let mut routes: Vec<UdpRoute> = self
            .sockets
            .iter()
            .map(|(&(vip, port), &(to, _))| UdpRoute { vip, port, to })
            .collect();
        routes.sort();
        if self.routed.as_ref() != Some(&routes) {
            net.set_udp_routes(&routes)
                .await
                .map_err(|e| format!("cannot redirect UDP service ports: {e}"))?;
            let before = self.routed.take().unwrap_or_default();
            fastpath::cut(&udp_cuts(&before, &routes)).await;
            tracing::debug!(ports = routes.len(), "UDP service ports redirected");
            self.routed = Some(routes);
        }
        if unbound.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "cannot open the proxy's socket for {}",
                unbound.join(", ")
            ))
        }
    }
}

/// The UDP mappings to forget once the redirects `before` gave way to
/// `after`: every port whose socket changed, came or went (once each).
fn udp_cuts(before: &[UdpRoute], after: &[UdpRoute]) -> Vec<fastpath::Cut> {
    let changed: std::collections::BTreeSet<(Ipv4Addr, u16)> = after
        .iter()
        .filter(|r| !before.contains(r))
        .chain(before.iter().filter(|r| !after.contains(r)))
        .map(|r| (r.vip, r.port))
        .collect();
    changed
        .into_iter()
        .map(|(vip, port)| fastpath::Cut::Udp { vip, port })
        .collect()
}

/// Keeps the node's kernel path (see `cloudless_network::fastpath`) in step
/// with the services and this node's replicas: rewritten on every change,
/// and the connections of endpoints that left or callers no longer
/// admitted cut. After a start the rules of the agent's earlier life serve
/// until the first table with services arrives.
async fn kernel_path(
    net: NodeNetwork,
    services: SharedServices,
    callers: Callers,
    callers_changed: Arc<tokio::sync::Notify>,
    node_id: String,
) {
    let mut rx = services.subscribe();
    let mut served: Option<Vec<fastpath::FastRoute>> = None;
    let mut retired = fastpath::Retired::default();
    loop {
        let table = rx.borrow_and_update().clone();
        let who = lock(&callers).clone();
        let routes = fastpath::routes(&table, &who, &node_id);
        let first_table = served.is_some() || table.services().next().is_some();
        if first_table && served.as_ref() != Some(&routes) {
            match net.set_fast_routes(&routes).await {
                Ok(()) => {
                    match &served {
                        Some(before) => {
                            // What is watched first (a watched route served
                            // again stops being watched), then what the
                            // change itself cuts (not watched after).
                            let mut cuts = retired.to_cut(&table, &who, &node_id);
                            let now = fastpath::to_cut(before, &table, &who, &node_id);
                            retired.update(before, &routes);
                            retired.forget(&now);
                            cuts.extend(now);
                            fastpath::cut(&cuts).await;
                        }
                        // The earlier life's rules may have made UDP
                        // mappings to endpoints that left meanwhile.
                        None => {
                            if let Some(range) = net.config().service_cidr {
                                fastpath::cut(&[fastpath::Cut::UdpRange { range }]).await;
                            }
                        }
                    }
                    tracing::debug!(routes = routes.len(), "kernel path updated");
                    served = Some(routes);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot update the kernel path; retrying");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    continue;
                }
            }
        }
        // UDP mappings the kernel path made before its route left it live
        // on while their callers send: cut when their endpoint leaves.
        if !retired.is_empty() {
            fastpath::cut(&retired.to_cut(&table, &who, &node_id)).await;
        }
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = callers_changed.notified() => {}
        }
    }
}

/// Writes `<dir>/<container>`: the resolver at `gateway`, searching the
/// replica's namespace, then the cluster domain.
fn write_resolv_conf(
    dir: &Path,
    container_id: &str,
    gateway: Ipv4Addr,
    namespace: &str,
    domain: &str,
) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(container_id);
    let search = if domain.is_empty() {
        String::new()
    } else {
        format!("search {namespace}.{domain} {domain}\n")
    };
    let text = format!("nameserver {gateway}\n{search}options ndots:5\n");
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// The service table of an assignment set's services.
fn table_of(domain: &str, services: &[pb::Service]) -> ServiceTable {
    let services = services
        .iter()
        .filter_map(|s| {
            let vip = s.vip.parse().ok()?;
            Some(Service {
                namespace: s.namespace.clone(),
                name: s.workload.clone(),
                vip,
                ports: s
                    .ports
                    .iter()
                    .filter_map(|p| {
                        Some(ServicePort {
                            port: u16::try_from(p.port).ok()?,
                            udp: p.protocol() == pb::Protocol::Udp,
                        })
                    })
                    .collect(),
                policy: match s.load_balancing() {
                    pb::LoadBalancing::LeastConnections => LoadBalancing::LeastConnections,
                    pb::LoadBalancing::Locality => LoadBalancing::Locality,
                    pb::LoadBalancing::Weighted => LoadBalancing::Weighted,
                    _ => LoadBalancing::RoundRobin,
                },
                allow_from: s.allow_from.clone(),
                weights: s
                    .zone_weights
                    .iter()
                    .map(|(k, v)| (k.clone(), *v))
                    .collect(),
                endpoints: s
                    .endpoints
                    .iter()
                    .map(|e| Endpoint {
                        replica_id: e.replica_id.clone(),
                        node_id: e.node_id.clone(),
                        address: e.address.parse().ok(),
                        zone: e.zone.clone(),
                        region: e.region.clone(),
                    })
                    .collect(),
            })
        })
        .collect();
    ServiceTable::new(domain, services)
}

/// Who may reach services here, from an assignment set.
fn access_of(set: &pb::AssignmentSet) -> ServiceAccess {
    ServiceAccess {
        runs: set
            .runs
            .iter()
            .map(|r| {
                (
                    (r.namespace.clone(), r.workload.clone()),
                    r.node_ids.iter().cloned().collect(),
                )
            })
            .collect(),
        ingress_nodes: set.ingress_node_ids.iter().cloned().collect(),
        ingress_routes: set
            .services
            .iter()
            .flat_map(|s| {
                s.ports
                    .iter()
                    .filter(|p| p.ingress_port != 0)
                    .filter_map(|p| {
                        Some((
                            s.namespace.clone(),
                            s.workload.clone(),
                            ServicePort {
                                port: u16::try_from(p.port).ok()?,
                                udp: p.protocol() == pb::Protocol::Udp,
                            },
                        ))
                    })
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_mappings_are_forgotten_for_ports_whose_socket_changed_came_or_went() {
        let route = |vip: u8, port: u16, to: u16| UdpRoute {
            vip: Ipv4Addr::new(10, 96, 0, vip),
            port,
            to: SocketAddrV4::new(Ipv4Addr::new(10, 244, 0, 1), to),
        };
        let cut = |vip: u8, port: u16| fastpath::Cut::Udp {
            vip: Ipv4Addr::new(10, 96, 0, vip),
            port,
        };
        let now = [route(1, 53, 40001), route(2, 5353, 40002)];
        // After a start every port is forgotten (mappings of an earlier
        // life point at sockets that are gone).
        assert_eq!(udp_cuts(&[], &now), [cut(1, 53), cut(2, 5353)]);
        assert!(udp_cuts(&now, &now).is_empty());
        // A socket replaced: that port once; a port gone and one new.
        let next = [route(1, 53, 40009), route(3, 123, 40003)];
        assert_eq!(
            udp_cuts(&now, &next),
            [cut(1, 53), cut(2, 5353), cut(3, 123)]
        );
    }

    #[test]
    fn a_replica_resolves_through_its_node_and_searches_its_namespace() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write_resolv_conf(
            dir.path(),
            "web-1",
            [10, 244, 3, 1].into(),
            "prod",
            "cloudless.local",
        )
        .expect("write");
        assert_eq!(
            std::fs::read_to_string(path).expect("read"),
            "nameserver 10.244.3.1\nsearch prod.cloudless.local cloudless.local\noptions ndots:5\n"
        );
    }
}
