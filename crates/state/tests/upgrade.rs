//! Upgrades never strand a cluster: a data dir written by an earlier
//! release opens under this one and serves the same state.
//!
//! `tests/fixtures/<release>/` holds a coordinator data dir (Raft log, state
//! file, one snapshot) that the release named by the directory wrote through
//! a real single-node Raft: every log entry kind that release could write
//! (each `Command` and `SecretCommand` variant, blank and membership
//! entries, a request with an idempotency key, refused requests), a snapshot
//! taken halfway and entries after it. Next to it, `expected.json` is the
//! state that release served from it, read through `StateReader`.
//!
//! The fixture is written once, by the ignored test `write_upgrade_fixture`
//! run on that release (`FIXTURE_OUT=<dir> cargo test -p cloudless-state
//! --test upgrade -- --ignored write_upgrade_fixture`), and never rewritten:
//! a later release must read it as it is. A release that cannot (a format
//! raised without a migration) fails here; ADR 0007 says what to do then.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cloudless_state::{
    open_stores, Command, CoordinatorNode, NodeId, NodeUpdate, Proposal, Raft, ReconcileDecision,
    ReplicaUpdate, Request, RewrappedKey, Rollback, SecretCommand, StateMachine, StateReader,
    TypeConfig, SNAPSHOT_DIR,
};
use cloudless_types as t;
use openraft::error::{InstallSnapshotError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::storage::{RaftLogReader, RaftStateMachine};
use openraft::{EntryPayload, RaftLogId};
use prometheus_client::metrics::histogram::Histogram;
use serde_json::{json, Value};

/// The release whose data dir is checked in (the commit it was written at).
const FIXTURE: &str = "release-22fff72";
/// Every kind of log entry that release wrote.
const KINDS: &[&str] = &[
    "blank",
    "membership",
    "InitCluster",
    "SetClusterConfig",
    "PutWorkload",
    "ScaleWorkload",
    "DeleteWorkload",
    "InitIdentity",
    "CreateJoinToken",
    "RevokeJoinToken",
    "EnrollNode",
    "SetNodeFlags",
    "RemoveNode",
    "UpdateNodes",
    "RenewNodeCert",
    "PlaceReplicas",
    "RemoveReplicas",
    "RecordEvents",
    "UpdateReplicas",
    "MarkReplicasUnknown",
    "SetNodeLabels",
    "AcceptNodeCapacity",
    "PutAdmin",
    "RetireCoordinator",
    "Reconcile",
    "Secret::InitKeyring",
    "Secret::Put",
    "Secret::Delete",
    "Secret::Rotate",
    "Secret::Retire",
    "Secret::MintToken",
    "Secret::UseToken",
    "Secret::RecordUses",
    "Secret::RevokeToken",
    "Secret::Audit",
    "Secret::RewrapKeys",
    "Secret::RecordCounted",
];
const T0: i64 = 1_780_000_000_000;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(FIXTURE)
}

fn hist() -> Histogram {
    Histogram::new([1.0])
}

/// The entry's kind, as `KINDS` names it. Exhaustive on purpose: a new
/// variant must be named here, and the next fixture must contain it.
fn kind(c: &Command) -> String {
    let s = match c {
        Command::InitCluster { .. } => "InitCluster",
        Command::SetClusterConfig { .. } => "SetClusterConfig",
        Command::PutWorkload { .. } => "PutWorkload",
        Command::ScaleWorkload { .. } => "ScaleWorkload",
        Command::DeleteWorkload { .. } => "DeleteWorkload",
        Command::InitIdentity { .. } => "InitIdentity",
        Command::CreateJoinToken { .. } => "CreateJoinToken",
        Command::RevokeJoinToken { .. } => "RevokeJoinToken",
        Command::EnrollNode { .. } => "EnrollNode",
        Command::SetNodeFlags { .. } => "SetNodeFlags",
        Command::RemoveNode { .. } => "RemoveNode",
        Command::UpdateNodes { .. } => "UpdateNodes",
        Command::RenewNodeCert { .. } => "RenewNodeCert",
        Command::PlaceReplicas { .. } => "PlaceReplicas",
        Command::RemoveReplicas { .. } => "RemoveReplicas",
        Command::RecordEvents { .. } => "RecordEvents",
        Command::UpdateReplicas { .. } => "UpdateReplicas",
        Command::MarkReplicasUnknown { .. } => "MarkReplicasUnknown",
        Command::SetNodeLabels { .. } => "SetNodeLabels",
        Command::AcceptNodeCapacity { .. } => "AcceptNodeCapacity",
        Command::PutAdmin { .. } => "PutAdmin",
        Command::RetireCoordinator { .. } => "RetireCoordinator",
        Command::Reconcile(_) => "Reconcile",
        Command::AssignNodeSubnets { .. } => "AssignNodeSubnets",
        Command::AssignServiceVips { .. } => "AssignServiceVips",
        Command::Secret(s) => {
            return format!(
                "Secret::{}",
                match s {
                    SecretCommand::InitKeyring { .. } => "InitKeyring",
                    SecretCommand::Put { .. } => "Put",
                    SecretCommand::Delete { .. } => "Delete",
                    SecretCommand::Rotate { .. } => "Rotate",
                    SecretCommand::Retire { .. } => "Retire",
                    SecretCommand::MintToken { .. } => "MintToken",
                    SecretCommand::UseToken { .. } => "UseToken",
                    SecretCommand::RecordUses { .. } => "RecordUses",
                    SecretCommand::RevokeToken { .. } => "RevokeToken",
                    SecretCommand::Audit { .. } => "Audit",
                    SecretCommand::RewrapKeys { .. } => "RewrapKeys",
                    SecretCommand::RecordCounted { .. } => "RecordCounted",
                }
            )
        }
    };
    s.to_owned()
}

/// Everything a coordinator serves from its state, as JSON.
fn dump(r: &StateReader) -> Value {
    let nodes = r.nodes().expect("read");
    let tokens: Vec<Value> = ["tok-a", "tok-b", "tok-c"]
        .iter()
        .map(|id| json!(r.access_token(id).expect("read")))
        .collect();
    json!({
        "applied": format!("{:?}", r.applied().expect("read")),
        "cluster": r.cluster().expect("read"),
        "identity": r.identity().expect("read"),
        "workloads": r.workloads(None).expect("read"),
        "replicas": r.replicas().expect("read"),
        "node_replicas": nodes.iter().map(|n| (n.id.clone(), r.node_replicas(&n.id).expect("read"))).collect::<Vec<_>>(),
        "nodes": nodes,
        "join_tokens": r.join_tokens().expect("read"),
        "admins": r.admins().expect("read"),
        "retired_2": r.coordinator_retired(2).expect("read"),
        "secrets": r.secrets(None).expect("read"),
        "keyring": r.secret_keyring().expect("read"),
        "access_tokens": tokens,
        "access_token_count": r.access_token_count().expect("read"),
        "audit": r.audit(|_| true, 10_000).expect("read"),
        "events": r.events(None, |_| true).expect("read").0,
    })
}

/// What this release serves from an old data dir, without the fields added
/// since the fixture's release, after checking each holds its default
/// there (nothing an old release wrote can set them): replica networking
/// (`hostPort`, `egress`, the cluster's `network`, node subnets, replica
/// addresses), services (`ingressPort`, `service`, workload VIPs) and the
/// trace context of a replica's placement.
fn without_added_fields(mut v: Value) -> Value {
    fn strip(v: &mut Value, network: &Value) {
        match v {
            Value::Object(map) => {
                for (key, default) in [
                    ("hostPort", json!(0)),
                    ("egress", Value::Null),
                    ("subnet", Value::Null),
                    ("address", json!("")),
                    ("network", network.clone()),
                    ("ingressPort", json!(0)),
                    ("service", json!(t::ServiceSpec::default())),
                    ("vip", Value::Null),
                    ("trace", json!("")),
                ] {
                    if let Some(found) = map.get(key) {
                        assert_eq!(found, &default, "{key} of an old record");
                        map.remove(key);
                    }
                }
                map.values_mut().for_each(|v| strip(v, network));
            }
            Value::Array(items) => items.iter_mut().for_each(|v| strip(v, network)),
            _ => {}
        }
    }
    let network = json!(t::NetworkConfig::default());
    strip(&mut v, &network);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_of_the_previous_release_opens_and_serves_the_same_state() {
    let fixture = fixture_dir();
    let expected: Value = serde_json::from_slice(
        &std::fs::read(fixture.join("expected.json")).expect("read expected.json"),
    )
    .expect("expected.json");
    // Open a copy: opening must not need to change the files, but the test
    // never risks the fixture.
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    copy_dir(&fixture.join("data"), &data);
    let (mut log, mut sm) = open_stores(&data, hist()).expect("the old data dir opens");
    assert_eq!(
        without_added_fields(dump(&sm.reader())),
        expected,
        "the state file serves what it served"
    );

    // Every entry decodes, and the release's every entry kind is there.
    let entries = log.try_get_log_entries(0..u64::MAX).await.expect("log");
    let mut kinds = BTreeSet::new();
    for e in &entries {
        match &e.payload {
            EntryPayload::Blank => {
                kinds.insert("blank".to_owned());
            }
            EntryPayload::Membership(_) => {
                kinds.insert("membership".to_owned());
            }
            EntryPayload::Normal(p) => {
                for r in &p.requests {
                    // Format-4 enrollments gave no subnet, and workloads
                    // no VIP; read now, they still do not.
                    if let Command::EnrollNode {
                        assign_subnet,
                        node,
                        ..
                    } = &r.command
                    {
                        assert!(!assign_subnet && node.subnet.is_none(), "{r:?}");
                    }
                    if let Command::PutWorkload {
                        assign_vip,
                        workload,
                        ..
                    } = &r.command
                    {
                        assert!(!assign_vip && workload.vip.is_none(), "{r:?}");
                    }
                }
                kinds.extend(p.requests.iter().map(|r| kind(&r.command)));
            }
        }
    }
    let want: BTreeSet<String> = KINDS.iter().map(|k| (*k).to_owned()).collect();
    assert_eq!(
        want.difference(&kinds).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "entry kinds missing from the fixture"
    );

    // Replaying the whole log into an empty state machine gives the same state.
    let replay_dir = tempfile::tempdir().expect("tempdir");
    let (_l, mut fresh) = open_stores(replay_dir.path(), hist()).expect("open");
    fresh.apply(entries.clone()).await.expect("replay");
    assert_eq!(
        without_added_fields(dump(&fresh.reader())),
        expected,
        "replaying the old log gives the same state"
    );

    // The old snapshot installs, and the entries after it bring it level.
    let snap = sm
        .get_current_snapshot()
        .await
        .expect("snapshot")
        .expect("the fixture has a snapshot");
    let upto = snap.meta.last_log_id.expect("snapshot log id").index;
    let install_dir = tempfile::tempdir().expect("tempdir");
    let (_l, mut installed) = open_stores(install_dir.path(), hist()).expect("open");
    installed
        .install_snapshot(&snap.meta, snap.snapshot)
        .await
        .expect("the old snapshot installs");
    installed
        .apply(entries.into_iter().filter(|e| e.get_log_id().index > upto))
        .await
        .expect("apply the rest");
    assert_eq!(
        without_added_fields(dump(&installed.reader())),
        expected,
        "snapshot + rest"
    );
    drop((log, sm, installed, fresh));

    // A Raft node on the old data dir comes up as its leader and commits.
    let (log, sm) = open_stores(&data, hist()).expect("reopen");
    let reader = sm.reader();
    let raft = start_raft(log, sm).await;
    raft.wait(Some(Duration::from_secs(20)))
        .current_leader(1, "leader again")
        .await
        .expect("leader");
    let wrote = raft
        .client_write(proposal(
            T0 + 100_000,
            Command::ScaleWorkload {
                namespace: "prod".into(),
                name: "web".into(),
                replicas: 5,
            },
        ))
        .await
        .expect("a write commits on the old data dir");
    assert!(wrote.log_id.index > upto);
    let web = reader
        .workload("prod", "web")
        .expect("read")
        .expect("web is there");
    assert_eq!(web.spec.replicas, 5);
    // Nodes enrolled before subnets existed get one when the leader asks.
    let nodes: Vec<String> = reader
        .nodes()
        .expect("read")
        .into_iter()
        .map(|n| n.id)
        .collect();
    assert!(!nodes.is_empty());
    raft.client_write(proposal(
        T0 + 101_000,
        Command::AssignNodeSubnets {
            node_ids: nodes.clone(),
        },
    ))
    .await
    .expect("subnets for the old nodes");
    let subnets: BTreeSet<String> = reader
        .nodes()
        .expect("read")
        .into_iter()
        .filter_map(|n| n.subnet)
        .collect();
    assert_eq!(subnets.len(), nodes.len(), "one subnet each: {subnets:?}");
    // So do workloads with ports stored before services existed.
    let workloads: Vec<t::Workload> = reader.workloads(None).expect("read");
    assert!(workloads.iter().all(|w| w.vip.is_none()));
    raft.client_write(proposal(
        T0 + 102_000,
        Command::AssignServiceVips {
            workloads: workloads
                .iter()
                .map(|w| (w.namespace.clone(), w.name.clone()))
                .collect(),
        },
    ))
    .await
    .expect("VIPs for the old workloads");
    for w in reader.workloads(None).expect("read") {
        assert_eq!(
            w.vip.is_some(),
            !w.spec.ports.is_empty(),
            "{}/{}: {:?}",
            w.namespace,
            w.name,
            w.vip
        );
    }
    assert_eq!(
        reader
            .workload("prod", "web")
            .expect("read")
            .and_then(|w| w.vip)
            .as_deref(),
        Some("10.96.0.2")
    );
    raft.shutdown().await.expect("shutdown");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read fixture dir") {
        let e = e.expect("entry");
        let dest = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), &dest).expect("copy");
        }
    }
}

// ---------------------------------------------------------------------------
// The fixture writer (run once, on the release the fixture is named after).

/// A single coordinator never calls its peers.
#[derive(Clone, Default)]
struct NoPeers;

impl RaftNetworkFactory<TypeConfig> for NoPeers {
    type Network = NoPeers;
    async fn new_client(&mut self, _: NodeId, _: &CoordinatorNode) -> NoPeers {
        NoPeers
    }
}

fn unreachable<E: std::error::Error>() -> RPCError<NodeId, CoordinatorNode, E> {
    RPCError::Unreachable(Unreachable::new(&std::io::Error::other(
        "a single coordinator has no peers",
    )))
}

impl RaftNetwork<TypeConfig> for NoPeers {
    async fn append_entries(
        &mut self,
        _: AppendEntriesRequest<TypeConfig>,
        _: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, CoordinatorNode, RaftError<NodeId>>>
    {
        Err(unreachable())
    }
    async fn install_snapshot(
        &mut self,
        _: InstallSnapshotRequest<TypeConfig>,
        _: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, CoordinatorNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        Err(unreachable())
    }
    async fn vote(
        &mut self,
        _: VoteRequest<NodeId>,
        _: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, CoordinatorNode, RaftError<NodeId>>> {
        Err(unreachable())
    }
}

async fn start_raft(log: cloudless_state::LogStore, sm: StateMachine) -> Raft {
    let config = openraft::Config {
        cluster_name: "cloudless".into(),
        heartbeat_interval: 100,
        election_timeout_min: 300,
        election_timeout_max: 600,
        // Snapshots only when asked; every entry stays in the log.
        snapshot_policy: openraft::SnapshotPolicy::Never,
        max_in_snapshot_log_to_keep: u64::MAX,
        ..openraft::Config::default()
    };
    Raft::new(
        1,
        Arc::new(config.validate().expect("config")),
        NoPeers,
        log,
        sm,
    )
    .await
    .expect("raft")
}

fn proposal(at_ms: i64, command: Command) -> Proposal {
    Proposal {
        requests: vec![Request {
            idempotency_key: None,
            proposed_at_ms: at_ms,
            command,
        }],
    }
}

fn audit(at_ms: i64, action: &str, secret: &str) -> t::AuditRecord {
    t::AuditRecord {
        at_ms,
        actor: "admin:alice".into(),
        source: "10.0.0.9:40000".into(),
        action: action.into(),
        namespace: "prod".into(),
        secret: secret.into(),
        token_id: String::new(),
        allowed: true,
        detail: String::new(),
    }
}

fn ciphertext(key_version: u32, tag: &str) -> t::SecretCiphertext {
    t::SecretCiphertext {
        key_version,
        dek_nonce: format!("dn-{tag}"),
        dek: format!("dek-{tag}"),
        nonce: format!("n-{tag}"),
        data: format!("data-{tag}"),
    }
}

fn secret_version(version: u64, at_ms: i64) -> t::SecretVersion {
    t::SecretVersion {
        version,
        ciphertext: ciphertext(1, &format!("db-{version}")),
        keys: vec!["PASSWORD".into(), "USER".into()],
        size: 24,
        created_at_ms: at_ms,
    }
}

fn key_version(version: u32, at_ms: i64) -> t::SecretKeyVersion {
    t::SecretKeyVersion {
        version,
        nonce: format!("kn-{version}"),
        sealed: format!("sealed-{version}"),
        created_at_ms: at_ms,
        retired: false,
    }
}

fn access_token(id: &str, at_ms: i64, max_uses: u32) -> t::AccessTokenRecord {
    t::AccessTokenRecord {
        id: id.into(),
        namespace: "prod".into(),
        secret: "db".into(),
        audience: "web".into(),
        issued_to: "node:n1".into(),
        issued_at_ms: at_ms,
        expires_at_ms: at_ms + 3_600_000,
        max_uses,
        uses: 0,
        revoked: false,
    }
}

/// A spec using every part of a workload spec.
fn full_spec(image: &str, replicas: u32) -> t::WorkloadSpec {
    serde_json::from_value(json!({
        "image": image,
        "command": ["/bin/sh", "-c"],
        "args": ["httpd -f -p 8080"],
        "env": {"MODE": "prod"},
        "replicas": replicas,
        "requests": {"cpuMillis": 100, "memoryBytes": 67108864, "pids": 64},
        "limits": {"cpuMillis": 500, "memoryBytes": 134217728},
        "labels": {"app": "web"},
        "priority": 10,
        "placement": {"zones": ["a", "b"], "nodeSelector": {"disk": "ssd"},
                      "antiAffinity": "Node", "strategy": "Spread"},
        "restartPolicy": "OnFailure",
        "rollout": {"type": "RollingUpdate", "maxSurge": 1, "maxUnavailable": 0,
                    "progressDeadlineSeconds": 60, "minAvailable": 1},
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 2},
        "livenessProbe": {"tcpSocket": {"port": 8080}},
        "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
        "securityContext": {"runAsUser": 1000, "runAsNonRoot": true,
                            "readOnlyRootFilesystem": true,
                            "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]},
                            "seccompProfile": {"type": "Strict"}},
        "volumes": [{"name": "scratch", "emptyDir": {"medium": "Memory", "sizeLimitBytes": 1048576}},
                    {"name": "creds", "secret": {"secretName": "db",
                                                 "items": [{"key": "PASSWORD", "path": "pw"}]}}],
        "volumeMounts": [{"name": "scratch", "mountPath": "/tmp"},
                         {"name": "creds", "mountPath": "/run/creds", "readOnly": true}],
        "disconnect": {"lostAfterSeconds": 30, "replace": true,
                       "stopOnClientAfterSeconds": 120, "reconcile": "BestScore"},
        "secretEnv": [{"name": "DB_PASSWORD", "secretKeyRef": {"name": "db", "key": "PASSWORD"}}],
        "upstreams": [{"workload": "api", "port": 9000, "localPort": 19000}],
    }))
    .expect("a full spec")
}

fn workload(name: &str, spec: t::WorkloadSpec) -> t::Workload {
    t::Workload {
        namespace: "prod".into(),
        name: name.into(),
        spec,
        generation: 0,
        created_at_ms: 0,
        updated_at_ms: 0,
        template: 0,
        revisions: Vec::new(),
        vip: None,
    }
}

fn replica(
    id: &str,
    name: &str,
    node: &str,
    template: u64,
    spec: &t::WorkloadSpec,
) -> t::ReplicaRecord {
    t::ReplicaRecord {
        id: id.into(),
        namespace: "prod".into(),
        workload: name.into(),
        template,
        spec: spec.clone(),
        node_id: node.into(),
        state: t::ReplicaState::Pending,
        exit_code: None,
        restarts: 0,
        message: String::new(),
        created_at_ms: T0,
        updated_at_ms: T0,
        ready_at_ms: 0,
        disconnected_at_ms: 0,
        score: 0.75,
        address: String::new(),
        trace: String::new(),
    }
}

fn event(at_ms: i64, object: &str, reason: &str) -> t::EventRecord {
    t::EventRecord {
        at_ms,
        kind: "Normal".into(),
        namespace: "prod".into(),
        object: object.into(),
        reason: reason.into(),
        message: format!("{reason} {object}"),
    }
}

/// Every command the release could write, in an order that makes sense to
/// its state machine (most are applied, a few are refused on purpose).
fn history() -> Vec<Vec<Request>> {
    let at = |s: i64| T0 + s * 1000;
    let req = |s: i64, command: Command| Request {
        idempotency_key: None,
        proposed_at_ms: at(s),
        command,
    };
    let web1 = full_spec("registry.local/web:1", 2);
    let mut web2 = web1.clone();
    web2.image = "registry.local/web:2".into();
    let api = t::WorkloadSpec {
        image: "registry.local/api:1".into(),
        replicas: 1,
        ..Default::default()
    };
    let node = |id: &str, name: &str| t::NodeRecord {
        labels: [("zone".to_owned(), "a".to_owned())].into(),
        ..t::NodeRecord::new(id.into(), name.into(), "join-1".into(), at(86_400))
    };
    let status = t::NodeStatus {
        capacity: t::Resources {
            cpu_millis: 4000,
            memory_bytes: 8 << 30,
            storage_bytes: 64 << 30,
            bandwidth_bps: 100_000_000,
            pids: 4096,
        },
        reported_labels: [("arch".to_owned(), "arm64".to_owned())].into(),
        conditions: vec!["MemoryPressure".into()],
        power_source: "battery".into(),
        battery_percent: 80,
        overlay_addresses: vec!["192.0.2.10:7443".into()],
    };
    let ready = |id: &str, s: i64| NodeUpdate {
        node_id: id.into(),
        phase: Some(t::NodePhase::Ready),
        last_heartbeat_ms: at(s),
        reliability: Some(0.9),
        status: Some(status.clone()),
    };
    let update = |id: &str, node: &str, state: t::ReplicaState| ReplicaUpdate {
        id: id.into(),
        node_id: node.into(),
        state,
        exit_code: (state == t::ReplicaState::Failed).then_some(137),
        restarts: 1,
        message: "reported".into(),
        address: String::new(),
    };
    let join = |id: &str, max_uses: u32| t::JoinTokenRecord {
        id: id.into(),
        created_at_ms: at(3),
        expires_at_ms: at(86_400),
        max_uses,
        uses: 0,
        revoked: false,
        labels: [("zone".to_owned(), "a".to_owned())].into(),
    };
    let put_secret = |s: i64, version: u64, create: bool| {
        Command::Secret(SecretCommand::Put {
            namespace: "prod".into(),
            name: "db".into(),
            version: secret_version(version, at(s)),
            create,
            audiences: Some(vec!["web".into()]),
            immutable: false,
            expires_at_ms: Some(0),
            audit: audit(at(s), if create { "create" } else { "update" }, "db"),
        })
    };
    let mut config = t::ClusterConfig {
        cluster_name: "fixture".into(),
        ..t::ClusterConfig::default()
    };
    let init = Command::InitCluster {
        cluster_id: "c-0001".into(),
        config: config.clone(),
    };
    config.labels = [("env".to_owned(), "test".to_owned())].into();
    config.audit_retention_days = 30;
    vec![
        vec![req(1, init)],
        vec![req(
            2,
            Command::SetClusterConfig {
                config,
                expected_revision: Some(1),
            },
        )],
        vec![req(
            2,
            Command::InitIdentity {
                material: t::IdentityMaterial {
                    ca_cert_pem:
                        "-----BEGIN CERTIFICATE-----\nfixture\n-----END CERTIFICATE-----\n".into(),
                    ca_key: t::SealedSecret {
                        nonce: "ca-n".into(),
                        ciphertext: "ca-c".into(),
                    },
                    token_key: t::SealedSecret {
                        nonce: "tk-n".into(),
                        ciphertext: "tk-c".into(),
                    },
                },
            },
        )],
        vec![req(
            2,
            Command::Secret(SecretCommand::InitKeyring {
                key: key_version(1, at(2)),
            }),
        )],
        vec![
            req(
                3,
                Command::CreateJoinToken {
                    token: join("join-1", 3),
                },
            ),
            req(
                3,
                Command::CreateJoinToken {
                    token: join("join-2", 1),
                },
            ),
        ],
        vec![req(
            4,
            Command::RevokeJoinToken {
                token_id: "join-2".into(),
            },
        )],
        vec![
            req(
                5,
                Command::EnrollNode {
                    token_id: "join-1".into(),
                    node: node("n1", "phone-1"),
                    assign_subnet: true,
                },
            ),
            req(
                5,
                Command::EnrollNode {
                    token_id: "join-1".into(),
                    node: node("n2", "laptop-1"),
                    assign_subnet: true,
                },
            ),
            req(
                5,
                Command::EnrollNode {
                    token_id: "join-1".into(),
                    node: node("n3", "vps-1"),
                    assign_subnet: true,
                },
            ),
            // Refused: the token is revoked.
            req(
                5,
                Command::EnrollNode {
                    token_id: "join-2".into(),
                    node: node("n4", "gateway-1"),
                    assign_subnet: true,
                },
            ),
        ],
        vec![req(
            6,
            Command::UpdateNodes {
                updates: vec![ready("n1", 6), ready("n2", 6), ready("n3", 6)],
            },
        )],
        vec![req(
            7,
            Command::SetNodeLabels {
                node_id: "n2".into(),
                set: [
                    ("zone".to_owned(), "b".to_owned()),
                    ("disk".to_owned(), "ssd".to_owned()),
                ]
                .into(),
                remove: vec!["nothing".into()],
            },
        )],
        vec![req(
            7,
            Command::AcceptNodeCapacity {
                node_id: "n1".into(),
            },
        )],
        vec![req(
            8,
            Command::SetNodeFlags {
                node_id: "n3".into(),
                cordoned: Some(true),
                draining: None,
            },
        )],
        vec![req(
            8,
            Command::RenewNodeCert {
                node_id: "n1".into(),
                cert_not_after_ms: at(2 * 86_400),
            },
        )],
        vec![Request {
            idempotency_key: Some("apply-web-1".into()),
            ..req(
                9,
                Command::PutWorkload {
                    workload: workload("web", web1.clone()),
                    cause: "apply".into(),
                    assign_vip: false,
                },
            )
        }],
        vec![req(
            9,
            Command::PutWorkload {
                workload: workload("api", api.clone()),
                cause: "apply".into(),
                assign_vip: false,
            },
        )],
        vec![req(
            10,
            Command::ScaleWorkload {
                namespace: "prod".into(),
                name: "web".into(),
                replicas: 3,
            },
        )],
        vec![req(
            11,
            Command::PlaceReplicas {
                replicas: vec![
                    replica("r1", "web", "n1", 1, &web1),
                    replica("r2", "web", "n2", 1, &web1),
                    replica("r3", "web", "n3", 1, &web1),
                    replica("r4", "api", "n1", 1, &api),
                ],
            },
        )],
        vec![req(
            12,
            Command::UpdateReplicas {
                updates: vec![
                    update("r1", "n1", t::ReplicaState::Ready),
                    update("r2", "n2", t::ReplicaState::Running),
                    update("r3", "n3", t::ReplicaState::Failed),
                    update("r4", "n1", t::ReplicaState::Ready),
                    // Skipped: not the replica's node.
                    update("r1", "n2", t::ReplicaState::Failed),
                ],
            },
        )],
        vec![req(
            13,
            Command::MarkReplicasUnknown {
                ids: vec!["r2".into()],
                unknown: true,
            },
        )],
        vec![req(
            14,
            Command::MarkReplicasUnknown {
                ids: vec!["r2".into()],
                unknown: false,
            },
        )],
        vec![req(
            15,
            Command::RemoveReplicas {
                ids: vec!["r3".into(), "gone".into()],
            },
        )],
        vec![req(
            15,
            Command::RecordEvents {
                events: vec![event(0, "web", "Scaled"), event(at(15), "r3", "Removed")],
            },
        )],
        vec![req(
            16,
            Command::Reconcile(ReconcileDecision {
                rollbacks: vec![],
                mark_unknown: vec![],
                remove: vec![],
                place: vec![replica("r5", "web", "n2", 1, &web1)],
                clear_unknown: vec![],
                events: vec![event(at(16), "r5", "Placed")],
            }),
        )],
        // A new template whose rollout is then rolled back.
        vec![req(
            17,
            Command::PutWorkload {
                workload: workload("web", web2),
                cause: "apply".into(),
                assign_vip: false,
            },
        )],
        vec![req(
            18,
            Command::Reconcile(ReconcileDecision {
                rollbacks: vec![Rollback {
                    namespace: "prod".into(),
                    name: "web".into(),
                    from_template: 2,
                    spec: web1.clone(),
                }],
                mark_unknown: vec!["r4".into()],
                remove: vec!["r2".into()],
                place: vec![replica("r6", "web", "n1", 3, &web1)],
                clear_unknown: vec![],
                events: vec![event(at(18), "web", "RolledBack")],
            }),
        )],
        vec![req(
            19,
            Command::Reconcile(ReconcileDecision {
                clear_unknown: vec!["r4".into()],
                ..Default::default()
            }),
        )],
        vec![req(20, put_secret(20, 1, true))],
        vec![Request {
            idempotency_key: Some("update-db-2".into()),
            ..req(21, put_secret(21, 2, false))
        }],
        // Refused: version 5 is not the next one.
        vec![req(21, put_secret(21, 5, false))],
        vec![req(
            22,
            Command::Secret(SecretCommand::Put {
                namespace: "prod".into(),
                name: "old".into(),
                version: secret_version(1, at(22)),
                create: true,
                audiences: Some(vec!["api".into()]),
                immutable: true,
                expires_at_ms: Some(at(86_400)),
                audit: audit(at(22), "create", "old"),
            }),
        )],
        vec![req(
            23,
            Command::Secret(SecretCommand::Delete {
                namespace: "prod".into(),
                name: "old".into(),
                audit: audit(at(23), "delete", "old"),
            }),
        )],
        vec![
            req(
                24,
                Command::Secret(SecretCommand::MintToken {
                    token: access_token("tok-a", at(24), 1),
                    audit: audit(at(24), "mint", "db"),
                }),
            ),
            req(
                24,
                Command::Secret(SecretCommand::MintToken {
                    token: access_token("tok-b", at(24), 100),
                    audit: audit(at(24), "mint", "db"),
                }),
            ),
            req(
                24,
                Command::Secret(SecretCommand::MintToken {
                    token: access_token("tok-c", at(24), 100),
                    audit: audit(at(24), "mint", "db"),
                }),
            ),
        ],
        vec![req(
            25,
            Command::Secret(SecretCommand::UseToken {
                id: "tok-a".into(),
                actor: "node:n1".into(),
                audit: audit(at(25), "read", "db"),
            }),
        )],
        vec![req(
            26,
            Command::Secret(SecretCommand::RecordUses {
                uses: vec![("tok-b".into(), 3)],
                audits: vec![audit(at(26), "read", "db")],
            }),
        )],
        vec![req(
            27,
            Command::Secret(SecretCommand::RecordCounted {
                uses: vec![("tok-c".into(), 2)],
                audits: vec![(audit(at(27), "read", "db"), 2, at(27) + 500)],
            }),
        )],
        vec![req(
            28,
            Command::Secret(SecretCommand::RevokeToken {
                id: "tok-c".into(),
                audit: audit(at(28), "revoke", "db"),
            }),
        )],
        vec![req(
            29,
            Command::Secret(SecretCommand::Audit {
                records: vec![t::AuditRecord {
                    allowed: false,
                    detail: "audience api may not read db".into(),
                    ..audit(at(29), "read", "db")
                }],
            }),
        )],
        vec![req(
            30,
            Command::Secret(SecretCommand::Rotate {
                key: key_version(2, at(30)),
                expected_active: 1,
                rewrapped: vec![("prod".into(), "db".into(), 1, ciphertext(2, "db-1"))],
                audit: audit(at(30), "rotate", ""),
            }),
        )],
        vec![req(
            31,
            Command::Secret(SecretCommand::RewrapKeys {
                from_version: 1,
                to_version: 2,
                keys: vec![RewrappedKey {
                    namespace: "prod".into(),
                    name: "db".into(),
                    version: 2,
                    old_dek_nonce: "dn-db-2".into(),
                    dek_nonce: "dn2-db-2".into(),
                    dek: "dek2-db-2".into(),
                }],
            }),
        )],
        vec![req(
            32,
            Command::Secret(SecretCommand::Retire {
                version: 1,
                audit: audit(at(32), "retire", ""),
            }),
        )],
        vec![req(
            33,
            Command::PutAdmin {
                record: t::AdminRecord {
                    name: "alice".into(),
                    issued_at_s: at(33) / 1000,
                    not_after_s: at(33) / 1000 + 7 * 86_400,
                    issued_by: "bootstrap".into(),
                    revoked_before_s: 0,
                    revoked: false,
                },
                actor: None,
            },
        )],
        vec![req(
            34,
            Command::PutAdmin {
                record: t::AdminRecord {
                    name: "bob".into(),
                    issued_at_s: at(34) / 1000,
                    not_after_s: at(34) / 1000 + 86_400,
                    issued_by: "alice".into(),
                    revoked_before_s: at(34) / 1000,
                    revoked: true,
                },
                actor: Some(("alice".into(), at(33) / 1000)),
            },
        )],
        vec![req(35, Command::RetireCoordinator { node_id: 2 })],
        vec![req(
            36,
            Command::SetNodeFlags {
                node_id: "n3".into(),
                cordoned: None,
                draining: Some(true),
            },
        )],
        vec![req(
            37,
            Command::RemoveNode {
                node_id: "n3".into(),
            },
        )],
        vec![req(
            38,
            Command::DeleteWorkload {
                namespace: "prod".into(),
                name: "api".into(),
            },
        )],
        // Refused: no such workload.
        vec![req(
            39,
            Command::ScaleWorkload {
                namespace: "prod".into(),
                name: "missing".into(),
                replicas: 1,
            },
        )],
    ]
}

/// Writes `tests/fixtures/<FIXTURE>` (or `$FIXTURE_OUT`) with this
/// release's code. Run only on the release the fixture is named after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "writes the upgrade fixture; run once on the release it is named after"]
async fn write_upgrade_fixture() {
    let out = std::env::var_os("FIXTURE_OUT").map_or_else(fixture_dir, PathBuf::from);
    let data = out.join("data");
    assert!(!data.exists(), "{} exists; remove it first", data.display());
    let (log, sm) = open_stores(&data, hist()).expect("open");
    let reader = sm.reader();
    let raft = start_raft(log, sm).await;
    raft.initialize(
        [(
            1,
            CoordinatorNode {
                address: "127.0.0.1:7400".into(),
            },
        )]
        .into_iter()
        .collect::<std::collections::BTreeMap<_, _>>(),
    )
    .await
    .expect("initialize");
    raft.wait(Some(Duration::from_secs(20)))
        .current_leader(1, "leader")
        .await
        .expect("leader");
    let history = history();
    let half = history.len() / 2;
    for (i, requests) in history.into_iter().enumerate() {
        raft.client_write(Proposal { requests })
            .await
            .expect("write");
        if i + 1 == half {
            raft.trigger().snapshot().await.expect("snapshot");
            raft.wait(Some(Duration::from_secs(20)))
                .metrics(|m| m.snapshot.is_some(), "snapshot taken")
                .await
                .expect("snapshot");
        }
    }
    let applied = raft.metrics().borrow().last_applied;
    raft.wait(Some(Duration::from_secs(20)))
        .applied_index(applied.map(|l| l.index), "applied")
        .await
        .expect("applied");
    raft.shutdown().await.expect("shutdown");
    let expected = dump(&reader);
    std::fs::write(
        out.join("expected.json"),
        serde_json::to_vec_pretty(&expected).expect("json"),
    )
    .expect("write expected.json");
    assert!(data.join(SNAPSHOT_DIR).exists());
}
