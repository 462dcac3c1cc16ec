//! Secrets as the cluster state holds them: ciphertext only, with the
//! metadata needed to authorise, audit and rotate.

use serde::{Deserialize, Serialize};

use crate::validation::{check_dns_label, ValidationErrors};

/// Default largest secret (all its values together): 64 KiB.
pub const DEFAULT_SECRET_LIMIT: usize = 64 * 1024;
/// Versions kept per secret (older ones are dropped).
pub const SECRET_VERSIONS_KEPT: usize = 5;
/// Default access token lifetime: 1 hour.
pub const DEFAULT_TOKEN_TTL_SECONDS: u64 = 3600;
/// Longest access token lifetime: 24 hours.
pub const MAX_TOKEN_TTL_SECONDS: u64 = 24 * 3600;
/// Most uses one access token may allow.
pub const MAX_TOKEN_USES: u32 = 1_000_000;
/// Default audit retention: 90 days.
pub const DEFAULT_AUDIT_RETENTION_DAYS: u32 = 90;
/// Default cap on secret audit records.
pub const DEFAULT_AUDIT_MAX_RECORDS: u32 = 100_000;
/// Default window in which repeats become one audit record: 1 hour.
pub const DEFAULT_AUDIT_AGGREGATE_WINDOW_S: u32 = 3600;
/// Default cap on access token records.
pub const DEFAULT_ACCESS_TOKEN_MAX_RECORDS: u32 = 100_000;

/// A secret value encrypted under a data key, the data key wrapped by a
/// master key version. Everything base64; safe to store and replicate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretCiphertext {
    /// The master key version that wraps the data key.
    pub key_version: u32,
    /// Nonce of the wrapped data key.
    pub dek_nonce: String,
    /// The wrapped data key (ciphertext and tag).
    pub dek: String,
    /// Nonce of the data.
    pub nonce: String,
    /// The data (ciphertext and tag).
    pub data: String,
}

/// One version of a secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretVersion {
    /// 1, 2, ...
    pub version: u64,
    /// The encrypted values.
    pub ciphertext: SecretCiphertext,
    /// The names of its values (not secret).
    pub keys: Vec<String>,
    /// Plaintext size in bytes.
    pub size: u32,
    /// When it was written, ms since the epoch.
    pub created_at_ms: i64,
}

/// A secret: its versions (newest last) and who may read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretRecord {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Workload names (in the secret's namespace) that may read it.
    pub audiences: Vec<String>,
    /// Updates are refused.
    pub immutable: bool,
    /// After this it cannot be read, ms since the epoch (0: never).
    pub expires_at_ms: i64,
    /// The newest last, at most [`SECRET_VERSIONS_KEPT`].
    pub versions: Vec<SecretVersion>,
    /// Creation time.
    pub created_at_ms: i64,
    /// Last update.
    pub updated_at_ms: i64,
}

impl SecretRecord {
    /// The current version.
    pub fn current(&self) -> Option<&SecretVersion> {
        self.versions.last()
    }
}

/// One master key version, sealed by the cluster's root key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretKeyVersion {
    /// 1, 2, ...
    pub version: u32,
    /// Nonce.
    pub nonce: String,
    /// The key sealed under the root key (ciphertext and tag).
    pub sealed: String,
    /// When it was made.
    pub created_at_ms: i64,
    /// No data key is wrapped by it any more and it was retired.
    pub retired: bool,
}

/// The replicated master key state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretKeyring {
    /// The version new data keys are wrapped with (0: none yet).
    pub active: u32,
    /// Every version, oldest first.
    pub keys: Vec<SecretKeyVersion>,
}

/// An access token as the cluster tracks it (the token itself is a JWT
/// the caller holds; only its id is stored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessTokenRecord {
    /// The JWT's `jti`.
    pub id: String,
    /// The secret's namespace.
    pub namespace: String,
    /// The secret's name.
    pub secret: String,
    /// The audience it was minted for.
    pub audience: String,
    /// Who minted it (`admin`, `node:<id>`); only they may use it.
    pub issued_to: String,
    /// When, ms since the epoch.
    pub issued_at_ms: i64,
    /// Expiry, ms since the epoch.
    pub expires_at_ms: i64,
    /// Uses allowed.
    pub max_uses: u32,
    /// Uses so far.
    pub uses: u32,
    /// Revoked.
    pub revoked: bool,
}

/// One audited secret operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// When, ms since the epoch (stamped by the proposer).
    pub at_ms: i64,
    /// Who: `admin`, `node:<id>`, or `unknown`.
    pub actor: String,
    /// The peer address.
    pub source: String,
    /// create, read, update, delete, token-mint, token-use, token-revoke,
    /// rotate, retire.
    pub action: String,
    /// The secret's namespace (empty for rotations).
    pub namespace: String,
    /// The secret's name.
    pub secret: String,
    /// The access token involved, if any.
    pub token_id: String,
    /// Allowed or not.
    pub allowed: bool,
    /// Why it was refused, or a detail.
    pub detail: String,
}

impl AuditRecord {
    /// Whether repeats of this record within a window may be counted in one
    /// stored record: reads, token mints and uses, and every refusal. Changes
    /// (create, update, delete, revoke, rotate, retire) are always kept apart.
    pub fn aggregates(&self) -> bool {
        !self.allowed || matches!(self.action.as_str(), "read" | "token-mint" | "token-use")
    }
}

/// One stored audit log record: an [`AuditRecord`] (its `at_ms` the first
/// occurrence) and how many times it happened within the aggregation window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditLogEntry {
    /// The first occurrence (with the latest `detail`, `source` and `token_id`).
    #[serde(flatten)]
    pub record: AuditRecord,
    /// Occurrences counted in this record (1 for a single one).
    #[serde(default = "one")]
    pub count: u32,
    /// The latest occurrence, ms since the epoch.
    #[serde(default)]
    pub last_at_ms: i64,
}

fn one() -> u32 {
    1
}

/// Checks a secret value key: 1-253 characters of letters, digits, `.`, `_`, `-`.
pub fn check_secret_key(errs: &mut ValidationErrors, field: &str, key: &str) {
    let ok = !key.is_empty()
        && key.len() <= 253
        && key != "."
        && key != ".."
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !ok {
        errs.push(
            field,
            format!("{key:?} must be 1-253 letters, digits, '.', '_' or '-'"),
        );
    }
}

/// Checks a secret's namespace, name and audiences.
pub fn check_secret_names(
    errs: &mut ValidationErrors,
    namespace: &str,
    name: &str,
    audiences: &[String],
) {
    check_dns_label(errs, "namespace", namespace);
    check_dns_label(errs, "name", name);
    for (i, a) in audiences.iter().enumerate() {
        check_dns_label(errs, &format!("audiences[{i}]"), a);
    }
}
