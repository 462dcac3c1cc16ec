//! A running coordinator: Raft node, gRPC services, HTTP endpoints. The
//! composition root: [`Coordinator::start`] assembles the
//! [`CoordinatorHandle`] and starts every task; shutdown stops them in
//! order.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cloudless_proto::v1;
use cloudless_state::{Command, CoordinatorNode, NodeId, Raft};
use cloudless_types::ClusterConfig;
use openraft::error::{InitializeError, RaftError};
use openraft::{ServerState, SnapshotPolicy};
use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;
use crate::config::CoordinatorConfig;
use crate::error::{CoordinatorError, StartError};
use crate::handle::{CoordinatorHandle, HandleInner};
use crate::identity::IdentityCache;
use crate::metrics::{RaftMetrics, RelayMetrics};
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
        cloudless_telemetry::register_process_metrics(&mut registry, "coordinator");
        let grpc_metrics = cloudless_telemetry::GrpcMetrics::register(&mut registry);
        let metrics = RaftMetrics::register(&mut registry);
        let proposer_metrics = crate::proposer::ProposerMetrics::register(&mut registry);
        let api_metrics = crate::metrics::ApiMetrics::register(&mut registry);
        let membership_metrics = crate::liveness::MembershipMetrics::register(&mut registry);
        let reconcile_metrics = crate::reconciler::ReconcileMetrics::register(&mut registry);
        let relay_metrics = relay
            .as_ref()
            .map(|(o, _)| RelayMetrics::register(&mut registry, o.clone()));
        let (log, sm) =
            cloudless_state::open_stores(&config.data_dir, metrics.apply_latency.clone())?;
        let sm = sm.with_snapshot_timer(metrics.snapshot_seconds.clone());
        registry.register_collector(Box::new(crate::state_metrics::StateCollector {
            reader: sm.reader(),
            data_dir: config.data_dir.clone(),
            node_id: id,
            tls: tls.clone(),
        }));
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
            proposer_metrics,
            bg_cancel.clone(),
        );
        let handle = CoordinatorHandle::new(HandleInner {
            id,
            address: config.advertise_addr.clone(),
            raft: raft.clone(),
            reader,
            committed: committed.clone(),
            peers: Mutex::default(),
            proposer,
            master_key,
            master_key_source,
            identity: IdentityCache::default(),
            tls: tls.clone(),
            peer_cache: crate::peer_cache::PeerCache::default(),
            liveness: Arc::new(crate::liveness::Liveness::new(membership_metrics)),
            tunnels: Arc::default(),
            relay,
            stopping: api_cancel.clone(),
            node_writes: crate::rate_limit::RateLimiter::new(crate::rate_limit::Rate {
                per_s: config.limits.node_writes_per_s,
                burst: config.limits.node_write_burst,
            }),
            node_write_bytes: crate::rate_limit::RateLimiter::new(crate::rate_limit::Rate {
                per_s: config.limits.node_write_bytes_per_s,
                burst: config.limits.node_write_burst_bytes,
            }),
            node_events: crate::rate_limit::RateLimiter::new(crate::agent_service::NODE_EVENT_RATE),
            enrolls: crate::rate_limit::RateLimiter::new(crate::rate_limit::Rate {
                per_s: config.limits.enrolls_per_s,
                burst: config.limits.enroll_burst,
            }),
            api_metrics,
        });

        let server_tls = tls
            .as_ref()
            .map(|t| t.server_config())
            .transpose()
            .map_err(StartError::Tls)?;
        let api_task = tokio::spawn(crate::serve::serve(
            handle.clone(),
            listener,
            server_tls,
            grpc_metrics,
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
        if let Some(relay) = handle.relay_overlay() {
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
