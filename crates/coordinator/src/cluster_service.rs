//! `ClusterService`: membership, status and the cluster configuration record.

use std::time::Duration;

use cloudless_proto::v1::cluster_service_client::ClusterServiceClient;
use cloudless_proto::v1::cluster_service_server::ClusterService;
use cloudless_proto::v1::{
    AdminCertificate, CoordinatorStatus, GetConfigRequest, GetConfigResponse, IssueAdminRequest,
    JoinCoordinatorRequest, JoinCoordinatorResponse, ListAdminsRequest, ListAdminsResponse,
    LocalStatusRequest, RemoveCoordinatorRequest, RemoveCoordinatorResponse, RenewAdminRequest,
    RevokeAdminRequest, RevokeAdminResponse, SetConfigRequest, SetConfigResponse, StatusRequest,
    StatusResponse,
};
use cloudless_state::{Command, Response as SmResponse};
use tonic::{Request, Response, Status};

use crate::error::CoordinatorError;
use crate::forward::{admin_call, idempotency_key, leader_or_forward};
use crate::handle::CoordinatorHandle;

/// The `ClusterService` implementation.
#[derive(Debug, Clone)]
pub struct ClusterApi {
    handle: CoordinatorHandle,
}

impl ClusterApi {
    /// Serves `handle`.
    pub fn new(handle: CoordinatorHandle) -> Self {
        Self { handle }
    }
}

fn check_address(field: &str, address: &str) -> Result<(), CoordinatorError> {
    cloudless_client::HostPort::parse(address)
        .map(|_| ())
        .map_err(|e| CoordinatorError::InvalidArgument(format!("{field}: {e}")))
}

#[tonic::async_trait]
impl ClusterService for ClusterApi {
    async fn status(
        &self,
        _req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        crate::authz::require(&self.handle, &_req, crate::authz::Allow::Admin)?;
        let h = &self.handle;
        let local = h.local_status();
        let members = h.members();
        let mut coordinators = Vec::with_capacity(members.len());
        let probes = members.iter().filter(|m| m.node_id != h.id()).map(|m| {
            let h = h.clone();
            let m = m.clone();
            async move {
                let unreachable = |error: String| CoordinatorStatus {
                    node_id: m.node_id,
                    address: m.address.clone(),
                    reachable: false,
                    error,
                    ..CoordinatorStatus::default()
                };
                let ch = match h.peer_channel(&m.address) {
                    Ok(ch) => ch,
                    Err(e) => return unreachable(e.to_string()),
                };
                let mut req = Request::new(LocalStatusRequest {});
                req.set_timeout(Duration::from_secs(1));
                match ClusterServiceClient::new(ch).local_status(req).await {
                    Ok(r) => r.into_inner(),
                    Err(s) => unreachable(s.message().to_owned()),
                }
            }
        });
        coordinators.push(local.clone());
        coordinators.extend(futures::future::join_all(probes).await);
        coordinators.sort_by_key(|c| c.node_id);
        let (cluster_id, cluster_name) = match h.reader().cluster() {
            Ok(Some(c)) => (c.cluster_id, c.config.cluster_name),
            _ => (String::new(), String::new()),
        };
        Ok(Response::new(StatusResponse {
            cluster_id,
            cluster_name,
            leader_id: local.leader_id,
            term: local.term,
            members,
            coordinators,
        }))
    }

    async fn local_status(
        &self,
        _req: Request<LocalStatusRequest>,
    ) -> Result<Response<CoordinatorStatus>, Status> {
        crate::authz::require(&self.handle, &_req, crate::authz::Allow::Admin)?;
        Ok(Response::new(self.handle.local_status()))
    }

    async fn join_coordinator(
        &self,
        req: Request<JoinCoordinatorRequest>,
    ) -> Result<Response<JoinCoordinatorResponse>, Status> {
        let h = self.handle.clone();
        admin_call(
            &self.handle,
            req,
            |r: JoinCoordinatorRequest| async move {
                if r.node_id == 0 {
                    return Err(CoordinatorError::InvalidArgument(
                        "node_id: must not be 0".into(),
                    ));
                }
                check_address("address", &r.address)?;
                cloudless_state::check_peer_log_format(
                    &format!("coordinator {}", r.node_id),
                    r.log_format,
                )
                .map_err(CoordinatorError::FailedPrecondition)?;
                let commit = h.join(r.node_id, r.address).await?;
                Ok(JoinCoordinatorResponse {
                    members: h.members(),
                    commit: Some(commit),
                })
            },
            |ch, r| async move { ClusterServiceClient::new(ch).join_coordinator(r).await },
        )
        .await
    }

    async fn remove_coordinator(
        &self,
        req: Request<RemoveCoordinatorRequest>,
    ) -> Result<Response<RemoveCoordinatorResponse>, Status> {
        let h = self.handle.clone();
        admin_call(
            &self.handle,
            req,
            |r: RemoveCoordinatorRequest| async move {
                if r.node_id == 0 {
                    return Err(CoordinatorError::InvalidArgument(
                        "node_id: must not be 0".into(),
                    ));
                }
                let commit = h.remove(r.node_id).await?;
                Ok(RemoveCoordinatorResponse {
                    members: h.members(),
                    commit: Some(commit),
                })
            },
            |ch, r| async move { ClusterServiceClient::new(ch).remove_coordinator(r).await },
        )
        .await
    }

    async fn get_config(
        &self,
        req: Request<GetConfigRequest>,
    ) -> Result<Response<GetConfigResponse>, Status> {
        let h = self.handle.clone();
        admin_call(
            &self.handle,
            req,
            |r: GetConfigRequest| async move {
                h.read_barrier(r.read.as_ref()).await?;
                let c = h.cluster()?;
                Ok(GetConfigResponse {
                    config: Some(c.config.into()),
                    revision: c.revision,
                })
            },
            |ch, r| async move { ClusterServiceClient::new(ch).get_config(r).await },
        )
        .await
    }

    async fn set_config(
        &self,
        req: Request<SetConfigRequest>,
    ) -> Result<Response<SetConfigResponse>, Status> {
        let h = self.handle.clone();
        admin_call(
            &self.handle,
            req,
            |r: SetConfigRequest| async move {
                let key = idempotency_key(r.write.as_ref())?;
                // An absent network section is unchanged: a client that
                // does not know it (an older one) cannot reset it.
                let keep_network = r.config.as_ref().is_some_and(|c| c.network.is_none());
                let mut config = cloudless_proto::cluster_config_from_wire(r.config)?;
                if keep_network {
                    config.network = h.cluster()?.config.network;
                }
                let expected_revision = (r.expected_revision != 0).then_some(r.expected_revision);
                let (resp, commit) = h
                    .write(
                        key,
                        Command::SetClusterConfig {
                            config,
                            expected_revision,
                        },
                    )
                    .await?;
                match resp {
                    SmResponse::ConfigSet(info) => Ok(SetConfigResponse {
                        config: Some(info.config.into()),
                        revision: info.revision,
                        commit: Some(commit),
                    }),
                    other => Err(CoordinatorError::Fatal(format!(
                        "unexpected state machine answer {other:?}"
                    ))),
                }
            },
            |ch, r| async move { ClusterServiceClient::new(ch).set_config(r).await },
        )
        .await
    }

    async fn renew_admin(
        &self,
        req: Request<RenewAdminRequest>,
    ) -> Result<Response<AdminCertificate>, Status> {
        // A revoked or expired certificate never gets here (authz).
        let actor = crate::admins::caller(&self.handle, &req)?;
        let h = self.handle.clone();
        let (local, remote) = (actor.clone(), actor);
        leader_or_forward(
            &self.handle,
            req,
            |r: RenewAdminRequest| async move {
                crate::admins::issue(&h, &local.name, &r.csr_pem, &local, true).await
            },
            |ch, r| async move {
                ClusterServiceClient::new(ch)
                    .renew_admin(crate::admins::forward_as(&remote, r))
                    .await
            },
        )
        .await
    }

    async fn issue_admin(
        &self,
        req: Request<IssueAdminRequest>,
    ) -> Result<Response<AdminCertificate>, Status> {
        let by = crate::admins::caller(&self.handle, &req)?;
        let h = self.handle.clone();
        let (local_by, remote_by) = (by.clone(), by);
        leader_or_forward(
            &self.handle,
            req,
            |r: IssueAdminRequest| async move {
                crate::admins::issue(&h, &r.name, &r.csr_pem, &local_by, false).await
            },
            |ch, r| async move {
                ClusterServiceClient::new(ch)
                    .issue_admin(crate::admins::forward_as(&remote_by, r))
                    .await
            },
        )
        .await
    }

    async fn revoke_admin(
        &self,
        req: Request<RevokeAdminRequest>,
    ) -> Result<Response<RevokeAdminResponse>, Status> {
        let by = crate::admins::caller(&self.handle, &req)?;
        let h = self.handle.clone();
        let (local_by, remote_by) = (by.clone(), by);
        leader_or_forward(
            &self.handle,
            req,
            |r: RevokeAdminRequest| async move {
                let admin = crate::admins::revoke(&h, &r.name, &local_by).await?;
                Ok(RevokeAdminResponse { admin: Some(admin) })
            },
            |ch, r| async move {
                ClusterServiceClient::new(ch)
                    .revoke_admin(crate::admins::forward_as(&remote_by, r))
                    .await
            },
        )
        .await
    }

    async fn list_admins(
        &self,
        req: Request<ListAdminsRequest>,
    ) -> Result<Response<ListAdminsResponse>, Status> {
        let h = self.handle.clone();
        admin_call(
            &self.handle,
            req,
            |_r: ListAdminsRequest| async move {
                h.read_barrier(None).await?;
                Ok(ListAdminsResponse {
                    admins: crate::admins::list(&h)?,
                })
            },
            |ch, r| async move { ClusterServiceClient::new(ch).list_admins(r).await },
        )
        .await
    }
}
