//! A node's status report: the replica updates it makes, checked field by
//! field against the replicas assigned to the node.

use cloudless_proto::v1::ReportStatusRequest;
use cloudless_proto::{enums, v1};
use cloudless_state::{ReplicaUpdate, StateReader};
use tonic::Status;

use crate::error::CoordinatorError;

/// Most replicas one status report may list.
pub(crate) const MAX_STATUS_ENTRIES: usize = 512;

/// The updates a node's status report makes: checked field by field, only
/// for replicas assigned to the node (others are dropped: a report can race
/// a removal), each replica at most once.
pub(super) fn status_updates(
    reader: &StateReader,
    id: &str,
    req: ReportStatusRequest,
) -> Result<Vec<ReplicaUpdate>, Status> {
    if req.replicas.len() > MAX_STATUS_ENTRIES {
        return Err(Status::from(CoordinatorError::InvalidArgument(format!(
            "replicas: {} entries; a report lists at most {MAX_STATUS_ENTRIES}",
            req.replicas.len()
        ))));
    }
    let assigned: std::collections::HashSet<String> = reader
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
            return Err(Status::from(CoordinatorError::InvalidArgument(format!(
                "replicas[{i}].replica_id: must be 1 to 256 characters"
            ))));
        }
        if !seen.insert(r.replica_id.clone()) {
            return Err(Status::from(CoordinatorError::InvalidArgument(format!(
                "replicas[{i}].replica_id: {:?} is listed twice",
                r.replica_id
            ))));
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
