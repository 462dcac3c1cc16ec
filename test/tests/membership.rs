//! Agents (the real agent library, over mTLS) enrolling, heartbeating,
//! renewing and being removed, against an in-process 3-coordinator cluster.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use cloudless_agent::{AgentConfig, AgentError, NodeIdentity};
use cloudless_proto::v1 as pb;
use cloudless_test::{channel, wait_until, InProcessCluster};
use cloudless_types::NodePhase;
use pb::cluster_service_client::ClusterServiceClient;
use pb::node_service_client::NodeServiceClient;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

const HEARTBEAT_MS: u64 = 200;
const DOWN_AFTER_MS: u64 = 1500;
const GRACE_MS: u64 = 3000;

/// Fast membership timings so the tests run in seconds.
async fn set_fast_config(addr: &str, cert_lifetime_s: u64) {
    let mut c = ClusterServiceClient::new(channel(addr));
    let cfg = c
        .get_config(pb::GetConfigRequest { read: None })
        .await
        .expect("get config")
        .into_inner()
        .config
        .expect("config");
    c.set_config(pb::SetConfigRequest {
        write: None,
        config: Some(pb::ClusterConfig {
            heartbeat_interval_ms: HEARTBEAT_MS,
            suspect_after_missed_heartbeats: 3,
            down_after_ms: DOWN_AFTER_MS,
            leader_grace_ms: GRACE_MS,
            node_cert_lifetime_s: cert_lifetime_s,
            ..cfg
        }),
        expected_revision: 0,
    })
    .await
    .expect("set config");
}

/// Three coordinators with fast membership timings: the cluster, the
/// leader's index and its address.
async fn fast_cluster(cert_lifetime_s: u64) -> (InProcessCluster, usize, String) {
    let cluster = InProcessCluster::start(3, |_| {}).await;
    let leader = cluster.wait_for_leader().await;
    let addr = cluster.addr(leader);
    set_fast_config(&addr, cert_lifetime_s).await;
    (cluster, leader, addr)
}

async fn token(addr: &str, uses: u32, zone: &str) -> Zeroizing<String> {
    let t = NodeServiceClient::new(channel(addr))
        .create_join_token(pb::CreateJoinTokenRequest {
            write: None,
            ttl_seconds: 600,
            max_uses: uses,
            labels: HashMap::from([("zone".to_owned(), zone.to_owned())]),
        })
        .await
        .expect("token")
        .into_inner();
    Zeroizing::new(t.token)
}

struct Agent {
    data_dir: PathBuf,
    cancel: CancellationToken,
    task: JoinHandle<Result<(), AgentError>>,
}

fn agent_config(
    cluster: &InProcessCluster,
    name: &str,
    token: Option<Zeroizing<String>>,
) -> AgentConfig {
    AgentConfig {
        data_dir: cluster.dir.path().join(format!("agent-{name}")),
        coordinators: (0..cluster.configs.len())
            .map(|i| cluster.addr(i))
            .collect(),
        name: name.to_owned(),
        join_token: token,
        ca_cert: Some(cluster.configs[0].data_dir.join("admin/ca.crt")),
        labels: BTreeMap::from([("disk".to_owned(), "ssd".to_owned())]),
        runtime: None,
        overlay_listen: None,
        overlay_advertise: Vec::new(),
        overlay_hole_punching: false,
        bandwidth_bps: None,
        metrics_listen: None,
    }
}

fn spawn_agent(config: AgentConfig) -> Agent {
    let cancel = CancellationToken::new();
    let data_dir = config.data_dir.clone();
    let task = tokio::spawn(cloudless_agent::run(config, cancel.clone()));
    Agent {
        data_dir,
        cancel,
        task,
    }
}

/// Node name to committed phase, as coordinator `i` has applied it.
fn phases(cluster: &InProcessCluster, i: usize) -> HashMap<String, NodePhase> {
    cluster.nodes[i]
        .as_ref()
        .map(|c| {
            c.handle()
                .reader()
                .nodes()
                .expect("nodes")
                .into_iter()
                .map(|n| (n.name, n.phase))
                .collect()
        })
        .unwrap_or_default()
}

fn running(cluster: &InProcessCluster) -> Vec<usize> {
    (0..cluster.nodes.len())
        .filter(|i| cluster.nodes[*i].is_some())
        .collect()
}

async fn wait_phase(cluster: &InProcessCluster, name: &str, phase: NodePhase, within: Duration) {
    wait_until(
        &format!("{name} {phase:?} on every running coordinator"),
        within,
        || {
            running(cluster)
                .into_iter()
                .all(|i| phases(cluster, i).get(name) == Some(&phase))
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_become_ready_a_killed_agent_goes_down_and_identity_renews_and_survives_restarts() {
    let (cluster, leader, addr) = fast_cluster(60).await;
    let tok = token(&addr, 2, "a").await;

    let a = spawn_agent(agent_config(&cluster, "alpha", Some(tok.clone())));
    let b = spawn_agent(agent_config(&cluster, "beta", Some(tok)));
    let joined = Instant::now();
    wait_phase(&cluster, "alpha", NodePhase::Ready, Duration::from_secs(10)).await;
    wait_phase(&cluster, "beta", NodePhase::Ready, Duration::from_secs(10)).await;
    tracing::info!(elapsed = ?joined.elapsed(), "both agents Ready everywhere");

    // The key stays on the device, private.
    let key_mode = {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::metadata(a.data_dir.join("node.key"))
            .expect("node.key")
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(key_mode, 0o600);

    // Heartbeats carry the device status; placement labels are the token's
    // only, what the agent reports is kept apart.
    let alpha = cluster.nodes[leader]
        .as_ref()
        .expect("leader")
        .handle()
        .reader()
        .nodes()
        .expect("nodes")
        .into_iter()
        .find(|n| n.name == "alpha")
        .expect("alpha");
    assert!(alpha.status.capacity.cpu_millis >= 1000, "{alpha:?}");
    assert!(alpha.status.capacity.memory_bytes > 0, "{alpha:?}");
    assert_eq!(alpha.labels.get("zone").map(String::as_str), Some("a"));
    assert!(!alpha.labels.contains_key("disk"), "{alpha:?}");
    let reported = &alpha.status.reported_labels;
    assert_eq!(reported.get("disk").map(String::as_str), Some("ssd"));
    assert!(reported.contains_key("arch"), "{reported:?}");
    assert_eq!(
        alpha.trusted_capacity, alpha.status.capacity,
        "the first report is trusted"
    );

    // Kill beta once the leader's grace period is over: Suspect, then Down
    // within the configured timeout (counted from its last heartbeat, plus
    // the leader's 100 ms evaluation tick and replication).
    tokio::time::sleep(Duration::from_millis(GRACE_MS)).await;
    b.cancel.cancel();
    let _ = b.task.await;
    let killed = Instant::now();
    let mut saw_suspect = false;
    wait_until("beta Down", Duration::from_secs(10), || {
        let p = phases(&cluster, leader);
        saw_suspect |= p.get("beta") == Some(&NodePhase::Suspect);
        p.get("beta") == Some(&NodePhase::Down)
    })
    .await;
    let detection = killed.elapsed();
    assert!(saw_suspect, "beta went Down without being Suspect first");
    assert!(
        detection >= Duration::from_millis(DOWN_AFTER_MS - HEARTBEAT_MS)
            && detection < Duration::from_millis(DOWN_AFTER_MS + 1000),
        "beta Down after {detection:?}; configured {DOWN_AFTER_MS} ms"
    );
    assert_eq!(
        phases(&cluster, leader).get("alpha"),
        Some(&NodePhase::Ready),
        "a healthy node was affected"
    );

    // Renewal: a 60 s certificate (issued with 60 s of backdating) is renewed
    // two thirds in, well before it expires, and the agent carries on.
    let first = NodeIdentity::load(&a.data_dir)
        .expect("load")
        .expect("identity");
    wait_until(
        "alpha's certificate renewed",
        Duration::from_secs(40),
        || {
            NodeIdentity::load(&a.data_dir)
                .ok()
                .flatten()
                .is_some_and(|id| id.not_after > first.not_after)
        },
    )
    .await;
    let renewed = NodeIdentity::load(&a.data_dir)
        .expect("load")
        .expect("identity");
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    assert!(now_s < first.not_after, "renewed only after expiry");
    assert_eq!(renewed.node_id, first.node_id);
    assert_ne!(renewed.cert_pem, first.cert_pem);
    let record = cluster.nodes[leader]
        .as_ref()
        .expect("leader")
        .handle()
        .reader()
        .node(&renewed.node_id)
        .expect("read")
        .expect("alpha");
    assert_eq!(record.cert_not_after_ms, renewed.not_after * 1000);
    tokio::time::sleep(Duration::from_millis(HEARTBEAT_MS * 3)).await;
    assert_eq!(
        phases(&cluster, leader).get("alpha"),
        Some(&NodePhase::Ready)
    );

    // Restart alpha without a token: it reuses its identity.
    a.cancel.cancel();
    let _ = a.task.await;
    let a = spawn_agent(agent_config(&cluster, "alpha", None));
    tokio::time::sleep(Duration::from_millis(HEARTBEAT_MS * 4)).await;
    assert!(!a.task.is_finished(), "restarted agent stopped");
    let again = NodeIdentity::load(&a.data_dir)
        .expect("load")
        .expect("identity");
    assert_eq!(again.node_id, first.node_id);
    wait_phase(&cluster, "alpha", NodePhase::Ready, Duration::from_secs(5)).await;

    // Remove alpha: its next call is refused and the agent stops.
    NodeServiceClient::new(channel(&addr))
        .remove(pb::NodeActionRequest {
            write: None,
            id: first.node_id.clone(),
        })
        .await
        .expect("remove");
    let result = tokio::time::timeout(Duration::from_secs(5), a.task)
        .await
        .expect("agent still running after its node was removed")
        .expect("join");
    match result {
        Err(AgentError::Removed(m)) => assert!(m.contains(&first.node_id), "{m}"),
        other => panic!("expected Removed, got {other:?}"),
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn losing_the_leader_does_not_mark_heartbeating_nodes_down() {
    let (mut cluster, leader, addr) = fast_cluster(3600).await;
    let tok = token(&addr, 3, "b").await;
    let names = ["n-one", "n-two", "n-three"];
    let agents: Vec<Agent> = names
        .iter()
        .map(|n| spawn_agent(agent_config(&cluster, n, Some(tok.clone()))))
        .collect();
    for n in names {
        wait_phase(&cluster, n, NodePhase::Ready, Duration::from_secs(10)).await;
    }

    // Stop the leader while the agents heartbeat; watch the survivors for
    // longer than the Down timeout and the grace period together.
    cluster.stop(leader).await;
    let until = Instant::now() + Duration::from_millis(DOWN_AFTER_MS + GRACE_MS + 2000);
    while Instant::now() < until {
        for i in running(&cluster) {
            for (name, phase) in phases(&cluster, i) {
                assert_ne!(
                    phase,
                    NodePhase::Down,
                    "{name} declared Down on coordinator {i} after a leader change"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let new_leader = cluster.wait_for_leader().await;
    assert_ne!(new_leader, leader);
    for n in names {
        wait_phase(&cluster, n, NodePhase::Ready, Duration::from_secs(5)).await;
    }
    // The agents found the new leader: a stopped one is still detected.
    let victim = &agents[0];
    victim.cancel.cancel();
    wait_phase(
        &cluster,
        names[0],
        NodePhase::Down,
        Duration::from_millis(DOWN_AFTER_MS + 3000),
    )
    .await;
    for a in &agents {
        a.cancel.cancel();
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_calls_need_a_node_certificate() {
    let cluster = InProcessCluster::start(1, |_| {}).await;
    let addr = cluster.addr(0);
    // The admin certificate the harness uses is not a node.
    let err = pb::agent_service_client::AgentServiceClient::new(channel(&addr))
        .heartbeat(pb::HeartbeatRequest::default())
        .await
        .expect_err("admin heartbeat accepted");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    assert!(err.message().contains("agent APIs"), "{err}");

    // Enrollment without the right CA fails at the handshake; a missing token
    // and a missing CA are configuration errors naming the flag.
    let mut cfg = agent_config(&cluster, "gamma", None);
    let err = cloudless_agent::load_or_enroll(&cfg)
        .await
        .expect_err("enrolled without a token");
    assert!(err.to_string().contains("--join-token"), "{err}");
    cfg.join_token = Some(token(&addr, 1, "c").await);
    cfg.ca_cert = None;
    let err = cloudless_agent::load_or_enroll(&cfg)
        .await
        .expect_err("enrolled without a CA");
    assert!(err.to_string().contains("--ca-cert"), "{err}");
    cluster.shutdown().await;
}

fn spawn_agent_process(
    cluster: &InProcessCluster,
    data_dir: &std::path::Path,
    token_file: Option<&std::path::Path>,
    log: &std::path::Path,
) -> std::process::Child {
    let mut cmd = std::process::Command::new(cloudless_test::workspace_binary("cloudless-agent"));
    cmd.arg("--data-dir")
        .arg(data_dir)
        .arg("--coordinator")
        .arg(
            (0..cluster.configs.len())
                .map(|i| cluster.addr(i))
                .collect::<Vec<_>>()
                .join(","),
        )
        .args([
            "--name",
            "proc-agent",
            "--label",
            "rack=r1",
            "--log-filter",
            "debug",
            "--no-workloads",
            "--metrics-addr",
            "off",
        ])
        .arg("--ca-cert")
        .arg(cluster.configs[0].data_dir.join("admin/ca.crt"))
        .stdout(std::process::Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .expect("log file"),
        );
    if let Some(t) = token_file {
        cmd.arg("--join-token-file").arg(t);
    }
    cmd.spawn().expect("spawn cloudless-agent")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sigkilled_agent_process_is_down_within_the_timeout_and_rejoins_with_its_identity() {
    let (cluster, leader, addr) = fast_cluster(3600).await;
    let tok = token(&addr, 1, "p").await;
    let token_file = cluster.dir.path().join("join-token");
    std::fs::write(&token_file, tok.as_bytes()).expect("token file");
    let data_dir = cluster.dir.path().join("proc-agent");
    let log = cluster.dir.path().join("agent.log");

    let mut child = spawn_agent_process(&cluster, &data_dir, Some(&token_file), &log);
    wait_phase(
        &cluster,
        "proc-agent",
        NodePhase::Ready,
        Duration::from_secs(15),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(GRACE_MS)).await;
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    let killed = Instant::now();
    wait_phase(
        &cluster,
        "proc-agent",
        NodePhase::Down,
        Duration::from_millis(DOWN_AFTER_MS + 5000),
    )
    .await;
    let detection = killed.elapsed();
    assert!(
        detection < Duration::from_millis(DOWN_AFTER_MS + 1000),
        "Down on every coordinator after {detection:?}; configured {DOWN_AFTER_MS} ms"
    );

    // Back without a token (the single-use token is spent): same identity, Ready again.
    let mut child = spawn_agent_process(&cluster, &data_dir, None, &log);
    wait_phase(
        &cluster,
        "proc-agent",
        NodePhase::Ready,
        Duration::from_secs(15),
    )
    .await;
    let nodes = cluster.nodes[leader]
        .as_ref()
        .expect("leader")
        .handle()
        .reader()
        .nodes()
        .expect("nodes");
    assert_eq!(nodes.len(), 1, "a second node record appeared: {nodes:?}");
    assert_eq!(nodes[0].down_count, 1);
    assert!(nodes[0].reliability < 1.0);
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");

    // Debug logs of both runs: never the token or the key.
    let text = std::fs::read_to_string(&log).expect("agent log");
    assert!(!text.contains(tok.as_str()), "the join token was logged");
    assert!(!text.contains("PRIVATE KEY"), "key material was logged");
    cluster.shutdown().await;
}
