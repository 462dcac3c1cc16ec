//! The Cloudless agent: enrollment with a join token, the node identity on
//! disk, renewal, rejoining after the certificate expired offline, and
//! heartbeats to the leader; running the replicas assigned to the node
//! (`workloads`: a pure diff of assignments against what runs, executed by a
//! runner over the runtime crate's `ContainerRuntime`), their secrets, the
//! overlay mesh between them, and operators' logs and exec (`tunnel`).

mod agent;
mod client;
mod identity;
pub mod mesh;
mod metrics;
pub mod secrets;
mod services;
mod sysinfo;
mod tunnel;
pub mod workloads;

use std::path::Path;

pub use agent::{load_or_enroll, run, AgentConfig};
pub use client::{enroll, rejoin, Coordinators};
pub use identity::NodeIdentity;
pub use sysinfo::DeviceProbe;
pub use workloads::{NetworkSettings, RuntimeConfig, SecurityPolicyConfig, DEFAULT_PIDS_LIMIT};

/// Why the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The node identity on disk or from a coordinator is unusable.
    #[error("node identity: {0}")]
    Identity(String),
    /// Bad configuration; the message names the setting.
    #[error("configuration: {0}")]
    Config(String),
    /// A coordinator refused the call (the message says why).
    #[error("{what}: {status}")]
    Refused {
        /// The call.
        what: &'static str,
        /// The answer.
        status: tonic::Status,
    },
    /// No coordinator could be reached.
    #[error("no coordinator reachable ({0})")]
    Unreachable(String),
    /// The cluster removed this node; it must enroll again.
    #[error("this node was removed from the cluster: {0}")]
    Removed(String),
    /// The node's certificate expired and the cluster refuses to renew it
    /// without a join token (past the rejoin grace, rejoining turned off, a
    /// newer certificate exists, or the proof failed).
    #[error("the cluster refused to let node {node_id} rejoin: {reason} (to enroll again, remove node.key and node.crt from the agent's data dir and start it with --join-token <new token> --ca-cert <ca.crt>)")]
    RejoinRefused {
        /// The node.
        node_id: String,
        /// The coordinator's answer.
        reason: String,
    },
}

impl AgentError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.display().to_string(),
            source,
        }
    }
}
