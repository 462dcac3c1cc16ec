//! Identity records kept in the replicated state.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Resources;

/// Bytes encrypted under the cluster master key (AES-256-GCM), base64.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedSecret {
    /// Nonce.
    pub nonce: String,
    /// Ciphertext with tag.
    pub ciphertext: String,
}

/// The cluster CA and token key. Private keys are only ever stored sealed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityMaterial {
    /// CA certificate (public).
    pub ca_cert_pem: String,
    /// CA private key, sealed.
    pub ca_key: SealedSecret,
    /// Join-token signing key, sealed.
    pub token_key: SealedSecret,
}

/// A join token's bookkeeping: uses are counted and revocation recorded here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenRecord {
    /// Token id (the JWT's `jti`).
    pub id: String,
    /// Creation time, ms since the epoch.
    pub created_at_ms: i64,
    /// Expiry, ms since the epoch.
    pub expires_at_ms: i64,
    /// Enrollments allowed.
    pub max_uses: u32,
    /// Enrollments made.
    pub uses: u32,
    /// Revoked by an operator.
    pub revoked: bool,
    /// Labels given to nodes enrolled with it.
    pub labels: BTreeMap<String, String>,
}

/// A node's liveness as the leader last committed it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NodePhase {
    /// Enrolled, no heartbeat yet.
    #[default]
    Pending,
    /// Heartbeating.
    Ready,
    /// Missed heartbeats; no new replicas.
    Suspect,
    /// Silent for longer than the Down timeout; its replicas are replaced.
    Down,
}

impl NodePhase {
    /// The phase's name as the CLI shows it.
    pub fn as_str(self) -> &'static str {
        crate::ClosedSet::name(self)
    }
}

/// What an agent reports about its device (changes rarely; committed when it does).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeStatus {
    /// Allocatable resources.
    pub capacity: Resources,
    /// Labels the agent reports. Informational only: placement never reads
    /// them (see [`NodeRecord::labels`]).
    pub reported_labels: BTreeMap<String, String>,
    /// Conditions: `MemoryPressure`, `DiskPressure`, `NetworkUnavailable`.
    pub conditions: Vec<String>,
    /// `mains` or `battery`.
    pub power_source: String,
    /// Battery charge in percent when on battery.
    pub battery_percent: u8,
    /// UDP addresses (`ip:port`) other nodes can reach this node's overlay
    /// endpoint at.
    pub overlay_addresses: Vec<String>,
}

/// An enrolled node (device running an agent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Node id (in its certificate as `cloudless://node/<id>`).
    pub id: String,
    /// Name the agent asked for (unique).
    pub name: String,
    /// Placement labels: the join token's at enrollment, then changed only
    /// by admins (`cloudlessctl node label`). The node itself cannot change
    /// them; what it reports is kept apart in `status.reported_labels`.
    pub labels: BTreeMap<String, String>,
    /// Enrollment time, ms since the epoch.
    pub enrolled_at_ms: i64,
    /// Token used.
    pub token_id: String,
    /// End of the current certificate's validity, ms since the epoch.
    pub cert_not_after_ms: i64,
    /// No new replicas.
    pub cordoned: bool,
    /// Replicas being moved away.
    pub draining: bool,
    /// Liveness, committed by the leader on change.
    #[serde(default)]
    pub phase: NodePhase,
    /// When `phase` last changed, ms since the epoch.
    #[serde(default)]
    pub phase_since_ms: i64,
    /// The last heartbeat the leader had seen when it last committed this record.
    #[serde(default)]
    pub last_heartbeat_ms: i64,
    /// Time spent Ready before the current phase, ms (for the reliability score).
    #[serde(default)]
    pub ready_ms: u64,
    /// Times the node was declared Down.
    #[serde(default)]
    pub down_count: u32,
    /// 0-1, from uptime and heartbeat history (see `docs/ARCHITECTURE.md`).
    #[serde(default = "default_reliability")]
    pub reliability: f64,
    /// What the agent last reported.
    #[serde(default)]
    pub status: NodeStatus,
    /// The capacity placement trusts: the first report after enrollment, or
    /// what an admin accepted (see `node_capacity`).
    #[serde(default)]
    pub trusted_capacity: Resources,
    /// Its replica subnet (`10.244.3.0/24`), cut from the cluster's
    /// `network.cluster_cidr` when it enrolled; `None` for a node enrolled
    /// before subnets existed, until the leader gives it one.
    #[serde(default)]
    pub subnet: Option<String>,
}

fn default_reliability() -> f64 {
    0.5
}

impl NodeRecord {
    /// A freshly enrolled node.
    pub fn new(id: String, name: String, token_id: String, cert_not_after_ms: i64) -> Self {
        Self {
            id,
            name,
            labels: BTreeMap::new(),
            enrolled_at_ms: 0,
            token_id,
            cert_not_after_ms,
            cordoned: false,
            draining: false,
            phase: NodePhase::Pending,
            phase_since_ms: 0,
            last_heartbeat_ms: 0,
            ready_ms: 0,
            down_count: 0,
            reliability: default_reliability(),
            status: NodeStatus::default(),
            trusted_capacity: Resources::default(),
            subnet: None,
        }
    }

    /// The capacity placement may use, and the resources whose reported
    /// growth is held back until an admin accepts it (see `node_capacity`).
    pub fn placement_capacity(&self) -> (Resources, Vec<&'static str>) {
        crate::placement_capacity(&self.status.capacity, &self.trusted_capacity)
    }
}

/// An operator's admin identity (`Admin(name)` certificates). Certificates
/// issued at or before `revoked_before_s` are refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminRecord {
    /// The name in the certificate (`cloudless://admin/<name>`).
    pub name: String,
    /// When the newest certificate was issued, Unix seconds.
    pub issued_at_s: i64,
    /// When the newest certificate expires, Unix seconds.
    pub not_after_s: i64,
    /// Who issued or last renewed it.
    pub issued_by: String,
    /// Certificates issued at or before this time are refused (0: none).
    pub revoked_before_s: i64,
    /// Revoked, and not issued again since.
    pub revoked: bool,
}

/// A coordinator removed from the cluster: its certificate is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetiredCoordinator {
    /// Its Raft node id.
    pub node_id: u64,
    /// When it was removed, Unix milliseconds.
    pub at_ms: i64,
}
