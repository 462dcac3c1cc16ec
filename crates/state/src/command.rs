//! Commands proposed to Raft and the state machine's answers.
//!
//! Commands are imperative; everything non-deterministic (time, ids) is
//! stamped by the proposer so that `apply` is a pure function of the log.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use cloudless_types::{
    AccessTokenRecord, AdminRecord, AuditRecord, ClusterConfig, EventRecord, IdentityMaterial,
    JoinTokenRecord, NodePhase, NodeRecord, NodeStatus, ReplicaRecord, ReplicaState,
    SecretCiphertext, SecretKeyVersion, SecretKeyring, SecretRecord, SecretVersion, Workload,
};

/// One log entry's payload: the requests a coordinator batched together.
/// Each is applied in order and answered separately.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Proposal {
    /// The requests, applied in order.
    pub requests: Vec<Request>,
}

/// The answers to a [`Proposal`], one per request, in order (empty for blank
/// and membership entries).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProposalResult {
    /// One response per request.
    pub responses: Vec<Response>,
}

/// One request: a command plus the proposer's context.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Client-chosen key; a second request with the same key and command
    /// gets the first one's response instead of being applied again.
    pub idempotency_key: Option<String>,
    /// Proposer's wall clock, milliseconds since the Unix epoch.
    pub proposed_at_ms: i64,
    /// The change.
    pub command: Command,
}

/// A change to the cluster state.
// Workload specs make some variants large; commands live briefly (decoded
// from a log entry, applied, dropped), so boxing would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Records the cluster's identity and first configuration. Applied once.
    InitCluster {
        /// New random cluster id.
        cluster_id: String,
        /// Initial configuration.
        config: ClusterConfig,
    },
    /// Replaces the cluster configuration.
    SetClusterConfig {
        /// New configuration (already validated by the proposer).
        config: ClusterConfig,
        /// Only apply if the stored revision equals this.
        expected_revision: Option<u64>,
    },
    /// Creates or updates a workload; generation, timestamps and the
    /// service VIP are set in apply. Refused when one of its ingress ports
    /// is another workload's.
    PutWorkload {
        /// The workload (validated by the proposer; its `vip` is ignored).
        workload: Workload,
        /// Why, recorded with a new revision: `apply`, `rollback`, `undo to N`.
        cause: String,
        /// Give the workload, if it has ports and no VIP yet, the lowest
        /// free virtual IP of the cluster's `network.service_cidr` (refused
        /// when none is free). Always true from log format 6; entries of
        /// earlier formats read as false, so that replaying them gives the
        /// state they gave.
        #[serde(default)]
        assign_vip: bool,
    },
    /// Changes a workload's replica count.
    ScaleWorkload {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// New replica count.
        replicas: u32,
    },
    /// Deletes a workload.
    DeleteWorkload {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// Records the CA certificate and the sealed CA and token keys. Applied once.
    InitIdentity {
        /// The material (keys sealed under the master key).
        material: IdentityMaterial,
    },
    /// Records a new join token.
    CreateJoinToken {
        /// The record (uses 0, not revoked).
        token: JoinTokenRecord,
    },
    /// Revokes a join token.
    RevokeJoinToken {
        /// Token id.
        token_id: String,
    },
    /// Uses one enrollment of `token_id` and records `node`, atomically: refused
    /// when the token is unknown, revoked, expired (at the proposer's time) or used up.
    EnrollNode {
        /// Token id.
        token_id: String,
        /// The node to record.
        node: NodeRecord,
        /// Give the node the lowest free replica subnet of the cluster's
        /// `network.cluster_cidr` (refused when none is free). Always true
        /// from log format 5; entries of format 4 read as false, so that
        /// replaying them gives the state they gave.
        #[serde(default)]
        assign_subnet: bool,
    },
    /// Cordons, uncordons or drains a node.
    SetNodeFlags {
        /// Node id.
        node_id: String,
        /// New cordon state, if changing.
        cordoned: Option<bool>,
        /// New drain state, if changing.
        draining: Option<bool>,
    },
    /// Removes a node's record and, in the same entry, its replicas (with a
    /// `Lost` event each), so they are replaced at once and the node is no
    /// longer anyone's caller or endpoint.
    RemoveNode {
        /// Node id.
        node_id: String,
    },
    /// Liveness and status changes the leader batched from heartbeats. Updates
    /// for nodes that no longer exist are skipped.
    UpdateNodes {
        /// One per node.
        updates: Vec<NodeUpdate>,
    },
    /// Records a renewed node certificate.
    RenewNodeCert {
        /// Node id.
        node_id: String,
        /// End of the new certificate's validity, ms since the epoch.
        cert_not_after_ms: i64,
    },
    /// Records replicas the leader placed. Skipped: replicas whose workload is
    /// gone or has moved to another template, whose node is not enrolled, or
    /// whose id exists.
    PlaceReplicas {
        /// The new records (state Pending).
        replicas: Vec<ReplicaRecord>,
    },
    /// Removes replicas (their agents stop them). Unknown ids are skipped.
    RemoveReplicas {
        /// Replica ids.
        ids: Vec<String>,
    },
    /// Appends events (the oldest beyond the retention are dropped);
    /// `at_ms` is set to the proposer's time when 0.
    RecordEvents {
        /// The events.
        events: Vec<EventRecord>,
    },
    /// Replica states agents reported, batched by the leader. A report from a
    /// node the replica is not assigned to is skipped.
    UpdateReplicas {
        /// One per replica.
        updates: Vec<ReplicaUpdate>,
    },
    /// Marks replicas of a Down node Unknown (kept for their workload's
    /// `disconnect.lostAfterSeconds`), or clears the mark when their node
    /// is back and they stay.
    MarkReplicasUnknown {
        /// Replica ids (missing ones are skipped).
        ids: Vec<String>,
        /// Set (true) or clear (false).
        unknown: bool,
    },
    /// Secret operations (see `crate::secrets`).
    Secret(SecretCommand),
    // Variants added later go last: log entries decode by variant position.
    /// Changes a node's placement labels (admins only): sets `set`, then
    /// removes the keys in `remove`.
    SetNodeLabels {
        /// Node id.
        node_id: String,
        /// Labels to add or overwrite (validated by the proposer).
        set: BTreeMap<String, String>,
        /// Label keys to remove (missing keys are ignored).
        remove: Vec<String>,
    },
    /// Trusts the node's current reported capacity for placement (admins
    /// only), ending a hold on a capacity jump.
    AcceptNodeCapacity {
        /// Node id.
        node_id: String,
    },
    /// Stores an admin's record (issued, renewed or revoked). Refused when
    /// `actor` (the admin acting, with its certificate's issue time) is
    /// revoked, or when an issued certificate falls under a revocation; a
    /// revocation time only ever grows.
    PutAdmin {
        /// The record as it is to be.
        record: AdminRecord,
        /// The acting admin and when its certificate was issued, Unix seconds.
        actor: Option<(String, i64)>,
    },
    /// Refuses a removed coordinator's certificate from now on.
    RetireCoordinator {
        /// Its Raft node id.
        node_id: u64,
    },
    /// The whole decision of one reconcile pass, applied at once (appended
    /// last: variants are numbered by position in the log encoding).
    Reconcile(ReconcileDecision),
    /// Gives each listed node without a replica subnet the lowest free one
    /// of the cluster's `network.cluster_cidr`, in order (nodes enrolled
    /// before subnets existed; the leader proposes it). Nodes gone or
    /// already holding a subnet are skipped; nodes left when the range is
    /// exhausted keep none.
    AssignNodeSubnets {
        /// Node ids.
        node_ids: Vec<String>,
    },
    /// Gives each listed workload that has ports and no service VIP the
    /// lowest free virtual IP of the cluster's `network.service_cidr`, in
    /// order (workloads stored before services existed; the leader
    /// proposes it). Workloads gone, without ports or already holding a
    /// VIP are skipped; those left when the range is exhausted keep none.
    AssignServiceVips {
        /// `(namespace, name)` of each workload.
        workloads: Vec<(String, String)>,
    },
}

/// What one reconcile pass decided, applied atomically in this order:
/// rollbacks, replicas marked Unknown, removals, placements, Unknown
/// cleared, events. Every part is computed by the leader from the state it
/// read; a part that no longer fits the state when applied (a replica
/// already gone, a workload changed since) is skipped, as in the separate
/// commands it replaces.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReconcileDecision {
    /// Rollouts to undo.
    pub rollbacks: Vec<Rollback>,
    /// Replicas of Down nodes kept as Unknown.
    pub mark_unknown: Vec<String>,
    /// Replicas to remove (lost, failed, surplus, replaced, preempted).
    pub remove: Vec<String>,
    /// New replicas.
    pub place: Vec<ReplicaRecord>,
    /// Unknown replicas whose node is back and that stay.
    pub clear_unknown: Vec<String>,
    /// Events of the pass.
    pub events: Vec<EventRecord>,
}

impl ReconcileDecision {
    /// Whether the pass decided nothing.
    pub fn is_empty(&self) -> bool {
        self.rollbacks.is_empty()
            && self.mark_unknown.is_empty()
            && self.remove.is_empty()
            && self.place.is_empty()
            && self.clear_unknown.is_empty()
            && self.events.is_empty()
    }
}

/// A rollout undone: the workload goes back to `spec`, unless its template
/// is no longer `from_template` (someone applied a newer spec meanwhile,
/// which wins).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollback {
    /// Namespace of the workload.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// The template whose rollout missed its deadline.
    pub from_template: u64,
    /// The previous template's spec.
    pub spec: cloudless_types::WorkloadSpec,
}

/// Commands on secrets, their master keys, access tokens and the audit log.
/// Every one that acts for a caller carries the audit record of it, which
/// is stored whether the command is allowed or refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SecretCommand {
    /// Makes the first master key version active (no-op when one is).
    InitKeyring {
        /// The sealed key.
        key: SecretKeyVersion,
    },
    /// Creates a secret (refused if it exists) or adds a version (refused if
    /// it does not exist, is immutable, or `version.version` is not the next).
    Put {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The new version (1 for a create).
        version: SecretVersion,
        /// Create (true) or update (false).
        create: bool,
        /// Replaces the audiences when given.
        audiences: Option<Vec<String>>,
        /// Set at create only.
        immutable: bool,
        /// Replaces the expiry when given (0: none).
        expires_at_ms: Option<i64>,
        /// The audit record.
        audit: AuditRecord,
    },
    /// Deletes a secret.
    Delete {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The audit record.
        audit: AuditRecord,
    },
    /// Adds a master key version, makes it active and stores data keys
    /// rewrapped under it (refused if the active version moved meanwhile).
    Rotate {
        /// The new version.
        key: SecretKeyVersion,
        /// The version the proposer rewrapped from.
        expected_active: u32,
        /// (namespace, name, secret version, ciphertext under the new key).
        rewrapped: Vec<(String, String, u64, SecretCiphertext)>,
        /// The audit record.
        audit: AuditRecord,
    },
    /// Retires a master key version no data key uses any more.
    Retire {
        /// The version.
        version: u32,
        /// The audit record.
        audit: AuditRecord,
    },
    /// Records a minted access token.
    MintToken {
        /// The token.
        token: AccessTokenRecord,
        /// The audit record.
        audit: AuditRecord,
    },
    /// Counts one use of a token and answers with the secret if the token
    /// is known, not revoked, unexpired, within its uses, held by the
    /// caller, and its audience may still read the secret.
    UseToken {
        /// Token id.
        id: String,
        /// The caller (must be the token's holder).
        actor: String,
        /// The audit record (its `allowed` and `detail` are set here).
        audit: AuditRecord,
    },
    /// Uses counted by the leader and their audit records, committed in a
    /// batch after the answers (tokens allowing many uses).
    RecordUses {
        /// (token id, uses).
        uses: Vec<(String, u32)>,
        /// The audit records of those uses and refusals.
        audits: Vec<AuditRecord>,
    },
    /// Revokes an access token (every later use is refused).
    RevokeToken {
        /// Token id.
        id: String,
        /// The audit record.
        audit: AuditRecord,
    },
    /// Appends audit records (refusals found before a command could run).
    /// Every audit append counts repeats within `audit_aggregate_window_s`
    /// into one record and drops records older than `audit_retention_days`
    /// and, beyond `audit_max_records`, the oldest.
    Audit {
        /// The records.
        records: Vec<AuditRecord>,
    },
    /// Stores data keys rewrapped under `to_version` (a rotation's keys in
    /// parts after its `Rotate`, so no entry grows with the number of
    /// secrets). A data key is replaced only if it is still wrapped by
    /// `from_version` with the nonce the proposer read (a secret updated or
    /// recreated meanwhile keeps its new key). New variants go after the
    /// existing ones: older log entries decode by variant position.
    RewrapKeys {
        /// The version the proposer rewrapped from.
        from_version: u32,
        /// The version the keys are now wrapped by.
        to_version: u32,
        /// The rewrapped keys.
        keys: Vec<RewrappedKey>,
    },
    /// Like `RecordUses`, with each audit record standing for repeats the
    /// leader counted in memory (reads with many-use tokens, refusals):
    /// `(record, occurrences, latest occurrence in ms)`, the record's
    /// `at_ms` being the first.
    RecordCounted {
        /// (token id, uses).
        uses: Vec<(String, u32)>,
        /// (record, occurrences, latest occurrence).
        audits: Vec<(AuditRecord, u32, i64)>,
    },
}

/// One data key rewrapped under a new master key version (the data it
/// protects is unchanged and not carried).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RewrappedKey {
    /// Namespace of the secret.
    pub namespace: String,
    /// Name of the secret.
    pub name: String,
    /// Secret version.
    pub version: u64,
    /// Nonce of the data key as the proposer read it: the key is replaced
    /// only if it is still that one (a secret deleted and created again
    /// meanwhile, with the same version number, keeps its own key).
    pub old_dek_nonce: String,
    /// Nonce of the wrapped data key.
    pub dek_nonce: String,
    /// The wrapped data key.
    pub dek: String,
}

/// A reported change of one replica.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaUpdate {
    /// Replica id.
    pub id: String,
    /// The reporting node.
    pub node_id: String,
    /// New state.
    pub state: ReplicaState,
    /// Last exit code.
    pub exit_code: Option<i32>,
    /// Restarts so far.
    pub restarts: u32,
    /// Detail.
    pub message: String,
    /// Its address on the node's bridge; empty: not reported (the stored
    /// one stays). Checked by the coordinator before it is proposed.
    #[serde(default)]
    pub address: String,
}

/// A change to one node's liveness or reported status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeUpdate {
    /// Node id.
    pub node_id: String,
    /// New phase, if changing.
    pub phase: Option<NodePhase>,
    /// The last heartbeat the leader saw, ms since the epoch.
    pub last_heartbeat_ms: i64,
    /// New reliability score, if changing.
    pub reliability: Option<f64>,
    /// New reported status, if changed.
    pub status: Option<NodeStatus>,
}

/// The cluster's identity and configuration record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterInfo {
    /// Random id chosen at `init`.
    pub cluster_id: String,
    /// When the cluster was initialised, ms since the epoch.
    pub created_at_ms: i64,
    /// The configuration.
    pub config: ClusterConfig,
    /// Increments on every configuration change; 1 after init.
    pub revision: u64,
}

/// The result of applying one entry.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// A blank or membership entry.
    Empty,
    /// `InitCluster` applied.
    ClusterInitialized(ClusterInfo),
    /// `SetClusterConfig` applied.
    ConfigSet(ClusterInfo),
    /// `PutWorkload` or `ScaleWorkload` applied.
    WorkloadStored {
        /// The stored workload.
        workload: Workload,
        /// Whether it did not exist before.
        created: bool,
    },
    /// `DeleteWorkload` applied.
    WorkloadDeleted,
    /// `InitIdentity` applied.
    IdentityInitialized,
    /// `CreateJoinToken` or `RevokeJoinToken` applied.
    JoinToken(JoinTokenRecord),
    /// `EnrollNode`, `SetNodeFlags`, `SetNodeLabels` or `AcceptNodeCapacity` applied.
    Node(NodeRecord),
    /// `RemoveNode` applied.
    NodeRemoved,
    /// `UpdateNodes` applied to this many nodes (the others no longer
    /// exist), or `AssignNodeSubnets` gave this many nodes a subnet.
    NodesUpdated(u32),
    /// `PlaceReplicas`, `RemoveReplicas`, `UpdateReplicas` or
    /// `MarkReplicasUnknown` changed this many replicas.
    ReplicasChanged(u32),
    /// `RecordEvents` stored this many events.
    EventsRecorded(u32),
    /// The command was valid but the state did not allow it; nothing changed.
    Rejected(Rejection),
    /// A secret after `Put` (metadata and ciphertext).
    SecretStored(SecretRecord),
    /// The keyring after `InitKeyring`, `Rotate` or `Retire`.
    Keyring(SecretKeyring),
    /// `UseToken`: the secret, or why not (the refusal was audited).
    SecretAccess(Result<SecretRecord, String>),
    /// A secret command with nothing to return.
    SecretDone,
    /// A secret was deleted or a token revoked (cached copies are stale).
    SecretChanged,
    /// `PutAdmin` applied.
    Admin(AdminRecord),
    /// `RetireCoordinator` applied.
    CoordinatorRetired,
    /// `AssignServiceVips` gave this many workloads a virtual IP.
    VipsAssigned(u32),
}

/// Why a command changed nothing. Deterministic: every replica rejects alike.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    /// `InitCluster` on a cluster that already has an identity.
    #[error("the cluster is already initialised as {cluster_id}")]
    AlreadyInitialized {
        /// The existing id.
        cluster_id: String,
    },
    /// A command that needs the cluster record before `InitCluster`.
    #[error("the cluster has not been initialised")]
    NotInitialized,
    /// Optimistic concurrency failure.
    #[error("configuration revision is {actual}, not the expected {expected}")]
    RevisionMismatch {
        /// What the caller expected.
        expected: u64,
        /// What is stored.
        actual: u64,
    },
    /// The workload does not exist.
    #[error("workload {namespace}/{name} not found")]
    WorkloadNotFound {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// `InitIdentity` when identity material already exists.
    #[error("the cluster already has a CA")]
    IdentityAlreadyInitialized,
    /// A join token id that was never created (or a duplicate create).
    #[error("join token {id} {problem}")]
    JoinToken {
        /// Token id.
        id: String,
        /// "is unknown", "was revoked", "expired", "has been used N of N times", "already exists".
        problem: String,
    },
    /// A node name already enrolled.
    #[error("a node named {name:?} is already enrolled as {id}")]
    NodeNameTaken {
        /// The name.
        name: String,
        /// Its node id.
        id: String,
    },
    /// The secret does not exist.
    #[error("secret {namespace}/{name} not found")]
    SecretNotFound {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// A create of a secret that exists.
    #[error("secret {namespace}/{name} already exists; use update")]
    SecretExists {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// An update of an immutable secret.
    #[error("secret {namespace}/{name} is immutable; delete and create it again")]
    SecretImmutable {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// A concurrent change got there first (version or key moved).
    #[error("{0}; retry")]
    SecretConflict(String),
    /// A master key operation the keyring does not allow.
    #[error("{0}")]
    Keyring(String),
    /// The access token id is unknown (for revocation).
    #[error("access token {id} is unknown")]
    TokenNotFound {
        /// Token id.
        id: String,
    },
    /// The node does not exist.
    #[error("node {id} not found")]
    NodeNotFound {
        /// Node id.
        id: String,
    },
    /// The idempotency key was used before for a different request.
    #[error("idempotency key {key:?} was already used for a different request")]
    IdempotencyKeyReused {
        /// The key.
        key: String,
    },
    /// The acting admin, or the certificate being issued, falls under a
    /// revocation of that admin name.
    #[error("admin {name:?} was revoked; ask another admin for a new certificate (cloudlessctl admin issue {name})")]
    AdminRevoked {
        /// The admin name.
        name: String,
    },
    /// An enrolling node finds no free replica subnet in the cluster range.
    #[error("no replica subnet is free for node {name:?}: every /{prefix_len} of {cluster_cidr} is taken; remove nodes, or widen network.cluster_cidr (cloudlessctl cluster set network.cluster_cidr=...)")]
    SubnetsExhausted {
        /// The node's name.
        name: String,
        /// The cluster range.
        cluster_cidr: String,
        /// The node prefix length.
        prefix_len: u8,
    },
    /// A new workload with ports finds no free virtual IP in the service
    /// range.
    #[error("no service virtual IP is free for workload {namespace}/{name}: every address of {service_cidr} is taken; delete workloads, or widen network.service_cidr (cloudlessctl cluster set network.service_cidr=...)")]
    VipsExhausted {
        /// The workload's namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// The service range.
        service_cidr: String,
    },
    /// A workload's ingress port is another workload's.
    #[error("{field}: {port} is taken by {holder}")]
    IngressPortTaken {
        /// The field (`spec.ports[0].ingressPort`).
        field: String,
        /// The port.
        port: u16,
        /// The workload holding it, `namespace/name`.
        holder: String,
    },
    /// A network configuration whose service range would leave a
    /// workload's virtual IP outside.
    #[error("network: workload {workload} holds virtual IP {vip}, which is not in service_cidr {service_cidr}; virtual IPs cannot move (a wider range holding every one is fine)")]
    VipInUse {
        /// The workload, `namespace/name`.
        workload: String,
        /// Its VIP.
        vip: String,
        /// The service range asked for.
        service_cidr: String,
    },
    /// A network configuration that would leave a node's subnet outside
    /// the node subnets it defines.
    #[error("network: node {node} holds subnet {subnet}, which is not a /{prefix_len} of {cluster_cidr}; node subnets cannot move (a wider cluster_cidr with the same node_prefix_len is fine)")]
    SubnetInUse {
        /// The node id.
        node: String,
        /// Its subnet.
        subnet: String,
        /// The cluster range asked for.
        cluster_cidr: String,
        /// The node prefix length asked for.
        prefix_len: u8,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_with_full_workload_specs_survive_the_log_encoding() {
        // The log is postcard (not self-describing): every field must be
        // written, whatever its value.
        let spec = cloudless_types::WorkloadSpec {
            image: "busybox".into(),
            readiness_probe: Some(cloudless_types::ProbeSpec {
                exec: Some(vec!["true".into()]),
                ..Default::default()
            }),
            rollout: cloudless_types::Rollout {
                min_available: Some(2),
                ..Default::default()
            },
            security_context: cloudless_types::SecurityContextSpec {
                run_as_user: Some(1000),
                seccomp_profile: cloudless_types::SeccompProfileSpec {
                    kind: cloudless_types::SeccompType::Localhost,
                    localhost_profile: Some("p.json".into()),
                },
                ..Default::default()
            },
            volumes: vec![
                cloudless_types::Volume {
                    name: "scratch".into(),
                    empty_dir: Some(cloudless_types::EmptyDir::default()),
                    host_path: None,
                    secret: None,
                },
                cloudless_types::Volume {
                    name: "creds".into(),
                    secret: Some(cloudless_types::SecretVolume {
                        secret_name: "db".into(),
                        items: vec![cloudless_types::KeyToPath {
                            key: "PASSWORD".into(),
                            path: "password".into(),
                        }],
                    }),
                    ..Default::default()
                },
            ],
            secret_env: vec![cloudless_types::SecretEnv {
                name: "DB_PASSWORD".into(),
                secret_key_ref: cloudless_types::SecretKeyRef {
                    name: "db".into(),
                    key: "PASSWORD".into(),
                },
            }],
            disconnect: cloudless_types::Disconnect {
                lost_after_seconds: 60,
                stop_on_client_after_seconds: Some(30),
                ..Default::default()
            },
            ports: vec![cloudless_types::ContainerPort {
                name: "http".into(),
                container_port: 8080,
                protocol: cloudless_types::Protocol::TCP,
                host_port: 80,
                ingress_port: 8080,
            }],
            egress: Some(cloudless_types::EgressPolicy {
                allow: vec![cloudless_types::EgressRule {
                    cidr: "203.0.113.0/24".into(),
                    ports: vec![443],
                }],
            }),
            service: cloudless_types::ServiceSpec {
                load_balancing: cloudless_types::LoadBalancing::Weighted,
                allow_from: vec!["*".into()],
                zone_weights: [("a".to_owned(), 3)].into(),
            },
            ..Default::default()
        };
        for spec in [cloudless_types::WorkloadSpec::default(), spec] {
            let p = Proposal {
                requests: vec![Request {
                    idempotency_key: None,
                    proposed_at_ms: 1,
                    command: Command::PutWorkload {
                        workload: Workload {
                            namespace: "default".into(),
                            name: "web".into(),
                            spec,
                            generation: 0,
                            created_at_ms: 0,
                            updated_at_ms: 0,
                            template: 0,
                            revisions: Vec::new(),
                            vip: Some("10.96.0.2".into()),
                        },
                        cause: "apply".into(),
                        assign_vip: true,
                    },
                }],
            };
            let bytes = postcard::to_allocvec(&p).expect("encode");
            let back: Proposal = postcard::from_bytes(&bytes).expect("decode");
            assert_eq!(back, p);
        }
    }
}
