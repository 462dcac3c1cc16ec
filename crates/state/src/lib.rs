//! Cloudless replicated state: the openraft type configuration, the typed
//! commands that change cluster state, and their durable storage in redb.
//!
//! Two redb files live in the data directory: `raft-log.redb` (log entries,
//! vote, purge and commit pointers) and `state.redb` (the applied state
//! machine and the current snapshot). Log appends are group-committed: each
//! append is visible at once and a flusher thread makes everything pending
//! durable with one fsync before openraft is told the entries are on disk.
//!
//! The state side: `tables` lists the tables of `state.redb`; `apply`
//! applies committed entries to them (one submodule per command family);
//! `reader` serves the applied state; `snapshot` builds and installs
//! snapshots; `state_machine` ties these to openraft.

mod apply;
mod changes;
mod command;
mod error;
mod legacy;
mod log_store;
mod reader;
mod seq_log;
mod snapshot;
pub mod snapshot_file;
mod state_machine;
mod tables;
mod type_config;

pub use apply::secrets::check_token_use;
pub use command::{
    ClusterInfo, Command, NodeUpdate, Proposal, ProposalResult, ReconcileDecision, Rejection,
    ReplicaUpdate, Request, Response, RewrappedKey, Rollback, SecretCommand,
};
pub use error::StateError;
pub use log_store::LogStore;
pub use reader::StateReader;
pub use snapshot::SNAPSHOT_DIR;
pub use state_machine::StateMachine;
pub use type_config::{CoordinatorNode, NodeId, Raft, TypeConfig};

/// The Raft log format this release writes and reads (ADR 0007). Coordinators
/// exchange it: a coordinator joins, and takes Raft traffic from, only peers
/// of the same format.
pub const LOG_FORMAT: u32 = log_store::FORMAT;

/// The log format of releases that did not send theirs (the field reads 0):
/// every such release that could run in a cluster with this one wrote 4.
pub const LOG_FORMAT_UNSENT: u32 = 4;

/// Whether a peer that sent `sent` (0: not sent) speaks this release's log
/// format; the error names both formats and what to do.
pub fn check_peer_log_format(peer: &str, sent: u32) -> Result<(), String> {
    let theirs = if sent == 0 { LOG_FORMAT_UNSENT } else { sent };
    if theirs == LOG_FORMAT {
        Ok(())
    } else {
        Err(format!(
            "{peer} uses Raft log format {theirs} and this coordinator format {LOG_FORMAT}: \
             coordinators of different log formats cannot share a cluster \
             (see \"Upgrading\" in docs/operations.md)"
        ))
    }
}

/// File name of the Raft log database inside the data directory.
pub const LOG_FILE: &str = "raft-log.redb";
/// File name of the state machine database inside the data directory.
pub const STATE_FILE: &str = "state.redb";

/// Opens (or creates) both stores in `dir`, checking that every stored record decodes.
/// The directory is made 0700 and the stores 0600: they hold workload
/// environments, audit records, the node inventory and the sealed CA key.
pub fn open_stores(
    dir: &std::path::Path,
    apply_latency: prometheus_client::metrics::histogram::Histogram,
) -> Result<(LogStore, StateMachine), StateError> {
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
    let data_dir = |source| StateError::DataDir {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(data_dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(data_dir)?;
    for name in [LOG_FILE, STATE_FILE] {
        let path = dir.join(name);
        // Created 0600 before redb initialises it (an empty file is a new
        // database); one made earlier with the umask's mode is narrowed.
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .and_then(|_| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)))
            .map_err(|source| StateError::DataDir { path, source })?;
    }
    let log = LogStore::open(&dir.join(LOG_FILE))?;
    let sm = StateMachine::open(&dir.join(STATE_FILE), apply_latency)?;
    Ok((log, sm))
}

#[cfg(test)]
mod tests {
    #[test]
    fn peers_of_another_log_format_are_refused_by_name_and_silence_means_the_last_unsent_one() {
        assert_eq!(
            super::check_peer_log_format("node 2", super::LOG_FORMAT),
            Ok(())
        );
        assert_eq!(
            super::check_peer_log_format("node 2", 0),
            if super::LOG_FORMAT == super::LOG_FORMAT_UNSENT {
                Ok(())
            } else {
                Err(format!(
                    "node 2 uses Raft log format 4 and this coordinator format {}: coordinators of different log formats cannot share a cluster (see \"Upgrading\" in docs/operations.md)",
                    super::LOG_FORMAT
                ))
            }
        );
        let err =
            super::check_peer_log_format("node 3", super::LOG_FORMAT + 1).expect_err("refused");
        assert!(
            err.starts_with(&format!(
                "node 3 uses Raft log format {} and this coordinator format {}",
                super::LOG_FORMAT + 1,
                super::LOG_FORMAT
            )),
            "{err}"
        );
    }

    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &std::path::Path) -> u32 {
        std::fs::metadata(p).expect("stat").permissions().mode() & 0o777
    }

    /// The data dir is 0700 and the stores 0600, also when an older
    /// version made them with the umask's modes.
    #[test]
    fn the_data_dir_and_stores_are_private() {
        let parent = tempfile::tempdir().expect("tempdir");
        let dir = parent.path().join("data");
        {
            let (_log, _sm) = super::open_stores(
                &dir,
                prometheus_client::metrics::histogram::Histogram::new([1.0]),
            )
            .expect("open");
        }
        assert_eq!(mode(&dir), 0o700);
        for f in [super::LOG_FILE, super::STATE_FILE] {
            assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
            std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o644))
                .expect("chmod");
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let (_log, _sm) = super::open_stores(
            &dir,
            prometheus_client::metrics::histogram::Histogram::new([1.0]),
        )
        .expect("reopen");
        assert_eq!(mode(&dir), 0o700);
        for f in [super::LOG_FILE, super::STATE_FILE] {
            assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
        }
    }
}
