//! Tests of the node commands.

use cloudless_types::{NodeStatus, ReplicaState, Workload};
use prometheus_client::metrics::histogram::Histogram;
use redb::Database;

use super::*;
use crate::apply::testing::{apply, db};
use crate::command::Command;
use crate::StateMachine;

fn node(db: &Database, id: &str) -> NodeRecord {
    let txn = db.begin_write().expect("txn");
    get_json::<NodeRecord>(&txn, NODES, id)
        .expect("read")
        .expect("present")
}

fn update(id: &str, phase: Option<NodePhase>) -> NodeUpdate {
    NodeUpdate {
        node_id: id.into(),
        phase,
        last_heartbeat_ms: 0,
        reliability: None,
        status: None,
    }
}

#[test]
fn node_names_are_unique_phases_accumulate_uptime_and_removal_frees_the_name() {
    let db = db();
    let token = JoinTokenRecord {
        id: "t1".into(),
        created_at_ms: 0,
        expires_at_ms: 1_000_000,
        max_uses: 5,
        uses: 0,
        revoked: false,
        labels: [("zone".to_owned(), "a".to_owned())].into(),
    };
    apply(&db, Command::CreateJoinToken { token }, 0);
    let enroll = |id: &str, name: &str| Command::EnrollNode {
        token_id: "t1".into(),
        node: NodeRecord::new(id.into(), name.into(), "t1".into(), 0),
        assign_subnet: true,
    };
    assert!(matches!(
        apply(&db, enroll("n1", "alpha"), 1000),
        Response::Node(_)
    ));
    assert!(matches!(
        apply(&db, enroll("n2", "alpha"), 1000),
        Response::Rejected(Rejection::NodeNameTaken { .. })
    ));
    let n = node(&db, "n1");
    assert_eq!((n.phase, n.phase_since_ms), (NodePhase::Pending, 1000));
    assert_eq!(n.labels.get("zone").map(String::as_str), Some("a"));

    // Ready at 2 s, Down at 12 s (10 s of uptime), Ready again at 20 s.
    let status = NodeStatus {
        power_source: "battery".into(),
        battery_percent: 50,
        ..NodeStatus::default()
    };
    let mut ready = update("n1", Some(NodePhase::Ready));
    ready.status = Some(status.clone());
    let gone = update("ghost", Some(NodePhase::Down));
    assert_eq!(
        apply(
            &db,
            Command::UpdateNodes {
                updates: vec![ready, gone]
            },
            2000
        ),
        Response::NodesUpdated(1),
        "an update for a node that does not exist must be skipped"
    );
    apply(
        &db,
        Command::UpdateNodes {
            updates: vec![update("n1", Some(NodePhase::Down))],
        },
        12_000,
    );
    let mut again = update("n1", Some(NodePhase::Ready));
    again.reliability = Some(f64::NAN);
    apply(
        &db,
        Command::UpdateNodes {
            updates: vec![again],
        },
        20_000,
    );
    let n = node(&db, "n1");
    assert_eq!(n.phase, NodePhase::Ready);
    assert_eq!(n.phase_since_ms, 20_000);
    assert_eq!(n.ready_ms, 10_000);
    assert_eq!(n.down_count, 1);
    assert_eq!(n.status, status);
    assert!(n.reliability.is_finite(), "NaN reliability stored");

    apply(
        &db,
        Command::RemoveNode {
            node_id: "n1".into(),
        },
        30_000,
    );
    assert!(matches!(
        apply(&db, enroll("n3", "alpha"), 31_000),
        Response::Node(_)
    ));
}

#[test]
fn only_admin_commands_change_placement_labels_and_trusted_capacity() {
    let db = db();
    let token = JoinTokenRecord {
        id: "t1".into(),
        created_at_ms: 0,
        expires_at_ms: 1_000_000,
        max_uses: 1,
        uses: 0,
        revoked: false,
        labels: [("zone".to_owned(), "a".to_owned())].into(),
    };
    apply(&db, Command::CreateJoinToken { token }, 0);
    apply(
        &db,
        Command::EnrollNode {
            token_id: "t1".into(),
            node: NodeRecord::new("n1".into(), "alpha".into(), "t1".into(), 0),
            assign_subnet: true,
        },
        1000,
    );
    let report = |cpu_millis: u64, label: &str| {
        let mut u = update("n1", Some(NodePhase::Ready));
        u.status = Some(NodeStatus {
            capacity: Resources {
                cpu_millis,
                ..Resources::default()
            },
            reported_labels: [(label.to_owned(), "secure".to_owned())].into(),
            ..NodeStatus::default()
        });
        Command::UpdateNodes { updates: vec![u] }
    };
    apply(&db, report(4000, "tier"), 2000);
    let n = node(&db, "n1");
    assert_eq!(n.labels, [("zone".to_owned(), "a".to_owned())].into());
    assert_eq!(
        n.status.reported_labels.get("tier").map(String::as_str),
        Some("secure")
    );
    assert_eq!(
        n.trusted_capacity.cpu_millis, 4000,
        "the first report is trusted"
    );

    apply(&db, report(400_000, "tier"), 3000);
    let n = node(&db, "n1");
    assert_eq!(n.trusted_capacity.cpu_millis, 4000, "a later report is not");
    assert_eq!(n.placement_capacity().0.cpu_millis, 4000);

    let r = apply(
        &db,
        Command::AcceptNodeCapacity {
            node_id: "n1".into(),
        },
        4000,
    );
    assert!(matches!(r, Response::Node(n) if n.trusted_capacity.cpu_millis == 400_000));

    let r = apply(
        &db,
        Command::SetNodeLabels {
            node_id: "n1".into(),
            set: [("tier".to_owned(), "secure".to_owned())].into(),
            remove: vec!["zone".into(), "absent".into()],
        },
        5000,
    );
    let Response::Node(n) = r else {
        panic!("labels not set: {r:?}")
    };
    assert_eq!(n.labels, [("tier".to_owned(), "secure".to_owned())].into());
    assert!(matches!(
        apply(
            &db,
            Command::SetNodeLabels {
                node_id: "ghost".into(),
                set: std::collections::BTreeMap::new(),
                remove: Vec::new(),
            },
            6000,
        ),
        Response::Rejected(Rejection::NodeNotFound { .. })
    ));
}

#[test]
fn removing_a_node_removes_its_replicas_in_the_same_entry_with_an_event_each() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sm =
        StateMachine::open(&dir.path().join("state.redb"), Histogram::new([1.0])).expect("open");
    let token = JoinTokenRecord {
        id: "t1".into(),
        created_at_ms: 0,
        expires_at_ms: 1_000_000,
        max_uses: 5,
        uses: 0,
        revoked: false,
        labels: Default::default(),
    };
    apply(sm.db(), Command::CreateJoinToken { token }, 0);
    for (id, name) in [("n1", "alpha"), ("n2", "beta")] {
        apply(
            sm.db(),
            Command::EnrollNode {
                token_id: "t1".into(),
                node: NodeRecord::new(id.into(), name.into(), "t1".into(), 0),
                assign_subnet: true,
            },
            0,
        );
    }
    let spec = cloudless_types::WorkloadSpec {
        image: "busybox".into(),
        replicas: 3,
        ..Default::default()
    };
    let w = Workload {
        namespace: "default".into(),
        name: "web".into(),
        spec: spec.clone(),
        generation: 0,
        created_at_ms: 0,
        updated_at_ms: 0,
        template: 0,
        revisions: Vec::new(),
        vip: None,
    };
    apply(
        sm.db(),
        Command::PutWorkload {
            workload: w,
            cause: "apply".into(),
            assign_vip: true,
        },
        0,
    );
    let template = sm.reader().workloads(None).expect("read")[0].template;
    let replica = |id: &str, node: &str| ReplicaRecord {
        id: id.into(),
        namespace: "default".into(),
        workload: "web".into(),
        template,
        spec: spec.clone(),
        node_id: node.into(),
        state: ReplicaState::Ready,
        exit_code: None,
        restarts: 0,
        message: String::new(),
        created_at_ms: 0,
        updated_at_ms: 0,
        ready_at_ms: 0,
        disconnected_at_ms: 0,
        score: 0.0,
        address: String::new(),
        trace: String::new(),
    };
    let placed = apply(
        sm.db(),
        Command::PlaceReplicas {
            replicas: vec![
                replica("r1", "n1"),
                replica("r2", "n1"),
                replica("r3", "n2"),
            ],
        },
        5,
    );
    assert_eq!(placed, Response::ReplicasChanged(3));
    let reader = sm.reader();
    let (_, events_before) = reader.events(None, |_| true).expect("events");

    let r = apply(
        sm.db(),
        Command::RemoveNode {
            node_id: "n1".into(),
        },
        10,
    );
    assert_eq!(r, Response::NodeRemoved);

    assert!(reader.node_replicas("n1").expect("read").is_empty());
    let left: Vec<String> = reader
        .replicas()
        .expect("read")
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(
        left,
        vec!["r3".to_owned()],
        "only the other node's replica is left"
    );
    assert_eq!(
        reader
            .workload_replicas("default", "web")
            .expect("read")
            .len(),
        1
    );
    let (events, _) = reader.events(events_before, |_| true).expect("events");
    let lost: Vec<&str> = events
        .iter()
        .filter(|(_, e)| e.reason == "Lost")
        .map(|(_, e)| e.message.as_str())
        .collect();
    assert_eq!(lost.len(), 2, "{events:?}");
    assert!(lost
        .iter()
        .all(|m| m.contains("alpha") && m.contains("removed")));
}

/// A database with an initialised cluster whose replica range holds four
/// /24 subnets, and a join token for `uses` enrollments.
fn small_network(uses: u32) -> Database {
    let db = db();
    let mut config = cloudless_types::ClusterConfig::default();
    config.network.cluster_cidr = "10.0.0.0/22".into();
    apply(
        &db,
        Command::InitCluster {
            cluster_id: "c".into(),
            config,
        },
        0,
    );
    let token = JoinTokenRecord {
        id: "t1".into(),
        created_at_ms: 0,
        expires_at_ms: 1_000_000,
        max_uses: uses,
        uses: 0,
        revoked: false,
        labels: Default::default(),
    };
    apply(&db, Command::CreateJoinToken { token }, 0);
    db
}

fn enroll_as(db: &Database, id: &str, assign_subnet: bool) -> Response {
    apply(
        db,
        Command::EnrollNode {
            token_id: "t1".into(),
            node: NodeRecord::new(id.into(), id.into(), "t1".into(), 0),
            assign_subnet,
        },
        1000,
    )
}

fn subnet(db: &Database, id: &str) -> Option<String> {
    node(db, id).subnet
}

#[test]
fn every_enrolled_node_gets_its_own_subnet_the_lowest_free_one() {
    let db = small_network(10);
    for id in ["n1", "n2", "n3"] {
        assert!(matches!(enroll_as(&db, id, true), Response::Node(_)));
    }
    assert_eq!(subnet(&db, "n1").as_deref(), Some("10.0.0.0/24"));
    assert_eq!(subnet(&db, "n2").as_deref(), Some("10.0.1.0/24"));
    assert_eq!(subnet(&db, "n3").as_deref(), Some("10.0.2.0/24"));
    // Renewing the certificate (as a rejoin does) keeps the record and so
    // the subnet.
    apply(
        &db,
        Command::RenewNodeCert {
            node_id: "n2".into(),
            cert_not_after_ms: 99,
        },
        2000,
    );
    assert_eq!(subnet(&db, "n2").as_deref(), Some("10.0.1.0/24"));
}

#[test]
fn a_removed_nodes_subnet_goes_to_the_next_enrollment() {
    let db = small_network(10);
    for id in ["n1", "n2", "n3"] {
        enroll_as(&db, id, true);
    }
    apply(
        &db,
        Command::RemoveNode {
            node_id: "n2".into(),
        },
        2000,
    );
    enroll_as(&db, "n4", true);
    assert_eq!(subnet(&db, "n4").as_deref(), Some("10.0.1.0/24"));
    enroll_as(&db, "n5", true);
    assert_eq!(subnet(&db, "n5").as_deref(), Some("10.0.3.0/24"));
}

#[test]
fn an_enrollment_is_refused_when_every_subnet_is_taken() {
    let db = small_network(10);
    for id in ["n1", "n2", "n3", "n4"] {
        assert!(matches!(enroll_as(&db, id, true), Response::Node(_)));
    }
    let r = enroll_as(&db, "n5", true);
    let Response::Rejected(rejection @ Rejection::SubnetsExhausted { .. }) = r else {
        panic!("a fifth node enrolled in a range of four subnets: {r:?}")
    };
    let msg = rejection.to_string();
    assert!(msg.contains("every /24 of 10.0.0.0/22 is taken"), "{msg}");
    // Nothing changed: no record, the token's use not counted.
    let txn = db.begin_write().expect("txn");
    assert!(get_json::<NodeRecord>(&txn, NODES, "n5")
        .expect("read")
        .is_none());
    let t = get_json::<JoinTokenRecord>(&txn, JOIN_TOKENS, "t1")
        .expect("read")
        .expect("token");
    assert_eq!(t.uses, 4);
}

#[test]
fn nodes_enrolled_before_subnets_get_one_when_the_leader_asks() {
    let db = small_network(10);
    // Two nodes as format-4 enrollments left them, one enrolled since.
    enroll_as(&db, "old1", false);
    enroll_as(&db, "new", true);
    enroll_as(&db, "old2", false);
    assert_eq!(subnet(&db, "old1"), None);
    assert_eq!(subnet(&db, "new").as_deref(), Some("10.0.0.0/24"));
    let r = apply(
        &db,
        Command::AssignNodeSubnets {
            node_ids: vec!["old2".into(), "ghost".into(), "new".into(), "old1".into()],
        },
        2000,
    );
    assert_eq!(
        r,
        Response::NodesUpdated(2),
        "the gone and the served are skipped"
    );
    assert_eq!(subnet(&db, "old2").as_deref(), Some("10.0.1.0/24"));
    assert_eq!(subnet(&db, "old1").as_deref(), Some("10.0.2.0/24"));
    assert_eq!(subnet(&db, "new").as_deref(), Some("10.0.0.0/24"));
    // With the range exhausted, the rest keep none.
    enroll_as(&db, "n4", true);
    enroll_as(&db, "old3", false);
    let r = apply(
        &db,
        Command::AssignNodeSubnets {
            node_ids: vec!["old3".into()],
        },
        3000,
    );
    assert_eq!(r, Response::NodesUpdated(0));
    assert_eq!(subnet(&db, "old3"), None);
}

#[test]
fn a_network_change_may_widen_the_range_but_never_move_a_subnet() {
    let db = small_network(10);
    enroll_as(&db, "n1", true);
    enroll_as(&db, "n2", true);
    let set = |cidr: &str, prefix: u8| {
        let mut config = cloudless_types::ClusterConfig::default();
        config.network.cluster_cidr = cidr.into();
        config.network.node_prefix_len = prefix;
        apply(
            &db,
            Command::SetClusterConfig {
                config,
                expected_revision: None,
            },
            2000,
        )
    };
    for (cidr, prefix) in [
        ("10.0.0.0/24", 26),
        ("10.1.0.0/22", 24),
        ("10.0.0.0/23", 25),
    ] {
        let r = set(cidr, prefix);
        assert!(
            matches!(&r, Response::Rejected(Rejection::SubnetInUse { node, .. }) if node == "n1"),
            "{cidr} /{prefix}: {r:?}"
        );
    }
    assert!(matches!(set("10.0.0.0/16", 24), Response::ConfigSet(_)));
    enroll_as(&db, "n3", true);
    assert_eq!(subnet(&db, "n3").as_deref(), Some("10.0.2.0/24"));
}
