//! The node's replica network against the real CNI plugins, iptables and
//! network namespaces (as root): a replica reaches "the internet" (a server
//! in a namespace of its own) through the node, a replica whose egress
//! policy does not allow it is refused, a published port answers at the
//! node's address, a rate limit holds, an agent restart keeps addresses,
//! and a detach leaves no veth, rule, lease or namespace behind.

use std::collections::BTreeSet;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cloudless_network::netns::run_in;
use cloudless_network::{
    AttachRequest, Bandwidth, EgressRule, HostPort, NodeNetwork, NodeNetworkConfig, Protocol,
};

/// One test's node and internet: a bridge and subnet of its own, chains of
/// its own, and an "internet" namespace joined to the host by a veth pair
/// (host side `.1`, internet `.2` of a /30).
struct Site {
    n: u8,
    dir: tempfile::TempDir,
    internet: String,
}

impl Site {
    fn new(n: u8) -> Option<Self> {
        if let Some(why) = cannot_run() {
            skip_test(format!("node_network: {why}"));
            return None;
        }
        let internet = format!("cldt-inet{n}");
        let s = Self {
            n,
            dir: tempfile::tempdir().expect("tempdir"),
            internet,
        };
        s.cleanup();
        let (host_if, inet_if) = (format!("cldth{n}"), format!("cldti{n}"));
        sh(&format!("ip netns add {}", s.internet));
        sh(&format!(
            "ip link add {host_if} type veth peer name {inet_if} netns {}",
            s.internet
        ));
        sh(&format!("ip addr add {}/30 dev {host_if}", s.host_ip()));
        sh(&format!("ip link set {host_if} up"));
        let inet = &s.internet;
        sh(&format!(
            "ip -n {inet} addr add {}/30 dev {inet_if}",
            s.internet_ip()
        ));
        sh(&format!("ip -n {inet} link set {inet_if} up"));
        sh(&format!("ip -n {inet} link set lo up"));
        Some(s)
    }

    fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(203, 0, 113, self.n * 4 + 1)
    }

    fn internet_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(203, 0, 113, self.n * 4 + 2)
    }

    fn bridge(&self) -> String {
        format!("cldtbr{}", self.n)
    }

    /// Two digits: no site's prefix is part of another's (tests run at
    /// once and look for what is left of their own).
    fn prefix(&self) -> String {
        format!("CLDT{:02}", self.n)
    }

    fn config(&self) -> NodeNetworkConfig {
        NodeNetworkConfig {
            subnet: format!("10.251.{}.0/24", self.n).parse().expect("net"),
            internal: vec!["10.251.0.0/16".parse().expect("net")],
            bridge: self.bridge(),
            cni_bin_dir: "/usr/lib/cni".into(),
            state_dir: self.dir.path().join("state"),
            netns_dir: self.dir.path().join("netns"),
            chain_prefix: self.prefix(),
            service_cidr: Some(format!("10.252.{}.0/24", self.n).parse().expect("net")),
            proxy_port: 7681,
            dns_port: 53,
            isolate_replicas: true,
        }
    }

    /// Serves on the internet at `port`: answers each connection with
    /// `hello from the internet` and counts what it is sent.
    fn serve(&self, port: u16) -> std::sync::mpsc::Receiver<(usize, Duration)> {
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let (tx, rx) = std::sync::mpsc::channel();
        let path = PathBuf::from(format!("/var/run/netns/{}", self.internet));
        let addr = SocketAddr::from((self.internet_ip(), port));
        std::thread::spawn(move || {
            let listener = run_in(&path, move || {
                TcpListener::bind(addr).map_err(|e| e.to_string())
            })
            .expect("listening on the internet");
            ready_tx.send(()).expect("ready");
            for conn in listener.incoming() {
                let Ok(mut c) = conn else { return };
                let tx = tx.clone();
                std::thread::spawn(move || {
                    let _ = c.write_all(b"hello from the internet\n");
                    let started = Instant::now();
                    let mut buf = vec![0; 64 * 1024];
                    let mut total = 0;
                    while let Ok(n) = c.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        total += n;
                    }
                    let _ = tx.send((total, started.elapsed()));
                });
            }
        });
        ready.recv().expect("server started");
        rx
    }

    fn cleanup(&self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "bridge", &self.prefix()])
            .stderr(std::process::Stdio::null())
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.internet])
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &format!("cldth{}", self.n)])
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge()])
            .status();
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        self.cleanup();
        let _ = Command::new("umount")
            .args(["-l", &self.dir.path().join("netns").display().to_string()])
            .status();
    }
}

/// A container id unique to this run (a crashed earlier run may have left
/// rules named after its ids).
#[allow(non_snake_case)]
fn ID(name: &str) -> String {
    format!("{name}-{}", std::process::id())
}

fn request(id: &str) -> AttachRequest {
    AttachRequest {
        container_id: id.into(),
        host_ports: vec![],
        egress: vec![EgressRule::any()],
        bandwidth: Bandwidth::default(),
    }
}

/// Connects from inside `netns` to `to`: the first line it is sent.
fn fetch(netns: &Path, to: SocketAddr) -> Result<String, String> {
    run_in(netns, move || {
        let mut c = TcpStream::connect_timeout(&to, Duration::from_secs(3))
            .map_err(|e| format!("connecting to {to}: {e}"))?;
        c.set_read_timeout(Some(Duration::from_secs(3)))
            .map_err(|e| e.to_string())?;
        let mut line = [0; 64];
        let n = c.read(&mut line).map_err(|e| e.to_string())?;
        Ok(String::from_utf8_lossy(&line[..n]).trim().to_owned())
    })
    .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_reach_the_internet_within_their_egress_policy_and_leave_nothing_behind() {
    let Some(site) = Site::new(1) else { return };
    let _served = site.serve(8080);
    let internet = SocketAddr::from((site.internet_ip(), 8080));
    let net = NodeNetwork::open(site.config()).await.expect("open");

    // A replica with the default policy reaches the internet.
    let a = net
        .attach(&request(&ID("cldt1-a")))
        .await
        .expect("attach a");
    assert!(site.config().subnet.contains(&a.address), "{a:?}");
    let lease = site.dir.path().join("state/ipam/cloudless");
    assert!(
        lease.join(a.address.to_string()).exists(),
        "its address is leased"
    );
    assert_eq!(
        fetch(&a.netns, internet).as_deref(),
        Ok("hello from the internet")
    );

    // One allowed only another network and another port is refused.
    let mut only = request(&ID("cldt1-b"));
    only.egress = vec![
        EgressRule {
            cidr: "192.0.2.0/24".parse().expect("net"),
            ports: vec![],
        },
        EgressRule {
            cidr: format!("{}/32", site.internet_ip()).parse().expect("net"),
            ports: vec![443],
        },
    ];
    let b = net.attach(&only).await.expect("attach b");
    assert_ne!(a.address, b.address);
    let refused = fetch(&b.netns, internet).expect_err("egress refused");
    assert!(refused.contains("connecting"), "{refused}");
    // Its policy opened to the port: allowed.
    only.egress[1].ports.push(8080);
    let b2 = net.attach(&only).await.expect("attach b again");
    assert_eq!(
        (b2.address, b2.kept),
        (b.address, true),
        "re-attaching keeps the address"
    );
    assert_eq!(
        fetch(&b.netns, internet).as_deref(),
        Ok("hello from the internet")
    );

    // Replicas on one node do not reach each other's addresses (the node's
    // firewall refuses their frames, or their bridge ports are isolated:
    // only through their services); the node itself does.
    let a_addr = SocketAddr::from((a.address, 7000));
    let listener = run_in(&a.netns, move || {
        TcpListener::bind(a_addr).map_err(|e| e.to_string())
    })
    .expect("listening in a");
    std::thread::spawn(move || {
        for c in listener.incoming() {
            let Ok(mut c) = c else { return };
            let _ = c.write_all(b"hello from a\n");
        }
    });
    assert!(
        fetch(&b.netns, a_addr).is_err(),
        "b reached a straight over the bridge"
    );
    let mut c = TcpStream::connect_timeout(&a_addr, Duration::from_secs(3)).expect("from the node");
    let mut line = String::new();
    c.read_to_string(&mut line).expect("read");
    assert_eq!(line.trim(), "hello from a");

    // Detached: nothing of either is left.
    net.detach(&ID("cldt1-a")).await.expect("detach a");
    net.detach(&ID("cldt1-b")).await.expect("detach b");
    net.detach(&ID("cldt1-b"))
        .await
        .expect("detaching twice is fine");
    assert_nothing_left(
        &site,
        &[ID("cldt1-a"), ID("cldt1-b")],
        &[a.address, b.address],
    );
    net.uninstall().await.expect("uninstall");
    let rules = iptables_save();
    assert!(!rules.contains(&site.prefix()), "{rules}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_published_port_answers_at_the_nodes_address() {
    let Some(site) = Site::new(2) else { return };
    let net = NodeNetwork::open(site.config()).await.expect("open");
    let mut req = request(&ID("cldt2-web"));
    req.host_ports = vec![HostPort {
        host_port: 18082,
        container_port: 80,
        protocol: Protocol::Tcp,
    }];
    // No egress at all: answers to its published port still go out.
    req.egress = vec![];
    let web = net.attach(&req).await.expect("attach");
    let addr = SocketAddr::from((web.address, 80));
    let listener = run_in(&web.netns, move || {
        TcpListener::bind(addr).map_err(|e| e.to_string())
    })
    .expect("listening in the replica");
    std::thread::spawn(move || {
        for c in listener.incoming() {
            let Ok(mut c) = c else { return };
            let _ = c.write_all(b"hello from the replica\n");
        }
    });
    let published = SocketAddr::from((site.host_ip(), 18082));
    // From the host's own namespace, at its address.
    let mut c = TcpStream::connect_timeout(&published, Duration::from_secs(3))
        .expect("connect from the host");
    let mut line = String::new();
    c.read_to_string(&mut line).expect("read");
    assert_eq!(line.trim(), "hello from the replica");
    // From outside the node (the internet namespace).
    let outside = PathBuf::from(format!("/var/run/netns/{}", site.internet));
    assert_eq!(
        fetch(&outside, published).as_deref(),
        Ok("hello from the replica")
    );
    // A neighbour that routes the replica subnet through the node reaches
    // no replica port directly, published or not.
    sh(&format!(
        "ip -n {} route add {} via {}",
        site.internet,
        site.config().subnet,
        site.host_ip()
    ));
    assert!(
        fetch(&outside, SocketAddr::from((web.address, 80))).is_err(),
        "a replica's own address is not reachable from outside the node"
    );
    net.detach(&ID("cldt2-web")).await.expect("detach");
    assert_nothing_left(&site, &[ID("cldt2-web")], &[web.address]);
    assert!(
        fetch(&outside, published).is_err(),
        "the port is no longer published"
    );
    net.uninstall().await.expect("uninstall");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_restart_keeps_addresses_and_collects_what_is_no_longer_assigned() {
    let Some(site) = Site::new(3) else { return };
    let net = NodeNetwork::open(site.config()).await.expect("open");
    let kept = net
        .attach(&request(&ID("cldt3-kept")))
        .await
        .expect("attach");
    let gone = net
        .attach(&request(&ID("cldt3-gone")))
        .await
        .expect("attach");
    // A process in the namespace holds a socket across the "restart".
    let addr = SocketAddr::from((kept.address, 7000));
    let listener = run_in(&kept.netns, move || {
        TcpListener::bind(addr).map_err(|e| e.to_string())
    })
    .expect("listen");
    drop(net);

    let net = NodeNetwork::open(site.config()).await.expect("open again");
    assert_eq!(
        net.attached().expect("attached"),
        BTreeSet::from([ID("cldt3-gone").to_owned(), ID("cldt3-kept").to_owned()])
    );
    let again = net
        .attach(&request(&ID("cldt3-kept")))
        .await
        .expect("re-attach");
    assert_eq!(
        (&again.netns, again.address, again.kept),
        (&kept.netns, kept.address, true),
        "same namespace and address after a restart"
    );
    assert!(!kept.kept, "made by the first attach");
    std::thread::spawn(move || {
        if let Ok((mut c, _)) = listener.accept() {
            let _ = c.write_all(b"still here\n");
        }
    });
    // From the node (replicas are isolated from each other).
    let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).expect("connect");
    let mut line = String::new();
    c.read_to_string(&mut line).expect("read");
    assert_eq!(line.trim(), "still here");

    let collected = net
        .collect(&BTreeSet::from([ID("cldt3-kept").to_owned()]))
        .await
        .expect("collect");
    assert_eq!(collected, vec![ID("cldt3-gone").to_owned()]);
    assert_nothing_left_but(&site, 1, &[ID("cldt3-gone")], &[gone.address]);
    // Its veth deleted (someone cleaned the host up), the next attach finds
    // the network broken and makes it again: not kept, so a container
    // still running in the old namespace is started again.
    let veths = out("ip", &["-o", "link", "show", "master", &site.bridge()]);
    for v in veths.lines().filter_map(|l| l.split(": ").nth(1)) {
        sh(&format!("ip link del {}", v.split('@').next().unwrap_or(v)));
    }
    let remade = net
        .attach(&request(&ID("cldt3-kept")))
        .await
        .expect("re-attach a broken network");
    assert!(!remade.kept, "{remade:?}");
    assert!(site.config().subnet.contains(&remade.address));
    net.detach(&ID("cldt3-kept")).await.expect("detach");
    assert_nothing_left(&site, &[ID("cldt3-kept")], &[kept.address, remade.address]);
    net.uninstall().await.expect("uninstall");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bandwidth_limit_holds_within_a_fifth() {
    let Some(site) = Site::new(4) else { return };
    let served = site.serve(9000);
    let net = NodeNetwork::open(site.config()).await.expect("open");
    let mut req = request(&ID("cldt4-slow"));
    let limit_bps: u64 = 16_000_000;
    req.bandwidth = Bandwidth {
        ingress_bps: limit_bps,
        egress_bps: limit_bps,
    };
    let slow = net.attach(&req).await.expect("attach");
    // Four seconds' worth of data out of the replica.
    let bytes = usize::try_from(limit_bps / 8 * 4).expect("fits");
    let to = SocketAddr::from((site.internet_ip(), 9000));
    let sent = run_in(&slow.netns, move || {
        let mut c =
            TcpStream::connect_timeout(&to, Duration::from_secs(3)).map_err(|e| e.to_string())?;
        let chunk = vec![7u8; 64 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len());
            c.write_all(&chunk[..n]).map_err(|e| e.to_string())?;
            left -= n;
        }
        c.shutdown(std::net::Shutdown::Write)
            .map_err(|e| e.to_string())?;
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
        Ok(())
    });
    sent.expect("sent");
    let (got, took) = served
        .recv_timeout(Duration::from_secs(30))
        .expect("the server counted");
    assert_eq!(got, bytes);
    let rate = got as f64 * 8.0 / took.as_secs_f64();
    let ratio = rate / limit_bps as f64;
    eprintln!("egress: {rate:.0} bit/s against a limit of {limit_bps} ({ratio:.2})");
    assert!(
        (0.8..=1.2).contains(&ratio),
        "rate {rate:.0} bit/s, ratio {ratio:.2}"
    );
    net.detach(&ID("cldt4-slow")).await.expect("detach");
    assert_nothing_left(&site, &[ID("cldt4-slow")], &[slow.address]);
    net.uninstall().await.expect("uninstall");
}

/// No veth on the bridge, rule, address lease or namespace of `ids` (at
/// `addrs`) is left.
fn assert_nothing_left(site: &Site, ids: &[String], addrs: &[Ipv4Addr]) {
    assert_nothing_left_but(site, 0, ids, addrs);
}

/// As [`assert_nothing_left`] while `attached` other replicas keep their
/// veths.
fn assert_nothing_left_but(site: &Site, attached: usize, ids: &[String], addrs: &[Ipv4Addr]) {
    let ports = out("ip", &["-o", "link", "show", "master", &site.bridge()]);
    assert_eq!(
        ports.lines().count(),
        attached,
        "veths on the bridge: {ports}"
    );
    let rules = iptables_save();
    for id in ids {
        assert!(!rules.contains(id.as_str()), "rules of {id} left:\n{rules}");
        assert!(
            !site.dir.path().join("netns").join(id).exists(),
            "namespace of {id} left"
        );
        assert!(
            !site
                .dir
                .path()
                .join("state/cni")
                .join(format!("{id}.json"))
                .exists(),
            "record of {id} left"
        );
    }
    for a in addrs {
        let a = a.to_string();
        let lease = site.dir.path().join("state/ipam/cloudless").join(&a);
        assert!(!lease.exists(), "lease of {a} left");
        let mentions: Vec<&str> = rules
            .lines()
            .filter(|l| l.split([' ', '/']).any(|w| w == a))
            .collect();
        assert!(mentions.is_empty(), "rules for {a} left: {mentions:?}");
    }
}

fn iptables_save() -> String {
    out("iptables-save", &[])
}

fn out(cmd: &str, args: &[&str]) -> String {
    let o = Command::new(cmd).args(args).output().expect("runs");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn sh(cmd: &str) {
    let ok = Command::new("sh")
        .args(["-c", cmd])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "{cmd} failed");
}

/// Why this test cannot run here, if it cannot.
fn cannot_run() -> Option<String> {
    if !nix_is_root() {
        return Some("needs root (network namespaces, iptables)".into());
    }
    for need in [
        "/usr/lib/cni/bridge",
        "/usr/lib/cni/portmap",
        "/usr/lib/cni/bandwidth",
    ] {
        if !Path::new(need).exists() {
            return Some(format!(
                "{need} missing (apt-get install containernetworking-plugins)"
            ));
        }
    }
    if Command::new("iptables").arg("-V").output().is_err() {
        return Some("iptables missing".into());
    }
    None
}

fn nix_is_root() -> bool {
    out("id", &["-u"]).trim() == "0"
}

/// Reports a test that cannot run here: under CI (`CI` set) that is a
/// failure; elsewhere it is printed and listed in `$CLOUDLESS_SKIP_LOG`, so
/// the summary counts it as skipped, not passed.
fn skip_test(message: String) {
    assert!(
        std::env::var_os("CI").is_none(),
        "cannot run in CI: {message}"
    );
    eprintln!("\n!!!!!!!! SKIPPED {message} !!!!!!!!\n");
    if let Some(path) = std::env::var_os("CLOUDLESS_SKIP_LOG") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{message}");
        }
    }
}

/// Fails every dial (the test has no other node).
struct NoRemote;

impl cloudless_network::proxy::Dialer for NoRemote {
    fn dial<'a>(
        &'a self,
        e: &'a cloudless_network::services::Endpoint,
        _port: u16,
        _caller: &'a cloudless_network::proxy::Caller,
    ) -> cloudless_network::proxy::DialFuture<'a> {
        Box::pin(async move { Err(format!("{} is on another node", e.replica_id)) })
    }
}

/// A replica at `netns`/`addr` answering each connection with `name`,
/// holding it open until the client closes.
fn serve_name(netns: &Path, addr: SocketAddr, name: &str) {
    let listener = run_in(netns, move || {
        TcpListener::bind(addr).map_err(|e| e.to_string())
    })
    .expect("listen in the replica");
    let name = name.to_owned();
    std::thread::spawn(move || {
        for c in listener.incoming() {
            let Ok(mut c) = c else { return };
            let name = name.clone();
            std::thread::spawn(move || {
                let _ = c.write_all(format!("{name}\n").as_bytes());
                let mut buf = [0u8; 64];
                while matches!(c.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_vip_and_name_reach_its_replicas_on_this_node() {
    use cloudless_network::balancer::Here;
    use cloudless_network::proxy::{BridgeDialer, Caller, ServiceProxy};
    use cloudless_network::services::{
        Endpoint, LoadBalancing, Service, ServicePort, ServiceTable, SharedServices,
    };
    let Some(site) = Site::new(5) else { return };
    let net = NodeNetwork::open(site.config()).await.expect("open");
    let (s1, s2, client, other) = (
        ID("cldt5-api1"),
        ID("cldt5-api2"),
        ID("cldt5-web"),
        ID("cldt5-x"),
    );
    let a1 = net.attach(&request(&s1)).await.expect("attach");
    let a2 = net.attach(&request(&s2)).await.expect("attach");
    let c = net.attach(&request(&client)).await.expect("attach");
    let o = net.attach(&request(&other)).await.expect("attach");
    serve_name(&a1.netns, SocketAddr::from((a1.address, 8080)), "api-1");
    serve_name(&a2.netns, SocketAddr::from((a2.address, 8080)), "api-2");
    let vip = Ipv4Addr::new(10, 252, 5, 10);
    let endpoint = |id: &str, a: Ipv4Addr| Endpoint {
        replica_id: id.to_owned(),
        node_id: "n1".into(),
        address: Some(a),
        zone: "a".into(),
        region: String::new(),
    };
    let service = |endpoints: Vec<Endpoint>| Service {
        namespace: "default".into(),
        name: "api".into(),
        vip,
        ports: vec![ServicePort {
            port: 8080,
            udp: false,
        }],
        policy: LoadBalancing::RoundRobin,
        allow_from: vec![],
        weights: Default::default(),
        endpoints,
    };
    let services = SharedServices::default();
    services.set(ServiceTable::new(
        "cloudless.local",
        vec![service(vec![
            endpoint(&s1, a1.address),
            endpoint(&s2, a2.address),
        ])],
    ));
    let (client_ip, other_ip) = (c.address, o.address);
    let proxy = ServiceProxy::new(
        services.clone(),
        Here {
            node_id: "n1".into(),
            zone: "a".into(),
            region: String::new(),
        },
        std::sync::Arc::new(BridgeDialer {
            node_id: "n1".into(),
            remote: NoRemote,
        }),
        std::sync::Arc::new(move |ip| {
            if ip == std::net::IpAddr::V4(client_ip) {
                Some(Caller::Workload {
                    namespace: "default".into(),
                    workload: "web".into(),
                })
            } else if ip == std::net::IpAddr::V4(other_ip) {
                Some(Caller::Workload {
                    namespace: "other".into(),
                    workload: "x".into(),
                })
            } else {
                None
            }
        }),
    );
    let gw = net.gateway();
    let listener = tokio::net::TcpListener::bind((gw, 7681))
        .await
        .expect("proxy listens");
    let proxy_task = tokio::spawn(proxy.clone().serve_vips(listener));
    let upstreams = cloudless_network::dns::upstreams(
        &std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
    );
    let resolver = cloudless_network::dns::Resolver::new(services.clone(), upstreams);
    let dns_tasks = resolver
        .serve(SocketAddr::from((gw, 53)))
        .await
        .expect("resolver");

    // The name resolves to the VIP from inside the replica's namespace.
    let resolved = run_in(&c.netns, move || {
        dns_a(SocketAddr::from((gw, 53)), "api.default.cloudless.local")
    })
    .expect("dns");
    assert_eq!(resolved, Some(vip));

    // Connections to the VIP reach both replicas, in turn.
    let to = SocketAddr::from((vip, 8080));
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..10 {
        let name = fetch(&c.netns, to).expect("through the VIP");
        *seen.entry(name).or_insert(0) += 1;
    }
    assert_eq!(
        seen,
        [("api-1".to_owned(), 5), ("api-2".to_owned(), 5)].into()
    );

    // Another namespace is not admitted (no allowFrom).
    assert!(
        fetch(&o.netns, to).map_or(true, |got| got.is_empty()),
        "refused"
    );

    // A connection held to api-1 is cut when api-1 leaves the service, and
    // every new one goes to api-2.
    let held = run_in(&c.netns, move || {
        TcpStream::connect_timeout(&to, Duration::from_secs(3)).map_err(|e| e.to_string())
    })
    .expect("connect");
    let mut held = held;
    let mut line = [0u8; 16];
    let n = held.read(&mut line).expect("first line");
    let first = String::from_utf8_lossy(&line[..n]).trim().to_owned();
    let (gone, stays) = if first == "api-1" {
        (&s1, (&s2, a2.address))
    } else {
        (&s2, (&s1, a1.address))
    };
    services.set(ServiceTable::new(
        "cloudless.local",
        vec![service(vec![endpoint(stays.0, stays.1)])],
    ));
    held.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    assert!(
        matches!(held.read(&mut line), Ok(0)),
        "the held connection to {gone} is cut"
    );
    for _ in 0..5 {
        let name = fetch(&c.netns, to).expect("through the VIP");
        assert_ne!(name, first, "no connection goes to the endpoint that left");
    }

    proxy_task.abort();
    for t in dns_tasks {
        t.abort();
    }
    for id in [&s1, &s2, &client, &other] {
        net.detach(id).await.expect("detach");
    }
    net.uninstall().await.expect("uninstall");
    let rules = iptables_save();
    assert!(!rules.contains(&site.prefix()), "{rules}");
}

/// Asks `server` (UDP) for the A record of `name`.
fn dns_a(server: SocketAddr, name: &str) -> Result<Option<Ipv4Addr>, String> {
    // A hand-made query: id 1, recursion desired, one question, type A.
    let mut q = vec![0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(u8::try_from(label.len()).map_err(|e| e.to_string())?);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let s = std::net::UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .map_err(|e| e.to_string())?;
    s.send_to(&q, server).map_err(|e| e.to_string())?;
    let mut buf = [0u8; 512];
    let n = s.recv(&mut buf).map_err(|e| e.to_string())?;
    // The last four bytes of a one-answer A reply are the address.
    let answers = u16::from_be_bytes([buf[6], buf[7]]);
    Ok((answers == 1 && n >= 4)
        .then(|| Ipv4Addr::new(buf[n - 4], buf[n - 3], buf[n - 2], buf[n - 1])))
}

#[tokio::test(flavor = "multi_thread")]
async fn policies_hold_over_real_connections_through_the_vip() {
    use cloudless_network::balancer::Here;
    use cloudless_network::proxy::{Caller, ServiceProxy};
    use cloudless_network::services::{
        Endpoint, LoadBalancing, Service, ServicePort, ServiceTable, SharedServices,
    };
    let Some(site) = Site::new(6) else { return };
    let net = NodeNetwork::open(site.config()).await.expect("open");
    // Three replicas "in" zones a, a and b (all on this node), a caller in a.
    let names = [
        ID("cldt6-a1"),
        ID("cldt6-a2"),
        ID("cldt6-b1"),
        ID("cldt6-web"),
    ];
    let mut atts = Vec::new();
    for n in &names {
        atts.push(net.attach(&request(n)).await.expect("attach"));
    }
    for (i, zone_name) in ["a1", "a2", "b1"].iter().enumerate() {
        serve_name(
            &atts[i].netns,
            SocketAddr::from((atts[i].address, 8080)),
            zone_name,
        );
    }
    let vip = Ipv4Addr::new(10, 252, 6, 10);
    let service = |policy, weights: &[(&str, u32)]| Service {
        namespace: "default".into(),
        name: "api".into(),
        vip,
        ports: vec![ServicePort {
            port: 8080,
            udp: false,
        }],
        policy,
        allow_from: vec![],
        weights: weights.iter().map(|(z, w)| ((*z).to_owned(), *w)).collect(),
        endpoints: ["a", "a", "b"]
            .iter()
            .enumerate()
            .map(|(i, zone)| Endpoint {
                replica_id: names[i].clone(),
                // Not this node: locality must choose by zone.
                node_id: format!("n{i}"),
                address: Some(atts[i].address),
                zone: (*zone).into(),
                region: "eu".into(),
            })
            .collect(),
    };
    let services = SharedServices::default();
    let caller_ip = atts[3].address;
    let proxy = ServiceProxy::new(
        services.clone(),
        Here {
            node_id: "here".into(),
            zone: "a".into(),
            region: "eu".into(),
        },
        // Every endpoint answers over the bridge (all run on this host).
        std::sync::Arc::new(LocalDialer),
        std::sync::Arc::new(move |ip| {
            (ip == std::net::IpAddr::V4(caller_ip)).then(|| Caller::Workload {
                namespace: "default".into(),
                workload: "web".into(),
            })
        }),
    );
    let listener = tokio::net::TcpListener::bind((net.gateway(), 7681))
        .await
        .expect("listen");
    let task = tokio::spawn(proxy.clone().serve_vips(listener));
    let to = SocketAddr::from((vip, 8080));
    let web = atts[3].netns.clone();
    let count = |n: usize| {
        let mut seen = std::collections::BTreeMap::<String, usize>::new();
        for _ in 0..n {
            let got = fetch(&web, to).expect("through the VIP");
            *seen.entry(got).or_default() += 1;
        }
        seen
    };

    // Locality: zone-a callers stay on zone-a replicas while one is Ready.
    services.set(ServiceTable::new(
        "cloudless.local",
        vec![service(LoadBalancing::Locality, &[])],
    ));
    let seen = count(40);
    assert_eq!(seen.get("b1"), None, "{seen:?}");
    assert_eq!((seen["a1"], seen["a2"]), (20, 20));
    // With no zone-a replica Ready, they go to zone b.
    let mut only_b = service(LoadBalancing::Locality, &[]);
    only_b.endpoints.retain(|e| e.zone == "b");
    services.set(ServiceTable::new("cloudless.local", vec![only_b]));
    assert_eq!(count(10), [("b1".to_owned(), 10)].into());

    // Weighted: a:b = 1:2 per zone weight (a1, a2 weigh 1 each, b1 2)
    // over 1,000 connections, within 10%.
    services.set(ServiceTable::new(
        "cloudless.local",
        vec![service(LoadBalancing::Weighted, &[("a", 1), ("b", 2)])],
    ));
    let seen = count(1000);
    for (name, want) in [("a1", 250.0), ("a2", 250.0), ("b1", 500.0)] {
        let got = seen.get(name).copied().unwrap_or(0) as f64;
        assert!(
            (got - want).abs() <= want * 0.1,
            "{name}: {got} of 1000, want {want}: {seen:?}"
        );
    }

    // Least connections: 30 long-lived connections spread within one of even.
    services.set(ServiceTable::new(
        "cloudless.local",
        vec![service(LoadBalancing::LeastConnections, &[])],
    ));
    let mut held = Vec::new();
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..30 {
        let (name, conn) = run_in(&web, move || {
            let mut c = TcpStream::connect_timeout(&to, Duration::from_secs(3))
                .map_err(|e| e.to_string())?;
            c.set_read_timeout(Some(Duration::from_secs(3)))
                .map_err(|e| e.to_string())?;
            let mut line = [0u8; 32];
            let n = c.read(&mut line).map_err(|e| e.to_string())?;
            Ok((String::from_utf8_lossy(&line[..n]).trim().to_owned(), c))
        })
        .expect("connect");
        *seen.entry(name).or_default() += 1;
        held.push(conn);
        // The proxy counts it once it has dialed (before the first byte).
    }
    let (min, max) = (seen.values().min().copied(), seen.values().max().copied());
    assert!(max.zip(min).is_some_and(|(a, b)| a - b <= 1), "{seen:?}");
    assert_eq!(proxy.open_connections().values().sum::<usize>(), 30);
    drop(held);

    task.abort();
    for n in &names {
        net.detach(n).await.expect("detach");
    }
    net.uninstall().await.expect("uninstall");
}

/// Dials every endpoint at its address (all run on this host).
struct LocalDialer;

impl cloudless_network::proxy::Dialer for LocalDialer {
    fn dial<'a>(
        &'a self,
        e: &'a cloudless_network::services::Endpoint,
        port: u16,
        _caller: &'a cloudless_network::proxy::Caller,
    ) -> cloudless_network::proxy::DialFuture<'a> {
        Box::pin(async move {
            let a = e.address.ok_or("no address")?;
            let s = tokio::net::TcpStream::connect((a, port))
                .await
                .map_err(|err| err.to_string())?;
            Ok(cloudless_network::proxy::Dialed::Tcp(s))
        })
    }
}

/// Runs `cmd` in the namespace at `netns`; its stdout.
fn in_netns(netns: &Path, cmd: &str) -> String {
    out(
        "nsenter",
        &[&format!("--net={}", netns.display()), "sh", "-c", cmd],
    )
}

/// Sends one UDP datagram from `from` (an address of the namespace at
/// `netns`) to `to`.
fn send_udp(netns: &Path, from: Ipv4Addr, to: SocketAddr) {
    run_in(netns, move || {
        let s = std::net::UdpSocket::bind((from, 0)).map_err(|e| format!("bind {from}: {e}"))?;
        s.send_to(b"who am i", to).map_err(|e| e.to_string())?;
        Ok(())
    })
    .expect("sending from the replica");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_cannot_claim_a_neighbours_address_on_the_bridge() {
    let Some(site) = Site::new(7) else { return };
    let net = NodeNetwork::open(site.config()).await.expect("open");
    assert!(
        net.locks_addresses(),
        "this host's nftables has the bridge family (Debian: apt-get install nftables)"
    );
    let (ida, idb) = (ID("cldt7-a"), ID("cldt7-b"));
    let a = net.attach(&request(&ida)).await.expect("attach a");
    let b = net.attach(&request(&idb)).await.expect("attach b");
    let gw = net.gateway();
    // The node listens where replicas may reach it (its resolver's port).
    let node = std::net::UdpSocket::bind((gw, 53)).expect("bind on the gateway");
    node.set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    let receive = || {
        let mut buf = [0u8; 64];
        node.recv_from(&mut buf).ok().map(|(_, from)| from.ip())
    };
    let bridge_mac = out(
        "cat",
        &[&format!("/sys/class/net/{}/address", site.bridge())],
    );
    let a_mac = in_netns(&a.netns, "ip -br link show eth0 | awk '{print $3}'");
    assert!(!a_mac.trim().is_empty(), "replica a's MAC");

    // A datagram from a's own address arrives, from it.
    send_udp(&a.netns, a.address, SocketAddr::from((gw, 53)));
    assert_eq!(receive(), Some(std::net::IpAddr::V4(a.address)));

    // a takes b's address as well. With the gateway's MAC known (no ARP),
    // a datagram from b's address leaves a's port and is dropped there.
    in_netns(
        &a.netns,
        &format!(
            "ip addr add {}/32 dev eth0 && ip neigh replace {gw} lladdr {} dev eth0 nud permanent",
            b.address,
            bridge_mac.trim()
        ),
    );
    send_udp(&a.netns, b.address, SocketAddr::from((gw, 53)));
    assert_eq!(receive(), None, "a datagram claiming b's address arrived");

    // Asking for the gateway's MAC in b's name (an ARP request whose sender
    // is b's address and a's MAC) teaches the node nothing.
    sh(&format!(
        "ip neigh del {} dev {} 2>/dev/null; true",
        b.address,
        site.bridge()
    ));
    in_netns(&a.netns, &format!("ip neigh del {gw} dev eth0"));
    send_udp(&a.netns, b.address, SocketAddr::from((gw, 53)));
    std::thread::sleep(Duration::from_millis(500));
    let learned = out(
        "ip",
        &[
            "neigh",
            "show",
            &b.address.to_string(),
            "dev",
            &site.bridge(),
        ],
    );
    assert!(
        !learned.contains(a_mac.trim()),
        "the node took a's MAC for b's address: {learned}"
    );
    assert_eq!(receive(), None);

    // b itself still reaches the node.
    send_udp(&b.netns, b.address, SocketAddr::from((gw, 53)));
    assert_eq!(receive(), Some(std::net::IpAddr::V4(b.address)));

    // Detached, the locks are gone too; a's extra address does not stop
    // its delete (the bridge plugin would fail on it).
    net.detach(&ida).await.expect("detach a");
    net.detach(&idb).await.expect("detach b");
    let table = site.prefix();
    let listed = out("nft", &["list", "table", "bridge", &table]);
    assert!(
        !listed.contains("jump p_"),
        "a lock is left after detach: {listed}"
    );
    net.uninstall().await.expect("uninstall");
    assert!(
        !out("nft", &["list", "tables"]).contains(&format!("bridge {table}")),
        "the table is left after uninstall"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_kernel_path_serves_admitted_callers_and_cuts_an_endpoint_that_left() {
    use cloudless_network::fastpath;
    use cloudless_network::proxy::Caller;
    use cloudless_network::services::{
        Endpoint, LoadBalancing, Service, ServicePort, ServiceTable,
    };
    let Some(site) = Site::new(8) else { return };
    let net = NodeNetwork::open(site.config()).await.expect("open");
    let (server, client, other) = (ID("cldt8-api"), ID("cldt8-web"), ID("cldt8-x"));
    let s = net.attach(&request(&server)).await.expect("attach");
    let c = net.attach(&request(&client)).await.expect("attach");
    let o = net.attach(&request(&other)).await.expect("attach");
    serve_name(&s.netns, SocketAddr::from((s.address, 8080)), "api");
    let vip = Ipv4Addr::new(10, 252, 8, 10);
    let table = |endpoints: Vec<Endpoint>| {
        ServiceTable::new(
            "cloudless.local",
            vec![Service {
                namespace: "shop".into(),
                name: "api".into(),
                vip,
                ports: vec![ServicePort {
                    port: 8080,
                    udp: false,
                }],
                policy: LoadBalancing::RoundRobin,
                allow_from: vec![],
                weights: Default::default(),
                endpoints,
            }],
        )
    };
    let with_api = table(vec![Endpoint {
        replica_id: server.clone(),
        node_id: "n1".into(),
        address: Some(s.address),
        zone: String::new(),
        region: String::new(),
    }]);
    let callers = [
        (c.address, "shop"), // the service's own namespace
        (o.address, "other"),
    ]
    .into_iter()
    .map(|(a, ns)| {
        (
            std::net::IpAddr::V4(a),
            Caller::Workload {
                namespace: ns.into(),
                workload: "w".into(),
            },
        )
    })
    .collect();
    let routes = fastpath::routes(&with_api, &callers, "n1");
    net.set_fast_routes(&routes).await.expect("kernel path");

    // No proxy runs here: the kernel alone carries the admitted caller.
    let to = SocketAddr::from((vip, 8080));
    assert_eq!(fetch(&c.netns, to).as_deref(), Ok("api"));
    // Another namespace falls through to the proxy (absent here): refused.
    assert!(
        fetch(&o.netns, to).is_err(),
        "another namespace got through"
    );

    // A connection open while its endpoint leaves is cut within 2 s.
    let mut open = run_in(&c.netns, move || {
        let mut conn =
            TcpStream::connect_timeout(&to, Duration::from_secs(3)).map_err(|e| e.to_string())?;
        let mut line = [0u8; 4];
        conn.read_exact(&mut line).map_err(|e| e.to_string())?;
        Ok(conn)
    })
    .expect("an open connection");
    let empty = table(vec![]);
    let left = fastpath::routes(&empty, &callers, "n1");
    net.set_fast_routes(&left).await.expect("kernel path");
    let cuts = fastpath::to_cut(&routes, &empty, &callers, "n1");
    assert_eq!(cuts.len(), 1, "{cuts:?}");
    let started = Instant::now();
    fastpath::cut(&cuts).await;
    open.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let _ = open.write_all(b"still there?");
    let mut buf = [0u8; 16];
    let read = open.read(&mut buf);
    assert!(
        matches!(read, Ok(0) | Err(_)) && started.elapsed() < Duration::from_secs(2),
        "the connection outlived its endpoint: {read:?} after {:?}",
        started.elapsed()
    );
    assert!(
        !matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut),
        "no answer instead of a cut: {read:?}"
    );

    for id in [&server, &client, &other] {
        net.detach(id).await.expect("detach");
    }
    net.uninstall().await.expect("uninstall");
    let nat = out("iptables-save", &["-t", "nat"]);
    assert!(
        !nat.contains(&format!("{}-", site.prefix())),
        "kernel path chains left:\n{nat}"
    );
}

/// A UDP server in replica `netns` at `addr` answering each datagram with
/// `<name>:` and the datagram.
fn serve_udp_name(netns: &Path, addr: SocketAddr, name: &str) {
    let socket = run_in(netns, move || {
        std::net::UdpSocket::bind(addr).map_err(|e| e.to_string())
    })
    .expect("bind in the replica");
    let name = name.to_owned();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            let mut answer = format!("{name}:").into_bytes();
            answer.extend_from_slice(&buf[..n]);
            let _ = socket.send_to(&answer, from);
        }
    });
}

/// A UDP socket in `netns` connected to `to` (it takes datagrams from `to`
/// only: an answer from any other source is not seen).
fn udp_caller(netns: &Path, to: SocketAddr) -> std::net::UdpSocket {
    run_in(netns, move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
        s.connect(to).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .map_err(|e| e.to_string())?;
        Ok(s)
    })
    .expect("a UDP socket in the replica")
}

/// Sends `msg` on `s`; the answer, if one came within half a second.
fn udp_ask(s: &std::net::UdpSocket, msg: &str) -> Option<String> {
    s.send(msg.as_bytes()).ok()?;
    let mut buf = [0u8; 2048];
    let n = s.recv(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Two UDP servers answering on port 5353 as `dns-1` and `dns-2`, a caller
/// and a replica of another namespace, attached to one test's node.
struct UdpSite {
    /// The servers', the caller's and the other replica's ids.
    ids: [String; 4],
    a1: cloudless_network::Attachment,
    a2: cloudless_network::Attachment,
    c: cloudless_network::Attachment,
    o: cloudless_network::Attachment,
}

impl UdpSite {
    /// Attaches them to `net`, their ids named after `tag`.
    async fn attach(net: &NodeNetwork, tag: &str) -> Self {
        let ids = ["dns1", "dns2", "web", "x"].map(|n| ID(&format!("{tag}-{n}")));
        let mut attached = Vec::new();
        for id in &ids {
            attached.push(net.attach(&request(id)).await.expect("attach"));
        }
        let [a1, a2, c, o]: [cloudless_network::Attachment; 4] = attached.try_into().expect("four");
        serve_udp_name(&a1.netns, SocketAddr::from((a1.address, 5353)), "dns-1");
        serve_udp_name(&a2.netns, SocketAddr::from((a2.address, 5353)), "dns-2");
        Self { ids, a1, a2, c, o }
    }
}

/// Replica `id` at `a` as an endpoint on node `n1`.
fn n1_endpoint(id: &str, a: Ipv4Addr) -> cloudless_network::services::Endpoint {
    cloudless_network::services::Endpoint {
        replica_id: id.to_owned(),
        node_id: "n1".into(),
        address: Some(a),
        zone: String::new(),
        region: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_udp_service_port_answers_from_its_vip_through_the_proxy() {
    use cloudless_network::balancer::Here;
    use cloudless_network::fastpath::{cut, Cut};
    use cloudless_network::firewall::UdpRoute;
    use cloudless_network::proxy::{BridgeDialer, Caller, ServiceProxy};
    use cloudless_network::services::{
        Endpoint, LoadBalancing, Service, ServicePort, ServiceTable, SharedServices,
    };
    let Some(site) = Site::new(9) else { return };
    let net = NodeNetwork::open(site.config()).await.expect("open");
    let UdpSite {
        ids: [s1, s2, client, other],
        a1,
        a2,
        c,
        o,
    } = UdpSite::attach(&net, "cldt9").await;
    let vip = Ipv4Addr::new(10, 252, 9, 10);
    let endpoint = n1_endpoint;
    let service = |endpoints: Vec<Endpoint>| Service {
        namespace: "default".into(),
        name: "dns".into(),
        vip,
        ports: vec![ServicePort {
            port: 5353,
            udp: true,
        }],
        policy: LoadBalancing::RoundRobin,
        allow_from: vec![],
        weights: Default::default(),
        endpoints,
    };
    let services = SharedServices::default();
    services.set(ServiceTable::new(
        "cloudless.local",
        vec![service(vec![
            endpoint(&s1, a1.address),
            endpoint(&s2, a2.address),
        ])],
    ));
    let (client_ip, other_ip) = (c.address, o.address);
    let proxy = ServiceProxy::new(
        services.clone(),
        Here {
            node_id: "n1".into(),
            ..Here::default()
        },
        std::sync::Arc::new(BridgeDialer {
            node_id: "n1".into(),
            remote: NoRemote,
        }),
        std::sync::Arc::new(move |ip| {
            let namespace = if ip == std::net::IpAddr::V4(client_ip) {
                "default"
            } else if ip == std::net::IpAddr::V4(other_ip) {
                "other"
            } else {
                return None;
            };
            Some(Caller::Workload {
                namespace: namespace.into(),
                workload: "caller".into(),
            })
        }),
    );
    let gw = net.gateway();
    let serve = |proxy: std::sync::Arc<ServiceProxy>| async move {
        let socket = tokio::net::UdpSocket::bind((gw, 0)).await.expect("bind");
        let Ok(SocketAddr::V4(at)) = socket.local_addr() else {
            panic!("an IPv4 socket");
        };
        (at, tokio::spawn(proxy.serve_udp(socket, vip, 5353)))
    };
    let (at, first_socket) = serve(proxy.clone()).await;
    net.set_udp_routes(&[UdpRoute {
        vip,
        port: 5353,
        to: at,
    }])
    .await
    .expect("redirect");

    // Two callers' flows go to the two replicas, each answered from the
    // VIP (the sockets are connected to it), each flow kept on its replica.
    let to = SocketAddr::from((vip, 5353));
    let (one, two) = (udp_caller(&c.netns, to), udp_caller(&c.netns, to));
    let first = udp_ask(&one, "a").expect("an answer from the VIP");
    let second = udp_ask(&two, "a").expect("an answer from the VIP");
    assert_ne!(first[..6], second[..6], "{first} {second}");
    for i in 0..10 {
        let msg = format!("q{i}");
        assert_eq!(udp_ask(&one, &msg), Some(format!("{}{msg}", &first[..6])));
        assert_eq!(udp_ask(&two, &msg), Some(format!("{}{msg}", &second[..6])));
    }

    // Another namespace is not admitted: no answer.
    let outsider = udp_caller(&o.netns, to);
    assert_eq!(udp_ask(&outsider, "a"), None);

    // The proxy's socket changes (as after an agent restart): once the
    // redirect is rewritten and the old mappings forgotten, the same caller
    // socket (the same mapping so far) is answered again.
    first_socket.abort();
    let (at, _second_socket) = serve(proxy.clone()).await;
    net.set_udp_routes(&[UdpRoute {
        vip,
        port: 5353,
        to: at,
    }])
    .await
    .expect("redirect");
    cut(&[Cut::Udp { vip, port: 5353 }]).await;
    let again = udp_ask(&one, "b").expect("an answer after the change");
    assert!(again.ends_with(":b"), "{again}");

    // When a replica leaves the service, a flow on it moves within a second.
    let mine = udp_ask(&one, "c").expect("an answer");
    let (gone, stays) = if mine.starts_with("dns-1") {
        ("dns-1", endpoint(&s2, a2.address))
    } else {
        ("dns-2", endpoint(&s1, a1.address))
    };
    services.set(ServiceTable::new(
        "cloudless.local",
        vec![service(vec![stays])],
    ));
    let left = Instant::now();
    loop {
        match udp_ask(&one, "d") {
            Some(a) if !a.starts_with(gone) => break,
            answer => assert!(
                left.elapsed() < Duration::from_secs(1),
                "{answer:?} a second after {gone} left"
            ),
        }
    }

    net.set_udp_routes(&[]).await.expect("no redirects");
    for id in [&s1, &s2, &client, &other] {
        net.detach(id).await.expect("detach");
    }
    net.uninstall().await.expect("uninstall");
    let rules = iptables_save();
    assert!(!rules.contains(&site.prefix()), "{rules}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_udp_port_served_here_takes_the_kernel_path_and_a_mapping_to_an_endpoint_that_left_is_cut(
) {
    use cloudless_network::fastpath;
    use cloudless_network::proxy::Caller;
    use cloudless_network::services::{
        Endpoint, LoadBalancing, Service, ServicePort, ServiceTable,
    };
    let Some(site) = Site::new(10) else { return };
    let net = NodeNetwork::open(site.config()).await.expect("open");
    let UdpSite {
        ids: [s1, s2, client, other],
        a1,
        a2,
        c,
        o,
    } = UdpSite::attach(&net, "cldt10").await;
    let vip = Ipv4Addr::new(10, 252, 10, 10);
    let endpoint = n1_endpoint;
    let table = |endpoints: Vec<Endpoint>| {
        ServiceTable::new(
            "cloudless.local",
            vec![Service {
                namespace: "default".into(),
                name: "dns".into(),
                vip,
                ports: vec![ServicePort {
                    port: 5353,
                    udp: true,
                }],
                policy: LoadBalancing::RoundRobin,
                allow_from: vec![],
                weights: Default::default(),
                endpoints,
            }],
        )
    };
    let both = table(vec![endpoint(&s1, a1.address), endpoint(&s2, a2.address)]);
    let callers = [(c.address, "default"), (o.address, "other")]
        .into_iter()
        .map(|(a, ns)| {
            (
                std::net::IpAddr::V4(a),
                Caller::Workload {
                    namespace: ns.into(),
                    workload: "w".into(),
                },
            )
        })
        .collect();
    let routes = fastpath::routes(&both, &callers, "n1");
    assert!(routes.iter().any(|r| r.udp), "{routes:?}");
    net.set_fast_routes(&routes).await.expect("kernel path");

    // No proxy and no redirect to one: the kernel alone answers the
    // admitted caller, from the VIP (the sockets are connected to it).
    // Each socket's mapping holds one endpoint; mappings spread over both.
    let to = SocketAddr::from((vip, 5353));
    let mut seen = BTreeSet::new();
    let mut sockets = Vec::new();
    for _ in 0..20 {
        let s = udp_caller(&c.netns, to);
        let first = udp_ask(&s, "a").expect("an answer from the VIP");
        for i in 0..3 {
            let msg = format!("q{i}");
            assert_eq!(udp_ask(&s, &msg), Some(format!("{}{msg}", &first[..6])));
        }
        seen.insert(first[..5].to_owned());
        sockets.push((s, first[..5].to_owned()));
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen.len(), 2, "20 mappings all went to {seen:?}");
    // Another namespace has no rule (and no proxy runs here): no answer.
    let outsider = udp_caller(&o.netns, to);
    assert_eq!(udp_ask(&outsider, "a"), None);

    // dns-1 leaves the service (it still runs, as a replica failing its
    // readiness does): its rules go, its mappings are cut, and the sockets
    // that were answered by it are answered by dns-2 at once.
    let after = table(vec![endpoint(&s2, a2.address)]);
    let left = fastpath::routes(&after, &callers, "n1");
    net.set_fast_routes(&left).await.expect("kernel path");
    let cuts = fastpath::to_cut(&routes, &after, &callers, "n1");
    assert_eq!(
        cuts,
        [fastpath::Cut::Endpoint {
            vip,
            port: 5353,
            udp: true,
            endpoint: a1.address
        }]
    );
    fastpath::cut(&cuts).await;
    for (s, was) in &sockets {
        let answer = udp_ask(s, "b");
        assert_eq!(
            answer.as_deref(),
            Some("dns-2:b"),
            "a socket answered by {was} before dns-1 left"
        );
    }

    for id in [&s1, &s2, &client, &other] {
        net.detach(id).await.expect("detach");
    }
    net.uninstall().await.expect("uninstall");
    let rules = iptables_save();
    assert!(!rules.contains(&site.prefix()), "{rules}");
}
