//! Container networking on one node. Each replica gets its own network
//! namespace with an address on the node's bridge, made the standard way:
//! by the CNI plugins that containerd, nerdctl and k3s use (`bridge` with
//! `host-local` addresses from the node's subnet, `portmap` for published
//! host ports, `bandwidth` for rate limits, `loopback`), invoked per the CNI
//! specification with the result kept on disk so a replica's network can be
//! taken down after an agent restart. Egress from replicas is masqueraded
//! through the node and filtered per replica by the node's firewall.
//!
//! [`NodeNetwork`] is the one entry point: `attach` a replica, `detach` it,
//! `collect` what no replica owns any more. [`cni`] runs plugins,
//! [`netns`] makes the namespaces, [`firewall`] writes the rules.

pub mod balancer;
pub mod cni;
pub mod dns;
mod error;
pub mod fastpath;
pub mod firewall;
pub mod netns;
mod node;
pub mod portlock;
pub mod proxy;
mod routes;
pub mod services;
pub mod sockets;
pub mod splice;

pub use error::NetworkError;
pub use firewall::EgressRule;
pub use node::{
    AttachRequest, Attachment, Bandwidth, HostPort, NodeNetwork, NodeNetworkConfig, Protocol,
};
pub use routes::overlapping_route;
