//! Three-node coordinator clusters in one process over real loopback gRPC.

use std::time::Duration;

use cloudless_proto::v1 as pb;
use cloudless_test::{apply, channel, get, list_names_stale, wait_until, InProcessCluster};
use pb::cluster_service_client::ClusterServiceClient;
use pb::workload_service_client::WorkloadServiceClient;
use tracing::info;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn election_replication_and_follower_writes() {
    info!("phase: start three coordinators");
    let cluster = InProcessCluster::start(3, |_| {}).await;
    let leader = cluster.wait_for_leader().await;
    let follower = cluster.follower();

    info!("phase: a write sent to a follower is forwarded and committed");
    let r = apply(&cluster.addr(follower), "web", 2)
        .await
        .expect("write via follower");
    assert!(r.created);
    let commit = r.commit.expect("commit info");
    assert_eq!(
        commit.leader_id,
        cluster.nodes[leader]
            .as_ref()
            .expect("leader")
            .handle()
            .id()
    );

    info!("phase: a linearizable read from a follower sees it at once");
    let w = get(&cluster.addr(follower), "web", false)
        .await
        .expect("read")
        .expect("present");
    assert_eq!(w.spec.expect("spec").replicas, 2);
    assert_eq!(w.generation, 1);

    info!("phase: every node applies it");
    wait_until(
        "all nodes applied the write",
        Duration::from_secs(5),
        || (0..3).all(|i| cluster.applied(i) >= commit.log_index),
    )
    .await;
    for i in 0..3 {
        assert_eq!(
            list_names_stale(&cluster.addr(i))
                .await
                .expect("stale list"),
            ["web"]
        );
    }

    info!("phase: cluster status names the leader and indexes of every member");
    let s = ClusterServiceClient::new(channel(&cluster.addr(follower)))
        .status(pb::StatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(s.members.len(), 3);
    assert_eq!(s.coordinators.len(), 3);
    assert!(s
        .coordinators
        .iter()
        .all(|c| c.reachable && c.commit_index >= commit.log_index));
    assert_eq!(
        s.coordinators
            .iter()
            .filter(|c| c.state() == cloudless_proto::v1::RaftServerState::Leader)
            .count(),
        1
    );
    assert!(!s.cluster_id.is_empty());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_loss_keeps_every_acknowledged_write() {
    let mut cluster = InProcessCluster::start(3, |_| {}).await;
    let old = cluster.wait_for_leader().await;
    info!("phase: 50 acknowledged writes");
    for i in 0..50 {
        apply(&cluster.addr(old), &format!("w{i}"), 1)
            .await
            .expect("write");
    }
    info!("phase: stop the leader");
    cluster.stop(old).await;
    let new = cluster.wait_for_leader().await;
    assert_ne!(new, old);
    info!("phase: the new leader accepts writes");
    apply(&cluster.addr(new), "after-failover", 1)
        .await
        .expect("write after failover");
    let mut names = list_names_stale(&cluster.addr(new)).await.expect("list");
    names.sort();
    let mut expected: Vec<String> = (0..50).map(|i| format!("w{i}")).collect();
    expected.push("after-failover".into());
    expected.sort();
    assert_eq!(names, expected, "an acknowledged write was lost");

    info!("phase: the old leader restarts from disk and catches up");
    cluster.restart(old).await;
    wait_until("old leader caught up", Duration::from_secs(10), || {
        cluster.applied(old) >= cluster.applied(new)
    })
    .await;
    let mut names = list_names_stale(&cluster.addr(old)).await.expect("list");
    names.sort();
    assert_eq!(names, expected);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lagging_node_catches_up_by_snapshot_install() {
    let mut cluster = InProcessCluster::start(3, |c| {
        c.raft.snapshot_after_logs = 20;
        c.raft.logs_to_keep_after_snapshot = 0;
    })
    .await;
    let leader = cluster.wait_for_leader().await;
    let lagging = cluster.follower();
    info!(lagging, "phase: stop a follower");
    cluster.stop(lagging).await;
    info!("phase: 120 writes while it is down: the log is compacted past it");
    for i in 0..120 {
        apply(&cluster.addr(leader), &format!("s{i}"), 1)
            .await
            .expect("write");
    }
    let leader_handle = cluster.nodes[leader]
        .as_ref()
        .expect("leader")
        .handle()
        .clone();
    wait_until("leader purged its log", Duration::from_secs(10), || {
        leader_handle
            .raft()
            .metrics()
            .borrow()
            .purged
            .is_some_and(|p| p.index > 20)
    })
    .await;
    info!("phase: restart the lagging follower");
    cluster.restart(lagging).await;
    let target = cluster.applied(leader);
    wait_until("lagging node caught up", Duration::from_secs(15), || {
        cluster.applied(lagging) >= target
    })
    .await;
    let m = cluster.nodes[lagging]
        .as_ref()
        .expect("node")
        .handle()
        .raft()
        .metrics()
        .borrow()
        .clone();
    assert!(
        m.snapshot.is_some_and(|s| s.index > 20),
        "caught up without installing a snapshot: {:?}",
        m.snapshot
    );
    let names = list_names_stale(&cluster.addr(lagging))
        .await
        .expect("list");
    assert_eq!(names.len(), 120);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn add_and_remove_a_member() {
    let mut cluster = InProcessCluster::start(3, |_| {}).await;
    apply(&cluster.addr(0), "before-join", 1)
        .await
        .expect("write");
    info!("phase: a fourth coordinator joins through a follower");
    let cfg = cluster.member_config(3);
    let via = cluster.addr(cluster.follower());
    let fourth = cloudless_coordinator::Coordinator::start(
        cfg.clone(),
        cloudless_coordinator::StartMode::Run { join: Some(via) },
    )
    .await
    .expect("start fourth");
    let fourth_id = fourth.handle().id();
    cluster.nodes.push(Some(fourth));
    cluster.wait_for_voters(4).await;
    wait_until("new member has the data", Duration::from_secs(5), || {
        cluster.applied(3) >= cluster.applied(0)
    })
    .await;
    assert_eq!(
        list_names_stale(&cluster.addr(3)).await.expect("list"),
        ["before-join"]
    );

    info!("phase: remove it again");
    let r = ClusterServiceClient::new(channel(&cluster.addr(0)))
        .remove_coordinator(pb::RemoveCoordinatorRequest {
            write: None,
            node_id: fourth_id,
        })
        .await
        .expect("remove")
        .into_inner();
    assert_eq!(r.members.len(), 3);
    assert!(r.members.iter().all(|m| m.node_id != fourth_id));
    cluster.stop(3).await;
    cluster.wait_for_voters(3).await;
    apply(&cluster.addr(0), "after-remove", 1)
        .await
        .expect("write after removal");

    info!("phase: removing a non-member is a clear InvalidArgument");
    let err = ClusterServiceClient::new(channel(&cluster.addr(0)))
        .remove_coordinator(pb::RemoveCoordinatorRequest {
            write: None,
            node_id: 424_242,
        })
        .await
        .expect_err("removed a non-member");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("424242 is not a member"),
        "{}",
        err.message()
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_requests_get_invalid_argument_naming_the_field() {
    let cluster = InProcessCluster::start(3, |_| {}).await;
    let follower = cluster.addr(cluster.follower());
    let mut client = WorkloadServiceClient::new(channel(&follower));

    let mut bad = cloudless_test::workload("Bad_Name", 1);
    bad.spec.as_mut().expect("spec").image = String::new();
    let err = client
        .apply(pb::ApplyWorkloadRequest {
            write: None,
            workload: Some(bad),
        })
        .await
        .expect_err("invalid workload accepted");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("metadata.name"), "{}", err.message());
    assert!(
        err.message().contains("spec.image: must not be empty"),
        "{}",
        err.message()
    );

    let err = client
        .apply(pb::ApplyWorkloadRequest {
            write: None,
            workload: None,
        })
        .await
        .expect_err("missing workload accepted");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("workload: is required"),
        "{}",
        err.message()
    );

    let err = client
        .scale(pb::ScaleWorkloadRequest {
            write: None,
            namespace: String::new(),
            name: "absent".into(),
            replicas: 2,
        })
        .await
        .expect_err("scaled a missing workload");
    assert_eq!(err.code(), tonic::Code::NotFound);

    let err = ClusterServiceClient::new(channel(&follower))
        .join_coordinator(pb::JoinCoordinatorRequest {
            write: None,
            node_id: 9,
            address: "no-port".into(),
            log_format: cloudless_state::LOG_FORMAT,
        })
        .await
        .expect_err("bad join accepted");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("address"), "{}", err.message());

    // A coordinator of another release's log format cannot join (it would
    // misread the log): refused by name before anything changes.
    let err = ClusterServiceClient::new(channel(&follower))
        .join_coordinator(pb::JoinCoordinatorRequest {
            write: None,
            node_id: 9,
            address: "127.0.0.1:1".into(),
            log_format: cloudless_state::LOG_FORMAT + 1,
        })
        .await
        .expect_err("a join of another log format accepted");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message().starts_with(&format!(
            "coordinator 9 uses Raft log format {} and this coordinator format {}",
            cloudless_state::LOG_FORMAT + 1,
            cloudless_state::LOG_FORMAT
        )),
        "{}",
        err.message()
    );

    let mut cfg: pb::ClusterConfig = cloudless_types::ClusterConfig::default().into();
    cfg.heartbeat_interval_ms = 1;
    let err = ClusterServiceClient::new(channel(&follower))
        .set_config(pb::SetConfigRequest {
            write: None,
            config: Some(cfg),
            expected_revision: 0,
        })
        .await
        .expect_err("bad config accepted");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("heartbeat_interval_ms"),
        "{}",
        err.message()
    );

    info!("phase: the raft port admits coordinators only (payload decoding is fuzzed in cloudless-state)");
    let err = pb::raft_service_client::RaftServiceClient::new(channel(&follower))
        .append_entries(pb::RaftPayload {
            data: b"\xff\x00garbage".to_vec(),
            log_format: cloudless_state::LOG_FORMAT,
        })
        .await
        .expect_err("an admin certificate reached Raft");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().contains("Raft"), "{}", err.message());
    apply(&follower, "still-works", 1)
        .await
        .expect("cluster still healthy");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idempotency_key_applies_once() {
    let cluster = InProcessCluster::start(3, |_| {}).await;
    let addr = cluster.addr(0);
    let mut client = WorkloadServiceClient::new(channel(&addr));
    let req = |replicas| pb::ScaleWorkloadRequest {
        write: Some(pb::WriteOptions {
            idempotency_key: "scale-1".into(),
        }),
        namespace: String::new(),
        name: "web".into(),
        replicas,
    };
    apply(&addr, "web", 1).await.expect("create");
    let first = client.scale(req(5)).await.expect("scale").into_inner();
    let again = client.scale(req(5)).await.expect("retry").into_inner();
    assert_eq!(first.workload.as_ref().map(|w| w.generation), Some(2));
    assert_eq!(
        again.workload.as_ref().map(|w| w.generation),
        Some(2),
        "retry applied twice"
    );
    let err = client
        .scale(req(7))
        .await
        .expect_err("key reused for another request");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_share_entries_but_get_their_own_answers() {
    let cluster = InProcessCluster::start(3, |_| {}).await;
    let addr = cluster.addr(cluster.wait_for_leader().await);
    for i in 0..20 {
        apply(&addr, &format!("c{i}"), 1).await.expect("create");
    }
    info!("phase: 80 concurrent scales, a quarter of them for workloads that do not exist");
    let calls = (0..80).map(|i| {
        let addr = addr.clone();
        async move {
            let name = if i % 4 == 3 {
                format!("missing{i}")
            } else {
                format!("c{}", i % 20)
            };
            let r = WorkloadServiceClient::new(channel(&addr))
                .scale(pb::ScaleWorkloadRequest {
                    write: None,
                    namespace: String::new(),
                    name: name.clone(),
                    replicas: 2 + (i % 20) as u32,
                })
                .await;
            (i, name, r)
        }
    });
    let results = futures::future::join_all(calls).await;
    let mut indexes = std::collections::BTreeMap::<u64, usize>::new();
    for (i, name, r) in results {
        if i % 4 == 3 {
            let err = r.expect_err("scaled a missing workload");
            assert_eq!(err.code(), tonic::Code::NotFound, "{name}: {err:?}");
            assert!(err.message().contains(&name), "{}", err.message());
        } else {
            let r = r.expect("scale").into_inner();
            let w = r.workload.expect("workload");
            assert_eq!(w.name, name, "answer for another request");
            *indexes
                .entry(r.commit.expect("commit").log_index)
                .or_default() += 1;
        }
    }
    assert!(
        indexes.values().any(|n| *n > 1),
        "no two concurrent writes shared a log entry: {indexes:?}"
    );
    info!("phase: each workload holds one of the values sent to it, or 1 if none was");
    for n in 0..20u32 {
        let sent: Vec<u32> = (0..80u32)
            .filter(|i| i % 4 != 3 && i % 20 == n)
            .map(|i| 2 + i % 20)
            .collect();
        let w = get(&addr, &format!("c{n}"), false)
            .await
            .expect("read")
            .expect("present");
        let replicas = w.spec.expect("spec").replicas;
        if sent.is_empty() {
            assert_eq!(replicas, 1, "c{n} was never scaled");
        } else {
            assert!(
                sent.contains(&replicas),
                "c{n} has {replicas}, sent {sent:?}"
            );
        }
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_is_refused_when_it_leaves_a_rollout_or_drain_no_room() {
    let cluster = InProcessCluster::start(1, |_| {}).await;
    let addr = cluster.addr(0);
    let mut w = cloudless_test::workload("tight", 5);
    if let Some(spec) = w.spec.as_mut() {
        spec.rollout = Some(pb::Rollout {
            max_surge: 0,
            max_unavailable: 1,
            min_available: Some(3),
            ..Default::default()
        });
    }
    pb::workload_service_client::WorkloadServiceClient::new(cloudless_test::channel(&addr))
        .apply(pb::ApplyWorkloadRequest {
            write: None,
            workload: Some(w),
        })
        .await
        .expect("apply");
    let err =
        pb::workload_service_client::WorkloadServiceClient::new(cloudless_test::channel(&addr))
            .scale(pb::ScaleWorkloadRequest {
                name: "tight".into(),
                replicas: 3,
                ..Default::default()
            })
            .await
            .expect_err("a scale leaving minAvailable 3 of 3 with maxSurge 0 was accepted");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("spec.rollout.minAvailable"),
        "{}",
        err.message()
    );
    let ok =
        pb::workload_service_client::WorkloadServiceClient::new(cloudless_test::channel(&addr))
            .scale(pb::ScaleWorkloadRequest {
                name: "tight".into(),
                replicas: 4,
                ..Default::default()
            })
            .await;
    assert!(ok.is_ok(), "{ok:?}");
}
