//! Cloudless domain types. No I/O, no async: everything here is plain data and
//! the validation rules that keep bad input out of the Raft log.

mod cluster_config;
mod identity;
mod validation;
mod workload;

pub use cluster_config::{ClusterConfig, SchedulerWeights};
pub use identity::{
    IdentityMaterial, JoinTokenRecord, NodePhase, NodeRecord, NodeStatus, SealedSecret,
};
pub use validation::{check_labels, FieldError, ValidationErrors};
pub use workload::{
    parse_manifest, AntiAffinity, EventRecord, HttpGet, Placement, PlacementStrategy, ProbeSpec,
    ReplicaRecord, ReplicaState, Resources, RestartPolicy, Rollout, RolloutStrategy, TcpSocket,
    Workload, WorkloadSpec, DEFAULT_NAMESPACE, MAX_REPLICAS,
};

/// Identifier of a coordinator in the Raft group.
pub type CoordinatorId = u64;
