//! Long-offline devices: an agent whose certificate expired while it was
//! stopped rejoins without a join token, by proving it holds its old key,
//! within the cluster's `node_rejoin_grace_s`; after the grace, once removed,
//! with another key or with a certificate from another CA it is refused.
//! Real agents (the agent library, over mTLS) against three in-process
//! coordinators, with real 60-second certificates that really expire.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use cloudless_agent::{AgentConfig, AgentError, NodeIdentity};
use cloudless_pki::{new_anonymous_csr, sign_rejoin_proof, ClusterCa, Identity};
use cloudless_proto::v1 as pb;
use cloudless_test::{channel, wait_until, InProcessCluster};
use cloudless_types::NodePhase;
use pb::cluster_service_client::ClusterServiceClient;
use pb::node_service_client::NodeServiceClient;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tracing::info;
use zeroize::Zeroizing;

/// The shortest node certificate lifetime the cluster allows.
const CERT_LIFETIME_S: u64 = 60;

fn now_s() -> i64 {
    cloudless_coordinator::now_ms() / 1000
}

/// Sets the node certificate lifetime and the rejoin grace (`None`: the
/// default), with fast heartbeats; returns the error of a refused change.
async fn set_config(addr: &str, grace_s: Option<u64>) -> Result<(), tonic::Status> {
    let mut c = ClusterServiceClient::new(channel(addr));
    let cfg = c
        .get_config(pb::GetConfigRequest { read: None })
        .await?
        .into_inner()
        .config
        .expect("config");
    c.set_config(pb::SetConfigRequest {
        write: None,
        config: Some(pb::ClusterConfig {
            heartbeat_interval_ms: 200,
            suspect_after_missed_heartbeats: 3,
            down_after_ms: 1500,
            leader_grace_ms: 3000,
            node_cert_lifetime_s: CERT_LIFETIME_S,
            node_rejoin_grace_s: grace_s,
            ..cfg
        }),
        expected_revision: 0,
    })
    .await
    .map(|_| ())
}

struct Agent {
    data_dir: PathBuf,
    cancel: CancellationToken,
    task: JoinHandle<Result<(), AgentError>>,
}

impl Agent {
    fn spawn(cluster: &InProcessCluster, name: &str, token: Option<Zeroizing<String>>) -> Self {
        let config = AgentConfig {
            data_dir: cluster.dir.path().join(format!("agent-{name}")),
            coordinators: (0..cluster.configs.len())
                .map(|i| cluster.addr(i))
                .collect(),
            name: name.to_owned(),
            join_token: token,
            ca_cert: Some(ca_path(cluster)),
            labels: BTreeMap::new(),
            runtime: None,
            overlay_listen: None,
            overlay_advertise: Vec::new(),
            overlay_hole_punching: false,
            bandwidth_bps: None,
            metrics_listen: None,
        };
        let cancel = CancellationToken::new();
        Self {
            data_dir: config.data_dir.clone(),
            task: tokio::spawn(cloudless_agent::run(config, cancel.clone())),
            cancel,
        }
    }

    fn identity(&self) -> NodeIdentity {
        NodeIdentity::load(&self.data_dir)
            .expect("load identity")
            .expect("an identity")
    }

    /// Stops the agent (as a device that is switched off).
    async fn stop(self) {
        self.cancel.cancel();
        let r = tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("agent stops")
            .expect("agent task");
        assert!(r.is_ok(), "agent failed: {r:?}");
    }

    /// Waits for the agent to end on its own, and returns its error.
    async fn failure(self) -> AgentError {
        let r = tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("agent ends by itself")
            .expect("agent task");
        r.expect_err("agent should have failed")
    }
}

fn ca_path(cluster: &InProcessCluster) -> PathBuf {
    cluster.configs[0].data_dir.join("admin/ca.crt")
}

fn phase(cluster: &InProcessCluster, name: &str) -> Option<NodePhase> {
    let c = cluster.nodes.iter().flatten().next()?;
    c.handle()
        .reader()
        .nodes()
        .ok()?
        .into_iter()
        .find(|n| n.name == name)
        .map(|n| n.phase)
}

async fn wait_ready(cluster: &InProcessCluster, name: &str) {
    wait_until(&format!("{name} Ready"), Duration::from_secs(20), || {
        cluster.nodes.iter().flatten().all(|c| {
            c.handle()
                .reader()
                .nodes()
                .ok()
                .and_then(|ns| ns.into_iter().find(|n| n.name == name))
                .is_some_and(|n| n.phase == NodePhase::Ready)
        })
    })
    .await;
}

/// A TLS channel trusting the cluster CA, presenting `identity` if given.
use cloudless_test::tls_channel;

/// A rejoin call by hand, the proof signed by `key_pem` for a fresh CSR.
async fn rejoin_with(
    addr: &str,
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<pb::RejoinResponse, tonic::Status> {
    let (csr, _) = new_anonymous_csr().expect("csr");
    let signed_at = now_s();
    let proof = sign_rejoin_proof(ca_pem, cert_pem, key_pem, &csr, signed_at).expect("proof");
    NodeServiceClient::new(tls_channel(addr, ca_pem, None))
        .rejoin(pb::RejoinRequest {
            cert_pem: cert_pem.to_owned(),
            csr_pem: csr,
            signed_at_s: signed_at,
            proof,
        })
        .await
        .map(tonic::Response::into_inner)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).expect("read")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_offline_past_its_certificate_rejoins_within_the_grace_and_is_refused_after_it() {
    let cluster = InProcessCluster::start(3, |_| {}).await;
    let leader = cluster.wait_for_leader().await;
    let addr = cluster.addr(leader);
    // A follower's address: rejoins there are forwarded to the leader.
    let follower = cluster.addr(cluster.follower());
    let ca_pem = read(&ca_path(&cluster));

    info!("phase: the grace is validated and names its field");
    let err = set_config(&addr, Some(400 * 24 * 3600))
        .await
        .expect_err("a grace above a year accepted");
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.message().contains("node_rejoin_grace_s"), "{err}");
    set_config(&addr, None).await.expect("fast config");

    info!("phase: three devices enroll with one token, become Ready, and are switched off");
    let token = NodeServiceClient::new(channel(&addr))
        .create_join_token(pb::CreateJoinTokenRequest {
            write: None,
            ttl_seconds: 600,
            max_uses: 3,
            labels: HashMap::new(),
        })
        .await
        .expect("token")
        .into_inner()
        .token;
    let names = ["phone", "tablet", "watch"];
    let mut identities = HashMap::new();
    for name in names {
        let agent = Agent::spawn(&cluster, name, Some(Zeroizing::new(token.clone())));
        wait_ready(&cluster, name).await;
        let id = agent.identity();
        // Stopped long before renewal is due (two thirds into the lifetime).
        assert!(now_s() < id.renew_at(), "{name} stopped too late");
        agent.stop().await;
        identities.insert(name, id);
    }

    info!("phase: the watch is removed while it is off");
    NodeServiceClient::new(channel(&addr))
        .remove(pb::NodeActionRequest {
            write: None,
            id: identities["watch"].node_id.clone(),
        })
        .await
        .expect("remove watch");

    info!("phase: the devices stay off until every certificate has expired");
    let last_expiry = identities.values().map(|i| i.not_after).max().expect("ids");
    wait_until(
        "every node certificate expired",
        Duration::from_secs(CERT_LIFETIME_S + 30),
        || now_s() > last_expiry + 1,
    )
    .await;
    let phone = &identities["phone"];
    let phone_key = read(&cluster.dir.path().join("agent-phone/node.key"));
    let err = pb::agent_service_client::AgentServiceClient::new(tls_channel(
        &addr,
        &ca_pem,
        Some((&phone.cert_pem, &phone_key)),
    ))
    .heartbeat(pb::HeartbeatRequest::default())
    .await
    .expect_err("an expired certificate passed TLS");
    info!(error = %err, "an expired client certificate is refused");

    info!("phase: a proof by another key is refused");
    let (_, other_key) = new_anonymous_csr().expect("key");
    let err = rejoin_with(&follower, &ca_pem, &phone.cert_pem, &other_key)
        .await
        .expect_err("forged proof accepted");
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    assert!(err.message().starts_with("proof:"), "{err}");

    info!("phase: a certificate for the same node from another CA is refused");
    let rogue = ClusterCa::generate("rogue", now_s() - 3600).expect("ca");
    let (csr, rogue_key) = new_anonymous_csr().expect("csr");
    let fake = rogue
        .sign_csr(
            &csr,
            &Identity::Node(phone.node_id.clone()),
            60,
            now_s() - 600,
        )
        .expect("fake");
    let err = rejoin_with(&follower, &ca_pem, &fake.cert_pem, &rogue_key)
        .await
        .expect_err("foreign certificate accepted");
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    assert!(
        err.message().contains("not issued by this cluster's CA"),
        "{err}"
    );

    info!("phase: the phone comes back within the grace, without a token, and is Ready");
    let agent = Agent::spawn(&cluster, "phone", None);
    wait_ready(&cluster, "phone").await;
    let renewed = agent.identity();
    assert_eq!(renewed.node_id, phone.node_id, "same node");
    assert!(renewed.not_after > now_s(), "a valid certificate");
    assert_ne!(renewed.cert_pem, phone.cert_pem);
    let record = cluster.nodes[leader]
        .as_ref()
        .expect("leader")
        .handle()
        .reader()
        .node(&phone.node_id)
        .expect("read")
        .expect("record");
    assert_eq!(record.cert_not_after_ms, renewed.not_after * 1000);
    assert_eq!(record.name, "phone");
    agent.stop().await;

    info!("phase: the old certificate and key cannot rejoin a second time");
    let err = rejoin_with(&addr, &ca_pem, &phone.cert_pem, &phone_key)
        .await
        .expect_err("superseded certificate rejoined");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(err.message().contains("newer certificate"), "{err}");

    info!("phase: the removed watch is told to enroll again");
    let err = Agent::spawn(&cluster, "watch", None).failure().await;
    assert!(matches!(err, AgentError::Removed(_)), "{err}");
    assert!(err.to_string().contains("new join token"), "{err}");
    assert_eq!(phase(&cluster, "watch"), None);

    info!("phase: with a grace shorter than the tablet's absence it is refused");
    set_config(&addr, Some(1)).await.expect("one-second grace");
    let tablet = &identities["tablet"];
    wait_until("the tablet past the grace", Duration::from_secs(10), || {
        now_s() > tablet.not_after + 1
    })
    .await;
    let err = Agent::spawn(&cluster, "tablet", None).failure().await;
    let AgentError::RejoinRefused { node_id, reason } = &err else {
        panic!("expected a rejoin refusal, got {err}");
    };
    assert_eq!(node_id, &tablet.node_id);
    assert!(reason.contains("rejoin grace"), "{err}");
    assert!(err.to_string().contains("--join-token"), "{err}");
    // Nothing was issued: the stored identity is the expired one.
    let stored = NodeIdentity::load(&cluster.dir.path().join("agent-tablet"))
        .expect("load")
        .expect("identity");
    assert_eq!(stored.cert_pem, tablet.cert_pem);

    info!("phase: a grace of 0 turns rejoining off");
    set_config(&addr, Some(0)).await.expect("rejoin off");
    let tablet_key = read(&cluster.dir.path().join("agent-tablet/node.key"));
    let err = rejoin_with(&addr, &ca_pem, &tablet.cert_pem, &tablet_key)
        .await
        .expect_err("rejoined while turned off");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("turned off"), "{err}");

    cluster.shutdown().await;
}
