//! `make bench-net` (as root): the container network's service paths
//! against a direct connection between two replicas over the bridge, in one
//! run. Two "nodes" on this host (two bridges with subnets of their own,
//! each with its firewall and service proxy, joined by the QUIC overlay on
//! loopback), replicas in network namespaces made by the CNI plugins, and
//! an "outside" namespace reaching the ingress. Paths, each measured as
//! bulk throughput of one connection, 64-byte round trips (p50/p99) and new
//! connections per second (connect, one round trip, close):
//! - direct: replica to replica over node A's bridge (the baseline);
//! - service VIP, same node: through A's kernel path (DNAT) to the replica
//!   on A, and through A's proxy (a least-connections service);
//! - raw overlay stream, A to B (the cross-node baseline);
//! - a replica's connection through a plain overlay forward from A to B (what
//!   `upstreams` use: the overlay with the replica's TCP hop, no VIP, no proxy);
//! - service VIP, across nodes: through A's proxy and the overlay to B;
//! - ingress: from outside to node A's ingress port, to the replica on A.
//!
//! And UDP, as 64-byte datagram round trips (one at a time): direct over
//! the bridge, through A's kernel path and through A's proxy to the
//! replica on A, through A's
//! proxy and the overlay to the replica on B, and from outside through A's
//! ingress to the replica on A.
//!
//! Prints Markdown tables for docs/benchmarks.md.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use cloudless_agent::mesh::OverlayCarry;
use cloudless_network::balancer::Here;
use cloudless_network::firewall::UdpRoute;
use cloudless_network::netns::run_in;
use cloudless_network::proxy::{
    BridgeDialer, Caller, DatagramDialFuture, DialFuture, Dialed, Dialer, ProxyLimits, ServiceProxy,
};
use cloudless_network::services::{
    Endpoint, LoadBalancing, Service, ServicePort, ServiceTable, SharedServices,
};
use cloudless_network::{AttachRequest, Bandwidth, EgressRule, NodeNetwork, NodeNetworkConfig};
use cloudless_overlay::{
    ConnectFuture, Connected, Overlay, OverlayConfig, OverlayTls, Resolver, StaticResolver,
};
use cloudless_pki::{ClusterCa, Identity};
use cloudless_test::bench::bulk;
use cloudless_types::rate_limit::Rate;
use hdrhistogram::Histogram;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Parser, Debug)]
struct Args {
    /// MiB sent per bulk transfer.
    #[arg(long, default_value_t = 1024)]
    mib: usize,
    /// Round trips per latency row.
    #[arg(long, default_value_t = 5000)]
    round_trips: usize,
    /// Seconds of new connections per row.
    #[arg(long, default_value_t = 2)]
    connect_seconds: u64,
    /// Rounds over every path (interleaved); each figure is the median.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Run both "nodes" on every core. By default (with at least two
    /// cores) node A (its runtime, its replicas, the outside client) runs
    /// on core 0 and node B (its runtime and replica) on core 1, as two
    /// devices would: otherwise work one node does for a path (the
    /// replica's TCP hop into the node) takes CPU from the other node.
    #[arg(long)]
    shared_cores: bool,
    /// Both nodes' overlay endpoints on the host's loopback, as before: the
    /// kernel then does node B's receive work (UDP, GRO) on node A's core,
    /// which no two devices do. By default node B's endpoint is in a
    /// namespace of its own, joined by a veth whose receive side is steered
    /// (RPS) to the receiving node's core.
    #[arg(long)]
    loopback_overlay: bool,
    /// Measure only these TCP paths (their numbers in the table, from 0;
    /// comma-separated) and no UDP path, to profile one path at a time.
    /// The comparisons with the targets need every path and are left out.
    #[arg(long, value_delimiter = ',')]
    only: Vec<usize>,
    /// Both overlay endpoints speak the previous release's protocol
    /// (`cloudless-overlay/1`): UDP flows' datagrams on their streams, not
    /// QUIC datagrams.
    #[arg(long)]
    udp_on_streams: bool,
    /// The rate (Gbit/s) of the uplink in the rows that shape it (a token
    /// bucket on both ends of the veth between the nodes, `tc tbf`), where
    /// the link, not the sending node's core, is the limit, as on most
    /// devices' links; 0 leaves those rows out.
    #[arg(long, default_value_t = 1.0)]
    uplink_gbit: f64,
}

/// Keeps the calling thread, and the threads it starts from now on, on
/// `core`.
fn pin(core: usize) -> anyhow::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(core)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
    Ok(())
}

/// The namespace of node B's overlay endpoint (without
/// `--loopback-overlay`).
const UPLINK_NS: &str = "clbn-up";
const SINK: u16 = 9000;
const ECHO: u16 = 9001;
/// The replicas' UDP echo.
const ECHO_UDP: u16 = 9002;
/// A's overlay forward to B's sink and echo.
const FORWARD_SINK: u16 = 9100;
const FORWARD_ECHO: u16 = 9101;

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn sh(cmd: &str) {
    let _ = Command::new("sh").args(["-c", cmd]).status();
}

/// Runs `cmd`, failing when it does.
fn sh_ok(cmd: &str) -> anyhow::Result<()> {
    let status = Command::new("sh").args(["-c", cmd]).status()?;
    anyhow::ensure!(status.success(), "{cmd}: {status}");
    Ok(())
}

fn node_config(dir: &Path, n: u8) -> NodeNetworkConfig {
    NodeNetworkConfig {
        subnet: format!("10.250.{n}.0/24").parse().expect("net"),
        internal: vec!["10.250.0.0/16".parse().expect("net")],
        bridge: format!("clbn{n}"),
        cni_bin_dir: "/usr/lib/cni".into(),
        state_dir: dir.join(format!("node{n}")),
        netns_dir: dir.join(format!("netns{n}")),
        chain_prefix: format!("CLBN{n}"),
        service_cidr: Some("10.250.100.0/24".parse().expect("net")),
        proxy_port: 7681,
        dns_port: 53,
        // The baseline is a connection straight between two replicas.
        isolate_replicas: false,
    }
}

fn attach_request(id: &str) -> AttachRequest {
    AttachRequest {
        container_id: id.into(),
        host_ports: vec![],
        egress: vec![EgressRule::any()],
        bandwidth: Bandwidth::default(),
    }
}

/// A sink (answers with the byte count) and an echo (64-byte messages) in
/// the namespace at `netns`, on `addr`. They run on threads of their own,
/// not on the runtime the proxies use: in a cluster the replicas are
/// processes of their own.
fn serve(netns: &Path, addr: Ipv4Addr, core: Option<usize>) -> anyhow::Result<()> {
    for (port, echo) in [(SINK, false), (ECHO, true)] {
        let l = run_in(netns, move || {
            std::net::TcpListener::bind((addr, port)).map_err(|e| e.to_string())
        })?;
        std::thread::spawn(move || {
            if let Some(core) = core {
                if let Err(e) = pin(core) {
                    eprintln!("pinning a replica to core {core}: {e}");
                }
            }
            while let Ok((s, _)) = l.accept() {
                let _ = s.set_nodelay(true);
                std::thread::spawn(move || {
                    let _ = if echo { echo_std(s) } else { sink_std(s) };
                });
            }
        });
    }
    let udp = run_in(netns, move || {
        std::net::UdpSocket::bind((addr, ECHO_UDP)).map_err(|e| e.to_string())
    })?;
    std::thread::spawn(move || {
        if let Some(core) = core {
            if let Err(e) = pin(core) {
                eprintln!("pinning a replica to core {core}: {e}");
            }
        }
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(&buf[..n], from);
        }
    });
    Ok(())
}

/// `n` 64-byte datagram round trips from namespace `netns` to `to` (a
/// socket connected to it: answers from elsewhere are not taken); their
/// histogram in microseconds and how many got no answer within a second.
fn udp_round_trips(
    netns: &Path,
    to: SocketAddr,
    n: usize,
) -> anyhow::Result<(Histogram<u64>, usize)> {
    let s = run_in(netns, move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
        s.connect(to).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(1)))
            .map_err(|e| e.to_string())?;
        Ok(s)
    })?;
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (msg, mut back) = ([1u8; 64], [0u8; 2048]);
    let mut lost = 0;
    for _ in 0..n {
        let t = Instant::now();
        s.send(&msg)?;
        match s.recv(&mut back) {
            Ok(64) => h.record(t.elapsed().as_micros().max(1) as u64)?,
            Ok(k) => anyhow::bail!("a {k}-byte answer to a 64-byte datagram"),
            Err(_) => lost += 1,
        }
    }
    Ok((h, lost))
}

/// Answers service streams on node B: TCP targets from a table, UDP ones
/// (`.../udp@...`) with a socket connected to B's replica's UDP echo.
struct BenchResolver {
    tcp: StaticResolver,
    udp: SocketAddr,
}

impl Resolver for BenchResolver {
    fn connect<'a>(&'a self, origin: &'a Identity, target: &'a str) -> ConnectFuture<'a> {
        if !target.contains("/udp@") {
            return self.tcp.connect(origin, target);
        }
        Box::pin(async move {
            let s = tokio::net::UdpSocket::bind("0.0.0.0:0")
                .await
                .map_err(|e| e.to_string())?;
            s.connect(self.udp).await.map_err(|e| e.to_string())?;
            Ok(Connected::Udp(s))
        })
    }
}

fn echo_std(mut s: std::net::TcpStream) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let mut buf = [0u8; 64];
    loop {
        s.read_exact(&mut buf)?;
        s.write_all(&buf)?;
    }
}

fn sink_std(mut s: std::net::TcpStream) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0u64;
    loop {
        let k = s.read(&mut buf)?;
        if k == 0 {
            break;
        }
        n += k as u64;
    }
    s.write_all(&n.to_be_bytes())
}

/// Dials endpoints on node B through the overlay from A.
struct OverlayDialer {
    overlay: Overlay,
}

impl Dialer for OverlayDialer {
    fn dial<'a>(&'a self, e: &'a Endpoint, port: u16, caller: &'a Caller) -> DialFuture<'a> {
        Box::pin(async move {
            let target = cloudless_agent::mesh::service_target(&e.replica_id, port, false, caller);
            let s = self
                .overlay
                .open(&Identity::Node(e.node_id.clone()), &target)
                .await
                .map_err(|e| e.to_string())?;
            Ok(Dialed::Carry(Box::new(OverlayCarry(s))))
        })
    }

    fn dial_datagrams<'a>(
        &'a self,
        e: &'a Endpoint,
        port: u16,
        caller: &'a Caller,
    ) -> DatagramDialFuture<'a> {
        Box::pin(async move {
            let target = cloudless_agent::mesh::service_target(&e.replica_id, port, true, caller);
            let s = self
                .overlay
                .open_flow(&Identity::Node(e.node_id.clone()), &target)
                .await
                .map_err(|e| e.to_string())?;
            Ok(cloudless_agent::mesh::overlay_datagrams(s))
        })
    }
}

fn overlay<R: Resolver>(
    ca: &ClusterCa,
    id: &str,
    at: Ipv4Addr,
    resolver: R,
    datagram_flows: bool,
) -> anyhow::Result<Overlay> {
    let me = Identity::Node(id.into());
    let issued = ca.issue(&me, &[], 3600, now())?;
    let key = issued
        .key_pem
        .ok_or_else(|| anyhow::anyhow!("no key issued"))?;
    let (tls, _) = OverlayTls::new(ca.cert_pem(), &issued.cert_pem, key)?;
    let config = OverlayConfig {
        listen: SocketAddr::from((at, 0)),
        datagram_flows,
        ..OverlayConfig::default()
    };
    Ok(Overlay::bind(config, tls, me, Arc::new(resolver))?)
}

async fn round_trips<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    n: usize,
) -> anyhow::Result<Histogram<u64>> {
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (msg, mut back) = ([1u8; 64], [0u8; 64]);
    for _ in 0..n {
        let t = Instant::now();
        s.write_all(&msg).await?;
        s.read_exact(&mut back).await?;
        h.record(t.elapsed().as_micros().max(1) as u64)?;
    }
    Ok(h)
}

/// Where a path's connections go, and from which namespace.
#[derive(Clone)]
enum Path2 {
    /// TCP from the namespace at the path to this address.
    Tcp(PathBuf, Ipv4Addr),
    /// TCP from the namespace at the path to A's overlay forward at this
    /// address (its own ports for the sink and the echo).
    Forward(PathBuf, Ipv4Addr),
    /// An overlay stream from A to the target on B.
    Overlay(Arc<Overlay>, String),
}

/// One row: throughput, round trips, connections per second.
struct Row {
    gbps: f64,
    rtt: Histogram<u64>,
    conns_per_s: f64,
}

/// A connection on a path: a replica's socket (used from a thread of its
/// own, as a process would), or an overlay stream opened by node A.
enum Conn {
    Replica(std::net::TcpStream),
    Overlay(cloudless_overlay::OverlayStream),
}

async fn connect(path: &Path2, port: u16) -> anyhow::Result<Conn> {
    Ok(match path {
        Path2::Tcp(netns, addr) | Path2::Forward(netns, addr) => {
            let port = match (path, port) {
                (Path2::Forward(..), SINK) => FORWARD_SINK,
                (Path2::Forward(..), _) => FORWARD_ECHO,
                _ => port,
            };
            let to = SocketAddr::from((*addr, port));
            Conn::Replica(run_in(netns, move || {
                let s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(3))
                    .map_err(|e| format!("{to}: {e}"))?;
                s.set_nodelay(true).map_err(|e| e.to_string())?;
                Ok(s)
            })?)
        }
        Path2::Overlay(o, target) => {
            let t = target.replace("{port}", &port.to_string());
            Conn::Overlay(o.open(&Identity::Node("B".into()), &t).await?)
        }
    })
}

/// Sends `mib` MiB to the sink; Gbit/s.
async fn bulk_on(c: Conn, mib: usize) -> anyhow::Result<f64> {
    match c {
        Conn::Replica(s) => tokio::task::spawn_blocking(move || bulk_std(s, mib)).await?,
        Conn::Overlay(s) => bulk(s, mib).await,
    }
}

fn bulk_std(mut s: std::net::TcpStream, mib: usize) -> anyhow::Result<f64> {
    use std::io::{Read, Write};
    let chunk = vec![7u8; 1 << 20];
    let started = Instant::now();
    for _ in 0..mib {
        s.write_all(&chunk)?;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut n = [0u8; 8];
    s.read_exact(&mut n)?;
    let secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        u64::from_be_bytes(n) == (mib as u64) << 20,
        "the sink counted {} bytes",
        u64::from_be_bytes(n)
    );
    Ok(mib as f64 * 8.0 / 1024.0 / secs)
}

/// `n` 64-byte round trips; their histogram in microseconds.
async fn round_trips_on(c: Conn, n: usize) -> anyhow::Result<Histogram<u64>> {
    match c {
        Conn::Replica(mut s) => {
            tokio::task::spawn_blocking(move || {
                use std::io::{Read, Write};
                let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
                let (msg, mut back) = ([1u8; 64], [0u8; 64]);
                for _ in 0..n {
                    let t = Instant::now();
                    s.write_all(&msg)?;
                    s.read_exact(&mut back)?;
                    h.record(t.elapsed().as_micros().max(1) as u64)?;
                }
                Ok(h)
            })
            .await?
        }
        Conn::Overlay(s) => round_trips(s, n).await,
    }
}

/// One new connection's round trip.
async fn one_exchange(path: &Path2) -> anyhow::Result<()> {
    let (msg, mut back) = ([1u8; 64], [0u8; 64]);
    match connect(path, ECHO).await? {
        Conn::Replica(mut s) => {
            use std::io::{Read, Write};
            s.write_all(&msg)?;
            s.read_exact(&mut back)?;
        }
        Conn::Overlay(mut s) => {
            s.write_all(&msg).await?;
            s.read_exact(&mut back).await?;
        }
    }
    Ok(())
}

/// Measures one path; new connections only when `connections` (each
/// leaves a socket in TIME_WAIT for a minute: later rounds would measure
/// the port range, not the path).
async fn measure(path: &Path2, args: &Args, connections: bool) -> anyhow::Result<Row> {
    let gbps = bulk_on(connect(path, SINK).await?, args.mib).await?;
    let rtt = round_trips_on(connect(path, ECHO).await?, args.round_trips).await?;
    let seconds = if connections { args.connect_seconds } else { 0 };
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut n = 0u64;
    while Instant::now() < deadline {
        one_exchange(path).await?;
        n += 1;
    }
    Ok(Row {
        gbps,
        rtt,
        conns_per_s: if n == 0 {
            0.0
        } else {
            n as f64 / started.elapsed().as_secs_f64()
        },
    })
}

/// The median round of each figure (throughput, p50 and connection rate
/// taken apart; the round-trip histogram is the one of the median p50).
fn median_row(mut rs: Vec<Row>) -> Row {
    let mid = rs.len() / 2;
    let mut gbps: Vec<f64> = rs.iter().map(|r| r.gbps).collect();
    // Connections are measured in the first round only.
    let conns = rs.first().map_or(0.0, |r| r.conns_per_s);
    gbps.sort_by(f64::total_cmp);
    rs.sort_by_key(|r| r.rtt.value_at_quantile(0.5));
    let rtt = rs.swap_remove(mid).rtt;
    Row {
        gbps: gbps[mid],
        rtt,
        conns_per_s: conns,
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pinned = !args.shared_cores && cores >= 2;
    if pinned {
        // Threads inherit the mask: node A's runtime (one worker, as on a
        // one-core device), its replicas and the outside client.
        pin(0)?;
    }
    // Node B's runtime: its overlay endpoint and the streams it accepts.
    let node_b = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(if pinned { 1 } else { cores })
        .on_thread_start(move || {
            if pinned {
                if let Err(e) = pin(1) {
                    eprintln!("pinning node B to core 1: {e}");
                }
            }
        })
        .enable_all()
        .build()?;
    let node_a = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(if pinned { 1 } else { cores })
        .enable_all()
        .build()?;
    let result = node_a.block_on(run(args, node_b.handle().clone(), pinned));
    node_b.shutdown_background();
    result
}

async fn run(args: Args, node_b: tokio::runtime::Handle, pinned: bool) -> anyhow::Result<()> {
    if pinned {
        eprintln!("node A on core 0, node B on core 1 (--shared-cores to run both on every core)");
    }
    let dir = tempfile::tempdir()?;
    sh(&format!("ip netns del clbn-out 2>/dev/null; ip netns del {UPLINK_NS} 2>/dev/null; ip link del clbn-h 2>/dev/null; ip link del clbn-ua 2>/dev/null; ip link del clbn1 2>/dev/null; ip link del clbn2 2>/dev/null"));
    let a = NodeNetwork::open(node_config(dir.path(), 1)).await?;
    let b = NodeNetwork::open(node_config(dir.path(), 2)).await?;
    let client = a.attach(&attach_request("bench-client")).await?;
    let server_a = a.attach(&attach_request("bench-server-a")).await?;
    let server_b = b.attach(&attach_request("bench-server-b")).await?;
    serve(&server_a.netns, server_a.address, None)?;
    serve(&server_b.netns, server_b.address, pinned.then_some(1))?;
    // Outside: a namespace joined to the host by a veth.
    sh(
        "ip netns add clbn-out && ip link add clbn-h type veth peer name clbn-o netns clbn-out \
        && ip addr add 10.250.200.1/30 dev clbn-h && ip link set clbn-h up \
        && ip -n clbn-out addr add 10.250.200.2/30 dev clbn-o && ip -n clbn-out link set clbn-o up \
        && ip -n clbn-out link set lo up",
    );

    // The overlay: B connects service streams to its replica.
    let ca = Arc::new(ClusterCa::generate("bench", now())?);
    let caller = Caller::Workload {
        namespace: "bench".into(),
        workload: "client".into(),
    };
    let mut resolver = StaticResolver::default();
    for port in [SINK, ECHO] {
        for c in [&caller, &Caller::Ingress] {
            resolver = resolver.with(
                &cloudless_agent::mesh::service_target("bench-server-b", port, false, c),
                SocketAddr::from((server_b.address, port)),
            );
        }
    }
    let resolver = BenchResolver {
        tcp: resolver,
        udp: SocketAddr::from((server_b.address, ECHO_UDP)),
    };
    let uplink = pinned && !args.loopback_overlay;
    let (a_at, b_at, b_netns) = if uplink {
        // B's "uplink": its overlay endpoint in a namespace of its own, and
        // what each node receives processed on that node's core.
        sh_ok(&format!(
            "ip netns add {UPLINK_NS} && ip link add clbn-ua type veth peer name clbn-ub netns {UPLINK_NS} \
            && ip addr add 10.250.201.1/30 dev clbn-ua && ip link set clbn-ua up \
            && ip -n {UPLINK_NS} addr add 10.250.201.2/30 dev clbn-ub && ip -n {UPLINK_NS} link set clbn-ub up \
            && echo 1 > /sys/class/net/clbn-ua/queues/rx-0/rps_cpus \
            && ip netns exec {UPLINK_NS} sh -c 'echo 2 > /sys/class/net/clbn-ub/queues/rx-0/rps_cpus'"
        ))?;
        eprintln!("overlay: A at 10.250.201.1, B at 10.250.201.2 in {UPLINK_NS}, each side's receive on its node's core (--loopback-overlay for both on loopback)");
        (
            Ipv4Addr::new(10, 250, 201, 1),
            Ipv4Addr::new(10, 250, 201, 2),
            Some(PathBuf::from(format!("/var/run/netns/{UPLINK_NS}"))),
        )
    } else {
        (Ipv4Addr::LOCALHOST, Ipv4Addr::LOCALHOST, None)
    };
    let datagram_flows = !args.udp_on_streams;
    let oa = Arc::new(overlay(
        &ca,
        "A",
        a_at,
        StaticResolver::default(),
        datagram_flows,
    )?);
    let ca_b = ca.clone();
    let ob = match b_netns {
        // The socket is made in B's namespace; the endpoint runs on B's
        // runtime.
        Some(ns) => {
            let handle = node_b.clone();
            run_in(&ns, move || {
                let _runtime = handle.enter();
                overlay(&ca_b, "B", b_at, resolver, datagram_flows).map_err(|e| e.to_string())
            })?
        }
        None => {
            node_b
                .spawn(async move { overlay(&ca_b, "B", b_at, resolver, datagram_flows) })
                .await??
        }
    };
    oa.set_peer(Identity::Node("B".into()), vec![ob.local_addr()?]);

    let vip_a: Ipv4Addr = "10.250.100.10".parse()?;
    let vip_b: Ipv4Addr = "10.250.100.11".parse()?;
    let vip_a_proxied: Ipv4Addr = "10.250.100.12".parse()?;
    let service = |name: &str, vip, replica: &str, node: &str, addr, policy| Service {
        namespace: "bench".into(),
        name: name.into(),
        vip,
        ports: vec![
            ServicePort {
                port: SINK,
                udp: false,
            },
            ServicePort {
                port: ECHO,
                udp: false,
            },
            ServicePort {
                port: ECHO_UDP,
                udp: true,
            },
        ],
        policy,
        allow_from: vec![],
        weights: BTreeMap::new(),
        endpoints: vec![Endpoint {
            replica_id: replica.into(),
            node_id: node.into(),
            address: Some(addr),
            zone: String::new(),
            region: String::new(),
        }],
    };
    let services = SharedServices::default();
    services.set(ServiceTable::new(
        "cloudless.local",
        vec![
            service(
                "on-a",
                vip_a,
                "bench-server-a",
                "A",
                server_a.address,
                LoadBalancing::RoundRobin,
            ),
            // The same endpoint behind least connections: the proxy's path.
            service(
                "on-a-proxied",
                vip_a_proxied,
                "bench-server-a",
                "A",
                server_a.address,
                LoadBalancing::LeastConnections,
            ),
            service(
                "on-b",
                vip_b,
                "bench-server-b",
                "B",
                server_b.address,
                LoadBalancing::RoundRobin,
            ),
        ],
    ));
    let client_ip = client.address;
    let who = caller.clone();
    // The ingress rate per source is lifted: one outside client measures
    // how many new connections the path carries, not the limit.
    let limits = ProxyLimits {
        ingress_rate: Rate {
            per_s: u32::MAX,
            burst: u32::MAX,
        },
        ..ProxyLimits::default()
    };
    let proxy = ServiceProxy::with_limits(
        services.clone(),
        Here {
            node_id: "A".into(),
            ..Here::default()
        },
        Arc::new(BridgeDialer {
            node_id: "A".into(),
            remote: OverlayDialer {
                overlay: (*oa).clone(),
            },
        }),
        Arc::new(move |ip| (ip == std::net::IpAddr::V4(client_ip)).then(|| who.clone())),
        limits,
    );
    // Node A's kernel path, as its agent would set it: "on-a" is served
    // wholly on A.
    let callers =
        std::collections::HashMap::from([(std::net::IpAddr::V4(client_ip), caller.clone())]);
    a.set_fast_routes(&cloudless_network::fastpath::routes(
        &services.get(),
        &callers,
        "A",
    ))
    .await?;
    let l = TcpListener::bind((a.gateway(), 7681)).await?;
    tokio::spawn(proxy.clone().serve_vips(l));
    // Node A's proxy sockets for the UDP ports, as its agent would set them
    // (the kernel path, when it serves a port, comes first).
    let mut udp_routes = Vec::new();
    for vip in [vip_a, vip_a_proxied, vip_b] {
        let socket = tokio::net::UdpSocket::bind((a.gateway(), 0)).await?;
        let SocketAddr::V4(to) = socket.local_addr()? else {
            anyhow::bail!("an IPv4 socket");
        };
        tokio::spawn(proxy.clone().serve_udp(socket, vip, ECHO_UDP));
        udp_routes.push(UdpRoute {
            vip,
            port: ECHO_UDP,
            to,
        });
    }
    a.set_udp_routes(&udp_routes).await?;
    // UDP ingress, as an ingress node's agent would serve it.
    tokio::spawn(proxy.clone().serve_ingress_udp(
        Arc::new(cloudless_network::proxy::ingress_socket(ECHO_UDP)?),
        "bench".into(),
        "on-a".into(),
        ECHO_UDP,
    ));
    for port in [SINK, ECHO] {
        let l = TcpListener::bind(("10.250.200.1", port)).await?;
        tokio::spawn(
            proxy
                .clone()
                .serve_ingress(l, "bench".into(), "on-a".into(), port),
        );
    }

    // A plain overlay forward on A's bridge address (as `upstreams` use):
    // a replica's TCP connection carried to B without VIP or proxy.
    for (port, to) in [(FORWARD_SINK, SINK), (FORWARD_ECHO, ECHO)] {
        let l = TcpListener::bind((a.gateway(), port)).await?;
        let target = cloudless_agent::mesh::service_target("bench-server-b", to, false, &caller);
        let _forward = oa.forward(l, Identity::Node("B".into()), target);
    }

    let outside = PathBuf::from("/var/run/netns/clbn-out");
    let ingress_at: Ipv4Addr = "10.250.200.1".parse()?;
    let overlay_target = cloudless_agent::mesh::service_target("bench-server-b", 0, false, &caller)
        .replace(":0@", ":{port}@");
    let mut paths: Vec<(String, Path2, Option<f64>)> = [
        (
            "direct, replica to replica over the bridge (baseline)",
            Path2::Tcp(client.netns.clone(), server_a.address),
        ),
        (
            "service VIP, same node (the kernel path)",
            Path2::Tcp(client.netns.clone(), vip_a),
        ),
        (
            "service VIP, same node, through the proxy (least connections)",
            Path2::Tcp(client.netns.clone(), vip_a_proxied),
        ),
        (
            "raw overlay stream A to B (cross-node baseline)",
            Path2::Overlay(oa.clone(), overlay_target.clone()),
        ),
        (
            "replica to B's replica through a plain overlay forward (no VIP, no proxy)",
            Path2::Forward(client.netns.clone(), a.gateway()),
        ),
        (
            "service VIP, across nodes (overlay)",
            Path2::Tcp(client.netns.clone(), vip_b),
        ),
        (
            "ingress from outside to a replica on the ingress node",
            Path2::Tcp(outside.clone(), ingress_at),
        ),
    ]
    .into_iter()
    .map(|(label, p)| (label.to_string(), p, None))
    .collect();
    // The cross-node pair again on a shaped uplink: where the link is the
    // limit, the service layer should cost no throughput at all.
    if uplink && args.uplink_gbit > 0.0 {
        let gbit = args.uplink_gbit;
        match shape_uplink(Some(gbit)).and_then(|()| shape_uplink(None)) {
            Ok(()) => {
                paths.push((
                    format!("raw overlay stream A to B, uplink shaped to {gbit} Gbit/s"),
                    Path2::Overlay(oa.clone(), overlay_target.clone()),
                    Some(gbit),
                ));
                paths.push((
                    format!("service VIP, across nodes, uplink shaped to {gbit} Gbit/s"),
                    Path2::Tcp(client.netns.clone(), vip_b),
                    Some(gbit),
                ));
            }
            Err(e) => eprintln!(
                "warning: the uplink cannot be shaped ({e}); the shaped rows are left out"
            ),
        }
    }
    // Rounds interleave the paths, so a noisy moment hits them alike.
    let mut runs: Vec<Vec<Row>> = paths.iter().map(|_| Vec::new()).collect();
    for round in 0..args.rounds.max(1) {
        for (i, (label, p, shaped)) in paths.iter().enumerate() {
            if !args.only.is_empty() && !args.only.contains(&i) {
                continue;
            }
            if shaped.is_some() {
                shape_uplink(*shaped)?;
            }
            // New connections on the shaped uplink would measure the
            // TIME_WAIT sockets the same ports left an instant before.
            let r = measure(p, &args, round == 0 && shaped.is_none()).await;
            if shaped.is_some() {
                shape_uplink(None)?;
            }
            let r = r?;
            eprintln!(
                "round {round}: {label}: {:.2} Gbit/s, p50 {} us, {:.0} connections/s",
                r.gbps,
                r.rtt.value_at_quantile(0.5),
                r.conns_per_s
            );
            runs[i].push(r);
        }
    }
    let rows: Vec<(&str, Row)> = paths
        .iter()
        .zip(runs)
        .filter(|(_, rs)| !rs.is_empty())
        .map(|((label, _, _), rs)| (label.as_str(), median_row(rs)))
        .collect();
    println!(
        "\nOne connection each: bulk {} MiB, {} round trips of 64 bytes, new connections for {} s (first round); the median of {} interleaved rounds:\n",
        args.mib, args.round_trips, args.connect_seconds, args.rounds
    );
    println!("| path | Gbit/s | p50 us | p99 us | new connections/s |");
    println!("|---|---:|---:|---:|---:|");
    for (label, r) in &rows {
        let conns = if r.conns_per_s > 0.0 {
            format!("{:.0}", r.conns_per_s)
        } else {
            "-".into()
        };
        println!(
            "| {label} | {:.2} | {} | {} | {conns} |",
            r.gbps,
            r.rtt.value_at_quantile(0.5),
            r.rtt.value_at_quantile(0.99),
        );
    }
    if rows.len() < paths.len() {
        return cleanup(&a, &b, dir.path()).await;
    }
    // Paths 0 to 6 are always there; 7 and 8 only on a shaped uplink.
    let p50 = |i: usize| rows[i].1.rtt.value_at_quantile(0.5) as f64;
    println!("\nAgainst the targets:\n");
    println!(
        "- same-node service path: {:.0}% of direct throughput (target at least 80%), {:+.0} us p50 (target at most +50)",
        100.0 * rows[1].1.gbps / rows[0].1.gbps,
        p50(1) - p50(0)
    );
    println!(
        "- same-node service path through the proxy: {:.0}% of direct throughput, {:+.0} us p50",
        100.0 * rows[2].1.gbps / rows[0].1.gbps,
        p50(2) - p50(0)
    );
    println!(
        "- cross-node service path: {:.0}% of the raw overlay stream's throughput (target within 10%), {:+.0} us p50",
        100.0 * rows[5].1.gbps / rows[3].1.gbps,
        p50(5) - p50(3)
    );
    println!(
        "- cross-node service path: {:.0}% of a replica's connection through a plain overlay forward, {:+.0} us p50",
        100.0 * rows[5].1.gbps / rows[4].1.gbps,
        p50(5) - p50(4)
    );
    if rows.len() == 9 {
        println!(
            "- cross-node service path on the shaped uplink: {:.0}% of the raw overlay stream's throughput on it, {:+.0} us p50",
            100.0 * rows[8].1.gbps / rows[7].1.gbps,
            p50(8) - p50(7)
        );
    }
    println!(
        "- ingress: {:+.0} us p50 over direct (target at most +200)",
        p50(6) - p50(0)
    );

    let udp_paths = [
        (
            "UDP direct, replica to replica over the bridge (baseline)",
            &client.netns,
            SocketAddr::from((server_a.address, ECHO_UDP)),
        ),
        (
            "UDP service VIP, same node (the kernel path)",
            &client.netns,
            SocketAddr::from((vip_a, ECHO_UDP)),
        ),
        (
            "UDP service VIP, same node, through the proxy (least connections)",
            &client.netns,
            SocketAddr::from((vip_a_proxied, ECHO_UDP)),
        ),
        (
            "UDP service VIP, across nodes (the proxy and the overlay)",
            &client.netns,
            SocketAddr::from((vip_b, ECHO_UDP)),
        ),
        (
            "UDP ingress from outside to a replica on the ingress node",
            &outside,
            SocketAddr::from((ingress_at, ECHO_UDP)),
        ),
    ];
    println!(
        "\nUDP: {} round trips of a 64-byte datagram, one at a time, from one socket (one flow):\n",
        args.round_trips
    );
    println!("| path | p50 us | p99 us | round trips/s | lost |");
    println!("|---|---:|---:|---:|---:|");
    let mut udp_p50 = Vec::new();
    for (label, netns, to) in udp_paths {
        let netns = netns.clone();
        let n = args.round_trips;
        let t = Instant::now();
        let (h, lost) =
            tokio::task::spawn_blocking(move || udp_round_trips(&netns, to, n)).await??;
        let per_s = n as f64 / t.elapsed().as_secs_f64();
        println!(
            "| {label} | {} | {} | {per_s:.0} | {lost} |",
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99)
        );
        udp_p50.push(h.value_at_quantile(0.5) as f64);
    }
    println!(
        "\n- UDP over direct: {:+.0} us p50 on the same node's kernel path, {:+.0} us through its proxy, {:+.0} us across nodes, {:+.0} us through ingress",
        udp_p50[1] - udp_p50[0],
        udp_p50[2] - udp_p50[0],
        udp_p50[3] - udp_p50[0],
        udp_p50[4] - udp_p50[0]
    );
    cleanup(&a, &b, dir.path()).await
}

/// Shapes both ends of the uplink between the nodes to `gbit` Gbit/s (a
/// token bucket with a queue of 10 ms), or lifts the shaping (`None`).
fn shape_uplink(gbit: Option<f64>) -> anyhow::Result<()> {
    let ends = [
        ("", "clbn-ua"),
        (&*format!("ip netns exec {UPLINK_NS} "), "clbn-ub"),
    ];
    for (inside, dev) in ends {
        sh_ok(&match gbit {
            Some(g) => format!(
                "{inside}tc qdisc replace dev {dev} root tbf rate {}mbit burst 256kb latency 10ms",
                (g * 1000.0).round() as u64
            ),
            None => format!("{inside}tc qdisc del dev {dev} root"),
        })?;
    }
    Ok(())
}

/// Detaches the bench's replicas and removes both nodes' networks and what
/// the bench added around them.
async fn cleanup(a: &NodeNetwork, b: &NodeNetwork, dir: &Path) -> anyhow::Result<()> {
    for id in ["bench-client", "bench-server-a"] {
        a.detach(id).await?;
    }
    b.detach("bench-server-b").await?;
    a.uninstall().await?;
    b.uninstall().await?;
    sh(&format!("ip netns del clbn-out; ip netns del {UPLINK_NS} 2>/dev/null; ip link del clbn-h 2>/dev/null; ip link del clbn-ua 2>/dev/null; ip link del clbn1; ip link del clbn2"));
    for n in [1, 2] {
        sh(&format!(
            "umount -l {}",
            dir.join(format!("netns{n}")).display()
        ));
    }
    Ok(())
}
