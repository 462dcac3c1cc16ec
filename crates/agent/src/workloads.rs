//! The agent's half of workloads: keep a `WatchAssignments` stream open to
//! any coordinator, run what it assigns through containerd (pulling images,
//! supervising containers), stop what it no longer assigns, and report
//! replica states back in batches. Without a coordinator the agent keeps
//! running (and restarting) what it was last assigned.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cloudless_proto::v1 as pb;
use cloudless_runtime::probe::{Probe, ProbeAction};
use cloudless_runtime::registry::{RegistryClient, RegistryConfig};
use cloudless_runtime::{
    Backoff, ContainerConfig, Containerd, HostSecurity, ImageRef, Limits, Mount, MountSource,
    NodePolicy, ReplicaPhase, ReplicaSpec, SeccompProfile, SecurityContext, Supervisor,
};
use tokio::sync::{watch, Mutex};
use tokio_util::sync::CancellationToken;

use crate::{AgentError, Coordinators, NodeIdentity};

/// How often changed replica states are sent (one call for all of them).
const REPORT_EVERY: Duration = Duration::from_millis(250);
/// Contact this recent counts as reconnected.
const RECONNECTED: Duration = Duration::from_secs(3);
/// Longest a container id may be (containerd's limit is 76).
const MAX_CONTAINER_ID: usize = 76;
/// Most processes and threads in a container whose workload sets no
/// `limits.pids`: a fork bomb stops there instead of exhausting the device.
pub const DEFAULT_PIDS_LIMIT: u64 = 4096;

/// Where and how the agent runs containers.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// containerd's socket.
    pub containerd_socket: PathBuf,
    /// containerd namespace for this agent's containers and images.
    pub namespace: String,
    /// Container logs.
    pub log_dir: PathBuf,
    /// Registries spoken to over plain HTTP (`host:port`).
    pub insecure_registries: Vec<String>,
    /// Extra CA certificates (PEM files) trusted for registries.
    pub registry_ca_files: Vec<PathBuf>,
    /// Where replicas' `emptyDir` volumes live.
    pub volume_dir: PathBuf,
    /// Where replicas' secret volumes are mounted (tmpfs each).
    pub secret_dir: PathBuf,
    /// How often secrets in use are read again (secret volumes follow updates).
    pub secret_refresh: Duration,
    /// Device directories workloads may mount as `hostPath` (prefixes).
    pub allowed_host_paths: Vec<PathBuf>,
    /// Seccomp profiles for `Localhost`.
    pub seccomp_dir: Option<PathBuf>,
    /// What workloads' `securityContext` may ask of this device beyond the
    /// defaults.
    pub security: SecurityPolicyConfig,
    /// Where the agent writes its AppArmor profile before loading it.
    pub apparmor_dir: PathBuf,
    /// How long replicas keep running without any coordinator before they
    /// are stopped (unless their workload's
    /// `disconnect.stopOnClientAfterSeconds` says otherwise); `None`: forever.
    pub max_disconnected: Option<Duration>,
}

/// What workloads may ask of this device beyond the defaults (all off by
/// default): the node policy's settings, from agent flags or environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecurityPolicyConfig {
    /// Capabilities allowed beyond Docker's default set (`NET_ADMIN`;
    /// `ALL`): `--allow-capability`, `CLOUDLESS_AGENT_ALLOW_CAPABILITIES`.
    pub allowed_capabilities: Vec<String>,
    /// `seccompProfile: Unconfined`, or a `Localhost` profile that allows by
    /// default: `--allow-unconfined-seccomp`.
    pub allow_unconfined_seccomp: bool,
    /// `appArmorProfile` other than `runtime/default` (`unconfined`, or a
    /// loaded profile): `--allow-apparmor-override`.
    pub allow_apparmor_override: bool,
    /// `seLinuxLabel` with a type other than `container_t`:
    /// `--allow-selinux-override`.
    pub allow_selinux_override: bool,
    /// `hostNetwork` (and other host namespaces): `--allow-host-namespaces`.
    pub allow_host_namespaces: bool,
}

/// The container id for a replica: the replica id, shortened in the middle
/// (its random suffix is kept) when longer than containerd allows.
pub fn container_id(replica_id: &str) -> String {
    if replica_id.len() <= MAX_CONTAINER_ID {
        return replica_id.to_owned();
    }
    let tail = &replica_id[replica_id.len() - 9..];
    format!("{}{tail}", &replica_id[..MAX_CONTAINER_ID - 9])
}

/// Where a replica's volumes go.
struct Paths {
    volumes: PathBuf,
    secrets: PathBuf,
}

/// The directory of a replica's `emptyDir` volumes.
fn volume_dir(base: &std::path::Path, container: &str) -> PathBuf {
    base.join(container)
}

/// What the runtime runs for an assignment: the manifest's process,
/// limits, security context and volumes.
fn container_config(
    a: &pb::Assignment,
    spec: &cloudless_types::WorkloadSpec,
    volume_base: &std::path::Path,
    secret_base: &std::path::Path,
) -> ContainerConfig {
    use cloudless_types::{SeccompType, StorageMedium};
    let id = container_id(&a.replica_id);
    let mut env = spec.env.clone();
    env.insert("CLOUDLESS_REPLICA".into(), a.replica_id.clone());
    env.insert(
        "CLOUDLESS_WORKLOAD".into(),
        format!("{}/{}", a.namespace, a.workload),
    );
    let sc = &spec.security_context;
    let security = SecurityContext {
        run_as_user: sc.run_as_user,
        run_as_group: sc.run_as_group,
        run_as_non_root: sc.run_as_non_root,
        read_only_root_filesystem: sc.read_only_root_filesystem,
        capabilities_add: sc.capabilities.effective(),
        seccomp: match sc.seccomp_profile.kind {
            SeccompType::RuntimeDefault => SeccompProfile::RuntimeDefault,
            SeccompType::Strict => SeccompProfile::Strict,
            SeccompType::Unconfined => SeccompProfile::Unconfined,
            SeccompType::Localhost => SeccompProfile::Localhost(
                sc.seccomp_profile
                    .localhost_profile
                    .clone()
                    .unwrap_or_default(),
            ),
        },
        apparmor_profile: sc.app_armor_profile.clone(),
        selinux_label: sc.se_linux_label.clone(),
        host_network: sc.host_network,
        ..SecurityContext::default()
    };
    let mounts = spec
        .volume_mounts
        .iter()
        .enumerate()
        .filter_map(|(i, m)| {
            let v = spec.volumes.iter().find(|v| v.name == m.name)?;
            let source = match (&v.empty_dir, &v.host_path, &v.secret) {
                (Some(e), _, _) if e.medium == StorageMedium::Memory => {
                    MountSource::Tmpfs(e.size_limit_bytes)
                }
                (Some(_), _, _) => {
                    MountSource::ReplicaDir(volume_dir(volume_base, &id).join(&v.name))
                }
                (None, Some(h), _) => MountSource::HostPath(PathBuf::from(&h.path)),
                (None, None, Some(_)) => {
                    MountSource::ReplicaDir(crate::secrets::volume_dir(secret_base, &id, &v.name))
                }
                (None, None, None) => return None,
            };
            Some(Mount {
                destination: m.mount_path.clone(),
                source,
                read_only: m.read_only || v.secret.is_some(),
                field: format!("volumeMounts[{i}]"),
                volume: v.name.clone(),
            })
        })
        .collect();
    ContainerConfig {
        id,
        command: spec.command.clone(),
        args: spec.args.clone(),
        env,
        working_dir: None,
        limits: Limits {
            cpu_millis: spec.limits.cpu_millis,
            memory_bytes: spec.limits.memory_bytes,
            pids: i64::try_from(if spec.limits.pids == 0 {
                DEFAULT_PIDS_LIMIT
            } else {
                spec.limits.pids
            })
            .unwrap_or(i64::MAX),
        },
        security,
        mounts,
        ..ContainerConfig::default()
    }
}

/// Makes the replica's `emptyDir` directories, never world-writable: owned
/// by the container's uid and gid with mode 0770 when it runs as a non-root
/// user, else root's with mode 0755 (as root the container needs no
/// capability to write there; other host users cannot).
fn prepare_volumes(
    config: &ContainerConfig,
    volume_base: &std::path::Path,
    uid: u32,
    gid: u32,
) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for m in &config.mounts {
        if let MountSource::ReplicaDir(dir) = &m.source {
            if !dir.starts_with(volume_base) {
                continue;
            }
            std::fs::create_dir_all(dir)?;
            let mode = if uid == 0 {
                std::os::unix::fs::chown(dir, Some(0), Some(0))?;
                0o755
            } else {
                std::os::unix::fs::chown(dir, Some(uid), Some(gid))?;
                0o770
            };
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))?;
        }
    }
    Ok(())
}

fn status(
    replica_id: &str,
    state: &str,
    exit_code: Option<i32>,
    restarts: u32,
    message: String,
) -> pb::ReplicaStatus {
    pb::ReplicaStatus {
        replica_id: replica_id.to_owned(),
        state: state.to_owned(),
        exit_code,
        restarts,
        message,
    }
}

/// What the runtime's replica status means for the cluster.
fn wire_status(replica_id: &str, s: &cloudless_runtime::ReplicaStatus) -> pb::ReplicaStatus {
    let code = s
        .last_exit
        .map(|e| i32::try_from(e.code).unwrap_or(i32::MAX));
    let mut message = s.message.clone();
    if let Some(e) = s.last_exit {
        if e.oom_killed && !message.contains("OOM") {
            message = format!("last run OOM-killed; {message}");
        }
    }
    let state = match s.phase {
        ReplicaPhase::Starting => "Pending",
        ReplicaPhase::Running if s.ready => "Ready",
        ReplicaPhase::Running | ReplicaPhase::BackOff => "Running",
        ReplicaPhase::Exited if code == Some(0) => "Succeeded",
        ReplicaPhase::Exited | ReplicaPhase::Failed => "Failed",
    };
    status(replica_id, state, code, s.restarts, message)
}

/// The runtime's probe for a wire probe (`None` when it names no action).
fn probe(p: &cloudless_types::ProbeSpec) -> Option<Probe> {
    let action = if let Some(argv) = p.exec.clone().filter(|a| !a.is_empty()) {
        ProbeAction::Exec(argv)
    } else if let Some(h) = &p.http_get {
        ProbeAction::Http {
            port: h.port,
            path: h.path.clone(),
        }
    } else {
        ProbeAction::Tcp(p.tcp_socket.as_ref()?.port)
    };
    let secs =
        |v: u32, default: u64| Duration::from_secs(if v == 0 { default } else { u64::from(v) });
    Some(Probe {
        action,
        initial_delay: Duration::from_secs(u64::from(p.initial_delay_seconds)),
        period: secs(p.period_seconds, 10),
        timeout: secs(p.timeout_seconds, 1),
        success_threshold: p.success_threshold.max(1),
        failure_threshold: if p.failure_threshold == 0 {
            3
        } else {
            p.failure_threshold
        },
    })
}

struct Slot {
    template: u64,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    /// Stop it after this long without any coordinator.
    stop_after: Option<Duration>,
}

/// When the agent last heard from a coordinator (a heartbeat answer).
#[derive(Debug, Clone)]
pub struct Contact(Arc<std::sync::Mutex<std::time::Instant>>);

impl Default for Contact {
    fn default() -> Self {
        Self(Arc::new(std::sync::Mutex::new(std::time::Instant::now())))
    }
}

impl Contact {
    /// Records contact now.
    pub fn touch(&self) {
        if let Ok(mut t) = self.0.lock() {
            *t = std::time::Instant::now();
        }
    }

    /// Time since the last contact.
    pub fn elapsed(&self) -> Duration {
        self.0.lock().map_or(Duration::ZERO, |t| t.elapsed())
    }
}

/// What makes the replicas a node runs match an assignment set.
#[derive(Debug, Default, PartialEq)]
struct Diff<'a> {
    /// Replicas to stop: no longer assigned here, or assigned with another
    /// template (they are started again with the new one).
    stop: Vec<String>,
    /// Assignments to start, in the set's order.
    start: Vec<&'a pb::Assignment>,
}

/// The pure core of [`Runner::apply`]: `running` maps each replica being
/// run to its template.
fn diff<'a>(running: &HashMap<&str, u64>, assignments: &'a [pb::Assignment]) -> Diff<'a> {
    let wanted: HashMap<&str, &pb::Assignment> = assignments
        .iter()
        .map(|a| (a.replica_id.as_str(), a))
        .collect();
    let mut stop: Vec<String> = running
        .iter()
        .filter(|(id, template)| wanted.get(*id).is_none_or(|a| a.generation != **template))
        .map(|(id, _)| (*id).to_owned())
        .collect();
    stop.sort_unstable();
    let mut seen = std::collections::HashSet::new();
    let start = assignments
        .iter()
        .filter(|a| {
            let kept = running
                .get(a.replica_id.as_str())
                .is_some_and(|t| *t == a.generation);
            // A replica listed twice is started once.
            !kept && seen.insert(a.replica_id.as_str())
        })
        .collect();
    Diff { stop, start }
}

/// Runs the replicas assigned to this node.
pub struct Runner {
    rt: Containerd,
    supervisor: Supervisor<Containerd>,
    registry: Arc<RegistryClient>,
    images: Arc<Mutex<HashMap<String, ImageRef>>>,
    slots: HashMap<String, Slot>,
    statuses: Arc<std::sync::Mutex<HashMap<String, pb::ReplicaStatus>>>,
    reported: HashMap<String, pb::ReplicaStatus>,
    adopted: bool,
    stopping: tokio::task::JoinSet<()>,
    volume_dir: PathBuf,
    secret_dir: PathBuf,
    secret_refresh: Duration,
    secrets: Option<Arc<crate::secrets::SecretFetcher>>,
    max_disconnected: Option<Duration>,
    /// Replicas stopped because the agent lost every coordinator for
    /// longer than they may run alone; started again on reconnection if
    /// still assigned.
    parked: std::collections::HashSet<String>,
    /// Service traffic between workloads (upstreams), when the overlay runs.
    mesh: Option<Arc<crate::mesh::Mesh>>,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("replicas", &self.slots.len())
            .finish()
    }
}

impl Runner {
    /// Connects to containerd and prepares the registry client.
    pub async fn new(config: &RuntimeConfig) -> Result<Self, AgentError> {
        let rt = Containerd::connect(
            &config.containerd_socket,
            &config.namespace,
            &config.log_dir,
        )
        .await
        .map_err(|e| AgentError::Config(format!("--containerd-socket: {e}")))?;
        let host = HostSecurity::detect();
        // The agent's own AppArmor profile, loaded before any container
        // names it; never named unless the kernel lists it.
        let apparmor_profile = match cloudless_runtime::apparmor::load_profile(
            host.apparmor,
            &config.apparmor_dir,
            std::path::Path::new(cloudless_runtime::apparmor::PARSER),
            std::path::Path::new(cloudless_runtime::apparmor::PROFILES_FILE),
        ) {
            Ok(name) => {
                tracing::info!(profile = %name, "AppArmor profile loaded");
                Some(name)
            }
            Err(cloudless_runtime::AppArmorError::Disabled) => {
                tracing::warn!(
                    reason = "AppArmorUnavailable",
                    "AppArmor is not enabled on this host: its profile is not loaded and containers run without an AppArmor profile"
                );
                None
            }
            Err(e) => {
                tracing::warn!(
                    reason = "AppArmorProfileNotLoaded",
                    error = %e,
                    "!!! AppArmor is enabled but the agent's profile could not be loaded: containers run with the runtime's default (no AppArmor profile) !!!"
                );
                None
            }
        };
        if !host.selinux {
            tracing::warn!(
                reason = "SELinuxUnavailable",
                "SELinux is not enabled on this host: containers run without an SELinux label"
            );
        }
        let sec = &config.security;
        for c in &sec.allowed_capabilities {
            if !c.trim().eq_ignore_ascii_case("ALL")
                && cloudless_runtime::policy::capability_name(c).is_none()
            {
                return Err(AgentError::Config(format!(
                    "--allow-capability {c:?}: not a Linux capability (NET_ADMIN, CAP_SYS_PTRACE, ALL)"
                )));
            }
        }
        let mut policy = NodePolicy {
            allow_host_namespaces: sec.allow_host_namespaces,
            allow_unconfined_seccomp: sec.allow_unconfined_seccomp,
            allowed_capabilities: sec.allowed_capabilities.clone(),
            allow_apparmor_override: sec.allow_apparmor_override,
            allow_selinux_override: sec.allow_selinux_override,
            apparmor_enabled: host.apparmor,
            apparmor_profile,
            selinux_enabled: host.selinux,
            namespace: config.namespace.clone(),
            allowed_host_paths: config.allowed_host_paths.clone(),
            ..NodePolicy::default()
        };
        if let Some(dir) = &config.seccomp_dir {
            policy.seccomp_dir = dir.clone();
        }
        std::fs::create_dir_all(&config.volume_dir)
            .map_err(|e| AgentError::io(&config.volume_dir, e))?;
        let mut ca_pem = Vec::new();
        for f in &config.registry_ca_files {
            ca_pem.push(std::fs::read(f).map_err(|e| AgentError::io(f, e))?);
        }
        let registry = RegistryClient::new(RegistryConfig {
            insecure: config.insecure_registries.clone(),
            credentials: HashMap::new(),
            ca_pem,
        })
        .map_err(|e| AgentError::Config(format!("--registry-ca: {e}")))?;
        Ok(Self {
            supervisor: Supervisor::new(rt.clone(), policy),
            rt,
            registry: Arc::new(registry),
            images: Arc::default(),
            slots: HashMap::new(),
            statuses: Arc::default(),
            reported: HashMap::new(),
            adopted: false,
            stopping: tokio::task::JoinSet::new(),
            volume_dir: config.volume_dir.clone(),
            secret_dir: config.secret_dir.clone(),
            secret_refresh: config.secret_refresh,
            secrets: None,
            max_disconnected: config.max_disconnected,
            parked: std::collections::HashSet::new(),
            mesh: None,
        })
    }

    /// Stops the replicas that may not run this long without a coordinator
    /// (`disconnect.stopOnClientAfterSeconds`, else `--max-disconnected`).
    pub async fn enforce_disconnect(&mut self, without_contact: Duration) {
        let due: Vec<String> = self
            .slots
            .iter()
            .filter(|(_, s)| s.stop_after.is_some_and(|d| without_contact >= d))
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            let Some(slot) = self.slots.remove(&id) else {
                continue;
            };
            tracing::warn!(
                replica = %id,
                seconds = without_contact.as_secs(),
                "no coordinator for longer than this replica may run alone; stopping it"
            );
            slot.cancel.cancel();
            let _ = slot.task.await;
            if let Ok(mut s) = self.statuses.lock() {
                s.insert(
                    id.clone(),
                    status(
                        &id,
                        "Pending",
                        None,
                        0,
                        format!(
                            "stopped after {} s without a coordinator (disconnect.stopOnClientAfterSeconds); starts again once assigned",
                            without_contact.as_secs()
                        ),
                    ),
                );
            }
            self.parked.insert(id);
        }
    }

    /// Whether replicas were stopped for lack of a coordinator.
    pub fn has_parked(&self) -> bool {
        !self.parked.is_empty()
    }

    /// Makes the running replicas match `set`.
    /// Uses `mesh` for the upstreams of replicas started from now on.
    pub fn set_mesh(&mut self, mesh: Option<Arc<crate::mesh::Mesh>>) {
        self.mesh = mesh;
    }

    pub async fn apply(&mut self, set: &pb::AssignmentSet) {
        self.parked.clear();
        if let Some(m) = &self.mesh {
            m.update(set);
        }
        if !self.adopted {
            // First set after a start: containers we ran before are adopted
            // by their supervisors; those no longer assigned are removed.
            let desired: Vec<String> = set
                .assignments
                .iter()
                .map(|a| container_id(&a.replica_id))
                .collect();
            match self.supervisor.adopt(&desired).await {
                Ok(adopted) => {
                    if !adopted.is_empty() {
                        tracing::info!(count = adopted.len(), "adopting running containers");
                    }
                    self.adopted = true;
                }
                Err(e) => tracing::warn!(error = %e, "cannot list containers to adopt"),
            }
        }
        // Reap finished stops.
        while self.stopping.try_join_next().is_some() {}
        let running: HashMap<&str, u64> = self
            .slots
            .iter()
            .map(|(id, slot)| (id.as_str(), slot.template))
            .collect();
        let Diff { stop, start } = diff(&running, &set.assignments);
        for id in stop {
            if let Some(slot) = self.slots.remove(&id) {
                tracing::info!(replica = %id, "stopping a replica no longer assigned here");
                // The supervisor stops (grace period, then SIGKILL) and
                // removes the container in the background; replica ids are
                // never reused, so nothing new can race it.
                slot.cancel.cancel();
                self.stopping.spawn(async move {
                    let _ = slot.task.await;
                });
            }
            if let Ok(mut s) = self.statuses.lock() {
                s.remove(&id);
            }
            self.reported.remove(&id);
        }
        for a in start {
            let Some(spec) = a.spec.clone() else {
                tracing::warn!(replica = %a.replica_id, "assignment without a spec; skipped");
                continue;
            };
            let spec = cloudless_types::WorkloadSpec::from(spec);
            let stop_after = spec
                .disconnect
                .stop_on_client_after_seconds
                .map(|s| Duration::from_secs(u64::from(s)))
                .or(self.max_disconnected);
            tracing::info!(replica = %a.replica_id, image = %spec.image, "starting a replica");
            let cancel = CancellationToken::new();
            let task = tokio::spawn(replica_task(
                self.rt.clone(),
                self.supervisor.clone(),
                self.registry.clone(),
                self.images.clone(),
                a.clone(),
                spec,
                cancel.clone(),
                self.statuses.clone(),
                Paths {
                    volumes: self.volume_dir.clone(),
                    secrets: self.secret_dir.clone(),
                },
                self.secrets.clone(),
                self.mesh.clone(),
            ));
            self.slots.insert(
                a.replica_id.clone(),
                Slot {
                    template: a.generation,
                    cancel,
                    task,
                    stop_after,
                },
            );
        }
    }

    /// States that changed since the last successful report.
    pub fn changed(&self) -> Vec<pb::ReplicaStatus> {
        let Ok(now) = self.statuses.lock() else {
            return Vec::new();
        };
        now.iter()
            .filter(|(id, s)| self.reported.get(*id) != Some(s))
            .map(|(_, s)| s.clone())
            .collect()
    }

    /// Records a successful report.
    pub fn reported(&mut self, sent: Vec<pb::ReplicaStatus>) {
        for s in sent {
            self.reported.insert(s.replica_id.clone(), s);
        }
    }

    /// The containerd client (for log requests).
    pub fn runtime(&self) -> Containerd {
        self.rt.clone()
    }

    /// Replicas being run.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Stops every replica (the node was removed).
    pub async fn stop_all(&mut self) {
        for (_, slot) in self.slots.drain() {
            slot.cancel.cancel();
            self.stopping.spawn(async move {
                let _ = slot.task.await;
            });
        }
        while self.stopping.join_next().await.is_some() {}
    }
}

#[allow(clippy::too_many_arguments)]
async fn replica_task(
    rt: Containerd,
    supervisor: Supervisor<Containerd>,
    registry: Arc<RegistryClient>,
    images: Arc<Mutex<HashMap<String, ImageRef>>>,
    a: pb::Assignment,
    spec: cloudless_types::WorkloadSpec,
    cancel: CancellationToken,
    statuses: Arc<std::sync::Mutex<HashMap<String, pb::ReplicaStatus>>>,
    paths: Paths,
    secrets: Option<Arc<crate::secrets::SecretFetcher>>,
    mesh: Option<Arc<crate::mesh::Mesh>>,
) {
    let volume_base = paths.volumes;
    let id = a.replica_id.clone();
    let set = |s: pb::ReplicaStatus| {
        if let Ok(mut m) = statuses.lock() {
            m.insert(s.replica_id.clone(), s);
        }
    };
    set(status(&id, "Pending", None, 0, "pulling the image".into()));
    let mut delay = Duration::from_secs(1);
    let image = loop {
        let cached = images.lock().await.get(&spec.image).cloned();
        if let Some(i) = cached {
            break i;
        }
        let pulled = tokio::select! {
            r = rt.pull(&registry, &spec.image, &|_| {}) => r,
            () = cancel.cancelled() => return,
        };
        match pulled {
            Ok(i) => {
                images.lock().await.insert(spec.image.clone(), i.clone());
                break i;
            }
            Err(e) => {
                tracing::warn!(replica = %id, image = %spec.image, error = %e, "image pull failed; retrying");
                set(status(
                    &id,
                    "Pending",
                    None,
                    0,
                    format!("image pull failed (retrying in {}s): {e}", delay.as_secs()),
                ));
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = cancel.cancelled() => return,
                }
                delay = (delay * 2).min(Duration::from_secs(60));
            }
        }
    };
    // Secrets: read with a token for this workload, retried until they
    // can be (a secret created after the workload, a coordinator away).
    let mut resolved = crate::secrets::Resolved::default();
    if !spec.secret_names().is_empty() {
        let Some(fetcher) = secrets.clone() else {
            set(status(
                &id,
                "Failed",
                None,
                0,
                "this agent cannot read secrets".into(),
            ));
            return;
        };
        let mut delay = Duration::from_secs(1);
        loop {
            match crate::secrets::resolve(&fetcher, &a.namespace, &a.workload, &spec).await {
                Ok(r) => {
                    resolved = r;
                    break;
                }
                Err(e) => {
                    tracing::warn!(replica = %id, error = %e, "cannot read its secrets; retrying");
                    set(status(
                        &id,
                        "Pending",
                        None,
                        0,
                        format!(
                            "waiting for secrets (retrying in {}s): {e}",
                            delay.as_secs()
                        ),
                    ));
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = cancel.cancelled() => return,
                    }
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
    let mut container = container_config(&a, &spec, &volume_base, &paths.secrets);
    for (k, v) in std::mem::take(&mut resolved.env) {
        container.env.insert(k, v);
    }
    // Who the process runs as (runAsUser, else the image's numeric user):
    // its secret files and emptyDir directories are made for it.
    let (uid, gid) = cloudless_runtime::process_ids(&container, &image.process);
    let secret_volumes: Vec<(PathBuf, cloudless_types::SecretVolume)> = spec
        .volumes
        .iter()
        .filter_map(|v| {
            v.secret.clone().map(|sv| {
                (
                    crate::secrets::volume_dir(&paths.secrets, &container.id, &v.name),
                    sv,
                )
            })
        })
        .collect();
    let unmount_all = |vols: &[(PathBuf, cloudless_types::SecretVolume)]| {
        for (d, _) in vols {
            crate::secrets::unmount(d);
        }
        let _ = std::fs::remove_dir(paths.secrets.join(container_id(&id)));
    };
    for (d, sv) in &secret_volumes {
        let written = crate::secrets::mount_tmpfs(d).and_then(|()| {
            let values = resolved
                .values
                .get(&sv.secret_name)
                .ok_or_else(|| format!("secret {} was not read", sv.secret_name))?;
            crate::secrets::write_files(d, sv, values, uid, gid)
        });
        if let Err(e) = written {
            set(status(
                &id,
                "Failed",
                None,
                0,
                format!("secret volume: {e}"),
            ));
            unmount_all(&secret_volumes);
            return;
        }
    }
    let refresher = (!secret_volumes.is_empty())
        .then(|| secrets.clone())
        .flatten()
        .map(|fetcher| {
            let vols = secret_volumes.clone();
            let versions = resolved.versions.clone();
            let (ns, workload, cancel) = (a.namespace.clone(), a.workload.clone(), cancel.clone());
            let rid = id.clone();
            tokio::spawn(refresh_secret_volumes(
                fetcher, vols, versions, ns, workload, uid, gid, rid, cancel,
            ))
        });
    let dir = volume_dir(&volume_base, &container.id);
    if let Err(e) = prepare_volumes(&container, &volume_base, uid, gid) {
        set(status(
            &id,
            "Failed",
            None,
            0,
            format!("cannot make its volumes in {}: {e}", dir.display()),
        ));
        return;
    }
    let replica = ReplicaSpec {
        container,
        image,
        restart: spec.restart_policy,
        liveness: spec.liveness_probe.as_ref().and_then(probe),
        readiness: spec.readiness_probe.as_ref().and_then(probe),
        stop_grace: Duration::from_secs(10),
    };
    let (mut rx, task) = supervisor.run(replica, Backoff::default(), cancel.clone());
    // Upstream listeners live in the current container process's network
    // namespace: made again when it restarts, dropped when it stops.
    let mut pid = None;
    let mut listeners: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    loop {
        let now = rx.borrow_and_update().clone();
        set(wire_status(&id, &now));
        if now.pid != pid {
            pid = now.pid;
            listeners.drain(..).for_each(|l| l.abort());
            if let Some(m) = &mesh {
                m.set_pid(&id, pid);
                if let Some(p) = pid {
                    listeners = m
                        .listen_upstreams(&id, &a.namespace, &spec.upstreams, p)
                        .await;
                }
            }
        }
        if rx.changed().await.is_err() {
            break;
        }
    }
    listeners.drain(..).for_each(|l| l.abort());
    if let Some(m) = &mesh {
        m.set_pid(&id, None);
    }
    let _ = task.await;
    if let Some(r) = refresher {
        r.abort();
    }
    unmount_all(&secret_volumes);
    // The container is gone: so is its scratch space.
    if dir.exists() {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(replica = %id, error = %e, "cannot remove its volumes");
        }
    }
}

/// Rewrites a replica's secret volumes when their secrets change.
#[allow(clippy::too_many_arguments)]
async fn refresh_secret_volumes(
    fetcher: Arc<crate::secrets::SecretFetcher>,
    vols: Vec<(PathBuf, cloudless_types::SecretVolume)>,
    mut versions: HashMap<String, u64>,
    namespace: String,
    workload: String,
    uid: u32,
    gid: u32,
    replica: String,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(fetcher.refresh) => {}
            () = cancel.cancelled() => return,
        }
        for (dir, sv) in &vols {
            match fetcher.get(&namespace, &sv.secret_name, &workload).await {
                Ok((values, version)) if versions.get(&sv.secret_name) != Some(&version) => {
                    match crate::secrets::write_files(dir, sv, &values, uid, gid) {
                        Ok(()) => {
                            tracing::info!(replica = %replica, secret = %sv.secret_name, version, "secret volume updated");
                            versions.insert(sv.secret_name.clone(), version);
                        }
                        Err(e) => {
                            tracing::warn!(replica = %replica, error = %e, "cannot update a secret volume")
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(replica = %replica, error = %e, "cannot refresh a secret")
                }
            }
        }
    }
}

/// A `Write` that hands each write to an async task (for `logs::follow`).
struct ChanWriter(tokio::sync::mpsc::UnboundedSender<Vec<u8>>);

impl std::io::Write for ChanWriter {
    /// Takes at most 64 KiB per call (`write_all` loops), so each tunnel
    /// message stays far below the coordinator's limit on agent messages.
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(64 * 1024);
        self.0
            .send(buf[..n].to_vec())
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "reader gone"))?;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Whether `id` can name a container log file (no path tricks).
fn safe_replica_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 256
        && !id.contains("..")
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Answers one logs request: the last lines, then (with follow) what is
/// appended until cancelled.
async fn serve_logs(
    rt: Containerd,
    id: u64,
    req: pb::LogsRequest,
    up: tokio::sync::mpsc::Sender<pb::TunnelUp>,
    cancel: CancellationToken,
) {
    let replica_id = req.replica_id.clone();
    let chunk = move |data: Vec<u8>| pb::TunnelUp {
        request_id: id,
        chunk: Some(pb::LogChunk {
            replica_id: replica_id.clone(),
            stream: "stdout".into(),
            data,
        }),
        end: false,
        error: String::new(),
        exec_output: None,
    };
    let end = move |error: String| pb::TunnelUp {
        request_id: id,
        chunk: None,
        end: true,
        error,
        exec_output: None,
    };
    if !safe_replica_id(&req.replica_id) {
        let _ = up.send(end("replica_id: not a replica id".into())).await;
        return;
    }
    let path = rt.log_path(&container_id(&req.replica_id));
    /// Bytes of log per tunnel message.
    const LOG_CHUNK: usize = 64 * 1024;
    let rotation = cloudless_runtime::logs::Rotation::default();
    let lines = if req.tail_lines == 0 {
        usize::MAX
    } else {
        req.tail_lines as usize
    };
    match cloudless_runtime::logs::tail(&path, lines, rotation) {
        Ok(tail) => {
            // Chunks of about 64 KiB: each tunnel message stays far below
            // the coordinator's 1 MiB limit on agent messages, however long
            // the lines.
            let mut data = Vec::new();
            for line in tail {
                for piece in line.as_bytes().chunks(LOG_CHUNK) {
                    data.extend_from_slice(piece);
                    if data.len() >= LOG_CHUNK
                        && up.send(chunk(std::mem::take(&mut data))).await.is_err()
                    {
                        return;
                    }
                }
                data.push(b'\n');
            }
            if !data.is_empty() && up.send(chunk(data)).await.is_err() {
                return;
            }
        }
        Err(e) => {
            let _ = up.send(end(format!("no logs on this node: {e}"))).await;
            return;
        }
    }
    if req.follow {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let forward = {
            let up = up.clone();
            let chunk = chunk.clone();
            tokio::spawn(async move {
                while let Some(data) = rx.recv().await {
                    if up.send(chunk(data)).await.is_err() {
                        return;
                    }
                }
            })
        };
        let mut sink = ChanWriter(tx);
        let r = cloudless_runtime::logs::follow(
            &path,
            &mut sink,
            Duration::from_millis(200),
            cancel.cancelled(),
        )
        .await;
        drop(sink);
        let _ = forward.await;
        let _ = up
            .send(end(r.err().map(|e| e.to_string()).unwrap_or_default()))
            .await;
    } else {
        let _ = up.send(end(String::new())).await;
    }
}

/// Longest exec the agent runs, and the default.
const MAX_EXEC: Duration = Duration::from_secs(3600);
const DEFAULT_EXEC: Duration = Duration::from_secs(60);

/// Runs one command in a replica's container and answers with its output,
/// in chunks as it comes, then its exit code.
async fn serve_exec(
    rt: Containerd,
    id: u64,
    req: pb::ExecRequest,
    up: tokio::sync::mpsc::Sender<pb::TunnelUp>,
    cancel: CancellationToken,
) {
    let answer = |output: Option<pb::ExecOutput>, error: String| pb::TunnelUp {
        request_id: id,
        chunk: None,
        end: true,
        error,
        exec_output: output,
    };
    if !safe_replica_id(&req.replica_id) {
        let _ = up
            .send(answer(None, "replica_id: not a replica id".into()))
            .await;
        return;
    }
    if req.command.is_empty() {
        let _ = up
            .send(answer(None, "command: must not be empty".into()))
            .await;
        return;
    }
    let timeout = match req.timeout_seconds {
        0 => DEFAULT_EXEC,
        s => Duration::from_secs(u64::from(s)).min(MAX_EXEC),
    };
    tracing::info!(replica = %req.replica_id, program = %req.command[0], "exec");
    let container = container_id(&req.replica_id);
    // Output goes up in chunks as it comes, held only in memory.
    let (out_tx, mut out_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
    let run = rt.exec_streaming(&container, &req.command, timeout, out_tx);
    tokio::pin!(run);
    let chunk = |stdout: Vec<u8>| pb::TunnelUp {
        request_id: id,
        chunk: None,
        end: false,
        error: String::new(),
        exec_output: Some(pb::ExecOutput {
            stdout,
            stderr: Vec::new(),
            exit_code: None,
        }),
    };
    let result = loop {
        tokio::select! {
            r = &mut run => break r,
            Some(out) = out_rx.recv() => {
                if up.send(chunk(out)).await.is_err() {
                    return;
                }
            }
            () = cancel.cancelled() => return,
        }
    };
    while let Ok(out) = out_rx.try_recv() {
        if up.send(chunk(out)).await.is_err() {
            return;
        }
    }
    let msg = match result {
        Ok(code) => answer(
            Some(pb::ExecOutput {
                stdout: Vec::new(),
                stderr: Vec::new(),
                exit_code: Some(i32::try_from(code).unwrap_or(i32::MAX)),
            }),
            String::new(),
        ),
        Err(e) => answer(None, e.to_string()),
    };
    let _ = up.send(msg).await;
}

/// Keeps a `Tunnel` stream open to one coordinator and answers what comes
/// down it, until `cancel`.
pub async fn tunnel(
    address: String,
    mut identity: watch::Receiver<NodeIdentity>,
    rt: Containerd,
    cancel: CancellationToken,
) {
    let mut coordinators =
        Coordinators::new(vec![address.clone()], identity.borrow_and_update().clone());
    loop {
        if identity.has_changed().unwrap_or(false) {
            coordinators.set_identity(identity.borrow_and_update().clone());
        }
        let opened = tokio::select! {
            r = coordinators.call("tunnel", |mut c| async move {
                let (tx, rx) = tokio::sync::mpsc::channel::<pb::TunnelUp>(64);
                let resp = c.tunnel(tokio_stream::wrappers::ReceiverStream::new(rx)).await?;
                Ok(resp.map(|down| (tx, down)))
            }) => r,
            () = cancel.cancelled() => return,
        };
        let (up, mut down) = match opened {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(coordinator = %address, error = %e, "no tunnel; retrying");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(2)) => continue,
                    () = cancel.cancelled() => return,
                }
            }
        };
        let mut requests: HashMap<u64, CancellationToken> = HashMap::new();
        loop {
            let msg = tokio::select! {
                m = down.message() => m,
                () = cancel.cancelled() => return,
            };
            match msg {
                Ok(Some(d)) if d.cancel => {
                    if let Some(c) = requests.remove(&d.request_id) {
                        c.cancel();
                    }
                }
                Ok(Some(d)) => {
                    let stop = cancel.child_token();
                    requests.retain(|_, c| !c.is_cancelled());
                    requests.insert(d.request_id, stop.clone());
                    if let Some(logs) = d.logs {
                        tokio::spawn(serve_logs(rt.clone(), d.request_id, logs, up.clone(), stop));
                    } else if let Some(exec) = d.exec {
                        tokio::spawn(serve_exec(rt.clone(), d.request_id, exec, up.clone(), stop));
                    }
                }
                Ok(None) | Err(_) => break,
            }
        }
        for (_, c) in requests.drain() {
            c.cancel();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Keeps the assignment stream open and the runner in step with it, and
/// reports replica states, until `cancel` or the node's removal.
pub async fn run(
    addresses: Vec<String>,
    mut identity: watch::Receiver<NodeIdentity>,
    mut runner: Runner,
    contact: Contact,
    cancel: CancellationToken,
) -> Result<(), AgentError> {
    runner.secrets = Some(Arc::new(crate::secrets::SecretFetcher::new(
        addresses.clone(),
        identity.clone(),
        runner.secret_refresh,
    )));
    for address in &addresses {
        tokio::spawn(tunnel(
            address.clone(),
            identity.clone(),
            runner.runtime(),
            cancel.child_token(),
        ));
    }
    let mut coordinators = Coordinators::new(addresses, identity.borrow_and_update().clone());
    let mut report = tokio::time::interval(REPORT_EVERY);
    report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if identity.has_changed().unwrap_or(false) {
            coordinators.set_identity(identity.borrow_and_update().clone());
        }
        let opened = tokio::select! {
            r = coordinators.call("watch assignments", |mut c| async move {
                c.watch_assignments(pb::WatchAssignmentsRequest { since_revision: 0 }).await
            }) => r,
            () = cancel.cancelled() => return Ok(()),
        };
        let mut stream = match opened {
            Ok(s) => s,
            Err(AgentError::Removed(m)) => {
                runner.stop_all().await;
                return Err(AgentError::Removed(m));
            }
            Err(e) => {
                tracing::warn!(error = %e, running = runner.len(), "no assignment stream; keeping what runs");
                runner.enforce_disconnect(contact.elapsed()).await;
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    () = cancel.cancelled() => return Ok(()),
                }
            }
        };
        loop {
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                msg = stream.message() => match msg {
                    Ok(Some(set)) => tokio::select! {
                        () = runner.apply(&set) => {}
                        () = cancel.cancelled() => return Ok(()),
                    },
                    Ok(None) => {
                        tracing::info!("assignment stream ended; reopening");
                        break;
                    }
                    Err(s) if crate::client::is_removal(&s) => {
                        runner.stop_all().await;
                        return Err(AgentError::Removed(s.message().to_owned()));
                    }
                    Err(s) => {
                        tracing::warn!(error = %s.message(), "assignment stream failed; reopening");
                        break;
                    }
                },
                _ = report.tick() => {
                    let without = contact.elapsed();
                    runner.enforce_disconnect(without).await;
                    if runner.has_parked() && without < RECONNECTED {
                        // Back in touch: a fresh full set restarts what is
                        // still assigned here.
                        tracing::info!("coordinators reachable again; resyncing assignments");
                        break;
                    }
                    let changed = runner.changed();
                    if changed.is_empty() {
                        continue;
                    }
                    let req = pb::ReportStatusRequest { replicas: changed.clone() };
                    match coordinators.call("status report", |mut c| {
                        let r = req.clone();
                        async move { c.report_status(r).await }
                    }).await {
                        Ok(_) => runner.reported(changed),
                        Err(AgentError::Removed(m)) => {
                            runner.stop_all().await;
                            return Err(AgentError::Removed(m));
                        }
                        Err(e) => tracing::warn!(error = %e, "status report failed; will resend"),
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assignment(id: &str, template: u64) -> pb::Assignment {
        pb::Assignment {
            replica_id: id.into(),
            generation: template,
            ..Default::default()
        }
    }

    fn ids(start: &[&pb::Assignment]) -> Vec<String> {
        start.iter().map(|a| a.replica_id.clone()).collect()
    }

    #[test]
    fn the_diff_starts_the_new_stops_the_gone_and_restarts_a_new_template() {
        let running: HashMap<&str, u64> = [("keep", 1), ("gone", 1), ("update", 1)].into();
        let set = [
            assignment("keep", 1),
            assignment("update", 2),
            assignment("new", 1),
            assignment("new", 1),
        ];
        let d = diff(&running, &set);
        assert_eq!(d.stop, ["gone", "update"]);
        assert_eq!(ids(&d.start), ["update", "new"], "a duplicate starts once");

        // The same set again once applied: nothing to do.
        let running: HashMap<&str, u64> = [("keep", 1), ("update", 2), ("new", 1)].into();
        assert_eq!(diff(&running, &set), Diff::default());

        // An empty set (every replica moved away): stop all, start none.
        let d = diff(&running, &[]);
        assert_eq!(d.stop, ["keep", "new", "update"]);
        assert!(d.start.is_empty());
    }

    #[test]
    fn container_ids_fit_containerd_and_keep_the_suffix() {
        assert_eq!(
            container_id("default.web-1-abcdef12"),
            "default.web-1-abcdef12"
        );
        let long = format!("{}.{}-3-abcdef12", "n".repeat(63), "w".repeat(63));
        let id = container_id(&long);
        assert_eq!(id.len(), MAX_CONTAINER_ID);
        assert!(id.ends_with("-abcdef12"), "{id}");
    }

    #[test]
    fn runtime_states_map_to_replica_states() {
        let mut s = cloudless_runtime::ReplicaStatus {
            phase: ReplicaPhase::Running,
            ready: true,
            restarts: 2,
            pid: Some(1),
            last_exit: None,
            message: String::new(),
        };
        assert_eq!(wire_status("r", &s).state, "Ready");
        s.ready = false;
        assert_eq!(wire_status("r", &s).state, "Running");
        s.phase = ReplicaPhase::Exited;
        s.last_exit = Some(cloudless_runtime::LastExit {
            code: 0,
            oom_killed: false,
            liveness_failed: false,
        });
        assert_eq!(wire_status("r", &s).state, "Succeeded");
        s.last_exit = Some(cloudless_runtime::LastExit {
            code: 137,
            oom_killed: true,
            liveness_failed: false,
        });
        let w = wire_status("r", &s);
        assert_eq!((w.state.as_str(), w.exit_code), ("Failed", Some(137)));
        assert!(w.message.contains("OOM"));
    }
}

#[cfg(test)]
#[path = "workloads_test.rs"]
mod hardening_tests;
