//! The Cloudless overlay: a QUIC mesh between agents (and coordinators acting
//! as relays) that carries service traffic between workloads on different
//! devices.
//!
//! - Every connection is QUIC with TLS 1.3 and mutual certificates from the
//!   cluster CA ([`OverlayTls`]); the peer's identity comes from its
//!   certificate, and a dialer checks it is the node it meant to reach.
//! - Each forwarded TCP connection is one bidirectional QUIC stream that opens
//!   with a small JSON request ([`wire::StreamRequest`]): `Open` a target on
//!   the receiving node (resolved by its [`Resolver`]), or ask a relay node to
//!   `Relay` the stream to another node.
//! - A UDP flow is a stream too (its opening, admission and end); between
//!   two nodes of this release, directly or through a relay of this release,
//!   its datagrams travel as QUIC DATAGRAM frames tagged with the stream's
//!   id, lost as UDP would be lost, and only those too large for a packet on
//!   the stream, each behind its length ([`datagram`]); the receiving node's [`Resolver`]
//!   answers such a target with a connected UDP socket ([`Connected::Udp`]).
//! - Connections are used in both directions: a node behind NAT dials its
//!   relays and keeps those connections alive, so the relays can open streams
//!   back to it over the same connection ([`Overlay::set_relays`]).
//! - A node learns the address others see it at with `WhoAmI`
//!   ([`Overlay::observed_address`]).
//! - An [`Admission`] policy can refuse peers the CA still vouches for (a
//!   coordinator's relay refuses nodes removed from the cluster).

mod admission;
pub mod datagram;
mod mesh;
mod pipe;
mod tls;
pub mod wire;

pub use admission::{Admission, AdmitAll};
pub use mesh::{
    ConnectFuture, Connected, Overlay, OverlayConfig, OverlayStats, OverlayStream, Resolver,
    StaticResolver, Traversal,
};
pub use tls::{OverlayTls, ALPN, ALPN_DATAGRAMS, ALPN_RELAYED_DATAGRAMS};

/// What went wrong in the overlay.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// Certificates, keys or the TLS configuration.
    #[error("overlay TLS: {0}")]
    Tls(String),
    /// A malformed or oversized frame, or an unexpected reply.
    #[error("overlay protocol: {0}")]
    Protocol(String),
    /// Socket errors.
    #[error("overlay I/O: {0}")]
    Io(String),
    /// No way to reach the peer (no address answered, no relay could).
    #[error("cannot reach {peer}: {detail}")]
    Unreachable {
        /// The peer's identity URI.
        peer: String,
        /// What each attempt gave.
        detail: String,
    },
    /// The address answered with another node's certificate.
    #[error("{address} is {found}, not {expected}")]
    WrongPeer {
        /// Dialed address.
        address: String,
        /// Who we meant to reach.
        expected: String,
        /// Who answered.
        found: String,
    },
    /// The far end refused the stream (unknown target, not relaying, ...).
    #[error("{peer} refused: {reason}")]
    Refused {
        /// The refusing node.
        peer: String,
        /// Its reason.
        reason: String,
    },
}
