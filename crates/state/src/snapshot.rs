//! Snapshots of the applied state: built from the data tables into a file,
//! installed from a file received from the leader, and the current one kept
//! in the snapshot directory next to the state database.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::{Snapshot, SnapshotMeta};
use redb::{
    Database, ReadableDatabase, ReadableTable, TableDefinition, TableHandle, WriteTransaction,
};

use crate::error::{ApplyError, RedbContext, StateError};
use crate::snapshot_file::{Frame, SnapshotFileError, SnapshotReader, SnapshotWriter};
use crate::tables::{
    encode, read_applied, DATA_TABLES, KEY_APPLIED, KEY_MEMBERSHIP, SNAPSHOT, SYSTEM,
};
use crate::type_config::{CoordinatorNode, NodeId, TypeConfig};

/// Directory of snapshot files, next to the state database.
pub const SNAPSHOT_DIR: &str = "snapshots";
/// [`SNAPSHOT`] key of the current snapshot's meta (JSON).
const META_KEY: &str = "meta";
/// [`SNAPSHOT`] key of the current snapshot's file name.
const FILE_KEY: &str = "file";

/// Why a snapshot could not be built, installed or found.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SnapshotError {
    /// Reading or writing the state database failed.
    #[error(transparent)]
    State(#[from] ApplyError),
    /// A file or directory in the snapshot directory could not be created,
    /// written, read, renamed or synced.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Writing a snapshot file failed.
    #[error("{path}: {source}")]
    Write {
        /// The snapshot file being written.
        path: PathBuf,
        /// What went wrong.
        source: SnapshotFileError,
    },
    /// The received snapshot file could not be read back.
    #[error("received snapshot {id}: {source}")]
    Received {
        /// The snapshot id.
        id: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A received snapshot does not decode.
    #[error("snapshot {id} is invalid: {source}")]
    Invalid {
        /// The snapshot id.
        id: String,
        /// What is wrong with it.
        source: SnapshotFileError,
    },
    /// A received snapshot has a table this release does not know.
    #[error("snapshot {id} has an unknown table {table:?}")]
    UnknownTable {
        /// The snapshot id.
        id: String,
        /// The table's name.
        table: String,
    },
    /// A snapshot id (from the leader) that cannot name a file.
    #[error("snapshot id {id:?} cannot name a file")]
    UnsafeId {
        /// The id.
        id: String,
    },
}

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

    /// Writes the applied state into a new snapshot file and makes it the
    /// current snapshot.
    pub(crate) fn build(&self) -> Result<Snapshot<TypeConfig>, SnapshotError> {
        let txn = self.db.begin_read().in_txn("begin")?;
        let (last_applied, last_membership) = read_applied(&txn)?;
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let snapshot_id = match last_applied {
            Some(l) => format!("{}-{}-{seq}", l.leader_id, l.index),
            None => format!("none-{seq}"),
        };
        let tmp = self.dir.join(format!("{snapshot_id}.snap.tmp"));
        let io = |source| SnapshotError::Io {
            path: tmp.clone(),
            source,
        };
        let write = |source| SnapshotError::Write {
            path: tmp.clone(),
            source,
        };
        let file = std::fs::File::create(&tmp).map_err(io)?;
        let mut w = SnapshotWriter::new(std::io::BufWriter::new(file)).map_err(write)?;
        for def in DATA_TABLES {
            let table = txn.open_table(def).at(def, "open")?;
            w.table(def.name()).map_err(write)?;
            for item in table.iter().at(def, "iter")? {
                let (k, v) = item.at(def, "iter")?;
                w.row(k.value(), v.value()).map_err(write)?;
            }
        }
        drop(txn);
        let file = w
            .finish()
            .map_err(write)?
            .into_inner()
            .map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        drop(file);
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership,
            snapshot_id,
        };
        // Opened before it is renamed: the handle stays valid even if a
        // newer snapshot replaces this one at once.
        let file = std::fs::File::open(&tmp).map_err(io)?;
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
    ) -> Result<(), SnapshotError> {
        check_id(&meta.snapshot_id)?;
        let name = format!("{}.snap", meta.snapshot_id);
        let path = self.dir.join(&name);
        std::fs::rename(tmp, &path).map_err(|source| SnapshotError::Io { path, source })?;
        if let Ok(dir) = std::fs::File::open(&self.dir) {
            dir.sync_all().map_err(|source| SnapshotError::Io {
                path: self.dir.clone(),
                source,
            })?;
        }
        let txn = match txn {
            Some(t) => t,
            None => self.db.begin_write().in_txn("begin")?,
        };
        let newer_kept = {
            let mut table = txn.open_table(SNAPSHOT).at(SNAPSHOT, "open")?;
            let current = table.get(META_KEY).at(SNAPSHOT, "get")?.and_then(|v| {
                serde_json::from_slice::<SnapshotMeta<NodeId, CoordinatorNode>>(v.value()).ok()
            });
            let newer_kept = current.is_some_and(|c| c.last_log_id > meta.last_log_id);
            if !newer_kept {
                let m = serde_json::to_vec(meta)
                    .map_err(|e| ApplyError::encode(&SNAPSHOT, META_KEY, e))?;
                table
                    .insert(META_KEY, m.as_slice())
                    .at(SNAPSHOT, "insert")?;
                table
                    .insert(FILE_KEY, name.as_bytes())
                    .at(SNAPSHOT, "insert")?;
            }
            newer_kept
        };
        txn.commit().in_txn("commit")?;
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
    pub(crate) fn receiving_file(&self) -> Result<std::fs::File, SnapshotError> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let path = self
            .dir
            .join(format!("receiving-{}-{seq}.tmp", std::process::id()));
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .and_then(|file| std::fs::remove_file(&path).map(|()| file))
            .map_err(|source| SnapshotError::Io { path, source })
    }

    /// Replaces the state with the snapshot in `file`, read one row at a
    /// time into one write transaction, and keeps a copy as the current
    /// snapshot.
    pub(crate) fn install(
        &self,
        meta: &SnapshotMeta<NodeId, CoordinatorNode>,
        mut file: std::fs::File,
    ) -> Result<(), SnapshotError> {
        use std::io::{Seek, SeekFrom};
        let bad = |source| SnapshotError::Invalid {
            id: meta.snapshot_id.clone(),
            source,
        };
        let received = |source| SnapshotError::Received {
            id: meta.snapshot_id.clone(),
            source,
        };
        file.seek(SeekFrom::Start(0)).map_err(received)?;
        let txn = self.db.begin_write().in_txn("begin")?;
        for def in DATA_TABLES {
            let mut table = txn.open_table(def).at(def, "open")?;
            table.retain(|_, _| false).at(def, "retain")?;
        }
        {
            let mut reader =
                SnapshotReader::new(std::io::BufReader::new(&mut file)).map_err(bad)?;
            let mut table: Option<OpenTable> = None;
            while let Some(frame) = reader.next_frame().map_err(bad)? {
                match frame {
                    Frame::Table(name) => {
                        let Some(def) = DATA_TABLES.iter().find(|d| d.name() == name) else {
                            return Err(SnapshotError::UnknownTable {
                                id: meta.snapshot_id.clone(),
                                table: name,
                            });
                        };
                        drop(table.take());
                        table = Some((*def, txn.open_table(*def).at(*def, "open")?));
                    }
                    Frame::Row(k, v) => {
                        let (def, table) = table
                            .as_mut()
                            .ok_or_else(|| bad(SnapshotFileError::RowOutsideTable))?;
                        table.insert(k.as_str(), v.as_str()).at(*def, "insert")?;
                    }
                }
            }
        }
        {
            let mut system = txn.open_table(SYSTEM).at(SYSTEM, "open")?;
            let la = encode(SYSTEM, KEY_APPLIED, &meta.last_log_id)?;
            system
                .insert(KEY_APPLIED, la.as_str())
                .at(SYSTEM, "insert")?;
            let m = encode(SYSTEM, KEY_MEMBERSHIP, &meta.last_membership)?;
            system
                .insert(KEY_MEMBERSHIP, m.as_str())
                .at(SYSTEM, "insert")?;
        }
        check_id(&meta.snapshot_id)?;
        // Keep the received file as the current snapshot (copied, streamed).
        file.seek(SeekFrom::Start(0)).map_err(received)?;
        let tmp = self.dir.join(format!("{}.snap.tmp", meta.snapshot_id));
        let io = |source| SnapshotError::Io {
            path: tmp.clone(),
            source,
        };
        let mut copy = std::fs::File::create(&tmp).map_err(io)?;
        std::io::copy(&mut file, &mut copy).map_err(io)?;
        copy.sync_all().map_err(io)?;
        drop(copy);
        self.commit_file(meta, &tmp, Some(txn))?;
        Ok(())
    }

    /// The current snapshot, if there is one and its file is still there.
    pub(crate) fn current(&self) -> Result<Option<Snapshot<TypeConfig>>, SnapshotError> {
        let txn = self.db.begin_read().in_txn("begin")?;
        let table = txn.open_table(SNAPSHOT).at(SNAPSHOT, "open")?;
        let (Some(meta), Some(name)) = (
            table.get(META_KEY).at(SNAPSHOT, "get")?,
            table.get(FILE_KEY).at(SNAPSHOT, "get")?,
        ) else {
            return Ok(None);
        };
        let meta: SnapshotMeta<NodeId, CoordinatorNode> = serde_json::from_slice(meta.value())
            .map_err(|e| ApplyError::decode(&SNAPSHOT, META_KEY, e))?;
        let name = String::from_utf8_lossy(name.value()).into_owned();
        let path = self.dir.join(&name);
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            // Gone (removed by hand, or a crash between rename and commit):
            // openraft builds a new one when it needs one.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(SnapshotError::Io { path, source }),
        };
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(tokio::fs::File::from_std(file)),
        }))
    }
}

/// A data table open for writing, with its definition (which names it in errors).
type OpenTable<'txn> = (
    TableDefinition<'static, &'static str, &'static str>,
    redb::Table<'txn, &'static str, &'static str>,
);

/// Refuses a snapshot id that cannot name a file (see [`safe_snapshot_id`]).
fn check_id(id: &str) -> Result<(), SnapshotError> {
    if safe_snapshot_id(id) {
        Ok(())
    } else {
        Err(SnapshotError::UnsafeId { id: id.to_owned() })
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

    fn snapshots(dir: &Path) -> Snapshots {
        let path = dir.join("state.redb");
        let db = Database::create(&path).expect("db");
        let txn = db.begin_write().expect("txn");
        txn.open_table(SNAPSHOT).expect("table");
        txn.commit().expect("commit");
        Snapshots::open(&path, Arc::new(db)).expect("open")
    }

    fn file_with_table(name: &str) -> std::fs::File {
        let mut w = SnapshotWriter::new(Vec::new()).expect("writer");
        w.table(name).expect("table");
        w.row("k", "null").expect("row");
        let bytes = w.finish().expect("finish");
        let mut f = tempfile::tempfile().expect("file");
        std::io::Write::write_all(&mut f, &bytes).expect("write");
        f
    }

    fn meta(id: &str) -> SnapshotMeta<NodeId, CoordinatorNode> {
        SnapshotMeta {
            snapshot_id: id.into(),
            ..SnapshotMeta::default()
        }
    }

    #[test]
    fn a_received_snapshot_is_refused_by_what_is_wrong_with_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = snapshots(dir.path());
        let err = s
            .install(&meta("s1"), file_with_table("bogus"))
            .expect_err("unknown table installed");
        assert!(
            matches!(&err, SnapshotError::UnknownTable { id, table } if id == "s1" && table == "bogus"),
            "{err}"
        );
        let err = s
            .install(&meta("../s2"), file_with_table("nodes"))
            .expect_err("unsafe id installed");
        assert!(
            matches!(&err, SnapshotError::UnsafeId { id } if id == "../s2"),
            "{err}"
        );
        let mut junk = tempfile::tempfile().expect("file");
        std::io::Write::write_all(&mut junk, b"not a snapshot").expect("write");
        let err = s.install(&meta("s3"), junk).expect_err("junk installed");
        assert!(
            matches!(&err, SnapshotError::Invalid { id, .. } if id == "s3"),
            "{err}"
        );
        assert!(s.current().expect("current").is_none(), "nothing was kept");
    }
}
