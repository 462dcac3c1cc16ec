//! Workloads: the desired state a user submits.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::container::{
    ContainerPort, Disconnect, SecretEnv, SecurityContextSpec, Upstream, Volume, VolumeMount,
};
use crate::validation::{check_dns_label, check_labels, ValidationErrors};
use crate::{EgressPolicy, Protocol, ServiceSpec};

/// Namespace used when none is given.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Resource amounts: CPU in millicores, sizes in bytes, bandwidth in bits/s.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Resources {
    /// CPU in millicores.
    #[serde(default)]
    pub cpu_millis: u64,
    /// Memory in bytes.
    #[serde(default)]
    pub memory_bytes: u64,
    /// Local storage in bytes.
    #[serde(default)]
    pub storage_bytes: u64,
    /// Network bandwidth in bits per second.
    #[serde(default)]
    pub bandwidth_bps: u64,
    /// Most processes and threads (`limits` only; 0: the agent's default,
    /// 4096).
    #[serde(default)]
    pub pids: u64,
}

/// The most `limits.pids` may be (Linux's `PID_MAX_LIMIT`).
pub const MAX_PIDS_LIMIT: u64 = 4_194_304;
/// The least `limits.pids` may be: room for runc's own threads while it
/// starts the container, and a shell.
pub const MIN_PIDS_LIMIT: u64 = 16;

/// What a workload runs and how much of it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadSpec {
    /// OCI image reference.
    pub image: String,
    /// Entrypoint override.
    #[serde(default)]
    pub command: Vec<String>,
    /// Arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Desired replica count.
    #[serde(default = "one")]
    pub replicas: u32,
    /// Resources reserved for each replica.
    #[serde(default)]
    pub requests: Resources,
    /// Hard limits for each replica.
    #[serde(default)]
    pub limits: Resources,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Scheduling priority.
    #[serde(default)]
    pub priority: i32,
    /// Where replicas may go.
    #[serde(default)]
    pub placement: Placement,
    /// When an exited container is started again on its node.
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    /// How a new template replaces the old one.
    #[serde(default)]
    pub rollout: Rollout,
    /// Decides when a replica is Ready (gates rollouts).
    #[serde(default)]
    pub readiness_probe: Option<ProbeSpec>,
    /// Restarts a container that fails it.
    #[serde(default)]
    pub liveness_probe: Option<ProbeSpec>,
    /// Ports the container listens on.
    #[serde(default)]
    pub ports: Vec<ContainerPort>,
    /// User, capabilities, seccomp, AppArmor, SELinux, read-only root.
    #[serde(default)]
    pub security_context: SecurityContextSpec,
    /// Volumes the replica's containers may mount.
    #[serde(default)]
    pub volumes: Vec<Volume>,
    /// Where volumes appear in the container.
    #[serde(default)]
    pub volume_mounts: Vec<VolumeMount>,
    /// What happens when the replica's node stops answering.
    #[serde(default)]
    pub disconnect: Disconnect,
    /// Environment variables from secrets (read by the agent with an
    /// access token for this workload's audience).
    #[serde(default)]
    pub secret_env: Vec<SecretEnv>,
    /// Other workloads' ports reachable at 127.0.0.1 inside the containers.
    #[serde(default)]
    pub upstreams: Vec<Upstream>,
    /// Where the replicas may connect outside the cluster (`None`: the
    /// cluster's `network.default_egress`). Added last: log entries of
    /// earlier formats decode without it (see `cloudless-state`).
    #[serde(default)]
    pub egress: Option<EgressPolicy>,
    /// How its ports are reached under its virtual IP and DNS name: load
    /// balancing, who may connect. Added last, like `egress`.
    #[serde(default)]
    pub service: ServiceSpec,
}

fn one() -> u32 {
    1
}

/// Placement constraints.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Placement {
    /// Allowed zones (node label `zone`); empty allows all.
    #[serde(default)]
    pub zones: Vec<String>,
    /// Allowed regions (node label `region`); empty allows all.
    #[serde(default)]
    pub regions: Vec<String>,
    /// Labels a node must carry.
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    /// At most one replica per `Node` or per `Zone`.
    #[serde(default)]
    pub anti_affinity: AntiAffinity,
    /// `Auto` (binpack one replica, spread several), `Spread` or `Binpack`.
    #[serde(default)]
    pub strategy: PlacementStrategy,
}

/// Replica anti-affinity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum AntiAffinity {
    /// None.
    #[default]
    None,
    /// One replica per node.
    Node,
    /// One replica per zone.
    Zone,
}

/// Placement strategy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PlacementStrategy {
    /// Binpack one replica, spread several across zones.
    #[default]
    Auto,
    /// Spread across zones, emptier nodes first.
    Spread,
    /// Fullest nodes first.
    Binpack,
}

/// Kubernetes restart policies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum RestartPolicy {
    /// Always start it again.
    #[default]
    Always,
    /// After a non-zero exit.
    OnFailure,
    /// Never.
    Never,
}

/// How a new template replaces the old one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum RolloutStrategy {
    /// A few at a time within `maxSurge` / `maxUnavailable`, gated on Ready.
    #[default]
    RollingUpdate,
    /// Every old replica goes first, then the new ones are placed.
    Recreate,
    /// A full set of new replicas next to the old; the old go once every
    /// new one is Ready.
    BlueGreen,
}

/// Rollout settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Rollout {
    /// RollingUpdate (default), Recreate or BlueGreen.
    #[serde(default, rename = "type")]
    pub strategy: RolloutStrategy,
    /// Replicas allowed above the desired count during an update.
    #[serde(default = "one")]
    pub max_surge: u32,
    /// Ready replicas allowed below the desired count during an update.
    #[serde(default)]
    pub max_unavailable: u32,
    /// A new replica not Ready this long after placement rolls the update
    /// back to the previous template (default 120).
    #[serde(default = "default_deadline")]
    pub progress_deadline_seconds: u32,
    /// Ready replicas a rollout (and a reconnection) never goes below
    /// (default: replicas - maxUnavailable; RollingUpdate and BlueGreen).
    #[serde(default)]
    pub min_available: Option<u32>,
}

fn default_deadline() -> u32 {
    120
}

impl Default for Rollout {
    fn default() -> Self {
        Self {
            strategy: RolloutStrategy::RollingUpdate,
            max_surge: 1,
            max_unavailable: 0,
            progress_deadline_seconds: default_deadline(),
            min_available: None,
        }
    }
}

/// A health probe: exactly one of `exec`, `httpGet`, `tcpSocket`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProbeSpec {
    /// Command run in the container; exit 0 passes.
    #[serde(default)]
    pub exec: Option<Vec<String>>,
    /// HTTP GET on the container's loopback; 2xx/3xx passes.
    #[serde(default)]
    pub http_get: Option<HttpGet>,
    /// TCP connect to the container's loopback.
    #[serde(default)]
    pub tcp_socket: Option<TcpSocket>,
    /// Seconds before the first check.
    #[serde(default)]
    pub initial_delay_seconds: u32,
    /// Seconds between checks (default 10).
    #[serde(default = "ten")]
    pub period_seconds: u32,
    /// Seconds one check may take (default 1).
    #[serde(default = "one")]
    pub timeout_seconds: u32,
    /// Consecutive failures to fail (default 3).
    #[serde(default = "three")]
    pub failure_threshold: u32,
    /// Consecutive successes to pass again (default 1).
    #[serde(default = "one")]
    pub success_threshold: u32,
}

fn ten() -> u32 {
    10
}

fn three() -> u32 {
    3
}

/// An HTTP GET probe.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpGet {
    /// Path (default `/`).
    #[serde(default = "slash")]
    pub path: String,
    /// Port.
    pub port: u16,
}

fn slash() -> String {
    "/".into()
}

/// A TCP probe.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TcpSocket {
    /// Port.
    pub port: u16,
}

impl ProbeSpec {
    fn validate_into(&self, path: &str, errs: &mut ValidationErrors) {
        let actions = usize::from(self.exec.is_some())
            + usize::from(self.http_get.is_some())
            + usize::from(self.tcp_socket.is_some());
        if actions != 1 {
            errs.push(
                path.to_owned(),
                "needs exactly one of exec, httpGet, tcpSocket",
            );
        }
        if self.exec.as_ref().is_some_and(Vec::is_empty) {
            errs.push(format!("{path}.exec"), "must name a command");
        }
        let port = self
            .http_get
            .as_ref()
            .map(|h| ("httpGet.port", h.port))
            .or(self.tcp_socket.as_ref().map(|t| ("tcpSocket.port", t.port)));
        if let Some((field, 0)) = port {
            errs.push(format!("{path}.{field}"), "must be 1-65535");
        }
        for (field, v, min) in [
            ("periodSeconds", self.period_seconds, 1),
            ("timeoutSeconds", self.timeout_seconds, 1),
            ("failureThreshold", self.failure_threshold, 1),
            ("successThreshold", self.success_threshold, 1),
        ] {
            if v < min || v > 3600 {
                errs.push(
                    format!("{path}.{field}"),
                    format!("{v} is outside 1..=3600"),
                );
            }
        }
    }
}

/// A workload as stored in the cluster state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    /// Namespace (DNS label).
    pub namespace: String,
    /// Name (DNS label), unique in its namespace.
    pub name: String,
    /// The desired state.
    pub spec: WorkloadSpec,
    /// Increments on every change of the spec; 1 when created.
    pub generation: u64,
    /// Creation time, milliseconds since the Unix epoch (stamped by the proposer).
    pub created_at_ms: i64,
    /// Last update time, milliseconds since the Unix epoch.
    pub updated_at_ms: i64,
    /// Increments when the spec changes in anything but the replica count:
    /// replicas of an older template are replaced by a rollout.
    #[serde(default)]
    pub template: u64,
    /// The templates it ran, oldest first (the last is the current one),
    /// at most [`REVISION_HISTORY`]; kept by the state machine.
    #[serde(default)]
    pub revisions: Vec<Revision>,
    /// Its service's virtual IP, from the cluster's `network.service_cidr`
    /// (`None`: it has no ports, or it was stored before services existed
    /// and the leader has not given it one yet). Allocated and kept by the
    /// state machine: whatever a proposer puts here is ignored.
    #[serde(default)]
    pub vip: Option<String>,
}

/// How many revisions a workload keeps.
pub const REVISION_HISTORY: usize = 10;

/// One template a workload ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revision {
    /// The template number.
    pub template: u64,
    /// The spec (its replica count is the one it was applied with).
    pub spec: WorkloadSpec,
    /// When it became current, ms since the epoch.
    pub at_ms: i64,
    /// Why: `apply`, `rollback` (missed progress deadline) or `undo to N`.
    pub cause: String,
}

/// What a replica is doing, as its agent last reported (or the coordinator decided).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicaState {
    /// Assigned; the agent has not reported it running yet (pulling, starting).
    #[default]
    Pending,
    /// Its container runs but is not (yet) ready.
    Running,
    /// Running and passing its readiness probe (or it has none).
    Ready,
    /// It exited and its restart policy will not restart it, or it cannot start.
    Failed,
    /// It exited successfully and will not be restarted.
    Succeeded,
}

impl ReplicaState {
    /// Its name as shown and sent in the deprecated string fields.
    pub fn as_str(self) -> &'static str {
        crate::ClosedSet::name(self)
    }

    /// Parses a name.
    pub fn parse(s: &str) -> Option<Self> {
        crate::ClosedSet::from_name(s)
    }
}

/// One replica of a workload, placed on a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    /// Unique id: `<namespace>.<workload>-<template>-<suffix>`.
    pub id: String,
    /// Workload namespace.
    pub namespace: String,
    /// Workload name.
    pub workload: String,
    /// The workload's template generation this replica runs.
    pub template: u64,
    /// The spec it runs (a copy, so that a rollout can run two at once).
    pub spec: WorkloadSpec,
    /// The node it is assigned to.
    pub node_id: String,
    /// State as last reported.
    pub state: ReplicaState,
    /// Last exit code, if it exited.
    pub exit_code: Option<i32>,
    /// Restarts the agent made.
    pub restarts: u32,
    /// A human-readable detail (last error, OOM kill, probe failure).
    pub message: String,
    /// Placement time, ms since the epoch.
    pub created_at_ms: i64,
    /// Last state change, ms since the epoch.
    pub updated_at_ms: i64,
    /// When it first became Ready, ms since the epoch (0: never).
    #[serde(default)]
    pub ready_at_ms: i64,
    /// Since when its node has been Down with the replica kept as Unknown
    /// (its `disconnect.lostAfterSeconds`), ms since the epoch; 0: not.
    #[serde(default)]
    pub disconnected_at_ms: i64,
    /// The scheduler's score (0-100) for its node when it was placed
    /// (`disconnect.reconcile: BestScore` keeps the highest).
    #[serde(default)]
    pub score: f64,
    /// Its IP address on its node's bridge, as the agent reported it
    /// (empty: not reported yet).
    #[serde(default)]
    pub address: String,
    /// The W3C trace context (`traceparent`) of the coordinator span that
    /// placed it, so the agent's spans of its start join that trace (empty:
    /// the leader was not exporting traces).
    #[serde(default)]
    pub trace: String,
}

impl ReplicaRecord {
    /// The key of its workload, `namespace/name`.
    pub fn workload_key(&self) -> String {
        format!("{}/{}", self.namespace, self.workload)
    }
}

/// Something that happened to a workload, replica or node, for `events`
/// and `describe`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    /// When, ms since the epoch (stamped by the proposer).
    pub at_ms: i64,
    /// `Workload` or `Node`.
    pub kind: String,
    /// Namespace of the workload (empty for nodes).
    pub namespace: String,
    /// Workload name or node name.
    pub object: String,
    /// A short CamelCase reason: Scheduled, Lost, Rescheduled, ScaledDown,
    /// Replaced, Deleted, RolledBack, FailedScheduling, NodeDown, NodeReady...
    pub reason: String,
    /// Details for people.
    pub message: String,
}

/// Largest replica count one workload may ask for.
pub const MAX_REPLICAS: u32 = 10_000;

impl WorkloadSpec {
    /// Whether `other` runs the same containers (differs at most in the replica count).
    pub fn same_template(&self, other: &WorkloadSpec) -> bool {
        let mut a = self.clone();
        a.replicas = other.replicas;
        &a == other
    }

    /// The node ports each replica takes: every published `hostPort`, and
    /// with `securityContext.hostNetwork` every `containerPort` (the
    /// container listens on the node's ports). Sorted, each once.
    pub fn host_ports(&self) -> Vec<(u16, Protocol)> {
        let mut ports: Vec<(u16, Protocol)> = self
            .ports
            .iter()
            .filter_map(|p| {
                if self.security_context.host_network {
                    Some((p.container_port, p.protocol))
                } else {
                    (p.host_port != 0).then_some((p.host_port, p.protocol))
                }
            })
            .filter(|(port, _)| *port != 0)
            .collect();
        ports.sort_by_key(|(port, protocol)| (*port, *protocol == Protocol::UDP));
        ports.dedup();
        ports
    }

    /// `(ingressPort, containerPort)` of every port routed from ingress, in
    /// the order declared.
    pub fn ingress_ports(&self) -> Vec<(u16, u16)> {
        self.ports
            .iter()
            .filter(|p| p.ingress_port != 0)
            .map(|p| (p.ingress_port, p.container_port))
            .collect()
    }

    /// The secrets it reads (env and volumes), each once.
    pub fn secret_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .secret_env
            .iter()
            .map(|e| e.secret_key_ref.name.clone())
            .chain(
                self.volumes
                    .iter()
                    .filter_map(|v| v.secret.as_ref().map(|s| s.secret_name.clone())),
            )
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Reports every invalid field, with paths under `prefix` (e.g. `spec`).
    pub fn validate_into(&self, prefix: &str, errs: &mut ValidationErrors) {
        let image = self.image.trim();
        if image.is_empty() {
            errs.push(format!("{prefix}.image"), "must not be empty");
        } else if image.len() > 512 || image.chars().any(char::is_whitespace) {
            errs.push(
                format!("{prefix}.image"),
                "must be an image reference without whitespace, at most 512 characters",
            );
        }
        if self.replicas > MAX_REPLICAS {
            errs.push(
                format!("{prefix}.replicas"),
                format!("{} is above the maximum of {MAX_REPLICAS}", self.replicas),
            );
        }
        for k in self.env.keys() {
            let ok = !k.is_empty()
                && !k.starts_with(|c: char| c.is_ascii_digit())
                && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !ok {
                errs.push(
                    format!("{prefix}.env.{k}"),
                    "environment variable names are letters, digits and '_', not starting with a digit",
                );
            }
        }
        for (field, lim, req) in [
            (
                "cpuMillis",
                self.limits.cpu_millis,
                self.requests.cpu_millis,
            ),
            (
                "memoryBytes",
                self.limits.memory_bytes,
                self.requests.memory_bytes,
            ),
        ] {
            if lim != 0 && lim < req {
                errs.push(
                    format!("{prefix}.limits.{field}"),
                    format!("{lim} is below the request of {req}"),
                );
            }
        }
        if self.limits.pids != 0 && !(MIN_PIDS_LIMIT..=MAX_PIDS_LIMIT).contains(&self.limits.pids) {
            errs.push(
                format!("{prefix}.limits.pids"),
                format!(
                    "{} is outside {MIN_PIDS_LIMIT}..={MAX_PIDS_LIMIT} (0 or unset: the node's default of 4096)",
                    self.limits.pids
                ),
            );
        }
        if self.requests.pids != 0 {
            errs.push(
                format!("{prefix}.requests.pids"),
                "pids is a limit only (set limits.pids)",
            );
        }
        check_labels(errs, &format!("{prefix}.labels"), &self.labels);
        check_labels(
            errs,
            &format!("{prefix}.placement.nodeSelector"),
            &self.placement.node_selector,
        );
        if self.rollout.strategy == RolloutStrategy::RollingUpdate
            && self.rollout.max_surge == 0
            && self.rollout.max_unavailable == 0
        {
            errs.push(
                format!("{prefix}.rollout"),
                "maxSurge and maxUnavailable cannot both be 0 (no rollout could progress)",
            );
        }
        match (self.rollout.strategy, self.rollout.min_available) {
            (RolloutStrategy::Recreate, Some(m)) if m > 0 => errs.push(
                format!("{prefix}.rollout.minAvailable"),
                "Recreate removes every old replica first, so it cannot keep any available; use RollingUpdate or BlueGreen",
            ),
            (RolloutStrategy::RollingUpdate, Some(m))
                if self.rollout.max_surge == 0 && m >= self.replicas && self.replicas > 0 =>
            {
                errs.push(
                    format!("{prefix}.rollout.minAvailable"),
                    format!(
                        "{m} with maxSurge 0 and {} replicas leaves the rollout no room to progress",
                        self.replicas
                    ),
                )
            }
            _ => {}
        }
        if let Some(p) = &self.readiness_probe {
            p.validate_into(&format!("{prefix}.readinessProbe"), errs);
        }
        if let Some(p) = &self.liveness_probe {
            p.validate_into(&format!("{prefix}.livenessProbe"), errs);
        }
        crate::container::validate_secret_env(prefix, &self.secret_env, &self.env, errs);
        crate::container::validate_upstreams(prefix, &self.upstreams, &self.ports, errs);
        if let Some(egress) = &self.egress {
            egress.validate_into(&format!("{prefix}.egress"), errs);
        }
        self.service
            .validate_into(&format!("{prefix}.service"), !self.ports.is_empty(), errs);
        crate::container::validate(
            prefix,
            &self.ports,
            &self.security_context,
            &self.volumes,
            &self.volume_mounts,
            &self.disconnect,
            errs,
        );
    }
}

impl Workload {
    /// Reports every invalid field at once.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errs = ValidationErrors::default();
        check_dns_label(&mut errs, "metadata.namespace", &self.namespace);
        check_dns_label(&mut errs, "metadata.name", &self.name);
        self.spec.validate_into("spec", &mut errs);
        errs.into_result()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Manifest {
    api_version: String,
    kind: String,
    metadata: Metadata,
    spec: WorkloadSpec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Metadata {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
}

/// Parses and validates a workload manifest in YAML or JSON
/// (`apiVersion: cloudless.dev/v1`, `kind: Workload`). Unknown fields are rejected.
/// The returned workload has generation 0 and no timestamps: the coordinator stamps them.
pub fn parse_manifest(text: &str) -> Result<Workload, ValidationErrors> {
    let m: Manifest = serde_yaml_ng::from_str(text).map_err(|e| {
        let mut errs = ValidationErrors::default();
        // serde_yaml_ng's message already names the field path, line and column.
        errs.push("manifest", e.to_string());
        errs
    })?;
    let mut errs = ValidationErrors::default();
    if m.api_version != "cloudless.dev/v1" {
        errs.push(
            "apiVersion",
            format!(
                "{:?} is not supported, use \"cloudless.dev/v1\"",
                m.api_version
            ),
        );
    }
    if m.kind != "Workload" {
        errs.push(
            "kind",
            format!("{:?} is not supported, use \"Workload\"", m.kind),
        );
    }
    let w = Workload {
        namespace: m
            .metadata
            .namespace
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned()),
        name: m.metadata.name,
        spec: m.spec,
        generation: 0,
        created_at_ms: 0,
        updated_at_ms: 0,
        template: 0,
        revisions: Vec::new(),
        vip: None,
    };
    if let Err(e) = w.validate() {
        errs.0.extend(e.0);
    }
    errs.into_result().map(|()| w)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "apiVersion: cloudless.dev/v1\nkind: Workload\nmetadata:\n  name: web\nspec:\n  image: busybox:latest\n  replicas: 3\n  env:\n    GREETING: hi\n  requests:\n    cpuMillis: 100\n";

    #[test]
    fn parses_a_valid_manifest() {
        let w = parse_manifest(GOOD).expect("valid manifest");
        assert_eq!(w.name, "web");
        assert_eq!(w.namespace, DEFAULT_NAMESPACE);
        assert_eq!(w.spec.replicas, 3);
        assert_eq!(w.spec.requests.cpu_millis, 100);
        assert_eq!(w.spec.env.get("GREETING").map(String::as_str), Some("hi"));
    }

    #[test]
    fn rejects_unknown_fields_with_location() {
        let text = GOOD.replace("replicas: 3", "replicas: 3\n  replica: 4");
        let err = parse_manifest(&text).expect_err("unknown field accepted");
        let msg = err.to_string();
        assert!(msg.contains("unknown field `replica`"), "{msg}");
        assert!(msg.contains("spec: unknown field"), "{msg}");
        assert!(msg.contains("line 8"), "{msg}");
    }

    #[test]
    fn names_every_bad_field() {
        let text = GOOD
            .replace("name: web", "name: Web_1")
            .replace("image: busybox:latest", "image: \"\"")
            .replace("GREETING", "1BAD")
            .replace("kind: Workload", "kind: Pod");
        let err = parse_manifest(&text).expect_err("bad manifest accepted");
        let fields: Vec<_> = err.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            ["kind", "metadata.name", "spec.image", "spec.env.1BAD"],
            "{err}"
        );
    }

    #[test]
    fn rollout_and_probe_fields_parse_and_are_checked() {
        let text = GOOD.replace(
            "replicas: 3",
            "replicas: 3\n  rollout:\n    type: BlueGreen\n  readinessProbe:\n    httpGet:\n      port: 8080\n  restartPolicy: OnFailure",
        );
        let w = parse_manifest(&text).expect("valid");
        assert_eq!(w.spec.rollout.strategy, RolloutStrategy::BlueGreen);
        assert_eq!(w.spec.restart_policy, RestartPolicy::OnFailure);
        let probe = w.spec.readiness_probe.expect("probe");
        assert_eq!((probe.period_seconds, probe.failure_threshold), (10, 3));
        assert_eq!(probe.http_get.map(|h| h.path), Some("/".to_owned()));

        let err = parse_manifest(&text.replace("BlueGreen", "Canary")).expect_err("Canary");
        assert!(
            err.to_string().contains("unknown variant `Canary`"),
            "{err}"
        );
        let two_actions = text.replace(
            "      port: 8080",
            "      port: 8080\n    tcpSocket:\n      port: 1",
        );
        let err = parse_manifest(&two_actions).expect_err("two actions");
        assert_eq!(err.0[0].field, "spec.readinessProbe", "{err}");
    }

    #[test]
    fn container_fields_parse_and_every_bad_one_is_named() {
        let text = GOOD.replace(
            "replicas: 3",
            "replicas: 3
  ports:
    - name: http
      containerPort: 8080
  securityContext:
    runAsUser: 1000
    runAsNonRoot: true
    readOnlyRootFilesystem: true
    capabilities:
      add: [NET_BIND_SERVICE, CHOWN]
      drop: [chown]
    seccompProfile:
      type: Localhost
      localhostProfile: web.json
  volumes:
    - name: scratch
      emptyDir: {medium: Memory, sizeLimitBytes: 1048576}
    - name: logs
      hostPath: {path: /var/log/web}
  volumeMounts:
    - {name: scratch, mountPath: /scratch}
    - {name: logs, mountPath: /logs, readOnly: true}
  rollout:
    minAvailable: 2
  disconnect:
    lostAfterSeconds: 300
    stopOnClientAfterSeconds: 600
    reconcile: KeepOriginal",
        );
        let w = parse_manifest(&text).expect("valid");
        let s = &w.spec;
        assert_eq!(s.ports[0].container_port, 8080);
        assert_eq!(
            s.security_context.capabilities.effective(),
            ["NET_BIND_SERVICE"]
        );
        assert_eq!(
            s.volumes[0].empty_dir.map(|e| e.medium),
            Some(crate::StorageMedium::Memory)
        );
        assert!(s.volume_mounts[1].read_only);
        assert_eq!(s.rollout.min_available, Some(2));
        assert_eq!(s.disconnect.lost_after_seconds, 300);
        assert!(s.disconnect.replace, "replace defaults to true");
        assert_eq!(s.disconnect.reconcile, crate::ReconnectPolicy::KeepOriginal);

        let bad = text
            .replace("containerPort: 8080", "containerPort: 0")
            .replace(
                "localhostProfile: web.json",
                "localhostProfile: ../web.json",
            )
            .replace("path: /var/log/web", "path: var/log")
            .replace(
                "name: scratch, mountPath: /scratch",
                "name: scrach, mountPath: /scratch",
            )
            .replace("mountPath: /logs", "mountPath: /scratch")
            .replace("add: [NET_BIND_SERVICE, CHOWN]", "add: [NET-ADMIN]")
            .replace("lostAfterSeconds: 300", "lostAfterSeconds: 0")
            .replace(
                "stopOnClientAfterSeconds: 600",
                "stopOnClientAfterSeconds: 0",
            );
        let err = parse_manifest(&bad).expect_err("bad container fields accepted");
        let fields: Vec<_> = err.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.ports[0].containerPort",
                "spec.securityContext.capabilities.add[0]",
                "spec.securityContext.seccompProfile.localhostProfile",
                "spec.volumes[1].hostPath.path",
                "spec.volumeMounts[0].name",
                "spec.volumeMounts[1].mountPath",
                "spec.disconnect.stopOnClientAfterSeconds",
                "spec.disconnect.reconcile",
            ],
            "{err}"
        );
        let two_sources = text.replace(
            "emptyDir: {medium: Memory, sizeLimitBytes: 1048576}",
            "emptyDir: {}\n      hostPath: {path: /tmp}",
        );
        let err = parse_manifest(&two_sources).expect_err("two sources");
        assert_eq!(err.0[0].field, "spec.volumes[0]", "{err}");
        let unknown = text.replace("runAsUser: 1000", "runAsUser: 1000\n    privileged: true");
        let err = parse_manifest(&unknown).expect_err("privileged is not a field");
        assert!(
            err.to_string().contains("unknown field `privileged`"),
            "{err}"
        );
    }

    #[test]
    fn upstreams_are_checked_field_by_field() {
        let base = "apiVersion: cloudless.dev/v1\nkind: Workload\nmetadata:\n  name: web\nspec:\n  image: busybox:1\n  ports:\n    - {containerPort: 8080}\n  upstreams:\n";
        let ok = format!("{base}    - {{workload: api, port: 80, localPort: 9000}}\n    - {{workload: db, port: 5432, localPort: 5432}}\n");
        let w = parse_manifest(&ok).expect("valid upstreams");
        assert_eq!(w.spec.upstreams.len(), 2);
        assert_eq!(w.spec.upstreams[1].local_port, 5432);
        let bad = format!(
            "{base}    - {{workload: Api_, port: 0, localPort: 9000}}\n    - {{workload: db, port: 5432, localPort: 9000}}\n    - {{workload: db, port: 1, localPort: 8080}}\n"
        );
        let err = parse_manifest(&bad).expect_err("bad upstreams accepted");
        let fields: Vec<_> = err.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.upstreams[0].workload",
                "spec.upstreams[0].port",
                "spec.upstreams[1].localPort",
                "spec.upstreams[2].localPort",
            ],
            "{err}"
        );
        assert!(err.to_string().contains("own ports"), "{err}");
        let too_big = format!("{base}    - {{workload: api, port: 70000, localPort: 9000}}\n");
        assert!(parse_manifest(&too_big).is_err());
        let unknown =
            format!("{base}    - {{workload: api, port: 80, localPort: 9000, host: x}}\n");
        let err = parse_manifest(&unknown).expect_err("unknown field");
        assert!(err.to_string().contains("unknown field `host`"), "{err}");
    }

    #[test]
    fn host_ports_are_published_once_per_protocol() {
        let base = "apiVersion: cloudless.dev/v1\nkind: Workload\nmetadata:\n  name: web\nspec:\n  image: busybox:1\n  ports:\n";
        let ok = format!(
            "{base}    - {{containerPort: 8080, hostPort: 80}}\n    - {{containerPort: 5353, protocol: UDP, hostPort: 80}}\n    - {{containerPort: 9090}}\n"
        );
        let w = parse_manifest(&ok).expect("valid host ports");
        assert_eq!(w.spec.ports[0].host_port, 80);
        assert_eq!(w.spec.ports[2].host_port, 0, "hostPort defaults to 0");
        assert_eq!(
            w.spec.host_ports(),
            [(80, crate::Protocol::TCP), (80, crate::Protocol::UDP)]
        );
        let twice = format!(
            "{base}    - {{containerPort: 8080, hostPort: 80}}\n    - {{containerPort: 8081, hostPort: 80}}\n"
        );
        let err = parse_manifest(&twice).expect_err("a host port published twice");
        let fields: Vec<_> = err.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["spec.ports[1].hostPort"], "{err}");
        assert!(
            err.to_string().contains("80 TCP is published twice"),
            "{err}"
        );
        let too_big = format!("{base}    - {{containerPort: 8080, hostPort: 70000}}\n");
        assert!(parse_manifest(&too_big).is_err());
        let without_container_port = format!("{base}    - {{hostPort: 80}}\n");
        let err = parse_manifest(&without_container_port).expect_err("no containerPort");
        assert!(err.to_string().contains("containerPort"), "{err}");
    }

    #[test]
    fn host_network_takes_every_container_port_on_the_node() {
        let text = "apiVersion: cloudless.dev/v1\nkind: Workload\nmetadata:\n  name: dns\nspec:\n  image: busybox:1\n  securityContext:\n    hostNetwork: true\n  ports:\n    - {containerPort: 53, protocol: UDP}\n    - {containerPort: 53, hostPort: 53}\n";
        let w = parse_manifest(text).expect("valid");
        assert_eq!(
            w.spec.host_ports(),
            [(53, crate::Protocol::TCP), (53, crate::Protocol::UDP)]
        );
        let other = text.replace("hostPort: 53", "hostPort: 5353");
        let err = parse_manifest(&other).expect_err("hostPort differs under hostNetwork");
        assert_eq!(err.0[0].field, "spec.ports[1].hostPort", "{err}");
    }

    #[test]
    fn egress_policies_parse_and_every_bad_rule_is_named() {
        let base = "apiVersion: cloudless.dev/v1\nkind: Workload\nmetadata:\n  name: web\nspec:\n  image: busybox:1\n";
        let w = parse_manifest(base).expect("valid");
        assert_eq!(w.spec.egress, None, "no egress: the cluster default");
        let ok = format!(
            "{base}  egress:\n    allow:\n      - {{cidr: 203.0.113.0/24, ports: [443]}}\n      - {{cidr: \"2001:db8::/32\"}}\n"
        );
        let w = parse_manifest(&ok).expect("valid egress");
        let egress = w.spec.egress.expect("egress");
        assert_eq!(egress.allow[0].ports, [443]);
        assert!(egress.allow[1].ports.is_empty(), "no ports: every port");
        let none = format!("{base}  egress:\n    allow: []\n");
        let w = parse_manifest(&none).expect("no egress at all");
        assert_eq!(w.spec.egress.map(|e| e.allow.len()), Some(0));
        let bad = format!(
            "{base}  egress:\n    allow:\n      - {{cidr: 203.0.113.7, ports: [443, 0]}}\n      - {{cidr: 10.1.2.3/8}}\n"
        );
        let err = parse_manifest(&bad).expect_err("bad egress accepted");
        let fields: Vec<_> = err.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.egress.allow[0].cidr",
                "spec.egress.allow[0].ports[1]",
                "spec.egress.allow[1].cidr",
            ],
            "{err}"
        );
        let unknown = format!("{base}  egress:\n    deny: []\n");
        let err = parse_manifest(&unknown).expect_err("unknown field");
        assert!(err.to_string().contains("unknown field `deny`"), "{err}");
    }

    #[test]
    fn service_settings_and_ingress_ports_parse_and_every_bad_one_is_named() {
        let base = "apiVersion: cloudless.dev/v1\nkind: Workload\nmetadata:\n  name: web\nspec:\n  image: busybox:1\n  ports:\n";
        let w = parse_manifest(&format!("{base}    - {{containerPort: 8080}}\n")).expect("valid");
        assert_eq!(w.spec.service, crate::ServiceSpec::default(), "defaults");
        assert_eq!(w.spec.ports[0].ingress_port, 0, "ingressPort defaults to 0");
        assert_eq!(w.vip, None);
        let ok = format!(
            "{base}    - {{containerPort: 8080, ingressPort: 80}}\n    - {{containerPort: 8443, ingressPort: 443}}\n  service:\n    loadBalancing: Weighted\n    allowFrom: [dev, \"*\"]\n    zoneWeights: {{a: 3, b: 1}}\n"
        );
        let w = parse_manifest(&ok).expect("valid service");
        let s = &w.spec.service;
        assert_eq!(s.load_balancing, crate::LoadBalancing::Weighted);
        assert_eq!(s.allow_from, ["dev", "*"]);
        assert_eq!(s.zone_weights.get("a"), Some(&3));
        assert_eq!(w.spec.ingress_ports(), [(80, 8080), (443, 8443)]);
        // One ingress port number for both protocols of a port (DNS).
        let dns = format!(
            "{base}    - {{containerPort: 53, ingressPort: 53}}\n    - {{containerPort: 53, protocol: UDP, ingressPort: 53}}\n"
        );
        let w = parse_manifest(&dns).expect("TCP and UDP ingress on one number");
        assert_eq!(w.spec.ingress_ports(), [(53, 53), (53, 53)]);
        let bad = format!(
            "{base}    - {{containerPort: 8080, ingressPort: 80}}\n    - {{containerPort: 8081, ingressPort: 80}}\n    - {{containerPort: 53, protocol: UDP, ingressPort: 53}}\n    - {{containerPort: 54, protocol: UDP, ingressPort: 53}}\n  service:\n    allowFrom: [dev, Ops]\n    zoneWeights: {{a: 0}}\n"
        );
        let err = parse_manifest(&bad).expect_err("bad service accepted");
        let fields: Vec<_> = err.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.service.allowFrom[1]",
                "spec.service.zoneWeights",
                "spec.service.zoneWeights.a",
                "spec.ports[1].ingressPort",
                "spec.ports[3].ingressPort",
            ],
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("53 UDP is used by another port of this workload"),
            "{err}"
        );
        let unknown =
            format!("{base}    - {{containerPort: 8080}}\n  service:\n    sticky: true\n");
        let err = parse_manifest(&unknown).expect_err("unknown field");
        assert!(err.to_string().contains("unknown field `sticky`"), "{err}");
        let policy =
            format!("{base}    - {{containerPort: 8080}}\n  service:\n    loadBalancing: Random\n");
        let err = parse_manifest(&policy).expect_err("unknown policy");
        assert!(
            err.to_string().contains("unknown variant `Random`"),
            "{err}"
        );
    }

    #[test]
    fn every_example_manifest_is_valid() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).expect("examples/") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "yaml") {
                let text = std::fs::read_to_string(&path).expect("read");
                if let Err(e) = parse_manifest(&text) {
                    panic!("{}: {e}", path.display());
                }
                seen += 1;
            }
        }
        assert!(seen >= 3, "only {seen} examples");
    }

    #[test]
    fn limit_below_request_is_refused() {
        let text = GOOD.replace(
            "cpuMillis: 100",
            "cpuMillis: 100\n  limits:\n    cpuMillis: 50",
        );
        let err = parse_manifest(&text).expect_err("limit below request accepted");
        assert_eq!(err.0[0].field, "spec.limits.cpuMillis", "{err}");
    }
}
