//! Test harness: coordinator clusters over real loopback gRPC, in-process or
//! as separate processes, and small API helpers.

pub mod bench;
pub mod e2e;
pub mod proxy;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cloudless_coordinator::{Coordinator, CoordinatorConfig, StartMode};
use cloudless_proto::v1 as pb;
use pb::workload_service_client::WorkloadServiceClient;
use tonic::transport::Channel;

pub use cloudless_runtime::test_support::{free_port, skip_test};

/// Installs the test log subscriber once.
pub fn init_test_logging() {
    cloudless_telemetry::init_logging(
        cloudless_telemetry::LogFormat::Text,
        "info,openraft=warn,cloudless_test=info",
    );
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub async fn wait_until<F: FnMut() -> bool>(what: &str, timeout: Duration, mut cond: F) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Client credentials per server address, registered by clusters that run mTLS.
fn tls_registry(
) -> &'static std::sync::Mutex<std::collections::HashMap<String, cloudless_client::ClientTls>> {
    static REG: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<String, cloudless_client::ClientTls>>,
    > = std::sync::OnceLock::new();
    REG.get_or_init(Default::default)
}

/// Makes `channel(addr)` use mTLS with the admin credentials in `admin_dir`
/// (`ca.crt`, `admin.crt`, `admin.key`, as written by `init`).
pub fn register_admin_tls(addr: &str, admin_dir: &Path) {
    let read =
        |f: &str| std::fs::read_to_string(admin_dir.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
    let tls = cloudless_client::ClientTls::new(
        read("ca.crt"),
        read("admin.crt"),
        zeroize::Zeroizing::new(read("admin.key")),
    );
    tls_registry()
        .lock()
        .expect("registry")
        .insert(addr.to_owned(), tls);
}

/// A channel to `addr` over TLS trusting `ca_pem`, presenting `identity`
/// (certificate and key PEM) or no client certificate; the server name is
/// 127.0.0.1.
pub fn tls_channel(addr: &str, ca_pem: &str, identity: Option<(&str, &str)>) -> Channel {
    let mut cfg = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca_pem))
        .domain_name("127.0.0.1");
    if let Some((cert, key)) = identity {
        cfg = cfg.identity(tonic::transport::Identity::from_pem(cert, key));
    }
    tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .expect("address")
        .tls_config(cfg)
        .expect("tls")
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect_lazy()
}

/// A lazily connected channel to `addr` (mTLS when registered): 1 s to
/// connect, 10 s per call.
pub fn channel(addr: &str) -> Channel {
    let address = cloudless_client::HostPort::parse(addr).expect("valid address");
    let tls = tls_registry()
        .lock()
        .expect("registry")
        .get(addr)
        .map(|t| t.config_for(&address));
    let options = cloudless_client::ChannelOptions {
        connect_timeout: Duration::from_secs(1),
        call_timeout: Some(Duration::from_secs(10)),
        keep_alive: None,
    };
    cloudless_client::channel(&address, tls, &options).expect("client channel")
}

/// A small workload named `name`.
pub fn workload(name: &str, replicas: u32) -> pb::Workload {
    pb::Workload {
        name: name.to_owned(),
        namespace: "default".to_owned(),
        spec: Some(pb::WorkloadSpec {
            image: "example.org/app:1".to_owned(),
            replicas,
            ..pb::WorkloadSpec::default()
        }),
        ..pb::Workload::default()
    }
}

/// Applies `workload(name, replicas)` through the coordinator at `addr`.
pub async fn apply(
    addr: &str,
    name: &str,
    replicas: u32,
) -> Result<pb::ApplyWorkloadResponse, tonic::Status> {
    WorkloadServiceClient::new(channel(addr))
        .apply(pb::ApplyWorkloadRequest {
            write: None,
            workload: Some(workload(name, replicas)),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// Reads workload `name` from `addr`; `stale` serves from local state.
pub async fn get(
    addr: &str,
    name: &str,
    stale: bool,
) -> Result<Option<pb::Workload>, tonic::Status> {
    let consistency = if stale {
        pb::ReadConsistency::Stale
    } else {
        pb::ReadConsistency::Linearizable
    };
    match WorkloadServiceClient::new(channel(addr))
        .get(pb::GetWorkloadRequest {
            read: Some(pb::ReadOptions {
                consistency: consistency as i32,
            }),
            namespace: String::new(),
            name: name.to_owned(),
        })
        .await
    {
        Ok(r) => Ok(r.into_inner().workload),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
        Err(s) => Err(s),
    }
}

/// Every workload name at `addr`, read from its local state.
pub async fn list_names_stale(addr: &str) -> Result<Vec<String>, tonic::Status> {
    let r = WorkloadServiceClient::new(channel(addr))
        .list(pb::ListWorkloadsRequest {
            read: Some(pb::ReadOptions {
                consistency: pb::ReadConsistency::Stale as i32,
            }),
            namespace: String::new(),
        })
        .await?
        .into_inner();
    Ok(r.workloads.into_iter().map(|w| w.name).collect())
}

/// Coordinators in this process, each on its own loopback ports and data dir.
#[derive(Debug)]
pub struct InProcessCluster {
    /// Holds every data dir.
    pub dir: tempfile::TempDir,
    /// Running coordinators; `None` while stopped.
    pub nodes: Vec<Option<Coordinator>>,
    /// Each node's configuration (reused on restart).
    pub configs: Vec<CoordinatorConfig>,
}

impl InProcessCluster {
    /// Config for a new node `i` under `dir`.
    pub fn node_config(
        dir: &Path,
        i: usize,
        tweak: &dyn Fn(&mut CoordinatorConfig),
    ) -> CoordinatorConfig {
        let grpc = free_port();
        let http = free_port();
        let mut c = CoordinatorConfig::local(
            &dir.join(format!("n{i}")),
            format!("127.0.0.1:{grpc}").parse().expect("addr"),
            format!("127.0.0.1:{http}").parse().expect("addr"),
        );
        tweak(&mut c);
        c
    }

    /// Starts `n` coordinators: node 0 with `init`, the others joining it; waits until all are voters.
    pub async fn start(n: usize, tweak: impl Fn(&mut CoordinatorConfig)) -> Self {
        Self::start_with(n, |_, c| tweak(c)).await
    }

    /// [`Self::start`] with a tweak that also gets each node's index.
    pub async fn start_with(n: usize, tweak: impl Fn(usize, &mut CoordinatorConfig)) -> Self {
        init_test_logging();
        let dir = tempfile::tempdir().expect("tempdir");
        // Every node shares one master key, so the cluster has a CA and can enroll nodes.
        let key_file = write_master_key(dir.path());
        let mut cluster = Self {
            configs: (0..n)
                .map(|i| {
                    let with_key = |c: &mut CoordinatorConfig| {
                        c.master_key_file = Some(key_file.clone());
                        tweak(i, c);
                    };
                    Self::node_config(dir.path(), i, &with_key)
                })
                .collect(),
            dir,
            nodes: Vec::new(),
        };
        let first = cluster.first_start(0, StartMode::Init).await;
        cluster.nodes.push(Some(first));
        for i in 1..n {
            cluster.bootstrap_tls(i);
        }
        for i in 0..n {
            cluster.register_tls(i);
        }
        let seed = cluster.addr(0);
        for i in 1..n {
            let c = cluster
                .first_start(
                    i,
                    StartMode::Run {
                        join: Some(seed.clone()),
                    },
                )
                .await;
            cluster.nodes.push(Some(c));
        }
        cluster.wait_for_voters(n).await;
        if cluster.configs[0].master_key_file.is_some() {
            wait_until(
                "the cluster CA on every node",
                Duration::from_secs(20),
                || {
                    cluster
                        .nodes
                        .iter()
                        .flatten()
                        .all(|c| matches!(c.handle().reader().identity(), Ok(Some(_))))
                },
            )
            .await;
        }
        cluster
    }

    /// Starts node `i` for the first time. `free_port` hands out ports that
    /// another test may grab before we bind them, so a bind failure is
    /// retried on fresh ports (nothing else has started when binding fails).
    pub async fn first_start(&mut self, i: usize, mode: StartMode) -> Coordinator {
        for _ in 0..5 {
            match Coordinator::start(self.configs[i].clone(), mode.clone()).await {
                Ok(c) => return c,
                Err(cloudless_coordinator::StartError::Bind { what, addr, source }) => {
                    tracing::warn!(%what, %addr, %source, "port taken; retrying on fresh ports");
                    let grpc = free_port();
                    let c = &mut self.configs[i];
                    c.listen_addr = format!("127.0.0.1:{grpc}").parse().expect("addr");
                    c.advertise_addr = c.listen_addr.to_string();
                    c.http_addr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
                    self.register_tls(i);
                }
                Err(e) => panic!("start node {i}: {e}"),
            }
        }
        panic!("start node {i}: no free ports after 5 attempts");
    }

    /// Gives node `i` the cluster's sealed identity bundle (what an operator
    /// copies to a new coordinator), when the cluster runs mTLS.
    pub fn bootstrap_tls(&self, i: usize) {
        let from = self.configs[0].data_dir.join("tls/identity.json");
        if self.configs[i].master_key_file.is_some() && from.exists() {
            let dir = self.configs[i].data_dir.join("tls");
            std::fs::create_dir_all(&dir).expect("tls dir");
            std::fs::copy(&from, dir.join("identity.json")).expect("copy identity bundle");
        }
    }

    /// Makes test clients talk mTLS to node `i` with the admin credentials from `init`.
    pub fn register_tls(&self, i: usize) {
        let admin = self.configs[0].data_dir.join("admin");
        if admin.join("admin.crt").exists() {
            register_admin_tls(&self.configs[i].advertise_addr, &admin);
        }
    }

    /// A config for a new member `i` of this cluster (same master key, identity bundle copied).
    pub fn member_config(&mut self, i: usize) -> CoordinatorConfig {
        let key = self.configs[0].master_key_file.clone();
        let cfg = Self::node_config(self.dir.path(), i, &|c| c.master_key_file = key.clone());
        self.configs.push(cfg.clone());
        self.bootstrap_tls(i);
        self.register_tls(i);
        cfg
    }

    /// Waits until every running node sees `n` voters and a leader.
    pub async fn wait_for_voters(&self, n: usize) {
        wait_until(
            &format!("{n} voters and a leader on every running node"),
            Duration::from_secs(20),
            || {
                self.nodes.iter().flatten().all(|c| {
                    let m = c.handle().raft().metrics().borrow().clone();
                    m.current_leader.is_some()
                        && m.membership_config.membership().voter_ids().count() == n
                })
            },
        )
        .await;
    }

    /// gRPC address of node `i`.
    pub fn addr(&self, i: usize) -> String {
        self.configs[i].advertise_addr.clone()
    }

    /// Index of the node that currently leads (as seen by itself).
    pub fn leader(&self) -> Option<usize> {
        self.nodes.iter().position(|n| {
            n.as_ref().is_some_and(|c| {
                c.handle().raft().metrics().borrow().state == openraft::ServerState::Leader
            })
        })
    }

    /// Waits for a leader among running nodes and returns its index.
    pub async fn wait_for_leader(&self) -> usize {
        wait_until("a leader", Duration::from_secs(20), || {
            self.leader().is_some()
        })
        .await;
        self.leader().expect("leader present")
    }

    /// A running node that is not the leader.
    pub fn follower(&self) -> usize {
        let leader = self.leader();
        (0..self.nodes.len())
            .find(|i| Some(*i) != leader && self.nodes[*i].is_some())
            .expect("a running follower")
    }

    /// Stops node `i` (graceful: the process-level tests cover SIGKILL).
    pub async fn stop(&mut self, i: usize) {
        if let Some(c) = self.nodes[i].take() {
            c.shutdown(Duration::from_secs(5)).await;
        }
    }

    /// Restarts node `i` from its data dir.
    pub async fn restart(&mut self, i: usize) {
        let c = Coordinator::start(self.configs[i].clone(), StartMode::Run { join: None })
            .await
            .expect("restart node");
        self.nodes[i] = Some(c);
    }

    /// Applied index of node `i`.
    pub fn applied(&self, i: usize) -> u64 {
        self.nodes[i]
            .as_ref()
            .and_then(|c| {
                c.handle()
                    .raft()
                    .metrics()
                    .borrow()
                    .last_applied
                    .map(|l| l.index)
            })
            .unwrap_or(0)
    }

    /// Stops every node.
    pub async fn shutdown(mut self) {
        for i in 0..self.nodes.len() {
            self.stop(i).await;
        }
    }
}

/// Writes a new master key file (mode 0600) in `dir`.
pub fn write_master_key(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("master.key");
    let key = cloudless_pki::MasterKey::generate().expect("master key");
    std::fs::write(&path, key.to_base64().as_bytes()).expect("write master key");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod 600");
    path
}

/// Path of a workspace binary next to the test executable (built by `make test`).
pub fn workspace_binary(name: &str) -> PathBuf {
    // Tests run from target/<profile>/deps, binaries like bench-raft from target/<profile>.
    let exe = std::env::current_exe().expect("current exe");
    let here = exe.parent().expect("exe dir");
    let path = [here.join(name), here.parent().unwrap_or(here).join(name)]
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| here.join(name));
    assert!(
        path.exists(),
        "{} not found: build it first (`cargo build --bins`, which `make test` does)",
        path.display()
    );
    path
}

/// A coordinator running as its own process (the real binary).
#[derive(Debug)]
pub struct ProcessNode {
    /// Its data dir.
    pub data_dir: PathBuf,
    /// gRPC host:port.
    pub grpc: String,
    /// HTTP host:port.
    pub http: String,
    /// Listen here instead of `grpc` (which is then advertised).
    pub listen: Option<String>,
    /// Append stderr (logs, at `CLOUDLESS_TEST_COORDINATOR_LOG` or
    /// `info,openraft=warn`) to this file instead of the test's stderr.
    pub log_file: Option<PathBuf>,
    /// Serve plaintext (`--insecure-plaintext`), the default for these test
    /// processes; `false` for mTLS (a master key given or created by `init`).
    pub plaintext: bool,
    /// The process while running.
    pub child: Option<std::process::Child>,
}

impl ProcessNode {
    /// Node `i` with its data dir under `dir` and fresh loopback ports; not started.
    pub fn new(dir: &Path, i: usize) -> Self {
        Self {
            data_dir: dir.join(format!("c{i}")),
            grpc: format!("127.0.0.1:{}", free_port()),
            http: format!("127.0.0.1:{}", free_port()),
            listen: None,
            log_file: None,
            plaintext: true,
            child: None,
        }
    }

    /// Starts `cloudless-coordinator <mode>` on this node's ports and data dir.
    pub fn spawn(&mut self, mode: &str, join: Option<&str>) {
        self.spawn_with(mode, join, &[]);
    }

    /// Like `spawn`, with extra flags.
    pub fn spawn_with(&mut self, mode: &str, join: Option<&str>, extra: &[&str]) {
        let mut cmd = std::process::Command::new(workspace_binary("cloudless-coordinator"));
        cmd.arg(mode)
            .args(["--data-dir", &self.data_dir.display().to_string()])
            .args(["--http", &self.http])
            .args(extra)
            .stdout(std::process::Stdio::null());
        match self.log_file.as_ref().and_then(|f| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(f)
                .ok()
        }) {
            Some(file) => {
                let level = std::env::var("CLOUDLESS_TEST_COORDINATOR_LOG")
                    .unwrap_or_else(|_| "info,openraft=warn".into());
                cmd.env("RUST_LOG", level).stderr(file)
            }
            None => cmd
                .env(
                    "RUST_LOG",
                    std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
                )
                .stderr(std::process::Stdio::inherit()),
        };
        match &self.listen {
            Some(l) => cmd.args(["--listen", l, "--advertise", &self.grpc]),
            None => cmd.args(["--listen", &self.grpc]),
        };
        if self.plaintext {
            cmd.arg("--insecure-plaintext");
            let anywhere = self.listen.as_ref().is_some_and(|l| {
                l.parse::<std::net::SocketAddr>()
                    .map_or(true, |a| !a.ip().is_loopback())
            });
            if anywhere {
                cmd.arg("--insecure-plaintext-anywhere");
            }
        }
        if let Some(j) = join {
            cmd.args(["--join", j]);
        }
        self.child = Some(cmd.spawn().expect("spawn coordinator"));
    }

    /// Kills the process with SIGKILL and reaps it.
    pub fn sigkill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("SIGKILL");
            c.wait().expect("reap");
        }
    }
}

impl Drop for ProcessNode {
    fn drop(&mut self) {
        self.sigkill();
    }
}

/// `ClusterService.Status` from `addr`, or `None` if it does not answer within 500 ms.
pub async fn cluster_status(addr: &str) -> Option<pb::StatusResponse> {
    let mut req = tonic::Request::new(pb::StatusRequest {});
    req.set_timeout(Duration::from_millis(500));
    pb::cluster_service_client::ClusterServiceClient::new(channel(addr))
        .status(req)
        .await
        .ok()
        .map(tonic::Response::into_inner)
}

/// Index of the running process that the first answering node reports as leader.
pub async fn process_leader(nodes: &[ProcessNode]) -> Option<usize> {
    for n in nodes.iter().filter(|n| n.child.is_some()) {
        if let Some(s) = cluster_status(&n.grpc).await {
            let leader = s
                .coordinators
                .iter()
                .find(|c| c.state() == pb::RaftServerState::Leader && c.reachable)?;
            return nodes
                .iter()
                .position(|n| n.grpc == leader.address && n.child.is_some());
        }
    }
    None
}

/// Waits until a 3-process cluster has a leader and every member is a voter
/// with the leader's whole log applied; returns the leader's index.
pub async fn wait_all_healthy(nodes: &[ProcessNode]) -> anyhow::Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(l) = process_leader(nodes).await {
            if let Some(s) = cluster_status(&nodes[l].grpc).await {
                let leader_log = s
                    .coordinators
                    .iter()
                    .map(|c| c.last_log_index)
                    .max()
                    .unwrap_or(0);
                // Fully caught up: a lagging node would stand for election with a
                // shorter log, be refused and add a round (openraft 0.9 then waits
                // 2 x election_timeout_max), which is not what a benchmark measures.
                if s.members.len() == nodes.len()
                    && s.coordinators.iter().all(|c| {
                        c.reachable
                            && c.state() != pb::RaftServerState::Learner
                            && c.applied_index == leader_log
                    })
                {
                    return Ok(l);
                }
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "cluster not healthy within 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts 3 coordinator processes under `dir` (`init`, then two joining it);
/// with `tls`, a shared master key and mTLS everywhere, and test clients
/// registered with the admin credentials. Returns the nodes and the extra
/// flags they were started with (for restarts).
pub async fn start_process_cluster(
    dir: &Path,
    tls: bool,
) -> anyhow::Result<(Vec<ProcessNode>, Vec<String>)> {
    start_process_cluster_on(dir, tls, None, false).await
}

/// Like [`start_process_cluster`]; with `also_on`, the coordinators listen
/// on every address and their certificates also name that IP (so agents in
/// another network namespace can reach them by it); with `log_files`, their
/// logs go to `c<i>.log` in `dir`.
pub async fn start_process_cluster_on(
    dir: &Path,
    tls: bool,
    also_on: Option<&str>,
    log_files: bool,
) -> anyhow::Result<(Vec<ProcessNode>, Vec<String>)> {
    let mut nodes: Vec<ProcessNode> = (0..3).map(|i| ProcessNode::new(dir, i)).collect();
    let mut extra: Vec<String> = if tls {
        vec![
            "--set".into(),
            format!("master_key_file={}", write_master_key(dir).display()),
        ]
    } else {
        Vec::new()
    };
    for (i, n) in nodes.iter_mut().enumerate() {
        n.plaintext = !tls;
        if log_files {
            n.log_file = Some(dir.join(format!("c{i}.log")));
        }
    }
    if let Some(ip) = also_on {
        extra.extend(["--set".into(), format!("tls_sans={ip}")]);
        for n in &mut nodes {
            let port = n.grpc.rsplit_once(':').map(|(_, p)| p.to_owned());
            n.listen = port.map(|p| format!("0.0.0.0:{p}"));
        }
    }
    let flags: Vec<&str> = extra.iter().map(String::as_str).collect();
    nodes[0].spawn_with("init", None, &flags);
    if tls {
        // Wait for init's TLS material, then hand the sealed bundle to the joiners.
        let bundle = nodes[0].data_dir.join("tls/identity.json");
        let admin = nodes[0].data_dir.join("admin");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(bundle.exists() && admin.join("cloudlessctl.toml").exists()) {
            anyhow::ensure!(Instant::now() < deadline, "init wrote no TLS material");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for n in &nodes[1..] {
            std::fs::create_dir_all(n.data_dir.join("tls"))?;
            std::fs::copy(&bundle, n.data_dir.join("tls/identity.json"))?;
        }
        for n in &nodes {
            register_admin_tls(&n.grpc, &admin);
        }
    }
    let seed = nodes[0].grpc.clone();
    tokio::time::sleep(Duration::from_millis(500)).await;
    nodes[1].spawn_with("run", Some(&seed), &flags);
    nodes[2].spawn_with("run", Some(&seed), &flags);
    Ok((nodes, extra))
}

/// The value of the sample `series` (a metric name with its labels, as
/// exposed: `name{label="v"}`) in a Prometheus text scrape; panics naming
/// it when absent.
pub fn sample(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{scrape}"))
}

/// `GET path` from `addr` over HTTP/1.0 (the agents' and coordinators'
/// `/metrics`, `/healthz`, `/readyz`): the status code and the body.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("response");
    let (head, body) = text.split_once("\r\n\r\n").expect("a header");
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (code, body.to_owned())
}
