//! `AgentService`: what enrolled agents call, authenticated by their node
//! certificate. The node id comes from the certificate, never from a field.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use cloudless_pki::Identity;
use cloudless_proto::v1::agent_service_server::AgentService;
use cloudless_proto::v1::{
    AssignmentSet, HeartbeatRequest, HeartbeatResponse, OverlayRelayRequest, OverlayRelayResponse,
    RenewRequest, RenewResponse, ReportStatusRequest, ReportStatusResponse, TunnelDown, TunnelUp,
    WatchAssignmentsRequest,
};
use cloudless_proto::{enums, v1, WireEnum as _};
use cloudless_state::{Command, ReplicaUpdate, Response as SmResponse};
use cloudless_types::{ClosedSet as _, NodeStatus, PowerSource, Resources};
use tonic::{Request, Response, Status, Streaming};

use crate::assignments::{assignments, CallersCache, NodeView};
use crate::authz::{require, Allow};
use crate::clock::now_ms;
use crate::error::CoordinatorError;
use crate::handle::CoordinatorHandle;

/// Most labels one heartbeat may report.
const MAX_LABELS: usize = 64;
/// Most conditions one heartbeat may report.
const MAX_CONDITIONS: usize = 16;
/// Overlay addresses a heartbeat may report.
const MAX_OVERLAY_ADDRESSES: usize = 8;

/// The `AgentService` implementation.
#[derive(Debug, Clone)]
pub struct AgentApi {
    handle: CoordinatorHandle,
    /// Shared by every assignment watch on this coordinator.
    callers: Arc<CallersCache>,
}

impl AgentApi {
    /// Serves `handle`.
    pub fn new(handle: CoordinatorHandle) -> Self {
        Self {
            handle,
            callers: Arc::default(),
        }
    }
}

fn node_id(identity: Identity) -> Result<String, Status> {
    match identity {
        Identity::Node(id) => Ok(id),
        other => Err(Status::permission_denied(format!("{other} is not a node"))),
    }
}

/// The device status in a heartbeat, checked field by field.
fn status_from_wire(r: HeartbeatRequest) -> Result<(NodeStatus, Resources), CoordinatorError> {
    let bad = |field: &str, problem: String| {
        Err(CoordinatorError::InvalidArgument(format!(
            "{field}: {problem}"
        )))
    };
    if r.labels.len() > MAX_LABELS {
        return bad(
            "labels",
            format!(
                "{} labels, at most {MAX_LABELS} are allowed",
                r.labels.len()
            ),
        );
    }
    let labels: BTreeMap<String, String> = r.labels.into_iter().collect();
    let mut errs = cloudless_types::ValidationErrors::default();
    cloudless_types::check_labels(&mut errs, "labels", &labels);
    errs.into_result()?;
    if r.conditions.len() > MAX_CONDITIONS {
        return bad(
            "conditions",
            format!(
                "{} conditions, at most {MAX_CONDITIONS} are allowed",
                r.conditions.len()
            ),
        );
    }
    let mut conditions = enums::required_list::<v1::NodeCondition>(
        &r.conditions,
        &r.legacy_conditions,
        "conditions",
    )
    .map_err(CoordinatorError::from)?;
    // Agents of the release before the enum sent "" for mains.
    let power_source = if r.power_source == 0 && r.legacy_power_source.is_empty() {
        PowerSource::Mains
    } else {
        enums::required::<v1::PowerSource>(r.power_source, &r.legacy_power_source, "power_source")
            .map_err(CoordinatorError::from)?
    };
    let Ok(battery_percent) = u8::try_from(r.battery_percent) else {
        return bad(
            "battery_percent",
            format!("{} is above 100", r.battery_percent),
        );
    };
    if battery_percent > 100 {
        return bad("battery_percent", format!("{battery_percent} is above 100"));
    }
    if r.overlay_addresses.len() > MAX_OVERLAY_ADDRESSES {
        return bad(
            "overlay_addresses",
            format!(
                "{} addresses, at most {MAX_OVERLAY_ADDRESSES} are allowed",
                r.overlay_addresses.len()
            ),
        );
    }
    for (i, a) in r.overlay_addresses.iter().enumerate() {
        match a.parse::<std::net::SocketAddr>() {
            Ok(sa) if sa.port() != 0 && !sa.ip().is_unspecified() => {}
            _ => {
                return bad(
                    &format!("overlay_addresses[{i}]"),
                    format!("{a:?} is not a reachable ip:port"),
                )
            }
        }
    }
    let capacity: Resources = r.capacity.map(Into::into).unwrap_or_default();
    cloudless_types::check_capacity_bounds(&capacity)
        .map_err(|e| CoordinatorError::InvalidArgument(e.to_string()))?;
    conditions.sort();
    conditions.dedup();
    let status = NodeStatus {
        overlay_addresses: r.overlay_addresses,
        capacity,
        reported_labels: labels,
        // Stored by name (the log format keeps strings here).
        conditions: conditions.iter().map(|c| c.name().to_owned()).collect(),
        power_source: power_source.name().to_owned(),
        battery_percent: if power_source == PowerSource::Battery {
            battery_percent
        } else {
            0
        },
    };
    Ok((status, r.usage.map(Into::into).unwrap_or_default()))
}

/// Records one heartbeat from `id` and answers it.
/// Most replicas one status report may list.
pub(crate) const MAX_STATUS_ENTRIES: usize = 512;

/// The updates a node's status report makes: checked field by field, only
/// for replicas assigned to the node (others are dropped: a report can race
/// a removal), each replica at most once.
fn status_updates(
    handle: &CoordinatorHandle,
    id: &str,
    req: ReportStatusRequest,
) -> Result<Vec<ReplicaUpdate>, Status> {
    if req.replicas.len() > MAX_STATUS_ENTRIES {
        return Err(Status::invalid_argument(format!(
            "replicas: {} entries; a report lists at most {MAX_STATUS_ENTRIES}",
            req.replicas.len()
        )));
    }
    let assigned: std::collections::HashSet<String> = handle
        .reader()
        .node_replicas(id)
        .map_err(CoordinatorError::from)?
        .into_iter()
        .map(|r| r.id)
        .collect();
    let mut seen = std::collections::HashSet::new();
    let mut updates = Vec::new();
    for (i, r) in req.replicas.into_iter().enumerate() {
        let state = enums::required::<v1::ReplicaState>(
            r.state,
            &r.legacy_state,
            &format!("replicas[{i}].state"),
        )
        .map_err(CoordinatorError::from)?;
        if r.replica_id.is_empty() || r.replica_id.len() > 256 {
            return Err(Status::invalid_argument(format!(
                "replicas[{i}].replica_id: must be 1 to 256 characters"
            )));
        }
        if !seen.insert(r.replica_id.clone()) {
            return Err(Status::invalid_argument(format!(
                "replicas[{i}].replica_id: {:?} is listed twice",
                r.replica_id
            )));
        }
        if !assigned.contains(&r.replica_id) {
            tracing::debug!(node_id = %id, replica = %r.replica_id, "status for a replica not assigned to the node; dropped");
            continue;
        }
        let mut message = r.message;
        if message.len() > 1024 {
            let mut cut = 1024;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        updates.push(ReplicaUpdate {
            id: r.replica_id,
            node_id: id.to_owned(),
            state,
            exit_code: r.exit_code,
            restarts: r.restarts,
            message,
        });
    }
    Ok(updates)
}

fn beat(
    handle: &CoordinatorHandle,
    id: &str,
    req: HeartbeatRequest,
) -> Result<HeartbeatResponse, Status> {
    let (status, usage) = status_from_wire(req)?;
    let answer = handle
        .liveness()
        .heartbeat(id, status, usage, || handle.admit_node_write(id).is_ok());
    Ok(HeartbeatResponse {
        heartbeat_interval_ms: answer.interval_ms,
        legacy_phase: answer
            .phase
            .map(|p| p.name().to_owned())
            .unwrap_or_default(),
        phase: answer.phase.map_or(0, v1::NodePhase::wire),
    })
}

type TunnelDownStream =
    Pin<Box<dyn futures::Stream<Item = Result<TunnelDown, Status>> + Send + 'static>>;

type HeartbeatStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<HeartbeatResponse, Status>> + Send + 'static>>;

type AssignmentStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<AssignmentSet, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl AgentService for AgentApi {
    type WatchAssignmentsStream = AssignmentStream;

    async fn watch_assignments(
        &self,
        req: Request<WatchAssignmentsRequest>,
    ) -> Result<Response<Self::WatchAssignmentsStream>, Status> {
        // Any coordinator serves this from its applied state: agents keep
        // running what they were assigned through a leader change.
        let id = node_id(require(&self.handle, &req, Allow::Node)?)?;
        let handle = self.handle.clone();
        let callers = self.callers.clone();
        let mut changes = handle.reader().changes();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<AssignmentSet, Status>>(4);
        tokio::spawn(async move {
            let mut last: Option<NodeView> = None;
            loop {
                let revision = *changes.borrow_and_update();
                if let Err(status) = crate::authz::node_still_enrolled(&handle, &id) {
                    let _ = tx.send(Err(status)).await;
                    return;
                }
                let set = match assignments(handle.reader(), &callers, &id, revision) {
                    Ok(set) => set,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                if last.as_ref() != Some(&set) {
                    let msg = AssignmentSet {
                        revision,
                        assignments: set.0.clone(),
                        upstreams: set.1.clone(),
                        inbound: set.2.clone(),
                    };
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                    last = Some(set);
                }
                tokio::select! {
                    r = changes.changed() => if r.is_err() { return },
                    () = tx.closed() => return,
                    () = handle.stopping().cancelled() => {
                        let _ = tx.send(Err(Status::unavailable("this coordinator is shutting down"))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn overlay_relay(
        &self,
        req: Request<OverlayRelayRequest>,
    ) -> Result<Response<OverlayRelayResponse>, Status> {
        require(&self.handle, &req, Allow::Node)?;
        Ok(Response::new(match self.handle.relay() {
            Some((identity, address)) => OverlayRelayResponse {
                identity: identity.uri(),
                addresses: vec![address.to_owned()],
            },
            None => OverlayRelayResponse::default(),
        }))
    }

    async fn report_status(
        &self,
        req: Request<ReportStatusRequest>,
    ) -> Result<Response<ReportStatusResponse>, Status> {
        let id = node_id(require(&self.handle, &req, Allow::Node)?)?;
        // Written through Raft by the leader (concurrent reports share log
        // entries through the proposer's batching); followers answer
        // UNAVAILABLE with the leader hint, as for heartbeats.
        self.handle.ensure_leader()?;
        self.handle.admit_node_write(&id)?;
        self.handle
            .charge_node_bytes(&id, prost::Message::encoded_len(req.get_ref()));
        let updates = status_updates(&self.handle, &id, req.into_inner())?;
        // A report of every replica a big node holds can exceed what one
        // Raft entry may carry: write it in parts.
        for part in crate::proposer::split_by_size(updates, usize::MAX, self.handle.part_bytes()) {
            self.handle
                .write_for_node(Command::UpdateReplicas { updates: part })
                .await?;
        }
        Ok(Response::new(ReportStatusResponse {}))
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let id = node_id(require(&self.handle, &req, Allow::Node)?)?;
        self.handle.ensure_leader()?;
        Ok(Response::new(beat(&self.handle, &id, req.into_inner())?))
    }

    type HeartbeatStreamStream = HeartbeatStream;

    async fn heartbeat_stream(
        &self,
        req: Request<Streaming<HeartbeatRequest>>,
    ) -> Result<Response<Self::HeartbeatStreamStream>, Status> {
        let id = node_id(require(&self.handle, &req, Allow::Node)?)?;
        self.handle.ensure_leader()?;
        let state = Some((req.into_inner(), self.handle.clone(), id));
        let answers = futures::stream::unfold(state, |state| async move {
            let (mut inbound, handle, id) = state?;
            let next = tokio::select! {
                m = inbound.message() => m,
                () = handle.stopping().cancelled() => {
                    return Some((Err(Status::unavailable("this coordinator is shutting down")), None));
                }
            };
            match next {
                Ok(Some(hb)) => {
                    // Leadership and enrollment can change while the stream lives.
                    let answer = handle
                        .ensure_leader()
                        .map_err(Status::from)
                        .and_then(|()| crate::authz::node_still_enrolled(&handle, &id))
                        .and_then(|()| beat(&handle, &id, hb));
                    match answer {
                        Ok(a) => Some((Ok(a), Some((inbound, handle, id)))),
                        Err(status) => Some((Err(status), None)),
                    }
                }
                // The agent closed the stream or went away.
                Ok(None) | Err(_) => None,
            }
        });
        Ok(Response::new(Box::pin(answers)))
    }

    type TunnelStream = TunnelDownStream;

    async fn tunnel(
        &self,
        req: Request<Streaming<TunnelUp>>,
    ) -> Result<Response<Self::TunnelStream>, Status> {
        let id = node_id(require(&self.handle, &req, Allow::Node)?)?;
        let mut inbound = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel::<TunnelDown>(64);
        let tunnels = self.handle.tunnels().clone();
        let (generation, cut) = tunnels.open(&id, tx);
        // A removal committed since `require` looked is caught here; later
        // ones cut the tunnel (crate::removal).
        if let Err(status) = crate::authz::node_still_enrolled(&self.handle, &id) {
            tunnels.close(&id, generation);
            return Err(status);
        }
        let stopping = self.handle.stopping().clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    m = inbound.message() => match m {
                        // Answers count only for requests sent to this node.
                        Ok(Some(up)) => { tunnels.deliver(&id, up).await; }
                        Ok(None) | Err(_) => break,
                    },
                    () = stopping.cancelled() => break,
                    () = cut.cancelled() => break,
                }
            }
            tunnels.close(&id, generation);
        });
        let down = tokio_stream::StreamExt::map(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            Ok::<TunnelDown, Status>,
        );
        Ok(Response::new(Box::pin(down)))
    }

    async fn renew(&self, req: Request<RenewRequest>) -> Result<Response<RenewResponse>, Status> {
        let id = node_id(require(&self.handle, &req, Allow::Node)?)?;
        // Renewal writes through Raft; the leader does it so the caller's
        // identity never has to travel in a forwarded request.
        self.handle.ensure_leader()?;
        // Before the signature: a flood of renewals costs the leader nothing.
        self.handle.admit_node_write(&id)?;
        self.handle
            .charge_node_bytes(&id, prost::Message::encoded_len(req.get_ref()));
        let h = &self.handle;
        let keys = h.identity_keys()?;
        let lifetime = h.cluster()?.config.node_cert_lifetime_s;
        let now = now_ms();
        let issued = keys
            .ca
            .sign_csr(
                &req.get_ref().csr_pem,
                &Identity::Node(id.clone()),
                lifetime,
                now / 1000,
            )
            .map_err(CoordinatorError::from)?;
        let not_after_ms = issued.not_after.saturating_mul(1000);
        let (resp, _) = h
            .write_for_node(Command::RenewNodeCert {
                node_id: id.clone(),
                cert_not_after_ms: not_after_ms,
            })
            .await?;
        if !matches!(resp, SmResponse::Node(_)) {
            return Err(Status::internal(format!(
                "unexpected state machine answer {resp:?}"
            )));
        }
        tracing::info!(node_id = %id, not_after_ms, "node certificate renewed");
        Ok(Response::new(RenewResponse {
            certificate_pem: issued.cert_pem,
            ca_certificate_pem: keys.ca.cert_pem().to_owned(),
            not_after_ms,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_fields_are_checked_by_name() {
        let ok = HeartbeatRequest {
            power_source: v1::PowerSource::Battery.into(),
            battery_percent: 40,
            conditions: vec![
                v1::NodeCondition::DiskPressure.into(),
                v1::NodeCondition::DiskPressure.into(),
            ],
            overlay_addresses: vec!["192.0.2.7:7600".into(), "[2001:db8::1]:7600".into()],
            ..Default::default()
        };
        let (status, _) = status_from_wire(ok).expect("valid");
        assert_eq!(status.battery_percent, 40);
        assert_eq!(status.overlay_addresses.len(), 2);
        assert_eq!(status.conditions, vec!["DiskPressure".to_owned()]);
        // An agent of the previous release sends the string twins only.
        let legacy = HeartbeatRequest {
            legacy_power_source: "battery".into(),
            battery_percent: 40,
            legacy_conditions: vec!["MemoryPressure".into()],
            ..Default::default()
        };
        let (status, _) = status_from_wire(legacy).expect("valid");
        assert_eq!(
            (status.power_source.as_str(), status.conditions),
            ("battery", vec!["MemoryPressure".to_owned()])
        );
        for (req, field) in [
            (
                HeartbeatRequest {
                    battery_percent: 101,
                    power_source: v1::PowerSource::Battery.into(),
                    ..Default::default()
                },
                "battery_percent",
            ),
            (
                HeartbeatRequest {
                    legacy_power_source: "solar".into(),
                    ..Default::default()
                },
                "power_source",
            ),
            (
                HeartbeatRequest {
                    power_source: 17,
                    ..Default::default()
                },
                "power_source",
            ),
            (
                HeartbeatRequest {
                    capacity: Some(cloudless_proto::v1::Resources {
                        cpu_millis: 1_000_000_000,
                        memory_bytes: 1 << 50,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                "capacity.cpuMillis",
            ),
            (
                HeartbeatRequest {
                    conditions: vec![v1::NodeCondition::Unspecified.into()],
                    ..Default::default()
                },
                "conditions[0]",
            ),
            (
                HeartbeatRequest {
                    labels: [("Bad Key!".to_owned(), "v".to_owned())].into(),
                    ..Default::default()
                },
                "labels",
            ),
            (
                HeartbeatRequest {
                    overlay_addresses: vec!["192.0.2.7:7600".into(), "0.0.0.0:7600".into()],
                    ..Default::default()
                },
                "overlay_addresses[1]",
            ),
            (
                HeartbeatRequest {
                    overlay_addresses: vec!["example.org:7600".into()],
                    ..Default::default()
                },
                "overlay_addresses[0]",
            ),
            (
                HeartbeatRequest {
                    overlay_addresses: vec!["192.0.2.7:7600".into(); 9],
                    ..Default::default()
                },
                "overlay_addresses",
            ),
        ] {
            let err = status_from_wire(req).expect_err("invalid heartbeat accepted");
            assert!(err.to_string().contains(field), "{err} should name {field}");
        }
    }
}
