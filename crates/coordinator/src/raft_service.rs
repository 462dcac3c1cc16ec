//! The receiving side of Raft traffic.

use cloudless_proto::v1::raft_service_server::RaftService;
use cloudless_proto::v1::RaftPayload;
use cloudless_state::Raft;

use crate::authz::{require, Allow};
use crate::error::CoordinatorError;
use crate::handle::CoordinatorHandle;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::{Request, Response, Status};

/// Hands decoded Raft RPCs to the local Raft.
#[derive(Clone)]
pub struct RaftGrpc {
    raft: Raft,
    handle: CoordinatorHandle,
}

impl std::fmt::Debug for RaftGrpc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RaftGrpc")
    }
}

impl RaftGrpc {
    /// Serves the Raft of `handle`, to coordinators only.
    pub fn new(handle: CoordinatorHandle) -> Self {
        Self {
            raft: handle.raft().clone(),
            handle,
        }
    }
}

/// The request's payload, if the sender speaks this release's log format
/// (decoding another format's payload could misread it).
fn decode<T: DeserializeOwned>(req: Request<RaftPayload>, what: &str) -> Result<T, Status> {
    let peer = req.remote_addr().map_or_else(
        || "the sender".to_owned(),
        |a| format!("the coordinator at {a}"),
    );
    let p = req.into_inner();
    cloudless_state::check_peer_log_format(&peer, p.log_format)
        .map_err(|e| Status::from(CoordinatorError::FailedPrecondition(e)))?;
    postcard::from_bytes(&p.data).map_err(|e| {
        Status::from(CoordinatorError::InvalidArgument(format!(
            "malformed {what} payload: {e}"
        )))
    })
}

fn encode<T: Serialize>(value: &T) -> Result<Response<RaftPayload>, Status> {
    postcard::to_allocvec(value)
        .map(|data| {
            Response::new(RaftPayload {
                data,
                log_format: cloudless_state::LOG_FORMAT,
            })
        })
        .map_err(|e| {
            Status::from(CoordinatorError::Internal(format!(
                "encoding raft response: {e}"
            )))
        })
}

#[tonic::async_trait]
impl RaftService for RaftGrpc {
    async fn append_entries(
        &self,
        req: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        require(&self.handle, &req, Allow::Coordinator)?;
        let rpc = decode(req, "append_entries")?;
        encode(&self.raft.append_entries(rpc).await)
    }

    async fn vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        require(&self.handle, &req, Allow::Coordinator)?;
        let rpc = decode(req, "vote")?;
        encode(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        req: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        require(&self.handle, &req, Allow::Coordinator)?;
        let rpc = decode(req, "install_snapshot")?;
        encode(&self.raft.install_snapshot(rpc).await)
    }
}
