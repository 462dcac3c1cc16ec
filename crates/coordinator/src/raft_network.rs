//! openraft's network over tonic: two lazily connected channels per peer.
//!
//! openraft 0.9 gives every AppendEntries the heartbeat interval (100 ms by
//! default) to complete and retries the same range when it does not. An
//! entry batch that cannot cross the link in that time would never
//! replicate, and every later write would wait behind it. So:
//! - small messages (votes, heartbeats, small appends) use a `control`
//!   connection of their own, never queued behind bulk bytes;
//! - an AppendEntries larger than [`SMALL_MESSAGE`] goes on a `bulk`
//!   connection as a task that outlives openraft's deadline, with its own
//!   deadline fitted to its size (`1 s + bytes / min_link_bytes_per_s`).
//!   openraft's retry of the same range joins that task instead of starting
//!   over; a retry with a longer range is answered `PayloadTooLarge` with
//!   the in-flight entry count, so openraft asks for exactly that range;
//! - a message over [`MAX_RAFT_MESSAGE`] is `PayloadTooLarge` (openraft then
//!   sends fewer entries); the log store also caps each batch by bytes.
// openraft's RPCError is the error type its network trait returns.
#![allow(clippy::result_large_err)]

use std::time::Duration;

use cloudless_proto::v1::raft_service_client::RaftServiceClient;
use cloudless_proto::v1::RaftPayload;
use cloudless_state::{CoordinatorNode, NodeId, TypeConfig};
use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{LogId, Vote};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// Largest gRPC message between coordinators (snapshot chunks are far smaller).
pub const MAX_RAFT_MESSAGE: usize = 64 * 1024 * 1024;

/// AppendEntries up to this many encoded bytes go on the control connection
/// within openraft's deadline; larger ones on the bulk connection.
pub const SMALL_MESSAGE: usize = 64 * 1024;

/// What the network plans for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkPlan {
    /// The slowest link to plan for, bytes per second: a bulk AppendEntries
    /// of `n` bytes may take `1 s + n / this`.
    pub min_link_bytes_per_s: u64,
    /// Test only: delay every message as if the link carried this many
    /// bytes per second (0: off).
    pub emulate_link_bytes_per_s: u64,
}

impl LinkPlan {
    fn bulk_deadline(&self, bytes: usize) -> Duration {
        let rate = self.min_link_bytes_per_s.max(1);
        Duration::from_secs(1) + Duration::from_millis((bytes as u64).saturating_mul(1000) / rate)
    }

    /// The emulated transfer time of `bytes` (zero unless a test asked).
    fn emulated_delay(&self, bytes: usize) -> Duration {
        if self.emulate_link_bytes_per_s == 0 {
            return Duration::ZERO;
        }
        Duration::from_micros(
            (bytes as u64).saturating_mul(1_000_000) / self.emulate_link_bytes_per_s,
        )
    }
}

/// Creates a [`PeerClient`] per target, over mTLS when the coordinator has TLS material.
#[derive(Debug, Clone)]
pub struct Network {
    tls: Option<std::sync::Arc<crate::tls::TlsMaterial>>,
    plan: LinkPlan,
}

impl Network {
    /// A network using `tls` (plaintext when `None`).
    pub fn new(tls: Option<std::sync::Arc<crate::tls::TlsMaterial>>, plan: LinkPlan) -> Self {
        Self { tls, plan }
    }

    /// The TLS generation channels made now present (see `TlsMaterial::renew`).
    fn generation(&self) -> u64 {
        self.tls.as_ref().map_or(0, |t| t.generation())
    }

    fn channel(&self, target: NodeId, node: &CoordinatorNode) -> Result<Channel, String> {
        crate::tls::endpoint(&node.address, self.tls.as_deref())
            .map(|e| {
                e.connect_timeout(Duration::from_secs(1))
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(10))
                    .connect_lazy()
            })
            .map_err(|e| format!("node {target}: {e}"))
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &CoordinatorNode) -> PeerClient {
        // Each lazily connected channel has its own TCP connection.
        PeerClient {
            target,
            control: self.channel(target, node),
            bulk: self.channel(target, node),
            network: self.clone(),
            node: node.clone(),
            generation: self.generation(),
            plan: self.plan,
            in_flight: None,
            missed: None,
        }
    }
}

type AppendResult =
    Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, CoordinatorNode, RaftError<NodeId>>>;

/// A bulk AppendEntries still crossing the link.
struct InFlight {
    vote: Vote<NodeId>,
    prev: Option<LogId<NodeId>>,
    last: Option<LogId<NodeId>>,
    entries: u64,
    task: JoinHandle<AppendResult>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The Raft client for one peer.
pub struct PeerClient {
    target: NodeId,
    control: Result<Channel, String>,
    bulk: Result<Channel, String>,
    network: Network,
    node: CoordinatorNode,
    /// The TLS generation the channels present.
    generation: u64,
    plan: LinkPlan,
    in_flight: Option<InFlight>,
    /// (vote, prev, entries) of a bulk append that missed its own deadline:
    /// a retry of that range asks openraft for half as many entries.
    missed: Option<(Vote<NodeId>, Option<LogId<NodeId>>, u64)>,
}

impl std::fmt::Debug for PeerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerClient")
            .field("target", &self.target)
            .field("in_flight", &self.in_flight.as_ref().map(|i| i.entries))
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct WireError(String);

/// Which RPC a call makes.
#[derive(Debug, Clone, Copy)]
enum Method {
    AppendEntries,
    Vote,
    InstallSnapshot,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::AppendEntries => "append_entries",
            Method::Vote => "vote",
            Method::InstallSnapshot => "install_snapshot",
        }
    }
}

/// Sends one encoded message on `channel` and decodes the answer.
async fn send<Resp, E>(
    target: NodeId,
    channel: Channel,
    method: Method,
    data: Vec<u8>,
    timeout: Duration,
    delay: Duration,
) -> Result<Resp, RPCError<NodeId, CoordinatorNode, E>>
where
    Resp: DeserializeOwned,
    E: std::error::Error + DeserializeOwned,
{
    let mut request = tonic::Request::new(RaftPayload {
        data,
        log_format: cloudless_state::LOG_FORMAT,
    });
    request.set_timeout(timeout);
    let mut client = RaftServiceClient::new(channel)
        .max_decoding_message_size(MAX_RAFT_MESSAGE)
        .max_encoding_message_size(MAX_RAFT_MESSAGE);
    let call = async {
        // An emulated slow link spends the message's transfer time inside
        // its deadline, as a real one would.
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        match method {
            Method::AppendEntries => client.append_entries(request).await,
            Method::Vote => client.vote(request).await,
            Method::InstallSnapshot => client.install_snapshot(request).await,
        }
    };
    let reply = tokio::time::timeout(timeout, call)
        .await
        .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("deadline passed")));
    let reply = reply.map_err(|status| {
        let e = WireError(format!("{} to node {target}: {status}", method.name()));
        match status.code() {
            // No connection, or a peer of another log format (it will not
            // change by retrying at once): openraft backs off.
            tonic::Code::Unavailable | tonic::Code::FailedPrecondition => {
                RPCError::Unreachable(Unreachable::new(&e))
            }
            // A slow answer is not a dead peer: a back-off (500 ms, with no
            // heartbeats) would outlast the election timeout and depose a
            // leader that is merely busy.
            _ => RPCError::Network(NetworkError::new(&e)),
        }
    })?;
    let reply = reply.into_inner();
    cloudless_state::check_peer_log_format(&format!("node {target}"), reply.log_format)
        .map_err(|e| RPCError::Unreachable(Unreachable::new(&WireError(e))))?;
    let result: Result<Resp, E> =
        postcard::from_bytes(&reply.data).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
    result.map_err(|e| RPCError::RemoteError(RemoteError::new(target, e)))
}

impl PeerClient {
    /// Rebuilds the channels after this coordinator's certificate was
    /// renewed (the old one would expire on long-lived connections).
    fn refresh(&mut self) {
        let generation = self.network.generation();
        if generation != self.generation {
            self.control = self.network.channel(self.target, &self.node);
            self.bulk = self.network.channel(self.target, &self.node);
            self.generation = generation;
        }
    }

    fn channel<E: std::error::Error>(
        &self,
        bulk: bool,
    ) -> Result<Channel, RPCError<NodeId, CoordinatorNode, E>> {
        let ch = if bulk { &self.bulk } else { &self.control };
        ch.clone()
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&WireError(e))))
    }

    async fn call<Req, Resp, E>(
        &self,
        method: Method,
        req: &Req,
        option: &RPCOption,
        bulk: bool,
    ) -> Result<Resp, RPCError<NodeId, CoordinatorNode, E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let channel = self.channel(bulk)?;
        let data =
            postcard::to_allocvec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let delay = self.plan.emulated_delay(data.len());
        send(self.target, channel, method, data, option.hard_ttl(), delay).await
    }

    /// Waits for the in-flight bulk append (cancel-safe: if openraft's
    /// deadline drops this future, the transfer goes on and the next retry
    /// of the same range waits again).
    async fn join_in_flight(&mut self) -> AppendResult {
        let Some(f) = self.in_flight.as_mut() else {
            return Err(RPCError::Network(NetworkError::new(&WireError(
                "no append in flight".into(),
            ))));
        };
        let result = (&mut f.task).await;
        let (vote, prev, entries) = (f.vote, f.prev, f.entries);
        self.in_flight = None;
        let result = result.unwrap_or_else(|e| {
            Err(RPCError::Network(NetworkError::new(&WireError(format!(
                "append_entries to node {}: {e}",
                self.target
            )))))
        });
        match result {
            Ok(r) => Ok(r),
            // A bulk transfer that failed or missed its deadline is a slow
            // link, not a dead peer: `Unreachable` would make openraft back
            // off for 500 ms without heartbeats (longer than an election
            // timeout). Report it as a network error, and answer the retry
            // of the same range with a smaller one.
            Err(RPCError::Unreachable(u)) => {
                self.missed = Some((vote, prev, entries));
                Err(RPCError::Network(NetworkError::new(&u)))
            }
            Err(e) => Err(e),
        }
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> AppendResult {
        self.refresh();
        let entries = rpc.entries.len() as u64;
        if entries == 0 {
            // Heartbeats never wait behind a bulk transfer.
            return self.call(Method::AppendEntries, &rpc, &option, false).await;
        }
        let last = rpc.entries.last().map(|e| e.log_id);
        if let Some((vote, prev, n)) = self.missed.take() {
            if vote == rpc.vote && prev == rpc.prev_log_id && n > 1 && entries >= n {
                return Err(RPCError::PayloadTooLarge(
                    PayloadTooLarge::new_entries_hint(n / 2),
                ));
            }
        }
        if let Some(f) = &self.in_flight {
            if f.vote == rpc.vote && f.prev == rpc.prev_log_id {
                if f.last == last {
                    return self.join_in_flight().await;
                }
                if entries > f.entries {
                    // Ask openraft for exactly the range already on its way.
                    return Err(RPCError::PayloadTooLarge(
                        PayloadTooLarge::new_entries_hint(f.entries),
                    ));
                }
            }
            self.in_flight = None;
        }
        let data =
            postcard::to_allocvec(&rpc).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        if data.len() > MAX_RAFT_MESSAGE {
            if entries > 1 {
                return Err(RPCError::PayloadTooLarge(
                    PayloadTooLarge::new_entries_hint(entries / 2),
                ));
            }
            return Err(RPCError::Network(NetworkError::new(&WireError(format!(
                "append_entries to node {}: one entry of {} bytes exceeds the {MAX_RAFT_MESSAGE}-byte message limit",
                self.target,
                data.len()
            )))));
        }
        let delay = self.plan.emulated_delay(data.len());
        if data.len() <= SMALL_MESSAGE {
            let channel = self.channel(false)?;
            return send(
                self.target,
                channel,
                Method::AppendEntries,
                data,
                option.hard_ttl(),
                delay,
            )
            .await;
        }
        let channel = self.channel(true)?;
        let deadline = self.plan.bulk_deadline(data.len());
        tracing::debug!(
            target_node = self.target,
            bytes = data.len(),
            entries,
            ?deadline,
            "bulk append"
        );
        let task = tokio::spawn(send(
            self.target,
            channel,
            Method::AppendEntries,
            data,
            deadline,
            delay,
        ));
        self.in_flight = Some(InFlight {
            vote: rpc.vote,
            prev: rpc.prev_log_id,
            last,
            entries,
            task,
        });
        self.join_in_flight().await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, CoordinatorNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.refresh();
        self.call(Method::InstallSnapshot, &rpc, &option, true)
            .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, CoordinatorNode, RaftError<NodeId>>> {
        self.refresh();
        self.call(Method::Vote, &rpc, &option, false).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bulk_deadline_fits_the_payload() {
        let plan = LinkPlan {
            min_link_bytes_per_s: 1 << 20,
            emulate_link_bytes_per_s: 0,
        };
        assert_eq!(plan.bulk_deadline(0), Duration::from_secs(1));
        assert_eq!(plan.bulk_deadline(4 << 20), Duration::from_secs(5));
        assert_eq!(plan.emulated_delay(1 << 20), Duration::ZERO);
        let slow = LinkPlan {
            emulate_link_bytes_per_s: 1 << 20,
            ..plan
        };
        assert_eq!(slow.emulated_delay(1 << 19), Duration::from_millis(500));
    }
}
