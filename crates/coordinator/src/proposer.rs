//! Batches concurrent writes into one Raft entry, in two lanes.
//!
//! openraft 0.9 appends, replicates and applies each `client_write` as its own
//! entry. Under load that per-entry cost dominates, so writes go through this
//! worker: it takes every request queued so far (up to [`MAX_BATCH`] and
//! [`ProposerLimits::max_entry_bytes`]) into one [`Proposal`], keeps up to
//! [`MAX_IN_FLIGHT`] proposals in flight, and hands each caller its own
//! answer. With one client a batch is one request.
//!
//! Writes a node can cause (status reports, renewals, secret token use) go
//! through the [`Lane::Node`] lane: its queue is bounded and full means
//! "try again later" (never a wait), and batches made only of node requests
//! hold at most [`NODE_IN_FLIGHT`] of the in-flight slots. Admin, membership
//! and reconciler writes ([`Lane::Cluster`]) are taken first into every
//! batch and always find a slot, so no node traffic can starve them.
//!
//! Every request is measured before it is queued: one larger than an entry
//! may be is refused with its size, so no entry ever outgrows what one
//! AppendEntries can carry.

use std::sync::Arc;

use cloudless_proto::v1::CommitInfo;
use cloudless_state::{CoordinatorNode, NodeId, Proposal, Raft, Request, Response};
use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::error::CoordinatorError;

/// Most requests in one Raft entry.
pub const MAX_BATCH: usize = 256;
/// Most proposals awaiting commit at once.
pub const MAX_IN_FLIGHT: usize = 4;
/// Most proposals made only of node requests awaiting commit at once; the
/// other slots stay free for cluster writes.
pub const NODE_IN_FLIGHT: usize = 2;
/// Queued node requests beyond which a node write is refused at once.
pub const NODE_QUEUE: usize = 1024;
/// Queued cluster requests beyond which cluster writers wait.
pub const CLUSTER_QUEUE: usize = 1024;

/// Which queue a write waits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Admin, membership and the leader's own loops: never starved.
    Cluster,
    /// Caused by a node's request: bounded, shed when full.
    Node,
}

/// Size limits of the entries this proposer makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProposerLimits {
    /// Largest encoded Raft entry payload in bytes; a single request larger
    /// than this is refused.
    pub max_entry_bytes: usize,
}

type Reply = oneshot::Sender<Result<(Response, CommitInfo), CoordinatorError>>;

/// A measured request waiting for its batch.
struct Queued {
    req: Request,
    bytes: usize,
    reply: Reply,
}

/// Sends requests to the proposer worker.
#[derive(Debug, Clone)]
pub struct ProposerHandle {
    cluster: mpsc::Sender<Queued>,
    node: mpsc::Sender<Queued>,
    limits: ProposerLimits,
}

impl std::fmt::Debug for Queued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queued")
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl ProposerHandle {
    /// Proposes `req` in `lane` and waits for its own answer.
    pub async fn propose(
        &self,
        req: Request,
        lane: Lane,
    ) -> Result<(Response, CommitInfo), CoordinatorError> {
        let bytes = postcard::experimental::serialized_size(&req)
            .map_err(|e| CoordinatorError::Fatal(format!("cannot encode a command: {e}")))?;
        if bytes > self.limits.max_entry_bytes {
            return Err(CoordinatorError::TooLarge {
                what: "the change",
                bytes,
                limit: self.limits.max_entry_bytes,
            });
        }
        let (tx, rx) = oneshot::channel();
        let queued = Queued {
            req,
            bytes,
            reply: tx,
        };
        match lane {
            Lane::Cluster => self
                .cluster
                .send(queued)
                .await
                .map_err(|_| shutting_down())?,
            Lane::Node => self.node.try_send(queued).map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => CoordinatorError::Overloaded(
                    "the leader's queue for node writes is full; retry later".into(),
                ),
                mpsc::error::TrySendError::Closed(_) => shutting_down(),
            })?,
        }
        rx.await.map_err(|_| {
            CoordinatorError::Fatal("the proposal was dropped during shutdown".into())
        })?
    }
}

impl ProposerHandle {
    /// The largest encoded request this proposer accepts.
    pub fn max_entry_bytes(&self) -> usize {
        self.limits.max_entry_bytes
    }
}

/// Splits `items` into consecutive parts of at most `max_count` items whose
/// encoded sizes add up to at most `max_bytes` (an item larger than that
/// goes alone), so a command built from each part fits one Raft entry.
pub fn split_by_size<T: serde::Serialize>(
    items: Vec<T>,
    max_count: usize,
    max_bytes: usize,
) -> Vec<Vec<T>> {
    let mut parts = Vec::new();
    let mut part = Vec::new();
    let mut bytes = 0;
    for item in items {
        let size = postcard::experimental::serialized_size(&item).unwrap_or(max_bytes);
        if !part.is_empty() && (part.len() >= max_count || bytes + size > max_bytes) {
            parts.push(std::mem::take(&mut part));
            bytes = 0;
        }
        bytes += size;
        part.push(item);
    }
    if !part.is_empty() {
        parts.push(part);
    }
    parts
}

fn shutting_down() -> CoordinatorError {
    CoordinatorError::Fatal("the coordinator is shutting down".into())
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
    limits: ProposerLimits,
    metrics: ProposerMetrics,
    cancel: CancellationToken,
) -> (ProposerHandle, tokio::task::JoinHandle<()>) {
    let (cluster_tx, cluster_rx) = mpsc::channel(CLUSTER_QUEUE);
    let (node_tx, node_rx) = mpsc::channel(NODE_QUEUE);
    let worker = Worker {
        raft,
        node_id,
        limits,
        cluster: cluster_rx,
        node: node_rx,
        slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        node_slots: Arc::new(Semaphore::new(NODE_IN_FLIGHT)),
        carry_cluster: None,
        carry_node: None,
        metrics,
    };
    let task = tokio::spawn(worker.run(cancel));
    (
        ProposerHandle {
            cluster: cluster_tx,
            node: node_tx,
            limits,
        },
        task,
    )
}

/// The proposer's metrics (docs/metrics.md).
#[derive(Debug, Clone)]
pub struct ProposerMetrics {
    proposals: prometheus_client::metrics::counter::Counter,
    batch_requests: prometheus_client::metrics::histogram::Histogram,
    seconds: prometheus_client::metrics::histogram::Histogram,
}

impl ProposerMetrics {
    /// Registers every metric in `registry`.
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
        let m = Self {
            proposals: Default::default(),
            batch_requests: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            seconds: Histogram::new(exponential_buckets(0.000_1, 2.0, 17)),
        };
        let r = registry.sub_registry_with_prefix("cloudless_raft");
        r.register(
            "proposals",
            "Requests this coordinator proposed to Raft as leader (each batch is one log entry)",
            m.proposals.clone(),
        );
        r.register(
            "proposal_batch_requests",
            "Requests per proposed log entry",
            m.batch_requests.clone(),
        );
        r.register_with_unit(
            "proposal",
            "Time from proposing a batch to its commit and apply",
            prometheus_client::registry::Unit::Seconds,
            m.seconds.clone(),
        );
        m
    }
}

struct Worker {
    metrics: ProposerMetrics,
    raft: Raft,
    node_id: NodeId,
    limits: ProposerLimits,
    cluster: mpsc::Receiver<Queued>,
    node: mpsc::Receiver<Queued>,
    slots: Arc<Semaphore>,
    node_slots: Arc<Semaphore>,
    /// Requests that did not fit the previous batch's budget; each opens
    /// the next batch of its lane.
    carry_cluster: Option<Queued>,
    carry_node: Option<Queued>,
}

/// One batch being filled.
#[derive(Default)]
struct Batch {
    items: Vec<Queued>,
    bytes: usize,
    has_cluster: bool,
}

impl Batch {
    /// Adds `q` unless it would break the byte or count budget; gives it
    /// back when it does not fit.
    fn offer(&mut self, lane: Lane, q: Queued, max_bytes: usize) -> Option<Queued> {
        if !self.items.is_empty()
            && (self.items.len() >= MAX_BATCH || self.bytes + q.bytes > max_bytes)
        {
            return Some(q);
        }
        self.bytes += q.bytes;
        self.has_cluster |= lane == Lane::Cluster;
        self.items.push(q);
        None
    }

    fn full(&self, max_bytes: usize) -> bool {
        self.items.len() >= MAX_BATCH || self.bytes >= max_bytes
    }
}

impl Worker {
    async fn run(mut self, cancel: CancellationToken) {
        loop {
            // Waiting for a slot lets more requests queue up for this batch.
            let permit = tokio::select! {
                () = cancel.cancelled() => return,
                p = self.slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            };
            let Some((batch, node_permit)) = self.fill(&cancel).await else {
                return;
            };
            self.dispatch(batch, permit, node_permit);
        }
    }

    /// Waits for at least one request and takes what fits: cluster requests
    /// first, then node requests while a node slot is free.
    async fn fill(
        &mut self,
        cancel: &CancellationToken,
    ) -> Option<(Batch, Option<OwnedSemaphorePermit>)> {
        let max = self.limits.max_entry_bytes;
        let mut batch = Batch::default();
        let mut node_permit = None;
        loop {
            self.drain(&mut batch, &mut node_permit, max);
            if !batch.items.is_empty() {
                // Node requests in a batch that also carries cluster requests
                // need no node slot of their own.
                return Some((batch, node_permit));
            }
            // Nothing to send yet: wait for a cluster request, or for a node
            // request once a node slot is free.
            let node_slots = self.node_slots.clone();
            let node = &mut self.node;
            let carry_is_node = self.carry_node.is_some();
            tokio::select! {
                biased;
                () = cancel.cancelled() => return None,
                q = self.cluster.recv() => match q {
                    Some(q) => { let _ = batch.offer(Lane::Cluster, q, max); }
                    None => return None,
                },
                got = async move {
                    let p = node_slots.acquire_owned().await.ok()?;
                    if carry_is_node {
                        return Some((p, None));
                    }
                    let q = node.recv().await?;
                    Some((p, Some(q)))
                } => match got {
                    Some((p, q)) => {
                        node_permit = Some(p);
                        if let Some(q) = q {
                            let _ = batch.offer(Lane::Node, q, max);
                        }
                    }
                    None => return None,
                },
            }
        }
    }

    /// Moves queued requests into `batch` without waiting.
    fn drain(
        &mut self,
        batch: &mut Batch,
        node_permit: &mut Option<OwnedSemaphorePermit>,
        max: usize,
    ) {
        if let Some(q) = self.carry_cluster.take() {
            self.carry_cluster = batch.offer(Lane::Cluster, q, max);
        }
        while self.carry_cluster.is_none() && !batch.full(max) {
            match self.cluster.try_recv() {
                Ok(q) => self.carry_cluster = batch.offer(Lane::Cluster, q, max),
                Err(_) => break,
            }
        }
        if self.carry_cluster.is_some() || batch.full(max) {
            if batch.has_cluster {
                // A batch with cluster requests needs no node slot.
                node_permit.take();
            }
            return;
        }
        // Node requests ride along with cluster requests (up to half the
        // entry, so cluster writes never wait behind a full entry of node
        // data), or fill a batch of their own that holds a node slot.
        if !batch.has_cluster && node_permit.is_none() {
            match self.node_slots.clone().try_acquire_owned() {
                Ok(p) => *node_permit = Some(p),
                Err(_) => return,
            }
        }
        let node_max = if batch.has_cluster { max / 2 } else { max };
        if let Some(q) = self.carry_node.take() {
            self.carry_node = batch.offer(Lane::Node, q, node_max);
        }
        while self.carry_node.is_none() && !batch.full(node_max) {
            match self.node.try_recv() {
                Ok(q) => self.carry_node = batch.offer(Lane::Node, q, node_max),
                Err(_) => break,
            }
        }
        if batch.has_cluster || batch.items.is_empty() {
            node_permit.take();
        }
    }

    fn dispatch(
        &self,
        batch: Batch,
        permit: OwnedSemaphorePermit,
        node_permit: Option<OwnedSemaphorePermit>,
    ) {
        let raft = self.raft.clone();
        let node_id = self.node_id;
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let _permits = (permit, node_permit);
            let (requests, replies): (Vec<_>, Vec<_>) =
                batch.items.into_iter().map(|q| (q.req, q.reply)).unzip();
            metrics.proposals.inc_by(requests.len() as u64);
            metrics.batch_requests.observe(requests.len() as f64);
            let started = std::time::Instant::now();
            let written = raft.client_write(Proposal { requests }).await;
            metrics.seconds.observe(started.elapsed().as_secs_f64());
            match written {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_respect_the_byte_and_count_budgets_and_keep_order() {
        let items: Vec<String> = (0..10).map(|i| format!("{i}").repeat(100)).collect();
        // 101 encoded bytes each: three fit in 310 bytes.
        let parts = split_by_size(items.clone(), 100, 310);
        assert_eq!(parts.iter().map(Vec::len).collect::<Vec<_>>(), [3, 3, 3, 1]);
        assert_eq!(parts.concat(), items);
        let parts = split_by_size(items.clone(), 4, 1 << 20);
        assert_eq!(parts.iter().map(Vec::len).collect::<Vec<_>>(), [4, 4, 2]);
        // An item over the budget goes alone.
        let parts = split_by_size(vec!["a".repeat(500), "b".into()], 10, 100);
        assert_eq!(parts.len(), 2);
        assert!(split_by_size(Vec::<String>::new(), 10, 100).is_empty());
    }
}
