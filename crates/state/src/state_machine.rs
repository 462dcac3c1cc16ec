//! The state machine handed to openraft: the applied cluster state in
//! redb (opened and checked here), how applies are committed, and the
//! openraft storage traits over [`crate::apply`] and [`crate::snapshot`].

use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{Entry, OptionalSend, RaftSnapshotBuilder, StorageError};
use prometheus_client::metrics::histogram::Histogram;
use redb::{Database, ReadableDatabase, ReadableTable, TableHandle};

use crate::apply::apply_entries;
use crate::changes::Changes;
use crate::command::ProposalResult;
use crate::error::{io_err, ApplyError, RedbContext, StateError};
use crate::reader::StateReader;
use crate::snapshot::Snapshots;
use crate::tables::{
    read_applied, Applied, DATA_TABLES, FORMAT, INDEX_TABLES, KEY_APPLIED, KEY_FORMAT,
    KEY_MEMBERSHIP, SNAPSHOT, SYSTEM,
};
use crate::type_config::{CoordinatorNode, NodeId, TypeConfig};

type SErr = StorageError<NodeId>;

/// The state machine handed to openraft. Cheap to clone (shares the database).
#[derive(Clone)]
pub struct StateMachine {
    path: PathBuf,
    db: Arc<Database>,
    snapshots: Snapshots,
    apply_latency: Histogram,
    /// Time to build a snapshot, when someone watches it.
    snapshot_seconds: Option<Histogram>,
    /// When the last durable apply commit happened, and applies since.
    durable: Arc<std::sync::Mutex<(Instant, u64)>>,
    changes: Changes,
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

impl StateMachine {
    /// Records the time each snapshot this state machine builds takes.
    pub fn with_snapshot_timer(mut self, seconds: Histogram) -> Self {
        self.snapshot_seconds = Some(seconds);
        self
    }

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
        let db = Arc::new(db);
        let snapshots = Snapshots::open(path, db.clone())?;
        Ok(Self {
            path: path.to_path_buf(),
            db,
            snapshots,
            apply_latency,
            snapshot_seconds: None,
            durable: Arc::new(std::sync::Mutex::new((Instant::now(), 0))),
            changes: Changes::new(),
        })
    }

    /// A read-only handle on the same database.
    pub fn reader(&self) -> StateReader {
        StateReader::new(&self.path, self.db.clone(), self.changes.clone())
    }

    /// The database, for tests that apply commands directly.
    #[cfg(test)]
    pub(crate) fn db(&self) -> &Database {
        &self.db
    }

    /// Applies `entries` in one transaction, durably every so often (see
    /// [`DURABLE_APPLY_EVERY`]), then signals what changed.
    fn apply_committed(
        &self,
        entries: Vec<Entry<TypeConfig>>,
    ) -> Result<Vec<ProposalResult>, ApplyError> {
        let mut txn = self.db.begin_write().in_txn("begin")?;
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
                .in_txn("set the durability of")?;
        }
        let out = apply_entries(&txn, entries)?;
        txn.commit().in_txn("commit")?;
        self.changes.committed(&out);
        Ok(out)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, SErr> {
        let started = Instant::now();
        let built = self
            .snapshots
            .build()
            .map_err(|e| io_err!(write_state_machine, e));
        if let Some(h) = &self.snapshot_seconds {
            h.observe(started.elapsed().as_secs_f64());
        }
        built
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
            .apply_committed(entries)
            .map_err(|e| io_err!(write_state_machine, e))?;
        self.apply_latency.observe(started.elapsed().as_secs_f64());
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, SErr> {
        let file = self
            .snapshots
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
            .snapshots
            .install(meta, file)
            .map_err(|e| io_err!(write_state_machine, e));
        self.changes.replaced();
        r
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SErr> {
        self.snapshots
            .current()
            .map_err(|e| io_err!(read_state_machine, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
