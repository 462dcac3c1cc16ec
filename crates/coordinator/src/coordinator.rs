//! A running coordinator: Raft node, gRPC services, HTTP endpoints.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cloudless_proto::v1;
use cloudless_state::{
    ClusterInfo, Command, CoordinatorNode, NodeId, Raft, Request, Response, StateReader,
};
use cloudless_types::ClusterConfig;
use openraft::error::{
    CheckIsLeaderError, ClientWriteError, ForwardToLeader, InitializeError, RaftError,
};
use openraft::{ChangeMembers, ServerState, SnapshotPolicy};
use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::config::CoordinatorConfig;
use crate::error::CoordinatorError;
use crate::metrics::RaftMetrics;
use crate::proposer::{write_error, ProposerHandle};
use crate::raft_network::{Network, MAX_RAFT_MESSAGE};

/// How a coordinator starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartMode {
    /// Bootstrap a new single-member cluster (no-op if this data dir already belongs to one).
    Init,
    /// Resume from the data dir; if not yet a member, ask the coordinator at `join` to add us.
    Run {
        /// Address of any existing coordinator.
        join: Option<String>,
    },
}

/// Why a coordinator could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data directory could not be used.
    #[error(transparent)]
    State(#[from] cloudless_state::StateError),
    /// TLS material is missing or unusable.
    #[error("TLS: {0}")]
    Tls(String),
    /// The master key file is unusable.
    #[error(transparent)]
    MasterKey(#[from] cloudless_pki::PkiError),
    /// The `node_id` file is unreadable or does not match the configuration.
    #[error("{0}")]
    NodeId(String),
    /// A listener could not be bound.
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// Raft refused the configuration or failed to start.
    #[error("raft: {0}")]
    Raft(String),
}

/// Cheap-to-clone handle used by the API services.
#[derive(Clone)]
pub struct CoordinatorHandle {
    inner: Arc<HandleInner>,
}

struct HandleInner {
    id: NodeId,
    address: String,
    raft: Raft,
    reader: StateReader,
    committed: Arc<AtomicU64>,
    /// Channels to other coordinators, with the TLS generation they present.
    peers: Mutex<HashMap<String, (u64, Channel)>>,
    proposer: ProposerHandle,
    master_key: Option<Arc<cloudless_pki::MasterKey>>,
    master_key_source: String,
    identity: Mutex<Option<Arc<crate::identity::IdentityKeys>>>,
    tls: Option<Arc<crate::tls::TlsMaterial>>,
    peer_cache: crate::authz::PeerCache,
    liveness: Arc<crate::membership::Liveness>,
    tunnels: Arc<crate::tunnel::Tunnels>,
    /// The overlay relay and the address agents dial it at.
    relay: Option<(cloudless_overlay::Overlay, String)>,
    /// Who calls each workload through upstreams, at a state revision:
    /// computed once per change for every agent's assignment watch.
    callers: Mutex<Option<(u64, Arc<crate::agent_service::Callers>)>>,
    /// Fires when the API stops; long-lived streams end on it.
    stopping: CancellationToken,
    /// Writes each node may cause.
    node_writes: crate::rate_limit::RateLimiter,
    /// Enrollment attempts per source address.
    node_write_bytes: crate::rate_limit::RateLimiter,
    enrolls: crate::rate_limit::RateLimiter,
}

impl std::fmt::Debug for CoordinatorHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordinatorHandle")
            .field("id", &self.inner.id)
            .finish()
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
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
    /// This coordinator's node id.
    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// The cached callers map, if computed at `revision`; else `compute`s
    /// and caches it.
    pub(crate) fn callers_at<E>(
        &self,
        revision: u64,
        compute: impl FnOnce() -> Result<crate::agent_service::Callers, E>,
    ) -> Result<Arc<crate::agent_service::Callers>, E> {
        let mut cached = self
            .inner
            .callers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((r, c)) = cached.as_ref() {
            if *r == revision {
                return Ok(c.clone());
            }
        }
        let c = Arc::new(compute()?);
        *cached = Some((revision, c.clone()));
        Ok(c)
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

    pub(crate) fn tunnels(&self) -> &Arc<crate::tunnel::Tunnels> {
        &self.inner.tunnels
    }

    pub(crate) fn liveness(&self) -> Arc<crate::membership::Liveness> {
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

    pub(crate) fn peer_cache(&self) -> &crate::authz::PeerCache {
        &self.inner.peer_cache
    }

    pub(crate) fn master_key(&self) -> Option<&cloudless_pki::MasterKey> {
        self.inner.master_key.as_deref()
    }

    /// Where the master key came from (for `secrets key-info`; never the key).
    pub(crate) fn master_key_source(&self) -> String {
        self.inner.master_key_source.clone()
    }

    pub(crate) fn identity_cache(&self) -> &Mutex<Option<Arc<crate::identity::IdentityKeys>>> {
        &self.inner.identity
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

/// A running coordinator. Call [`Coordinator::shutdown`] to stop it in order.
#[derive(Debug)]
pub struct Coordinator {
    handle: CoordinatorHandle,
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    api_cancel: CancellationToken,
    bg_cancel: CancellationToken,
    api_task: JoinHandle<()>,
    bg_tasks: Vec<JoinHandle<()>>,
}

/// Reads `<data_dir>/node_id`, or creates it with `configured` (or a random id when 0).
/// The data dir is made 0700 (also when it exists with a wider mode).
fn resolve_node_id(data_dir: &Path, configured: u64) -> Result<NodeId, StartError> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .and_then(|()| std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700)))
        .map_err(|e| {
            StartError::NodeId(format!(
                "cannot create data dir {}: {e}",
                data_dir.display()
            ))
        })?;
    let path = data_dir.join("node_id");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let stored: u64 = text.trim().parse().map_err(|_| {
                StartError::NodeId(format!(
                    "{} does not hold a node id: {:?}",
                    path.display(),
                    text.trim()
                ))
            })?;
            if configured != 0 && configured != stored {
                return Err(StartError::NodeId(format!(
                    "node_id is configured as {configured} but {} says {stored}; a data dir belongs to one node",
                    path.display()
                )));
            }
            Ok(stored)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if data_dir.join(cloudless_state::LOG_FILE).exists() {
                return Err(StartError::NodeId(format!(
                    "{} is missing but the data dir holds a Raft log; restore the file or use a fresh data dir",
                    path.display()
                )));
            }
            let id = if configured != 0 {
                configured
            } else {
                rand::random::<u64>() >> 12 | 1
            };
            let tmp = data_dir.join("node_id.tmp");
            std::fs::write(&tmp, format!("{id}\n"))
                .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
                .and_then(|()| std::fs::rename(&tmp, &path))
                .map_err(|e| StartError::NodeId(format!("cannot write {}: {e}", path.display())))?;
            Ok(id)
        }
        Err(e) => Err(StartError::NodeId(format!(
            "cannot read {}: {e}",
            path.display()
        ))),
    }
}

impl Coordinator {
    /// Opens the data dir, starts Raft, binds the listeners and serves.
    pub async fn start(config: CoordinatorConfig, mode: StartMode) -> Result<Self, StartError> {
        let (master_key, master_key_source) =
            crate::identity::resolve_master_key(&config, mode == StartMode::Init)?;
        let id = resolve_node_id(&config.data_dir, config.node_id)?;
        let tls = crate::tls::prepare(&config, id, master_key.as_deref(), mode == StartMode::Init)?;
        let stored_identity = crate::tls::stored_material(&config.data_dir)?;
        // Bind both listeners before touching storage: a busy port fails start-up cleanly.
        let listener = tokio::net::TcpListener::bind(config.listen_addr)
            .await
            .map_err(|source| StartError::Bind {
                what: "gRPC listener",
                addr: config.listen_addr,
                source,
            })?;
        let grpc_addr = listener.local_addr().map_err(|source| StartError::Bind {
            what: "gRPC listener",
            addr: config.listen_addr,
            source,
        })?;
        let http_listener = tokio::net::TcpListener::bind(config.http_addr)
            .await
            .map_err(|source| StartError::Bind {
                what: "HTTP listener",
                addr: config.http_addr,
                source,
            })?;
        let relay = match (&tls, config.overlay_listen) {
            (Some(t), Some(listen)) => {
                let bind_err = |e: String| StartError::Bind {
                    what: "overlay relay (UDP)",
                    addr: listen,
                    source: std::io::Error::other(e),
                };
                let overlay = cloudless_overlay::Overlay::bind(
                    cloudless_overlay::OverlayConfig {
                        listen,
                        relay: true,
                        ..Default::default()
                    },
                    t.overlay_tls().map_err(&bind_err)?,
                    cloudless_pki::Identity::Coordinator(id),
                    // Coordinators run no workloads: they only relay.
                    Arc::new(cloudless_overlay::StaticResolver::default()),
                )
                .map_err(|e| bind_err(e.to_string()))?;
                let port = overlay
                    .local_addr()
                    .map_err(|e| bind_err(e.to_string()))?
                    .port();
                // The advertised host with the relay's port (IPv6 in brackets).
                let relay_addr = cloudless_client::HostPort::parse(&config.advertise_addr)
                    .and_then(|a| a.with_port(port))
                    .map_err(|e| bind_err(format!("advertise_addr: {e}")))?;
                Some((overlay, relay_addr.to_string()))
            }
            _ => None,
        };
        let mut registry = Registry::default();
        let metrics = RaftMetrics::register(&mut registry);
        let membership_metrics = crate::membership::MembershipMetrics::register(&mut registry);
        let reconcile_metrics = crate::reconciler::ReconcileMetrics::register(&mut registry);
        let relay_metrics = relay
            .as_ref()
            .map(|(o, _)| RelayMetrics::register(&mut registry, o.clone()));
        let (log, sm) =
            cloudless_state::open_stores(&config.data_dir, metrics.apply_latency.clone())?;
        let log = log.with_append_budget(config.raft.max_append_bytes);
        let reader = sm.reader();
        let committed = log.committed_index();
        if let Some((relay, _)) = &relay {
            // Nodes removed from the cluster are refused on the relay.
            relay.set_admission(Arc::new(crate::removal::EnrolledNodes(reader.clone())));
        }

        let raft_config = openraft::Config {
            cluster_name: "cloudless".into(),
            heartbeat_interval: config.raft.heartbeat_interval.as_millis() as u64,
            election_timeout_min: config.raft.election_timeout_min.as_millis() as u64,
            election_timeout_max: config.raft.election_timeout_max.as_millis() as u64,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.raft.snapshot_after_logs),
            max_in_snapshot_log_to_keep: config.raft.logs_to_keep_after_snapshot,
            snapshot_max_chunk_size: 1024 * 1024,
            // openraft 0.9 gives each AppendEntries `heartbeat_interval` to
            // complete; the network lets larger ones finish in the background
            // (raft_network.rs) and the log store caps each by bytes.
            max_payload_entries: 64,
            install_snapshot_timeout: 10_000,
            ..openraft::Config::default()
        };
        let raft_config = Arc::new(
            raft_config
                .validate()
                .map_err(|e| StartError::Raft(e.to_string()))?,
        );
        if config.raft.test_link_bytes_per_s > 0 {
            tracing::warn!(
                bytes_per_s = config.raft.test_link_bytes_per_s,
                "raft.test_link_bytes_per_s is set: Raft messages are delayed as on a slow link (tests only)"
            );
        }
        let plan = crate::raft_network::LinkPlan {
            min_link_bytes_per_s: config.raft.min_link_bytes_per_s,
            emulate_link_bytes_per_s: config.raft.test_link_bytes_per_s,
        };
        let raft = Raft::new(id, raft_config, Network::new(tls.clone(), plan), log, sm)
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;

        let api_cancel = CancellationToken::new();
        let bg_cancel = CancellationToken::new();
        let (proposer, proposer_task) = crate::proposer::spawn(
            raft.clone(),
            id,
            crate::proposer::ProposerLimits {
                max_entry_bytes: config.raft.max_entry_bytes,
            },
            bg_cancel.clone(),
        );
        let handle = CoordinatorHandle {
            inner: Arc::new(HandleInner {
                id,
                address: config.advertise_addr.clone(),
                raft: raft.clone(),
                reader,
                committed: committed.clone(),
                peers: Mutex::default(),
                proposer,
                master_key,
                master_key_source,
                identity: Mutex::default(),
                tls: tls.clone(),
                peer_cache: crate::authz::PeerCache::default(),
                liveness: Arc::new(crate::membership::Liveness::new(membership_metrics)),
                tunnels: Arc::default(),
                relay,
                callers: Mutex::default(),
                stopping: api_cancel.clone(),
                node_writes: crate::rate_limit::RateLimiter::new(crate::rate_limit::Rate {
                    per_s: config.limits.node_writes_per_s,
                    burst: config.limits.node_write_burst,
                }),
                node_write_bytes: crate::rate_limit::RateLimiter::new(crate::rate_limit::Rate {
                    per_s: config.limits.node_write_bytes_per_s,
                    burst: config.limits.node_write_burst_bytes,
                }),
                enrolls: crate::rate_limit::RateLimiter::new(crate::rate_limit::Rate {
                    per_s: config.limits.enrolls_per_s,
                    burst: config.limits.enroll_burst,
                }),
            }),
        };

        let server_tls = tls
            .as_ref()
            .map(|t| t.server_config())
            .transpose()
            .map_err(StartError::Tls)?;
        let api_task = tokio::spawn(crate::services::serve(
            handle.clone(),
            listener,
            server_tls,
            api_cancel.clone(),
        ));

        let ready_handle = handle.clone();
        let readiness: cloudless_telemetry::Readiness = Arc::new(move || {
            let m = ready_handle.raft().metrics().borrow().clone();
            if !m
                .membership_config
                .nodes()
                .any(|(n, _)| *n == ready_handle.id())
            {
                return Err("not a member of a cluster".into());
            }
            if m.current_leader.is_none() {
                return Err("no known leader".into());
            }
            Ok(())
        });
        let (http_addr, http_task) = cloudless_telemetry::serve_http(
            http_listener,
            Arc::new(registry),
            readiness,
            bg_cancel.clone(),
        )
        .await
        .map_err(|e| match e {
            cloudless_telemetry::TelemetryError::Bind { addr, source } => StartError::Bind {
                what: "HTTP listener",
                addr,
                source,
            },
        })?;
        let mut bg_tasks = vec![
            tokio::spawn(RelayMetrics::run(relay_metrics, bg_cancel.clone())),
            proposer_task,
            http_task,
            tokio::spawn(metrics.run(raft.clone(), committed, bg_cancel.clone())),
            tokio::spawn(crate::membership::run(handle.clone(), bg_cancel.clone())),
            tokio::spawn(crate::reconciler::run(
                handle.clone(),
                reconcile_metrics,
                bg_cancel.clone(),
            )),
            tokio::spawn(crate::removal::run(handle.clone(), bg_cancel.clone())),
        ];
        if let Some(tls) = &tls {
            bg_tasks.push(tokio::spawn(renew_certificate(
                handle.clone(),
                tls.clone(),
                bg_cancel.clone(),
            )));
        }

        match mode {
            StartMode::Init => {
                let node = CoordinatorNode {
                    address: config.advertise_addr.clone(),
                };
                match raft.initialize(BTreeMap::from([(id, node)])).await {
                    Ok(()) => tracing::info!(node_id = id, "bootstrapped a new cluster"),
                    Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {
                        tracing::info!(
                            node_id = id,
                            "data dir already holds cluster state; resuming"
                        )
                    }
                    Err(e) => return Err(StartError::Raft(e.to_string())),
                }
                bg_tasks.push(tokio::spawn(ensure_cluster_record(
                    handle.clone(),
                    config.cluster_name.clone(),
                    stored_identity,
                    bg_cancel.clone(),
                )));
            }
            StartMode::Run { join: Some(target) } => {
                bg_tasks.push(tokio::spawn(join_cluster(
                    handle.clone(),
                    target,
                    bg_cancel.clone(),
                )));
            }
            StartMode::Run { join: None } => {}
        }
        tracing::info!(node_id = id, grpc = %grpc_addr, http = %http_addr, advertise = %config.advertise_addr, "coordinator started");
        Ok(Self {
            handle,
            grpc_addr,
            http_addr,
            api_cancel,
            bg_cancel,
            api_task,
            bg_tasks,
        })
    }

    /// The handle.
    pub fn handle(&self) -> &CoordinatorHandle {
        &self.handle
    }

    /// The bound gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The bound HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Stops the API, then the background loops, then Raft (which flushes storage), within `deadline`.
    pub async fn shutdown(self, deadline: Duration) {
        let id = self.handle.id();
        let started = tokio::time::Instant::now();
        // Streams end on `stopping` (the API token); a connection that still
        // holds the server past half the deadline is cut.
        self.api_cancel.cancel();
        let mut api_task = self.api_task;
        if tokio::time::timeout(deadline / 2, &mut api_task)
            .await
            .is_err()
        {
            tracing::warn!(node_id = id, "the API did not drain in time; closing it");
            api_task.abort();
        }
        self.bg_cancel.cancel();
        let handle = self.handle;
        if let Some((relay, _)) = &handle.inner.relay {
            relay.close();
        }
        let rest = async move {
            for t in self.bg_tasks {
                let _ = t.await;
            }
            if let Err(e) = handle.raft().shutdown().await {
                tracing::error!(error = %e, "raft shutdown failed");
            }
        };
        let left = deadline.saturating_sub(started.elapsed());
        if tokio::time::timeout(left, rest).await.is_err() {
            tracing::warn!(node_id = id, "shutdown did not finish within {deadline:?}");
        }
    }
}

/// After `init`, records the cluster's identity (and, with a master key, its
/// CA and token key) once this node leads.
async fn ensure_cluster_record(
    handle: CoordinatorHandle,
    name: String,
    stored: Option<cloudless_types::IdentityMaterial>,
    cancel: CancellationToken,
) {
    loop {
        let have_cluster = matches!(handle.reader().cluster(), Ok(Some(_)));
        let need_identity =
            handle.master_key().is_some() && matches!(handle.reader().identity(), Ok(None));
        if have_cluster && !need_identity {
            return;
        }
        let is_leader = handle.raft().metrics().borrow().state == ServerState::Leader;
        if have_cluster && is_leader {
            // The CA this coordinator already serves TLS with, or a new one.
            let material = match &stored {
                Some(m) => Some(Ok(m.clone())),
                None => handle
                    .master_key()
                    .map(|m| crate::identity::new_material(m, &name, now_ms() / 1000)),
            };
            match material {
                Some(Ok(material)) => match handle
                    .write(
                        Some("init-identity".into()),
                        Command::InitIdentity { material },
                    )
                    .await
                {
                    Ok(_) => tracing::info!("cluster CA and token key created"),
                    Err(CoordinatorError::Rejected(_)) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "recording the cluster CA failed; retrying")
                    }
                },
                Some(Err(e)) => {
                    tracing::error!(error = %e, "creating the cluster CA failed");
                    return;
                }
                None => return,
            }
        }
        if have_cluster {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            continue;
        }
        let is_leader = handle.raft().metrics().borrow().state == ServerState::Leader;
        if is_leader {
            let config = ClusterConfig {
                cluster_name: name.clone(),
                ..ClusterConfig::default()
            };
            let cmd = Command::InitCluster {
                cluster_id: uuid::Uuid::new_v4().to_string(),
                config,
            };
            match handle.write(Some("init-cluster".into()), cmd).await {
                // The next round creates the CA when a master key is configured.
                Ok(_) => {
                    tracing::info!("cluster record written");
                    continue;
                }
                Err(CoordinatorError::Rejected(_)) => continue,
                Err(e) => tracing::warn!(error = %e, "writing the cluster record failed; retrying"),
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

/// Renews this coordinator's certificate two thirds into its lifetime, for
/// the gRPC server, the channels to other coordinators and the relay.
async fn renew_certificate(
    handle: CoordinatorHandle,
    tls: Arc<crate::tls::TlsMaterial>,
    cancel: CancellationToken,
) {
    loop {
        // Short sleeps against the wall clock: a suspended host or a clock
        // jump must not carry the certificate past its expiry.
        let wait_s = (tls.renew_at() - now_ms() / 1000).clamp(0, 60);
        if wait_s > 0 {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(wait_s.unsigned_abs())) => {}
            }
            continue;
        }
        if let Err(e) = tls.renew() {
            tracing::error!(error = %e, not_after = tls.not_after(), "cannot renew this coordinator's certificate; retrying in 30 s");
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(30)) => {}
            }
            continue;
        }
        if let Some(relay) = handle.relay_overlay() {
            match tls.overlay_tls() {
                Ok(o) => {
                    if let Err(e) = relay.reload_tls(&o) {
                        tracing::error!(error = %e, "the relay keeps its old certificate");
                    }
                }
                Err(e) => tracing::error!(error = %e, "the relay keeps its old certificate"),
            }
        }
    }
}

/// Asks the coordinator at `target` to add this node, retrying until it is a member.
async fn join_cluster(handle: CoordinatorHandle, target: String, cancel: CancellationToken) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let is_member = handle
            .raft()
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .any(|id| id == handle.id());
        if is_member {
            tracing::info!(node_id = handle.id(), "member of the cluster");
            return;
        }
        let result = async {
            let ch = handle.peer_channel(&target).map_err(|e| e.to_string())?;
            let mut client = v1::cluster_service_client::ClusterServiceClient::new(ch)
                .max_decoding_message_size(MAX_RAFT_MESSAGE);
            let mut req = tonic::Request::new(v1::JoinCoordinatorRequest {
                write: None,
                node_id: handle.id(),
                address: handle.address().to_owned(),
                log_format: cloudless_state::LOG_FORMAT,
            });
            req.set_timeout(Duration::from_secs(60));
            client
                .join_coordinator(req)
                .await
                .map_err(|s| s.message().to_owned())
        }
        .await;
        match result {
            Ok(_) => {
                tracing::info!(node_id = handle.id(), %target, "joined the cluster");
                return;
            }
            Err(e) => tracing::warn!(%target, error = %e, "join failed; retrying in {backoff:?}"),
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Prometheus counters of the overlay relay (docs/metrics.md), copied from
/// the endpoint's own counters every second.
struct RelayMetrics {
    overlay: cloudless_overlay::Overlay,
    relayed: prometheus_client::metrics::counter::Counter,
    refused: prometheus_client::metrics::counter::Counter,
    accepted: prometheus_client::metrics::counter::Counter,
    peers: prometheus_client::metrics::gauge::Gauge,
}

impl RelayMetrics {
    fn register(registry: &mut Registry, overlay: cloudless_overlay::Overlay) -> Self {
        let m = RelayMetrics {
            overlay,
            relayed: Default::default(),
            refused: Default::default(),
            accepted: Default::default(),
            peers: Default::default(),
        };
        let r = registry.sub_registry_with_prefix("cloudless_overlay");
        r.register(
            "streams_relayed",
            "Streams this coordinator relayed between two nodes",
            m.relayed.clone(),
        );
        r.register(
            "streams_refused",
            "Overlay streams refused (bad request, unreachable node)",
            m.refused.clone(),
        );
        r.register(
            "connections_accepted",
            "Overlay connections accepted after the certificate check",
            m.accepted.clone(),
        );
        r.register(
            "connected_peers",
            "Nodes with a live overlay connection to this relay",
            m.peers.clone(),
        );
        m
    }

    async fn run(metrics: Option<Self>, cancel: CancellationToken) {
        let Some(m) = metrics else { return };
        let mut last = cloudless_overlay::OverlayStats::default();
        loop {
            let now = m.overlay.stats();
            m.relayed
                .inc_by(now.streams_relayed.saturating_sub(last.streams_relayed));
            m.refused
                .inc_by(now.streams_refused.saturating_sub(last.streams_refused));
            m.accepted.inc_by(
                now.connections_accepted
                    .saturating_sub(last.connections_accepted),
            );
            m.peers
                .set(i64::try_from(m.overlay.connected_peers().len()).unwrap_or(i64::MAX));
            last = now;
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = cancel.cancelled() => return,
            }
        }
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
