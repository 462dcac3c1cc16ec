//! `NodeService`: join tokens, enrollment, rejoin and node records.

use std::collections::BTreeMap;

use cloudless_pki::{Identity, JoinTokenClaims};
use cloudless_proto::v1::node_service_client::NodeServiceClient;
use cloudless_proto::v1::node_service_server::NodeService;
use cloudless_proto::v1::{
    CreateJoinTokenRequest, CreateJoinTokenResponse, EnrollRequest, EnrollResponse, GetNodeRequest,
    GetNodeResponse, JoinTokenInfo, LabelNodeRequest, ListJoinTokensRequest,
    ListJoinTokensResponse, ListNodesRequest, ListNodesResponse, NodeActionRequest,
    NodeActionResponse, RejoinRequest, RejoinResponse, RevokeJoinTokenRequest,
    RevokeJoinTokenResponse,
};
use cloudless_state::{Command, Rejection, Response as SmResponse};
use cloudless_types::{JoinTokenRecord, NodeRecord, ValidationErrors};
use tonic::{Request, Response, Status};

use crate::clock::now_ms;
use crate::error::CoordinatorError;
use crate::forward::{admin_call, idempotency_key, leader_or_forward};
use crate::handle::CoordinatorHandle;

/// Default join token lifetime when the request leaves it 0: one hour.
const DEFAULT_TOKEN_TTL_S: u64 = 3600;
/// Longest join token lifetime: 30 days.
const MAX_TOKEN_TTL_S: u64 = 30 * 24 * 3600;
/// Most uses one token may allow.
const MAX_TOKEN_USES: u32 = 10_000;
/// Most labels one `node label` call may set or remove.
const MAX_LABEL_CHANGES: usize = 64;

/// The `NodeService` implementation.
#[derive(Debug, Clone)]
pub struct NodeApi {
    handle: CoordinatorHandle,
}

impl NodeApi {
    /// Serves `handle`.
    pub fn new(handle: CoordinatorHandle) -> Self {
        Self { handle }
    }
}

fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

pub(crate) fn to_wire(n: NodeRecord) -> cloudless_proto::v1::Node {
    let (capacity, unverified) = n.placement_capacity();
    let labels = n.labels;
    use cloudless_proto::WireEnum as _;
    use cloudless_types::ClosedSet as _;
    // Stored by name, checked when reported: a name this release does not
    // know (none today) is left out of the enum list, kept in the twin.
    let conditions = n
        .status
        .conditions
        .iter()
        .filter_map(|c| cloudless_types::NodeCondition::from_name(c))
        .map(cloudless_proto::v1::NodeCondition::wire)
        .collect();
    let power_source = cloudless_types::PowerSource::from_name(&n.status.power_source)
        .map_or(0, cloudless_proto::v1::PowerSource::wire);
    cloudless_proto::v1::Node {
        region: labels.get("region").cloned().unwrap_or_default(),
        zone: labels.get("zone").cloned().unwrap_or_default(),
        arch: labels.get("arch").cloned().unwrap_or_default(),
        id: n.id,
        name: n.name,
        phase: cloudless_proto::v1::NodePhase::wire(n.phase),
        cordoned: n.cordoned,
        draining: n.draining,
        labels: labels.into_iter().collect(),
        capacity: Some(capacity.into()),
        reported_capacity: Some(n.status.capacity.into()),
        capacity_unverified: unverified.into_iter().map(str::to_owned).collect(),
        reported_labels: n.status.reported_labels.into_iter().collect(),
        reliability: n.reliability,
        last_heartbeat_ms: n.last_heartbeat_ms,
        enrolled_at_ms: n.enrolled_at_ms,
        cert_not_after_ms: n.cert_not_after_ms,
        phase_since_ms: n.phase_since_ms,
        conditions,
        power_source,
        legacy_conditions: n.status.conditions,
        legacy_power_source: n.status.power_source,
        battery_percent: u32::from(n.status.battery_percent),
        overlay_addresses: n.status.overlay_addresses,
        down_count: n.down_count,
        subnet: n.subnet.unwrap_or_default(),
        ..Default::default()
    }
}

/// The wire form of `n`, with the usage and last heartbeat the leader holds in memory.
fn with_live(h: &CoordinatorHandle, n: NodeRecord) -> cloudless_proto::v1::Node {
    let live = h.liveness().live_view(&n.id);
    let mut wire = to_wire(n);
    if let Some((usage, last_ms)) = live {
        wire.usage = Some(usage.into());
        wire.last_heartbeat_ms = wire.last_heartbeat_ms.max(last_ms);
    }
    wire
}

fn token_info(t: JoinTokenRecord) -> JoinTokenInfo {
    JoinTokenInfo {
        remaining_uses: t.max_uses.saturating_sub(t.uses),
        token_id: t.id,
        expires_at_ms: t.expires_at_ms,
        revoked: t.revoked,
        labels: t.labels.into_iter().collect(),
    }
}

fn node_answer(resp: SmResponse) -> Result<NodeRecord, CoordinatorError> {
    match resp {
        SmResponse::Node(n) => Ok(n),
        other => Err(CoordinatorError::Fatal(format!(
            "unexpected state machine answer {other:?}"
        ))),
    }
}

/// The `SetNodeLabels` command for `r`, every problem reported at once.
fn label_command(r: LabelNodeRequest) -> Result<Command, CoordinatorError> {
    let mut errs = ValidationErrors::default();
    if r.set.len() + r.remove.len() > MAX_LABEL_CHANGES {
        errs.push(
            "set",
            format!(
                "{} changes, at most {MAX_LABEL_CHANGES} are allowed per call",
                r.set.len() + r.remove.len()
            ),
        );
    }
    if r.set.is_empty() && r.remove.is_empty() {
        errs.push("set", "no label to set or remove");
    }
    let set: BTreeMap<String, String> = r.set.into_iter().collect();
    cloudless_types::check_labels(&mut errs, "set", &set);
    for k in &r.remove {
        if set.contains_key(k) {
            errs.push(format!("remove.{k}"), "is also being set");
        }
    }
    errs.into_result()?;
    Ok(Command::SetNodeLabels {
        node_id: r.id,
        set,
        remove: r.remove,
    })
}

fn check_name(name: &str) -> Result<(), CoordinatorError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(CoordinatorError::InvalidArgument(format!(
            "name: {name:?} must be 1-63 lowercase letters, digits or '-', not starting or ending with '-'"
        )))
    }
}

impl NodeApi {
    /// Runs `call`, which needs no client certificate (enrollment, rejoin):
    /// anyone can call it, so the failed attempts from each source address
    /// get a rate (`what` names them). A follower forwarding the call has
    /// already counted it.
    async fn failures_limited<T, R, F, Fut>(
        &self,
        req: Request<T>,
        what: &'static str,
        call: F,
    ) -> Result<Response<R>, Status>
    where
        F: FnOnce(Request<T>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<R>, Status>>,
    {
        let forwarded_by_peer =
            crate::authz::require(&self.handle, &req, crate::authz::Allow::Coordinator).is_ok()
                && self.handle.tls_ca_pem().is_some();
        let remote = (!forwarded_by_peer).then(|| req.remote_addr());
        if let Some(remote) = remote {
            self.handle.admit_enroll(remote, what)?;
        }
        let answer = call(req).await;
        if let (Err(status), Some(remote)) = (&answer, remote) {
            // Only a refusal of the caller's own making counts against it.
            if !matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::Internal | tonic::Code::ResourceExhausted
            ) {
                self.handle.enroll_failed(remote);
            }
        }
        answer
    }

    async fn flags(
        &self,
        req: Request<NodeActionRequest>,
        cordoned: Option<bool>,
        draining: Option<bool>,
    ) -> Result<Response<NodeActionResponse>, Status> {
        let h = self.handle.clone();
        let remote_cordoned = cordoned;
        leader_or_forward(
            &self.handle,
            req,
            |r: NodeActionRequest| async move {
                let key = idempotency_key(r.write.as_ref())?;
                let (resp, commit) = h
                    .write(
                        key,
                        Command::SetNodeFlags {
                            node_id: r.id,
                            cordoned,
                            draining,
                        },
                    )
                    .await?;
                Ok(NodeActionResponse {
                    node: Some(to_wire(node_answer(resp)?)),
                    commit: Some(commit),
                })
            },
            move |ch, r| async move {
                let mut c = NodeServiceClient::new(ch);
                match (remote_cordoned, draining) {
                    (_, Some(true)) => c.drain(r).await,
                    (Some(true), _) => c.cordon(r).await,
                    _ => c.uncordon(r).await,
                }
            },
        )
        .await
    }
}

/// Refuses a join token the applied state already shows unusable.
fn usable_join_token(
    h: &CoordinatorHandle,
    token_id: &str,
    now_ms: i64,
) -> Result<(), CoordinatorError> {
    let refuse = |problem: String| {
        let reason = if problem.starts_with("is unknown") {
            "unknown"
        } else if problem.starts_with("was revoked") {
            "revoked"
        } else if problem.starts_with("expired") {
            "expired"
        } else {
            "used_up"
        };
        h.api_metrics().join_refused(reason);
        Err(CoordinatorError::Rejected(Rejection::JoinToken {
            id: token_id.to_owned(),
            problem,
        }))
    };
    let Some(t) = h.reader().join_token(token_id)? else {
        return refuse("is unknown".into());
    };
    if t.revoked {
        return refuse("was revoked".into());
    }
    if now_ms >= t.expires_at_ms {
        return refuse("expired".into());
    }
    if t.uses >= t.max_uses {
        return refuse(format!("has been used {} of {} times", t.uses, t.max_uses));
    }
    Ok(())
}

/// Enrolls a device on the leader: checks the join token, signs its CSR for
/// a new node id and records the node.
async fn enroll_on_leader(
    h: &CoordinatorHandle,
    r: EnrollRequest,
) -> Result<EnrollResponse, CoordinatorError> {
    check_name(&r.name)?;
    // Only the leader's state is sure to hold a token just
    // created; a follower forwards before any work.
    h.ensure_leader()?;
    let keys = h.identity_keys()?;
    let lifetime = h.cluster()?.config.node_cert_lifetime_s;
    let now = now_ms();
    let claims = keys
        .tokens
        .verify(&r.join_token, now / 1000)
        .inspect_err(|_| h.api_metrics().join_refused("invalid"))?;
    // A spent, revoked or unknown token is refused from the local
    // state before any signature or Raft write (the state machine
    // checks again when the enrollment applies).
    usable_join_token(h, &claims.jti, now)?;
    let node_id = format!("n{}", random_hex(6));
    // Sign first: a bad CSR must not use up the token.
    let issued = keys.ca.sign_csr(
        &r.csr_pem,
        &Identity::Node(node_id.clone()),
        lifetime,
        now / 1000,
    )?;
    let node = NodeRecord::new(
        node_id.clone(),
        r.name,
        claims.jti.clone(),
        issued.not_after.saturating_mul(1000),
    );
    let (resp, _) = h
        .write(
            None,
            Command::EnrollNode {
                token_id: claims.jti,
                node,
                assign_subnet: true,
            },
        )
        .await?;
    let node = node_answer(resp)?;
    h.api_metrics().join_tokens_used.inc();
    tracing::info!(node_id = %node.id, name = %node.name, "node enrolled");
    Ok(EnrollResponse {
        node_id: node.id,
        certificate_pem: issued.cert_pem,
        ca_certificate_pem: keys.ca.cert_pem().to_owned(),
    })
}

#[tonic::async_trait]
impl NodeService for NodeApi {
    async fn enroll(
        &self,
        req: Request<EnrollRequest>,
    ) -> Result<Response<EnrollResponse>, Status> {
        let h = self.handle.clone();
        self.failures_limited(req, "enrollment attempts", |req| async move {
            let local = h.clone();
            leader_or_forward(
                &h,
                req,
                |r: EnrollRequest| async move { enroll_on_leader(&local, r).await },
                |ch, r| async move { NodeServiceClient::new(ch).enroll(r).await },
            )
            .await
        })
        .await
    }

    async fn rejoin(
        &self,
        req: Request<RejoinRequest>,
    ) -> Result<Response<RejoinResponse>, Status> {
        let h = self.handle.clone();
        self.failures_limited(req, "rejoin attempts", |req| async move {
            let local = h.clone();
            leader_or_forward(
                &h,
                req,
                |r: RejoinRequest| async move { crate::rejoin::rejoin(&local, r).await },
                |ch, r| async move { NodeServiceClient::new(ch).rejoin(r).await },
            )
            .await
        })
        .await
    }

    async fn list(
        &self,
        req: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        let h = self.handle.clone();
        admin_call(
            &self.handle,
            req,
            |r: ListNodesRequest| async move {
                h.read_barrier(r.read.as_ref()).await?;
                Ok(ListNodesResponse {
                    nodes: h
                        .reader()
                        .nodes()?
                        .into_iter()
                        .map(|n| with_live(&h, n))
                        .collect(),
                })
            },
            |ch, r| async move { NodeServiceClient::new(ch).list(r).await },
        )
        .await
    }

    async fn get(&self, req: Request<GetNodeRequest>) -> Result<Response<GetNodeResponse>, Status> {
        let h = self.handle.clone();
        admin_call(
            &self.handle,
            req,
            |r: GetNodeRequest| async move {
                h.read_barrier(r.read.as_ref()).await?;
                let node = h.reader().node(&r.id)?.ok_or(CoordinatorError::Rejected(
                    Rejection::NodeNotFound { id: r.id },
                ))?;
                Ok(GetNodeResponse {
                    node: Some(with_live(&h, node)),
                })
            },
            |ch, r| async move { NodeServiceClient::new(ch).get(r).await },
        )
        .await
    }

    async fn cordon(
        &self,
        req: Request<NodeActionRequest>,
    ) -> Result<Response<NodeActionResponse>, Status> {
        crate::authz::require(&self.handle, &req, crate::authz::Allow::Admin)?;
        self.flags(req, Some(true), None).await
    }

    async fn uncordon(
        &self,
        req: Request<NodeActionRequest>,
    ) -> Result<Response<NodeActionResponse>, Status> {
        crate::authz::require(&self.handle, &req, crate::authz::Allow::Admin)?;
        self.flags(req, Some(false), Some(false)).await
    }

    async fn drain(
        &self,
        req: Request<NodeActionRequest>,
    ) -> Result<Response<NodeActionResponse>, Status> {
        crate::authz::require(&self.handle, &req, crate::authz::Allow::Admin)?;
        self.flags(req, None, Some(true)).await
    }

    async fn remove(
        &self,
        req: Request<NodeActionRequest>,
    ) -> Result<Response<NodeActionResponse>, Status> {
        let h = self.handle.clone();
        admin_call(
            &self.handle,
            req,
            |r: NodeActionRequest| async move {
                let key = idempotency_key(r.write.as_ref())?;
                let (_, commit) = h.write(key, Command::RemoveNode { node_id: r.id }).await?;
                Ok(NodeActionResponse {
                    node: None,
                    commit: Some(commit),
                })
            },
            |ch, r| async move { NodeServiceClient::new(ch).remove(r).await },
        )
        .await
    }

    async fn label(
        &self,
        req: Request<LabelNodeRequest>,
    ) -> Result<Response<NodeActionResponse>, Status> {
        let h = self.handle.clone();
        admin_call(
            &self.handle,
            req,
            |r: LabelNodeRequest| async move {
                let key = idempotency_key(r.write.as_ref())?;
                let (resp, commit) = h.write(key, label_command(r)?).await?;
                let node = node_answer(resp)?;
                tracing::info!(node_id = %node.id, labels = ?node.labels, "node labels set");
                Ok(NodeActionResponse {
                    node: Some(to_wire(node)),
                    commit: Some(commit),
                })
            },
            |ch, r| async move { NodeServiceClient::new(ch).label(r).await },
        )
        .await
    }

    async fn accept_capacity(
        &self,
        req: Request<NodeActionRequest>,
    ) -> Result<Response<NodeActionResponse>, Status> {
        let h = self.handle.clone();
        admin_call(
            &self.handle,
            req,
            |r: NodeActionRequest| async move {
                let key = idempotency_key(r.write.as_ref())?;
                let (resp, commit) = h
                    .write(key, Command::AcceptNodeCapacity { node_id: r.id })
                    .await?;
                let node = node_answer(resp)?;
                tracing::info!(node_id = %node.id, capacity = ?node.trusted_capacity, "node capacity accepted");
                Ok(NodeActionResponse {
                    node: Some(to_wire(node)),
                    commit: Some(commit),
                })
            },
            |ch, r| async move { NodeServiceClient::new(ch).accept_capacity(r).await },
        )
        .await
    }

    async fn create_join_token(
        &self,
        req: Request<CreateJoinTokenRequest>,
    ) -> Result<Response<CreateJoinTokenResponse>, Status> {
        let h = self.handle.clone();
        admin_call(
            &self.handle,
            req,
            |r: CreateJoinTokenRequest| async move {
                let mut errs = ValidationErrors::default();
                let ttl = if r.ttl_seconds == 0 {
                    DEFAULT_TOKEN_TTL_S
                } else {
                    r.ttl_seconds
                };
                if ttl > MAX_TOKEN_TTL_S {
                    errs.push(
                        "ttl_seconds",
                        format!("{ttl} is above the maximum of {MAX_TOKEN_TTL_S} (30 days)"),
                    );
                }
                let max_uses = if r.max_uses == 0 { 1 } else { r.max_uses };
                if max_uses > MAX_TOKEN_USES {
                    errs.push(
                        "max_uses",
                        format!("{max_uses} is above the maximum of {MAX_TOKEN_USES}"),
                    );
                }
                let labels: BTreeMap<String, String> = r.labels.into_iter().collect();
                for (k, v) in &labels {
                    let ok = !k.is_empty()
                        && k.len() <= 253
                        && k.bytes().all(|b| {
                            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'/' | b'-')
                        })
                        && v.len() <= 253;
                    if !ok {
                        errs.push(
                            format!("labels.{k}"),
                            "keys are 1-253 of [A-Za-z0-9._/-], values at most 253 characters",
                        );
                    }
                }
                errs.into_result()?;
                let key = idempotency_key(r.write.as_ref())?;
                let keys = h.identity_keys()?;
                let now = now_ms();
                let id = random_hex(8);
                let claims =
                    JoinTokenClaims::new(id.clone(), now / 1000, ttl, max_uses, labels.clone());
                let record = JoinTokenRecord {
                    id: id.clone(),
                    created_at_ms: now,
                    expires_at_ms: claims.exp.saturating_mul(1000),
                    max_uses,
                    uses: 0,
                    revoked: false,
                    labels,
                };
                let expires_at_ms = record.expires_at_ms;
                h.write(key, Command::CreateJoinToken { token: record })
                    .await?;
                let token = keys.tokens.sign(&claims)?;
                tracing::info!(token_id = %id, ttl_s = ttl, max_uses, "join token created");
                Ok(CreateJoinTokenResponse {
                    token_id: id,
                    token,
                    expires_at_ms,
                })
            },
            |ch, r| async move { NodeServiceClient::new(ch).create_join_token(r).await },
        )
        .await
    }

    async fn list_join_tokens(
        &self,
        req: Request<ListJoinTokensRequest>,
    ) -> Result<Response<ListJoinTokensResponse>, Status> {
        let h = self.handle.clone();
        admin_call(
            &self.handle,
            req,
            |r: ListJoinTokensRequest| async move {
                h.read_barrier(r.read.as_ref()).await?;
                Ok(ListJoinTokensResponse {
                    tokens: h
                        .reader()
                        .join_tokens()?
                        .into_iter()
                        .map(token_info)
                        .collect(),
                })
            },
            |ch, r| async move { NodeServiceClient::new(ch).list_join_tokens(r).await },
        )
        .await
    }

    async fn revoke_join_token(
        &self,
        req: Request<RevokeJoinTokenRequest>,
    ) -> Result<Response<RevokeJoinTokenResponse>, Status> {
        let h = self.handle.clone();
        admin_call(
            &self.handle,
            req,
            |r: RevokeJoinTokenRequest| async move {
                let key = idempotency_key(r.write.as_ref())?;
                let (_, commit) = h
                    .write(
                        key,
                        Command::RevokeJoinToken {
                            token_id: r.token_id,
                        },
                    )
                    .await?;
                Ok(RevokeJoinTokenResponse {
                    commit: Some(commit),
                })
            },
            |ch, r| async move { NodeServiceClient::new(ch).revoke_join_token(r).await },
        )
        .await
    }
}
