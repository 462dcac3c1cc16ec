//! Coordinators as separate processes (the real binary): SIGKILL, restart
//! from disk, and start-up errors for bad configuration and damaged data.

use std::process::Command;
use std::time::Duration;

use cloudless_test::{
    apply, cluster_status, free_port, list_names_stale, process_leader, wait_until,
    workspace_binary, ProcessNode as Proc,
};
use tracing::info;

async fn wait_leader(procs: &[Proc]) -> usize {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(i) = process_leader(procs).await {
            return i;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no leader within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_leader_loses_no_acknowledged_write_and_restarts_from_disk() {
    cloudless_test::init_test_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut procs: Vec<Proc> = (0..3).map(|i| Proc::new(dir.path(), i)).collect();
    info!("phase: start three coordinator processes");
    procs[0].spawn("init", None);
    let seed = procs[0].grpc.clone();
    procs[1].spawn("run", Some(&seed));
    procs[2].spawn("run", Some(&seed));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(s) = cluster_status(&seed).await {
            if s.members.len() == 3
                && s.coordinators.iter().all(|c| {
                    c.reachable && c.state() != cloudless_proto::v1::RaftServerState::Learner
                })
            {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "cluster did not form"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    info!("phase: acknowledged writes, then SIGKILL the leader");
    let leader = wait_leader(&procs).await;
    let writer = (leader + 1) % 3;
    for i in 0..40 {
        apply(&procs[writer].grpc, &format!("k{i}"), 1)
            .await
            .expect("write");
    }
    procs[leader].sigkill();

    info!("phase: a new leader accepts writes");
    let new_leader = wait_leader(&procs).await;
    assert_ne!(new_leader, leader);
    let started = tokio::time::Instant::now();
    loop {
        match apply(&procs[new_leader].grpc, "after-kill", 1).await {
            Ok(_) => break,
            Err(e) => {
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "no write accepted after failover: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let mut expected: Vec<String> = (0..40).map(|i| format!("k{i}")).collect();
    expected.push("after-kill".into());
    expected.sort();
    let mut names = list_names_stale(&procs[new_leader].grpc)
        .await
        .expect("list");
    names.sort();
    assert_eq!(names, expected, "acknowledged writes lost");

    info!("phase: restart the killed coordinator from its data dir");
    procs[leader].spawn("run", None);
    let grpc = procs[leader].grpc.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut n) = list_names_stale(&grpc).await {
            n.sort();
            if n == expected {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "restarted node did not recover all state"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let http = procs[leader].http.clone();
    wait_until(
        "readyz on the restarted node",
        Duration::from_secs(10),
        || {
            std::process::Command::new("curl")
                .args(["-sf", &format!("http://{http}/readyz")])
                .status()
                .is_ok_and(|s| s.success())
        },
    )
    .await;
}

fn run_to_exit(args: &[&str]) -> (i32, String) {
    let out = Command::new(workspace_binary("cloudless-coordinator"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run coordinator");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_configuration_is_reported_before_binding() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        "listen_addr = \"127.0.0.1:notaport\"\nbogus = 1\n[raft]\nheartbeat_interval_ms = 5000\n",
    )
    .expect("write");
    let port = free_port();
    let http = format!("127.0.0.1:{port}");
    let (code, err) = run_to_exit(&["init", "-c", &cfg.display().to_string(), "--http", &http]);
    assert_eq!(code, 2, "{err}");
    for needle in [
        "listen_addr",
        "unknown key",
        "must be greater than raft.heartbeat_interval_ms (5000)",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in {err}");
    }
    std::net::TcpListener::bind(&http).expect("the HTTP port must not have been bound");
}

#[test]
fn damaged_data_dir_is_a_clear_startup_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("mkdir");
    std::fs::write(data.join("node_id"), "7\n").expect("node id");
    std::fs::write(
        data.join("raft-log.redb"),
        b"this is not a redb file at all, just garbage bytes",
    )
    .expect("garbage");
    let grpc = format!("127.0.0.1:{}", free_port());
    let http = format!("127.0.0.1:{}", free_port());
    let data_dir = data.display().to_string();
    let args = [
        "run",
        "--data-dir",
        &data_dir,
        "--listen",
        &grpc,
        "--http",
        &http,
        "--insecure-plaintext",
    ];
    let (code, err) = run_to_exit(&args);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("raft-log.redb"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    std::fs::write(data.join("node_id"), "not-a-number").expect("node id");
    let (code, err) = run_to_exit(&args);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("does not hold a node id"), "{err}");
}

fn ctl(server: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(workspace_binary("cloudlessctl"))
        .args(["--server", server])
        .args(args)
        .output()
        .expect("run cloudlessctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_follower_catches_up_by_snapshot_and_members_change_through_cloudlessctl() {
    cloudless_test::init_test_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let compact = [
        "--set",
        "raft.snapshot_after_logs=20",
        "--set",
        "raft.logs_to_keep_after_snapshot=0",
    ];
    let mut procs: Vec<Proc> = (0..4).map(|i| Proc::new(dir.path(), i)).collect();
    procs[0].spawn_with("init", None, &compact);
    let seed = procs[0].grpc.clone();
    procs[1].spawn_with("run", Some(&seed), &compact);
    procs[2].spawn_with("run", Some(&seed), &compact);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !cluster_status(&seed).await.is_some_and(|s| {
        s.members.len() == 3
            && s.coordinators
                .iter()
                .all(|c| c.reachable && c.state() != cloudless_proto::v1::RaftServerState::Learner)
    }) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "cluster did not form"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    info!("phase: SIGKILL a follower, then write past several snapshots");
    let leader = wait_leader(&procs[..3]).await;
    let lagging = (leader + 1) % 3;
    procs[lagging].sigkill();
    let writer = procs[leader].grpc.clone();
    for i in 0..150 {
        apply(&writer, &format!("snap{i}"), 1).await.expect("write");
    }
    info!("phase: restart it; it must install a snapshot to catch up");
    procs[lagging].spawn_with("run", None, &compact);
    let addr = procs[lagging].grpc.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let names = list_names_stale(&addr).await.unwrap_or_default();
        if names.len() == 150 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "lagging node has {} of 150 workloads",
            names.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = cluster_status(&addr).await.expect("status");
    let me = s
        .coordinators
        .iter()
        .find(|c| c.address == addr)
        .expect("self in status");
    assert!(
        me.snapshot_index > 0,
        "caught up without a snapshot: {me:?}"
    );

    info!("phase: a fourth coordinator joins, then cloudlessctl removes it");
    procs[3].spawn_with("run", Some(&seed), &compact);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let fourth_id = loop {
        if let Some(s) = cluster_status(&seed).await {
            if let Some(m) = s.members.iter().find(|m| {
                m.address == procs[3].grpc
                    && m.role == cloudless_proto::v1::member::Role::Voter as i32
            }) {
                break m.node_id;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "fourth coordinator never became a voter"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (code, out, err) = ctl(
        &procs[lagging].grpc,
        &["cluster", "remove", &fourth_id.to_string()],
    );
    assert_eq!(code, 0, "cloudlessctl cluster remove failed: {err}");
    assert!(out.contains("3 member(s) remain"), "{out}");
    let (code, out, _) = ctl(&seed, &["cluster", "status"]);
    assert_eq!(code, 0);
    assert!(
        !out.contains(&procs[3].grpc),
        "removed member still listed:\n{out}"
    );
    let (code, _, err) = ctl(&seed, &["cluster", "remove", "12345"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("12345 is not a member"), "{err}");
}
