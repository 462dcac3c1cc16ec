//! Memory-only caches of the secret service's hot read path.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use cloudless_types::{AccessTokenRecord, SecretRecord};
use zeroize::Zeroizing;

/// Token and secret records of a many-use token as read at a secret
/// generation (valid while the generation is unchanged; use counts are the
/// ledger's business).
pub(super) type HotRecord = (u64, Arc<AccessTokenRecord>, Option<Arc<SecretRecord>>);
/// Most entries kept in the hot cache (and in the verified-token cache).
pub(super) const HOT_LIMIT: usize = 65_536;

/// The decrypted values of one secret version, by key (wiped on drop).
pub(super) type PlainValues = Arc<Vec<(String, Zeroizing<Vec<u8>>)>>;
/// Most decrypted versions kept.
pub(super) const PLAIN_LIMIT: usize = 4096;

/// A cache shared by concurrent calls and bounded in size: an insert into
/// a map holding `limit` entries clears it first, so a caller cannot grow
/// it without bound and what is still used is read again on demand.
pub(super) struct BoundedMap<K, V> {
    map: Mutex<HashMap<K, V>>,
    limit: usize,
}

impl<K: Eq + Hash, V: Clone> BoundedMap<K, V> {
    /// An empty map that keeps at most `limit` entries.
    pub(super) fn new(limit: usize) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            limit,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, V>> {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A copy of the value at `key`.
    pub(super) fn get(&self, key: &K) -> Option<V> {
        self.lock().get(key).cloned()
    }

    /// Stores `value` at `key`, first clearing the map when it is full.
    pub(super) fn insert(&self, key: K, value: V) {
        let mut map = self.lock();
        if map.len() >= self.limit {
            map.clear();
        }
        map.insert(key, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_map_forgets_everything_before_it_takes_the_next_entry() {
        let m = BoundedMap::new(2);
        m.insert("a", 1);
        m.insert("b", 2);
        assert_eq!((m.get(&"a"), m.get(&"b")), (Some(1), Some(2)));
        m.insert("c", 4);
        assert_eq!(
            (m.get(&"a"), m.get(&"b"), m.get(&"c")),
            (None, None, Some(4)),
            "the third entry found the map full"
        );
        m.insert("d", 5);
        assert_eq!((m.get(&"c"), m.get(&"d")), (Some(4), Some(5)));
    }
}
