//! The handle every service and loop shares: this coordinator's Raft node,
//! its applied state, the proposer, and the caches and limits that outlive
//! one call.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cloudless_proto::v1;
use cloudless_state::{
    ClusterInfo, Command, CoordinatorNode, NodeId, Raft, Request, Response, StateReader,
};
use openraft::error::{CheckIsLeaderError, ClientWriteError, ForwardToLeader, RaftError};
use openraft::{ChangeMembers, ServerState};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::clock::now_ms;
use crate::error::CoordinatorError;
use crate::identity::{IdentityCache, IdentityKeys};
use crate::proposer::{write_error, ProposerHandle};

/// Cheap-to-clone handle used by the API services.
#[derive(Clone)]
pub struct CoordinatorHandle {
    inner: Arc<HandleInner>,
}

/// What a [`CoordinatorHandle`] shares; assembled by
/// [`crate::coordinator::Coordinator::start`].
pub(crate) struct HandleInner {
    pub(crate) id: NodeId,
    pub(crate) address: String,
    pub(crate) raft: Raft,
    pub(crate) reader: StateReader,
    pub(crate) committed: Arc<AtomicU64>,
    /// Channels to other coordinators, with the TLS generation they present.
    pub(crate) peers: Mutex<HashMap<String, (u64, Channel)>>,
    pub(crate) proposer: ProposerHandle,
    pub(crate) master_key: Option<Arc<cloudless_pki::MasterKey>>,
    pub(crate) master_key_source: String,
    pub(crate) identity: IdentityCache,
    pub(crate) tls: Option<Arc<crate::tls::TlsMaterial>>,
    pub(crate) peer_cache: crate::peer_cache::PeerCache,
    pub(crate) liveness: Arc<crate::liveness::Liveness>,
    pub(crate) tunnels: Arc<crate::tunnel::Tunnels>,
    /// The overlay relay and the address agents dial it at.
    pub(crate) relay: Option<(cloudless_overlay::Overlay, String)>,
    /// Fires when the API stops; long-lived streams end on it.
    pub(crate) stopping: CancellationToken,
    /// Writes each node may cause.
    pub(crate) node_writes: crate::rate_limit::RateLimiter,
    /// Bytes of write requests each node may send.
    pub(crate) node_write_bytes: crate::rate_limit::RateLimiter,
    /// Events each node may record (beyond: dropped, not refused).
    pub(crate) node_events: crate::rate_limit::RateLimiter,
    /// Enrollment attempts per source address.
    pub(crate) enrolls: crate::rate_limit::RateLimiter,
    /// Counters of the secrets and enrollment APIs.
    pub(crate) api_metrics: crate::metrics::ApiMetrics,
}

impl std::fmt::Debug for CoordinatorHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordinatorHandle")
            .field("id", &self.inner.id)
            .finish()
    }
}

/// The refusal of `who`, over `limiter`'s rate of `what`.
fn rate_limited(
    limiter: &crate::rate_limit::RateLimiter,
    who: String,
    what: &'static str,
) -> CoordinatorError {
    let rate = limiter.rate();
    CoordinatorError::RateLimited {
        who,
        what,
        rate_per_s: rate.per_s,
        burst: rate.burst,
    }
}

fn enroll_key(remote: Option<SocketAddr>) -> String {
    remote.map_or_else(
        || "unknown".to_owned(),
        |a| crate::rate_limit::address_key(a.ip()),
    )
}

fn leader_of(f: &ForwardToLeader<NodeId, CoordinatorNode>) -> CoordinatorError {
    CoordinatorError::NotLeader {
        leader: f
            .leader_id
            .zip(f.leader_node.as_ref().map(|n| n.address.clone())),
    }
}

impl CoordinatorHandle {
    /// A handle on `inner`.
    pub(crate) fn new(inner: HandleInner) -> Self {
        Self {
            inner: Arc::new(inner),
        }
    }

    /// This coordinator's node id.
    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// The overlay relay's endpoint, when it runs.
    pub(crate) fn relay_overlay(&self) -> Option<&cloudless_overlay::Overlay> {
        self.inner.relay.as_ref().map(|(o, _)| o)
    }

    /// The overlay relay's identity and address, when it runs.
    pub fn relay(&self) -> Option<(cloudless_pki::Identity, &str)> {
        self.inner
            .relay
            .as_ref()
            .map(|(o, a)| (o.identity().clone(), a.as_str()))
    }

    /// The address this coordinator advertises.
    pub fn address(&self) -> &str {
        &self.inner.address
    }

    /// The Raft handle.
    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// The applied state.
    pub fn reader(&self) -> &StateReader {
        &self.inner.reader
    }

    /// Proposes `command` and waits until it is committed and applied. A
    /// rejection by the state machine comes back as an error.
    pub async fn write(
        &self,
        idempotency_key: Option<String>,
        command: Command,
    ) -> Result<(Response, v1::CommitInfo), CoordinatorError> {
        let req = Request {
            idempotency_key,
            proposed_at_ms: now_ms(),
            command,
        };
        self.inner
            .proposer
            .propose(req, crate::proposer::Lane::Cluster)
            .await
    }

    /// Proposes `items` as consecutive `make(part)` commands, each small
    /// enough for one Raft entry (a quarter of the entry limit, so a part
    /// can share a batch), in order; stops at the first failure.
    pub async fn write_in_parts<T: serde::Serialize>(
        &self,
        items: Vec<T>,
        make: impl Fn(Vec<T>) -> Command,
    ) -> Result<(), CoordinatorError> {
        let budget = self.part_bytes();
        for part in crate::proposer::split_by_size(items, usize::MAX, budget) {
            if let (Response::Rejected(r), _) = self.write(None, make(part)).await? {
                return Err(r.into());
            }
        }
        Ok(())
    }

    /// The byte budget of one part of a command split with
    /// [`Self::write_in_parts`].
    pub(crate) fn part_bytes(&self) -> usize {
        self.inner.proposer.max_entry_bytes() / 4
    }

    /// The per-node limiter of recorded events.
    pub(crate) fn node_events(&self) -> &crate::rate_limit::RateLimiter {
        &self.inner.node_events
    }

    /// Takes one of `node_id`'s write tokens, or says it has none left.
    /// Call before any costly work a node's request causes.
    pub(crate) fn admit_node_write(&self, node_id: &str) -> Result<(), CoordinatorError> {
        self.node_write_bytes_left(node_id)?;
        let limiter = &self.inner.node_writes;
        if limiter.try_take(node_id, std::time::Instant::now()) {
            return Ok(());
        }
        Err(rate_limited(limiter, format!("node {node_id}"), "writes"))
    }

    /// Refuses `node_id` while it has sent more bytes of write requests than
    /// its byte rate allows (see [`Self::charge_node_bytes`]); nothing is taken.
    pub(crate) fn node_write_bytes_left(&self, node_id: &str) -> Result<(), CoordinatorError> {
        let limiter = &self.inner.node_write_bytes;
        if limiter.has_token(node_id, std::time::Instant::now()) {
            return Ok(());
        }
        Err(rate_limited(
            limiter,
            format!("node {node_id}"),
            "bytes of write requests",
        ))
    }

    /// Counts `bytes` of a write request `node_id` sent against its byte rate.
    pub(crate) fn charge_node_bytes(&self, node_id: &str, bytes: usize) {
        self.inner.node_write_bytes.charge(
            node_id,
            u64::try_from(bytes).unwrap_or(u64::MAX),
            std::time::Instant::now(),
        );
    }

    /// Refuses enrollment or rejoin (`what`) from `remote` while its failed
    /// attempts are over their rate (a fleet enrolling behind one address is
    /// not slowed down; guessing or replaying tokens or proofs is).
    pub(crate) fn admit_enroll(
        &self,
        remote: Option<SocketAddr>,
        what: &'static str,
    ) -> Result<(), CoordinatorError> {
        let key = enroll_key(remote);
        let limiter = &self.inner.enrolls;
        if limiter.has_token(&key, std::time::Instant::now()) {
            return Ok(());
        }
        Err(rate_limited(limiter, format!("address {key}"), what))
    }

    /// Counts a failed enrollment or rejoin attempt from `remote`.
    pub(crate) fn enroll_failed(&self, remote: Option<SocketAddr>) {
        let _ = self
            .inner
            .enrolls
            .try_take(&enroll_key(remote), std::time::Instant::now());
    }

    /// Proposes a `command` a node's request caused, in the node lane: it
    /// never delays cluster writes, and is refused at once when that lane
    /// is full. The caller has passed [`Self::admit_node_write`].
    pub async fn write_for_node(
        &self,
        command: Command,
    ) -> Result<(Response, v1::CommitInfo), CoordinatorError> {
        let req = Request {
            idempotency_key: None,
            proposed_at_ms: now_ms(),
            command,
        };
        self.inner
            .proposer
            .propose(req, crate::proposer::Lane::Node)
            .await
    }

    /// Waits until a read at this coordinator is linearizable (unless `stale`).
    pub async fn read_barrier(
        &self,
        read: Option<&v1::ReadOptions>,
    ) -> Result<(), CoordinatorError> {
        let stale = read.is_some_and(|r| r.consistency() == v1::ReadConsistency::Stale);
        if stale {
            return Ok(());
        }
        match self.inner.raft.ensure_linearizable().await {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => Err(leader_of(&f)),
            Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q))) => {
                Err(CoordinatorError::NotLeader { leader: None })
                    .inspect_err(|_| tracing::warn!(error = %q, "linearizable read without quorum"))
            }
            Err(RaftError::Fatal(f)) => Err(CoordinatorError::Fatal(f.to_string())),
        }
    }

    /// The cluster record, or `NotInitialized`.
    pub fn cluster(&self) -> Result<ClusterInfo, CoordinatorError> {
        self.inner
            .reader
            .cluster()?
            .ok_or(CoordinatorError::NotInitialized)
    }

    /// The CA certificate when this coordinator serves mTLS.
    pub(crate) fn tls_ca_pem(&self) -> Option<&str> {
        self.inner.tls.as_ref().map(|t| t.ca_pem.as_str())
    }

    /// Fires when this coordinator's API is stopping.
    pub(crate) fn stopping(&self) -> &CancellationToken {
        &self.inner.stopping
    }

    /// Counters of the secrets and enrollment APIs.
    pub(crate) fn api_metrics(&self) -> &crate::metrics::ApiMetrics {
        &self.inner.api_metrics
    }

    pub(crate) fn tunnels(&self) -> &Arc<crate::tunnel::Tunnels> {
        &self.inner.tunnels
    }

    pub(crate) fn liveness(&self) -> Arc<crate::liveness::Liveness> {
        self.inner.liveness.clone()
    }

    /// `Ok` when this coordinator is the leader; otherwise `NotLeader` with
    /// the leader's address when known.
    pub(crate) fn ensure_leader(&self) -> Result<(), CoordinatorError> {
        let m = self.inner.raft.metrics();
        let m = m.borrow();
        if m.state == ServerState::Leader {
            return Ok(());
        }
        let leader = m.current_leader.and_then(|id| {
            m.membership_config
                .nodes()
                .find(|(n, _)| **n == id)
                .map(|(_, node)| (id, node.address.clone()))
        });
        Err(CoordinatorError::NotLeader { leader })
    }

    pub(crate) fn peer_cache(&self) -> &crate::peer_cache::PeerCache {
        &self.inner.peer_cache
    }

    pub(crate) fn master_key(&self) -> Option<&cloudless_pki::MasterKey> {
        self.inner.master_key.as_deref()
    }

    /// Where the master key came from (for `secrets key-info`; never the key).
    pub(crate) fn master_key_source(&self) -> String {
        self.inner.master_key_source.clone()
    }

    /// The unsealed CA and token key (cached after the first use).
    pub(crate) fn identity_keys(&self) -> Result<Arc<IdentityKeys>, CoordinatorError> {
        self.inner.identity.keys(self.master_key(), self.reader())
    }

    /// A (cached) channel to another coordinator.
    pub fn peer_channel(&self, address: &str) -> Result<Channel, CoordinatorError> {
        let mut peers = self
            .inner
            .peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let generation = self.inner.tls.as_ref().map_or(0, |t| t.generation());
        if let Some((g, c)) = peers.get(address) {
            // A channel made before a renewal presents the old certificate.
            if *g == generation {
                return Ok(c.clone());
            }
        }
        let ch = crate::tls::endpoint(address, self.inner.tls.as_deref())
            .map_err(CoordinatorError::InvalidArgument)?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .connect_lazy();
        peers.insert(address.to_owned(), (generation, ch.clone()));
        Ok(ch)
    }

    /// Whether `node_id` is in the Raft membership this coordinator knows.
    pub(crate) fn is_member(&self, node_id: NodeId) -> bool {
        self.inner
            .raft
            .metrics()
            .borrow()
            .membership_config
            .nodes()
            .any(|(id, _)| *id == node_id)
    }

    /// Current members with their roles.
    pub fn members(&self) -> Vec<v1::Member> {
        let m = self.inner.raft.metrics().borrow().membership_config.clone();
        let voters: BTreeSet<NodeId> = m.membership().voter_ids().collect();
        m.nodes()
            .map(|(id, node)| v1::Member {
                node_id: *id,
                address: node.address.clone(),
                role: if voters.contains(id) {
                    v1::member::Role::Voter
                } else {
                    v1::member::Role::Learner
                } as i32,
            })
            .collect()
    }

    /// This node's Raft view.
    pub fn local_status(&self) -> v1::CoordinatorStatus {
        let m = self.inner.raft.metrics().borrow().clone();
        v1::CoordinatorStatus {
            node_id: self.inner.id,
            address: self.inner.address.clone(),
            reachable: true,
            legacy_state: format!("{:?}", m.state),
            state: raft_server_state(m.state).into(),
            term: m.current_term,
            leader_id: m.current_leader.unwrap_or(0),
            last_log_index: m.last_log_index.unwrap_or(0),
            commit_index: self.inner.committed.load(Ordering::Relaxed),
            applied_index: m.last_applied.map_or(0, |l| l.index),
            snapshot_index: m.snapshot.map_or(0, |l| l.index),
            error: String::new(),
        }
    }

    /// Adds a coordinator as learner, waits for it to catch up, then promotes it to voter.
    pub async fn join(
        &self,
        node_id: NodeId,
        address: String,
    ) -> Result<v1::CommitInfo, CoordinatorError> {
        let raft = &self.inner.raft;
        let m = raft.metrics().borrow().membership_config.clone();
        if let Some(existing) = m
            .nodes()
            .find(|(id, _)| **id == node_id)
            .map(|(_, n)| n.clone())
        {
            if existing.address != address {
                return Err(CoordinatorError::Membership(format!(
                    "node {node_id} is already a member at {}, not {address}; remove it first",
                    existing.address
                )));
            }
        } else if let Some((id, _)) = m.nodes().find(|(_, n)| n.address == address) {
            return Err(CoordinatorError::Membership(format!(
                "address {address} already belongs to member {id}"
            )));
        }
        tracing::info!(node_id, %address, "adding coordinator as learner");
        raft.add_learner(node_id, CoordinatorNode { address }, true)
            .await
            .map_err(|e| write_error(&e))?;
        tracing::info!(node_id, "learner caught up; promoting to voter");
        let resp = self
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([node_id])))
            .await?;
        Ok(v1::CommitInfo {
            log_index: resp.log_id.index,
            term: resp.log_id.leader_id.term,
            leader_id: self.inner.id,
        })
    }

    /// Commits a membership change, waiting (up to 10 s) for a change already
    /// in progress, such as the second phase of a previous join, to finish.
    async fn change_membership(
        &self,
        change: ChangeMembers<NodeId, CoordinatorNode>,
    ) -> Result<openraft::raft::ClientWriteResponse<cloudless_state::TypeConfig>, CoordinatorError>
    {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match self
                .inner
                .raft
                .change_membership(change.clone(), false)
                .await
            {
                Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                    openraft::error::ChangeMembershipError::InProgress(_),
                ))) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => return other.map_err(|e| write_error(&e)),
            }
        }
    }

    /// Removes a coordinator from the cluster.
    pub async fn remove(&self, node_id: NodeId) -> Result<v1::CommitInfo, CoordinatorError> {
        let raft = &self.inner.raft;
        let m = raft.metrics().borrow().membership_config.clone();
        let is_voter = m.membership().voter_ids().any(|id| id == node_id);
        let is_node = m.nodes().any(|(id, _)| *id == node_id);
        if !is_node {
            return Err(CoordinatorError::InvalidArgument(format!(
                "node_id: {node_id} is not a member of this cluster"
            )));
        }
        if is_voter && m.membership().voter_ids().count() == 1 {
            return Err(CoordinatorError::Membership(format!(
                "node {node_id} is the only voter; a cluster cannot remove its last voter"
            )));
        }
        // Its certificate is refused once it is no longer a member
        // (authz::still_trusted); recorded first, so that a removal that
        // went through always has it.
        self.write(None, Command::RetireCoordinator { node_id })
            .await?;
        let change = if is_voter {
            ChangeMembers::RemoveVoters(BTreeSet::from([node_id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([node_id]))
        };
        let resp = self.change_membership(change).await?;
        Ok(v1::CommitInfo {
            log_index: resp.log_id.index,
            term: resp.log_id.leader_id.term,
            leader_id: self.inner.id,
        })
    }
}

/// The one conversion of openraft's server state to the wire.
pub(crate) fn raft_server_state(s: openraft::ServerState) -> v1::RaftServerState {
    match s {
        openraft::ServerState::Leader => v1::RaftServerState::Leader,
        openraft::ServerState::Follower => v1::RaftServerState::Follower,
        openraft::ServerState::Candidate => v1::RaftServerState::Candidate,
        openraft::ServerState::Learner => v1::RaftServerState::Learner,
        openraft::ServerState::Shutdown => v1::RaftServerState::Shutdown,
    }
}
