//! The watch pushes endpoint changes made anywhere to every agent.

use std::time::Duration;

use cloudless_state::{Command, NodeUpdate, Proposal, ReplicaUpdate, Request, StateMachine};
use cloudless_types::{
    ContainerPort, JoinTokenRecord, NodePhase, NodeRecord, ReplicaRecord, ReplicaState, Workload,
    WorkloadSpec,
};
use openraft::storage::RaftStateMachine;

use super::*;

/// How long an agent may wait for a change (the target for an
/// endpoint leaving the rotation, of which this is the coordinator's part).
const PROMPTLY: Duration = Duration::from_secs(2);

struct Cluster {
    sm: StateMachine,
    next: u64,
    _dir: tempfile::TempDir,
}

impl Cluster {
    async fn apply(&mut self, command: Command) {
        let entry = openraft::Entry::<cloudless_state::TypeConfig> {
            log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), self.next),
            payload: openraft::EntryPayload::Normal(Proposal {
                requests: vec![Request {
                    idempotency_key: None,
                    proposed_at_ms: 1_000 + i64::try_from(self.next).unwrap_or(0),
                    command,
                }],
            }),
        };
        self.next += 1;
        self.sm.apply(vec![entry]).await.expect("apply");
    }
}

fn phase(node: &str, phase: NodePhase) -> Command {
    Command::UpdateNodes {
        updates: vec![NodeUpdate {
            node_id: node.into(),
            phase: Some(phase),
            last_heartbeat_ms: 0,
            reliability: None,
            status: None,
        }],
    }
}

fn report(state: ReplicaState) -> Command {
    Command::UpdateReplicas {
        updates: vec![ReplicaUpdate {
            id: "web-1".into(),
            node_id: "n2".into(),
            state,
            exit_code: None,
            restarts: 0,
            message: String::new(),
            address: "10.244.1.5".into(),
        }],
    }
}

/// A cluster of n1, n2 and n3, all Ready, and `default/web` (one port)
/// with its replica `web-1` on n2, Pending.
async fn cluster() -> Cluster {
    let dir = tempfile::tempdir().expect("tempdir");
    let sm = StateMachine::open(
        &dir.path().join("state.redb"),
        prometheus_client::metrics::histogram::Histogram::new([1.0]),
    )
    .expect("state");
    let mut c = Cluster {
        sm,
        next: 1,
        _dir: dir,
    };
    c.apply(Command::InitCluster {
        cluster_id: "c".into(),
        config: cloudless_types::ClusterConfig::default(),
    })
    .await;
    c.apply(Command::CreateJoinToken {
        token: JoinTokenRecord {
            id: "t".into(),
            created_at_ms: 0,
            expires_at_ms: i64::MAX,
            max_uses: 9,
            uses: 0,
            revoked: false,
            labels: Default::default(),
        },
    })
    .await;
    for n in ["n1", "n2", "n3"] {
        c.apply(Command::EnrollNode {
            token_id: "t".into(),
            node: NodeRecord::new(n.into(), n.into(), "t".into(), 0),
            assign_subnet: true,
        })
        .await;
        c.apply(phase(n, NodePhase::Ready)).await;
    }
    let spec = WorkloadSpec {
        image: "busybox:1".into(),
        replicas: 1,
        ports: vec![ContainerPort {
            container_port: 8080,
            ..ContainerPort::default()
        }],
        ..WorkloadSpec::default()
    };
    c.apply(Command::PutWorkload {
        workload: Workload {
            namespace: "default".into(),
            name: "web".into(),
            spec: spec.clone(),
            generation: 0,
            created_at_ms: 0,
            updated_at_ms: 0,
            template: 0,
            revisions: Vec::new(),
            vip: None,
        },
        cause: "apply".into(),
        assign_vip: true,
    })
    .await;
    c.apply(Command::PlaceReplicas {
        replicas: vec![ReplicaRecord {
            id: "web-1".into(),
            namespace: "default".into(),
            workload: "web".into(),
            template: 1,
            spec,
            node_id: "n2".into(),
            state: ReplicaState::Pending,
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
        }],
    })
    .await;
    c
}

type Watch = mpsc::Receiver<Result<AssignmentSet, Status>>;

fn watch(c: &Cluster, node: &str, stopping: &CancellationToken) -> Watch {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(send_views(
        c.sm.reader(),
        Arc::new(WatchCaches::default()),
        node.to_owned(),
        tx,
        || Ok(()),
        stopping.clone(),
    ));
    rx
}

/// The next set `w` receives within [`PROMPTLY`].
async fn next(w: &mut Watch) -> AssignmentSet {
    tokio::time::timeout(PROMPTLY, w.recv())
        .await
        .expect("a new set within 2 s")
        .expect("the watch is open")
        .expect("a set, not an error")
}

/// The endpoints of `default/web` in `set`, by replica id.
fn endpoints(set: &AssignmentSet) -> Vec<String> {
    let web = set
        .services
        .iter()
        .find(|s| s.namespace == "default" && s.workload == "web")
        .expect("web is a service");
    assert_eq!(web.vip, "10.96.0.2");
    web.endpoints.iter().map(|e| e.replica_id.clone()).collect()
}

#[tokio::test]
async fn readiness_and_node_phase_changes_anywhere_reach_every_watching_agent() {
    let mut c = cluster().await;
    let stopping = CancellationToken::new();
    // n1 and n3 run nothing: only the services part of their views moves.
    let mut watches = [watch(&c, "n1", &stopping), watch(&c, "n3", &stopping)];
    for w in &mut watches {
        let first = next(w).await;
        assert_eq!(endpoints(&first), Vec::<String>::new(), "web-1 is Pending");
        assert!(first.assignments.is_empty());
        assert_eq!(first.runs.len(), 1, "n2 runs web");
        assert_eq!(first.runs[0].node_ids, ["n2"]);
    }

    tracing::info!("web-1 becomes Ready: every agent adds it");
    c.apply(report(ReplicaState::Ready)).await;
    for w in &mut watches {
        let set = next(w).await;
        assert_eq!(endpoints(&set), ["web-1"]);
        let e = &set.services[0].endpoints[0];
        assert_eq!(
            (e.node_id.as_str(), e.address.as_str()),
            ("n2", "10.244.1.5")
        );
    }

    tracing::info!("web-1 fails its readiness probe: every agent drops it");
    c.apply(report(ReplicaState::Running)).await;
    for w in &mut watches {
        assert_eq!(endpoints(&next(w).await), Vec::<String>::new());
    }
    c.apply(report(ReplicaState::Ready)).await;
    for w in &mut watches {
        assert_eq!(endpoints(&next(w).await), ["web-1"]);
    }

    tracing::info!("a change that alters no view sends nothing");
    c.apply(Command::RecordEvents { events: vec![] }).await;
    for w in &mut watches {
        assert!(
            tokio::time::timeout(Duration::from_millis(200), w.recv())
                .await
                .is_err(),
            "a set was sent for nothing"
        );
    }

    for gone in [NodePhase::Suspect, NodePhase::Down] {
        tracing::info!(phase = ?gone, "n2 stops answering: every agent drops web-1");
        c.apply(phase("n2", gone)).await;
        for w in &mut watches {
            assert_eq!(endpoints(&next(w).await), Vec::<String>::new());
        }
        c.apply(phase("n2", NodePhase::Ready)).await;
        for w in &mut watches {
            assert_eq!(endpoints(&next(w).await), ["web-1"]);
        }
    }

    tracing::info!("n2 drains: every agent drops web-1");
    c.apply(Command::SetNodeFlags {
        node_id: "n2".into(),
        cordoned: None,
        draining: Some(true),
    })
    .await;
    for w in &mut watches {
        assert_eq!(endpoints(&next(w).await), Vec::<String>::new());
    }
    c.apply(Command::SetNodeFlags {
        node_id: "n2".into(),
        cordoned: Some(false),
        draining: Some(false),
    })
    .await;
    for w in &mut watches {
        assert_eq!(endpoints(&next(w).await), ["web-1"]);
    }

    tracing::info!("n2 is removed: every agent drops web-1, and n2 runs nothing");
    c.apply(Command::RemoveNode {
        node_id: "n2".into(),
    })
    .await;
    for w in &mut watches {
        let set = next(w).await;
        assert_eq!(endpoints(&set), Vec::<String>::new());
        assert!(set.runs.is_empty(), "{:?}", set.runs);
    }

    tracing::info!("the coordinator stops: the watch ends with UNAVAILABLE");
    stopping.cancel();
    for w in &mut watches {
        let end = tokio::time::timeout(PROMPTLY, w.recv())
            .await
            .expect("in time")
            .expect("a last message");
        assert_eq!(end.expect_err("an error").code(), tonic::Code::Unavailable);
    }
}

#[tokio::test]
async fn an_ingress_node_is_told_so_and_every_node_is_told_the_ingress_nodes() {
    let mut c = cluster().await;
    let stopping = CancellationToken::new();
    let mut n1 = watch(&c, "n1", &stopping);
    let mut n3 = watch(&c, "n3", &stopping);
    let first = next(&mut n1).await;
    assert!(!first.ingress && first.ingress_node_ids.is_empty());
    next(&mut n3).await;
    c.apply(Command::SetNodeLabels {
        node_id: "n1".into(),
        set: [("ingress".to_owned(), "true".to_owned())].into(),
        remove: Vec::new(),
    })
    .await;
    let set = next(&mut n1).await;
    assert!(set.ingress);
    assert_eq!(set.ingress_node_ids, ["n1"]);
    let set = next(&mut n3).await;
    assert!(!set.ingress);
    assert_eq!(set.ingress_node_ids, ["n1"]);
    // Suspect: no longer listed for others, still listening itself.
    c.apply(phase("n1", NodePhase::Suspect)).await;
    let set = next(&mut n1).await;
    assert!(set.ingress && set.ingress_node_ids.is_empty());
    stopping.cancel();
}
