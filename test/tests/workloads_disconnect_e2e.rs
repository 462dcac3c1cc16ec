//! An agent cut off from the coordinators by its network (it runs in its
//! own network namespace, whose veth is taken down), with the real
//! binaries, containerd and registry: the coordinators replace or keep its
//! replicas as each workload's `disconnect` block says, the agent keeps its
//! containers running (or stops them after `stopOnClientAfterSeconds`),
//! and after the link returns it resyncs with no duplicate anywhere.
//! Needs root, `ip`, containerd, runc, busybox-static and docker-registry
//! (installed by .ci/run); skips loudly otherwise.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use cloudless_proto::v1 as pb;
use cloudless_test::e2e::{node_phase, Cluster, Options};

macro_rules! require_e2e {
    () => {
        if let Some(why) = cloudless_test::e2e::missing() {
            cloudless_test::skip_test(format!("end-to-end disconnect test: {why}"));
            return;
        }
        if std::process::Command::new("ip")
            .arg("-V")
            .output()
            .map_or(true, |o| !o.status.success())
        {
            cloudless_test::skip_test(format!(
                "end-to-end disconnect test: the ip command (iproute2) is missing"
            ));
            return;
        }
    };
}

/// Polls until `check` holds for every workload's replicas, or fails with them.
async fn wait_for(
    c: &Cluster,
    what: &str,
    timeout: Duration,
    check: impl Fn(&BTreeMap<&str, Vec<pb::Replica>>) -> bool,
) -> BTreeMap<&'static str, Vec<pb::Replica>> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut all = BTreeMap::new();
        for name in ["keep", "swap", "park"] {
            if let Some(rs) = c.replicas(name).await {
                all.insert(name, rs);
            }
        }
        if all.len() == 3 && check(&all) {
            return all;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {all:#?}\n{}",
            c.agent_logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn on<'a>(rs: &'a [pb::Replica], node: &str) -> Vec<&'a pb::Replica> {
    rs.iter().filter(|r| r.node_name == node).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_agent_keeps_its_replicas_and_resyncs_without_duplicates() {
    require_e2e!();
    let mut c = Cluster::start_with(Options {
        netns_zone: Some("a".into()),
        ..Options::default()
    })
    .await;
    let spread = "  placement:\n    strategy: Spread\n";
    // keep: the original wins when its node returns within 120 s.
    let keep = c.manifest_with(
        "keep",
        "1",
        2,
        "keep",
        &format!("{spread}  disconnect:\n    lostAfterSeconds: 120\n    reconcile: KeepOriginal\n"),
    );
    // swap: no disconnect block - replaced at once, the replacement stays.
    let swap = c.manifest_with("swap", "1", 2, "swap", spread);
    // park: only in zone a, not replaced, stopped by the agent after 4 s
    // alone, started again when the node is back.
    let park = c.manifest_with(
        "park",
        "1",
        1,
        "park",
        "  placement:\n    zones: [a]\n  disconnect:\n    lostAfterSeconds: 120\n    replace: false\n    \
         stopOnClientAfterSeconds: 4\n    reconcile: KeepOriginal\n",
    );
    for m in [&keep, &swap, &park] {
        let out = c.ctl(&[
            "apply",
            "-f",
            &m.display().to_string(),
            "--wait",
            "--timeout",
            "90",
        ]);
        assert!(
            out.status.success(),
            "apply {}: {out:?}\n{}",
            m.display(),
            c.agent_logs()
        );
    }
    let before = wait_for(
        &c,
        "the initial placement",
        Duration::from_secs(30),
        |all| {
            all.values()
                .flatten()
                .all(|r| r.state() == cloudless_proto::v1::ReplicaState::Ready)
                && on(&all["keep"], "agent-a").len() == 1
                && on(&all["swap"], "agent-a").len() == 1
                && on(&all["park"], "agent-a").len() == 1
        },
    )
    .await;
    let id_on_a = |w: &str| on(&before[w], "agent-a")[0].id.clone();
    let (keep_a, swap_a, park_a) = (id_on_a("keep"), id_on_a("swap"), id_on_a("park"));
    let pids_a = c.container_pids(0).await;
    assert_eq!(c.agents[0].name, "agent-a");
    assert_eq!(
        pids_a.keys().cloned().collect::<BTreeSet<_>>(),
        BTreeSet::from([keep_a.clone(), swap_a.clone(), park_a.clone()])
    );

    // Cut agent-a's network.
    let netns = c.netns.take().expect("network namespace");
    netns.cut();
    let cut_at = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(20);
    while node_phase(&c, "agent-a").await.as_deref() != Some("Down") {
        assert!(Instant::now() < deadline, "agent-a never went Down");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let during = wait_for(
        &c,
        "the reaction to the cut",
        Duration::from_secs(30),
        |all| {
            let keep_ok = all["keep"]
                .iter()
                .any(|r| r.id == keep_a && r.state() == cloudless_proto::v1::ReplicaState::Unknown)
                && on(&all["keep"], "agent-b").len() == 2
                && on(&all["keep"], "agent-b")
                    .iter()
                    .all(|r| r.state() == cloudless_proto::v1::ReplicaState::Ready);
            let swap_ok = all["swap"].len() == 2
                && all["swap"].iter().all(|r| {
                    r.node_name == "agent-b"
                        && r.state() == cloudless_proto::v1::ReplicaState::Ready
                });
            let park_ok = all["park"].len() == 1
                && all["park"][0].id == park_a
                && all["park"][0].state() == cloudless_proto::v1::ReplicaState::Unknown;
            keep_ok && swap_ok && park_ok
        },
    )
    .await;
    // The cut-off agent keeps its containers (same processes), except the
    // one allowed only 4 s alone.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now_a = c.container_pids(0).await;
        if !now_a.contains_key(&park_a) {
            assert_eq!(now_a.get(&keep_a), pids_a.get(&keep_a), "keep restarted");
            assert_eq!(now_a.get(&swap_a), pids_a.get(&swap_a), "swap restarted");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "park still runs {:?} after the cut",
            cut_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        cut_at.elapsed() >= Duration::from_secs(4),
        "park stopped before its 4 s"
    );
    let keep_replacement: Vec<String> = on(&during["keep"], "agent-b")
        .iter()
        .map(|r| r.id.clone())
        .collect();

    // The link returns: agent-a resyncs.
    netns.restore();
    let after = wait_for(&c, "the resync", Duration::from_secs(60), |all| {
        let keep_ok = all["keep"].len() == 2
            && all["keep"]
                .iter()
                .all(|r| r.state() == cloudless_proto::v1::ReplicaState::Ready)
            && all["keep"].iter().any(|r| r.id == keep_a);
        let swap_ok =
            all["swap"].len() == 2 && all["swap"].iter().all(|r| r.node_name == "agent-b");
        let park_ok = all["park"].len() == 1
            && all["park"][0].id == park_a
            && all["park"][0].state() == cloudless_proto::v1::ReplicaState::Ready;
        keep_ok && swap_ok && park_ok
    })
    .await;
    assert_eq!(node_phase(&c, "agent-a").await.as_deref(), Some("Ready"));
    // KeepOriginal: the very same container on agent-a; one of the two
    // replicas on agent-b was the replacement and went.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let now_a = c.container_pids(0).await;
        let now_b = c.container_pids(1).await;
        let assigned = |node: &str| -> BTreeSet<String> {
            after
                .values()
                .flatten()
                .filter(|r| r.node_name == node)
                .map(|r| r.id.clone())
                .collect()
        };
        let running_a: BTreeSet<String> = now_a.keys().cloned().collect();
        let running_b: BTreeSet<String> = now_b.keys().cloned().collect();
        if running_a == assigned("agent-a") && running_b == assigned("agent-b") {
            assert_eq!(
                now_a.get(&keep_a),
                pids_a.get(&keep_a),
                "keep's original was restarted"
            );
            assert!(!running_a.contains(&swap_a), "swap's original still runs");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "containers do not match assignments (duplicates or leftovers):\n agent-a runs {running_a:?}, assigned {:?}\n agent-b runs {running_b:?}, assigned {:?}\n{}",
            assigned("agent-a"),
            assigned("agent-b"),
            c.agent_logs()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        after["keep"]
            .iter()
            .filter(|r| keep_replacement.contains(&r.id))
            .count(),
        1,
        "exactly one of agent-b's keep replicas stays: {:#?}",
        after["keep"]
    );

    let out = c.ctl(&["events"]);
    let events = String::from_utf8_lossy(&out.stdout);
    for reason in ["Unknown", "Reconnected", "Reconciled", "Lost", "NodeDown"] {
        assert!(events.contains(reason), "no {reason} event:\n{events}");
    }
    drop(netns);
}
