//! The openraft type configuration.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::command::{Proposal, ProposalResult};

/// Identifier of a coordinator.
pub type NodeId = u64;

/// What Raft membership records about a coordinator.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorNode {
    /// `host:port` of the coordinator's gRPC listener (Raft and public API).
    pub address: String,
}

impl fmt::Display for CoordinatorNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.address)
    }
}

openraft::declare_raft_types!(
    /// Cloudless's Raft types.
    pub TypeConfig:
        D = Proposal,
        R = ProposalResult,
        NodeId = NodeId,
        Node = CoordinatorNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The Raft handle.
pub type Raft = openraft::Raft<TypeConfig>;
