//! A whole Cloudless installation on one machine for end-to-end tests and
//! benchmarks: a containerd of its own, a local registry (Debian's
//! docker-registry) holding the busybox image built here as
//! `<registry>/cloudless/busybox:1` and `:2`, 3 coordinator processes with
//! mTLS, and `cloudless-agent` processes enrolled with join tokens.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use cloudless_proto::v1 as pb;
use cloudless_runtime::image::OciArchive;
use cloudless_runtime::registry::{RegistryClient, RegistryConfig};
use cloudless_runtime::test_support::{
    missing_prerequisite, write_busybox_archive_with, Daemon, LocalRegistry, REGISTRY_BIN,
};
use cloudless_runtime::{Containerd, TaskState};
use pb::workload_service_client::WorkloadServiceClient;

use crate::{channel, start_process_cluster_on, wait_all_healthy, workspace_binary, ProcessNode};

/// A network namespace joined to the host by a veth pair, whose host end
/// can be taken down to cut the namespace off.
#[derive(Debug)]
pub struct NetNs {
    /// The namespace's name.
    pub name: String,
    host_if: String,
    /// The host end's address (reachable from both sides while up, and
    /// from the host always).
    pub host_ip: String,
    /// The address inside the namespace.
    pub ns_ip: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

impl NetNs {
    /// Creates namespace `cl-<tag>` with veth `clh<tag>` (host) and
    /// `cln<tag>` (inside) on 10.213.`subnet`.0/24.
    pub fn create(tag: &str, subnet: u8) -> Result<Self, String> {
        let name = format!("cl-{tag}");
        let host_if = format!("clh{tag}");
        let ns_if = format!("cln{tag}");
        let host_ip = format!("10.213.{subnet}.1");
        let ns_ip = format!("10.213.{subnet}.2");
        let this = Self {
            name: name.clone(),
            host_if: host_if.clone(),
            host_ip: host_ip.clone(),
            ns_ip: ns_ip.clone(),
        };
        ip(&["netns", "add", &name])?;
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ])?;
        ip(&["link", "set", &ns_if, "netns", &name])?;
        ip(&["addr", "add", &format!("{host_ip}/24"), "dev", &host_if])?;
        ip(&["link", "set", &host_if, "up"])?;
        for args in [
            vec!["addr", "add", &format!("{ns_ip}/24"), "dev", &ns_if],
            vec!["link", "set", &ns_if, "up"],
            vec!["link", "set", "lo", "up"],
        ] {
            let mut full = vec!["netns", "exec", &name, "ip"];
            full.extend(args.iter().map(|s| &**s));
            ip(&full)?;
        }
        Ok(this)
    }

    /// Takes the host end down: nothing passes until [`NetNs::restore`].
    pub fn cut(&self) {
        ip(&["link", "set", &self.host_if, "down"]).expect("cut the link");
    }

    /// Brings the host end up again.
    pub fn restore(&self) {
        ip(&["link", "set", &self.host_if, "up"]).expect("restore the link");
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// How to set a [`Cluster`] up.
#[derive(Debug, Default, Clone)]
pub struct Options {
    /// Run the agent of this zone in its own network namespace (so that
    /// its network can be cut); the coordinators and the registry then
    /// listen on the host end of its veth too.
    pub netns_zone: Option<String>,
    /// Extra flags for every agent.
    pub agent_args: Vec<String>,
    /// Give replicas networks of their own (CNI bridge per agent, a cluster
    /// range of this cluster's own); else agents run with
    /// `--no-container-network`.
    pub container_network: bool,
}

/// Clusters with container networks started by this process (each gets a
/// range of its own).
static NETWORK_CLUSTERS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Why the end-to-end set-up cannot run here, if it cannot.
pub fn missing() -> Option<String> {
    if let Some(why) = missing_prerequisite() {
        return Some(why);
    }
    if !Path::new(REGISTRY_BIN).exists() {
        return Some(format!(
            "{REGISTRY_BIN} is missing (apt-get install docker-registry)"
        ));
    }
    None
}

/// A `cloudless-agent` process.
#[derive(Debug)]
pub struct AgentProc {
    /// Node name (`agent-<zone>`).
    pub name: String,
    /// Its zone label.
    pub zone: String,
    /// Its containerd namespace.
    pub namespace: String,
    /// Its data dir (identity, container logs).
    pub data_dir: PathBuf,
    /// The process while running.
    pub child: Option<Child>,
    /// Where it serves /metrics, /healthz and /readyz (`host:port`).
    pub metrics_addr: String,
}

impl AgentProc {
    /// SIGKILLs the agent (its containers keep running).
    pub fn sigkill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Removes the iptables chains named `<prefix>-*` (an agent's node chains,
/// left when it is killed) and the rules that jump to them, and its
/// address locks (the nftables bridge table named after the prefix).
pub fn remove_chains(prefix: &str) {
    let _ = Command::new("nft")
        .args(["delete", "table", "bridge", &prefix.replace('-', "_")])
        .output();
    for table in ["filter", "nat"] {
        let Ok(out) = Command::new("iptables").args(["-t", table, "-S"]).output() else {
            return;
        };
        let listed = String::from_utf8_lossy(&out.stdout).into_owned();
        let ours = format!("{prefix}-");
        for rule in listed.lines().filter(|l| l.starts_with("-A ")) {
            let words: Vec<&str> = rule.split_whitespace().collect();
            let jumps = words
                .windows(2)
                .any(|w| w[0] == "-j" && w[1].starts_with(&ours));
            if jumps && !words[1].starts_with(&ours) {
                let mut args = vec!["-t", table, "-D"];
                args.extend(&words[1..]);
                let _ = Command::new("iptables").args(&args).output();
            }
        }
        for chain in listed.lines().filter_map(|l| l.strip_prefix("-N ")) {
            if chain.starts_with(&ours) {
                let _ = Command::new("iptables")
                    .args(["-t", table, "-F", chain])
                    .output();
            }
        }
        for chain in listed.lines().filter_map(|l| l.strip_prefix("-N ")) {
            if chain.starts_with(&ours) {
                let _ = Command::new("iptables")
                    .args(["-t", table, "-X", chain])
                    .output();
            }
        }
    }
}

/// Removes the bridge plugin's masquerade rules and the portmap plugin's
/// host port rules, with their chains, of the replicas whose CNI results are
/// kept in `cache` (an agent killed with replicas attached never ran their
/// DEL; a host port rule left behind would catch the port in the next run).
pub fn remove_cni_masquerades(cache: &Path) {
    let Ok(entries) = std::fs::read_dir(cache) else {
        return;
    };
    let ids: Vec<String> = entries
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".json"))
                .map(str::to_owned)
        })
        .collect();
    for (id, from) in ids
        .iter()
        .flat_map(|id| ["POSTROUTING", "CNI-HOSTPORT-DNAT"].map(|from| (id, from)))
    {
        let tag = format!("id: \"{id}\" */");
        // Highest rule first: deleting renumbers the ones after it (a few
        // rounds at most: a rule that cannot be deleted is left).
        for _ in 0..8 {
            let Ok(out) = Command::new("iptables")
                .args(["-t", "nat", "-L", from, "--line-numbers", "-n"])
                .output()
            else {
                return;
            };
            let listed = String::from_utf8_lossy(&out.stdout).into_owned();
            let Some((n, chain)) = listed
                .lines()
                .rev()
                .find(|l| l.contains(&tag))
                .and_then(|l| {
                    let mut w = l.split_whitespace();
                    Some((w.next()?.to_owned(), w.next()?.to_owned()))
                })
            else {
                break;
            };
            let _ = Command::new("iptables")
                .args(["-t", "nat", "-D", from, &n])
                .output();
            for op in ["-F", "-X"] {
                let _ = Command::new("iptables")
                    .args(["-t", "nat", op, &chain])
                    .output();
            }
        }
    }
}

/// Kills and deletes every container runc holds in containerd namespace `ns`.
pub fn kill_containers(ns: &str) {
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

/// The installation; everything is killed when dropped.
#[derive(Debug)]
pub struct Cluster {
    /// Holds everything.
    pub dir: tempfile::TempDir,
    /// containerd.
    pub daemon: Daemon,
    /// The registry.
    pub registry: LocalRegistry,
    /// Coordinator processes.
    pub coordinators: Vec<ProcessNode>,
    /// Agent processes.
    pub agents: Vec<AgentProc>,
    /// cloudlessctl's configuration (admin mTLS).
    pub ctl_config: PathBuf,
    /// Flags the coordinators were started with (for restarts).
    pub coordinator_flags: Vec<String>,
    /// The network namespace of `Options::netns_zone`'s agent.
    pub netns: Option<NetNs>,
    options: Options,
    ns: String,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for a in &mut self.agents {
            a.sigkill();
            kill_containers(&a.namespace);
        }
        if self.options.container_network {
            for a in &self.agents {
                let (bridge, prefix) = self.network_names(&a.name);
                let _ = ip(&["link", "del", &bridge]);
                remove_chains(&prefix);
                remove_cni_masquerades(&a.data_dir.join("network/cni"));
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(a.data_dir.join("netns"))
                    .status();
            }
        }
        for c in &mut self.coordinators {
            // A stopped (SIGSTOP) process still dies on SIGKILL.
            c.sigkill();
        }
    }
}

impl Cluster {
    /// Starts it with agents in zones a and b, both Ready.
    pub async fn start() -> Self {
        Self::start_with(Options::default()).await
    }

    /// Starts it with `options`, agents in zones a and b, both Ready.
    pub async fn start_with(options: Options) -> Self {
        crate::init_test_logging();
        let dir = tempfile::tempdir().expect("tempdir");
        let ns = format!(
            "e2e-{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        let (daemon, _rt) = Daemon::start(&ns).await.expect("containerd");
        let netns = options.netns_zone.as_ref().map(|_| {
            let tag = format!("{:x}", std::process::id() % 0xffff);
            let subnet = u8::try_from(20 + std::process::id() % 200).unwrap_or(20);
            NetNs::create(&tag, subnet).expect("network namespace")
        });
        let bind_ip = netns
            .as_ref()
            .map_or_else(|| "127.0.0.1".to_owned(), |n| n.host_ip.clone());
        let storage = dir.path().join("registry");
        let registry = LocalRegistry::start_at(dir.path(), &storage, "", None, &bind_ip)
            .expect("docker-registry");
        let archive = dir.path().join("busybox.tar");
        let udp_tool = build_udp_tool(dir.path());
        write_busybox_archive_with(
            &archive,
            "busybox:1",
            false,
            &[("bin/udp-tool", udp_tool.as_slice())],
        )
        .expect("archive");
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
        let also_on = netns.as_ref().map(|n| n.host_ip.clone());
        let (coordinators, coordinator_flags) =
            start_process_cluster_on(dir.path(), true, also_on.as_deref(), true)
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
            coordinator_flags,
            netns,
            options,
            ns,
        };
        if cluster.options.container_network {
            let k = NETWORK_CLUSTERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let second = 100 + (std::process::id() + k) % 100;
            cluster.ctl_ok(&[
                "cluster",
                "set",
                &format!("network.cluster_cidr=10.{second}.0.0/17"),
                &format!("network.service_cidr=10.{second}.128.0/17"),
            ]);
        }
        for zone in ["a", "b"] {
            cluster.start_agent(zone);
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

    /// Every coordinator address, comma-separated.
    pub fn servers(&self) -> String {
        self.coordinators
            .iter()
            .map(|c| c.grpc.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Runs cloudlessctl with the admin configuration.
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(workspace_binary("cloudlessctl"))
            .arg("--config")
            .arg(&self.ctl_config)
            .args(["--server", &self.servers()])
            .args(args)
            .output()
            .expect("run cloudlessctl")
    }

    /// Enrolls and starts the agent of `zone` (a new token each time).
    pub fn start_agent(&mut self, zone: &str) {
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
        let namespace = format!("{}-{zone}", self.ns);
        // A port of its own (several agents share this host).
        let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .to_string();
        let child = self.spawn_agent(&name, &data_dir, &namespace, &token_file, &metrics_addr);
        self.agents.push(AgentProc {
            name,
            zone: zone.to_owned(),
            namespace,
            data_dir,
            child: Some(child),
            metrics_addr,
        });
    }

    /// Restarts agent `i` (killed before) with its stored identity.
    pub fn restart_agent(&mut self, i: usize) {
        let (name, data_dir, namespace, metrics_addr) = {
            let a = &self.agents[i];
            (
                a.name.clone(),
                a.data_dir.clone(),
                a.namespace.clone(),
                a.metrics_addr.clone(),
            )
        };
        let token_file = self
            .dir
            .path()
            .join(format!("token-{}", self.agents[i].zone));
        let child = self.spawn_agent(&name, &data_dir, &namespace, &token_file, &metrics_addr);
        self.agents[i].child = Some(child);
    }

    fn spawn_agent(
        &self,
        name: &str,
        data_dir: &Path,
        namespace: &str,
        token_file: &Path,
        metrics_addr: &str,
    ) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{name}.log")))
            .expect("log");
        let isolated = self
            .options
            .netns_zone
            .as_ref()
            .is_some_and(|z| name == format!("agent-{z}"));
        let (mut cmd, servers) = match (&self.netns, isolated) {
            (Some(n), true) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &n.name])
                    .arg(workspace_binary("cloudless-agent"));
                let servers = self
                    .coordinators
                    .iter()
                    .map(|c| c.grpc.replace("127.0.0.1", &n.host_ip))
                    .collect::<Vec<_>>()
                    .join(",");
                (c, servers)
            }
            _ => (
                Command::new(workspace_binary("cloudless-agent")),
                self.servers(),
            ),
        };
        cmd.arg("--data-dir")
            .arg(data_dir)
            .args(["--coordinator", &servers, "--name", name])
            // Several agents share this host: each takes a free overlay port
            // and advertises its address on the route to the coordinators.
            .args(["--overlay-listen", "0.0.0.0:0"])
            .args(["--metrics-addr", metrics_addr])
            .args(&self.options.agent_args)
            .env(
                "RUST_LOG",
                std::env::var("CLOUDLESS_TEST_AGENT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .arg("--join-token-file")
            .arg(token_file)
            .arg("--ca-cert")
            .arg(self.coordinators[0].data_dir.join("admin/ca.crt"))
            .arg("--containerd-socket")
            .arg(self.daemon.socket())
            .args(["--containerd-namespace", namespace])
            .args(["--insecure-registry", &self.registry.host])
            .args(self.network_args(name, data_dir))
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn cloudless-agent")
    }

    /// The container network flags of agent `name`: a bridge, chains and
    /// namespace directory of its own (several agents share this host).
    fn network_args(&self, name: &str, data_dir: &Path) -> Vec<String> {
        if !self.options.container_network {
            return vec!["--no-container-network".into()];
        }
        let (bridge, prefix) = self.network_names(name);
        vec![
            "--bridge".into(),
            bridge,
            "--firewall-chain-prefix".into(),
            prefix,
            "--netns-dir".into(),
            data_dir.join("netns").display().to_string(),
        ]
    }

    /// The bridge and iptables chain prefix of agent `name`.
    pub fn network_names(&self, name: &str) -> (String, String) {
        let tail = &self.ns[self.ns.len().saturating_sub(6)..];
        let zone = name.rsplit('-').next().unwrap_or(name);
        (
            format!("cl{tail}{zone}"),
            format!("CL{tail}{zone}").to_uppercase(),
        )
    }

    /// The last lines of every agent's log.
    pub fn agent_logs(&self) -> String {
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

    /// Writes a manifest for a busybox loop printing `greeting`.
    pub fn manifest(&self, name: &str, tag: &str, replicas: i64, greeting: &str) -> PathBuf {
        self.manifest_with(name, tag, replicas, greeting, "")
    }

    /// Like `manifest`, with `extra` YAML appended to the spec (indented by two).
    pub fn manifest_with(
        &self,
        name: &str,
        tag: &str,
        replicas: i64,
        greeting: &str,
        extra: &str,
    ) -> PathBuf {
        let path = self
            .dir
            .path()
            .join(format!("{name}-{tag}-{greeting}.yaml"));
        let text = format!(
            "apiVersion: cloudless.dev/v1\nkind: Workload\nmetadata:\n  name: {name}\nspec:\n  \
             image: {}/cloudless/busybox:{tag}\n  command: [\"/bin/sh\", \"-c\"]\n  args:\n    \
             - 'while true; do echo \"hello from $CLOUDLESS_REPLICA ($GREETING)\"; sleep 1; done'\n  \
             replicas: {replicas}\n  env:\n    GREETING: {greeting}\n{extra}",
            self.registry.host
        );
        std::fs::write(&path, text).expect("manifest");
        path
    }

    /// The replicas of workload `name` from the first coordinator that answers.
    pub async fn replicas(&self, name: &str) -> Option<Vec<pb::Replica>> {
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
    pub async fn wait_ready(
        &self,
        name: &str,
        n: usize,
        timeout: Duration,
        check: impl Fn(&[pb::Replica]) -> bool,
    ) -> Vec<pb::Replica> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(rs) = self.replicas(name).await {
                if rs.len() == n
                    && rs.iter().all(|r| r.state() == pb::ReplicaState::Ready)
                    && check(&rs)
                {
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
    pub async fn container_pids(&self, i: usize) -> BTreeMap<String, u32> {
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

/// The phase of node `name` from the first coordinator that answers.
pub async fn node_phase(cluster: &Cluster, name: &str) -> Option<String> {
    for c in cluster.coordinators.iter().filter(|c| c.child.is_some()) {
        let mut req = tonic::Request::new(pb::ListNodesRequest::default());
        req.set_timeout(Duration::from_millis(1000));
        if let Ok(r) = pb::node_service_client::NodeServiceClient::new(channel(&c.grpc))
            .list(req)
            .await
        {
            return r
                .into_inner()
                .nodes
                .into_iter()
                .find(|n| n.name == name)
                .map(|n| format!("{:?}", n.phase()));
        }
    }
    None
}

/// stdout and stderr of a finished command, as text.
pub fn output_text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

impl Cluster {
    /// Runs cloudlessctl and returns its stdout; fails the test (with the
    /// output and the agents' logs) if it does not succeed.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        let (stdout, stderr) = output_text(&out);
        assert!(
            out.status.success(),
            "cloudlessctl {}: {stdout}\n{stderr}\n{}",
            args.join(" "),
            self.agent_logs()
        );
        stdout
    }
}

/// What a [`ReplicaSampler`] saw.
#[derive(Debug, Clone, Copy)]
pub struct Samples {
    /// Fewest Ready replicas in any sample.
    pub min_ready: usize,
    /// Most replicas (any state) in any sample.
    pub max_total: usize,
    /// Samples taken.
    pub count: usize,
}

/// Lists a workload's replicas every 50 ms (from the first coordinator that
/// answers) until stopped, keeping the fewest Ready and the most replicas.
#[derive(Debug)]
pub struct ReplicaSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<Samples>,
}

impl ReplicaSampler {
    /// Starts sampling workload `name` in the default namespace.
    pub fn start(cluster: &Cluster, name: &str) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let servers: Vec<String> = cluster
            .coordinators
            .iter()
            .map(|p| p.grpc.clone())
            .collect();
        let (flag, name) = (stop.clone(), name.to_owned());
        let task = tokio::spawn(async move {
            let mut s = Samples {
                min_ready: usize::MAX,
                max_total: 0,
                count: 0,
            };
            while !flag.load(Ordering::Relaxed) {
                for server in &servers {
                    let req = pb::ListReplicasRequest {
                        read: None,
                        namespace: "default".into(),
                        name: name.clone(),
                    };
                    if let Ok(r) = WorkloadServiceClient::new(channel(server))
                        .list_replicas(req)
                        .await
                    {
                        let rs = r.into_inner().replicas;
                        let ready = rs
                            .iter()
                            .filter(|r| r.state() == pb::ReplicaState::Ready)
                            .count();
                        s.min_ready = s.min_ready.min(ready);
                        s.max_total = s.max_total.max(rs.len());
                        s.count += 1;
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            s
        });
        Self { stop, task }
    }

    /// Stops and returns what was seen.
    pub async fn finish(self) -> Samples {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.expect("sampler task")
    }
}

/// Builds `test/assets/udp_tool.rs` (a UDP server and client: busybox's `nc`
/// has no UDP) in `dir` as a static binary, with the toolchain's `rustc`;
/// its bytes.
fn build_udp_tool(dir: &Path) -> Vec<u8> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/udp_tool.rs");
    let out = dir.join("udp-tool");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let built = std::process::Command::new(&rustc)
        .args([
            "-O",
            "-C",
            "target-feature=+crt-static",
            "-C",
            "strip=symbols",
            "-o",
        ])
        .arg(&out)
        .arg(&source)
        .output()
        .unwrap_or_else(|e| panic!("running {rustc}: {e}"));
    assert!(
        built.status.success(),
        "building {}: {}",
        source.display(),
        String::from_utf8_lossy(&built.stderr)
    );
    std::fs::read(&out).expect("the built udp-tool")
}
