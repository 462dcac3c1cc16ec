//! Identity records kept in the replicated state.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

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

/// An enrolled node (device running an agent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Node id (in its certificate as `cloudless://node/<id>`).
    pub id: String,
    /// Name the agent asked for (unique).
    pub name: String,
    /// Labels (from the join token).
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
}
