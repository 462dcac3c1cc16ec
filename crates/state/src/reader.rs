//! Read-only access to the applied state, for API handlers and watches.

use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition,
};
use serde::de::DeserializeOwned;

use cloudless_types::{
    AccessTokenRecord, AuditLogEntry, AuditRecord, EventRecord, IdentityMaterial, JoinTokenRecord,
    NodeRecord, ReplicaRecord, SecretKeyring, SecretRecord, Workload,
};

use crate::changes::Changes;
use crate::command::ClusterInfo;
use crate::error::{ApplyError, RedbContext, StateError};
use crate::seq_log::entry_key;
use crate::tables::{
    admin_key, decode, read_applied, retired_coordinator_key, secret_key, workload_key, Applied,
    ACCESS, ACCESS_TOKENS, AUDIT, CLUSTER, CLUSTER_KEY, EVENTS, IDENTITY, IDENTITY_KEY,
    JOIN_TOKENS, KEYRING_KEY, NODES, NODE_REPLICAS, REPLICAS, SECRETS, SECRET_KEYS, WORKLOADS,
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

    /// Runs `f` in a read transaction.
    fn read<T>(
        &self,
        f: impl FnOnce(&ReadTransaction) -> Result<T, ApplyError>,
    ) -> Result<T, StateError> {
        self.db
            .begin_read()
            .in_txn("begin")
            .and_then(|txn| f(&txn))
            .map_err(|e| e.into_state_error(&self.path))
    }

    fn get<T: DeserializeOwned>(
        &self,
        def: TableDefinition<&str, &str>,
        key: &str,
    ) -> Result<Option<T>, StateError> {
        self.read(|txn| lookup(txn, def, key))
    }

    fn all<T: DeserializeOwned>(
        &self,
        def: TableDefinition<&str, &str>,
    ) -> Result<Vec<T>, StateError> {
        self.read(|txn| prefixed(txn, def, ""))
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
        let prefix = namespace.map(|ns| format!("{ns}/")).unwrap_or_default();
        self.read(|txn| prefixed(txn, WORKLOADS, &prefix))
    }

    /// One secret (ciphertext and metadata).
    pub fn secret(&self, namespace: &str, name: &str) -> Result<Option<SecretRecord>, StateError> {
        self.get(SECRETS, &secret_key(namespace, name))
    }

    /// Secrets in `namespace` (every namespace when `None`), by name.
    pub fn secrets(&self, namespace: Option<&str>) -> Result<Vec<SecretRecord>, StateError> {
        let prefix = namespace.map(|ns| format!("{ns}/")).unwrap_or_default();
        self.read(|txn| prefixed(txn, SECRETS, &prefix))
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
                .at(ACCESS_TOKENS, "open")?
                .len()
                .at(ACCESS_TOKENS, "len")
        })
    }

    /// An access token and the secret it names, read together.
    pub fn token_and_secret(
        &self,
        id: &str,
    ) -> Result<(Option<AccessTokenRecord>, Option<SecretRecord>), StateError> {
        self.read(|txn| {
            let Some(t) = lookup::<AccessTokenRecord>(txn, ACCESS_TOKENS, id)? else {
                return Ok((None, None));
            };
            let s = lookup(txn, SECRETS, &secret_key(&t.namespace, &t.secret))?;
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
            let table = txn.open_table(AUDIT).at(AUDIT, "open")?;
            let mut out = std::collections::VecDeque::new();
            for item in table.iter().at(AUDIT, "iter")? {
                let (k, v) = item.at(AUDIT, "iter")?;
                // The sequence row.
                if k.value().starts_with('~') {
                    continue;
                }
                let r: AuditLogEntry = decode(AUDIT, k.value(), v.value())?;
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
        self.read(|txn| exists(txn, NODES, id))
    }

    /// The record of admin `name`, if one was ever issued or revoked.
    pub fn admin(&self, name: &str) -> Result<Option<cloudless_types::AdminRecord>, StateError> {
        self.get(ACCESS, &admin_key(name))
    }

    /// Every admin record.
    pub fn admins(&self) -> Result<Vec<cloudless_types::AdminRecord>, StateError> {
        self.read(|txn| prefixed(txn, ACCESS, &admin_key("")))
    }

    /// Whether coordinator `id` was removed from the cluster.
    pub fn coordinator_retired(&self, id: u64) -> Result<bool, StateError> {
        self.read(|txn| exists(txn, ACCESS, &retired_coordinator_key(id)))
    }

    /// Every node record, by id.
    pub fn nodes(&self) -> Result<Vec<NodeRecord>, StateError> {
        self.all(NODES)
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

    /// The replicas named by the rows of `index` whose key starts with `prefix`.
    fn indexed(
        &self,
        index: TableDefinition<&str, &str>,
        prefix: &str,
    ) -> Result<Vec<ReplicaRecord>, StateError> {
        self.read(|txn| {
            let idx = txn.open_table(index).at(index, "open")?;
            let table = txn.open_table(REPLICAS).at(REPLICAS, "open")?;
            let mut out = Vec::new();
            for item in idx.range::<&str>(prefix..).at(index, "range")? {
                let (k, v) = item.at(index, "range")?;
                if !k.value().starts_with(prefix) {
                    break;
                }
                if let Some(r) = table.get(v.value()).at(REPLICAS, "get")? {
                    out.push(decode(REPLICAS, v.value(), r.value())?);
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
            let table = txn.open_table(EVENTS).at(EVENTS, "open")?;
            let start = match after.map(|a| a.checked_add(1)) {
                None => 0,
                Some(Some(next)) => next,
                // Nothing sorts after the largest sequence.
                Some(None) => return Ok((Vec::new(), after)),
            };
            let start = entry_key(start);
            let mut out = Vec::new();
            let mut last = after;
            for item in table.range::<&str>(start.as_str()..).at(EVENTS, "range")? {
                let (k, v) = item.at(EVENTS, "range")?;
                // The sequence row.
                let Ok(seq) = k.value().parse::<u64>() else {
                    continue;
                };
                last = Some(seq);
                let ev: EventRecord = decode(EVENTS, k.value(), v.value())?;
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

/// The record under `key` in `def`, decoded.
fn lookup<T: DeserializeOwned>(
    txn: &ReadTransaction,
    def: TableDefinition<&str, &str>,
    key: &str,
) -> Result<Option<T>, ApplyError> {
    let table = txn.open_table(def).at(def, "open")?;
    let v = table.get(key).at(def, "get")?;
    v.map(|v| decode(def, key, v.value())).transpose()
}

/// Whether `def` has a row under `key` (not decoded).
fn exists(
    txn: &ReadTransaction,
    def: TableDefinition<&str, &str>,
    key: &str,
) -> Result<bool, ApplyError> {
    let table = txn.open_table(def).at(def, "open")?;
    let found = table.get(key).at(def, "get")?.is_some();
    Ok(found)
}

/// The records of `def` whose key starts with `prefix`, in key order.
fn prefixed<T: DeserializeOwned>(
    txn: &ReadTransaction,
    def: TableDefinition<&str, &str>,
    prefix: &str,
) -> Result<Vec<T>, ApplyError> {
    let table = txn.open_table(def).at(def, "open")?;
    let mut out = Vec::new();
    for item in table.range::<&str>(prefix..).at(def, "range")? {
        let (k, v) = item.at(def, "range")?;
        if !k.value().starts_with(prefix) {
            break;
        }
        out.push(decode(def, k.value(), v.value())?);
    }
    Ok(out)
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

    /// A record that does not decode is reported as corrupt, naming the
    /// file, the table and the key.
    #[test]
    fn an_undecodable_record_is_reported_as_corrupt_by_table_and_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.redb");
        let sm = StateMachine::open(&path, Histogram::new([1.0])).expect("open");
        let txn = sm.db().begin_write().expect("txn");
        txn.open_table(NODES)
            .expect("table")
            .insert("n1", r#"{"id":"n1"}"#)
            .expect("insert");
        txn.commit().expect("commit");
        let reader = sm.reader();
        for err in [
            reader.node("n1").expect_err("decoded"),
            reader.nodes().expect_err("decoded"),
        ] {
            let StateError::Corrupt { path: p, what, .. } = &err else {
                panic!("not reported as corrupt: {err}");
            };
            assert_eq!((p, what.as_str()), (&path, r#"nodes record "n1""#));
        }
        assert!(reader
            .node_exists("n1")
            .expect("a key lookup decodes nothing"));
    }
}
