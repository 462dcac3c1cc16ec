//! `WorkloadService`: desired state for workloads, replicated through Raft.
//!
//! This file holds the service, the workload and replica reads and writes,
//! and the helpers its parts share; [`rollout`], [`explain`] (placement),
//! [`logs_exec`], [`events`] and [`services`] (`ListServices`) serve the
//! rest.

use cloudless_proto::v1::workload_service_client::WorkloadServiceClient;
use cloudless_proto::v1::workload_service_server::WorkloadService;
use cloudless_proto::v1::{
    ApplyWorkloadRequest, ApplyWorkloadResponse, DeleteWorkloadRequest, DeleteWorkloadResponse,
    Event, EventsRequest, ExecOutput, ExecRequest, ExplainPlacementRequest,
    ExplainPlacementResponse, GetWorkloadRequest, GetWorkloadResponse, ListReplicasRequest,
    ListReplicasResponse, ListServicesRequest, ListServicesResponse, ListWorkloadsRequest,
    ListWorkloadsResponse, LogChunk, LogsRequest, RolloutHistoryRequest, RolloutHistoryResponse,
    RolloutStatusRequest, RolloutStatusResponse, RolloutUndoRequest, RolloutUndoResponse,
    ScaleWorkloadRequest, ScaleWorkloadResponse,
};
use cloudless_state::{Command, Rejection, Response as SmResponse};
use cloudless_types::DEFAULT_NAMESPACE;
use tonic::{Request, Response, Status};

use crate::error::CoordinatorError;
use crate::forward::{admin_call, idempotency_key};
use crate::handle::CoordinatorHandle;

mod events;
mod explain;
mod logs_exec;
mod rollout;
mod services;

/// The `WorkloadService` implementation.
#[derive(Debug, Clone)]
pub struct WorkloadApi {
    handle: CoordinatorHandle,
}

impl WorkloadApi {
    /// Serves `handle`.
    pub fn new(handle: CoordinatorHandle) -> Self {
        Self { handle }
    }
}

fn namespace_or_default(ns: String) -> String {
    if ns.is_empty() {
        DEFAULT_NAMESPACE.to_owned()
    } else {
        ns
    }
}

fn require_name(name: &str) -> Result<(), CoordinatorError> {
    if name.is_empty() {
        Err(CoordinatorError::InvalidArgument(
            "name: must not be empty".into(),
        ))
    } else {
        Ok(())
    }
}

fn stored(resp: SmResponse) -> Result<(cloudless_types::Workload, bool), CoordinatorError> {
    match resp {
        SmResponse::WorkloadStored { workload, created } => Ok((workload, created)),
        other => Err(CoordinatorError::Fatal(format!(
            "unexpected state machine answer {other:?}"
        ))),
    }
}

/// The workload on the wire with replica counts from the replica records.
fn with_status(
    reader: &cloudless_state::StateReader,
    w: cloudless_types::Workload,
) -> Result<cloudless_proto::v1::Workload, CoordinatorError> {
    let replicas = reader.workload_replicas(&w.namespace, &w.name)?;
    let template = w.template;
    let generation = w.generation;
    let mut out: cloudless_proto::v1::Workload = w.into();
    if let Some(st) = out.status.as_mut() {
        st.current_replicas = u32::try_from(replicas.len()).unwrap_or(u32::MAX);
        st.updated_replicas =
            u32::try_from(replicas.iter().filter(|r| r.template == template).count())
                .unwrap_or(u32::MAX);
        st.ready_replicas = u32::try_from(
            replicas
                .iter()
                .filter(|r| r.state == cloudless_types::ReplicaState::Ready)
                .count(),
        )
        .unwrap_or(u32::MAX);
        st.observed_generation = generation;
    }
    Ok(out)
}

type Stream<T> = std::pin::Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send>>;

/// The workload or a NotFound naming it.
fn find_workload(
    reader: &cloudless_state::StateReader,
    ns: &str,
    name: &str,
) -> Result<cloudless_types::Workload, CoordinatorError> {
    require_name(name)?;
    reader.workload(ns, name)?.ok_or_else(|| {
        Rejection::WorkloadNotFound {
            namespace: ns.to_owned(),
            name: name.to_owned(),
        }
        .into()
    })
}

#[tonic::async_trait]
impl WorkloadService for WorkloadApi {
    async fn apply(
        &self,
        req: Request<ApplyWorkloadRequest>,
    ) -> Result<Response<ApplyWorkloadResponse>, Status> {
        let h = self.handle.clone();
        admin_call(
            &self.handle,
            req,
            |r: ApplyWorkloadRequest| async move {
                let key = idempotency_key(r.write.as_ref())?;
                let workload = cloudless_proto::workload_from_wire(r.workload)?;
                let cmd = Command::PutWorkload {
                    workload,
                    cause: "apply".into(),
                    assign_vip: true,
                };
                let (resp, commit) = h.write(key, cmd).await?;
                let (w, created) = stored(resp)?;
                Ok(ApplyWorkloadResponse {
                    workload: Some(w.into()),
                    created,
                    commit: Some(commit),
                })
            },
            |ch, r| async move { WorkloadServiceClient::new(ch).apply(r).await },
        )
        .await
    }

    async fn get(
        &self,
        req: Request<GetWorkloadRequest>,
    ) -> Result<Response<GetWorkloadResponse>, Status> {
        let h = self.handle.clone();
        admin_call(
            &self.handle,
            req,
            |r: GetWorkloadRequest| async move {
                require_name(&r.name)?;
                h.read_barrier(r.read.as_ref()).await?;
                let ns = namespace_or_default(r.namespace);
                match h.reader().workload(&ns, &r.name)? {
                    Some(w) => Ok(GetWorkloadResponse {
                        workload: Some(with_status(h.reader(), w)?),
                    }),
                    None => Err(Rejection::WorkloadNotFound {
                        namespace: ns,
                        name: r.name,
                    }
                    .into()),
                }
            },
            |ch, r| async move { WorkloadServiceClient::new(ch).get(r).await },
        )
        .await
    }

    async fn list(
        &self,
        req: Request<ListWorkloadsRequest>,
    ) -> Result<Response<ListWorkloadsResponse>, Status> {
        let h = self.handle.clone();
        admin_call(
            &self.handle,
            req,
            |r: ListWorkloadsRequest| async move {
                h.read_barrier(r.read.as_ref()).await?;
                let ns = (!r.namespace.is_empty()).then_some(r.namespace.as_str());
                let reader = h.reader();
                let workloads = reader
                    .workloads(ns)?
                    .into_iter()
                    .map(|w| with_status(reader, w))
                    .collect::<Result<_, _>>()?;
                Ok(ListWorkloadsResponse { workloads })
            },
            |ch, r| async move { WorkloadServiceClient::new(ch).list(r).await },
        )
        .await
    }

    async fn delete(
        &self,
        req: Request<DeleteWorkloadRequest>,
    ) -> Result<Response<DeleteWorkloadResponse>, Status> {
        let h = self.handle.clone();
        admin_call(
            &self.handle,
            req,
            |r: DeleteWorkloadRequest| async move {
                require_name(&r.name)?;
                let key = idempotency_key(r.write.as_ref())?;
                let cmd = Command::DeleteWorkload {
                    namespace: namespace_or_default(r.namespace),
                    name: r.name,
                };
                let (_, commit) = h.write(key, cmd).await?;
                Ok(DeleteWorkloadResponse {
                    commit: Some(commit),
                })
            },
            |ch, r| async move { WorkloadServiceClient::new(ch).delete(r).await },
        )
        .await
    }

    async fn scale(
        &self,
        req: Request<ScaleWorkloadRequest>,
    ) -> Result<Response<ScaleWorkloadResponse>, Status> {
        let h = self.handle.clone();
        admin_call(
            &self.handle,
            req,
            |r: ScaleWorkloadRequest| async move {
                require_name(&r.name)?;
                if r.replicas > cloudless_types::MAX_REPLICAS {
                    return Err(CoordinatorError::InvalidArgument(format!(
                        "replicas: {} is above the maximum of {}",
                        r.replicas,
                        cloudless_types::MAX_REPLICAS
                    )));
                }
                let key = idempotency_key(r.write.as_ref())?;
                let namespace = namespace_or_default(r.namespace);
                // The new count must leave the workload's rollout (and a
                // drain, which moves replicas under the same rules) room to
                // progress, as `apply` checks.
                if let Some(w) = h.reader().workload(&namespace, &r.name)? {
                    let mut spec = w.spec;
                    spec.replicas = r.replicas;
                    let mut errs = cloudless_types::ValidationErrors::default();
                    spec.validate_into("spec", &mut errs);
                    errs.into_result()?;
                }
                let cmd = Command::ScaleWorkload {
                    namespace,
                    name: r.name,
                    replicas: r.replicas,
                };
                let (resp, commit) = h.write(key, cmd).await?;
                let (w, _) = stored(resp)?;
                Ok(ScaleWorkloadResponse {
                    workload: Some(w.into()),
                    commit: Some(commit),
                })
            },
            |ch, r| async move { WorkloadServiceClient::new(ch).scale(r).await },
        )
        .await
    }

    async fn rollout_status(
        &self,
        req: Request<RolloutStatusRequest>,
    ) -> Result<Response<RolloutStatusResponse>, Status> {
        rollout::status(&self.handle, req).await
    }

    async fn rollout_history(
        &self,
        req: Request<RolloutHistoryRequest>,
    ) -> Result<Response<RolloutHistoryResponse>, Status> {
        rollout::history(&self.handle, req).await
    }

    async fn rollout_undo(
        &self,
        req: Request<RolloutUndoRequest>,
    ) -> Result<Response<RolloutUndoResponse>, Status> {
        rollout::undo(&self.handle, req).await
    }

    async fn explain_placement(
        &self,
        req: Request<ExplainPlacementRequest>,
    ) -> Result<Response<ExplainPlacementResponse>, Status> {
        explain::explain_placement(&self.handle, req).await
    }

    type LogsStream = Stream<LogChunk>;
    async fn logs(&self, req: Request<LogsRequest>) -> Result<Response<Self::LogsStream>, Status> {
        logs_exec::logs(&self.handle, req).await
    }

    type ExecStream = Stream<ExecOutput>;
    async fn exec(&self, req: Request<ExecRequest>) -> Result<Response<Self::ExecStream>, Status> {
        logs_exec::exec(&self.handle, req).await
    }

    async fn list_replicas(
        &self,
        req: Request<ListReplicasRequest>,
    ) -> Result<Response<ListReplicasResponse>, Status> {
        let h = self.handle.clone();
        admin_call(
            &self.handle,
            req,
            |r: ListReplicasRequest| async move {
                h.read_barrier(r.read.as_ref()).await?;
                let reader = h.reader();
                let mut replicas = if r.name.is_empty() {
                    let ns = (!r.namespace.is_empty()).then_some(r.namespace.as_str());
                    let mut all = reader.replicas()?;
                    all.retain(|x| ns.is_none_or(|ns| x.namespace == ns));
                    all
                } else {
                    reader.workload_replicas(&namespace_or_default(r.namespace), &r.name)?
                };
                replicas.sort_by(|a, b| {
                    (&a.namespace, &a.workload, a.created_at_ms, &a.id).cmp(&(
                        &b.namespace,
                        &b.workload,
                        b.created_at_ms,
                        &b.id,
                    ))
                });
                let mut names = std::collections::HashMap::new();
                let mut out = Vec::with_capacity(replicas.len());
                for x in replicas {
                    let node_name = match names.get(&x.node_id) {
                        Some(n) => String::clone(n),
                        None => {
                            let n = reader.node(&x.node_id)?.map(|n| n.name).unwrap_or_default();
                            names.insert(x.node_id.clone(), n.clone());
                            n
                        }
                    };
                    let mut p: cloudless_proto::v1::Replica = x.into();
                    p.node_name = node_name;
                    out.push(p);
                }
                Ok(ListReplicasResponse { replicas: out })
            },
            |ch, r| async move { WorkloadServiceClient::new(ch).list_replicas(r).await },
        )
        .await
    }

    async fn list_services(
        &self,
        req: Request<ListServicesRequest>,
    ) -> Result<Response<ListServicesResponse>, Status> {
        services::list(&self.handle, req).await
    }

    type EventsStream = Stream<Event>;
    async fn events(
        &self,
        req: Request<EventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        events::events(&self.handle, req).await
    }
}
