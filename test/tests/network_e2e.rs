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

/// One installation at a time (2 cores).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Skips (loudly) where the end-to-end set-up or the CNI plugins are missing.
fn missing() -> Option<String> {
    cloudless_test::e2e::missing().or_else(|| {
        (!Path::new("/usr/lib/cni/bridge").exists()).then(|| {
            "the CNI plugins are missing (apt-get install containernetworking-plugins)".to_owned()
        })
    })
}

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

/// Seconds since the epoch.
fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
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
    if let Some(why) = missing() {
        cloudless_test::skip_test(format!("container network end to end: {why}"));
        return;
    }
    let _serial = SERIAL.lock().await;
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
        "s=$(cut -d\" \" -f22 /proc/1/stat); while true; do if printf \"GET /index.html HTTP/1.0\\r\\n\\r\\n\" | nc -w 2 {} 8080 | grep internet; then echo FETCHED $s; else echo REFUSED $s; fi; sleep 1; done",
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
    // Their agents count the bytes each replica's namespace carried.
    for r in &rs {
        let agent = c
            .agents
            .iter()
            .find(|a| a.name == r.node_name)
            .expect("the replica's agent");
        let scrape = cloudless_test::http_get(&agent.metrics_addr, "/metrics").1;
        for (name, least) in [
            ("cloudless_agent_replica_network_receive_bytes_total", 100.0),
            ("cloudless_agent_replica_network_transmit_bytes_total", 50.0),
        ] {
            let key = format!("{name}{{replica=\"{}\"}}", r.id);
            let value = cloudless_test::sample(&scrape, &key);
            assert!(value >= least, "{key} {value}");
        }
    }

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
            // The placement explanation names the port and its holder on
            // each node (the spec's own "node port 18090" line is not
            // enough).
            let taken = text
                .lines()
                .filter(|l| l.contains("host port 18090/TCP is taken by default/web"))
                .count();
            (taken == 2 && text.contains("0 assigned"))
                .then_some(())
                .ok_or(text)
        },
    )
    .await;
    let placed = c.replicas("web3").await.expect("web3's replicas");
    assert!(
        placed.is_empty(),
        "web3 was placed although both nodes hold port 18090: {placed:#?}"
    );
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

    tracing::info!(
        "phase 4b: a replica whose network broke while its agent was down starts again in a new one"
    );
    // Each line the fetcher prints ends with when its container started.
    let a_id = node_id_of(&c, "agent-a");
    let on_a = after
        .iter()
        .find(|r| r.node_id == a_id)
        .expect("a fetcher on agent-a")
        .id
        .clone();
    let fetched_by = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with(&format!("[{on_a}]")) && l.contains("FETCHED"))
            .filter_map(|l| l.split_whitespace().last().map(str::to_owned))
            .collect()
    };
    let first_start = fetched_by(&logs(&c, "fetcher"))
        .pop()
        .expect("the fetcher on agent-a fetched");
    c.agents[0].sigkill();
    let (bridge_a, _) = c.network_names(&c.agents[0].name);
    for l in out("ip", &["-o", "link", "show", "master", &bridge_a]).lines() {
        if let Some(v) = l.split(": ").nth(1) {
            let v = v.split('@').next().unwrap_or(v);
            let _ = std::process::Command::new("ip")
                .args(["link", "del", v])
                .status();
        }
    }
    c.restart_agent(0);
    eventually(
        "the fetcher on agent-a fetches again from a container started anew",
        Duration::from_secs(90),
        || {
            let text = logs(&c, "fetcher");
            fetched_by(&text)
                .iter()
                .any(|s| *s != first_start)
                .then_some(())
                .ok_or(text)
        },
    )
    .await;

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

/// The IP a name resolves to inside a replica (busybox nslookup through the
/// node's resolver, whose answer is the last `Address:` line).
const RESOLVE: &str = "ip=$(nslookup NAME 2>/dev/null | awk \"/^Address: /{a=\\$2} END{print a}\")";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_by_name_reach_ready_replicas_on_every_node_within_their_policy() {
    if let Some(why) = missing() {
        cloudless_test::skip_test(format!("services end to end: {why}"));
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut c = Cluster::start_with(Options {
        container_network: true,
        ..Options::default()
    })
    .await;
    let internet = Internet::start(c.dir.path(), "unused\n");

    tracing::info!("phase 1: api by its short name, answered from replicas on both nodes");
    // HTTP on 8080, and a UDP server on 5353 answering `<replica>:<datagram>`;
    // Ready (`/ready.html`) only 10 s after each start, so a replica killed
    // and restarted is out of the rotation for a while.
    let serve = "mkdir -p /tmp/w; rm -f /tmp/w/ready.html; echo hello from $CLOUDLESS_REPLICA > /tmp/w/index.html; (sleep 10; echo ok > /tmp/w/ready.html) & udp-tool serve 5353 $CLOUDLESS_REPLICA & exec httpd -f -p 8080 -h /tmp/w";
    let api = "  ports:\n    - containerPort: 8080\n      ingressPort: 18443\n    - containerPort: 5353\n      protocol: UDP\n      ingressPort: 18453\n  readinessProbe:\n    httpGet: {port: 8080, path: /ready.html}\n    periodSeconds: 1\n  placement:\n    antiAffinity: Node\n";
    apply(&c, &manifest(&c, "api", 2, serve, api));
    let apis = c
        .wait_ready("api", 2, Duration::from_secs(90), |_| true)
        .await;
    // Each answer is printed after the second it was asked in (the
    // container's clock is the host's).
    let call = |name: &str| {
        format!(
            "while true; do t=$(date +%s); {}; if [ -n \"$ip\" ]; then echo \"RESOLVED $ip\"; r=$(printf \"GET /index.html HTTP/1.0\\r\\n\\r\\n\" | nc -w 2 $ip 8080 | grep hello); if [ -n \"$r\" ]; then echo \"$t $r\"; else echo \"$t FAILED\"; fi; echo \"$t UDP $(udp-tool ask $ip 5353 ping)\"; else echo UNRESOLVED; fi; sleep 0.3; done",
            RESOLVE.replace("NAME", name)
        )
    };
    apply(&c, &manifest(&c, "client", 1, &call("api"), ""));
    c.wait_ready("client", 1, Duration::from_secs(60), |_| true)
        .await;
    let vip = c
        .ctl_ok(&["get", "services"])
        .lines()
        .find(|l| l.contains(" api "))
        .and_then(|l| l.split_whitespace().nth(2).map(str::to_owned))
        .expect("api's VIP in get services");
    eventually(
        "client reaches both api replicas by name",
        Duration::from_secs(40),
        || {
            let text = logs(&c, "client");
            // Over TCP and over UDP (a datagram to the VIP answered from
            // it: the client's socket takes answers from there only).
            let both = apis.iter().all(|r| {
                text.contains(&format!("hello from {}", r.id))
                    && text.contains(&format!("UDP {}:ping", r.id))
            });
            (both && text.contains(&format!("RESOLVED {vip}")))
                .then_some(())
                .ok_or(text)
        },
    )
    .await;
    let described = c.ctl_ok(&["describe", "service", "api"]);
    for r in &apis {
        assert!(
            described.contains(&r.id),
            "describe service lists {}:\n{described}",
            r.id
        );
    }
    // The client's datagrams to the far replica and its answers crossed
    // between the agents as QUIC datagrams (both agents of this release).
    for agent in &c.agents {
        let scrape = cloudless_test::http_get(&agent.metrics_addr, "/metrics").1;
        let frames = cloudless_test::sample(
            &scrape,
            "cloudless_overlay_udp_datagrams_total{way=\"frame\"}",
        );
        assert!(
            frames >= 1.0,
            "{}: {frames} datagrams as QUIC datagrams",
            agent.name
        );
    }

    tracing::info!(
        "phase 1a: a killed replica gets no connection or datagram from 2 s after it died until it is Ready again"
    );
    let client_node = c
        .replicas("client")
        .await
        .and_then(|rs| rs.first().map(|r| r.node_id.clone()))
        .expect("the client's node");
    let (victim, other) = match apis
        .iter()
        .partition::<Vec<_>, _>(|r| r.node_id != client_node)
    {
        (far, near) if far.len() == 1 && near.len() == 1 => (far[0].clone(), near[0].clone()),
        _ => panic!("one api replica on each node: {apis:#?}"),
    };
    let pid = replica_init_pid(&victim.id).expect("the killed replica's process");
    let died = now_s();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    let (down, back) = out_and_back(&c, &victim.id, died).await;
    // The agent saw the death and the coordinators recorded it soon after.
    assert!(
        down <= died + 10,
        "{} was recorded not Ready {} s after it was killed",
        victim.id,
        down - died
    );
    out_and_back_in_rotation(&c, &victim.id, &other.id, down, back).await;
    tracing::info!(
        died,
        down,
        back,
        "the killed replica was out of the rotation"
    );

    tracing::info!("phase 1b: a replica failing readiness leaves the rotation within 2 s");
    let failed = now_s();
    c.ctl_ok(&[
        "exec",
        "api",
        "--replica",
        &victim.id,
        "--",
        "rm",
        "/tmp/w/ready.html",
    ]);
    let restore = async {
        // Not Ready once its probe has failed (three times a second); kept
        // so for 9 s after the coordinators recorded it.
        loop {
            let rs = c.replicas("api").await.unwrap_or_default();
            if rs
                .iter()
                .any(|r| r.id == victim.id && r.state() != pb::ReplicaState::Ready)
            {
                break;
            }
            assert!(now_s() < failed + 30, "{} still Ready", victim.id);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_secs(9)).await;
        c.ctl_ok(&[
            "exec",
            "api",
            "--replica",
            &victim.id,
            "--",
            "/bin/sh",
            "-c",
            "echo ok > /tmp/w/ready.html",
        ]);
    };
    let ((down, back), ()) = tokio::join!(out_and_back(&c, &victim.id, failed), restore);
    out_and_back_in_rotation(&c, &victim.id, &other.id, down, back).await;
    tracing::info!(
        failed,
        down,
        back,
        "the replica failing readiness was out of the rotation"
    );

    tracing::info!("phase 1c: upstreams keep working beside replica networks");
    let up = "while true; do r=$(printf \"GET /index.html HTTP/1.0\\r\\n\\r\\n\" | nc -w 2 127.0.0.1 9000 | grep hello); echo \"UPSTREAM ${r:-FAILED}\"; sleep 0.3; done";
    apply(
        &c,
        &manifest(
            &c,
            "upcaller",
            1,
            up,
            "  upstreams:\n    - {workload: api, port: 8080, localPort: 9000}\n",
        ),
    );
    c.wait_ready("upcaller", 1, Duration::from_secs(60), |_| true)
        .await;
    eventually(
        "the upstream reaches both api replicas",
        Duration::from_secs(40),
        || {
            let text = logs(&c, "upcaller");
            apis.iter()
                .all(|r| text.contains(&format!("UPSTREAM hello from {}", r.id)))
                .then_some(())
                .ok_or(text)
        },
    )
    .await;
    c.ctl_ok(&["delete", "workload", "upcaller"]);

    tracing::info!("phase 2: after a scale-down no connection goes to the gone replica after 2 s");
    let one = manifest(&c, "api", 1, serve, api);
    apply(&c, &one);
    let left = c
        .wait_ready("api", 1, Duration::from_secs(60), |_| true)
        .await;
    // From the second the scale-down was seen, plus 2 s (and 1 s for the
    // clock's resolution): the answers to connections opened since.
    let since = now_s() + 3;
    let gone: Vec<&pb::Replica> = apis.iter().filter(|r| r.id != left[0].id).collect();
    tokio::time::sleep(Duration::from_secs(7)).await;
    let out = c.ctl(&["logs", "client", "--tail", "400"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let fresh: Vec<&str> = text
        .lines()
        .filter(|l| {
            // `[replica] <second> <answer>`
            l.split_whitespace()
                .take(2)
                .find_map(|t| t.parse::<u64>().ok())
                .is_some_and(|t| t >= since)
        })
        .collect();
    assert!(
        fresh.len() >= 5,
        "too few connections after the scale-down to tell: {text}"
    );
    for g in &gone {
        assert!(
            !fresh
                .iter()
                .any(|l| l.contains(&format!("hello from {}", g.id))),
            "a connection went to {} after it left: {fresh:#?}",
            g.id
        );
        assert!(
            !fresh.iter().any(|l| l.contains(&format!("UDP {}:", g.id))),
            "a datagram went to {} after it left: {fresh:#?}",
            g.id
        );
    }
    for answer in [
        format!("hello from {}", left[0].id),
        format!("UDP {}:ping", left[0].id),
    ] {
        assert!(
            fresh.iter().any(|l| l.contains(&answer)),
            "{answer}: {fresh:#?}"
        );
    }

    tracing::info!(
        "phase 3: another namespace needs the qualified name and the target's allowFrom"
    );
    let other = c.dir.path().join("other.yaml");
    std::fs::write(
        &other,
        std::fs::read_to_string(manifest(
            &c,
            "caller",
            1,
            &call("api.default.cloudless.local"),
            "",
        ))
        .expect("manifest")
        .replace(
            "metadata:\n  name: caller\n",
            "metadata:\n  name: caller\n  namespace: other\n",
        ),
    )
    .expect("manifest");
    apply(&c, &other);
    eventually(
        "the other namespace resolves but is refused",
        Duration::from_secs(60),
        || {
            let out = c.ctl(&["logs", "caller", "-n", "other", "--tail", "20"]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            (text.contains(&format!("RESOLVED {vip}"))
                && !text.contains("hello from")
                && text.contains("UDP NO-ANSWER")
                && !text.contains(":ping"))
            .then_some(())
            .ok_or(text)
        },
    )
    .await;
    let allowed = format!("{api}  service:\n    allowFrom: [other]\n");
    apply(&c, &manifest(&c, "api", 1, serve, &allowed));
    eventually("allowFrom admits it", Duration::from_secs(40), || {
        let out = c.ctl(&["logs", "caller", "-n", "other", "--tail", "20"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (text.contains("hello from") && text.contains(":ping"))
            .then_some(())
            .ok_or(text)
    })
    .await;

    tracing::info!("phase 4: ingress from outside the cluster reaches replicas on every node");
    apply(&c, &manifest(&c, "api", 2, serve, &allowed));
    let apis = c
        .wait_ready("api", 2, Duration::from_secs(60), |_| true)
        .await;
    let a_id = node_id_of(&c, "agent-a");
    c.ctl_ok(&["node", "label", &a_id, "ingress=true"]);
    let outside = PathBuf::from(format!("/var/run/netns/{}", internet.ns.name));
    let at = SocketAddr::from((
        internet
            .ns
            .host_ip
            .parse::<std::net::Ipv4Addr>()
            .expect("ip"),
        18443,
    ));
    let udp_at = SocketAddr::new(at.ip(), 18453);
    let mut seen = std::collections::BTreeSet::new();
    let mut seen_udp = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(40);
    while seen.len() < 2 || seen_udp.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "ingress answers: TCP {seen:?}, UDP {seen_udp:?}"
        );
        if let Ok(line) = first_line_from(&outside, at) {
            if let Some(r) = apis.iter().find(|r| line.contains(&r.id)) {
                seen.insert(r.id.clone());
            }
        }
        // Each datagram from a socket of its own: a flow of its own.
        if let Ok(answer) = udp_answer(&outside, udp_at, "ping") {
            if let Some(r) = apis.iter().find(|r| answer == format!("{}:ping", r.id)) {
                seen_udp.insert(r.id.clone());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let on_b: Vec<String> = {
        let b_id = node_id_of(&c, "agent-b");
        apis.iter()
            .filter(|r| r.node_id == b_id)
            .map(|r| r.id.clone())
            .collect()
    };
    assert_eq!(on_b.len(), 1, "one api replica on agent-b: {apis:#?}");
    // A UDP flow from outside held by agent-b's replica (the overlay stream
    // to agent-b stays up): it moves to agent-a's replica once agent-b's
    // fails its readiness, and comes back into the rotation after.
    let held_by_b = || {
        (0..40)
            .find_map(|_| {
                let f = UdpFlow::open(&outside, udp_at).expect("a UDP socket outside");
                let answer = f.ask("held").ok()?;
                answer.starts_with(&format!("{}:", on_b[0])).then_some(f)
            })
            .expect("no UDP flow reached agent-b's replica in 40 tries")
    };
    let held = held_by_b();
    let ready_file = |cmd: &str| {
        c.ctl_ok(&[
            "exec",
            "api",
            "--replica",
            &on_b[0],
            "--",
            "/bin/sh",
            "-c",
            cmd,
        ]);
    };
    ready_file("rm /tmp/w/ready.html");
    eventually(
        "agent-b's replica leaves the rotation",
        Duration::from_secs(30),
        || {
            let text = c.ctl_ok(&["describe", "service", "api"]);
            // Listed under "Not in rotation" from now on.
            let rotation = text.split("Not in rotation").next().unwrap_or_default();
            (!rotation.contains(&on_b[0])).then_some(()).ok_or(text)
        },
    )
    .await;
    let left = Instant::now();
    loop {
        let answer = held
            .ask("held")
            .unwrap_or_else(|e| panic!("the held flow: {e}"));
        if !answer.starts_with(&format!("{}:", on_b[0])) {
            break;
        }
        assert!(
            left.elapsed() < Duration::from_secs(2),
            "the held flow still reached {} 2 s after it left the rotation",
            on_b[0]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ready_file("echo ok > /tmp/w/ready.html");
    c.wait_ready("api", 2, Duration::from_secs(60), |_| true)
        .await;

    tracing::info!(
        "phase 5: with agent-b killed, no ingress connection fails once its replica left"
    );
    // A UDP flow held by agent-b's replica, kept for the rest of the test.
    let held = held_by_b();
    c.agents[1].sigkill();
    eventually(
        "agent-b's replica leaves the rotation",
        Duration::from_secs(30),
        || {
            let text = c.ctl_ok(&["describe", "service", "api"]);
            (!text.contains(&on_b[0])).then_some(()).ok_or(text)
        },
    )
    .await;
    for i in 0..20 {
        let line = first_line_from(&outside, at)
            .unwrap_or_else(|e| panic!("ingress connection {i} failed: {e}"));
        assert!(line.starts_with("hello from"), "connection {i}: {line:?}");
        assert!(
            !line.contains(&on_b[0]),
            "connection {i} went to the killed node: {line}"
        );
        // A new UDP flow, and the flow held since before the kill (moved
        // off the killed node's replica if it was there): answered, never
        // from the killed node.
        for answer in [udp_answer(&outside, udp_at, "ping"), held.ask("held")] {
            let answer = answer.unwrap_or_else(|e| panic!("ingress datagram {i}: {e}"));
            assert!(
                apis.iter()
                    .any(|r| answer.starts_with(&format!("{}:", r.id))),
                "datagram {i}: {answer:?}"
            );
            assert!(
                !answer.contains(&on_b[0]),
                "datagram {i} went to the killed node: {answer}"
            );
        }
    }
}

/// A UDP socket in namespace `netns` connected to `to` (it takes answers
/// only from there).
struct UdpFlow(std::net::UdpSocket);

impl UdpFlow {
    fn open(netns: &Path, to: SocketAddr) -> Result<Self, String> {
        cloudless_network::netns::run_in(netns, move || {
            let s = std::net::UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
            s.connect(to).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_secs(2)))
                .map_err(|e| e.to_string())?;
            Ok(Self(s))
        })
        .map_err(|e| e.to_string())
    }

    /// Sends `msg`: the answer, or why there is none.
    fn ask(&self, msg: &str) -> Result<String, String> {
        self.0.send(msg.as_bytes()).map_err(|e| e.to_string())?;
        let mut buf = [0u8; 1500];
        let n = self
            .0
            .recv(&mut buf)
            .map_err(|e| format!("no answer: {e}"))?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    }
}

/// Sends `msg` to `to` from a new socket in `netns` (a flow of its own):
/// the answer.
fn udp_answer(netns: &Path, to: SocketAddr, msg: &str) -> Result<String, String> {
    UdpFlow::open(netns, to)?.ask(msg)
}

/// Waits until replica `id` of `api` is seen not Ready and then Ready
/// again, from second `since`: the seconds it was first seen not Ready and
/// Ready again.
async fn out_and_back(c: &Cluster, id: &str, since: u64) -> (u64, u64) {
    let mut down = None;
    loop {
        let rs = c.replicas("api").await.unwrap_or_default();
        match rs.iter().find(|r| r.id == id).map(pb::Replica::state) {
            Some(pb::ReplicaState::Ready) => {
                if let Some(d) = down {
                    return (d, now_s());
                }
            }
            Some(_) => {
                down.get_or_insert_with(now_s);
            }
            None => panic!("{id} was replaced, not restarted: {rs:#?}"),
        }
        assert!(
            now_s() < since + 60,
            "{id} not out of the rotation and back within a minute (out since {down:?})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The second a client log line's call was made in (`[replica] <second> ...`).
fn asked_at(line: &str) -> Option<u64> {
    line.split_whitespace()
        .take(2)
        .find_map(|t| t.parse::<u64>().ok())
}

/// Checks that replica `gone`, recorded not Ready at second `down` and seen
/// Ready again at `back`, got none of the client's calls asked from 2 s
/// after `down` (and 1 s for the clock's resolution) to 4 s before `back`
/// (a call, TCP then UDP, takes up to 3 s), that none failed meanwhile, and
/// that calls reach it again afterwards.
async fn out_and_back_in_rotation(c: &Cluster, gone: &str, other: &str, down: u64, back: u64) {
    out_of_rotation(c, gone, other, (down + 3)..back.saturating_sub(4));
    back_in_rotation(c, gone, back).await;
}

/// Checks that the client's calls made in `window` (seconds) all succeeded
/// and none reached `gone` (at least 3 reached `other`, so there is
/// something to tell).
fn out_of_rotation(c: &Cluster, gone: &str, other: &str, window: std::ops::Range<u64>) {
    let out = c.ctl(&["logs", "client", "--tail", "0"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let fresh: Vec<&str> = text
        .lines()
        .filter(|l| asked_at(l).is_some_and(|t| window.contains(&t)))
        .collect();
    let reached_other = fresh
        .iter()
        .filter(|l| l.contains(&format!("hello from {other}")))
        .count();
    assert!(
        reached_other >= 3,
        "too few answers in {window:?} to tell: {text}"
    );
    assert!(
        !fresh
            .iter()
            .any(|l| l.contains(gone) || l.contains("FAILED") || l.contains("NO-ANSWER")),
        "{gone} answered, or a call failed, while it was out of the rotation: {fresh:#?}"
    );
    tracing::info!(?window, calls = fresh.len(), "no call reached {gone}");
}

/// Waits until a client call made after second `back` reaches `id` again.
async fn back_in_rotation(c: &Cluster, id: &str, back: u64) {
    eventually(
        "the replica is back in the rotation",
        Duration::from_secs(20),
        || {
            let text = logs(c, "client");
            text.lines()
                .filter(|l| asked_at(l).is_some_and(|t| t > back))
                .any(|l| l.contains(&format!("hello from {id}")))
                .then_some(())
                .ok_or(text)
        },
    )
    .await;
}

/// The host pid of the init process (`httpd`) of replica `id`'s container,
/// found by the replica id in its environment.
fn replica_init_pid(id: &str) -> Option<i32> {
    let want = format!("CLOUDLESS_REPLICA={id}");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        let environ = std::fs::read(e.path().join("environ")).ok()?;
        (comm.trim() == "httpd" && environ.split(|b| *b == 0).any(|v| v == want.as_bytes()))
            .then_some(pid)
    })
}

/// The id of node `name` (from `get nodes -o wide`).
fn node_id_of(c: &Cluster, name: &str) -> String {
    let out = c.ctl_ok(&["get", "nodes", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("nodes json");
    v.as_array()
        .or_else(|| v["nodes"].as_array())
        .and_then(|nodes| {
            nodes
                .iter()
                .find(|n| n["name"] == name)
                .and_then(|n| n["id"].as_str().or_else(|| n["nodeId"].as_str()))
        })
        .unwrap_or_else(|| panic!("node {name} in {out}"))
        .to_owned()
}

/// GETs /index.html from the namespace at `netns` at `to`: the body's
/// `hello from ...` line.
fn first_line_from(netns: &Path, to: SocketAddr) -> Result<String, String> {
    use std::io::Write as _;
    cloudless_network::netns::run_in(netns, move || {
        let mut s =
            TcpStream::connect_timeout(&to, Duration::from_secs(2)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(3)))
            .map_err(|e| e.to_string())?;
        s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")
            .map_err(|e| e.to_string())?;
        let mut body = String::new();
        s.read_to_string(&mut body).map_err(|e| e.to_string())?;
        Ok(body
            .lines()
            .find(|l| l.starts_with("hello from"))
            .unwrap_or_default()
            .to_owned())
    })
    .map_err(|e| e.to_string())
}
