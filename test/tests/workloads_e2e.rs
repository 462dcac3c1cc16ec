//! Workloads end to end with the real binaries: 3 coordinator processes
//! (mTLS, Raft), 2 `cloudless-agent` processes (zones a and b) enrolled with
//! join tokens, a containerd of the test's own, and a local registry
//! (Debian's docker-registry) serving the busybox image built here;
//! `cloudlessctl` drives it. Needs root, containerd, runc, busybox-static
//! and docker-registry (installed by .ci/run); skips loudly otherwise.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use cloudless_proto::v1 as pb;
use cloudless_test::e2e::{kill_containers, Cluster, ReplicaSampler};
use cloudless_test::process_leader;

/// One whole installation at a time: two would share 2 cores and make the
/// timing assertions (Down after 5 s) about CPU starvation instead.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

macro_rules! require_e2e {
    () => {
        if let Some(why) = cloudless_test::e2e::missing() {
            cloudless_test::skip_test(format!("end-to-end workload test: {why}"));
            return;
        }
    };
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{sig} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_spread_heal_and_survive_leader_loss() {
    require_e2e!();
    let _serial = SERIAL.lock().await;
    let mut c = Cluster::start().await;
    let manifest = c.manifest("hello", "1", 3, "first");
    let out = c.ctl(&[
        "apply",
        "-f",
        &manifest.display().to_string(),
        "--wait",
        "--timeout",
        "90",
    ]);
    assert!(
        out.status.success(),
        "apply --wait: {}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        c.agent_logs()
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("rollout of default/hello complete"));

    // Spread over both zones, output in each agent's container logs.
    let rs = c
        .wait_ready("hello", 3, Duration::from_secs(30), |_| true)
        .await;
    let nodes: BTreeSet<&str> = rs.iter().map(|r| r.node_name.as_str()).collect();
    assert_eq!(
        nodes,
        BTreeSet::from(["agent-a", "agent-b"]),
        "3 replicas over zones a and b: {rs:#?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    for r in &rs {
        let agent = c
            .agents
            .iter()
            .find(|a| a.name == r.node_name)
            .expect("agent");
        let log = agent.data_dir.join(format!("logs/{}.log", r.id));
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains(&format!("hello from {} (first)", r.id)) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: no output: {text:?}",
                log.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // The same output through the coordinators and the agents' tunnels.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = c.ctl(&["logs", "hello", "--tail", "2"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let all = rs
            .iter()
            .all(|r| text.contains(&format!("[{}] hello from {} (first)", r.id, r.id)));
        if out.status.success() && all {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "logs: {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Follow: new lines keep arriving (the loop prints every second).
    let out = Command::new("timeout")
        .arg("4")
        .arg(cloudless_test::workspace_binary("cloudlessctl"))
        .arg("--config")
        .arg(&c.ctl_config)
        .args([
            "--server",
            &c.servers(),
            "logs",
            "hello",
            "--replica",
            &rs[0].id,
            "-f",
            "--tail",
            "1",
        ])
        .output()
        .expect("logs -f");
    let followed = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&rs[0].id))
        .count();
    assert!(followed >= 3, "logs -f gave {followed} lines: {out:?}");

    // Kill the leader coordinator: containers keep running (same processes)
    // and the API answers again.
    let before: Vec<BTreeMap<String, u32>> =
        vec![c.container_pids(0).await, c.container_pids(1).await];
    assert_eq!(before.iter().map(BTreeMap::len).sum::<usize>(), 3);
    let leader = process_leader(&c.coordinators).await.expect("leader");
    c.coordinators[leader].sigkill();
    let killed_at = Instant::now();
    let deadline = killed_at + Duration::from_secs(20);
    loop {
        let out = c.ctl(&["get", "workloads"]);
        if out.status.success() && String::from_utf8_lossy(&out.stdout).contains("3/3") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "API did not recover after the leader was killed: {out:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "API available again {:?} after the leader died",
        killed_at.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = vec![c.container_pids(0).await, c.container_pids(1).await];
    assert_eq!(
        before, after,
        "containers restarted or moved on leader loss"
    );

    // Node failure: agent-a and its containers die; its replicas are
    // replaced on agent-b, with no duplicates.
    let lost: Vec<String> = rs
        .iter()
        .filter(|r| r.node_name == "agent-a")
        .map(|r| r.id.clone())
        .collect();
    assert!(!lost.is_empty());
    c.agents[0].sigkill();
    kill_containers(&c.agents[0].namespace.clone());
    let failed_at = Instant::now();
    let healed = c
        .wait_ready("hello", 3, Duration::from_secs(30), |rs| {
            rs.iter().all(|r| r.node_name == "agent-b")
        })
        .await;
    eprintln!(
        "replicas replaced {:?} after the node failed",
        failed_at.elapsed()
    );
    assert!(healed.iter().all(|r| !lost.contains(&r.id)));
    let running = c.container_pids(1).await;
    assert_eq!(
        running.len(),
        3,
        "agent-b runs exactly the 3 replicas: {running:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_update_keeps_replicas_available_and_agents_ride_out_a_lost_control_plane() {
    require_e2e!();
    let _serial = SERIAL.lock().await;
    let c = Cluster::start().await;
    let v1 = c.manifest("web", "1", 2, "v1");
    let out = c.ctl(&[
        "apply",
        "-f",
        &v1.display().to_string(),
        "--wait",
        "--timeout",
        "90",
    ]);
    assert!(
        out.status.success(),
        "apply v1: {out:?}\n{}",
        c.agent_logs()
    );
    c.wait_ready("web", 2, Duration::from_secs(30), |_| true)
        .await;

    // Bad manifests: refused with the field named, nothing applied.
    let bad = [
        ("replicas: 2", "replicas: -1", "spec.replicas"),
        ("replicas: 2", "replicas: two", "spec.replicas"),
        (
            "replicas: 2",
            "replicas: 2\n  replica: 3",
            "unknown field `replica`",
        ),
        ("  image: ", "  # image: ", "missing field `image`"),
    ];
    let text = std::fs::read_to_string(&v1).expect("manifest");
    for (i, (from, to, expect)) in bad.iter().enumerate() {
        let path = c.dir.path().join(format!("bad-{i}.yaml"));
        std::fs::write(&path, text.replace(from, to)).expect("write");
        let out = c.ctl(&["apply", "-f", &path.display().to_string()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{to}: {err}");
        assert!(err.contains(expect), "{to}: {err}");
    }

    // Rolling update to image :2 while sampling Ready replicas.
    let sampler = ReplicaSampler::start(&c, "web");
    // v2 gates readiness on an exec probe that passes.
    let v2 = c.manifest_with(
        "web",
        "2",
        2,
        "v2",
        "  readinessProbe:\n    exec: [\"/bin/true\"]\n    periodSeconds: 1\n",
    );
    let out = c.ctl(&[
        "apply",
        "-f",
        &v2.display().to_string(),
        "--wait",
        "--timeout",
        "90",
    ]);
    let seen = sampler.finish().await;
    assert!(
        out.status.success(),
        "apply v2: {out:?}\n{}",
        c.agent_logs()
    );
    let v2_replicas = c
        .wait_ready("web", 2, Duration::from_secs(30), |rs| {
            rs.iter()
                .all(|r| r.image.ends_with(":2") && r.template == 2)
        })
        .await;
    assert!(seen.count > 5, "{seen:?}");
    assert!(
        seen.min_ready >= 2,
        "fewer than 2 Ready replicas during the rollout (min {})",
        seen.min_ready
    );

    // A new template whose replicas never become Ready is rolled back after
    // its progress deadline; the Ready replicas are kept throughout.
    let v3 = c.manifest_with(
        "web",
        "1",
        2,
        "v3",
        "  readinessProbe:\n    exec: [\"/bin/false\"]\n    periodSeconds: 1\n  \
         rollout:\n    progressDeadlineSeconds: 4\n",
    );
    let out = c.ctl(&["apply", "-f", &v3.display().to_string()]);
    assert!(out.status.success(), "apply v3: {out:?}");
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let out = c.ctl(&["-o", "json", "get", "workload", "web"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if text.contains(":2\"") && text.contains("\"v2\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no rollback: {text}\n{}",
            c.agent_logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rs = c
        .wait_ready("web", 2, Duration::from_secs(30), |rs| {
            rs.iter().all(|r| r.image.ends_with(":2"))
        })
        .await;
    let ids = |v: &[pb::Replica]| v.iter().map(|r| r.id.clone()).collect::<BTreeSet<_>>();
    assert_eq!(
        ids(&v2_replicas),
        ids(&rs),
        "the rollback replaced the replicas that were Ready"
    );
    let out = c.ctl(&["describe", "workload", "web"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains("RolledBack"), "{text}");

    // Replaced containers stop in the background (grace period): wait for
    // exactly the two replicas.
    let deadline = Instant::now() + Duration::from_secs(40);
    while c.container_pids(0).await.len() + c.container_pids(1).await.len() != 2 {
        assert!(
            Instant::now() < deadline,
            "replaced containers still running"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The whole control plane stops answering (every coordinator paused for
    // longer than the Down timeout): agents keep their containers; when it
    // comes back nothing is replaced or duplicated.
    let pids: HashMap<usize, BTreeMap<String, u32>> = HashMap::from([
        (0, c.container_pids(0).await),
        (1, c.container_pids(1).await),
    ]);
    let coordinator_pids: Vec<u32> = c
        .coordinators
        .iter()
        .filter_map(|p| p.child.as_ref().map(Child::id))
        .collect();
    for p in &coordinator_pids {
        signal(*p, "STOP");
    }
    tokio::time::sleep(Duration::from_secs(7)).await;
    for i in 0..2 {
        assert_eq!(
            pids[&i],
            c.container_pids(i).await,
            "agent {i} lost containers"
        );
    }
    for p in &coordinator_pids {
        signal(*p, "CONT");
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = c
        .wait_ready("web", 2, Duration::from_secs(20), |_| true)
        .await;
    let ids = |v: &[pb::Replica]| v.iter().map(|r| r.id.clone()).collect::<BTreeSet<_>>();
    assert_eq!(
        ids(&rs),
        ids(&after),
        "replicas replaced after the control plane returned"
    );
    let total: usize = [c.container_pids(0).await, c.container_pids(1).await]
        .iter()
        .map(BTreeMap::len)
        .sum();
    assert_eq!(total, 2, "duplicates after the control plane returned");
}
