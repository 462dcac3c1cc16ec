//! What the caller describes: nodes and workloads, with plain strings.

use std::collections::BTreeMap;

use cloudless_types::{NodePhase, PowerSource, Protocol, Resources};

/// Taint effects, with Kubernetes semantics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaintEffect {
    /// Untolerated: the node is not eligible.
    NoSchedule,
    /// Untolerated: the node scores lower.
    PreferNoSchedule,
    /// Untolerated: not eligible (and running replicas are evicted by the control plane).
    NoExecute,
}

/// A taint on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taint {
    /// Key.
    pub key: String,
    /// Value (may be empty).
    pub value: String,
    /// Effect.
    pub effect: TaintEffect,
    /// When it was added, ms since the epoch (for `toleration_seconds`).
    pub added_at_ms: i64,
}

/// How a toleration matches a taint's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TolerationOperator {
    /// Key and value must be equal.
    Equal,
    /// Any value of the key (or of every key when the key is empty).
    Exists,
}

/// A workload's toleration of taints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Toleration {
    /// Taint key; empty with `Exists` tolerates every taint.
    pub key: String,
    /// Matching rule.
    pub operator: TolerationOperator,
    /// Value for `Equal`.
    pub value: String,
    /// Only taints with this effect; `None` for all.
    pub effect: Option<TaintEffect>,
    /// For `NoExecute`: tolerated only this long after the taint was added.
    pub toleration_seconds: Option<u64>,
}

/// A replica already placed on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningReplica {
    /// Replica id.
    pub id: String,
    /// Its workload (namespace/name).
    pub workload: String,
    /// Its priority.
    pub priority: i32,
    /// What it reserves.
    pub requests: Resources,
    /// The node ports it holds: published `hostPort`s, or every container
    /// port with host networking (`WorkloadSpec::host_ports`).
    pub host_ports: Vec<(u16, Protocol)>,
}

/// One node as the scheduler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeInfo {
    /// Unique node id.
    pub id: String,
    /// Region.
    pub region: String,
    /// Zone.
    pub zone: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Taints.
    pub taints: Vec<Taint>,
    /// Liveness: only Ready nodes take replicas.
    pub phase: NodePhase,
    /// Cordoned by an operator.
    pub cordoned: bool,
    /// Being drained.
    pub draining: bool,
    /// Total allocatable resources.
    pub capacity: Resources,
    /// Resources reserved by replicas not listed in `replicas` (e.g. system).
    pub reserved: Resources,
    /// 0-1, from uptime and heartbeat history.
    pub reliability: f64,
    /// Relative cost per unit of resources (any unit; compared across nodes).
    pub cost_per_unit: f64,
    /// Power source.
    pub power: PowerSource,
    /// Battery charge in percent (0-100) when on battery.
    pub battery_percent: u8,
    /// CPU architecture (`amd64`, `arm64`, ...).
    pub arch: String,
    /// Measured round-trip time to regions, in ms.
    pub rtt_ms: BTreeMap<String, f64>,
    /// Runtime classes the node offers (`runc` always counts).
    pub runtime_classes: Vec<String>,
    /// Replicas placed on the node; their requests count as reserved.
    pub replicas: Vec<RunningReplica>,
}

/// Label match operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operator {
    /// Label value is one of `values`.
    In,
    /// Label absent or value not in `values`.
    NotIn,
    /// Label present.
    Exists,
    /// Label absent.
    DoesNotExist,
}

/// One label requirement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MatchExpression {
    /// Label key.
    pub key: String,
    /// Operator.
    pub operator: Operator,
    /// Values for `In`/`NotIn`.
    pub values: Vec<String>,
}

/// A soft node-affinity term.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreferredTerm {
    /// 1-100.
    pub weight: u32,
    /// Requirement that earns the weight.
    pub expression: MatchExpression,
}

/// Replica anti-affinity within one workload, and the placement strategy:
/// the workload's own types, one definition for the manifest, the state
/// and the scheduler.
pub use cloudless_types::{AntiAffinity, PlacementStrategy as Strategy};

/// What to place.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WorkloadRequest {
    /// Workload (namespace/name); replicas of the same workload count for anti-affinity and spread.
    pub workload: String,
    /// Per-replica reservation.
    pub requests: Resources,
    /// Replicas to place in this call.
    pub replicas: u32,
    /// Allowed regions, most preferred first; empty allows all.
    pub regions: Vec<String>,
    /// Allowed zones; empty allows all.
    pub zones: Vec<String>,
    /// Labels a node must carry.
    pub node_selector: BTreeMap<String, String>,
    /// Required node affinity (all must hold).
    pub required: Vec<MatchExpression>,
    /// Preferred node affinity.
    pub preferred: Vec<PreferredTerm>,
    /// Replica anti-affinity.
    pub anti_affinity: AntiAffinity,
    /// Taints tolerated.
    pub tolerations: Vec<Toleration>,
    /// Strategy.
    pub strategy: Strategy,
    /// Priority; may preempt replicas at least 10 lower.
    pub priority: i32,
    /// Required CPU architecture.
    pub arch: Option<String>,
    /// Required runtime class (`runc` when `None`).
    pub runtime_class: Option<String>,
    /// A long-running service (battery-powered nodes score lower).
    pub long_running: bool,
    /// The node ports each replica takes: a node where any of them is held
    /// (by any replica, this workload's included) is not eligible.
    pub host_ports: Vec<(u16, Protocol)>,
}
