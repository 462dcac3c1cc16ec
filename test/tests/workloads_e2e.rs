//! Workloads end to end with the real binaries: 3 coordinator processes
//! (mTLS, Raft), 2 `cloudless-agent` processes (zones a and b) enrolled with
//! join tokens, a containerd of the test's own, and a local registry
//! (Debian's docker-registry) serving the busybox image built here;
//! `cloudlessctl` drives it. Needs root, containerd, runc, busybox-static
//! and docker-registry (installed by .ci/run); skips loudly otherwise.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cloudless_proto::v1 as pb;
use cloudless_runtime::image::OciArchive;
use cloudless_runtime::registry::{RegistryClient, RegistryConfig};
use cloudless_runtime::test_support::{
    missing_prerequisite, write_busybox_archive, Daemon, LocalRegistry, REGISTRY_BIN,
};
use cloudless_runtime::{Containerd, TaskState};
use cloudless_test::{
    channel, process_leader, start_process_cluster, wait_all_healthy, workspace_binary, ProcessNode,
};
use pb::workload_service_client::WorkloadServiceClient;

macro_rules! require_e2e {
    () => {
        if let Some(why) = missing_prerequisite() {
            eprintln!("\n!!!!!!!! SKIPPED end-to-end workload test: {why} !!!!!!!!\n");
            return;
        }
        if !Path::new(REGISTRY_BIN).exists() {
            eprintln!(
                "\n!!!!!!!! SKIPPED end-to-end workload test: {REGISTRY_BIN} is missing !!!!!!!!\n"
            );
            return;
        }
    };
}

struct AgentProc {
    name: String,
    namespace: String,
    data_dir: PathBuf,
    child: Option<Child>,
}

impl AgentProc {
    fn sigkill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Kills and deletes every container runc holds in containerd namespace `ns`.
fn kill_containers(ns: &str) {
    let root = format!("/run/containerd/runc/{ns}");
    let Ok(entries) = std::fs::read_dir(&root) else {
        return;
    };
    for e in entries.flatten() {
        let id = e.file_name().to_string_lossy().to_string();
        let _ = Command::new("runc")
            .args(["--root", &root, "delete", "--force", &id])
            .output();
    }
    let _ = std::fs::remove_dir_all(&root);
}

struct Cluster {
    dir: tempfile::TempDir,
    daemon: Daemon,
    registry: LocalRegistry,
    coordinators: Vec<ProcessNode>,
    agents: Vec<AgentProc>,
    ctl_config: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for a in &mut self.agents {
            a.sigkill();
            kill_containers(&a.namespace);
        }
        for c in &mut self.coordinators {
            // A stopped (SIGSTOP) process still dies on SIGKILL.
            c.sigkill();
        }
    }
}

impl Cluster {
    async fn start() -> Self {
        cloudless_test::init_test_logging();
        let dir = tempfile::tempdir().expect("tempdir");
        let ns = format!(
            "e2e-{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        let (daemon, _rt) = Daemon::start(&ns).await.expect("containerd");
        let storage = dir.path().join("registry");
        let registry =
            LocalRegistry::start(dir.path(), &storage, "", None).expect("docker-registry");
        let archive = dir.path().join("busybox.tar");
        write_busybox_archive(&archive, "busybox:1", false).expect("archive");
        let oci = OciArchive::open(&archive).expect("archive");
        let client = RegistryClient::new(RegistryConfig {
            insecure: vec![registry.host.clone()],
            ..RegistryConfig::default()
        })
        .expect("client");
        for tag in ["1", "2"] {
            client
                .push_archive(&oci, &format!("{}/cloudless/busybox:{tag}", registry.host))
                .await
                .expect("push");
        }
        let (coordinators, _) = start_process_cluster(dir.path(), true)
            .await
            .expect("coordinators");
        wait_all_healthy(&coordinators).await.expect("healthy");
        let ctl_config = coordinators[0].data_dir.join("admin/cloudlessctl.toml");
        let mut cluster = Self {
            dir,
            daemon,
            registry,
            coordinators,
            agents: Vec::new(),
            ctl_config,
        };
        for zone in ["a", "b"] {
            cluster.start_agent(zone, &ns);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = cluster.ctl(&["get", "nodes"]);
            let ready = String::from_utf8_lossy(&out.stdout)
                .matches(" Ready ")
                .count();
            if ready == 2 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "agents not Ready: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                cluster.agent_logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        cluster
    }

    fn servers(&self) -> String {
        self.coordinators
            .iter()
            .map(|c| c.grpc.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    fn ctl(&self, args: &[&str]) -> Output {
        Command::new(workspace_binary("cloudlessctl"))
            .arg("--config")
            .arg(&self.ctl_config)
            .args(["--server", &self.servers()])
            .args(args)
            .output()
            .expect("run cloudlessctl")
    }

    fn start_agent(&mut self, zone: &str, ns: &str) {
        let out = self.ctl(&[
            "token",
            "create",
            "--ttl",
            "10m",
            "--max-uses",
            "1",
            "--label",
            &format!("zone={zone}"),
        ]);
        assert!(out.status.success(), "token: {out:?}");
        let token_file = self.dir.path().join(format!("token-{zone}"));
        std::fs::write(&token_file, &out.stdout).expect("token file");
        let name = format!("agent-{zone}");
        let data_dir = self.dir.path().join(&name);
        let namespace = format!("{ns}-{zone}");
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log"))).expect("log");
        let child = Command::new(workspace_binary("cloudless-agent"))
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--coordinator", &self.servers(), "--name", &name])
            .arg("--join-token-file")
            .arg(&token_file)
            .arg("--ca-cert")
            .arg(self.coordinators[0].data_dir.join("admin/ca.crt"))
            .arg("--containerd-socket")
            .arg(self.daemon.socket())
            .args(["--containerd-namespace", &namespace])
            .args(["--insecure-registry", &self.registry.host])
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn cloudless-agent");
        self.agents.push(AgentProc {
            name,
            namespace,
            data_dir,
            child: Some(child),
        });
    }

    fn agent_logs(&self) -> String {
        self.agents
            .iter()
            .map(|a| {
                let log = self.dir.path().join(format!("{}.log", a.name));
                let text = std::fs::read_to_string(log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                format!(
                    "--- {}:\n{}",
                    a.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn manifest(&self, name: &str, tag: &str, replicas: i64, greeting: &str) -> PathBuf {
        let path = self
            .dir
            .path()
            .join(format!("{name}-{tag}-{greeting}.yaml"));
        let text = format!(
            "apiVersion: cloudless.dev/v1\nkind: Workload\nmetadata:\n  name: {name}\nspec:\n  \
             image: {}/cloudless/busybox:{tag}\n  command: [\"/bin/sh\", \"-c\"]\n  args:\n    \
             - 'while true; do echo \"hello from $CLOUDLESS_REPLICA ($GREETING)\"; sleep 1; done'\n  \
             replicas: {replicas}\n  env:\n    GREETING: {greeting}\n",
            self.registry.host
        );
        std::fs::write(&path, text).expect("manifest");
        path
    }

    async fn replicas(&self, name: &str) -> Option<Vec<pb::Replica>> {
        for c in &self.coordinators {
            if c.child.is_none() {
                continue;
            }
            let mut req = tonic::Request::new(pb::ListReplicasRequest {
                read: None,
                namespace: "default".into(),
                name: name.into(),
            });
            req.set_timeout(Duration::from_millis(1500));
            if let Ok(r) = WorkloadServiceClient::new(channel(&c.grpc))
                .list_replicas(req)
                .await
            {
                return Some(r.into_inner().replicas);
            }
        }
        None
    }

    /// Waits until `name` has exactly `n` replicas, all Ready, passing `check`.
    async fn wait_ready(
        &self,
        name: &str,
        n: usize,
        timeout: Duration,
        check: impl Fn(&[pb::Replica]) -> bool,
    ) -> Vec<pb::Replica> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(rs) = self.replicas(name).await {
                if rs.len() == n && rs.iter().all(|r| r.state == "Ready") && check(&rs) {
                    return rs;
                }
                assert!(
                    Instant::now() < deadline,
                    "timed out waiting for {n} Ready replicas of {name}: {rs:#?}\n{}",
                    self.agent_logs()
                );
            } else {
                assert!(Instant::now() < deadline, "no coordinator answers");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Pids of the running containers of agent `i`, by container id.
    async fn container_pids(&self, i: usize) -> BTreeMap<String, u32> {
        let a = &self.agents[i];
        let rt = Containerd::connect(
            &self.daemon.socket(),
            &a.namespace,
            &self.dir.path().join("probe-logs"),
        )
        .await
        .expect("containerd");
        let mut out = BTreeMap::new();
        for id in rt.managed().await.expect("containers") {
            if let Ok(TaskState::Running(pid)) = rt.task_state(&id).await {
                out.insert(id, pid);
            }
        }
        out
    }
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
    let stop = Arc::new(AtomicBool::new(false));
    let min_ready = Arc::new(AtomicUsize::new(usize::MAX));
    let samples = Arc::new(AtomicUsize::new(0));
    let servers: Vec<String> = c.coordinators.iter().map(|p| p.grpc.clone()).collect();
    let sampler = {
        let (stop, min_ready, samples) = (stop.clone(), min_ready.clone(), samples.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                for s in &servers {
                    let req = pb::ListReplicasRequest {
                        read: None,
                        namespace: "default".into(),
                        name: "web".into(),
                    };
                    if let Ok(r) = WorkloadServiceClient::new(channel(s))
                        .list_replicas(req)
                        .await
                    {
                        let ready = r
                            .into_inner()
                            .replicas
                            .iter()
                            .filter(|r| r.state == "Ready")
                            .count();
                        min_ready.fetch_min(ready, Ordering::Relaxed);
                        samples.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let v2 = c.manifest("web", "2", 2, "v2");
    let out = c.ctl(&[
        "apply",
        "-f",
        &v2.display().to_string(),
        "--wait",
        "--timeout",
        "90",
    ]);
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.await;
    assert!(
        out.status.success(),
        "apply v2: {out:?}\n{}",
        c.agent_logs()
    );
    let rs = c
        .wait_ready("web", 2, Duration::from_secs(30), |rs| {
            rs.iter()
                .all(|r| r.image.ends_with(":2") && r.template == 2)
        })
        .await;
    assert!(samples.load(Ordering::Relaxed) > 5);
    assert!(
        min_ready.load(Ordering::Relaxed) >= 2,
        "fewer than 2 Ready replicas during the rollout (min {})",
        min_ready.load(Ordering::Relaxed)
    );

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
