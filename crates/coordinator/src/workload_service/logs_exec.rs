//! Logs and exec, served by any coordinator through the tunnel each agent
//! keeps to it.

use cloudless_proto::v1;
use cloudless_proto::v1::{ExecOutput, ExecRequest, LogChunk, LogsRequest};
use tonic::{Request, Response, Status};

use super::{find_workload, namespace_or_default, require_name, Stream};
use crate::error::CoordinatorError;
use crate::handle::CoordinatorHandle;

/// Longest an exec may run.
const MAX_EXEC_SECONDS: u32 = 3600;

/// `Logs`: each replica's log, through its node's tunnel to this
/// coordinator.
pub(super) async fn logs(
    handle: &CoordinatorHandle,
    req: Request<LogsRequest>,
) -> Result<Response<Stream<LogChunk>>, Status> {
    // Served by any coordinator: every agent keeps a tunnel to each.
    crate::authz::require(handle, &req, crate::authz::Allow::Admin)?;
    let r = req.into_inner();
    let ns = namespace_or_default(r.namespace);
    let reader = handle.reader();
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
        return Err(Status::from(CoordinatorError::NotFound(format!(
            "no replicas of {ns}/{}{}",
            r.name,
            if r.replica_id.is_empty() {
                String::new()
            } else {
                format!(" with id {}", r.replica_id)
            }
        ))));
    }
    let single = replicas.len() == 1;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<LogChunk, Status>>(64);
    for rep in replicas {
        let tunnels = handle.tunnels().clone();
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
                    Err(Status::from(CoordinatorError::Unavailable(why)))
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

/// `Exec`: a command in one replica, through its node's tunnel to this
/// coordinator.
pub(super) async fn exec(
    handle: &CoordinatorHandle,
    req: Request<ExecRequest>,
) -> Result<Response<Stream<ExecOutput>>, Status> {
    // Served by any coordinator, through the replica's node's tunnel.
    crate::authz::require(handle, &req, crate::authz::Allow::Admin)?;
    let mut r = req.into_inner();
    if r.command.is_empty() {
        return Err(Status::from(CoordinatorError::InvalidArgument(
            String::from("command: must not be empty"),
        )));
    }
    if r.timeout_seconds > MAX_EXEC_SECONDS {
        return Err(Status::from(CoordinatorError::InvalidArgument(format!(
            "timeoutSeconds: {} is above the maximum of {MAX_EXEC_SECONDS}",
            r.timeout_seconds
        ))));
    }
    let ns = namespace_or_default(std::mem::take(&mut r.namespace));
    let reader = handle.reader();
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
                    cloudless_types::ReplicaState::Ready | cloudless_types::ReplicaState::Running
                )
        });
        all.sort_by_key(|x| {
            (
                x.state != cloudless_types::ReplicaState::Ready,
                x.created_at_ms,
            )
        });
        all.into_iter().next().ok_or_else(|| {
            Status::from(CoordinatorError::FailedPrecondition(format!(
                "{ns}/{} has no Running replica to exec in",
                r.name
            )))
        })?
    } else {
        reader
            .replica(&r.replica_id)
            .map_err(CoordinatorError::from)?
            .filter(|x| r.name.is_empty() || (x.namespace == ns && x.workload == r.name))
            .ok_or_else(|| {
                Status::from(CoordinatorError::NotFound(format!(
                    "no replica {} of {ns}/{}",
                    r.replica_id, r.name
                )))
            })?
    };
    let down = ExecRequest {
        namespace: replica.namespace.clone(),
        name: replica.workload.clone(),
        replica_id: replica.id.clone(),
        ..r
    };
    let Some((pending, mut answers)) = handle.tunnels().exec(&replica.node_id, down).await else {
        return Err(Status::from(CoordinatorError::Unavailable(format!(
            "replica {}: its node {} has no tunnel to this coordinator (agent down or not connected yet)",
            replica.id, replica.node_id
        ))));
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
                        .send(Err(Status::from(CoordinatorError::FailedPrecondition(
                            format!("replica {}: {}", replica.id, up.error),
                        ))))
                        .await;
                }
                return;
            }
        }
        let _ = tx
            .send(Err(Status::from(CoordinatorError::Unavailable(format!(
                "replica {}: the agent's tunnel closed before the command finished",
                replica.id
            )))))
            .await;
    });
    Ok(Response::new(Box::pin(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    )))
}
