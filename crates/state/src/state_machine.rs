//! The applied cluster state in redb, and its snapshots.
//!
//! Every data table maps a string key to a JSON value, so a snapshot is a
//! generic dump of [`DATA_TABLES`] and a new table only needs listing there.

use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, StorageError, StoredMembership,
};
use prometheus_client::metrics::histogram::Histogram;
use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition, TableHandle,
    WriteTransaction,
};
use serde::{Deserialize, Serialize};

use cloudless_types::{
    AccessTokenRecord, AuditLogEntry, AuditRecord, EventRecord, IdentityMaterial, JoinTokenRecord,
    NodePhase, NodeRecord, ReplicaRecord, ReplicaState, Resources, Revision, SecretKeyring,
    SecretRecord, Workload, REVISION_HISTORY,
};

use crate::command::{
    ClusterInfo, Command, NodeUpdate, Proposal, ProposalResult, Rejection, Request, Response,
};
use crate::error::{io_err, StateError};
use crate::snapshot_file::{Frame, SnapshotFileError, SnapshotReader, SnapshotWriter};
use crate::type_config::{CoordinatorNode, NodeId, TypeConfig};

/// Raft bookkeeping: last applied log id, membership, format.
const SYSTEM: TableDefinition<&str, &str> = TableDefinition::new("system");
/// The current snapshot: "meta" (JSON) and "file" (its name in the snapshot
/// directory).
const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");

/// The cluster record under key "cluster".
pub(crate) const CLUSTER: TableDefinition<&str, &str> = TableDefinition::new("cluster");
/// Workloads under "namespace/name".
const WORKLOADS: TableDefinition<&str, &str> = TableDefinition::new("workloads");
/// Idempotency records under the client's key.
const IDEMPOTENCY: TableDefinition<&str, &str> = TableDefinition::new("idempotency");
/// Expiry index of idempotency records: "{proposed_at_ms:020}/{key}".
const IDEMPOTENCY_EXPIRY: TableDefinition<&str, &str> = TableDefinition::new("idempotency_expiry");

/// Identity material under key "identity".
const IDENTITY: TableDefinition<&str, &str> = TableDefinition::new("identity");
/// Join tokens by id.
const JOIN_TOKENS: TableDefinition<&str, &str> = TableDefinition::new("join_tokens");
/// Enrolled nodes by id.
const NODES: TableDefinition<&str, &str> = TableDefinition::new("nodes");
/// Node ids by node name (names are unique).
const NODE_NAMES: TableDefinition<&str, &str> = TableDefinition::new("node_names");
/// Replica id -> ReplicaRecord.
const REPLICAS: TableDefinition<&str, &str> = TableDefinition::new("replicas");
/// `<sequence, 20 digits>` -> EventRecord; `~seq` holds the next sequence.
const EVENTS: TableDefinition<&str, &str> = TableDefinition::new("events");
/// The last event sequence a read looked at (`None`: no event yet).
pub type EventCursor = Option<u64>;
/// Events kept; older ones are dropped as new ones arrive.
pub const EVENT_RETENTION: u64 = 10_000;
const EVENT_SEQ_KEY: &str = "~seq";
/// `node_id/replica_id` -> replica id (the agent's assignment set).
const NODE_REPLICAS: TableDefinition<&str, &str> = TableDefinition::new("node_replicas");
/// `namespace/name/replica_id` -> replica id.
const WORKLOAD_REPLICAS: TableDefinition<&str, &str> = TableDefinition::new("workload_replicas");

/// `admin/<name>` -> AdminRecord; `coordinator/<id>` -> RetiredCoordinator.
const ACCESS: TableDefinition<&str, &str> = TableDefinition::new("access");

/// Tables copied into snapshots.
const DATA_TABLES: [TableDefinition<&str, &str>; 19] = [
    ACCESS,
    crate::secrets::SECRETS,
    crate::secrets::AUDIT_OPEN,
    crate::secrets::SECRET_KEYS,
    crate::secrets::ACCESS_TOKENS,
    crate::secrets::ACCESS_TOKEN_EXPIRY,
    crate::secrets::AUDIT,
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
const INDEX_TABLES: [TableDefinition<&str, &str>; 4] = [
    NODE_NAMES,
    NODE_REPLICAS,
    WORKLOAD_REPLICAS,
    crate::secrets::AUDIT_OPEN,
];

/// Directory of snapshot files, next to the state database.
pub const SNAPSHOT_DIR: &str = "snapshots";
const KEY_APPLIED: &str = "last_applied";
const KEY_MEMBERSHIP: &str = "last_membership";
const KEY_FORMAT: &str = "format";
const FORMAT: &str = "1";
pub(crate) const CLUSTER_KEY: &str = "cluster";

/// How long an idempotency key is remembered, by proposer time.
pub const IDEMPOTENCY_RETENTION_MS: i64 = 24 * 60 * 60 * 1000;

type SErr = StorageError<NodeId>;

#[derive(Serialize, Deserialize)]
struct IdempotencyRecord {
    command: Command,
    response: Response,
}

/// The state machine handed to openraft. Cheap to clone (shares the database).
#[derive(Clone)]
pub struct StateMachine {
    path: PathBuf,
    /// Where snapshot files live (`snapshots/` next to the database).
    snapshot_dir: PathBuf,
    db: Arc<Database>,
    snapshot_seq: Arc<AtomicU64>,
    apply_latency: Histogram,
    /// When the last durable apply commit happened, and applies since.
    durable: Arc<std::sync::Mutex<(Instant, u64)>>,
    /// Bumped after every commit that removed a node (and every snapshot install).
    removals: Arc<AtomicU64>,
    /// Bumped after every commit that changed a secret, the keyring or a
    /// token's revocation (and every snapshot install).
    secret_changes: Arc<AtomicU64>,
    /// Bumped after every commit that changed replicas, workloads or nodes
    /// (and every snapshot install): assignment watches and the reconciler
    /// wake on it.
    changes: Arc<tokio::sync::watch::Sender<u64>>,
}

/// Applies are committed without fsync (the Raft log is the durable record;
/// after a crash openraft re-applies from the last durable `last_applied`).
/// Every this many applies, or this often, one is committed durably to bound
/// the replay. Snapshot writes are always durable, so the log is only ever
/// purged behind durable state.
const DURABLE_APPLY_EVERY: u64 = 1000;
const DURABLE_APPLY_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

impl Debug for StateMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateMachine")
            .field("path", &self.path)
            .finish()
    }
}

/// Read-only access to the applied state, for API handlers and watches.
#[derive(Clone)]
pub struct StateReader {
    path: PathBuf,
    db: Arc<Database>,
    removals: Arc<AtomicU64>,
    secret_changes: Arc<AtomicU64>,
    changes: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Debug for StateReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateReader")
            .field("path", &self.path)
            .finish()
    }
}

fn workload_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

impl StateMachine {
    /// Opens or creates the state machine at `path`, checking the stored records decode.
    pub fn open(path: &Path, apply_latency: Histogram) -> Result<Self, StateError> {
        let db = Database::create(path).map_err(|source| StateError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let se = |e: &dyn std::fmt::Display| StateError::storage(path, e);
        let txn = db.begin_write().map_err(|e| se(&e))?;
        {
            let mut system = txn.open_table(SYSTEM).map_err(|e| se(&e))?;
            let found = system
                .get(KEY_FORMAT)
                .map_err(|e| se(&e))?
                .map(|v| v.value().to_owned());
            match found.as_deref() {
                None => {
                    system.insert(KEY_FORMAT, FORMAT).map_err(|e| se(&e))?;
                }
                Some(FORMAT) => {}
                Some(other) => {
                    return Err(StateError::Format {
                        path: path.to_path_buf(),
                        found: other.to_owned(),
                        supported: 1,
                    })
                }
            }
            for key in [KEY_APPLIED, KEY_MEMBERSHIP] {
                if let Some(v) = system.get(key).map_err(|e| se(&e))? {
                    if let Err(e) = serde_json::from_str::<serde_json::Value>(v.value()) {
                        return Err(StateError::Corrupt {
                            path: path.to_path_buf(),
                            what: format!("record {key:?}"),
                            detail: e.to_string(),
                        });
                    }
                }
            }
            {
                // Format 1 kept the whole snapshot as one value; it is
                // dropped (openraft builds a new one when it needs one).
                let mut snap = txn.open_table(SNAPSHOT).map_err(|e| se(&e))?;
                if snap.remove("data").map_err(|e| se(&e))?.is_some() {
                    snap.remove("meta").map_err(|e| se(&e))?;
                }
            }
            for def in DATA_TABLES {
                let table = txn.open_table(def).map_err(|e| se(&e))?;
                if INDEX_TABLES.iter().any(|t| t.name() == def.name()) {
                    // Plain keys to ids, not JSON records.
                    continue;
                }
                for item in table.iter().map_err(|e| se(&e))? {
                    let (k, v) = item.map_err(|e| se(&e))?;
                    if let Err(e) = serde_json::from_str::<serde_json::Value>(v.value()) {
                        return Err(StateError::Corrupt {
                            path: path.to_path_buf(),
                            what: format!("{} record {:?}", def.name(), k.value()),
                            detail: e.to_string(),
                        });
                    }
                }
            }
        }
        txn.commit().map_err(|e| se(&e))?;
        let snapshot_dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .join(SNAPSHOT_DIR);
        std::fs::create_dir_all(&snapshot_dir).map_err(|source| StateError::DataDir {
            path: snapshot_dir.clone(),
            source,
        })?;
        // Half-written snapshots of a previous run.
        if let Ok(dir) = std::fs::read_dir(&snapshot_dir) {
            for f in dir.flatten() {
                if f.file_name().to_string_lossy().ends_with(".tmp") {
                    let _ = std::fs::remove_file(f.path());
                }
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            snapshot_dir,
            db: Arc::new(db),
            snapshot_seq: Arc::new(AtomicU64::new(0)),
            apply_latency,
            durable: Arc::new(std::sync::Mutex::new((Instant::now(), 0))),
            removals: Arc::new(AtomicU64::new(0)),
            secret_changes: Arc::new(AtomicU64::new(0)),
            changes: Arc::new(tokio::sync::watch::Sender::new(0)),
        })
    }

    /// A read-only handle on the same database.
    pub fn reader(&self) -> StateReader {
        StateReader {
            path: self.path.clone(),
            db: self.db.clone(),
            removals: self.removals.clone(),
            secret_changes: self.secret_changes.clone(),
            changes: self.changes.clone(),
        }
    }

    fn apply_entries(
        &self,
        entries: Vec<Entry<TypeConfig>>,
    ) -> Result<Vec<ProposalResult>, String> {
        let mut txn = self.db.begin_write().map_err(|e| e.to_string())?;
        let durable = {
            let mut d = self
                .durable
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            d.1 += 1;
            if d.1 >= DURABLE_APPLY_EVERY || d.0.elapsed() >= DURABLE_APPLY_INTERVAL {
                *d = (Instant::now(), 0);
                true
            } else {
                false
            }
        };
        if !durable {
            txn.set_durability(redb::Durability::None)
                .map_err(|e| e.to_string())?;
        }
        let mut out = Vec::with_capacity(entries.len());
        let mut last_applied = None;
        let mut membership = None;
        for entry in entries {
            last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => out.push(ProposalResult {
                    responses: Vec::new(),
                }),
                EntryPayload::Normal(p) => out.push(apply_proposal(&txn, p)?),
                EntryPayload::Membership(m) => {
                    membership = Some(StoredMembership::new(Some(entry.log_id), m));
                    out.push(ProposalResult {
                        responses: Vec::new(),
                    });
                }
            }
        }
        {
            let mut system = txn.open_table(SYSTEM).map_err(|e| e.to_string())?;
            if let Some(la) = last_applied {
                let v = serde_json::to_string(&la).map_err(|e| e.to_string())?;
                system
                    .insert(KEY_APPLIED, v.as_str())
                    .map_err(|e| e.to_string())?;
            }
            if let Some(m) = membership {
                let v = serde_json::to_string(&m).map_err(|e| e.to_string())?;
                system
                    .insert(KEY_MEMBERSHIP, v.as_str())
                    .map_err(|e| e.to_string())?;
            }
        }
        txn.commit().map_err(|e| e.to_string())?;
        let removed = out
            .iter()
            .flat_map(|r| &r.responses)
            .any(|r| matches!(r, Response::NodeRemoved));
        if removed {
            self.removals.fetch_add(1, Ordering::Release);
        }
        let secrets_changed = out.iter().flat_map(|r| &r.responses).any(|r| {
            matches!(
                r,
                Response::SecretStored(_) | Response::Keyring(_) | Response::SecretChanged
            )
        });
        if secrets_changed {
            self.secret_changes.fetch_add(1, Ordering::Release);
        }
        let changed = out.iter().flat_map(|r| &r.responses).any(|r| {
            matches!(
                r,
                Response::NodeRemoved
                    | Response::Node(_)
                    | Response::NodesUpdated(_)
                    | Response::ReplicasChanged(_)
                    | Response::WorkloadStored { .. }
                    | Response::WorkloadDeleted
                    | Response::ConfigSet(_)
                    | Response::EventsRecorded(_)
            )
        });
        if changed {
            self.changes.send_modify(|v| *v += 1);
        }
        Ok(out)
    }

    fn build(&self) -> Result<Snapshot<TypeConfig>, String> {
        let txn = self.db.begin_read().map_err(|e| e.to_string())?;
        let (last_applied, last_membership) = read_applied(&txn)?;
        let seq = self.snapshot_seq.fetch_add(1, Ordering::Relaxed);
        let snapshot_id = match last_applied {
            Some(l) => format!("{}-{}-{seq}", l.leader_id, l.index),
            None => format!("none-{seq}"),
        };
        let tmp = self.snapshot_dir.join(format!("{snapshot_id}.snap.tmp"));
        let file = std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        let mut w =
            SnapshotWriter::new(std::io::BufWriter::new(file)).map_err(|e| e.to_string())?;
        for def in DATA_TABLES {
            let table = txn.open_table(def).map_err(|e| e.to_string())?;
            w.table(def.name()).map_err(|e| e.to_string())?;
            for item in table.iter().map_err(|e| e.to_string())? {
                let (k, v) = item.map_err(|e| e.to_string())?;
                w.row(k.value(), v.value()).map_err(|e| e.to_string())?;
            }
        }
        drop(txn);
        let file = w
            .finish()
            .map_err(|e| e.to_string())?
            .into_inner()
            .map_err(|e| format!("{}: {}", tmp.display(), e.error()))?;
        file.sync_all()
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        drop(file);
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership,
            snapshot_id,
        };
        // Opened before it is renamed: the handle stays valid even if a
        // newer snapshot replaces this one at once.
        let file = std::fs::File::open(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        self.commit_snapshot_file(&meta, &tmp, None)?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(tokio::fs::File::from_std(file)),
        })
    }

    /// Renames the finished snapshot file `tmp` into place and records it as
    /// the current snapshot (in `txn` when given, else in its own durable
    /// transaction) unless the current one is newer (a build racing an
    /// install); removes the other snapshot files.
    fn commit_snapshot_file(
        &self,
        meta: &SnapshotMeta<NodeId, CoordinatorNode>,
        tmp: &Path,
        txn: Option<WriteTransaction>,
    ) -> Result<(), String> {
        if !safe_snapshot_id(&meta.snapshot_id) {
            return Err(format!(
                "snapshot id {:?} cannot name a file",
                meta.snapshot_id
            ));
        }
        let name = format!("{}.snap", meta.snapshot_id);
        let path = self.snapshot_dir.join(&name);
        std::fs::rename(tmp, &path).map_err(|e| format!("{}: {e}", path.display()))?;
        if let Ok(dir) = std::fs::File::open(&self.snapshot_dir) {
            dir.sync_all()
                .map_err(|e| format!("{}: {e}", self.snapshot_dir.display()))?;
        }
        let txn = match txn {
            Some(t) => t,
            None => self.db.begin_write().map_err(|e| e.to_string())?,
        };
        let newer_kept = {
            let mut table = txn.open_table(SNAPSHOT).map_err(|e| e.to_string())?;
            let current = table.get("meta").map_err(|e| e.to_string())?.and_then(|v| {
                serde_json::from_slice::<SnapshotMeta<NodeId, CoordinatorNode>>(v.value()).ok()
            });
            let newer_kept = current.is_some_and(|c| c.last_log_id > meta.last_log_id);
            if !newer_kept {
                let m = serde_json::to_vec(meta).map_err(|e| e.to_string())?;
                table
                    .insert("meta", m.as_slice())
                    .map_err(|e| e.to_string())?;
                table
                    .insert("file", name.as_bytes())
                    .map_err(|e| e.to_string())?;
            }
            newer_kept
        };
        txn.commit().map_err(|e| e.to_string())?;
        if newer_kept {
            // Ours goes with the next snapshot's clean-up.
            return Ok(());
        }
        // Open handles (a snapshot being sent) keep their file until closed.
        if let Ok(dir) = std::fs::read_dir(&self.snapshot_dir) {
            for f in dir.flatten() {
                let n = f.file_name();
                let n = n.to_string_lossy();
                if n != name.as_str() && n.ends_with(".snap") {
                    if let Err(e) = std::fs::remove_file(f.path()) {
                        tracing::warn!(file = %f.path().display(), error = %e, "cannot remove an old snapshot");
                    }
                }
            }
        }
        Ok(())
    }

    /// A new anonymous file for a snapshot being received (unlinked at once,
    /// so an interrupted transfer leaves nothing behind).
    fn receiving_file(&self) -> Result<std::fs::File, String> {
        let seq = self.snapshot_seq.fetch_add(1, Ordering::Relaxed);
        let path = self
            .snapshot_dir
            .join(format!("receiving-{}-{seq}.tmp", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        std::fs::remove_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(file)
    }

    /// Replaces the state with the snapshot in `file`, read one row at a
    /// time into one write transaction, and keeps a copy as the current
    /// snapshot.
    fn install(
        &self,
        meta: &SnapshotMeta<NodeId, CoordinatorNode>,
        mut file: std::fs::File,
    ) -> Result<(), String> {
        use std::io::{Seek, SeekFrom};
        let bad = |e: SnapshotFileError| format!("snapshot {} is invalid: {e}", meta.snapshot_id);
        file.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
        let txn = self.db.begin_write().map_err(|e| e.to_string())?;
        for def in DATA_TABLES {
            let mut table = txn.open_table(def).map_err(|e| e.to_string())?;
            table.retain(|_, _| false).map_err(|e| e.to_string())?;
        }
        {
            let mut reader =
                SnapshotReader::new(std::io::BufReader::new(&mut file)).map_err(bad)?;
            let mut table: Option<redb::Table<&str, &str>> = None;
            while let Some(frame) = reader.next_frame().map_err(bad)? {
                match frame {
                    Frame::Table(name) => {
                        let Some(def) = DATA_TABLES.iter().find(|d| d.name() == name) else {
                            return Err(format!(
                                "snapshot {} has an unknown table {name:?}",
                                meta.snapshot_id
                            ));
                        };
                        drop(table.take());
                        table = Some(txn.open_table(*def).map_err(|e| e.to_string())?);
                    }
                    Frame::Row(k, v) => {
                        table
                            .as_mut()
                            .ok_or_else(|| bad(SnapshotFileError::RowOutsideTable))?
                            .insert(k.as_str(), v.as_str())
                            .map_err(|e| e.to_string())?;
                    }
                }
            }
        }
        {
            let mut system = txn.open_table(SYSTEM).map_err(|e| e.to_string())?;
            let la = serde_json::to_string(&meta.last_log_id).map_err(|e| e.to_string())?;
            system
                .insert(KEY_APPLIED, la.as_str())
                .map_err(|e| e.to_string())?;
            let m = serde_json::to_string(&meta.last_membership).map_err(|e| e.to_string())?;
            system
                .insert(KEY_MEMBERSHIP, m.as_str())
                .map_err(|e| e.to_string())?;
        }
        if !safe_snapshot_id(&meta.snapshot_id) {
            return Err(format!(
                "snapshot id {:?} cannot name a file",
                meta.snapshot_id
            ));
        }
        // Keep the received file as the current snapshot (copied, streamed).
        file.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
        let tmp = self
            .snapshot_dir
            .join(format!("{}.snap.tmp", meta.snapshot_id));
        let mut copy =
            std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::io::copy(&mut file, &mut copy).map_err(|e| format!("{}: {e}", tmp.display()))?;
        copy.sync_all()
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        drop(copy);
        self.commit_snapshot_file(meta, &tmp, Some(txn))?;
        Ok(())
    }

    fn current_snapshot(&self) -> Result<Option<Snapshot<TypeConfig>>, String> {
        let txn = self.db.begin_read().map_err(|e| e.to_string())?;
        let table = txn.open_table(SNAPSHOT).map_err(|e| e.to_string())?;
        let (Some(meta), Some(name)) = (
            table.get("meta").map_err(|e| e.to_string())?,
            table.get("file").map_err(|e| e.to_string())?,
        ) else {
            return Ok(None);
        };
        let meta: SnapshotMeta<NodeId, CoordinatorNode> = serde_json::from_slice(meta.value())
            .map_err(|e| format!("stored snapshot meta is corrupt: {e}"))?;
        let name = String::from_utf8_lossy(name.value()).into_owned();
        let path = self.snapshot_dir.join(&name);
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            // Gone (removed by hand, or a crash between rename and commit):
            // openraft builds a new one when it needs one.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(tokio::fs::File::from_std(file)),
        }))
    }
}

type Applied = (
    Option<LogId<NodeId>>,
    StoredMembership<NodeId, CoordinatorNode>,
);

fn read_applied(txn: &ReadTransaction) -> Result<Applied, String> {
    let system = txn.open_table(SYSTEM).map_err(|e| e.to_string())?;
    let applied = match system.get(KEY_APPLIED).map_err(|e| e.to_string())? {
        Some(v) => {
            serde_json::from_str(v.value()).map_err(|e| format!("last_applied is corrupt: {e}"))?
        }
        None => None,
    };
    let membership = match system.get(KEY_MEMBERSHIP).map_err(|e| e.to_string())? {
        Some(v) => serde_json::from_str(v.value())
            .map_err(|e| format!("last_membership is corrupt: {e}"))?,
        None => StoredMembership::default(),
    };
    Ok((applied, membership))
}

pub(crate) fn get_json<T: serde::de::DeserializeOwned>(
    txn: &WriteTransaction,
    def: TableDefinition<&str, &str>,
    key: &str,
) -> Result<Option<T>, String> {
    let table = txn.open_table(def).map_err(|e| e.to_string())?;
    let v = table.get(key).map_err(|e| e.to_string())?;
    match v {
        Some(v) => serde_json::from_str(v.value())
            .map(Some)
            .map_err(|e| format!("{} record {key:?} is corrupt: {e}", def.name())),
        None => Ok(None),
    }
}

pub(crate) fn put_json<T: Serialize>(
    txn: &WriteTransaction,
    def: TableDefinition<&str, &str>,
    key: &str,
    value: &T,
) -> Result<(), String> {
    let v = serde_json::to_string(value).map_err(|e| e.to_string())?;
    let mut table = txn.open_table(def).map_err(|e| e.to_string())?;
    table.insert(key, v.as_str()).map_err(|e| e.to_string())?;
    Ok(())
}

/// Folds one liveness/status update into a node record.
/// Values of index rows whose key starts with `prefix`.
fn index_ids(
    txn: &WriteTransaction,
    def: TableDefinition<&str, &str>,
    prefix: &str,
) -> Result<Vec<String>, String> {
    let table = txn.open_table(def).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for item in table.range::<&str>(prefix..).map_err(|e| e.to_string())? {
        let (k, v) = item.map_err(|e| e.to_string())?;
        if !k.value().starts_with(prefix) {
            break;
        }
        out.push(v.value().to_owned());
    }
    Ok(out)
}

/// Removes a replica and its index rows; false when it did not exist.
/// Appends `events` (an `at_ms` of 0 becomes `now_ms`) and drops the oldest
/// beyond [`EVENT_RETENTION`].
fn append_events(
    txn: &WriteTransaction,
    events: &[EventRecord],
    now_ms: i64,
) -> Result<(), String> {
    if events.is_empty() {
        return Ok(());
    }
    let mut table = txn.open_table(EVENTS).map_err(|e| e.to_string())?;
    let mut seq: u64 = match table.get(EVENT_SEQ_KEY).map_err(|e| e.to_string())? {
        Some(v) => serde_json::from_str(v.value()).map_err(|e| e.to_string())?,
        None => 0,
    };
    for ev in events {
        let mut ev = ev.clone();
        if ev.at_ms == 0 {
            ev.at_ms = now_ms;
        }
        let v = serde_json::to_string(&ev).map_err(|e| e.to_string())?;
        table
            .insert(format!("{seq:020}").as_str(), v.as_str())
            .map_err(|e| e.to_string())?;
        seq += 1;
    }
    table
        .insert(EVENT_SEQ_KEY, seq.to_string().as_str())
        .map_err(|e| e.to_string())?;
    // Retention: drop the oldest beyond the limit.
    if seq > EVENT_RETENTION {
        let cutoff = format!("{:020}", seq - EVENT_RETENTION);
        table
            .retain_in::<&str, _>(..cutoff.as_str(), |_, _| false)
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn remove_replica(txn: &WriteTransaction, id: &str) -> Result<bool, String> {
    let Some(r) = get_json::<ReplicaRecord>(txn, REPLICAS, id)? else {
        return Ok(false);
    };
    txn.open_table(REPLICAS)
        .map_err(|e| e.to_string())?
        .remove(id)
        .map_err(|e| e.to_string())?;
    txn.open_table(NODE_REPLICAS)
        .map_err(|e| e.to_string())?
        .remove(format!("{}/{id}", r.node_id).as_str())
        .map_err(|e| e.to_string())?;
    txn.open_table(WORKLOAD_REPLICAS)
        .map_err(|e| e.to_string())?
        .remove(format!("{}/{id}", r.workload_key()).as_str())
        .map_err(|e| e.to_string())?;
    Ok(true)
}

fn apply_node_update(n: &mut NodeRecord, u: &NodeUpdate, now_ms: i64) {
    if let Some(phase) = u.phase {
        if phase != n.phase {
            if n.phase == NodePhase::Ready {
                let stretch = now_ms.saturating_sub(n.phase_since_ms).max(0);
                n.ready_ms = n.ready_ms.saturating_add(stretch.unsigned_abs());
            }
            if phase == NodePhase::Down {
                n.down_count = n.down_count.saturating_add(1);
            }
            n.phase = phase;
            n.phase_since_ms = now_ms;
        }
    }
    n.last_heartbeat_ms = n.last_heartbeat_ms.max(u.last_heartbeat_ms);
    if let Some(r) = u.reliability {
        if r.is_finite() {
            n.reliability = r.clamp(0.0, 1.0);
        }
    }
    if let Some(status) = &u.status {
        n.status = status.clone();
        // The first report after enrollment sets the trusted capacity; later
        // growth needs an admin (see `cloudless_types::placement_capacity`).
        if n.trusted_capacity == Resources::default() {
            n.trusted_capacity = status.capacity;
        }
    }
}

/// Applies a batch in order. Deterministic: uses only the proposal and the state.
fn apply_proposal(txn: &WriteTransaction, p: Proposal) -> Result<ProposalResult, String> {
    if let Some(latest) = p.requests.iter().map(|r| r.proposed_at_ms).max() {
        expire_idempotency(txn, latest)?;
    }
    let responses = p
        .requests
        .into_iter()
        .map(|r| apply_request(txn, r))
        .collect::<Result<_, _>>()?;
    Ok(ProposalResult { responses })
}

/// Applies one request.
fn apply_request(txn: &WriteTransaction, req: Request) -> Result<Response, String> {
    if let Some(key) = &req.idempotency_key {
        if let Some(rec) = get_json::<IdempotencyRecord>(txn, IDEMPOTENCY, key)? {
            return Ok(if rec.command == req.command {
                rec.response
            } else {
                Response::Rejected(Rejection::IdempotencyKeyReused { key: key.clone() })
            });
        }
    }
    let response = apply_command(txn, &req.command, req.proposed_at_ms)?;
    // A rejected request changed nothing: its key is not remembered, so the
    // same key can carry the retry (after a conflict, say).
    if let (Some(key), false) = (
        req.idempotency_key,
        matches!(response, Response::Rejected(_)),
    ) {
        let rec = IdempotencyRecord {
            command: req.command,
            response: response.clone(),
        };
        put_json(txn, IDEMPOTENCY, &key, &rec)?;
        let mut exp = txn
            .open_table(IDEMPOTENCY_EXPIRY)
            .map_err(|e| e.to_string())?;
        let ek = format!("{:020}/{key}", req.proposed_at_ms.max(0));
        exp.insert(ek.as_str(), "null").map_err(|e| e.to_string())?;
    }
    Ok(response)
}

/// Forgets idempotency keys proposed more than the retention period before `now_ms`.
fn expire_idempotency(txn: &WriteTransaction, now_ms: i64) -> Result<(), String> {
    drop_indexed_before(
        txn,
        IDEMPOTENCY_EXPIRY,
        IDEMPOTENCY,
        now_ms - IDEMPOTENCY_RETENTION_MS,
    )
}

/// With `index` keyed `<ms, 20 digits>/<key>`: removes every index entry
/// before `cutoff_ms` and the `data` records they name.
pub(crate) fn drop_indexed_before(
    txn: &WriteTransaction,
    index: TableDefinition<&str, &str>,
    data: TableDefinition<&str, &str>,
    cutoff_ms: i64,
) -> Result<(), String> {
    let cutoff = format!("{:020}", cutoff_ms.max(0));
    let mut idx = txn.open_table(index).map_err(|e| e.to_string())?;
    let mut expired = Vec::new();
    for item in idx
        .range::<&str>(..cutoff.as_str())
        .map_err(|e| e.to_string())?
    {
        let (k, _) = item.map_err(|e| e.to_string())?;
        expired.push(k.value().to_owned());
    }
    if expired.is_empty() {
        return Ok(());
    }
    let mut records = txn.open_table(data).map_err(|e| e.to_string())?;
    for ek in expired {
        idx.remove(ek.as_str()).map_err(|e| e.to_string())?;
        if let Some((_, key)) = ek.split_once('/') {
            records.remove(key).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

fn apply_command(txn: &WriteTransaction, cmd: &Command, now_ms: i64) -> Result<Response, String> {
    Ok(match cmd {
        Command::InitCluster { cluster_id, config } => {
            if let Some(existing) = get_json::<ClusterInfo>(txn, CLUSTER, CLUSTER_KEY)? {
                return Ok(Response::Rejected(Rejection::AlreadyInitialized {
                    cluster_id: existing.cluster_id,
                }));
            }
            let info = ClusterInfo {
                cluster_id: cluster_id.clone(),
                created_at_ms: now_ms,
                config: config.clone(),
                revision: 1,
            };
            put_json(txn, CLUSTER, CLUSTER_KEY, &info)?;
            Response::ClusterInitialized(info)
        }
        Command::SetClusterConfig {
            config,
            expected_revision,
        } => {
            let Some(mut info) = get_json::<ClusterInfo>(txn, CLUSTER, CLUSTER_KEY)? else {
                return Ok(Response::Rejected(Rejection::NotInitialized));
            };
            if let Some(expected) = expected_revision {
                if *expected != info.revision {
                    return Ok(Response::Rejected(Rejection::RevisionMismatch {
                        expected: *expected,
                        actual: info.revision,
                    }));
                }
            }
            info.config = config.clone();
            info.revision += 1;
            put_json(txn, CLUSTER, CLUSTER_KEY, &info)?;
            Response::ConfigSet(info)
        }
        Command::PutWorkload { workload, cause } => {
            let key = workload_key(&workload.namespace, &workload.name);
            let existing = get_json::<Workload>(txn, WORKLOADS, &key)?;
            let created = existing.is_none();
            let revision = |template: u64| Revision {
                template,
                spec: workload.spec.clone(),
                at_ms: now_ms,
                cause: cause.clone(),
            };
            let stored = match existing {
                Some(old) if old.spec == workload.spec => old,
                Some(old) if old.spec.same_template(&workload.spec) => Workload {
                    spec: workload.spec.clone(),
                    generation: old.generation + 1,
                    updated_at_ms: now_ms,
                    ..old
                },
                Some(old) => {
                    let mut revisions = old.revisions.clone();
                    revisions.push(revision(old.template + 1));
                    let excess = revisions.len().saturating_sub(REVISION_HISTORY);
                    revisions.drain(..excess);
                    Workload {
                        template: old.template + 1,
                        spec: workload.spec.clone(),
                        generation: old.generation + 1,
                        updated_at_ms: now_ms,
                        revisions,
                        ..old
                    }
                }
                None => Workload {
                    generation: 1,
                    template: 1,
                    created_at_ms: now_ms,
                    updated_at_ms: now_ms,
                    revisions: vec![revision(1)],
                    ..workload.clone()
                },
            };
            put_json(txn, WORKLOADS, &key, &stored)?;
            Response::WorkloadStored {
                workload: stored,
                created,
            }
        }
        Command::ScaleWorkload {
            namespace,
            name,
            replicas,
        } => {
            let key = workload_key(namespace, name);
            let Some(mut w) = get_json::<Workload>(txn, WORKLOADS, &key)? else {
                return Ok(Response::Rejected(Rejection::WorkloadNotFound {
                    namespace: namespace.clone(),
                    name: name.clone(),
                }));
            };
            if w.spec.replicas != *replicas {
                w.spec.replicas = *replicas;
                w.generation += 1;
                w.updated_at_ms = now_ms;
                put_json(txn, WORKLOADS, &key, &w)?;
            }
            Response::WorkloadStored {
                workload: w,
                created: false,
            }
        }
        Command::InitIdentity { material } => {
            if get_json::<IdentityMaterial>(txn, IDENTITY, "identity")?.is_some() {
                return Ok(Response::Rejected(Rejection::IdentityAlreadyInitialized));
            }
            put_json(txn, IDENTITY, "identity", material)?;
            Response::IdentityInitialized
        }
        Command::CreateJoinToken { token } => {
            if get_json::<JoinTokenRecord>(txn, JOIN_TOKENS, &token.id)?.is_some() {
                return Ok(Response::Rejected(Rejection::JoinToken {
                    id: token.id.clone(),
                    problem: "already exists".into(),
                }));
            }
            put_json(txn, JOIN_TOKENS, &token.id, token)?;
            Response::JoinToken(token.clone())
        }
        Command::RevokeJoinToken { token_id } => {
            let Some(mut t) = get_json::<JoinTokenRecord>(txn, JOIN_TOKENS, token_id)? else {
                return Ok(Response::Rejected(Rejection::JoinToken {
                    id: token_id.clone(),
                    problem: "is unknown".into(),
                }));
            };
            t.revoked = true;
            put_json(txn, JOIN_TOKENS, token_id, &t)?;
            Response::JoinToken(t)
        }
        Command::EnrollNode { token_id, node } => {
            let refuse = |problem: String| {
                Ok(Response::Rejected(Rejection::JoinToken {
                    id: token_id.clone(),
                    problem,
                }))
            };
            let Some(mut t) = get_json::<JoinTokenRecord>(txn, JOIN_TOKENS, token_id)? else {
                return refuse("is unknown".into());
            };
            if t.revoked {
                return refuse("was revoked".into());
            }
            if now_ms >= t.expires_at_ms {
                return refuse("expired".into());
            }
            if t.uses >= t.max_uses {
                return refuse(format!("has been used {} of {} times", t.uses, t.max_uses));
            }
            let taken = {
                let names = txn.open_table(NODE_NAMES).map_err(|e| e.to_string())?;
                let by_name = names
                    .get(node.name.as_str())
                    .map_err(|e| e.to_string())?
                    .map(|v| v.value().to_owned());
                drop(names);
                match by_name {
                    Some(id) => Some(id),
                    None => get_json::<NodeRecord>(txn, NODES, &node.id)?.map(|n| n.id),
                }
            };
            if let Some(id) = taken {
                return Ok(Response::Rejected(Rejection::NodeNameTaken {
                    name: node.name.clone(),
                    id,
                }));
            }
            t.uses += 1;
            put_json(txn, JOIN_TOKENS, token_id, &t)?;
            let record = NodeRecord {
                enrolled_at_ms: now_ms,
                token_id: token_id.clone(),
                labels: t.labels.clone(),
                phase_since_ms: now_ms,
                ..node.clone()
            };
            put_json(txn, NODES, &record.id, &record)?;
            txn.open_table(NODE_NAMES)
                .map_err(|e| e.to_string())?
                .insert(record.name.as_str(), record.id.as_str())
                .map_err(|e| e.to_string())?;
            Response::Node(record)
        }
        Command::SetNodeFlags {
            node_id,
            cordoned,
            draining,
        } => {
            let Some(mut n) = get_json::<NodeRecord>(txn, NODES, node_id)? else {
                return Ok(Response::Rejected(Rejection::NodeNotFound {
                    id: node_id.clone(),
                }));
            };
            if let Some(c) = cordoned {
                n.cordoned = *c;
            }
            if let Some(d) = draining {
                n.draining = *d;
                if *d {
                    n.cordoned = true;
                }
            }
            put_json(txn, NODES, node_id, &n)?;
            Response::Node(n)
        }
        Command::SetNodeLabels {
            node_id,
            set,
            remove,
        } => {
            let Some(mut n) = get_json::<NodeRecord>(txn, NODES, node_id)? else {
                return Ok(Response::Rejected(Rejection::NodeNotFound {
                    id: node_id.clone(),
                }));
            };
            n.labels
                .extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
            for k in remove {
                n.labels.remove(k);
            }
            put_json(txn, NODES, node_id, &n)?;
            Response::Node(n)
        }
        Command::PutAdmin { record, actor } => {
            let revoked_before =
                |name: &str| -> Result<i64, String> {
                    Ok(get_json::<cloudless_types::AdminRecord>(
                        txn,
                        ACCESS,
                        &format!("admin/{name}"),
                    )?
                    .map_or(0, |r| r.revoked_before_s))
                };
            if let Some((name, issued_at_s)) = actor {
                if *issued_at_s <= revoked_before(name)? {
                    return Ok(Response::Rejected(Rejection::AdminRevoked {
                        name: name.clone(),
                    }));
                }
            }
            let mut r = record.clone();
            r.revoked_before_s = r.revoked_before_s.max(revoked_before(&r.name)?);
            if !r.revoked && r.issued_at_s <= r.revoked_before_s {
                // Issued from a read taken before a revocation committed.
                return Ok(Response::Rejected(Rejection::AdminRevoked { name: r.name }));
            }
            put_json(txn, ACCESS, &format!("admin/{}", r.name), &r)?;
            Response::Admin(r)
        }
        Command::RetireCoordinator { node_id } => {
            let r = cloudless_types::RetiredCoordinator {
                node_id: *node_id,
                at_ms: now_ms,
            };
            put_json(txn, ACCESS, &format!("coordinator/{node_id}"), &r)?;
            Response::CoordinatorRetired
        }
        Command::AcceptNodeCapacity { node_id } => {
            let Some(mut n) = get_json::<NodeRecord>(txn, NODES, node_id)? else {
                return Ok(Response::Rejected(Rejection::NodeNotFound {
                    id: node_id.clone(),
                }));
            };
            n.trusted_capacity = n.status.capacity;
            put_json(txn, NODES, node_id, &n)?;
            Response::Node(n)
        }
        Command::RemoveNode { node_id } => {
            let Some(n) = get_json::<NodeRecord>(txn, NODES, node_id)? else {
                return Ok(Response::Rejected(Rejection::NodeNotFound {
                    id: node_id.clone(),
                }));
            };
            txn.open_table(NODES)
                .map_err(|e| e.to_string())?
                .remove(node_id.as_str())
                .map_err(|e| e.to_string())?;
            txn.open_table(NODE_NAMES)
                .map_err(|e| e.to_string())?
                .remove(n.name.as_str())
                .map_err(|e| e.to_string())?;
            // Its replicas go in the same entry: nothing supervises them any
            // more, so they are neither counted as running, nor endpoints,
            // nor callers; the reconciler places replacements at once.
            let mut events = Vec::new();
            for id in index_ids(txn, NODE_REPLICAS, &format!("{node_id}/"))? {
                let Some(r) = get_json::<ReplicaRecord>(txn, REPLICAS, &id)? else {
                    continue;
                };
                remove_replica(txn, &id)?;
                events.push(EventRecord {
                    at_ms: now_ms,
                    kind: "Workload".into(),
                    namespace: r.namespace,
                    object: r.workload,
                    reason: "Lost".into(),
                    message: format!(
                        "replica {id} on {}: its node was removed from the cluster; replacing it",
                        n.name
                    ),
                });
            }
            append_events(txn, &events, now_ms)?;
            Response::NodeRemoved
        }
        Command::UpdateNodes { updates } => {
            let mut applied = 0u32;
            for u in updates {
                let Some(mut n) = get_json::<NodeRecord>(txn, NODES, &u.node_id)? else {
                    continue;
                };
                apply_node_update(&mut n, u, now_ms);
                put_json(txn, NODES, &u.node_id, &n)?;
                applied += 1;
            }
            Response::NodesUpdated(applied)
        }
        Command::RenewNodeCert {
            node_id,
            cert_not_after_ms,
        } => {
            let Some(mut n) = get_json::<NodeRecord>(txn, NODES, node_id)? else {
                return Ok(Response::Rejected(Rejection::NodeNotFound {
                    id: node_id.clone(),
                }));
            };
            n.cert_not_after_ms = *cert_not_after_ms;
            put_json(txn, NODES, node_id, &n)?;
            Response::Node(n)
        }
        Command::PlaceReplicas { replicas } => {
            let mut placed = 0u32;
            for r in replicas {
                let w = get_json::<Workload>(txn, WORKLOADS, &r.workload_key())?;
                let current = w.is_some_and(|w| w.template == r.template);
                if !current
                    || get_json::<NodeRecord>(txn, NODES, &r.node_id)?.is_none()
                    || get_json::<ReplicaRecord>(txn, REPLICAS, &r.id)?.is_some()
                {
                    continue;
                }
                let rec = ReplicaRecord {
                    created_at_ms: now_ms,
                    updated_at_ms: now_ms,
                    ..r.clone()
                };
                put_json(txn, REPLICAS, &r.id, &rec)?;
                txn.open_table(NODE_REPLICAS)
                    .map_err(|e| e.to_string())?
                    .insert(format!("{}/{}", r.node_id, r.id).as_str(), r.id.as_str())
                    .map_err(|e| e.to_string())?;
                txn.open_table(WORKLOAD_REPLICAS)
                    .map_err(|e| e.to_string())?
                    .insert(
                        format!("{}/{}", r.workload_key(), r.id).as_str(),
                        r.id.as_str(),
                    )
                    .map_err(|e| e.to_string())?;
                placed += 1;
            }
            Response::ReplicasChanged(placed)
        }
        Command::Secret(c) => crate::secrets::apply(txn, c, now_ms)?,
        Command::MarkReplicasUnknown { ids, unknown } => {
            let mut changed = 0u32;
            for id in ids {
                let Some(mut r) = get_json::<ReplicaRecord>(txn, REPLICAS, id)? else {
                    continue;
                };
                let at = if *unknown { now_ms.max(1) } else { 0 };
                if (r.disconnected_at_ms > 0) != *unknown {
                    r.disconnected_at_ms = at;
                    put_json(txn, REPLICAS, id, &r)?;
                    changed += 1;
                }
            }
            Response::ReplicasChanged(changed)
        }
        Command::RemoveReplicas { ids } => {
            let mut removed = 0u32;
            for id in ids {
                if remove_replica(txn, id)? {
                    removed += 1;
                }
            }
            Response::ReplicasChanged(removed)
        }
        Command::RecordEvents { events } => {
            append_events(txn, events, now_ms)?;
            Response::EventsRecorded(u32::try_from(events.len()).unwrap_or(u32::MAX))
        }
        Command::Reconcile(d) => {
            let mut changed = 0u32;
            for rb in &d.rollbacks {
                let key = workload_key(&rb.namespace, &rb.name);
                if let Some(w) = get_json::<Workload>(txn, WORKLOADS, &key)? {
                    if w.template == rb.from_template {
                        let back = Workload {
                            spec: rb.spec.clone(),
                            ..w
                        };
                        let put = Command::PutWorkload {
                            workload: back,
                            cause: "rollback".into(),
                        };
                        apply_command(txn, &put, now_ms)?;
                        changed = changed.saturating_add(1);
                    }
                }
            }
            let parts = [
                Command::MarkReplicasUnknown {
                    ids: d.mark_unknown.clone(),
                    unknown: true,
                },
                Command::RemoveReplicas {
                    ids: d.remove.clone(),
                },
                Command::PlaceReplicas {
                    replicas: d.place.clone(),
                },
                Command::MarkReplicasUnknown {
                    ids: d.clear_unknown.clone(),
                    unknown: false,
                },
            ];
            for part in &parts {
                if let Response::ReplicasChanged(n) = apply_command(txn, part, now_ms)? {
                    changed = changed.saturating_add(n);
                }
            }
            append_events(txn, &d.events, now_ms)?;
            // Reported as a replica change so that watchers look again.
            Response::ReplicasChanged(changed)
        }
        Command::UpdateReplicas { updates } => {
            let mut changed = 0u32;
            for u in updates {
                let Some(mut r) = get_json::<ReplicaRecord>(txn, REPLICAS, &u.id)? else {
                    continue;
                };
                if r.node_id != u.node_id {
                    continue;
                }
                if r.state != u.state {
                    r.updated_at_ms = now_ms;
                }
                if u.state == ReplicaState::Ready && r.ready_at_ms == 0 {
                    r.ready_at_ms = now_ms;
                }
                r.state = u.state;
                r.exit_code = u.exit_code;
                r.restarts = u.restarts;
                r.message.clone_from(&u.message);
                put_json(txn, REPLICAS, &u.id, &r)?;
                changed += 1;
            }
            Response::ReplicasChanged(changed)
        }
        Command::DeleteWorkload { namespace, name } => {
            let key = workload_key(namespace, name);
            let mut table = txn.open_table(WORKLOADS).map_err(|e| e.to_string())?;
            let removed = table
                .remove(key.as_str())
                .map_err(|e| e.to_string())?
                .is_some();
            drop(table);
            if removed {
                let ids = index_ids(txn, WORKLOAD_REPLICAS, &format!("{key}/"))?;
                for id in ids {
                    remove_replica(txn, &id)?;
                }
                Response::WorkloadDeleted
            } else {
                Response::Rejected(Rejection::WorkloadNotFound {
                    namespace: namespace.clone(),
                    name: name.clone(),
                })
            }
        }
    })
}

impl StateReader {
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
        self.get(
            crate::secrets::SECRETS,
            &crate::secrets::secret_key(namespace, name),
        )
    }

    /// Secrets in `namespace` (every namespace when `None`), by name.
    pub fn secrets(&self, namespace: Option<&str>) -> Result<Vec<SecretRecord>, StateError> {
        self.read(|txn| {
            let table = txn
                .open_table(crate::secrets::SECRETS)
                .map_err(|e| e.to_string())?;
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
        Ok(self
            .get(crate::secrets::SECRET_KEYS, crate::secrets::KEYRING_KEY)?
            .unwrap_or_default())
    }

    /// One access token's record.
    pub fn access_token(&self, id: &str) -> Result<Option<AccessTokenRecord>, StateError> {
        self.get(crate::secrets::ACCESS_TOKENS, id)
    }

    /// How many access token records are kept.
    pub fn access_token_count(&self) -> Result<u64, StateError> {
        self.read(|txn| {
            txn.open_table(crate::secrets::ACCESS_TOKENS)
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
            let Some(t) = get(crate::secrets::ACCESS_TOKENS, id)? else {
                return Ok((None, None));
            };
            let t: AccessTokenRecord = serde_json::from_str(&t).map_err(|e| e.to_string())?;
            let s = get(
                crate::secrets::SECRETS,
                &crate::secrets::secret_key(&t.namespace, &t.secret),
            )?
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
            let table = txn
                .open_table(crate::secrets::AUDIT)
                .map_err(|e| e.to_string())?;
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
        self.get(IDENTITY, "identity")
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
        self.removals.load(Ordering::Acquire)
    }

    /// A counter bumped after every commit that changed a secret, the
    /// master keyring or a token's revocation: records read at an equal
    /// count are still current (token use counts aside).
    pub fn secret_generation(&self) -> u64 {
        self.secret_changes.load(Ordering::Acquire)
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
        self.get(ACCESS, &format!("admin/{name}"))
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
                .get(format!("coordinator/{id}").as_str())
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

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, SErr> {
        self.build().map_err(|e| io_err!(write_state_machine, e))
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<Applied, SErr> {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| io_err!(read_state_machine, e))?;
        read_applied(&txn).map_err(|e| io_err!(read_state_machine, e))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<ProposalResult>, SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let started = Instant::now();
        let entries: Vec<_> = entries.into_iter().collect();
        let out = self
            .apply_entries(entries)
            .map_err(|e| io_err!(write_state_machine, e))?;
        self.apply_latency.observe(started.elapsed().as_secs_f64());
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, SErr> {
        let file = self
            .receiving_file()
            .map_err(|e| io_err!(write_state_machine, e))?;
        Ok(Box::new(tokio::fs::File::from_std(file)))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, CoordinatorNode>,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), SErr> {
        let file = snapshot.into_std().await;
        let r = self
            .install(meta, file)
            .map_err(|e| io_err!(write_state_machine, e));
        self.removals.fetch_add(1, Ordering::Release);
        self.secret_changes.fetch_add(1, Ordering::Release);
        self.changes.send_modify(|v| *v += 1);
        r
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SErr> {
        self.current_snapshot()
            .map_err(|e| io_err!(read_state_machine, e))
    }
}

/// Whether a snapshot id (from the leader) can name a file in the snapshot
/// directory: letters, digits, `-`, `_` and `.` only, and not `.` or `..`.
fn safe_snapshot_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ReplicaUpdate;
    use cloudless_types::{AdminRecord, NodeStatus};

    fn db() -> Database {
        Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .expect("in-memory db")
    }

    fn apply(db: &Database, cmd: Command, now: i64) -> Response {
        let txn = db.begin_write().expect("txn");
        let r = apply_command(&txn, &cmd, now).expect("apply");
        txn.commit().expect("commit");
        r
    }

    fn node(db: &Database, id: &str) -> NodeRecord {
        let txn = db.begin_write().expect("txn");
        get_json::<NodeRecord>(&txn, NODES, id)
            .expect("read")
            .expect("present")
    }

    fn update(id: &str, phase: Option<NodePhase>) -> NodeUpdate {
        NodeUpdate {
            node_id: id.into(),
            phase,
            last_heartbeat_ms: 0,
            reliability: None,
            status: None,
        }
    }

    #[test]
    fn a_reconcile_decision_applies_whole_and_its_rollback_yields_to_a_newer_spec() {
        use crate::command::{ReconcileDecision, Rollback};
        let dir = tempfile::tempdir().expect("tempdir");
        let sm =
            StateMachine::open(&dir.path().join("s.redb"), Histogram::new([1.0])).expect("open");
        let spec = |image: &str| cloudless_types::WorkloadSpec {
            image: image.into(),
            replicas: 1,
            ..Default::default()
        };
        let put = |image: &str| Command::PutWorkload {
            workload: Workload {
                namespace: "default".into(),
                name: "web".into(),
                spec: spec(image),
                generation: 0,
                created_at_ms: 0,
                updated_at_ms: 0,
                template: 0,
                revisions: Vec::new(),
            },
            cause: "apply".into(),
        };
        apply(&sm.db, put("web:1"), 0);
        apply(&sm.db, put("web:2"), 0);
        let current = || {
            sm.reader()
                .workload("default", "web")
                .expect("read")
                .expect("present")
        };
        let event = EventRecord {
            at_ms: 0,
            kind: "Workload".into(),
            namespace: "default".into(),
            object: "web".into(),
            reason: "RolledBack".into(),
            message: "back to web:1".into(),
        };
        let rollback = |from_template: u64| {
            Command::Reconcile(ReconcileDecision {
                rollbacks: vec![Rollback {
                    namespace: "default".into(),
                    name: "web".into(),
                    from_template,
                    spec: spec("web:1"),
                }],
                events: vec![event.clone()],
                ..ReconcileDecision::default()
            })
        };
        // Decided while template 1 was current: template 2 came since, and wins.
        apply(&sm.db, rollback(1), 5);
        assert_eq!(current().spec.image, "web:2");
        assert_eq!(current().template, 2);
        // Decided on template 2: rolled back, as a new template, with its event.
        let r = apply(&sm.db, rollback(2), 6);
        assert!(matches!(r, Response::ReplicasChanged(_)), "{r:?}");
        let w = current();
        assert_eq!((w.spec.image.as_str(), w.template), ("web:1", 3));
        assert_eq!(
            w.revisions.last().map(|r| r.cause.as_str()),
            Some("rollback")
        );
        let (events, _) = sm.reader().events(None, |_| true).expect("events");
        assert_eq!(events.len(), 2, "one event per applied decision");
        assert_eq!(events[1].1.at_ms, 6);
    }

    #[test]
    fn a_state_file_of_another_format_is_refused_by_name_and_left_as_it_was() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.redb");
        drop(StateMachine::open(&path, Histogram::new([1.0])).expect("create"));
        let set_format = |v: &str| {
            let db = Database::create(&path).expect("reopen raw");
            let txn = db.begin_write().expect("write");
            txn.open_table(SYSTEM)
                .expect("table")
                .insert(KEY_FORMAT, v)
                .expect("insert");
            txn.commit().expect("commit");
        };
        set_format("2");
        let err = StateMachine::open(&path, Histogram::new([1.0])).expect_err("format 2 opened");
        assert!(matches!(err, StateError::Format { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("state.redb") && text.contains("format 2") && text.contains("format 1"),
            "{text}"
        );
        // Refused, not rewritten: the file still says format 2.
        let db = Database::create(&path).expect("reopen raw");
        let txn = db.begin_read().expect("read");
        let stored = txn
            .open_table(SYSTEM)
            .expect("table")
            .get(KEY_FORMAT)
            .expect("get")
            .map(|v| v.value().to_owned());
        assert_eq!(stored.as_deref(), Some("2"));
    }

    #[test]
    fn events_are_numbered_filtered_and_kept_up_to_the_retention() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sm =
            StateMachine::open(&dir.path().join("s.redb"), Histogram::new([1.0])).expect("open");
        let ev = |i: u64| EventRecord {
            at_ms: 0,
            kind: "Workload".into(),
            namespace: "default".into(),
            object: if i.is_multiple_of(2) { "even" } else { "odd" }.into(),
            reason: "Scheduled".into(),
            message: format!("#{i}"),
        };
        let total = EVENT_RETENTION + 5;
        let r = apply(
            &sm.db,
            Command::RecordEvents {
                events: (0..total).map(ev).collect(),
            },
            42,
        );
        assert_eq!(
            r,
            Response::EventsRecorded(u32::try_from(total).expect("fits"))
        );
        let reader = sm.reader();
        let (all, last) = reader.events(None, |_| true).expect("read");
        assert_eq!(last, Some(total - 1));
        assert_eq!(all.len() as u64, EVENT_RETENTION);
        assert_eq!(all[0].1.message, "#5");
        assert_eq!(all[0].1.at_ms, 42, "stamped with the proposer's time");
        let (last_seq, _) = all[all.len() - 10];
        let (after, cursor) = reader
            .events(Some(last_seq), |e| e.object == "odd")
            .expect("read");
        assert_eq!(after.len(), 4, "9996..=10004, odd ones");
        assert_eq!(
            cursor,
            Some(total - 1),
            "the cursor passes filtered-out events"
        );
        assert!(after
            .iter()
            .all(|(seq, e)| *seq > last_seq && e.object == "odd"));
    }

    #[test]
    fn admin_revocations_only_grow_and_refuse_revoked_actors_and_raced_issues() {
        let db = db();
        let rec = |issued_at_s: i64, revoked_before_s: i64, revoked: bool| AdminRecord {
            name: "alice".into(),
            issued_at_s,
            not_after_s: issued_at_s + 100,
            issued_by: "root".into(),
            revoked_before_s,
            revoked,
        };
        let put = |record: AdminRecord, actor: (&str, i64)| Command::PutAdmin {
            record,
            actor: Some((actor.0.to_owned(), actor.1)),
        };
        // Every command survives the log encoding.
        for c in [
            put(rec(1, 2, true), ("root", 3)),
            Command::RetireCoordinator { node_id: 7 },
        ] {
            let bytes = postcard::to_allocvec(&c).expect("encode");
            assert_eq!(postcard::from_bytes::<Command>(&bytes).expect("decode"), c);
        }
        let revoked = |r: &Response| matches!(r, Response::Rejected(Rejection::AdminRevoked { name }) if name == "alice");
        assert!(matches!(
            apply(&db, put(rec(100, 0, false), ("root", 50)), 1),
            Response::Admin(_)
        ));
        // Revoked at 200.
        let r = apply(&db, put(rec(100, 200, true), ("root", 50)), 2);
        assert!(matches!(r, Response::Admin(ref a) if a.revoked_before_s == 200 && a.revoked));
        // Alice's own renewal, decided before the revocation, is refused.
        assert!(revoked(&apply(
            &db,
            put(rec(150, 0, false), ("alice", 100)),
            3
        )));
        // So is an issue dated under the revocation (it read the record first).
        assert!(revoked(&apply(
            &db,
            put(rec(180, 0, false), ("root", 50)),
            4
        )));
        // A revocation never moves back.
        let r = apply(&db, put(rec(100, 10, true), ("root", 50)), 5);
        assert!(matches!(r, Response::Admin(ref a) if a.revoked_before_s == 200));
        // Issued after it, alice is accepted again, and the watermark stays.
        let r = apply(&db, put(rec(201, 0, false), ("root", 50)), 6);
        assert!(
            matches!(r, Response::Admin(ref a) if a.revoked_before_s == 200 && !a.revoked),
            "{r:?}"
        );
        // A revoked actor cannot act on anyone.
        let bob = AdminRecord {
            name: "bob".into(),
            ..rec(300, 0, false)
        };
        assert!(revoked(&apply(&db, put(bob, ("alice", 100)), 7)));
        apply(&db, Command::RetireCoordinator { node_id: 7 }, 8);
        let txn = db.begin_write().expect("txn");
        assert!(
            get_json::<cloudless_types::RetiredCoordinator>(&txn, ACCESS, "coordinator/7")
                .expect("read")
                .is_some()
        );
    }

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
                        },
                        cause: "apply".into(),
                    },
                }],
            };
            let bytes = postcard::to_allocvec(&p).expect("encode");
            let back: Proposal = postcard::from_bytes(&bytes).expect("decode");
            assert_eq!(back, p);
        }
    }

    #[test]
    fn a_rejected_request_leaves_its_idempotency_key_for_the_retry() {
        use crate::command::SecretCommand as S;
        use cloudless_types::{AuditRecord, SecretCiphertext, SecretKeyVersion, SecretVersion};
        let dir = tempfile::tempdir().expect("tempdir");
        let sm =
            StateMachine::open(&dir.path().join("s.redb"), Histogram::new([1.0])).expect("open");
        let audit = |action: &str| AuditRecord {
            at_ms: 0,
            actor: "admin:t".into(),
            source: String::new(),
            action: action.into(),
            namespace: "prod".into(),
            secret: "cache".into(),
            token_id: String::new(),
            allowed: true,
            detail: String::new(),
        };
        let version = |v: u64| SecretVersion {
            version: v,
            ciphertext: SecretCiphertext {
                key_version: 1,
                dek_nonce: "a".into(),
                dek: "b".into(),
                nonce: "c".into(),
                data: "d".into(),
            },
            keys: vec!["PASSWORD".into()],
            size: 5,
            created_at_ms: 0,
        };
        apply(
            &sm.db,
            Command::Secret(S::InitKeyring {
                key: SecretKeyVersion {
                    version: 1,
                    nonce: "n".into(),
                    sealed: "s".into(),
                    created_at_ms: 0,
                    retired: false,
                },
            }),
            0,
        );
        // A rejected request leaves its idempotency key free for the retry;
        // an applied one answers its replay with the same response.
        let keyed = |v: u64| {
            let txn = sm.db.begin_write().expect("txn");
            let r = apply_request(
                &txn,
                Request {
                    idempotency_key: Some("retry-1".into()),
                    proposed_at_ms: 0,
                    command: Command::Secret(S::Put {
                        namespace: "prod".into(),
                        name: "cache".into(),
                        version: version(v),
                        create: true,
                        audiences: None,
                        immutable: false,
                        expires_at_ms: None,
                        audit: audit("create"),
                    }),
                },
            )
            .expect("apply");
            txn.commit().expect("commit");
            r
        };
        assert!(matches!(
            keyed(5),
            Response::Rejected(Rejection::SecretConflict(_))
        ));
        let stored = keyed(1);
        assert!(
            matches!(&stored, Response::SecretStored(r) if r.name == "cache"),
            "the retry under the same key was refused: {stored:?}"
        );
        assert_eq!(keyed(1), stored, "a replay is answered from the record");
        assert!(matches!(
            keyed(2),
            Response::Rejected(Rejection::IdempotencyKeyReused { .. })
        ));
    }

    #[test]
    fn secret_commands_count_uses_refuse_what_they_must_and_prune_old_audit_and_tokens() {
        use crate::command::SecretCommand as S;
        use cloudless_types::{AuditRecord, SecretCiphertext, SecretKeyVersion, SecretVersion};
        let dir = tempfile::tempdir().expect("tempdir");
        let sm =
            StateMachine::open(&dir.path().join("s.redb"), Histogram::new([1.0])).expect("open");
        let day = 86_400_000i64;
        let audit = |action: &str| AuditRecord {
            at_ms: 0,
            actor: "admin:t".into(),
            source: String::new(),
            action: action.into(),
            namespace: "prod".into(),
            secret: "db".into(),
            token_id: String::new(),
            allowed: true,
            detail: String::new(),
        };
        let key = |v: u32| SecretKeyVersion {
            version: v,
            nonce: "n".into(),
            sealed: "s".into(),
            created_at_ms: 0,
            retired: false,
        };
        let version = |v: u64, k: u32| SecretVersion {
            version: v,
            ciphertext: SecretCiphertext {
                key_version: k,
                dek_nonce: "a".into(),
                dek: "b".into(),
                nonce: "c".into(),
                data: "d".into(),
            },
            keys: vec!["PASSWORD".into()],
            size: 5,
            created_at_ms: 0,
        };
        let put = |v: u64, create: bool, immutable: bool, at: i64| {
            apply(
                &sm.db,
                Command::Secret(S::Put {
                    namespace: "prod".into(),
                    name: "db".into(),
                    version: version(v, 1),
                    create,
                    audiences: Some(vec!["api".into()]),
                    immutable,
                    expires_at_ms: None,
                    audit: audit(if create { "create" } else { "update" }),
                }),
                at,
            )
        };
        apply(&sm.db, Command::Secret(S::InitKeyring { key: key(1) }), 0);
        assert!(matches!(put(1, true, false, 0), Response::SecretStored(_)));
        assert!(matches!(
            put(1, true, false, 0),
            Response::Rejected(Rejection::SecretExists { .. })
        ));
        assert!(matches!(
            put(5, false, false, 0),
            Response::Rejected(Rejection::SecretConflict(_))
        ));
        assert!(matches!(put(2, false, false, 0), Response::SecretStored(_)));

        let token = |id: &str, uses: u32| cloudless_types::AccessTokenRecord {
            id: id.into(),
            namespace: "prod".into(),
            secret: "db".into(),
            audience: "api".into(),
            issued_to: "node:a".into(),
            issued_at_ms: 0,
            expires_at_ms: 10 * day,
            max_uses: uses,
            uses: 0,
            revoked: false,
        };
        apply(
            &sm.db,
            Command::Secret(S::MintToken {
                token: token("t1", 2),
                audit: audit("token-mint"),
            }),
            0,
        );
        let use_as = |actor: &str, at: i64| match apply(
            &sm.db,
            Command::Secret(S::UseToken {
                id: "t1".into(),
                actor: actor.into(),
                audit: audit("read"),
            }),
            at,
        ) {
            Response::SecretAccess(r) => r.map(|s| s.current().map_or(0, |v| v.version)),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            use_as("node:b", 1),
            Err("the token was issued to node:a, not node:b".into())
        );
        assert_eq!(use_as("node:a", 1), Ok(2), "the current version");
        assert_eq!(use_as("node:a", 1), Ok(2));
        assert_eq!(
            use_as("node:a", 1),
            Err("the token was used 2 of 2 times".into())
        );
        // Batched uses from the leader's ledger add up.
        apply(
            &sm.db,
            Command::Secret(S::MintToken {
                token: token("t2", 100),
                audit: audit("token-mint"),
            }),
            0,
        );
        apply(
            &sm.db,
            Command::Secret(S::RecordUses {
                uses: vec![("t2".into(), 40), ("gone".into(), 3)],
                audits: vec![audit("read")],
            }),
            2,
        );
        let reader = sm.reader();
        assert_eq!(
            reader.access_token("t2").expect("read").map(|t| t.uses),
            Some(40)
        );
        // Revocation and immutability.
        apply(
            &sm.db,
            Command::Secret(S::RevokeToken {
                id: "t2".into(),
                audit: audit("token-revoke"),
            }),
            3,
        );
        assert!(reader
            .access_token("t2")
            .expect("read")
            .is_some_and(|t| t.revoked));
        // The active key cannot be retired; the old one only once unused.
        apply(
            &sm.db,
            Command::Secret(S::Rotate {
                key: key(2),
                expected_active: 1,
                rewrapped: vec![],
                audit: audit("rotate"),
            }),
            4,
        );
        assert!(matches!(
            apply(
                &sm.db,
                Command::Secret(S::Retire {
                    version: 2,
                    audit: audit("retire")
                }),
                4
            ),
            Response::Rejected(Rejection::Keyring(_))
        ));
        assert!(matches!(
            apply(&sm.db, Command::Secret(S::Retire { version: 1, audit: audit("retire") }), 4),
            Response::Rejected(Rejection::Keyring(m)) if m.contains("still has a data key")
        ));
        // The data key moves to v2 through a rewrap part; then v1 retires.
        let secret = reader
            .secrets(None)
            .expect("read")
            .into_iter()
            .next()
            .expect("a secret");
        let keys: Vec<crate::RewrappedKey> = secret
            .versions
            .iter()
            .map(|v| crate::RewrappedKey {
                namespace: secret.namespace.clone(),
                name: secret.name.clone(),
                version: v.version,
                old_dek_nonce: v.ciphertext.dek_nonce.clone(),
                dek_nonce: "n2".into(),
                dek: "k2".into(),
            })
            .collect();
        assert!(matches!(
            apply(
                &sm.db,
                Command::Secret(S::RewrapKeys {
                    from_version: 1,
                    to_version: 9,
                    keys: keys.clone(),
                }),
                4
            ),
            Response::Rejected(Rejection::Keyring(m)) if m.contains("version 9 is unknown")
        ));
        // A key read before the secret was recreated is not applied to it.
        let stale: Vec<crate::RewrappedKey> = keys
            .iter()
            .cloned()
            .map(|mut k| {
                k.old_dek_nonce = "a nonce from a deleted secret".into();
                k
            })
            .collect();
        apply(
            &sm.db,
            Command::Secret(S::RewrapKeys {
                from_version: 1,
                to_version: 2,
                keys: stale,
            }),
            4,
        );
        assert!(reader
            .secret(&secret.namespace, &secret.name)
            .expect("read")
            .expect("secret")
            .versions
            .iter()
            .all(|v| v.ciphertext.key_version == 1));
        apply(
            &sm.db,
            Command::Secret(S::RewrapKeys {
                from_version: 1,
                to_version: 2,
                keys,
            }),
            4,
        );
        let moved = reader
            .secret(&secret.namespace, &secret.name)
            .expect("read")
            .expect("secret");
        assert!(moved
            .versions
            .iter()
            .all(|v| v.ciphertext.key_version == 2 && v.ciphertext.dek == "k2"));
        assert_eq!(
            moved
                .versions
                .iter()
                .map(|v| &v.ciphertext.data)
                .collect::<Vec<_>>(),
            secret
                .versions
                .iter()
                .map(|v| &v.ciphertext.data)
                .collect::<Vec<_>>(),
            "a rewrap changed the data"
        );
        assert!(!matches!(
            apply(
                &sm.db,
                Command::Secret(S::Retire {
                    version: 1,
                    audit: audit("retire")
                }),
                4
            ),
            Response::Rejected(_)
        ));
        // Stale rotation (expected_active moved) is refused.
        assert!(matches!(
            apply(
                &sm.db,
                Command::Secret(S::Rotate {
                    key: key(3),
                    expected_active: 1,
                    rewrapped: vec![],
                    audit: audit("rotate"),
                }),
                4,
            ),
            Response::Rejected(Rejection::SecretConflict(_))
        ));
        // Everything so far was audited, refusals included.
        let all = reader.audit(|_| true, 1000).expect("audit");
        assert!(all
            .iter()
            .any(|a| !a.record.allowed && a.record.detail.contains("issued to")));
        assert!(all
            .iter()
            .any(|a| !a.record.allowed && a.record.action == "create"));
        // Retention (default 90 days): an append 91 days later drops them.
        apply(
            &sm.db,
            Command::Secret(S::Audit {
                records: vec![audit("read")],
            }),
            91 * day,
        );
        let left = reader.audit(|_| true, 1000).expect("audit");
        assert_eq!(left.len(), 1, "{left:?}");
        assert_eq!(left[0].record.at_ms, 91 * day);

        // Token records go an hour after their expiry, on the next mint:
        // t1 and t2 expired at day 10; t3 (expiring at day 100) stays.
        let mint_at = |id: &str, expires: i64, at: i64| {
            let mut t = token(id, 1);
            t.expires_at_ms = expires;
            apply(
                &sm.db,
                Command::Secret(S::MintToken {
                    token: t,
                    audit: audit("token-mint"),
                }),
                at,
            );
        };
        mint_at(
            "t3",
            100 * day,
            10 * day + crate::secrets::TOKEN_RECORD_GRACE_MS - 1,
        );
        assert!(
            reader.access_token("t1").expect("read").is_some(),
            "still within the grace period"
        );
        mint_at(
            "t4",
            100 * day,
            10 * day + crate::secrets::TOKEN_RECORD_GRACE_MS + 1,
        );
        assert!(reader.access_token("t1").expect("read").is_none());
        assert!(reader.access_token("t2").expect("read").is_none());
        assert!(reader.access_token("t3").expect("read").is_some());
        // A use of a dropped token is refused, not counted against another.
        assert_eq!(
            use_as(
                "node:a",
                10 * day + 2 * crate::secrets::TOKEN_RECORD_GRACE_MS
            ),
            Err("the token is unknown to this cluster".into())
        );
    }

    #[test]
    fn template_changes_make_revisions_and_the_history_is_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sm =
            StateMachine::open(&dir.path().join("s.redb"), Histogram::new([1.0])).expect("open");
        let put = |image: &str, replicas: u32, cause: &str, at: i64| {
            let w = Workload {
                namespace: "default".into(),
                name: "web".into(),
                spec: cloudless_types::WorkloadSpec {
                    image: image.into(),
                    replicas,
                    ..Default::default()
                },
                generation: 0,
                created_at_ms: 0,
                updated_at_ms: 0,
                template: 0,
                revisions: Vec::new(),
            };
            match apply(
                &sm.db,
                Command::PutWorkload {
                    workload: w,
                    cause: cause.into(),
                },
                at,
            ) {
                Response::WorkloadStored { workload, .. } => workload,
                other => panic!("{other:?}"),
            }
        };
        let w = put("busybox:1", 2, "apply", 10);
        assert_eq!((w.template, w.revisions.len()), (1, 1));
        // The replica count alone is not a new revision.
        let w = put("busybox:1", 5, "apply", 20);
        assert_eq!((w.template, w.revisions.len()), (1, 1));
        let w = put("busybox:2", 5, "apply", 30);
        let w2 = put("busybox:1", 5, "undo to 1", 40);
        assert_eq!(w.template, 2);
        assert_eq!(w2.template, 3, "an undo is a new revision");
        let history: Vec<(u64, &str, &str, i64)> = w2
            .revisions
            .iter()
            .map(|r| (r.template, r.spec.image.as_str(), r.cause.as_str(), r.at_ms))
            .collect();
        assert_eq!(
            history,
            [
                (1, "busybox:1", "apply", 10),
                (2, "busybox:2", "apply", 30),
                (3, "busybox:1", "undo to 1", 40)
            ]
        );
        let mut last = w2;
        for i in 0..12 {
            last = put(&format!("busybox:{}", 10 + i), 5, "apply", 50 + i);
        }
        assert_eq!(last.revisions.len(), REVISION_HISTORY);
        assert_eq!(last.revisions.last().map(|r| r.template), Some(15));
        assert_eq!(last.revisions[0].template, 6, "the oldest are dropped");
    }

    #[test]
    fn replicas_are_indexed_survive_a_reopen_and_go_with_their_workload() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.redb");
        let hist = || Histogram::new([1.0]);
        let sm = StateMachine::open(&path, hist()).expect("open");
        let token = JoinTokenRecord {
            id: "t1".into(),
            created_at_ms: 0,
            expires_at_ms: 1_000_000,
            max_uses: 5,
            uses: 0,
            revoked: false,
            labels: Default::default(),
        };
        apply(&sm.db, Command::CreateJoinToken { token }, 0);
        apply(
            &sm.db,
            Command::EnrollNode {
                token_id: "t1".into(),
                node: NodeRecord::new("n1".into(), "alpha".into(), "t1".into(), 0),
            },
            0,
        );
        let spec = cloudless_types::WorkloadSpec {
            image: "busybox".into(),
            replicas: 1,
            ..Default::default()
        };
        let w = Workload {
            namespace: "default".into(),
            name: "web".into(),
            spec: spec.clone(),
            generation: 0,
            created_at_ms: 0,
            updated_at_ms: 0,
            template: 0,
            revisions: Vec::new(),
        };
        apply(
            &sm.db,
            Command::PutWorkload {
                workload: w,
                cause: "apply".into(),
            },
            0,
        );
        let replica = |id: &str, node: &str, template: u64| ReplicaRecord {
            id: id.into(),
            namespace: "default".into(),
            workload: "web".into(),
            template,
            spec: spec.clone(),
            node_id: node.into(),
            state: ReplicaState::Pending,
            exit_code: None,
            restarts: 0,
            message: String::new(),
            created_at_ms: 0,
            updated_at_ms: 0,
            ready_at_ms: 0,
            disconnected_at_ms: 0,
            score: 0.0,
        };
        // A stale template and an unknown node are skipped.
        let r = apply(
            &sm.db,
            Command::PlaceReplicas {
                replicas: vec![
                    replica("r1", "n1", 1),
                    replica("r2", "n1", 7),
                    replica("r3", "nx", 1),
                ],
            },
            5,
        );
        assert_eq!(r, Response::ReplicasChanged(1));
        // A report from another node is ignored.
        let update = |node: &str| Command::UpdateReplicas {
            updates: vec![ReplicaUpdate {
                id: "r1".into(),
                node_id: node.into(),
                state: ReplicaState::Ready,
                exit_code: None,
                restarts: 0,
                message: String::new(),
            }],
        };
        assert_eq!(apply(&sm.db, update("n2"), 6), Response::ReplicasChanged(0));
        assert_eq!(apply(&sm.db, update("n1"), 6), Response::ReplicasChanged(1));
        drop(sm);

        let sm = StateMachine::open(&path, hist()).expect("reopen with replicas");
        let reader = sm.reader();
        let on_node = reader.node_replicas("n1").expect("read");
        assert_eq!(on_node.len(), 1);
        assert_eq!(
            (on_node[0].state, on_node[0].ready_at_ms),
            (ReplicaState::Ready, 6)
        );
        assert_eq!(
            reader
                .workload_replicas("default", "web")
                .expect("read")
                .len(),
            1
        );
        apply(
            &sm.db,
            Command::DeleteWorkload {
                namespace: "default".into(),
                name: "web".into(),
            },
            7,
        );
        assert!(reader.replicas().expect("read").is_empty());
        assert!(reader.node_replicas("n1").expect("read").is_empty());
    }

    #[test]
    fn node_names_are_unique_phases_accumulate_uptime_and_removal_frees_the_name() {
        let db = db();
        let token = JoinTokenRecord {
            id: "t1".into(),
            created_at_ms: 0,
            expires_at_ms: 1_000_000,
            max_uses: 5,
            uses: 0,
            revoked: false,
            labels: [("zone".to_owned(), "a".to_owned())].into(),
        };
        apply(&db, Command::CreateJoinToken { token }, 0);
        let enroll = |id: &str, name: &str| Command::EnrollNode {
            token_id: "t1".into(),
            node: NodeRecord::new(id.into(), name.into(), "t1".into(), 0),
        };
        assert!(matches!(
            apply(&db, enroll("n1", "alpha"), 1000),
            Response::Node(_)
        ));
        assert!(matches!(
            apply(&db, enroll("n2", "alpha"), 1000),
            Response::Rejected(Rejection::NodeNameTaken { .. })
        ));
        let n = node(&db, "n1");
        assert_eq!((n.phase, n.phase_since_ms), (NodePhase::Pending, 1000));
        assert_eq!(n.labels.get("zone").map(String::as_str), Some("a"));

        // Ready at 2 s, Down at 12 s (10 s of uptime), Ready again at 20 s.
        let status = NodeStatus {
            power_source: "battery".into(),
            battery_percent: 50,
            ..NodeStatus::default()
        };
        let mut ready = update("n1", Some(NodePhase::Ready));
        ready.status = Some(status.clone());
        let gone = update("ghost", Some(NodePhase::Down));
        assert_eq!(
            apply(
                &db,
                Command::UpdateNodes {
                    updates: vec![ready, gone]
                },
                2000
            ),
            Response::NodesUpdated(1),
            "an update for a node that does not exist must be skipped"
        );
        apply(
            &db,
            Command::UpdateNodes {
                updates: vec![update("n1", Some(NodePhase::Down))],
            },
            12_000,
        );
        let mut again = update("n1", Some(NodePhase::Ready));
        again.reliability = Some(f64::NAN);
        apply(
            &db,
            Command::UpdateNodes {
                updates: vec![again],
            },
            20_000,
        );
        let n = node(&db, "n1");
        assert_eq!(n.phase, NodePhase::Ready);
        assert_eq!(n.phase_since_ms, 20_000);
        assert_eq!(n.ready_ms, 10_000);
        assert_eq!(n.down_count, 1);
        assert_eq!(n.status, status);
        assert!(n.reliability.is_finite(), "NaN reliability stored");

        apply(
            &db,
            Command::RemoveNode {
                node_id: "n1".into(),
            },
            30_000,
        );
        assert!(matches!(
            apply(&db, enroll("n3", "alpha"), 31_000),
            Response::Node(_)
        ));
    }

    #[test]
    fn only_admin_commands_change_placement_labels_and_trusted_capacity() {
        let db = db();
        let token = JoinTokenRecord {
            id: "t1".into(),
            created_at_ms: 0,
            expires_at_ms: 1_000_000,
            max_uses: 1,
            uses: 0,
            revoked: false,
            labels: [("zone".to_owned(), "a".to_owned())].into(),
        };
        apply(&db, Command::CreateJoinToken { token }, 0);
        apply(
            &db,
            Command::EnrollNode {
                token_id: "t1".into(),
                node: NodeRecord::new("n1".into(), "alpha".into(), "t1".into(), 0),
            },
            1000,
        );
        let report = |cpu_millis: u64, label: &str| {
            let mut u = update("n1", Some(NodePhase::Ready));
            u.status = Some(NodeStatus {
                capacity: Resources {
                    cpu_millis,
                    ..Resources::default()
                },
                reported_labels: [(label.to_owned(), "secure".to_owned())].into(),
                ..NodeStatus::default()
            });
            Command::UpdateNodes { updates: vec![u] }
        };
        apply(&db, report(4000, "tier"), 2000);
        let n = node(&db, "n1");
        assert_eq!(n.labels, [("zone".to_owned(), "a".to_owned())].into());
        assert_eq!(
            n.status.reported_labels.get("tier").map(String::as_str),
            Some("secure")
        );
        assert_eq!(
            n.trusted_capacity.cpu_millis, 4000,
            "the first report is trusted"
        );

        apply(&db, report(400_000, "tier"), 3000);
        let n = node(&db, "n1");
        assert_eq!(n.trusted_capacity.cpu_millis, 4000, "a later report is not");
        assert_eq!(n.placement_capacity().0.cpu_millis, 4000);

        let r = apply(
            &db,
            Command::AcceptNodeCapacity {
                node_id: "n1".into(),
            },
            4000,
        );
        assert!(matches!(r, Response::Node(n) if n.trusted_capacity.cpu_millis == 400_000));

        let r = apply(
            &db,
            Command::SetNodeLabels {
                node_id: "n1".into(),
                set: [("tier".to_owned(), "secure".to_owned())].into(),
                remove: vec!["zone".into(), "absent".into()],
            },
            5000,
        );
        let Response::Node(n) = r else {
            panic!("labels not set: {r:?}")
        };
        assert_eq!(n.labels, [("tier".to_owned(), "secure".to_owned())].into());
        assert!(matches!(
            apply(
                &db,
                Command::SetNodeLabels {
                    node_id: "ghost".into(),
                    set: std::collections::BTreeMap::new(),
                    remove: Vec::new(),
                },
                6000,
            ),
            Response::Rejected(Rejection::NodeNotFound { .. })
        ));
    }

    #[test]
    fn removing_a_node_removes_its_replicas_in_the_same_entry_with_an_event_each() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sm = StateMachine::open(&dir.path().join("state.redb"), Histogram::new([1.0]))
            .expect("open");
        let token = JoinTokenRecord {
            id: "t1".into(),
            created_at_ms: 0,
            expires_at_ms: 1_000_000,
            max_uses: 5,
            uses: 0,
            revoked: false,
            labels: Default::default(),
        };
        apply(&sm.db, Command::CreateJoinToken { token }, 0);
        for (id, name) in [("n1", "alpha"), ("n2", "beta")] {
            apply(
                &sm.db,
                Command::EnrollNode {
                    token_id: "t1".into(),
                    node: NodeRecord::new(id.into(), name.into(), "t1".into(), 0),
                },
                0,
            );
        }
        let spec = cloudless_types::WorkloadSpec {
            image: "busybox".into(),
            replicas: 3,
            ..Default::default()
        };
        let w = Workload {
            namespace: "default".into(),
            name: "web".into(),
            spec: spec.clone(),
            generation: 0,
            created_at_ms: 0,
            updated_at_ms: 0,
            template: 0,
            revisions: Vec::new(),
        };
        apply(
            &sm.db,
            Command::PutWorkload {
                workload: w,
                cause: "apply".into(),
            },
            0,
        );
        let template = sm.reader().workloads(None).expect("read")[0].template;
        let replica = |id: &str, node: &str| ReplicaRecord {
            id: id.into(),
            namespace: "default".into(),
            workload: "web".into(),
            template,
            spec: spec.clone(),
            node_id: node.into(),
            state: ReplicaState::Ready,
            exit_code: None,
            restarts: 0,
            message: String::new(),
            created_at_ms: 0,
            updated_at_ms: 0,
            ready_at_ms: 0,
            disconnected_at_ms: 0,
            score: 0.0,
        };
        let placed = apply(
            &sm.db,
            Command::PlaceReplicas {
                replicas: vec![
                    replica("r1", "n1"),
                    replica("r2", "n1"),
                    replica("r3", "n2"),
                ],
            },
            5,
        );
        assert_eq!(placed, Response::ReplicasChanged(3));
        let reader = sm.reader();
        let (_, events_before) = reader.events(None, |_| true).expect("events");

        let r = apply(
            &sm.db,
            Command::RemoveNode {
                node_id: "n1".into(),
            },
            10,
        );
        assert_eq!(r, Response::NodeRemoved);

        assert!(reader.node_replicas("n1").expect("read").is_empty());
        let left: Vec<String> = reader
            .replicas()
            .expect("read")
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(
            left,
            vec!["r3".to_owned()],
            "only the other node's replica is left"
        );
        assert_eq!(
            reader
                .workload_replicas("default", "web")
                .expect("read")
                .len(),
            1
        );
        let (events, _) = reader.events(events_before, |_| true).expect("events");
        let lost: Vec<&str> = events
            .iter()
            .filter(|(_, e)| e.reason == "Lost")
            .map(|(_, e)| e.message.as_str())
            .collect();
        assert_eq!(lost.len(), 2, "{events:?}");
        assert!(lost
            .iter()
            .all(|m| m.contains("alpha") && m.contains("removed")));
    }

    /// A record that does not decode is a storage fault, not a refusal:
    /// answering `Rejected` (and auditing it) from one coordinator's
    /// unreadable table would make its state differ from its peers'.
    #[test]
    fn retiring_a_key_over_an_undecodable_secret_is_an_error_not_a_refusal() {
        use crate::command::SecretCommand as S;
        use cloudless_types::{AuditRecord, SecretKeyVersion};
        let db = db();
        let key = |v: u32| SecretKeyVersion {
            version: v,
            nonce: "n".into(),
            sealed: "s".into(),
            created_at_ms: 0,
            retired: false,
        };
        let audit = AuditRecord {
            at_ms: 0,
            actor: "admin:t".into(),
            source: String::new(),
            action: "retire".into(),
            namespace: String::new(),
            secret: String::new(),
            token_id: String::new(),
            allowed: true,
            detail: String::new(),
        };
        apply(&db, Command::Secret(S::InitKeyring { key: key(1) }), 0);
        apply(
            &db,
            Command::Secret(S::Rotate {
                key: key(2),
                expected_active: 1,
                rewrapped: vec![],
                audit: audit.clone(),
            }),
            0,
        );
        let txn = db.begin_write().expect("txn");
        txn.open_table(crate::secrets::SECRETS)
            .expect("table")
            .insert("prod/db", r#"{"namespace":"prod"}"#)
            .expect("insert");
        let r = apply_command(&txn, &Command::Secret(S::Retire { version: 1, audit }), 0);
        let err = r.expect_err("an undecodable secret was answered as a refusal");
        assert!(err.contains("secrets") && err.contains("prod/db"), "{err}");
    }

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
        let txn = sm.db.begin_write().expect("txn");
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
            &sm.db,
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
