//! Memory-only caches of the secret service's hot read path.

use std::sync::Arc;

use cloudless_types::{AccessTokenRecord, SecretRecord};
use zeroize::Zeroizing;

/// Token and secret records of many-use tokens as read at a secret
/// generation (valid while the generation is unchanged; use counts are the
/// ledger's business).
pub(super) type HotRecords =
    std::collections::HashMap<String, (u64, Arc<AccessTokenRecord>, Option<Arc<SecretRecord>>)>;
/// Most entries kept in the hot cache; it is cleared when full.
pub(super) const HOT_LIMIT: usize = 65_536;

/// The decrypted values of one secret version, by key (wiped on drop).
pub(super) type PlainValues = Arc<Vec<(String, Zeroizing<Vec<u8>>)>>;
/// Decrypted values of recently read secret versions (wiped on drop).
pub(super) type PlainCache = std::collections::HashMap<(String, u64, u32), PlainValues>;
/// Most decrypted versions kept.
pub(super) const PLAIN_LIMIT: usize = 4096;
