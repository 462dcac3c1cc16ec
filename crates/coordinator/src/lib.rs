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
mod forward;
mod handle;
mod identity;
mod leader_lease;
mod liveness;
mod membership;
mod metrics;
mod node_service;
mod node_subnets;
mod peer_cache;
mod proposer;
mod raft_network;
mod raft_service;
mod reconciler;
mod refusals;
mod rejoin;
mod removal;
mod revision_cache;
mod scheduler_input;
mod secret_service;
mod serve;
mod service_vips;
mod services;
mod state_metrics;
mod tls;
mod tunnel;
mod workload_service;

use cloudless_types::rate_limit;

pub use admins::issue_admin_offline;
pub use clock::now_ms;
pub use config::{ConfigError, ConfigSources, CoordinatorConfig};
pub use coordinator::{Coordinator, StartMode};
pub use error::{CoordinatorError, RejoinRefusal, StartError, FORWARDED_KEY, LEADER_HINT_KEY};
pub use handle::CoordinatorHandle;
