//! Cloudless domain types. No I/O, no async: everything here is plain data,
//! the validation rules that keep bad input out of the Raft log, and the
//! token buckets ([`rate_limit`]) that bound what one caller may cost.

mod closed_set;
mod cluster_config;
mod container;
mod identity;
mod network;
mod node_capacity;
pub mod rate_limit;
mod secret;
mod service;
mod validation;
mod workload;

pub use closed_set::{ClosedSet, LogStream, NodeCondition, ObjectKind, PowerSource};
pub use cluster_config::{
    ClusterConfig, SchedulerWeights, DEFAULT_NODE_REJOIN_GRACE_S, MAX_NODE_REJOIN_GRACE_S,
};
pub use container::{
    Capabilities, ContainerPort, Disconnect, EmptyDir, HostPath, KeyToPath, Protocol,
    ReconnectPolicy, SeccompProfileSpec, SeccompType, SecretEnv, SecretKeyRef, SecretVolume,
    SecurityContextSpec, StorageMedium, Upstream, Volume, VolumeMount, MAX_DISCONNECT_SECONDS,
};
pub use identity::{
    AdminRecord, IdentityMaterial, JoinTokenRecord, NodePhase, NodeRecord, NodeStatus,
    RetiredCoordinator, SealedSecret,
};
pub use network::{
    EgressPolicy, EgressRule, NetworkConfig, MAX_EGRESS_PORTS, MAX_EGRESS_RULES,
    MAX_NODE_PREFIX_LEN_V4, MAX_NODE_PREFIX_LEN_V6,
};
pub use node_capacity::{
    check_capacity_bounds, placement_capacity, CapacityOutOfBounds, CAPACITY_LIMITS, GROWTH_FACTOR,
};
pub use secret::{
    check_secret_key, check_secret_names, AccessTokenRecord, AuditLogEntry, AuditRecord,
    SecretCiphertext, SecretKeyVersion, SecretKeyring, SecretRecord, SecretVersion,
    DEFAULT_ACCESS_TOKEN_MAX_RECORDS, DEFAULT_AUDIT_AGGREGATE_WINDOW_S, DEFAULT_AUDIT_MAX_RECORDS,
    DEFAULT_AUDIT_RETENTION_DAYS, DEFAULT_SECRET_LIMIT, DEFAULT_TOKEN_TTL_SECONDS,
    MAX_TOKEN_TTL_SECONDS, MAX_TOKEN_USES, SECRET_VERSIONS_KEPT,
};
pub use service::{
    LoadBalancing, ServiceSpec, ALL_NAMESPACES, MAX_ALLOW_FROM, MAX_ZONE_WEIGHT, MAX_ZONE_WEIGHTS,
};
pub use validation::{check_labels, parse_duration_secs, FieldError, ValidationErrors};
pub use workload::{
    parse_manifest, AntiAffinity, EventRecord, HttpGet, Placement, PlacementStrategy, ProbeSpec,
    ReplicaRecord, ReplicaState, Resources, RestartPolicy, Revision, Rollout, RolloutStrategy,
    TcpSocket, Workload, WorkloadSpec, DEFAULT_NAMESPACE, MAX_PIDS_LIMIT, MAX_REPLICAS,
    MIN_PIDS_LIMIT, REVISION_HISTORY,
};

/// Identifier of a coordinator in the Raft group.
pub type CoordinatorId = u64;
