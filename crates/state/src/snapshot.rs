//! Snapshots of the applied state: built from the data tables into a file,
//! installed from a file received from the leader, and the current one kept
//! in the snapshot directory next to the state database.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::{Snapshot, SnapshotMeta};
use redb::{Database, ReadableDatabase, ReadableTable, TableHandle, WriteTransaction};

use crate::error::StateError;
use crate::snapshot_file::{Frame, SnapshotFileError, SnapshotReader, SnapshotWriter};
use crate::tables::{read_applied, DATA_TABLES, KEY_APPLIED, KEY_MEMBERSHIP, SNAPSHOT, SYSTEM};
use crate::type_config::{CoordinatorNode, NodeId, TypeConfig};

/// Directory of snapshot files, next to the state database.
pub const SNAPSHOT_DIR: &str = "snapshots";

/// The snapshots of one state database. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Snapshots {
    /// Where snapshot files live (`snapshots/` next to the database).
    dir: PathBuf,
    db: Arc<Database>,
    /// Numbers snapshot and receiving files made by this process.
    seq: Arc<AtomicU64>,
}

impl Snapshots {
    /// The snapshots of the database `db` at `path`: makes the directory and
    /// removes what a previous run left half-written.
    pub(crate) fn open(path: &Path, db: Arc<Database>) -> Result<Self, StateError> {
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .join(SNAPSHOT_DIR);
        std::fs::create_dir_all(&dir).map_err(|source| StateError::DataDir {
            path: dir.clone(),
            source,
        })?;
        // Half-written snapshots of a previous run.
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for f in entries.flatten() {
                if f.file_name().to_string_lossy().ends_with(".tmp") {
                    let _ = std::fs::remove_file(f.path());
                }
            }
        }
        Ok(Self {
            dir,
            db,
            seq: Arc::new(AtomicU64::new(0)),
        })
    }

    pub(crate) fn build(&self) -> Result<Snapshot<TypeConfig>, String> {
        let txn = self.db.begin_read().map_err(|e| e.to_string())?;
        let (last_applied, last_membership) = read_applied(&txn).map_err(|e| e.to_string())?;
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let snapshot_id = match last_applied {
            Some(l) => format!("{}-{}-{seq}", l.leader_id, l.index),
            None => format!("none-{seq}"),
        };
        let tmp = self.dir.join(format!("{snapshot_id}.snap.tmp"));
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
        self.commit_file(&meta, &tmp, None)?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(tokio::fs::File::from_std(file)),
        })
    }

    /// Renames the finished snapshot file `tmp` into place and records it as
    /// the current snapshot (in `txn` when given, else in its own durable
    /// transaction) unless the current one is newer (a build racing an
    /// install); removes the other snapshot files.
    fn commit_file(
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
        let path = self.dir.join(&name);
        std::fs::rename(tmp, &path).map_err(|e| format!("{}: {e}", path.display()))?;
        if let Ok(dir) = std::fs::File::open(&self.dir) {
            dir.sync_all()
                .map_err(|e| format!("{}: {e}", self.dir.display()))?;
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
        if let Ok(dir) = std::fs::read_dir(&self.dir) {
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
    pub(crate) fn receiving_file(&self) -> Result<std::fs::File, String> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let path = self
            .dir
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
    pub(crate) fn install(
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
        let tmp = self.dir.join(format!("{}.snap.tmp", meta.snapshot_id));
        let mut copy =
            std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::io::copy(&mut file, &mut copy).map_err(|e| format!("{}: {e}", tmp.display()))?;
        copy.sync_all()
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        drop(copy);
        self.commit_file(meta, &tmp, Some(txn))?;
        Ok(())
    }

    pub(crate) fn current(&self) -> Result<Option<Snapshot<TypeConfig>>, String> {
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
        let path = self.dir.join(&name);
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
