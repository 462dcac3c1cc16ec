//! The one client of a Cloudless cluster, shared by `cloudlessctl`, the
//! agent, the tests and the benchmarks:
//!
//! - [`HostPort`]: the `host:port` parser (`[v6]:port` included);
//! - [`ClientTls`] and [`ClientConfig`]: mTLS credentials, loaded from the
//!   `cloudlessctl` configuration file;
//! - [`endpoint`]/[`channel`]: `https` when TLS is on, the server name from
//!   the host, connect timeout, TCP_NODELAY;
//! - [`Cluster`]: tries the coordinators in turn, follows the leader hint
//!   ([`LEADER_HINT_KEY`]) and retries with jittered exponential
//!   [`Backoff`], one cached channel per address.

mod backoff;
mod cluster;
mod config;
mod endpoint;
pub mod errors;
mod host_port;
mod leader;
mod metadata;
mod tls;

pub use backoff::{Backoff, BackoffPolicy};
pub use cluster::{CallError, Cluster, ClusterOptions, RetryPolicy};
pub use config::{check_key_mode, ClientConfig, ConfigError, CredentialPaths};
pub use endpoint::{channel, endpoint, ChannelOptions, EndpointError};
pub use errors::{reason, Reason};
pub use host_port::{HostPort, HostPortError};
pub use leader::LeaderFollower;
pub use metadata::{leader_hint, FORWARDED_KEY, LEADER_HINT_KEY};
pub use tls::{server_only_tls, ClientTls};
