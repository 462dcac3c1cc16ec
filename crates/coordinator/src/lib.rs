//! The Cloudless coordinator: a Raft-replicated control plane with a gRPC API.

mod admins;
mod admission;
mod agent_service;
mod assignments;
mod authz;
mod clock;
mod cluster_service;
pub mod config;
mod coordinator;
mod error;
mod handle;
mod identity;
mod leader_lease;
mod membership;
mod metrics;
mod node_service;
mod proposer;
mod raft_network;
mod raft_service;
mod rate_limit;
mod reconciler;
mod refusals;
mod rejoin;
mod removal;
mod secret_service;
mod services;
mod tls;
mod tunnel;
mod workload_service;

pub use clock::now_ms;
pub use config::{ConfigError, ConfigSources, CoordinatorConfig};
pub use coordinator::{Coordinator, StartMode};
pub use error::{CoordinatorError, StartError, FORWARDED_KEY, LEADER_HINT_KEY};
pub use handle::CoordinatorHandle;
pub use rejoin::RejoinRefusal;
pub use tls::issue_admin_offline;
