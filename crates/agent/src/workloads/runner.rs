//! Runs the replicas assigned to this node: applies each assignment set
//! (one replica task per replica), stops replicas that may not run this
//! long without a coordinator, and collects their states for the report.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use cloudless_proto::v1 as pb;
use cloudless_runtime::registry::{RegistryClient, RegistryConfig};
use cloudless_runtime::{Containerd, HostSecurity, NodePolicy, Supervisor};
use tokio_util::sync::CancellationToken;

use super::plan::{diff, Diff};
use super::replica::{replica_task, Paths, ReplicaCtx};
use super::runtime::AgentRuntime;
use super::spec::container_id;
use super::status::status;
use super::RuntimeConfig;
use crate::AgentError;

/// Contact this recent counts as reconnected.
const RECONNECTED: Duration = Duration::from_secs(3);
/// Most replica states one report carries: a coordinator refuses a longer
/// one (its `MAX_STATUS_ENTRIES`).
const MAX_REPORT: usize = 512;

struct Slot {
    template: u64,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    /// Stop it after this long without any coordinator.
    stop_after: Option<Duration>,
}

/// Runs the replicas assigned to this node, on containerd unless a test
/// gives it another runtime.
pub struct Runner<R = Containerd> {
    /// What each replica task gets.
    ctx: ReplicaCtx<R>,
    slots: HashMap<String, Slot>,
    reported: HashMap<String, pb::ReplicaStatus>,
    adopted: bool,
    stopping: tokio::task::JoinSet<()>,
    /// How often secrets in use are read again.
    pub(super) secret_refresh: Duration,
    max_disconnected: Option<Duration>,
    /// Replicas stopped because the agent lost every coordinator for
    /// longer than they may run alone; started again on reconnection if
    /// still assigned.
    parked: std::collections::HashSet<String>,
    /// The node's container network.
    net: super::network::NodeNet,
    /// Whether replica networks left from an earlier run were collected.
    collected: bool,
    /// This node (for the service proxy's locality).
    node_id: String,
    /// The service proxy, once the node's network is up.
    proxy: SharedProxy,
}

/// The node's service proxy, once it runs (read by the metrics).
pub(crate) type SharedProxy = Arc<std::sync::OnceLock<Arc<cloudless_network::proxy::ServiceProxy>>>;

impl<R> std::fmt::Debug for Runner<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("replicas", &self.slots.len())
            .finish()
    }
}

impl Runner<Containerd> {
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
        Ok(Runner::with_runtime(rt, policy, registry, config))
    }
}

impl<R: AgentRuntime> Runner<R> {
    /// A runner of replicas on `rt` under the node's `policy`, pulling
    /// through `registry`, with `config`'s volume and secret directories,
    /// secret refresh and disconnection limit.
    pub(crate) fn with_runtime(
        rt: R,
        policy: NodePolicy,
        registry: RegistryClient,
        config: &RuntimeConfig,
    ) -> Self {
        Self {
            ctx: ReplicaCtx {
                supervisor: Supervisor::new(rt.clone(), policy),
                rt,
                registry: Arc::new(registry),
                images: Arc::default(),
                statuses: Arc::default(),
                events: super::replica::Events::default(),
                paths: Paths {
                    volumes: config.volume_dir.clone(),
                    secrets: config.secret_dir.clone(),
                },
                secrets: None,
                mesh: None,
                network: None,
                default_egress: None,
                services: None,
                metrics: crate::metrics::AgentMetrics::default(),
            },
            slots: HashMap::new(),
            reported: HashMap::new(),
            adopted: false,
            stopping: tokio::task::JoinSet::new(),
            secret_refresh: config.secret_refresh,
            max_disconnected: config.max_disconnected,
            parked: std::collections::HashSet::new(),
            net: super::network::NodeNet::new(config.network.clone()),
            collected: false,
            proxy: SharedProxy::default(),
            node_id: String::new(),
        }
    }

    /// This node's id (the service proxy tells its own endpoints apart).
    pub fn set_node_id(&mut self, node_id: &str) {
        node_id.clone_into(&mut self.node_id);
    }

    /// Reads the secrets of replicas started from now on through `source`.
    pub(crate) fn set_secrets(&mut self, source: Option<Arc<dyn crate::secrets::SecretSource>>) {
        self.ctx.secrets = source;
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
            if let Ok(mut s) = self.ctx.statuses.lock() {
                s.insert(
                    id.clone(),
                    status(
                        &id,
                        cloudless_types::ReplicaState::Pending,
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

    /// Whether to ask for a fresh assignment set now, `without_contact`
    /// since a coordinator last answered: replicas were stopped for lack of
    /// a coordinator and one answers again (the fresh set starts again
    /// what is still assigned here).
    pub fn should_resync(&self, without_contact: Duration) -> bool {
        self.has_parked() && without_contact < RECONNECTED
    }

    /// Uses `mesh` for the upstreams of replicas started from now on.
    pub fn set_mesh(&mut self, mesh: Option<Arc<crate::mesh::Mesh>>) {
        self.ctx.mesh = mesh;
    }

    /// Counts containers started and exited and images pulled in `m`.
    pub(crate) fn set_metrics(&mut self, m: crate::metrics::AgentMetrics) {
        self.ctx.metrics = m;
    }

    /// Each replica's last status, as it changes.
    pub(crate) fn statuses(&self) -> super::SharedStatuses {
        self.ctx.statuses.clone()
    }

    /// Probe results of every replica this runner runs.
    pub(crate) fn probe_counts(&self) -> Arc<cloudless_runtime::ProbeCounts> {
        self.ctx.supervisor.probe_counts()
    }

    /// The node's service proxy, once the node's network is up.
    pub(crate) fn proxy(&self) -> SharedProxy {
        self.proxy.clone()
    }

    /// A container's CPU seconds and memory bytes, read from its cgroup.
    pub(crate) fn usage_fn(&self) -> crate::metrics::UsageFn
    where
        R: 'static,
    {
        let rt = self.ctx.rt.clone();
        Arc::new(move |id: &str| rt.usage(id))
    }

    /// Makes the running replicas match `set`.
    pub async fn apply(&mut self, set: &pb::AssignmentSet) {
        if let Some(m) = &self.ctx.mesh {
            m.update(set);
        }
        self.ctx.network = self.net.open(set.network.as_ref()).await;
        self.ctx.default_egress = self.net.default_egress.clone().map(Arc::new);
        if let (None, Some(net)) = (&self.ctx.services, &self.ctx.network) {
            let here = cloudless_network::balancer::Here {
                node_id: self.node_id.clone(),
                ..Default::default()
            };
            let plane =
                crate::services::ServicePlane::start(net, here, self.ctx.mesh.clone()).await;
            let _ = self.proxy.set(plane.proxy());
            self.ctx.services = Some(Arc::new(plane));
        }
        if let Some(plane) = &self.ctx.services {
            plane.update(set).await;
        }
        if let (false, Some(net)) = (self.collected, &self.ctx.network) {
            // Networks of replicas no longer assigned here (stopped while
            // the agent was down) go; the others are kept for adoption.
            let desired = set
                .assignments
                .iter()
                .map(|a| container_id(&a.replica_id))
                .collect();
            match net.collect(&desired).await {
                Ok(gone) if !gone.is_empty() => {
                    tracing::info!(
                        count = gone.len(),
                        "removed networks of replicas no longer assigned here"
                    );
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cannot list replica networks"),
            }
            self.collected = true;
        }
        if !self.adopted {
            // First set after a start: containers we ran before are adopted
            // by their supervisors; those no longer assigned are removed.
            let desired: Vec<String> = set
                .assignments
                .iter()
                .map(|a| container_id(&a.replica_id))
                .collect();
            match self.ctx.supervisor.adopt(&desired).await {
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
        let Diff { stop, start } = diff(&running, &self.parked, &set.assignments);
        self.parked.clear();
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
            if let Ok(mut s) = self.ctx.statuses.lock() {
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
                self.ctx.clone(),
                a.clone(),
                spec,
                cancel.clone(),
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
        let Ok(now) = self.ctx.statuses.lock() else {
            return Vec::new();
        };
        now.iter()
            .filter(|(id, s)| self.reported.get(*id) != Some(s))
            .map(|(_, s)| s.clone())
            .take(MAX_REPORT)
            .collect()
    }

    /// Events of replicas not reported yet (at most one report's worth,
    /// taken off the queue: give them back with [`Self::unreported`] when
    /// the report fails).
    pub fn events(&self) -> Vec<pb::ReplicaEvent> {
        self.ctx.events.take()
    }

    /// Gives back the events of a report that failed.
    pub fn unreported(&self, events: Vec<pb::ReplicaEvent>) {
        self.ctx.events.put_back(events);
    }

    /// Records a successful report.
    pub fn reported(&mut self, sent: Vec<pb::ReplicaStatus>) {
        for s in sent {
            self.reported.insert(s.replica_id.clone(), s);
        }
    }

    /// The container runtime (for log and exec requests).
    pub fn runtime(&self) -> R {
        self.ctx.rt.clone()
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

#[cfg(test)]
#[path = "runner_test.rs"]
mod tests;
