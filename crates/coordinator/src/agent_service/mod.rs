//! `AgentService`: what enrolled agents call, authenticated by their node
//! certificate. The node id comes from the certificate, never from a field.

use std::pin::Pin;
use std::sync::Arc;

use cloudless_pki::Identity;
use cloudless_proto::v1::agent_service_server::AgentService;
use cloudless_proto::v1::{
    AssignmentSet, HeartbeatRequest, HeartbeatResponse, OverlayRelayRequest, OverlayRelayResponse,
    RenewRequest, RenewResponse, ReportStatusRequest, ReportStatusResponse, TunnelDown, TunnelUp,
    WatchAssignmentsRequest,
};
use cloudless_proto::{v1, WireEnum as _};
use cloudless_state::{Command, Response as SmResponse};
use cloudless_types::ClosedSet as _;
use tonic::{Request, Response, Status, Streaming};

use crate::assignments::WatchCaches;
use crate::authz::{require, Allow};
use crate::clock::now_ms;
use crate::error::CoordinatorError;
use crate::handle::CoordinatorHandle;

mod heartbeat;
pub(crate) mod status_report;
mod watch;

use heartbeat::status_from_wire;
use status_report::{report_events, status_updates};

/// How many events one node may record: one a second, 64 at once (a
/// rollout to a node pulls a few images at once).
pub(crate) const NODE_EVENT_RATE: crate::rate_limit::Rate = crate::rate_limit::Rate {
    per_s: 1,
    burst: 64,
};

/// The `AgentService` implementation.
#[derive(Debug, Clone)]
pub struct AgentApi {
    handle: CoordinatorHandle,
    /// Shared by every assignment watch on this coordinator.
    caches: Arc<WatchCaches>,
}

impl AgentApi {
    /// Serves `handle`.
    pub fn new(handle: CoordinatorHandle) -> Self {
        Self {
            handle,
            caches: Arc::default(),
        }
    }
}

fn node_id(identity: Identity) -> Result<String, Status> {
    match identity {
        Identity::Node(id) => Ok(id),
        other => Err(Status::from(CoordinatorError::Denied(format!(
            "{other} is not a node"
        )))),
    }
}

/// Records one heartbeat from `id` and answers it.
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
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<AssignmentSet, Status>>(4);
        tokio::spawn(watch::send_views(
            self.handle.reader().clone(),
            self.caches.clone(),
            id.clone(),
            tx,
            move || crate::authz::node_still_enrolled(&handle, &id),
            self.handle.stopping().clone(),
        ));
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
        let mut req = req.into_inner();
        let mut events = report_events(self.handle.reader(), &id, std::mem::take(&mut req.events))?;
        // Events share the cluster's retention: a node records at most
        // NODE_EVENT_RATE of them (the rest are dropped, the statuses kept).
        let now = std::time::Instant::now();
        let before = events.len();
        events.retain(|_| self.handle.node_events().try_take(&id, now));
        if events.len() < before {
            tracing::debug!(node_id = %id, dropped = before - events.len(), "node over its event rate; events dropped");
        }
        let updates = status_updates(self.handle.reader(), &id, req)?;
        // A report of every replica a big node holds can exceed what one
        // Raft entry may carry: write it in parts.
        for part in crate::proposer::split_by_size(updates, usize::MAX, self.handle.part_bytes()) {
            self.handle
                .write_for_node(Command::UpdateReplicas { updates: part })
                .await?;
        }
        if !events.is_empty() {
            self.handle
                .write_for_node(Command::RecordEvents { events })
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
                    return Some((Err(Status::from(CoordinatorError::Unavailable(String::from("this coordinator is shutting down")))), None));
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
            return Err(Status::from(CoordinatorError::Internal(format!(
                "unexpected state machine answer {resp:?}"
            ))));
        }
        tracing::info!(node_id = %id, not_after_ms, "node certificate renewed");
        Ok(Response::new(RenewResponse {
            certificate_pem: issued.cert_pem,
            ca_certificate_pem: keys.ca.cert_pem().to_owned(),
            not_after_ms,
        }))
    }
}
