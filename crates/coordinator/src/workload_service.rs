//! `WorkloadService`: desired state for workloads, replicated through Raft.

use cloudless_proto::v1::workload_service_client::WorkloadServiceClient;
use cloudless_proto::v1::workload_service_server::WorkloadService;
use cloudless_proto::v1::{
    ApplyWorkloadRequest, ApplyWorkloadResponse, DeleteWorkloadRequest, DeleteWorkloadResponse,
    Event, EventsRequest, ExecInput, ExecOutput, GetWorkloadRequest, GetWorkloadResponse,
    ListReplicasRequest, ListReplicasResponse, ListWorkloadsRequest, ListWorkloadsResponse,
    LogChunk, LogsRequest, RolloutHistoryRequest, RolloutHistoryResponse, RolloutStatusRequest,
    RolloutStatusResponse, RolloutUndoRequest, RolloutUndoResponse, ScaleWorkloadRequest,
    ScaleWorkloadResponse,
};
use cloudless_state::{Command, Rejection, Response as SmResponse};
use cloudless_types::DEFAULT_NAMESPACE;
use tonic::{Request, Response, Status, Streaming};

use crate::coordinator::CoordinatorHandle;
use crate::error::CoordinatorError;
use crate::services::{idempotency_key, leader_or_forward};

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

const LATER: &str =
    "arrives with workload execution (issue 6); this coordinator stores desired state only";

#[tonic::async_trait]
impl WorkloadService for WorkloadApi {
    async fn apply(
        &self,
        req: Request<ApplyWorkloadRequest>,
    ) -> Result<Response<ApplyWorkloadResponse>, Status> {
        crate::authz::require(&self.handle, &req, crate::authz::Allow::Admin)?;
        let h = self.handle.clone();
        leader_or_forward(
            &self.handle,
            req,
            |r: ApplyWorkloadRequest| async move {
                let key = idempotency_key(r.write.as_ref())?;
                let workload = cloudless_proto::workload_from_wire(r.workload)?;
                let (resp, commit) = h.write(key, Command::PutWorkload { workload }).await?;
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
        crate::authz::require(&self.handle, &req, crate::authz::Allow::Admin)?;
        let h = self.handle.clone();
        leader_or_forward(
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
        crate::authz::require(&self.handle, &req, crate::authz::Allow::Admin)?;
        let h = self.handle.clone();
        leader_or_forward(
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
        crate::authz::require(&self.handle, &req, crate::authz::Allow::Admin)?;
        let h = self.handle.clone();
        leader_or_forward(
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
        crate::authz::require(&self.handle, &req, crate::authz::Allow::Admin)?;
        let h = self.handle.clone();
        leader_or_forward(
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
                let cmd = Command::ScaleWorkload {
                    namespace: namespace_or_default(r.namespace),
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
        _r: Request<RolloutStatusRequest>,
    ) -> Result<Response<RolloutStatusResponse>, Status> {
        crate::authz::require(&self.handle, &_r, crate::authz::Allow::Admin)?;
        Err(Status::unimplemented(format!("rollout status {LATER}")))
    }

    async fn rollout_history(
        &self,
        _r: Request<RolloutHistoryRequest>,
    ) -> Result<Response<RolloutHistoryResponse>, Status> {
        crate::authz::require(&self.handle, &_r, crate::authz::Allow::Admin)?;
        Err(Status::unimplemented(format!("rollout history {LATER}")))
    }

    async fn rollout_undo(
        &self,
        _r: Request<RolloutUndoRequest>,
    ) -> Result<Response<RolloutUndoResponse>, Status> {
        crate::authz::require(&self.handle, &_r, crate::authz::Allow::Admin)?;
        Err(Status::unimplemented(format!("rollout undo {LATER}")))
    }

    type LogsStream = Stream<LogChunk>;
    async fn logs(&self, req: Request<LogsRequest>) -> Result<Response<Self::LogsStream>, Status> {
        // Served by any coordinator: every agent keeps a tunnel to each.
        crate::authz::require(&self.handle, &req, crate::authz::Allow::Admin)?;
        let r = req.into_inner();
        let ns = namespace_or_default(r.namespace);
        let reader = self.handle.reader();
        let replicas = if r.replica_id.is_empty() {
            require_name(&r.name)?;
            reader
                .workload_replicas(&ns, &r.name)
                .map_err(CoordinatorError::from)?
        } else {
            reader
                .replica(&r.replica_id)
                .map_err(CoordinatorError::from)?
                .into_iter()
                .collect()
        };
        if replicas.is_empty() {
            return Err(Status::not_found(format!(
                "no replicas of {ns}/{}{}",
                r.name,
                if r.replica_id.is_empty() {
                    String::new()
                } else {
                    format!(" with id {}", r.replica_id)
                }
            )));
        }
        let single = replicas.len() == 1;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<LogChunk, Status>>(64);
        for rep in replicas {
            let tunnels = self.handle.tunnels().clone();
            let down = LogsRequest {
                namespace: rep.namespace.clone(),
                name: rep.workload.clone(),
                replica_id: rep.id.clone(),
                follow: r.follow,
                tail_lines: r.tail_lines,
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let problem = |why: String| {
                    if single {
                        Err(Status::unavailable(why))
                    } else {
                        Ok(LogChunk {
                            replica_id: rep.id.clone(),
                            stream: "error".into(),
                            data: why.into_bytes(),
                        })
                    }
                };
                let Some((_pending, mut answers)) = tunnels.logs(&rep.node_id, down).await else {
                    let _ = tx
                        .send(problem(format!(
                            "replica {}: its node {} has no tunnel to this coordinator (agent down or not connected yet)",
                            rep.id, rep.node_id
                        )))
                        .await;
                    return;
                };
                while let Some(up) = answers.recv().await {
                    if let Some(chunk) = up.chunk {
                        if tx.send(Ok(chunk)).await.is_err() {
                            return;
                        }
                    }
                    if up.end {
                        if !up.error.is_empty() {
                            let _ = tx
                                .send(problem(format!("replica {}: {}", rep.id, up.error)))
                                .await;
                        }
                        return;
                    }
                }
            });
        }
        drop(tx);
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    type ExecStream = Stream<ExecOutput>;
    async fn exec(
        &self,
        _r: Request<Streaming<ExecInput>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        crate::authz::require(&self.handle, &_r, crate::authz::Allow::Admin)?;
        Err(Status::unimplemented(format!("exec {LATER}")))
    }

    async fn list_replicas(
        &self,
        req: Request<ListReplicasRequest>,
    ) -> Result<Response<ListReplicasResponse>, Status> {
        crate::authz::require(&self.handle, &req, crate::authz::Allow::Admin)?;
        let h = self.handle.clone();
        leader_or_forward(
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

    type EventsStream = Stream<Event>;
    async fn events(
        &self,
        req: Request<EventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        // Served from this coordinator's applied state (events are in Raft).
        crate::authz::require(&self.handle, &req, crate::authz::Allow::Admin)?;
        let r = req.into_inner();
        let reader = self.handle.reader().clone();
        let stopping = self.handle.stopping().clone();
        let (ns, name, watch) = (r.namespace, r.name, r.watch);
        let filter = move |e: &cloudless_types::EventRecord| {
            if !name.is_empty() {
                return e.kind == "Workload"
                    && e.object == name
                    && (ns.is_empty() || e.namespace == ns);
            }
            ns.is_empty() || e.namespace == ns
        };
        let to_wire = |e: cloudless_types::EventRecord| Event {
            at_ms: e.at_ms,
            kind: e.kind,
            object: if e.namespace.is_empty() {
                e.object
            } else {
                format!("{}/{}", e.namespace, e.object)
            },
            reason: e.reason,
            message: e.message,
        };
        let mut changes = reader.changes();
        let (first, cursor) = reader
            .events(None, &filter)
            .map_err(CoordinatorError::from)?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Status>>(256);
        tokio::spawn(async move {
            let mut last = cursor;
            for (_, e) in first {
                if tx.send(Ok(to_wire(e))).await.is_err() {
                    return;
                }
            }
            if !watch {
                return;
            }
            loop {
                tokio::select! {
                    r = changes.changed() => if r.is_err() { return },
                    () = tx.closed() => return,
                    () = stopping.cancelled() => return,
                }
                let batch = match reader.events(last, &filter) {
                    Ok((b, cursor)) => {
                        last = cursor;
                        b
                    }
                    Err(e) => {
                        let _ = tx.send(Err(CoordinatorError::from(e).into())).await;
                        return;
                    }
                };
                for (_, e) in batch {
                    if tx.send(Ok(to_wire(e))).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
