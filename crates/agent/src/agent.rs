//! The agent's main loop: identity (load, or enroll once with a join token),
//! heartbeats at the period the cluster asks for, renewal at two thirds of
//! the certificate's lifetime, and rejoining (no token, proof of the old
//! key) when the certificate expired while the device was offline.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

use crate::{enroll, AgentError, Coordinators, DeviceProbe, NodeIdentity};

/// How long to wait before retrying after the coordinators could not be reached.
const RETRY: Duration = Duration::from_millis(500);
/// How long to wait between rejoin attempts at start-up while no coordinator answers.
const REJOIN_RETRY: Duration = Duration::from_secs(2);

/// What the agent needs to start.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Where the identity lives.
    pub data_dir: PathBuf,
    /// Coordinator gRPC addresses (`host:port`).
    pub coordinators: Vec<String>,
    /// Node name to enroll with.
    pub name: String,
    /// Join token, needed only for the first start.
    pub join_token: Option<Zeroizing<String>>,
    /// The cluster CA certificate to trust when enrolling (PEM file).
    pub ca_cert: Option<PathBuf>,
    /// Labels reported with every heartbeat.
    pub labels: BTreeMap<String, String>,
    /// Where to run workloads; `None` runs none (membership only).
    pub runtime: Option<crate::RuntimeConfig>,
    /// The overlay's UDP address (with a runtime); `None` runs no overlay.
    pub overlay_listen: Option<std::net::SocketAddr>,
    /// Addresses other nodes dial; empty: the listen address, or this
    /// host's address on the route to the first coordinator.
    pub overlay_advertise: Vec<std::net::SocketAddr>,
    /// Try NAT hole punching before relaying.
    pub overlay_hole_punching: bool,
    /// The node's bandwidth in bits per second for placement; `None`: the
    /// default route's link speed, where the kernel knows it.
    pub bandwidth_bps: Option<u64>,
    /// Where to serve `/metrics`, `/healthz` and `/readyz`; `None`: nowhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

pub(crate) fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Makes the data dir (identity, logs, volumes, secrets) readable by its
/// owner only: 0700, also when an older agent made it with the umask's mode.
pub fn private_dir(dir: &std::path::Path) -> Result<(), AgentError> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
        .map_err(|e| AgentError::io(dir, e))
}

/// Loads the node identity, or enrolls with the join token when there is
/// none. A stored certificate that has expired is renewed by rejoining
/// (retried until a coordinator answers).
pub async fn load_or_enroll(config: &AgentConfig) -> Result<NodeIdentity, AgentError> {
    private_dir(&config.data_dir)?;
    if let Some(id) = NodeIdentity::load(&config.data_dir)? {
        if !id.expired_at(now_s()) {
            tracing::info!(node_id = %id.node_id, not_after = id.not_after, "using the stored node identity");
            return Ok(id);
        }
        tracing::warn!(
            node_id = %id.node_id,
            not_after = id.not_after,
            "the node certificate expired while the agent was stopped; rejoining with its key"
        );
        loop {
            match crate::rejoin(&config.coordinators, &id).await {
                Ok(renewed) => {
                    renewed.save(&config.data_dir)?;
                    tracing::info!(node_id = %renewed.node_id, not_after = renewed.not_after, "rejoined the cluster");
                    return Ok(renewed);
                }
                Err(e @ AgentError::Unreachable(_)) => {
                    tracing::warn!(error = %e, "rejoin failed; retrying");
                    tokio::time::sleep(REJOIN_RETRY).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
    let Some(token) = &config.join_token else {
        return Err(AgentError::Config(format!(
            "{} holds no node identity: pass --join-token (and --ca-cert) to enroll",
            config.data_dir.display()
        )));
    };
    let Some(ca_path) = &config.ca_cert else {
        return Err(AgentError::Config(
            "--ca-cert: enrolling needs the cluster CA certificate to trust (admin/ca.crt from `cloudless-coordinator init`)".into(),
        ));
    };
    let ca_pem = std::fs::read_to_string(ca_path).map_err(|e| AgentError::io(ca_path, e))?;
    let id = enroll(&config.coordinators, &ca_pem, token, &config.name).await?;
    id.save(&config.data_dir)?;
    tracing::info!(node_id = %id.node_id, name = %config.name, "enrolled");
    Ok(id)
}

/// Runs until `cancel` fires or the node is removed.
pub async fn run(config: AgentConfig, cancel: CancellationToken) -> Result<(), AgentError> {
    // Bound first: a busy port fails start-up before anything runs.
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| AgentError::Config(format!("--metrics-addr {addr}: {e}")))?,
        ),
        None => None,
    };
    let mut registry = prometheus_client::registry::Registry::default();
    cloudless_telemetry::register_process_metrics(&mut registry, "agent");
    let metrics = crate::metrics::AgentMetrics::register(&mut registry);
    let identity = tokio::select! {
        r = load_or_enroll(&config) => r?,
        () = cancel.cancelled() => return Ok(()),
    };
    let (identity_tx, identity_rx) = tokio::sync::watch::channel(identity.clone());
    let contact = crate::workloads::Contact::default();
    let mut overlay_addresses = Vec::new();
    let mesh = match (&config.runtime, config.overlay_listen) {
        (Some(_), Some(listen)) => {
            let overlay = cloudless_overlay::OverlayConfig {
                listen,
                hole_punching: config.overlay_hole_punching,
                ..Default::default()
            };
            let mesh =
                crate::mesh::Mesh::start(overlay, identity.overlay_tls()?, &identity.node_id)
                    .map_err(|e| AgentError::Config(format!("--overlay-listen {listen}: {e}")))?;
            let bound = mesh
                .overlay()
                .local_addr()
                .map_err(|e| AgentError::Config(format!("--overlay-listen: {e}")))?;
            overlay_addresses = if config.overlay_advertise.is_empty() {
                crate::mesh::advertise(bound, &config.coordinators)
                    .into_iter()
                    .collect()
            } else {
                config.overlay_advertise.clone()
            };
            if overlay_addresses.is_empty() {
                tracing::warn!(%bound, "no overlay address to advertise: pass --overlay-advertise");
            }
            tracing::info!(%bound, advertised = ?overlay_addresses, "overlay listening");
            Some(mesh)
        }
        _ => None,
    };
    if let Some(m) = &mesh {
        tokio::spawn(crate::mesh::keep_relays(
            m.clone(),
            config.coordinators.clone(),
            identity_rx.clone(),
            cancel.child_token(),
        ));
    }
    let mut collector = crate::metrics::NodeCollector {
        statuses: crate::workloads::SharedStatuses::default(),
        usage: None,
        overlay: mesh.as_ref().map(|m| m.overlay().clone()),
        contact: contact.clone(),
        probes: None,
        proxy: None,
    };
    let mut workloads = match &config.runtime {
        Some(rc) => {
            let mut runner = crate::workloads::Runner::new(rc).await?;
            runner.set_metrics(metrics.clone());
            collector.statuses = runner.statuses();
            collector.usage = Some(runner.usage_fn());
            collector.probes = Some(runner.probe_counts());
            collector.proxy = Some(runner.proxy());
            runner.set_mesh(mesh.clone());
            runner.set_node_id(&identity.node_id);
            Some(tokio::spawn(crate::workloads::run(
                config.coordinators.clone(),
                identity_rx,
                runner,
                contact.clone(),
                cancel.clone(),
            )))
        }
        None => None,
    };
    let mut coordinators = Coordinators::new(config.coordinators.clone(), identity);
    let mut probe = DeviceProbe::default()
        .with_labels(config.labels.clone())
        .with_bandwidth(config.bandwidth_bps)
        .with_overlay_addresses(overlay_addresses.iter().map(ToString::to_string).collect());
    if let Some(rc) = &config.runtime {
        probe = probe.with_storage_dir(&rc.volume_dir);
    }
    let mut interval = Duration::from_secs(1);
    registry.register_collector(Box::new(collector));
    if let Some(listener) = metrics_listener {
        let connected = metrics.clone();
        // Ready while the last heartbeat reached a coordinator.
        let ready: cloudless_telemetry::Readiness = Arc::new(move || {
            if connected.is_connected() {
                Ok(())
            } else {
                Err("no coordinator reached by the last heartbeat".into())
            }
        });
        let (addr, _task) = cloudless_telemetry::serve_http(
            listener,
            Arc::new(registry),
            ready,
            cancel.child_token(),
        )
        .await
        .map_err(|e| AgentError::Config(format!("--metrics-addr: {e}")))?;
        tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    }
    let mut last_phase = None;
    loop {
        if now_s() >= coordinators.identity().renew_at() {
            match refresh(&mut coordinators, &config.coordinators).await {
                Ok(renewed) => {
                    renewed.save(&config.data_dir)?;
                    tracing::info!(not_after = renewed.not_after, "node certificate renewed");
                    if let Some(m) = &mesh {
                        if let Err(e) = renewed.overlay_tls().and_then(|t| {
                            m.overlay()
                                .reload_tls(&t)
                                .map_err(|e| AgentError::Identity(e.to_string()))
                        }) {
                            tracing::warn!(error = %e, "the overlay keeps its previous certificate");
                        }
                    }
                    identity_tx.send_replace(renewed.clone());
                    coordinators.set_identity(renewed);
                }
                Err(e @ (AgentError::Removed(_) | AgentError::RejoinRefused { .. })) => {
                    return Err(e)
                }
                Err(e) => tracing::warn!(error = %e, "certificate renewal failed; retrying"),
            }
        }
        let started = tokio::time::Instant::now();
        let hb = probe.heartbeat();
        metrics.power(&hb);
        let beat = coordinators.heartbeat(hb).await;
        metrics.heartbeat(beat.is_ok().then(|| started.elapsed()));
        match beat {
            Ok(r) => {
                contact.touch();
                if r.heartbeat_interval_ms > 0 {
                    interval = Duration::from_millis(r.heartbeat_interval_ms);
                }
                // A coordinator of the previous release sends the name only.
                let phase = cloudless_proto::enums::required::<cloudless_proto::v1::NodePhase>(
                    r.phase,
                    &r.legacy_phase,
                    "phase",
                )
                .ok();
                if phase.is_some() && phase != last_phase {
                    tracing::info!(phase = ?phase, "node phase");
                    last_phase = phase;
                }
            }
            Err(AgentError::Removed(m)) => return Err(AgentError::Removed(m)),
            Err(e) => {
                tracing::warn!(error = %e, "heartbeat failed");
                interval = interval.min(RETRY.max(Duration::from_millis(100)));
            }
        }
        let workloads_ended = async {
            match workloads.as_mut() {
                Some(h) => h.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = cancel.cancelled() => {
                if let Some(h) = workloads.take() {
                    let _ = h.await;
                }
                return Ok(());
            }
            () = tokio::time::sleep_until(started + interval) => {}
            r = workloads_ended => {
                workloads = None;
                match r {
                    Ok(Err(e)) => return Err(e),
                    Ok(Ok(())) => {}
                    Err(e) => return Err(AgentError::Config(format!("the workload runner failed: {e}"))),
                }
            }
        }
    }
}

/// A new certificate: renewed over mTLS while the current one is valid by
/// this device's clock, else by rejoining. When renewal fails although the
/// certificate looks valid here, the coordinators' clocks may see it expired
/// (TLS then refuses it), so a rejoin is tried too; its refusal is final
/// only once the certificate has expired by this clock.
async fn refresh(
    coordinators: &mut Coordinators,
    addresses: &[String],
) -> Result<NodeIdentity, AgentError> {
    let current = coordinators.identity().clone();
    if current.expired_at(now_s()) {
        tracing::warn!(node_id = %current.node_id, not_after = current.not_after, "the node certificate expired; rejoining with its key");
        return crate::rejoin(addresses, &current).await;
    }
    match coordinators.renew().await {
        Ok(renewed) => Ok(renewed),
        Err(e @ AgentError::Removed(_)) => Err(e),
        Err(renew_error) => match crate::rejoin(addresses, &current).await {
            Ok(renewed) => Ok(renewed),
            Err(e @ AgentError::Removed(_)) => Err(e),
            Err(_) => Err(renew_error),
        },
    }
}
