//! Batches concurrent writes into one Raft entry.
//!
//! openraft 0.9 appends, replicates and applies each `client_write` as its own
//! entry. Under load that per-entry cost dominates, so writes go through this
//! worker: it takes every request queued so far (up to [`MAX_BATCH`]) into
//! one [`Proposal`], keeps up to [`MAX_IN_FLIGHT`] proposals in flight, and
//! hands each caller its own answer. With one client a batch is one request.

use std::sync::Arc;

use cloudless_proto::v1::CommitInfo;
use cloudless_state::{CoordinatorNode, NodeId, Proposal, Raft, Request, Response};
use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::error::CoordinatorError;

/// Most requests in one Raft entry.
pub const MAX_BATCH: usize = 256;
/// Most proposals awaiting commit at once.
pub const MAX_IN_FLIGHT: usize = 4;

type Reply = oneshot::Sender<Result<(Response, CommitInfo), CoordinatorError>>;

/// Sends requests to the proposer worker.
#[derive(Debug, Clone)]
pub struct ProposerHandle {
    tx: mpsc::Sender<(Request, Reply)>,
}

impl ProposerHandle {
    /// Proposes `req` and waits for its own answer.
    pub async fn propose(&self, req: Request) -> Result<(Response, CommitInfo), CoordinatorError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send((req, tx))
            .await
            .map_err(|_| CoordinatorError::Fatal("the coordinator is shutting down".into()))?;
        rx.await.map_err(|_| {
            CoordinatorError::Fatal("the proposal was dropped during shutdown".into())
        })?
    }
}

/// Maps a Raft write error; called once per waiting caller.
pub(crate) fn write_error(
    e: &RaftError<NodeId, ClientWriteError<NodeId, CoordinatorNode>>,
) -> CoordinatorError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => CoordinatorError::NotLeader {
            leader: f
                .leader_id
                .zip(f.leader_node.as_ref().map(|n| n.address.clone())),
        },
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            CoordinatorError::Membership(e.to_string())
        }
        RaftError::Fatal(f) => CoordinatorError::Fatal(f.to_string()),
    }
}

/// Starts the worker; it stops when `cancel` fires.
pub fn spawn(
    raft: Raft,
    node_id: NodeId,
    cancel: CancellationToken,
) -> (ProposerHandle, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(MAX_BATCH * 4);
    let task = tokio::spawn(run(raft, node_id, rx, cancel));
    (ProposerHandle { tx }, task)
}

async fn run(
    raft: Raft,
    node_id: NodeId,
    mut rx: mpsc::Receiver<(Request, Reply)>,
    cancel: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    loop {
        let first = tokio::select! {
            () = cancel.cancelled() => return,
            first = rx.recv() => match first { Some(f) => f, None => return },
        };
        // Waiting for a slot lets more requests queue up for this batch.
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut requests = vec![first.0];
        let mut replies = vec![first.1];
        while requests.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok((req, reply)) => {
                    requests.push(req);
                    replies.push(reply);
                }
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match raft.client_write(Proposal { requests }).await {
                Ok(resp) => {
                    let commit = CommitInfo {
                        log_index: resp.log_id.index,
                        term: resp.log_id.leader_id.term,
                        leader_id: node_id,
                    };
                    let mut responses = resp.data.responses.into_iter();
                    for reply in replies {
                        let answer = match responses.next() {
                            Some(Response::Rejected(r)) => Err(r.into()),
                            Some(r) => Ok((r, commit)),
                            None => Err(CoordinatorError::Fatal(
                                "state machine returned too few responses".into(),
                            )),
                        };
                        let _caller_gone = reply.send(answer);
                    }
                }
                Err(e) => {
                    for reply in replies {
                        let _caller_gone = reply.send(Err(write_error(&e)));
                    }
                }
            }
        });
    }
}
