//! Container networking end to end with the real binaries (3 coordinators,
//! 2 agents, containerd, the CNI plugins, iptables): every replica gets an
//! address from its node's subnet, reaches "the internet" (a server in a
//! network namespace of its own) through the node within its egress
//! policy, publishes a port on its node (a taken host port sends the next
//! workload elsewhere, then leaves it unplaced with the reason), keeps its
//! address across an agent restart, and leaves no veth, rule or lease
//! behind once deleted. Needs root; skips loudly otherwise.

use std::io::Read as _;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use cloudless_proto::v1 as pb;
use cloudless_test::e2e::{Cluster, NetNs, Options};

/// A workload manifest of the test image running `script`.
fn manifest(c: &Cluster, name: &str, replicas: u32, script: &str, extra: &str) -> PathBuf {
    let path = c.dir.path().join(format!("{name}.yaml"));
    let text = format!(
        "apiVersion: cloudless.dev/v1\nkind: Workload\nmetadata:\n  name: {name}\nspec:\n  \
         image: {}/cloudless/busybox:1\n  command: [\"/bin/sh\", \"-c\"]\n  args:\n    - '{script}'\n  \
         replicas: {replicas}\n{extra}",
        c.registry.host
    );
    std::fs::write(&path, text).expect("manifest");
    path
}

fn apply(c: &Cluster, path: &Path) {
    c.ctl_ok(&["apply", "-f", &path.display().to_string()]);
}

/// The output of `name`'s replicas so far.
fn logs(c: &Cluster, name: &str) -> String {
    let out = c.ctl(&["logs", name, "--tail", "50"]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `f` until it holds (with a message of what was seen).
async fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(()) => return,
            Err(seen) => assert!(Instant::now() < deadline, "{what}: {seen}"),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// An HTTP server standing for the internet: busybox httpd in its own
/// namespace, serving `page`.
struct Internet {
    ns: NetNs,
    server: Child,
}

impl Internet {
    fn start(dir: &Path, page: &str) -> Self {
        let tag = format!("{:x}", (std::process::id() + 7) % 0xffff);
        let subnet = u8::try_from(20 + (std::process::id() + 7) % 200).unwrap_or(27);
        let ns = NetNs::create(&format!("i{tag}"), subnet).expect("internet namespace");
        let www = dir.join("www");
        std::fs::create_dir_all(&www).expect("www");
        std::fs::write(www.join("index.html"), page).expect("page");
        let server = Command::new("ip")
            .args(["netns", "exec", &ns.name, "busybox", "httpd", "-f", "-p"])
            .arg(format!("{}:8080", ns.ns_ip))
            .arg("-h")
            .arg(&www)
            .spawn()
            .expect("httpd");
        Self { ns, server }
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

fn node_of(rs: &[pb::Replica]) -> Vec<&str> {
    rs.iter().map(|r| r.node_id.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_get_a_network_of_their_own() {
    if let Some(why) = cloudless_test::e2e::missing().or_else(|| {
        (!Path::new("/usr/lib/cni/bridge").exists()).then(|| {
            "the CNI plugins are missing (apt-get install containernetworking-plugins)".to_owned()
        })
    }) {
        cloudless_test::skip_test(format!("container network end to end: {why}"));
        return;
    }
    let mut c = Cluster::start_with(Options {
        container_network: true,
        ..Options::default()
    })
    .await;
    let internet = Internet::start(c.dir.path(), "hello from the internet\n");

    tracing::info!(
        "phase 1: replicas have addresses of their nodes' subnets and reach the internet"
    );
    // Debian's static busybox cannot run wget in a container (it
    // segfaults looking up the service "http" without NSS), so HTTP is
    // spoken with nc.
    let fetch = format!(
        "while true; do if printf \"GET /index.html HTTP/1.0\\r\\n\\r\\n\" | nc -w 2 {} 8080 | grep internet; then echo FETCHED; else echo REFUSED; fi; sleep 1; done",
        internet.ns.ns_ip
    );
    apply(
        &c,
        &manifest(
            &c,
            "fetcher",
            2,
            &fetch,
            "  placement:\n    antiAffinity: Node\n",
        ),
    );
    let rs = c
        .wait_ready("fetcher", 2, Duration::from_secs(90), |rs| {
            rs.iter().all(|r| !r.address.is_empty())
        })
        .await;
    let subnets: Vec<String> = rs
        .iter()
        .map(|r| r.address.rsplit_once('.').expect("IPv4").0.to_owned())
        .collect();
    assert_ne!(
        subnets[0], subnets[1],
        "each node has its own subnet: {rs:#?}"
    );
    assert_ne!(node_of(&rs)[0], node_of(&rs)[1]);
    let wide = c.ctl_ok(&["get", "replicas", "-o", "wide"]);
    for r in &rs {
        assert!(
            wide.contains(&r.address),
            "get replicas -o wide shows {}:\n{wide}",
            r.address
        );
    }
    eventually(
        "both replicas fetch the page",
        Duration::from_secs(30),
        || {
            let text = logs(&c, "fetcher");
            let ok = rs.iter().all(|r| {
                text.lines().any(|l| {
                    l.starts_with(&format!("[{}]", r.id)) && l.contains("hello from the internet")
                })
            });
            ok.then_some(()).ok_or(text)
        },
    )
    .await;

    tracing::info!(
        "phase 2: a workload whose egress policy does not allow the internet is refused"
    );
    apply(
        &c,
        &manifest(
            &c,
            "blocked",
            1,
            &fetch,
            "  egress:\n    allow:\n      - cidr: 192.0.2.0/24\n",
        ),
    );
    c.wait_ready("blocked", 1, Duration::from_secs(60), |_| true)
        .await;
    eventually(
        "the blocked replica is refused",
        Duration::from_secs(30),
        || {
            let text = logs(&c, "blocked");
            (text.matches("REFUSED").count() >= 2)
                .then_some(())
                .ok_or(text)
        },
    )
    .await;
    let text = logs(&c, "blocked");
    assert!(
        !text.contains("FETCHED") && !text.contains("hello from the internet"),
        "{text}"
    );

    tracing::info!(
        "phase 3: a published port answers at the node's address; a taken one is a filter"
    );
    let serve = "mkdir -p /tmp/w && echo hello from $CLOUDLESS_REPLICA > /tmp/w/index.html && exec httpd -f -p 8080 -h /tmp/w";
    let published = "  ports:\n    - containerPort: 8080\n      hostPort: 18090\n";
    apply(&c, &manifest(&c, "web", 1, serve, published));
    let web = c
        .wait_ready("web", 1, Duration::from_secs(60), |_| true)
        .await;
    let at = SocketAddr::from((
        internet
            .ns
            .host_ip
            .parse::<std::net::Ipv4Addr>()
            .expect("ip"),
        18090,
    ));
    eventually(
        "the published port answers from the host",
        Duration::from_secs(20),
        || {
            http_get(at).and_then(|body| {
                body.contains(&format!("hello from {}", web[0].id))
                    .then_some(())
                    .ok_or(body)
            })
        },
    )
    .await;
    apply(&c, &manifest(&c, "web2", 1, serve, published));
    let web2 = c
        .wait_ready("web2", 1, Duration::from_secs(60), |_| true)
        .await;
    assert_ne!(
        web2[0].node_id, web[0].node_id,
        "the taken host port sent web2 to the other node"
    );
    apply(&c, &manifest(&c, "web3", 1, serve, published));
    eventually(
        "web3 is unplaced with the reason",
        Duration::from_secs(30),
        || {
            let out = c.ctl(&["describe", "workload", "web3"]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.contains("18090").then_some(()).ok_or(text)
        },
    )
    .await;
    c.ctl_ok(&["delete", "workload", "web3"]);

    tracing::info!("phase 4: after an agent restart its replicas keep their addresses");
    let a_node = c
        .ctl_ok(&["get", "nodes"])
        .lines()
        .find(|l| l.contains("agent-a"))
        .map(str::to_owned)
        .expect("agent-a listed");
    let before: Vec<pb::Replica> = c.replicas("fetcher").await.expect("replicas");
    c.agents[0].sigkill();
    c.restart_agent(0);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = c
        .wait_ready("fetcher", 2, Duration::from_secs(60), |rs| {
            rs.iter().all(|r| !r.address.is_empty())
        })
        .await;
    for r in &before {
        let same = after.iter().find(|a| a.id == r.id).expect("same replicas");
        assert_eq!(
            same.address, r.address,
            "address of {} after restarting {a_node}",
            r.id
        );
    }

    tracing::info!("phase 5: deleted workloads leave no veth, rule or lease behind");
    for w in ["fetcher", "blocked", "web", "web2"] {
        c.ctl_ok(&["delete", "workload", w]);
    }
    let bridges: Vec<(String, String, PathBuf)> = c
        .agents
        .iter()
        .map(|a| {
            let (bridge, prefix) = c.network_names(&a.name);
            (bridge, prefix, a.data_dir.join("network/ipam/cloudless"))
        })
        .collect();
    let addresses: Vec<String> = before
        .iter()
        .chain(&web)
        .chain(&web2)
        .map(|r| r.address.clone())
        .collect();
    eventually("nothing left", Duration::from_secs(60), || {
        let mut left = Vec::new();
        for (bridge, prefix, leases) in &bridges {
            let veths = out("ip", &["-o", "link", "show", "master", bridge]);
            if !veths.trim().is_empty() {
                left.push(format!("veths on {bridge}: {veths}"));
            }
            let rules = out("iptables-save", &[]);
            let per_replica = format!("{prefix}-E-");
            if rules.contains(&per_replica) {
                left.push(format!("egress chains {per_replica}*"));
            }
            for a in &addresses {
                if rules.lines().any(|l| l.split([' ', '/']).any(|w| w == a)) {
                    left.push(format!("rules for {a}"));
                }
                if leases.join(a).exists() {
                    left.push(format!("lease of {a}"));
                }
            }
            let nat = out("iptables-save", &["-t", "nat"]);
            if nat.contains("18090") {
                left.push("the port mapping of 18090".into());
            }
        }
        left.is_empty().then_some(()).ok_or(left.join("; "))
    })
    .await;
}

/// GET / at `at`: the body.
fn http_get(at: SocketAddr) -> Result<String, String> {
    use std::io::Write as _;
    let mut s =
        TcpStream::connect_timeout(&at, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut body = String::new();
    s.read_to_string(&mut body).map_err(|e| e.to_string())?;
    Ok(body)
}

fn out(cmd: &str, args: &[&str]) -> String {
    let o = Command::new(cmd).args(args).output().expect("runs");
    String::from_utf8_lossy(&o.stdout).into_owned()
}
