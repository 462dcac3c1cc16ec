//! Cloudless replicated state: the openraft type configuration, the typed
//! commands that change cluster state, and their durable storage in redb.
//!
//! Two redb files live in the data directory: `raft-log.redb` (log entries,
//! vote, purge and commit pointers) and `state.redb` (the applied state
//! machine and the current snapshot). Log appends are group-committed: each
//! append is visible at once and a flusher thread makes everything pending
//! durable with one fsync before openraft is told the entries are on disk.

mod command;
mod error;
mod log_store;
mod secrets;
pub mod snapshot_file;
pub use secrets::check_token_use;
mod state_machine;
mod type_config;

pub use command::{
    ClusterInfo, Command, NodeUpdate, Proposal, ProposalResult, Rejection, ReplicaUpdate, Request,
    Response, RewrappedKey, SecretCommand,
};
pub use error::StateError;
pub use log_store::LogStore;
pub use state_machine::{StateMachine, StateReader, SNAPSHOT_DIR};
pub use type_config::{CoordinatorNode, NodeId, Raft, TypeConfig};

/// File name of the Raft log database inside the data directory.
pub const LOG_FILE: &str = "raft-log.redb";
/// File name of the state machine database inside the data directory.
pub const STATE_FILE: &str = "state.redb";

/// Opens (or creates) both stores in `dir`, checking that every stored record decodes.
pub fn open_stores(
    dir: &std::path::Path,
    apply_latency: prometheus_client::metrics::histogram::Histogram,
) -> Result<(LogStore, StateMachine), StateError> {
    std::fs::create_dir_all(dir).map_err(|source| StateError::DataDir {
        path: dir.to_path_buf(),
        source,
    })?;
    let log = LogStore::open(&dir.join(LOG_FILE))?;
    let sm = StateMachine::open(&dir.join(STATE_FILE), apply_latency)?;
    Ok((log, sm))
}
