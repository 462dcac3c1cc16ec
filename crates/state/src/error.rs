//! Errors of the state crate.

use std::path::PathBuf;

use redb::TableHandle;

/// Why the replicated state could not be opened or used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The data directory could not be created or read.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A redb file could not be opened: corrupt, truncated, locked by another process or unreadable.
    #[error("cannot open {path}: {source} (is another coordinator using this data directory, or is the file damaged?)")]
    Open {
        /// The database file.
        path: PathBuf,
        /// What redb reported.
        source: redb::DatabaseError,
    },
    /// A record in a database file does not decode.
    #[error("{path}: {what} is corrupt: {detail}")]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// Which record.
        what: String,
        /// What is wrong with it.
        detail: String,
    },
    /// The file was written by an incompatible release.
    #[error(
        "{path}: storage format {found} is not supported (this release reads format {supported})"
    )]
    Format {
        /// The database file.
        path: PathBuf,
        /// The version found.
        found: String,
        /// The version this release reads.
        supported: u32,
    },
    /// A redb operation failed.
    #[error("{path}: storage error: {detail}")]
    Storage {
        /// The database file.
        path: PathBuf,
        /// The redb error.
        detail: String,
    },
}

impl StateError {
    pub(crate) fn storage(path: &std::path::Path, e: impl std::fmt::Display) -> Self {
        Self::Storage {
            path: path.to_path_buf(),
            detail: e.to_string(),
        }
    }
}

/// Why applying committed entries to the state database, or reading the
/// applied state back, failed: a fault of this coordinator's storage.
///
/// Never an answer to a client: a command that cannot be carried out is
/// answered with `Response::Rejected`, the same on every coordinator. An
/// `ApplyError` stops the apply (its transaction is dropped) and becomes a
/// [`StateError`] (reads) or openraft's `StorageError` (the state machine
/// traits) where it leaves the crate.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApplyError {
    /// Beginning, configuring or committing a transaction failed.
    #[error("cannot {op} a state transaction: {source}")]
    Transaction {
        /// What was being done: "begin", "set the durability of", "commit".
        op: &'static str,
        /// What redb reported.
        source: Box<redb::Error>,
    },
    /// An operation on one table failed.
    #[error("state table {table}: {op} failed: {source}")]
    Storage {
        /// The table.
        table: String,
        /// The operation: "open", "get", "insert", "remove", "range", ...
        op: &'static str,
        /// What redb reported.
        source: Box<redb::Error>,
    },
    /// A stored record does not decode as what its table holds.
    #[error("{table} record {key:?} is corrupt: {source}")]
    Decode {
        /// The table.
        table: String,
        /// The record's key.
        key: String,
        /// What is wrong with it.
        source: serde_json::Error,
    },
    /// A record could not be encoded (the stored types always encode).
    #[error("{table} record {key:?} cannot be encoded: {source}")]
    Encode {
        /// The table.
        table: String,
        /// The record's key.
        key: String,
        /// What serde_json reported.
        source: serde_json::Error,
    },
}

impl ApplyError {
    /// A record of `table` under `key` that does not decode.
    pub(crate) fn decode(table: &impl TableHandle, key: &str, source: serde_json::Error) -> Self {
        Self::Decode {
            table: table.name().to_owned(),
            key: key.to_owned(),
            source,
        }
    }

    /// A record of `table` under `key` that does not encode.
    pub(crate) fn encode(table: &impl TableHandle, key: &str, source: serde_json::Error) -> Self {
        Self::Encode {
            table: table.name().to_owned(),
            key: key.to_owned(),
            source,
        }
    }

    /// The error a reader of the database at `path` reports: a record that
    /// does not decode is corrupt, anything else a storage error.
    pub(crate) fn into_state_error(self, path: &std::path::Path) -> StateError {
        match self {
            Self::Decode { table, key, source } => StateError::Corrupt {
                path: path.to_path_buf(),
                what: format!("{table} record {key:?}"),
                detail: source.to_string(),
            },
            other => StateError::storage(path, other),
        }
    }
}

/// Names what a failed redb call was doing, making an [`ApplyError`].
pub(crate) trait RedbContext<T> {
    /// The call was `op` on `table`.
    fn at(self, table: impl TableHandle, op: &'static str) -> Result<T, ApplyError>;
    /// The call was `op` on the transaction itself.
    fn in_txn(self, op: &'static str) -> Result<T, ApplyError>;
}

impl<T, E: Into<redb::Error>> RedbContext<T> for Result<T, E> {
    fn at(self, table: impl TableHandle, op: &'static str) -> Result<T, ApplyError> {
        self.map_err(|e| ApplyError::Storage {
            table: table.name().to_owned(),
            op,
            source: Box::new(e.into()),
        })
    }

    fn in_txn(self, op: &'static str) -> Result<T, ApplyError> {
        self.map_err(|e| ApplyError::Transaction {
            op,
            source: Box::new(e.into()),
        })
    }
}

/// An error carried into openraft's `StorageError` as its source.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct StorageFault(pub String);

macro_rules! io_err {
    ($ctor:ident, $e:expr) => {
        openraft::StorageError::IO {
            source: openraft::StorageIOError::$ctor(&$crate::error::StorageFault($e.to_string())),
        }
    };
}
pub(crate) use io_err;
