//! Errors of the state crate.

use std::path::PathBuf;

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
