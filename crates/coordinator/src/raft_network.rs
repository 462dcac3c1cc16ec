//! openraft's network over tonic: one lazily connected channel per peer.

use std::time::Duration;

use cloudless_proto::v1::raft_service_client::RaftServiceClient;
use cloudless_proto::v1::RaftPayload;
use cloudless_state::{CoordinatorNode, NodeId, TypeConfig};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::Channel;

/// Largest gRPC message between coordinators (snapshot chunks are far smaller).
pub const MAX_RAFT_MESSAGE: usize = 64 * 1024 * 1024;

/// Creates a [`PeerClient`] per target, over mTLS when the coordinator has TLS material.
#[derive(Debug, Clone, Default)]
pub struct Network {
    tls: Option<std::sync::Arc<crate::tls::TlsMaterial>>,
}

impl Network {
    /// A network using `tls` (plaintext when `None`).
    pub fn new(tls: Option<std::sync::Arc<crate::tls::TlsMaterial>>) -> Self {
        Self { tls }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &CoordinatorNode) -> PeerClient {
        let channel = crate::tls::endpoint(&node.address, self.tls.as_deref())
            .map(|e| {
                e.connect_timeout(Duration::from_secs(1))
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(10))
                    .connect_lazy()
            })
            .map_err(|e| format!("node {target}: {e}"));
        PeerClient { target, channel }
    }
}

/// The Raft client for one peer.
#[derive(Debug)]
pub struct PeerClient {
    target: NodeId,
    channel: Result<Channel, String>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct WireError(String);

impl PeerClient {
    async fn call<Req, Resp, E>(
        &self,
        method: &'static str,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, CoordinatorNode, E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let channel = self
            .channel
            .as_ref()
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&WireError(e.clone()))))?;
        let data =
            postcard::to_allocvec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut request = tonic::Request::new(RaftPayload { data });
        request.set_timeout(option.hard_ttl());
        let mut client = RaftServiceClient::new(channel.clone())
            .max_decoding_message_size(MAX_RAFT_MESSAGE)
            .max_encoding_message_size(MAX_RAFT_MESSAGE);
        let reply = match method {
            "append_entries" => client.append_entries(request).await,
            "vote" => client.vote(request).await,
            _ => client.install_snapshot(request).await,
        };
        let reply = reply.map_err(|status| {
            let e = WireError(format!("{method} to node {}: {status}", self.target));
            match status.code() {
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
                    RPCError::Unreachable(Unreachable::new(&e))
                }
                _ => RPCError::Network(NetworkError::new(&e)),
            }
        })?;
        let result: Result<Resp, E> = postcard::from_bytes(&reply.into_inner().data)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, CoordinatorNode, RaftError<NodeId>>>
    {
        self.call("append_entries", &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, CoordinatorNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call("install_snapshot", &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, CoordinatorNode, RaftError<NodeId>>> {
        self.call("vote", &rpc, &option).await
    }
}
