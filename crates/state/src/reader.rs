//! Read-only access to the applied state, for API handlers and watches.

use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition};

use cloudless_types::{
    AccessTokenRecord, AuditLogEntry, AuditRecord, EventRecord, IdentityMaterial, JoinTokenRecord,
    NodeRecord, ReplicaRecord, SecretKeyring, SecretRecord, Workload,
};

use crate::changes::Changes;
use crate::command::ClusterInfo;
use crate::error::StateError;
use crate::tables::{
    admin_key, read_applied, retired_coordinator_key, secret_key, workload_key, Applied, ACCESS,
    ACCESS_TOKENS, AUDIT, CLUSTER, CLUSTER_KEY, EVENTS, IDENTITY, IDENTITY_KEY, JOIN_TOKENS,
    KEYRING_KEY, NODES, NODE_REPLICAS, REPLICAS, SECRETS, SECRET_KEYS, WORKLOADS,
    WORKLOAD_REPLICAS,
};

/// The last event sequence a read looked at (`None`: no event yet).
pub type EventCursor = Option<u64>;

/// Read-only access to the applied state, for API handlers and watches.
#[derive(Clone)]
pub struct StateReader {
    path: PathBuf,
    db: Arc<Database>,
    changes: Changes,
}

impl Debug for StateReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateReader")
            .field("path", &self.path)
            .finish()
    }
}

impl StateReader {
    /// A reader of the database `db` at `path`, seeing the state machine's `changes`.
    pub(crate) fn new(path: &Path, db: Arc<Database>, changes: Changes) -> Self {
        Self {
            path: path.to_path_buf(),
            db,
            changes,
        }
    }

    fn read<T>(
        &self,
        f: impl FnOnce(&ReadTransaction) -> Result<T, String>,
    ) -> Result<T, StateError> {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| StateError::storage(&self.path, e))?;
        f(&txn).map_err(|e| StateError::storage(&self.path, e))
    }

    fn get<T: serde::de::DeserializeOwned>(
        &self,
        def: TableDefinition<&str, &str>,
        key: &str,
    ) -> Result<Option<T>, StateError> {
        self.read(|txn| {
            let table = txn.open_table(def).map_err(|e| e.to_string())?;
            let v = table.get(key).map_err(|e| e.to_string())?;
            match v {
                Some(v) => serde_json::from_str(v.value())
                    .map(Some)
                    .map_err(|e| e.to_string()),
                None => Ok(None),
            }
        })
    }

    /// The cluster record, once `InitCluster` has been applied.
    pub fn cluster(&self) -> Result<Option<ClusterInfo>, StateError> {
        self.get(CLUSTER, CLUSTER_KEY)
    }

    /// One workload.
    pub fn workload(&self, namespace: &str, name: &str) -> Result<Option<Workload>, StateError> {
        self.get(WORKLOADS, &workload_key(namespace, name))
    }

    /// Workloads in `namespace`, or in every namespace when `None`, ordered by namespace and name.
    pub fn workloads(&self, namespace: Option<&str>) -> Result<Vec<Workload>, StateError> {
        self.read(|txn| {
            let table = txn.open_table(WORKLOADS).map_err(|e| e.to_string())?;
            let prefix = namespace.map(|ns| format!("{ns}/"));
            let iter = match &prefix {
                Some(p) => table
                    .range::<&str>(p.as_str()..)
                    .map_err(|e| e.to_string())?,
                None => table.iter().map_err(|e| e.to_string())?,
            };
            let mut out = Vec::new();
            for item in iter {
                let (k, v) = item.map_err(|e| e.to_string())?;
                if let Some(p) = &prefix {
                    if !k.value().starts_with(p.as_str()) {
                        break;
                    }
                }
                out.push(serde_json::from_str(v.value()).map_err(|e| e.to_string())?);
            }
            Ok(out)
        })
    }

    /// One secret (ciphertext and metadata).
    pub fn secret(&self, namespace: &str, name: &str) -> Result<Option<SecretRecord>, StateError> {
        self.get(SECRETS, &secret_key(namespace, name))
    }

    /// Secrets in `namespace` (every namespace when `None`), by name.
    pub fn secrets(&self, namespace: Option<&str>) -> Result<Vec<SecretRecord>, StateError> {
        self.read(|txn| {
            let table = txn.open_table(SECRETS).map_err(|e| e.to_string())?;
            let prefix = namespace.map(|ns| format!("{ns}/")).unwrap_or_default();
            let mut out = Vec::new();
            for item in table
                .range::<&str>(prefix.as_str()..)
                .map_err(|e| e.to_string())?
            {
                let (k, v) = item.map_err(|e| e.to_string())?;
                if !k.value().starts_with(prefix.as_str()) {
                    break;
                }
                out.push(serde_json::from_str(v.value()).map_err(|e| e.to_string())?);
            }
            Ok(out)
        })
    }

    /// The sealed master keyring.
    pub fn secret_keyring(&self) -> Result<SecretKeyring, StateError> {
        Ok(self.get(SECRET_KEYS, KEYRING_KEY)?.unwrap_or_default())
    }

    /// One access token's record.
    pub fn access_token(&self, id: &str) -> Result<Option<AccessTokenRecord>, StateError> {
        self.get(ACCESS_TOKENS, id)
    }

    /// How many access token records are kept.
    pub fn access_token_count(&self) -> Result<u64, StateError> {
        self.read(|txn| {
            txn.open_table(ACCESS_TOKENS)
                .and_then(|t| Ok(redb::ReadableTableMetadata::len(&t)?))
                .map_err(|e| e.to_string())
        })
    }

    /// An access token and the secret it names, read together.
    pub fn token_and_secret(
        &self,
        id: &str,
    ) -> Result<(Option<AccessTokenRecord>, Option<SecretRecord>), StateError> {
        self.read(|txn| {
            let get =
                |def: TableDefinition<&str, &str>, key: &str| -> Result<Option<String>, String> {
                    let table = txn.open_table(def).map_err(|e| e.to_string())?;
                    let v = table.get(key).map_err(|e| e.to_string())?;
                    Ok(v.map(|v| v.value().to_owned()))
                };
            let Some(t) = get(ACCESS_TOKENS, id)? else {
                return Ok((None, None));
            };
            let t: AccessTokenRecord = serde_json::from_str(&t).map_err(|e| e.to_string())?;
            let s = get(SECRETS, &secret_key(&t.namespace, &t.secret))?
                .map(|s| serde_json::from_str::<SecretRecord>(&s))
                .transpose()
                .map_err(|e| e.to_string())?;
            Ok((Some(t), s))
        })
    }

    /// Audit log entries whose record passes `filter`, oldest first, at
    /// most `limit` (the newest).
    pub fn audit(
        &self,
        filter: impl Fn(&AuditRecord) -> bool,
        limit: usize,
    ) -> Result<Vec<AuditLogEntry>, StateError> {
        self.read(|txn| {
            let table = txn.open_table(AUDIT).map_err(|e| e.to_string())?;
            let mut out = std::collections::VecDeque::new();
            for item in table.iter().map_err(|e| e.to_string())? {
                let (k, v) = item.map_err(|e| e.to_string())?;
                if k.value().starts_with('~') {
                    continue;
                }
                let r: AuditLogEntry =
                    serde_json::from_str(v.value()).map_err(|e| e.to_string())?;
                if filter(&r.record) {
                    out.push_back(r);
                    if out.len() > limit {
                        out.pop_front();
                    }
                }
            }
            Ok(out.into())
        })
    }

    /// The cluster CA and sealed keys, once `InitIdentity` has been applied.
    pub fn identity(&self) -> Result<Option<IdentityMaterial>, StateError> {
        self.get(IDENTITY, IDENTITY_KEY)
    }

    /// One join token's record.
    pub fn join_token(&self, id: &str) -> Result<Option<JoinTokenRecord>, StateError> {
        self.get(JOIN_TOKENS, id)
    }

    /// Every join token, by id.
    pub fn join_tokens(&self) -> Result<Vec<JoinTokenRecord>, StateError> {
        self.all(JOIN_TOKENS)
    }

    /// One node.
    pub fn node(&self, id: &str) -> Result<Option<NodeRecord>, StateError> {
        self.get(NODES, id)
    }

    /// Every node, by id.
    /// A counter that changes whenever a node may have been removed: a cached
    /// "node exists" answer taken at the same value is still true.
    pub fn removal_generation(&self) -> u64 {
        self.changes.removal_generation()
    }

    /// A counter bumped after every commit that changed a secret, the
    /// master keyring or a token's revocation: records read at an equal
    /// count are still current (token use counts aside).
    pub fn secret_generation(&self) -> u64 {
        self.changes.secret_generation()
    }

    /// Whether node `id` is enrolled (a key lookup; no decoding).
    pub fn node_exists(&self, id: &str) -> Result<bool, StateError> {
        self.read(|txn| {
            let table = txn.open_table(NODES).map_err(|e| e.to_string())?;
            let found = table.get(id).map_err(|e| e.to_string())?.is_some();
            Ok(found)
        })
    }

    /// The record of admin `name`, if one was ever issued or revoked.
    pub fn admin(&self, name: &str) -> Result<Option<cloudless_types::AdminRecord>, StateError> {
        self.get(ACCESS, &admin_key(name))
    }

    /// Every admin record.
    pub fn admins(&self) -> Result<Vec<cloudless_types::AdminRecord>, StateError> {
        self.read(|txn| {
            let table = txn.open_table(ACCESS).map_err(|e| e.to_string())?;
            let mut out = Vec::new();
            for item in table.range("admin/".."admin0").map_err(|e| e.to_string())? {
                let (_, v) = item.map_err(|e| e.to_string())?;
                out.push(serde_json::from_str(v.value()).map_err(|e| e.to_string())?);
            }
            Ok(out)
        })
    }

    /// Whether coordinator `id` was removed from the cluster.
    pub fn coordinator_retired(&self, id: u64) -> Result<bool, StateError> {
        self.read(|txn| {
            let table = txn.open_table(ACCESS).map_err(|e| e.to_string())?;
            let found = table
                .get(retired_coordinator_key(id).as_str())
                .map_err(|e| e.to_string())?
                .is_some();
            Ok(found)
        })
    }

    /// Every node record.
    pub fn nodes(&self) -> Result<Vec<NodeRecord>, StateError> {
        self.all(NODES)
    }

    fn all<T: serde::de::DeserializeOwned>(
        &self,
        def: TableDefinition<&str, &str>,
    ) -> Result<Vec<T>, StateError> {
        self.read(|txn| {
            let table = txn.open_table(def).map_err(|e| e.to_string())?;
            let mut out = Vec::new();
            for item in table.iter().map_err(|e| e.to_string())? {
                let (_, v) = item.map_err(|e| e.to_string())?;
                out.push(serde_json::from_str(v.value()).map_err(|e| e.to_string())?);
            }
            Ok(out)
        })
    }

    /// Every replica.
    pub fn replicas(&self) -> Result<Vec<ReplicaRecord>, StateError> {
        self.all(REPLICAS)
    }

    /// One replica.
    pub fn replica(&self, id: &str) -> Result<Option<ReplicaRecord>, StateError> {
        self.get(REPLICAS, id)
    }

    /// The replicas assigned to `node_id`.
    pub fn node_replicas(&self, node_id: &str) -> Result<Vec<ReplicaRecord>, StateError> {
        self.indexed(NODE_REPLICAS, &format!("{node_id}/"))
    }

    /// The replicas of one workload.
    pub fn workload_replicas(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Vec<ReplicaRecord>, StateError> {
        self.indexed(WORKLOAD_REPLICAS, &format!("{namespace}/{name}/"))
    }

    fn indexed(
        &self,
        index: TableDefinition<&str, &str>,
        prefix: &str,
    ) -> Result<Vec<ReplicaRecord>, StateError> {
        self.read(|txn| {
            let idx = txn.open_table(index).map_err(|e| e.to_string())?;
            let table = txn.open_table(REPLICAS).map_err(|e| e.to_string())?;
            let mut out = Vec::new();
            for item in idx.range::<&str>(prefix..).map_err(|e| e.to_string())? {
                let (k, v) = item.map_err(|e| e.to_string())?;
                if !k.value().starts_with(prefix) {
                    break;
                }
                if let Some(r) = table.get(v.value()).map_err(|e| e.to_string())? {
                    out.push(serde_json::from_str(r.value()).map_err(|e| e.to_string())?);
                }
            }
            Ok(out)
        })
    }

    /// Events after sequence `after` (all when `None`), oldest first, with
    /// their sequence numbers; `filter` picks which. Also returns the last
    /// sequence looked at, for the next call (so a watch never rescans
    /// events its filter dropped).
    pub fn events(
        &self,
        after: Option<u64>,
        filter: impl Fn(&EventRecord) -> bool,
    ) -> Result<(Vec<(u64, EventRecord)>, EventCursor), StateError> {
        self.read(|txn| {
            let table = txn.open_table(EVENTS).map_err(|e| e.to_string())?;
            let start = match after.map(|a| a.checked_add(1)) {
                None => 0,
                Some(Some(next)) => next,
                // Nothing sorts after the largest sequence.
                Some(None) => return Ok((Vec::new(), after)),
            };
            let start = format!("{start:020}");
            let mut out = Vec::new();
            let mut last = after;
            for item in table
                .range::<&str>(start.as_str()..)
                .map_err(|e| e.to_string())?
            {
                let (k, v) = item.map_err(|e| e.to_string())?;
                let Ok(seq) = k.value().parse::<u64>() else {
                    continue;
                };
                last = Some(seq);
                let ev: EventRecord = serde_json::from_str(v.value()).map_err(|e| e.to_string())?;
                if filter(&ev) {
                    out.push((seq, ev));
                }
            }
            Ok((out, last))
        })
    }

    /// A receiver that changes after every commit touching replicas,
    /// workloads, nodes or the configuration.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The last applied log id and membership.
    pub fn applied(&self) -> Result<Applied, StateError> {
        self.read(read_applied)
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::histogram::Histogram;

    use crate::apply::testing::apply;
    use crate::command::Command;
    use crate::StateMachine;

    use super::*;

    /// A cursor at the largest sequence (a key read from disk) is past the
    /// end: nothing after it, and no overflow.
    #[test]
    fn an_event_cursor_at_the_largest_sequence_reads_nothing_more() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sm =
            StateMachine::open(&dir.path().join("s.redb"), Histogram::new([1.0])).expect("open");
        let ev = EventRecord {
            at_ms: 1,
            kind: "Workload".into(),
            namespace: "default".into(),
            object: "web".into(),
            reason: "Scheduled".into(),
            message: String::new(),
        };
        let txn = sm.db().begin_write().expect("txn");
        txn.open_table(EVENTS)
            .expect("table")
            .insert(
                format!("{:020}", u64::MAX).as_str(),
                serde_json::to_string(&ev).expect("encode").as_str(),
            )
            .expect("insert");
        txn.commit().expect("commit");
        let reader = sm.reader();
        let (all, last) = reader.events(None, |_| true).expect("read");
        assert_eq!((all.len(), last), (1, Some(u64::MAX)));
        let (more, last) = reader.events(last, |_| true).expect("read");
        assert_eq!((more.len(), last), (0, Some(u64::MAX)));
    }

    /// `audit(_, limit)` returns at most `limit` entries, the newest.
    #[test]
    fn the_audit_read_returns_at_most_its_limit_even_zero() {
        use crate::command::SecretCommand as S;
        use cloudless_types::AuditRecord;
        let dir = tempfile::tempdir().expect("tempdir");
        let sm =
            StateMachine::open(&dir.path().join("s.redb"), Histogram::new([1.0])).expect("open");
        let record = |i: i64| AuditRecord {
            at_ms: i,
            actor: format!("admin:{i}"),
            source: String::new(),
            action: "update".into(),
            namespace: "prod".into(),
            secret: "db".into(),
            token_id: String::new(),
            allowed: true,
            detail: String::new(),
        };
        apply(
            sm.db(),
            Command::Secret(S::Audit {
                records: (1..=3).map(record).collect(),
            }),
            10,
        );
        let reader = sm.reader();
        let at = |limit: usize| -> Vec<i64> {
            reader
                .audit(|_| true, limit)
                .expect("audit")
                .iter()
                .map(|e| e.record.at_ms)
                .collect()
        };
        assert_eq!(at(10), [1, 2, 3]);
        assert_eq!(at(2), [2, 3]);
        assert_eq!(at(0), Vec::<i64>::new());
    }
}
