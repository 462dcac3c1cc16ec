//! Service traffic between workloads end to end (3 coordinator processes, 2
//! agents, own containerd and registry): a `frontend` that lists `backend` as
//! an upstream reaches it at 127.0.0.1:9000 inside its containers. Backend
//! replicas run only on agent-b; the frontend replica on agent-a reaches them
//! over the QUIC overlay (the containers have no network but loopback), the
//! one on agent-b straight into the backend's namespace. Through relays,
//! the backend's service VIP too (TCP and UDP). Needs root,
//! containerd, runc, busybox-static and docker-registry (installed by
//! .ci/run); skips loudly otherwise.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use std::net::SocketAddr;
use std::sync::Arc;

use cloudless_agent::NodeIdentity;
use cloudless_overlay::{Overlay, OverlayConfig, StaticResolver};
use cloudless_pki::Identity;
use cloudless_proto::v1 as pb;
use cloudless_test::e2e::{output_text as text, Cluster, Options};

macro_rules! require_e2e {
    () => {
        if let Some(why) = cloudless_test::e2e::missing() {
            cloudless_test::skip_test(format!("end-to-end overlay test: {why}"));
            return;
        }
    };
}

fn write(c: &Cluster, name: &str, body: &str) -> String {
    let path = c.dir.path().join(format!("{name}.yaml"));
    std::fs::write(&path, body).expect("manifest");
    path.display().to_string()
}

/// Backend: busybox httpd on 8080 serving its replica id at / and 1 MiB of
/// random bytes at /big; Ready once it answers.
fn backend(c: &Cluster, replicas: u32) -> String {
    let body = format!(
        "apiVersion: cloudless.dev/v1
kind: Workload
metadata:
  name: backend
spec:
  image: {}/cloudless/busybox:1
  command: [\"/bin/sh\", \"-c\"]
  args:
    - 'mkdir -p /www && echo \"backend $CLOUDLESS_REPLICA\" > /www/index.html && head -c 1048576 /dev/urandom > /www/big; udp-tool serve 5353 $CLOUDLESS_REPLICA & exec httpd -f -p 8080 -h /www'
  replicas: {replicas}
  placement:
    zones: [b]
  ports:
    - {{name: http, containerPort: 8080}}
    - {{name: echo, containerPort: 5353, protocol: UDP}}
  readinessProbe:
    httpGet: {{port: 8080, path: /}}
    periodSeconds: 1
",
        c.registry.host
    );
    write(c, &format!("backend-{replicas}"), &body)
}

fn frontend(c: &Cluster) -> String {
    let body = format!(
        "apiVersion: cloudless.dev/v1
kind: Workload
metadata:
  name: frontend
spec:
  image: {}/cloudless/busybox:1
  command: [\"/bin/sh\", \"-c\"]
  args: ['while true; do sleep 1; done']
  replicas: 2
  placement:
    zones: [a, b]
    antiAffinity: Node
  upstreams:
    - {{workload: backend, port: 8080, localPort: 9000}}
",
        c.registry.host
    );
    write(c, "frontend", &body)
}

/// Runs `wget` for `url` inside frontend replica `replica`; stdout or the error.
fn fetch(c: &Cluster, replica: &str, cmd: &str) -> Result<String, String> {
    let out = c.ctl(&[
        "exec",
        "frontend",
        "--replica",
        replica,
        "--timeout",
        "20",
        "--",
        "sh",
        "-c",
        cmd,
    ]);
    let (stdout, stderr) = text(&out);
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!("exit {:?}: {stdout}{stderr}", out.status.code()))
    }
}

/// Starts 2 backends on agent-b and a frontend on each agent, and checks
/// both frontends reach both backends through the upstream. Returns the
/// backends and the frontend on agent-a.
async fn serve_and_reach(c: &Cluster) -> (Vec<pb::Replica>, pb::Replica) {
    c.ctl_ok(&["apply", "-f", &backend(c, 2), "--wait", "--timeout", "90"]);
    let backends = c
        .wait_ready("backend", 2, Duration::from_secs(60), |_| true)
        .await;
    assert!(
        backends.iter().all(|r| r.node_name == "agent-b"),
        "{backends:#?}"
    );
    c.ctl_ok(&["apply", "-f", &frontend(c), "--wait", "--timeout", "90"]);
    let fronts = c
        .wait_ready("frontend", 2, Duration::from_secs(60), |rs| {
            rs.iter()
                .map(|r| r.node_name.as_str())
                .collect::<BTreeSet<_>>()
                .len()
                == 2
        })
        .await;
    let remote = fronts
        .iter()
        .find(|r| r.node_name == "agent-a")
        .expect("a frontend on agent-a");
    let local = fronts
        .iter()
        .find(|r| r.node_name == "agent-b")
        .expect("a frontend on agent-b");

    // The upstream set reaches the agents shortly after the backends are
    // Ready; then every request is answered, by both backends in turn.
    let wanted: BTreeSet<String> = backends
        .iter()
        .map(|r| format!("backend {}", r.id))
        .collect();
    for front in [remote, local] {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = BTreeSet::new();
        while seen != wanted {
            match fetch(c, &front.id, "wget -q -O- http://127.0.0.1:9000/") {
                Ok(body) => {
                    let line = body.trim().to_owned();
                    assert!(wanted.contains(&line), "unexpected answer {line:?}");
                    seen.insert(line);
                }
                Err(e) => assert!(
                    Instant::now() < deadline,
                    "frontend {} on {} cannot reach the backend: {e}\n{}",
                    front.id,
                    front.node_name,
                    c.agent_logs()
                ),
            }
        }
    }

    (backends, remote.clone())
}

/// An overlay endpoint in the test process holding agent `i`'s own
/// certificate, and agent `j`'s node identity and advertised overlay address.
fn impersonate(c: &Cluster, i: usize, j: usize) -> (Overlay, Identity, SocketAddr) {
    let me = NodeIdentity::load(&c.agents[i].data_dir)
        .expect("identity")
        .expect("enrolled");
    let them = NodeIdentity::load(&c.agents[j].data_dir)
        .expect("identity")
        .expect("enrolled");
    // The address agent j reported in its heartbeats, as `node get` shows it.
    let node: serde_json::Value =
        serde_json::from_str(&c.ctl_ok(&["node", "get", &them.node_id])).expect("node json");
    let addr = node["overlayAddresses"][0]
        .as_str()
        .expect("an overlay address")
        .to_owned();
    let overlay = Overlay::bind(
        OverlayConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            ..OverlayConfig::default()
        },
        me.overlay_tls().expect("tls"),
        Identity::Node(me.node_id.clone()),
        Arc::new(StaticResolver::default()),
    )
    .expect("overlay");
    (
        overlay,
        Identity::Node(them.node_id.clone()),
        addr.parse().expect("overlay address"),
    )
}

/// md5 of `/www/big` on every backend.
fn backend_sums(c: &Cluster, backends: &[pb::Replica]) -> BTreeSet<String> {
    backends
        .iter()
        .map(|b| {
            let out = c.ctl_ok(&[
                "exec",
                "backend",
                "--replica",
                &b.id,
                "--",
                "sh",
                "-c",
                "md5sum /www/big",
            ]);
            out.split_whitespace().next().expect("sum").to_owned()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_reach_replicas_on_other_nodes_over_the_overlay() {
    require_e2e!();
    let c = Cluster::start().await;
    let (backends, remote) = serve_and_reach(&c).await;
    let remote = &remote;

    // 1 MiB arrives intact across the overlay (checksums on both ends).
    // Reachable addresses: nothing needed a relay.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(relayed_total(&c).await, 0);

    let sums = backend_sums(&c, &backends);
    for _ in 0..2 {
        let got = fetch(
            &c,
            &remote.id,
            "wget -q -O- http://127.0.0.1:9000/big | md5sum",
        )
        .expect("big file");
        let sum = got.split_whitespace().next().expect("sum").to_owned();
        assert!(sums.contains(&sum), "{sum} not in {sums:?}");
    }

    // Streams to a replica are accepted only from nodes running a workload
    // that lists its workload as an upstream: agent-a's own certificate
    // opens one while its frontend runs, and not after it is deleted.
    let (rogue, agent_b, addr_b) = impersonate(&c, 0, 1);
    rogue.set_peer(agent_b.clone(), vec![addr_b]);
    let target = format!("replica/{}:8080", backends[0].id);
    rogue
        .open(&agent_b, &target)
        .await
        .expect("a caller's node");
    c.ctl_ok(&["delete", "workload", "frontend"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match rogue.open(&agent_b, &target).await {
            Ok(_) => assert!(Instant::now() < deadline, "still accepted after the delete"),
            Err(e) => {
                let text = e.to_string();
                assert!(
                    text.contains("runs no workload with default/backend as an upstream"),
                    "{text}"
                );
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.ctl_ok(&["apply", "-f", &frontend(&c), "--wait", "--timeout", "90"]);
    let fronts = c
        .wait_ready("frontend", 2, Duration::from_secs(60), |_| true)
        .await;
    let remote = fronts
        .iter()
        .find(|r| r.node_name == "agent-a")
        .expect("a frontend on agent-a");

    // The frontend's container has no route off the host but the upstream:
    // the backend's port is not reachable any other way.
    let direct = fetch(
        &c,
        &remote.id,
        "ip route 2>/dev/null; cat /proc/net/route | wc -l",
    )
    .expect("route table");
    assert_eq!(
        direct.lines().last().map(str::trim),
        Some("1"),
        "routes: {direct}"
    );

    // With no Ready backend the connection is refused; it works again once
    // a backend is back.
    c.ctl_ok(&["apply", "-f", &backend(&c, 0), "--wait", "--timeout", "60"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while fetch(&c, &remote.id, "wget -q -T 5 -O- http://127.0.0.1:9000/").is_ok() {
        assert!(
            Instant::now() < deadline,
            "the upstream still answers with no backend"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    c.ctl_ok(&["apply", "-f", &backend(&c, 1), "--wait", "--timeout", "90"]);
    let back = c
        .wait_ready("backend", 1, Duration::from_secs(60), |_| true)
        .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match fetch(&c, &remote.id, "wget -q -O- http://127.0.0.1:9000/") {
            Ok(body) => {
                assert_eq!(body.trim(), format!("backend {}", back[0].id));
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "no answer after scale up: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Removing agent-a (the device is stolen) cuts its certificate off the
    // overlay: the stream it holds to a backend ends, new ones are refused,
    // and the coordinators' relay refuses it.
    tracing::info!("removal: agent-a's certificate loses the overlay");
    let target = format!("replica/{}:8080", back[0].id);
    let mut held = rogue
        .open(&agent_b, &target)
        .await
        .expect("a caller's node");
    let relay_addr: SocketAddr = c.coordinators[0].grpc.parse().expect("relay address");
    // The relay's identity, from the certificate it presents.
    let guess = Identity::Coordinator(0);
    rogue.set_peer(guess.clone(), vec![relay_addr]);
    let relay = match rogue.observed_address(&guess).await {
        Ok(_) => guess,
        Err(e) => {
            let text = e.to_string();
            let uri = text
                .split_whitespace()
                .map(|w| w.trim_end_matches([',', ';', ':']))
                .find(|w| w.starts_with("cloudless://coordinator/") && *w != guess.uri())
                .unwrap_or_else(|| panic!("no relay identity in {text}"));
            Identity::from_uri(uri).unwrap_or_else(|| panic!("{uri:?} in {text}"))
        }
    };
    rogue.set_peer(relay.clone(), vec![relay_addr]);
    rogue
        .observed_address(&relay)
        .await
        .expect("the relay answers an enrolled node");
    let a_id = NodeIdentity::load(&c.agents[0].data_dir)
        .expect("identity")
        .expect("enrolled")
        .node_id;
    c.ctl_ok(&["node", "remove", &a_id]);
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_to_end(&mut held, &mut rest),
    )
    .await;
    assert!(ended.is_ok(), "the removed node's stream stayed open");
    let e = rogue
        .open(&agent_b, &target)
        .await
        .expect_err("a removed node opened a stream");
    assert!(
        e.to_string()
            .contains("runs no workload with default/backend as an upstream"),
        "{e}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while rogue.observed_address(&relay).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "the relay still serves a removed node"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Both agents advertise an address nobody can reach (TEST-NET-1), as
/// devices behind NAT would: the frontend on agent-a still reaches the
/// backends on agent-b, through the coordinators' relays, which both agents
/// keep connections to: through its upstream, and (replicas with networks of
/// their own) through the backend's service VIP, over TCP and UDP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_that_cannot_dial_each_other_connect_through_a_coordinator_relay() {
    require_e2e!();
    let c = Cluster::start_with(Options {
        agent_args: vec![
            "--overlay-advertise".into(),
            "192.0.2.1:9".into(),
            // On one host an introduction always succeeds: this test is
            // about the relay path (NAT traversal: crates/overlay/tests/nat.rs).
            "--overlay-hole-punching".into(),
            "false".into(),
        ],
        container_network: true,
        ..Options::default()
    })
    .await;
    let (backends, remote) = serve_and_reach(&c).await;
    let sums = backend_sums(&c, &backends);
    let got = fetch(
        &c,
        &remote.id,
        "wget -q -O- http://127.0.0.1:9000/big | md5sum",
    )
    .expect("big file through a relay");
    let sum = got.split_whitespace().next().expect("sum").to_owned();
    assert!(sums.contains(&sum), "{sum} not in {sums:?}");
    // The streams went through the coordinators' relays (at least the
    // three fetches above; the counters are copied every second).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let relayed = relayed_total(&c).await;
        if relayed >= 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {relayed} streams relayed\n{}",
            c.agent_logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // The backend's service VIP, by name, from agent-a through the relays:
    // both backends answer, over TCP and over UDP.
    let before = relayed_total(&c).await;
    let call = "ip=$(nslookup backend 2>/dev/null | awk \"/^Address: /{a=\\$2} END{print a}\"); \
                wget -q -O- http://$ip:8080/; udp-tool ask $ip 5353 hi";
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < 2 * backends.len() {
        if let Ok(out) = fetch(&c, &remote.id, call) {
            for b in &backends {
                for (answer, proto) in [
                    (format!("backend {}", b.id), "tcp"),
                    (format!("{}:hi", b.id), "udp"),
                ] {
                    if out.lines().any(|l| l.trim() == answer) {
                        seen.insert((b.id.clone(), proto));
                    }
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "the backend's VIP through the relays: {seen:?}\n{}",
            c.agent_logs()
        );
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while relayed_total(&c).await < before + 4 {
        assert!(
            Instant::now() < deadline,
            "the VIP's streams did not go through the relays"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The UDP questions and answers crossed the relays as QUIC datagrams
    // (one each way per answer seen at least), not on the flows' streams.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let relayed = coordinators_total(&c, "cloudless_overlay_udp_datagrams_relayed_total").await;
        if relayed >= 2.0 * backends.len() as f64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {relayed} UDP datagrams relayed as QUIC datagrams\n{}",
            c.agent_logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // And none rode a flow's stream: both agents sent each as a QUIC
    // datagram to the relay.
    for agent in &c.agents {
        let scrape = cloudless_test::http_get(&agent.metrics_addr, "/metrics").1;
        let way = |w: &str| {
            cloudless_test::sample(
                &scrape,
                &format!("cloudless_overlay_udp_datagrams_total{{way=\"{w}\"}}"),
            )
        };
        assert!(
            way("frame") >= 1.0 && way("stream") == 0.0,
            "{}: {} as QUIC datagrams, {} on streams",
            agent.name,
            way("frame"),
            way("stream")
        );
    }

    // The agents found the relays (logged when they change).
    let logs = c.agent_logs();
    assert!(
        logs.contains("overlay relays") && logs.contains("cloudless://coordinator/"),
        "{logs}"
    );
}

/// GET /metrics from a coordinator's HTTP address.
async fn metrics(http: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(http).await.expect("http");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n")
        .await
        .expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("response");
    out
}

/// Streams relayed by all coordinators so far.
async fn relayed_total(c: &Cluster) -> u64 {
    coordinators_total(c, "cloudless_overlay_streams_relayed_total").await as u64
}

/// `series` summed over every coordinator's metrics.
async fn coordinators_total(c: &Cluster, series: &str) -> f64 {
    let mut total = 0.0;
    for node in &c.coordinators {
        total += cloudless_test::sample(&metrics(&node.http).await, series);
    }
    total
}
