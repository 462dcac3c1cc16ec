//! The tables of the state database: every definition, which of them a
//! snapshot copies, how their keys are made, and the helpers that read and
//! write their JSON records.
//!
//! Every data table maps a string key to a JSON value (index tables map a
//! key to a plain id), so a snapshot is a generic dump of [`DATA_TABLES`]
//! and a new table only needs listing there.

use openraft::{LogId, StoredMembership};
use redb::{ReadTransaction, ReadableTable, TableDefinition, TableHandle, WriteTransaction};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{ApplyError, RedbContext};
use crate::type_config::{CoordinatorNode, NodeId};

/// Raft bookkeeping: last applied log id, membership, format.
pub(crate) const SYSTEM: TableDefinition<&str, &str> = TableDefinition::new("system");
/// The current snapshot: "meta" (JSON) and "file" (its name in the snapshot
/// directory).
pub(crate) const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");

/// The cluster record under key "cluster".
pub(crate) const CLUSTER: TableDefinition<&str, &str> = TableDefinition::new("cluster");
/// Workloads under "namespace/name".
pub(crate) const WORKLOADS: TableDefinition<&str, &str> = TableDefinition::new("workloads");
/// Idempotency records under the client's key.
pub(crate) const IDEMPOTENCY: TableDefinition<&str, &str> = TableDefinition::new("idempotency");
/// Expiry index of idempotency records: "{proposed_at_ms:020}/{key}".
pub(crate) const IDEMPOTENCY_EXPIRY: TableDefinition<&str, &str> =
    TableDefinition::new("idempotency_expiry");

/// Identity material under key "identity".
pub(crate) const IDENTITY: TableDefinition<&str, &str> = TableDefinition::new("identity");
/// Join tokens by id.
pub(crate) const JOIN_TOKENS: TableDefinition<&str, &str> = TableDefinition::new("join_tokens");
/// Enrolled nodes by id.
pub(crate) const NODES: TableDefinition<&str, &str> = TableDefinition::new("nodes");
/// Node ids by node name (names are unique).
pub(crate) const NODE_NAMES: TableDefinition<&str, &str> = TableDefinition::new("node_names");
/// Replica id -> ReplicaRecord.
pub(crate) const REPLICAS: TableDefinition<&str, &str> = TableDefinition::new("replicas");
/// `<sequence, 20 digits>` -> EventRecord; `~seq` holds the next sequence.
pub(crate) const EVENTS: TableDefinition<&str, &str> = TableDefinition::new("events");
/// `node_id/replica_id` -> replica id (the agent's assignment set).
pub(crate) const NODE_REPLICAS: TableDefinition<&str, &str> = TableDefinition::new("node_replicas");
/// `namespace/name/replica_id` -> replica id.
pub(crate) const WORKLOAD_REPLICAS: TableDefinition<&str, &str> =
    TableDefinition::new("workload_replicas");

/// `admin/<name>` -> AdminRecord; `coordinator/<id>` -> RetiredCoordinator.
pub(crate) const ACCESS: TableDefinition<&str, &str> = TableDefinition::new("access");

/// `namespace/name` -> SecretRecord.
pub(crate) const SECRETS: TableDefinition<&str, &str> = TableDefinition::new("secrets");
/// `keyring` -> SecretKeyring.
pub(crate) const SECRET_KEYS: TableDefinition<&str, &str> = TableDefinition::new("secret_keys");
/// token id -> AccessTokenRecord.
pub(crate) const ACCESS_TOKENS: TableDefinition<&str, &str> = TableDefinition::new("access_tokens");
/// `<expiry ms, 20 digits>/<token id>` -> `null`: token records by expiry,
/// so expired ones can be dropped.
pub(crate) const ACCESS_TOKEN_EXPIRY: TableDefinition<&str, &str> =
    TableDefinition::new("access_token_expiry");
/// `<sequence, 20 digits>` -> AuditRecord; `~seq` holds the next sequence.
pub(crate) const AUDIT: TableDefinition<&str, &str> = TableDefinition::new("audit");
/// `<actor>\n<action>\n<allowed>\n<namespace>\n<secret>\n<refusal reason>` -> the `AUDIT` key
/// of the record that counts repeats of it in the current window.
pub(crate) const AUDIT_OPEN: TableDefinition<&str, &str> = TableDefinition::new("audit_open");

/// Tables copied into snapshots, in the order a snapshot lists them.
pub(crate) const DATA_TABLES: [TableDefinition<&str, &str>; 19] = [
    ACCESS,
    SECRETS,
    AUDIT_OPEN,
    SECRET_KEYS,
    ACCESS_TOKENS,
    ACCESS_TOKEN_EXPIRY,
    AUDIT,
    EVENTS,
    REPLICAS,
    NODE_REPLICAS,
    WORKLOAD_REPLICAS,
    CLUSTER,
    WORKLOADS,
    IDEMPOTENCY,
    IDEMPOTENCY_EXPIRY,
    IDENTITY,
    NODE_NAMES,
    JOIN_TOKENS,
    NODES,
];

/// Tables whose values are plain ids (indexes), not JSON records.
pub(crate) const INDEX_TABLES: [TableDefinition<&str, &str>; 4] =
    [NODE_NAMES, NODE_REPLICAS, WORKLOAD_REPLICAS, AUDIT_OPEN];

/// [`SYSTEM`] key of the last applied log id (JSON).
pub(crate) const KEY_APPLIED: &str = "last_applied";
/// [`SYSTEM`] key of the last applied membership (JSON).
pub(crate) const KEY_MEMBERSHIP: &str = "last_membership";
/// [`SYSTEM`] key of the storage format.
pub(crate) const KEY_FORMAT: &str = "format";
/// The storage format this release reads and writes.
pub(crate) const FORMAT: &str = "1";
/// [`CLUSTER`] key of the cluster record.
pub(crate) const CLUSTER_KEY: &str = "cluster";
/// [`IDENTITY`] key of the identity material.
pub(crate) const IDENTITY_KEY: &str = "identity";
/// [`SECRET_KEYS`] key of the sealed master keyring.
pub(crate) const KEYRING_KEY: &str = "keyring";

/// [`WORKLOADS`] key of a workload.
pub(crate) fn workload_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// [`SECRETS`] key of a secret.
pub(crate) fn secret_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// [`ACCESS`] key of an admin's record.
pub(crate) fn admin_key(name: &str) -> String {
    format!("admin/{name}")
}

/// [`ACCESS`] key of a retired coordinator's record.
pub(crate) fn retired_coordinator_key(node_id: u64) -> String {
    format!("coordinator/{node_id}")
}

/// The last applied log id and membership.
pub(crate) type Applied = (
    Option<LogId<NodeId>>,
    StoredMembership<NodeId, CoordinatorNode>,
);

/// Reads the last applied log id and membership from [`SYSTEM`].
pub(crate) fn read_applied(txn: &ReadTransaction) -> Result<Applied, ApplyError> {
    let system = txn.open_table(SYSTEM).at(SYSTEM, "open")?;
    let applied = match system.get(KEY_APPLIED).at(SYSTEM, "get")? {
        Some(v) => decode(SYSTEM, KEY_APPLIED, v.value())?,
        None => None,
    };
    let membership = match system.get(KEY_MEMBERSHIP).at(SYSTEM, "get")? {
        Some(v) => decode(SYSTEM, KEY_MEMBERSHIP, v.value())?,
        None => StoredMembership::default(),
    };
    Ok((applied, membership))
}

/// Decodes the record `value` stored under `key` in `table`.
pub(crate) fn decode<T: DeserializeOwned>(
    table: impl TableHandle,
    key: &str,
    value: &str,
) -> Result<T, ApplyError> {
    serde_json::from_str(value).map_err(|e| ApplyError::decode(&table, key, e))
}

/// Encodes `value`, to be stored under `key` in `table`.
pub(crate) fn encode<T: Serialize>(
    table: impl TableHandle,
    key: &str,
    value: &T,
) -> Result<String, ApplyError> {
    serde_json::to_string(value).map_err(|e| ApplyError::encode(&table, key, e))
}

/// The record under `key` in `def`, decoded.
pub(crate) fn get_json<T: DeserializeOwned>(
    txn: &WriteTransaction,
    def: TableDefinition<&str, &str>,
    key: &str,
) -> Result<Option<T>, ApplyError> {
    let table = txn.open_table(def).at(def, "open")?;
    let v = table.get(key).at(def, "get")?;
    v.map(|v| decode(def, key, v.value())).transpose()
}

/// Stores `value` under `key` in `def`, encoded.
pub(crate) fn put_json<T: Serialize>(
    txn: &WriteTransaction,
    def: TableDefinition<&str, &str>,
    key: &str,
    value: &T,
) -> Result<(), ApplyError> {
    let v = encode(def, key, value)?;
    let mut table = txn.open_table(def).at(def, "open")?;
    table.insert(key, v.as_str()).at(def, "insert")?;
    Ok(())
}

/// Stores the plain `value` (an id, or `null` in an expiry index) under
/// `key` in `def`.
pub(crate) fn put_raw(
    txn: &WriteTransaction,
    def: TableDefinition<&str, &str>,
    key: &str,
    value: &str,
) -> Result<(), ApplyError> {
    txn.open_table(def)
        .at(def, "open")?
        .insert(key, value)
        .at(def, "insert")?;
    Ok(())
}

/// Removes `key` from `def`; whether it was there.
pub(crate) fn remove(
    txn: &WriteTransaction,
    def: TableDefinition<&str, &str>,
    key: &str,
) -> Result<bool, ApplyError> {
    let removed = txn
        .open_table(def)
        .at(def, "open")?
        .remove(key)
        .at(def, "remove")?
        .is_some();
    Ok(removed)
}
