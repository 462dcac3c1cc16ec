//! Rollouts: status, history and undo of a workload's templates.

use cloudless_proto::v1::workload_service_client::WorkloadServiceClient;
use cloudless_proto::v1::{
    Revision, RolloutHistoryRequest, RolloutHistoryResponse, RolloutStatusRequest,
    RolloutStatusResponse, RolloutUndoRequest, RolloutUndoResponse,
};
use cloudless_state::Command;
use tonic::{Request, Response, Status};

use super::{find_workload, namespace_or_default, stored};
use crate::error::CoordinatorError;
use crate::forward::{admin_call, idempotency_key};
use crate::handle::CoordinatorHandle;

/// `RolloutStatus`: how far the workload's current template has rolled out.
pub(super) async fn status(
    handle: &CoordinatorHandle,
    req: Request<RolloutStatusRequest>,
) -> Result<Response<RolloutStatusResponse>, Status> {
    crate::authz::require(handle, &req, crate::authz::Allow::Admin)?;
    let r = req.into_inner();
    let reader = handle.reader();
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

/// `RolloutHistory`: the workload's revisions.
pub(super) async fn history(
    handle: &CoordinatorHandle,
    req: Request<RolloutHistoryRequest>,
) -> Result<Response<RolloutHistoryResponse>, Status> {
    let h = handle.clone();
    admin_call(
        handle,
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

/// `RolloutUndo`: back to an earlier revision's template, recorded as a
/// new revision with a `RolloutUndo` event.
pub(super) async fn undo(
    handle: &CoordinatorHandle,
    req: Request<RolloutUndoRequest>,
) -> Result<Response<RolloutUndoResponse>, Status> {
    let h = handle.clone();
    admin_call(
        handle,
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
                assign_vip: true,
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
