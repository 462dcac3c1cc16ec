//! Draining and removing a node that holds replicas, end to end with the
//! real binaries (3 coordinator processes, 2 agents, own containerd and
//! registry): a drain moves every replica off the node without the workload
//! dropping below its availability floor, and `cloudlessctl node drain`
//! waits for it; a removal replaces the node's replicas at once.
//! Needs root, containerd, runc, busybox-static and docker-registry
//! (installed by .ci/run); skips loudly otherwise.

use std::time::{Duration, Instant};

use cloudless_proto::v1 as pb;
use cloudless_test::e2e::{output_text as text, Cluster, ReplicaSampler};

macro_rules! require_e2e {
    () => {
        if let Some(why) = cloudless_test::e2e::missing() {
            eprintln!("\n!!!!!!!! SKIPPED end-to-end removal and drain test: {why} !!!!!!!!\n");
            return;
        }
    };
}

/// The id of node `name`.
fn node_id(c: &Cluster, name: &str) -> String {
    let out = c.ctl_ok(&["get", "nodes"]);
    out.lines()
        .find(|l| l.split_whitespace().nth(1) == Some(name))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no node {name} in\n{out}"))
        .to_owned()
}

fn on(rs: &[pb::Replica], node: &str) -> usize {
    rs.iter().filter(|r| r.node_name == node).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_moves_replicas_within_the_floor_and_removal_replaces_them_at_once() {
    require_e2e!();
    let c = Cluster::start().await;
    let (a, b) = (node_id(&c, "agent-a"), node_id(&c, "agent-b"));

    tracing::info!("phase 1: three replicas, all on agent-a");
    c.ctl_ok(&["node", "cordon", &b]);
    let web = c.manifest("web", "1", 3, "drain");
    c.ctl_ok(&[
        "apply",
        "-f",
        &web.display().to_string(),
        "--wait",
        "--timeout",
        "90",
    ]);
    c.wait_ready("web", 3, Duration::from_secs(30), |rs| {
        on(rs, "agent-a") == 3
    })
    .await;
    c.ctl_ok(&["node", "uncordon", &b]);

    tracing::info!("phase 2: drain agent-a; the command waits until it holds nothing");
    let sampler = ReplicaSampler::start(&c, "web");
    let started = Instant::now();
    let out = c.ctl_ok(&["node", "drain", &a, "--timeout", "90s"]);
    assert!(out.contains("replica(s) left"), "no progress shown:\n{out}");
    assert!(out.contains(&format!("node {a} drained")), "{out}");
    let rs = c
        .wait_ready("web", 3, Duration::from_secs(10), |rs| {
            on(rs, "agent-b") == 3
        })
        .await;
    assert_eq!(on(&rs, "agent-a"), 0, "{rs:#?}");
    let seen = sampler.finish().await;
    // Default rollout (maxUnavailable 0): the floor is all three.
    assert!(
        seen.min_ready >= 3,
        "Ready dipped below the floor: {seen:?}"
    );
    assert!(seen.max_total <= 4, "more than maxSurge above: {seen:?}");
    tracing::info!(elapsed = ?started.elapsed(), ?seen, "drained");

    tracing::info!("phase 3: a drain that cannot finish times out with a clear error");
    // agent-a is still cordoned (draining), so agent-b's replicas have
    // nowhere to go.
    let out = c.ctl(&["node", "drain", &b, "--timeout", "2s"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(3), "{stdout}{stderr}");
    assert!(
        stderr.contains(&format!("node {b} not drained after 2s")) && stderr.contains("web"),
        "{stderr}"
    );
    c.ctl_ok(&["node", "uncordon", &b]);
    c.ctl_ok(&["node", "uncordon", &a]);

    tracing::info!("phase 4: remove agent-b, which holds every replica");
    let removed_at = Instant::now();
    c.ctl_ok(&["node", "remove", &b]);
    loop {
        let rs = c.replicas("web").await.unwrap_or_default();
        let moved = rs.len() == 3
            && rs.iter().all(|r| {
                r.node_name == "agent-a"
                    && (r.state() == cloudless_proto::v1::ReplicaState::Running
                        || r.state() == cloudless_proto::v1::ReplicaState::Ready)
            });
        if moved {
            break;
        }
        assert!(
            removed_at.elapsed() < Duration::from_secs(5),
            "the removed node's replicas are not Running elsewhere within 5 s: {rs:#?}\n{}",
            c.agent_logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tracing::info!(elapsed = ?removed_at.elapsed(), "replaced");
    let events = c.ctl_ok(&["events"]);
    assert!(
        events.contains("Lost") && events.contains("its node was removed"),
        "{events}"
    );
    // The removed node's certificate is refused on the agent APIs: its
    // agent is told so and stops.
    let logs = c.agent_logs();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !c.agent_logs().contains("has been removed from the cluster") {
        assert!(Instant::now() < deadline, "{logs}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
