//! `WorkloadService`: desired state for workloads, replicated through Raft.

use cloudless_proto::v1::workload_service_client::WorkloadServiceClient;
use cloudless_proto::v1::workload_service_server::WorkloadService;
use cloudless_proto::v1::{
    ApplyWorkloadRequest, ApplyWorkloadResponse, DeleteWorkloadRequest, DeleteWorkloadResponse,
    Event, EventsRequest, ExecOutput, ExecRequest, ExplainPlacementRequest,
    ExplainPlacementResponse, GetWorkloadRequest, GetWorkloadResponse, ListReplicasRequest,
    ListReplicasResponse, ListWorkloadsRequest, ListWorkloadsResponse, LogChunk, LogsRequest,
    NodeScore, Revision, RolloutHistoryRequest, RolloutHistoryResponse, RolloutStatusRequest,
    RolloutStatusResponse, RolloutUndoRequest, RolloutUndoResponse, ScaleWorkloadRequest,
    ScaleWorkloadResponse,
};
use cloudless_proto::{v1, WireEnum as _};
use cloudless_state::{Command, Rejection, Response as SmResponse};
use cloudless_types::{ClosedSet as _, DEFAULT_NAMESPACE};
use tonic::{Request, Response, Status};

use crate::error::CoordinatorError;
use crate::forward::{admin_call, idempotency_key};
use crate::handle::CoordinatorHandle;

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

/// Longest an exec may run.
const MAX_EXEC_SECONDS: u32 = 3600;

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
        crate::authz::require(&self.handle, &req, crate::authz::Allow::Admin)?;
        let r = req.into_inner();
        let reader = self.handle.reader();
        let ns = namespace_or_default(r.namespace);
        let w = find_workload(reader, &ns, &r.name)?;
        let replicas = reader
            .workload_replicas(&ns, &r.name)
            .map_err(CoordinatorError::from)?;
        let count = |f: &dyn Fn(&cloudless_types::ReplicaRecord) -> bool| {
            u32::try_from(replicas.iter().filter(|x| f(x)).count()).unwrap_or(u32::MAX)
        };
        let updated = count(&|x| x.template == w.template);
        let ready =
            count(&|x| x.template == w.template && x.state == cloudless_types::ReplicaState::Ready);
        let total = u32::try_from(replicas.len()).unwrap_or(u32::MAX);
        Ok(Response::new(RolloutStatusResponse {
            generation: w.generation,
            updated_replicas: updated,
            ready_replicas: ready,
            complete: updated == w.spec.replicas
                && ready == w.spec.replicas
                && total == w.spec.replicas,
        }))
    }

    async fn rollout_history(
        &self,
        req: Request<RolloutHistoryRequest>,
    ) -> Result<Response<RolloutHistoryResponse>, Status> {
        let h = self.handle.clone();
        admin_call(
            &self.handle,
            req,
            |r: RolloutHistoryRequest| async move {
                h.read_barrier(r.read.as_ref()).await?;
                let ns = namespace_or_default(r.namespace);
                let w = find_workload(h.reader(), &ns, &r.name)?;
                Ok(RolloutHistoryResponse {
                    current: w.template,
                    revisions: w
                        .revisions
                        .into_iter()
                        .map(|v| Revision {
                            revision: v.template,
                            applied_at_ms: v.at_ms,
                            spec: Some(v.spec.into()),
                            cause: v.cause,
                        })
                        .collect(),
                })
            },
            |ch, r| async move { WorkloadServiceClient::new(ch).rollout_history(r).await },
        )
        .await
    }

    async fn rollout_undo(
        &self,
        req: Request<RolloutUndoRequest>,
    ) -> Result<Response<RolloutUndoResponse>, Status> {
        let h = self.handle.clone();
        admin_call(
            &self.handle,
            req,
            |r: RolloutUndoRequest| async move {
                let key = idempotency_key(r.write.as_ref())?;
                let ns = namespace_or_default(r.namespace);
                let w = find_workload(h.reader(), &ns, &r.name)?;
                let target = if r.to_revision == 0 {
                    w.revisions
                        .iter()
                        .rev()
                        .find(|v| v.template != w.template)
                        .ok_or_else(|| {
                            CoordinatorError::FailedPrecondition(format!(
                                "{ns}/{}: no earlier revision to go back to",
                                r.name
                            ))
                        })?
                } else {
                    w.revisions
                        .iter()
                        .find(|v| v.template == r.to_revision)
                        .ok_or_else(|| {
                            let known: Vec<String> =
                                w.revisions.iter().map(|v| v.template.to_string()).collect();
                            CoordinatorError::InvalidArgument(format!(
                                "toRevision: {} is not in the history of {ns}/{} (it holds {})",
                                r.to_revision,
                                r.name,
                                known.join(", ")
                            ))
                        })?
                };
                if target.spec.same_template(&w.spec) {
                    return Err(CoordinatorError::FailedPrecondition(format!(
                        "{ns}/{} already runs the template of revision {}",
                        r.name, target.template
                    )));
                }
                let restored = target.template;
                let mut back = w.clone();
                back.spec = target.spec.clone();
                back.spec.replicas = w.spec.replicas;
                let cmd = Command::PutWorkload {
                    workload: back,
                    cause: format!("undo to {restored}"),
                };
                let (resp, commit) = h.write(key, cmd).await?;
                let (stored_w, _) = stored(resp)?;
                let events = vec![cloudless_types::EventRecord {
                    at_ms: 0,
                    kind: "Workload".into(),
                    namespace: ns.clone(),
                    object: r.name.clone(),
                    reason: "RolloutUndo".into(),
                    message: format!(
                        "back to the template of revision {restored} (image {}) as revision {}",
                        stored_w.spec.image, stored_w.template
                    ),
                }];
                h.write(None, Command::RecordEvents { events }).await?;
                Ok(RolloutUndoResponse {
                    workload: Some(stored_w.into()),
                    commit: Some(commit),
                    restored,
                })
            },
            |ch, r| async move { WorkloadServiceClient::new(ch).rollout_undo(r).await },
        )
        .await
    }

    async fn explain_placement(
        &self,
        req: Request<ExplainPlacementRequest>,
    ) -> Result<Response<ExplainPlacementResponse>, Status> {
        crate::authz::require(&self.handle, &req, crate::authz::Allow::Admin)?;
        let r = req.into_inner();
        let reader = self.handle.reader();
        let ns = namespace_or_default(r.namespace);
        let w = find_workload(reader, &ns, &r.name)?;
        let nodes = reader.nodes().map_err(CoordinatorError::from)?;
        let replicas = reader.replicas().map_err(CoordinatorError::from)?;
        let cluster = self.handle.cluster()?;
        let infos = crate::scheduler_input::node_infos(&nodes, &replicas);
        let mut snapshot =
            cloudless_scheduler::ClusterSnapshot::new(&infos, cluster.config.scheduler_weights)
                .map_err(|e| CoordinatorError::Fatal(format!("scheduler input: {e}")))?;
        let verdicts = snapshot
            .evaluate(
                &crate::scheduler_input::workload_request(&w, 1),
                crate::clock::now_ms(),
            )
            .map_err(|e| CoordinatorError::InvalidArgument(e.to_string()))?;
        let mut out: Vec<NodeScore> = Vec::new();
        for n in &nodes {
            let here = u32::try_from(
                replicas
                    .iter()
                    .filter(|x| x.node_id == n.id && x.namespace == ns && x.workload == w.name)
                    .count(),
            )
            .unwrap_or(u32::MAX);
            let labels = crate::scheduler_input::node_labels(n);
            let zone = labels.get("zone").cloned().unwrap_or_default();
            let verdict = verdicts.iter().find(|(id, _)| *id == n.id).map(|(_, v)| v);
            let (eligible, score, reasons) = match verdict {
                Some(Ok(c)) => (
                    true,
                    c.total,
                    vec![format!(
                        "locality {:.2}, reliability {:.2}, cost {:.2}, utilization {:.2}, network penalty {:.2}, adjustment {:+.1}",
                        c.locality, c.reliability, c.cost, c.utilization, c.network_penalty, c.adjustment
                    )],
                ),
                Some(Err(reason)) => (false, 0.0, vec![reason.to_string()]),
                None => (false, 0.0, vec![format!("node is {:?}", n.phase)]),
            };
            out.push(NodeScore {
                node_id: n.id.clone(),
                node_name: n.name.clone(),
                zone,
                score,
                eligible,
                reasons,
                replicas_here: here,
            });
        }
        out.sort_by(|a, b| {
            b.eligible
                .cmp(&a.eligible)
                .then(b.score.total_cmp(&a.score))
                .then(a.node_name.cmp(&b.node_name))
        });
        Ok(Response::new(ExplainPlacementResponse {
            nodes: out,
            legacy_strategy: w.spec.placement.strategy.name().to_owned(),
            strategy: v1::PlacementStrategy::wire(w.spec.placement.strategy),
        }))
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
                            legacy_stream: "error".into(),
                            stream: v1::LogStream::Error.into(),
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
    async fn exec(&self, req: Request<ExecRequest>) -> Result<Response<Self::ExecStream>, Status> {
        // Served by any coordinator, through the replica's node's tunnel.
        crate::authz::require(&self.handle, &req, crate::authz::Allow::Admin)?;
        let mut r = req.into_inner();
        if r.command.is_empty() {
            return Err(Status::invalid_argument("command: must not be empty"));
        }
        if r.timeout_seconds > MAX_EXEC_SECONDS {
            return Err(Status::invalid_argument(format!(
                "timeoutSeconds: {} is above the maximum of {MAX_EXEC_SECONDS}",
                r.timeout_seconds
            )));
        }
        let ns = namespace_or_default(std::mem::take(&mut r.namespace));
        let reader = self.handle.reader();
        let replica = if r.replica_id.is_empty() {
            find_workload(reader, &ns, &r.name)?;
            let mut all = reader
                .workload_replicas(&ns, &r.name)
                .map_err(CoordinatorError::from)?;
            // Ready first, then Running; oldest first.
            all.retain(|x| {
                x.disconnected_at_ms == 0
                    && matches!(
                        x.state,
                        cloudless_types::ReplicaState::Ready
                            | cloudless_types::ReplicaState::Running
                    )
            });
            all.sort_by_key(|x| {
                (
                    x.state != cloudless_types::ReplicaState::Ready,
                    x.created_at_ms,
                )
            });
            all.into_iter().next().ok_or_else(|| {
                Status::failed_precondition(format!(
                    "{ns}/{} has no Running replica to exec in",
                    r.name
                ))
            })?
        } else {
            reader
                .replica(&r.replica_id)
                .map_err(CoordinatorError::from)?
                .filter(|x| r.name.is_empty() || (x.namespace == ns && x.workload == r.name))
                .ok_or_else(|| {
                    Status::not_found(format!("no replica {} of {ns}/{}", r.replica_id, r.name))
                })?
        };
        let down = ExecRequest {
            namespace: replica.namespace.clone(),
            name: replica.workload.clone(),
            replica_id: replica.id.clone(),
            ..r
        };
        let Some((pending, mut answers)) = self.handle.tunnels().exec(&replica.node_id, down).await
        else {
            return Err(Status::unavailable(format!(
                "replica {}: its node {} has no tunnel to this coordinator (agent down or not connected yet)",
                replica.id, replica.node_id
            )));
        };
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<ExecOutput, Status>>(64);
        tokio::spawn(async move {
            let _pending = pending;
            while let Some(up) = answers.recv().await {
                if let Some(out) = up.exec_output {
                    if tx.send(Ok(out)).await.is_err() {
                        return;
                    }
                }
                if up.end {
                    if !up.error.is_empty() {
                        let _ = tx
                            .send(Err(Status::failed_precondition(format!(
                                "replica {}: {}",
                                replica.id, up.error
                            ))))
                            .await;
                    }
                    return;
                }
            }
            let _ = tx
                .send(Err(Status::unavailable(format!(
                    "replica {}: the agent's tunnel closed before the command finished",
                    replica.id
                ))))
                .await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
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
            kind: cloudless_types::ObjectKind::from_name(&e.kind).map_or(0, v1::ObjectKind::wire),
            legacy_kind: e.kind,
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
