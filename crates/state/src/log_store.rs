//! The Raft log in redb, with group commit.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, RaftLogId, RaftLogReader, StorageError, Vote};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::error::{io_err, StateError};
use crate::type_config::{NodeId, TypeConfig};

const LOGS: TableDefinition<u64, &[u8]> = TableDefinition::new("logs");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const KEY_FORMAT: &str = "format";
const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_PURGED: &str = "last_purged";
/// Format 2: entries are postcard-encoded (format 1 used JSON). Format 3:
/// commands of the release that bounded node traffic (new fields in the
/// cluster configuration and node records change their postcard encoding),
/// so an older log is refused by its format, not misread. Format 4: the
/// cluster configuration's `node_rejoin_grace_s` and `admin_cert_lifetime_s`,
/// and resources' `pids` (a per-replica limit), which change the encoding of
/// cluster configurations, workload specs and node records. Format 5:
/// replica networking (`hostPort`, `egress`, the cluster's `network`, node
/// subnets, replica addresses, `EnrollNode.assign_subnet`). Format 6:
/// services (`spec.service`, `ports[].ingressPort`, workload VIPs,
/// `PutWorkload.assign_vip`, `Command::AssignServiceVips`). Format 7: the
/// trace context of the span that placed a replica (`ReplicaRecord.trace`).
/// A log of format 4, 5 or 6 is rewritten in format 7 when it is opened
/// (see `crate::legacy`).
pub(crate) const FORMAT: u32 = 7;
/// The earlier formats [`LogStore::open`] rewrites, with what grew since each.
const PREVIOUS_FORMATS: [(u32, &[crate::legacy::Grown]); 3] = [
    (4, crate::legacy::SINCE_FORMAT_4),
    (5, crate::legacy::SINCE_FORMAT_5),
    (6, crate::legacy::SINCE_FORMAT_6),
];

type SErr = StorageError<NodeId>;

/// The Raft log, vote and log pointers in one redb file. Cheap to clone.
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Inner>,
    /// Most entry bytes one `limited_get_log_entries` returns (at least one
    /// entry always comes back), so one AppendEntries stays bounded.
    append_budget: usize,
}

/// Default of [`LogStore::with_append_budget`].
pub const DEFAULT_APPEND_BUDGET: usize = 4 << 20;

struct Inner {
    path: PathBuf,
    /// Latest committed index openraft reported through `save_committed`.
    committed: Arc<std::sync::atomic::AtomicU64>,
    db: Arc<Database>,
    /// `None` only while dropping.
    flush_tx: Option<mpsc::Sender<LogFlushed<TypeConfig>>>,
    flusher: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Inner {
    /// Closes the channel and waits for the flusher, so the file is released
    /// (and pending appends flushed) when the last handle goes.
    fn drop(&mut self) {
        self.flush_tx.take();
        if let Some(h) = self.flusher.take() {
            if h.join().is_err() {
                tracing::error!(path = %self.path.display(), "raft log flusher thread panicked");
            }
        }
    }
}

impl Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore")
            .field("path", &self.inner.path)
            .finish()
    }
}

impl LogStore {
    /// Opens or creates the log at `path`, checking every entry decodes.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        let db = Database::create(path).map_err(|source| StateError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let db = Arc::new(db);
        check_and_init(&db, path)?;
        let (flush_tx, flush_rx) = mpsc::channel();
        let flusher_db = db.clone();
        let flusher_path = path.to_path_buf();
        let flusher = std::thread::Builder::new()
            .name("raft-log-flush".into())
            .spawn(move || flusher(&flusher_db, &flusher_path, &flush_rx))
            .map_err(|e| StateError::storage(path, format!("cannot start flusher thread: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                committed: Arc::default(),
                db,
                flush_tx: Some(flush_tx),
                flusher: Some(flusher),
            }),
            append_budget: DEFAULT_APPEND_BUDGET,
        })
    }

    /// Caps the entry bytes replication reads for one AppendEntries.
    #[must_use]
    pub fn with_append_budget(mut self, bytes: usize) -> Self {
        self.append_budget = bytes.max(1);
        self
    }

    /// The commit index as last reported by Raft on this node (0 before any).
    pub fn committed_index(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.inner.committed.clone()
    }

    fn get_meta<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>, String> {
        let txn = self.inner.db.begin_read().map_err(|e| e.to_string())?;
        let table = txn.open_table(META).map_err(|e| e.to_string())?;
        let Some(v) = table.get(key).map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        serde_json::from_slice(v.value()).map(Some).map_err(|e| {
            format!(
                "{}: record {key:?} is corrupt: {e}",
                self.inner.path.display()
            )
        })
    }

    fn put_meta<T: serde::Serialize>(
        &self,
        key: &str,
        value: &T,
        durability: Durability,
    ) -> Result<(), String> {
        let bytes = serde_json::to_vec(value).map_err(|e| e.to_string())?;
        let mut txn = self.inner.db.begin_write().map_err(|e| e.to_string())?;
        txn.set_durability(durability).map_err(|e| e.to_string())?;
        {
            let mut table = txn.open_table(META).map_err(|e| e.to_string())?;
            table
                .insert(key, bytes.as_slice())
                .map_err(|e| e.to_string())?;
        }
        txn.commit().map_err(|e| e.to_string())
    }

    /// Entries in `start..end`; once `budget` bytes are read the rest is
    /// left out (the first entry always comes back).
    fn read_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
        budget: usize,
    ) -> Result<Vec<Entry<TypeConfig>>, String> {
        let txn = self.inner.db.begin_read().map_err(|e| e.to_string())?;
        let table = txn.open_table(LOGS).map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for item in table
            .range::<u64>((start, end))
            .map_err(|e| e.to_string())?
        {
            let (k, v) = item.map_err(|e| e.to_string())?;
            let len = v.value().len();
            if !out.is_empty() && bytes.saturating_add(len) > budget {
                break;
            }
            bytes = bytes.saturating_add(len);
            let entry: Entry<TypeConfig> = postcard::from_bytes(v.value()).map_err(|e| {
                format!(
                    "{}: log entry {} is corrupt: {e}",
                    self.inner.path.display(),
                    k.value()
                )
            })?;
            out.push(entry);
        }
        Ok(out)
    }

    /// Deletes entries in `range` and commits with `durability`.
    fn delete_range(
        &self,
        range: (Bound<u64>, Bound<u64>),
        durability: Durability,
        purged: Option<&LogId<NodeId>>,
    ) -> Result<(), String> {
        let mut txn = self.inner.db.begin_write().map_err(|e| e.to_string())?;
        txn.set_durability(durability).map_err(|e| e.to_string())?;
        {
            let mut table = txn.open_table(LOGS).map_err(|e| e.to_string())?;
            table
                .retain_in::<u64, _>(range, |_, _| false)
                .map_err(|e| e.to_string())?;
            if let Some(p) = purged {
                let mut meta = txn.open_table(META).map_err(|e| e.to_string())?;
                let bytes = serde_json::to_vec(p).map_err(|e| e.to_string())?;
                meta.insert(KEY_PURGED, bytes.as_slice())
                    .map_err(|e| e.to_string())?;
            }
        }
        txn.commit().map_err(|e| e.to_string())
    }
}

/// Creates the tables on a new file; on an existing one checks the format and
/// that every record decodes, so corruption is reported at start-up. A log
/// of an earlier format is rewritten in this one, in the same
/// transaction: the file holds either format entirely, never a mix.
fn check_and_init(db: &Database, path: &Path) -> Result<(), StateError> {
    let se = |e: &dyn std::fmt::Display| StateError::storage(path, e);
    let txn = db.begin_write().map_err(|e| se(&e))?;
    let mut migrate: Option<(u32, &[crate::legacy::Grown])> = None;
    {
        let mut meta = txn.open_table(META).map_err(|e| se(&e))?;
        let found = meta
            .get(KEY_FORMAT)
            .map_err(|e| se(&e))?
            .map(|v| v.value().to_vec());
        match found {
            None => {
                let v = FORMAT.to_string();
                meta.insert(KEY_FORMAT, v.as_bytes()).map_err(|e| se(&e))?;
            }
            Some(v) if v == FORMAT.to_string().as_bytes() => {}
            Some(v)
                if PREVIOUS_FORMATS
                    .iter()
                    .any(|(f, _)| v == f.to_string().as_bytes()) =>
            {
                migrate = PREVIOUS_FORMATS
                    .iter()
                    .find(|(f, _)| v == f.to_string().as_bytes())
                    .copied();
                let v = FORMAT.to_string();
                meta.insert(KEY_FORMAT, v.as_bytes()).map_err(|e| se(&e))?;
            }
            Some(v) => {
                return Err(StateError::Format {
                    path: path.to_path_buf(),
                    found: String::from_utf8_lossy(&v).into_owned(),
                    supported: FORMAT,
                })
            }
        }
        for key in [KEY_VOTE, KEY_COMMITTED, KEY_PURGED] {
            if let Some(v) = meta.get(key).map_err(|e| se(&e))? {
                if let Err(e) = serde_json::from_slice::<serde_json::Value>(v.value()) {
                    return Err(StateError::Corrupt {
                        path: path.to_path_buf(),
                        what: format!("record {key:?}"),
                        detail: e.to_string(),
                    });
                }
            }
        }
        let mut logs = txn.open_table(LOGS).map_err(|e| se(&e))?;
        let mut expected: Option<u64> = None;
        let mut rewritten: Vec<(u64, Vec<u8>)> = Vec::new();
        for item in logs.iter().map_err(|e| se(&e))? {
            let (k, v) = item.map_err(|e| se(&e))?;
            let index = k.value();
            let corrupt = |detail: String| StateError::Corrupt {
                path: path.to_path_buf(),
                what: format!("log entry {index}"),
                detail,
            };
            let entry: Entry<TypeConfig> = if let Some((from, grown)) = migrate {
                let entry: Entry<TypeConfig> = crate::legacy::from_postcard(v.value(), grown)
                    .map_err(|e| corrupt(format!("format {from}: {e}")))?;
                let bytes = postcard::to_allocvec(&entry).map_err(|e| corrupt(e.to_string()))?;
                rewritten.push((index, bytes));
                entry
            } else {
                postcard::from_bytes(v.value()).map_err(|e| corrupt(e.to_string()))?
            };
            if entry.get_log_id().index != index {
                return Err(corrupt(format!(
                    "stored under index {index} but holds index {}",
                    entry.get_log_id().index
                )));
            }
            if let Some(exp) = expected {
                if index != exp {
                    return Err(corrupt(format!("gap in the log: expected index {exp}")));
                }
            }
            expected = Some(index + 1);
        }
        for (index, bytes) in &rewritten {
            logs.insert(*index, bytes.as_slice()).map_err(|e| se(&e))?;
        }
    }
    if let Some((from, _)) = migrate {
        tracing::info!(path = %path.display(), from, to = FORMAT, "raft log rewritten in the current format");
    }
    txn.commit().map_err(|e| se(&e))
}

/// Makes every non-durable append durable with one fsync, then reports the
/// whole batch flushed. Ends when the last `LogStore` clone is dropped.
fn flusher(db: &Database, path: &Path, rx: &mpsc::Receiver<LogFlushed<TypeConfig>>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        let result = db
            .begin_write()
            .map_err(|e| e.to_string())
            .and_then(|txn| txn.commit().map_err(|e| e.to_string()));
        if let Err(e) = &result {
            tracing::error!(path = %path.display(), error = %e, "raft log flush failed");
        }
        for cb in batch {
            cb.log_io_completed(result.clone().map_err(std::io::Error::other));
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, SErr> {
        self.read_range(
            range.start_bound().cloned(),
            range.end_bound().cloned(),
            usize::MAX,
        )
        .map_err(|e| io_err!(read_logs, e))
    }

    /// Replication reads through this: an AppendEntries carries at most
    /// the append budget's bytes of entries (and at least one entry).
    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry<TypeConfig>>, SErr> {
        self.read_range(
            Bound::Included(start),
            Bound::Excluded(end),
            self.append_budget,
        )
        .map_err(|e| io_err!(read_logs, e))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SErr> {
        let last_purged: Option<LogId<NodeId>> = self
            .get_meta(KEY_PURGED)
            .map_err(|e| io_err!(read_logs, e))?;
        let last = {
            let txn = self
                .inner
                .db
                .begin_read()
                .map_err(|e| io_err!(read_logs, e))?;
            let table = txn.open_table(LOGS).map_err(|e| io_err!(read_logs, e))?;
            let last = table.last().map_err(|e| io_err!(read_logs, e))?;
            match last {
                Some((_, v)) => Some(
                    postcard::from_bytes::<Entry<TypeConfig>>(v.value())
                        .map_err(|e| io_err!(read_logs, e))?
                        .log_id,
                ),
                None => None,
            }
        };
        Ok(LogState {
            last_log_id: last.or(last_purged),
            last_purged_log_id: last_purged,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), SErr> {
        self.put_meta(KEY_VOTE, vote, Durability::Immediate)
            .map_err(|e| io_err!(write_vote, e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, SErr> {
        self.get_meta(KEY_VOTE).map_err(|e| io_err!(read_vote, e))
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), SErr> {
        // A hint for faster re-apply after restart: made durable by the next flush.
        if let Some(c) = &committed {
            self.inner
                .committed
                .store(c.index, std::sync::atomic::Ordering::Relaxed);
        }
        self.put_meta(KEY_COMMITTED, &committed, Durability::None)
            .map_err(|e| io_err!(write_logs, e))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, SErr> {
        Ok(self
            .get_meta::<Option<LogId<NodeId>>>(KEY_COMMITTED)
            .map_err(|e| io_err!(read_logs, e))?
            .flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Visible to readers once this commit returns; durable after the flusher's fsync.
        let res: Result<(), String> = (|| {
            let mut txn = self.inner.db.begin_write().map_err(|e| e.to_string())?;
            txn.set_durability(Durability::None)
                .map_err(|e| e.to_string())?;
            {
                let mut table = txn.open_table(LOGS).map_err(|e| e.to_string())?;
                for entry in entries {
                    let bytes = postcard::to_allocvec(&entry).map_err(|e| e.to_string())?;
                    table
                        .insert(entry.log_id.index, bytes.as_slice())
                        .map_err(|e| e.to_string())?;
                }
            }
            txn.commit().map_err(|e| e.to_string())
        })();
        res.map_err(|e| io_err!(write_logs, e))?;
        self.inner
            .flush_tx
            .as_ref()
            .ok_or_else(|| io_err!(write_logs, "raft log is closing"))?
            .send(callback)
            .map_err(|_| io_err!(write_logs, "raft log flusher thread has stopped"))
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        self.delete_range(
            (Bound::Included(log_id.index), Bound::Unbounded),
            Durability::Immediate,
            None,
        )
        .map_err(|e| io_err!(write_logs, e))
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        self.delete_range(
            (Bound::Unbounded, Bound::Included(log_id.index)),
            Durability::Immediate,
            Some(&log_id),
        )
        .map_err(|e| io_err!(write_logs, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes blank entries 1..=n with `payload_bytes` of padding each.
    fn write_entries(path: &Path, n: u64, payload_bytes: usize) {
        let db = Database::create(path).expect("reopen raw");
        let txn = db.begin_write().expect("write");
        {
            let mut t = txn.open_table(LOGS).expect("table");
            for i in 1..=n {
                let entry: Entry<TypeConfig> = Entry {
                    log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), i),
                    payload: openraft::EntryPayload::Normal(crate::Proposal {
                        requests: vec![crate::Request {
                            idempotency_key: Some("k".repeat(payload_bytes)),
                            proposed_at_ms: 0,
                            command: crate::Command::RecordEvents { events: vec![] },
                        }],
                    }),
                };
                let bytes = postcard::to_allocvec(&entry).expect("encode");
                t.insert(i, bytes.as_slice()).expect("insert");
            }
        }
        txn.commit().expect("commit");
    }

    #[tokio::test]
    async fn replication_reads_are_capped_by_bytes_but_never_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.redb");
        drop(LogStore::open(&path).expect("create"));
        write_entries(&path, 10, 1000);
        let mut log = LogStore::open(&path)
            .expect("open")
            .with_append_budget(3500);
        // About 1 KB each: three fit in 3,500 bytes.
        let got = log.limited_get_log_entries(1, 11).await.expect("read");
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].log_id.index, 1);
        // A budget smaller than one entry still yields that entry.
        let mut tiny = log.clone().with_append_budget(10);
        assert_eq!(
            tiny.limited_get_log_entries(4, 11)
                .await
                .expect("read")
                .len(),
            1
        );
        // Plain reads are not capped.
        assert_eq!(
            log.try_get_log_entries(1..11).await.expect("read").len(),
            10
        );
    }

    #[test]
    fn corrupt_entry_is_reported_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.redb");
        drop(LogStore::open(&path).expect("create"));
        {
            let db = Database::create(&path).expect("reopen raw");
            let txn = db.begin_write().expect("write");
            txn.open_table(LOGS)
                .expect("table")
                .insert(7, b"{not json".as_slice())
                .expect("insert");
            txn.commit().expect("commit");
        }
        let err = LogStore::open(&path).expect_err("corrupt log accepted");
        let msg = err.to_string();
        assert!(msg.contains("log entry 7 is corrupt"), "{msg}");
    }

    #[test]
    fn truncated_file_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.redb");
        drop(LogStore::open(&path).expect("create"));
        let len = std::fs::metadata(&path).expect("stat").len();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open");
        f.set_len(len / 3).expect("truncate");
        drop(f);
        let err = LogStore::open(&path).expect_err("truncated log accepted");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }

    fn set_format(path: &Path, format: &[u8]) {
        let db = Database::create(path).expect("reopen raw");
        let txn = db.begin_write().expect("write");
        txn.open_table(META)
            .expect("table")
            .insert(KEY_FORMAT, format)
            .expect("insert");
        txn.commit().expect("commit");
    }

    fn format_of(path: &Path) -> Vec<u8> {
        format_in(&Database::create(path).expect("reopen raw"))
    }

    fn format_in(db: &Database) -> Vec<u8> {
        let txn = db.begin_read().expect("read");
        let meta = txn.open_table(META).expect("table");
        let v = meta.get(KEY_FORMAT).expect("get").expect("format");
        v.value().to_vec()
    }

    #[tokio::test]
    async fn a_log_of_the_previous_format_is_rewritten_once_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.redb");
        drop(LogStore::open(&path).expect("create"));
        write_entries(&path, 3, 10);
        // An enrollment as format 4 wrote it: the same bytes as now without
        // the two fields added since (`NodeRecord.subnet`, None, and
        // `EnrollNode.assign_subnet`, false: one zero byte each, last).
        let enroll: Entry<TypeConfig> = Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), 4),
            payload: openraft::EntryPayload::Normal(crate::Proposal {
                requests: vec![crate::Request {
                    idempotency_key: None,
                    proposed_at_ms: 7,
                    command: crate::Command::EnrollNode {
                        token_id: "t".into(),
                        node: cloudless_types::NodeRecord::new(
                            "n1".into(),
                            "n1".into(),
                            "t".into(),
                            9,
                        ),
                        assign_subnet: false,
                    },
                }],
            }),
        };
        let now = postcard::to_allocvec(&enroll).expect("encode");
        assert_eq!(now[now.len() - 2..], [0, 0]);
        {
            let db = Database::create(&path).expect("reopen raw");
            let txn = db.begin_write().expect("write");
            txn.open_table(LOGS)
                .expect("table")
                .insert(4, &now[..now.len() - 2])
                .expect("insert");
            txn.commit().expect("commit");
        }
        set_format(&path, b"4");
        let mut log = LogStore::open(&path).expect("a format-4 log opens");
        assert_eq!(format_in(&log.inner.db), FORMAT.to_string().as_bytes());
        let entries = log.try_get_log_entries(1..5).await.expect("read");
        assert_eq!(entries.len(), 4);
        assert_eq!(entries[3], enroll, "the enrollment reads with the defaults");
        drop(log);
        // Opening again changes nothing.
        let mut log = LogStore::open(&path).expect("reopen");
        assert_eq!(format_in(&log.inner.db), FORMAT.to_string().as_bytes());
        assert_eq!(log.try_get_log_entries(1..5).await.expect("read"), entries);
    }

    #[tokio::test]
    async fn a_format_5_log_is_rewritten_with_workloads_read_as_they_were() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.redb");
        drop(LogStore::open(&path).expect("create"));
        write_entries(&path, 3, 10);
        // A workload as format 5 wrote it: no ports, no revisions, and none
        // of the fields added since (`spec.service`: three zero bytes at
        // the spec's end; `vip`: None; `assign_vip`: false).
        let put: Entry<TypeConfig> = Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), 4),
            payload: openraft::EntryPayload::Normal(crate::Proposal {
                requests: vec![crate::Request {
                    idempotency_key: None,
                    proposed_at_ms: 7,
                    command: crate::Command::PutWorkload {
                        workload: cloudless_types::Workload {
                            namespace: "default".into(),
                            name: "web".into(),
                            spec: cloudless_types::WorkloadSpec {
                                image: "busybox".into(),
                                ..Default::default()
                            },
                            generation: 0,
                            created_at_ms: 0,
                            updated_at_ms: 0,
                            template: 0,
                            revisions: Vec::new(),
                            vip: None,
                        },
                        cause: "apply".into(),
                        assign_vip: false,
                    },
                }],
            }),
        };
        let now = postcard::to_allocvec(&put).expect("encode");
        let n = now.len();
        // ... spec, service [0 0 0], generation..revisions [0 0 0 0 0],
        // vip [0], cause [5 a p p l y], assign_vip [0].
        assert_eq!(now[n - 16..n - 7], [0; 9]);
        assert_eq!(now[n - 7..], [5, b'a', b'p', b'p', b'l', b'y', 0]);
        let old: Vec<u8> = [&now[..n - 16], &now[n - 13..n - 8], &now[n - 7..n - 1]].concat();
        {
            let db = Database::create(&path).expect("reopen raw");
            let txn = db.begin_write().expect("write");
            txn.open_table(LOGS)
                .expect("table")
                .insert(4, old.as_slice())
                .expect("insert");
            txn.commit().expect("commit");
        }
        set_format(&path, b"5");
        let mut log = LogStore::open(&path).expect("a format-5 log opens");
        assert_eq!(format_in(&log.inner.db), FORMAT.to_string().as_bytes());
        let entries = log.try_get_log_entries(1..5).await.expect("read");
        assert_eq!(entries[3], put, "the workload reads with the defaults");
    }

    #[tokio::test]
    async fn a_format_6_log_is_rewritten_with_replicas_placed_without_a_trace() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.redb");
        drop(LogStore::open(&path).expect("create"));
        write_entries(&path, 3, 10);
        // A placement as format 6 wrote it: the record without `trace` (an
        // empty string, one zero byte, last in the entry).
        let replica = cloudless_types::ReplicaRecord {
            id: "default.web-1-abcdef12".into(),
            namespace: "default".into(),
            workload: "web".into(),
            template: 1,
            spec: cloudless_types::WorkloadSpec {
                image: "busybox".into(),
                ..Default::default()
            },
            node_id: "n1".into(),
            state: cloudless_types::ReplicaState::Pending,
            exit_code: None,
            restarts: 0,
            message: String::new(),
            created_at_ms: 5,
            updated_at_ms: 5,
            ready_at_ms: 0,
            disconnected_at_ms: 0,
            score: 50.0,
            address: "10.0.0.2".into(),
            trace: String::new(),
        };
        let place: Entry<TypeConfig> = Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), 4),
            payload: openraft::EntryPayload::Normal(crate::Proposal {
                requests: vec![crate::Request {
                    idempotency_key: None,
                    proposed_at_ms: 7,
                    command: crate::Command::PlaceReplicas {
                        replicas: vec![replica],
                    },
                }],
            }),
        };
        let now = postcard::to_allocvec(&place).expect("encode");
        let n = now.len();
        assert_eq!(now[n - 10..], *b"\x0810.0.0.2\x00");
        {
            let db = Database::create(&path).expect("reopen raw");
            let txn = db.begin_write().expect("write");
            txn.open_table(LOGS)
                .expect("table")
                .insert(4, &now[..n - 1])
                .expect("insert");
            txn.commit().expect("commit");
        }
        set_format(&path, b"6");
        let mut log = LogStore::open(&path).expect("a format-6 log opens");
        assert_eq!(format_in(&log.inner.db), b"7");
        let entries = log.try_get_log_entries(1..5).await.expect("read");
        assert_eq!(entries[3], place, "the replica reads without a trace");
    }

    #[test]
    fn a_previous_format_log_that_does_not_decode_is_refused_and_left_as_it_was() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.redb");
        drop(LogStore::open(&path).expect("create"));
        write_entries(&path, 2, 10);
        {
            let db = Database::create(&path).expect("reopen raw");
            let txn = db.begin_write().expect("write");
            txn.open_table(LOGS)
                .expect("table")
                .insert(3, b"\xff\xff".as_slice())
                .expect("insert");
            txn.commit().expect("commit");
        }
        set_format(&path, b"4");
        let err = LogStore::open(&path).expect_err("corrupt entry accepted");
        assert!(
            err.to_string().contains("log entry 3 is corrupt: format 4"),
            "{err}"
        );
        assert_eq!(format_of(&path), b"4", "the file is left as it was");
    }

    #[test]
    fn unknown_format_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log.redb");
        drop(LogStore::open(&path).expect("create"));
        {
            let db = Database::create(&path).expect("reopen raw");
            let txn = db.begin_write().expect("write");
            txn.open_table(META)
                .expect("table")
                .insert(KEY_FORMAT, b"99".as_slice())
                .expect("insert");
            txn.commit().expect("commit");
        }
        let err = LogStore::open(&path).expect_err("future format accepted");
        assert!(matches!(err, StateError::Format { .. }), "{err}");
    }
}
