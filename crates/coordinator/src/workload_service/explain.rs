//! `ExplainPlacement`: the scheduler's verdict on every node for one more
//! replica of a workload, from the same input the reconcile loop gives it.

use cloudless_proto::v1::{ExplainPlacementRequest, ExplainPlacementResponse, NodeScore};
use cloudless_proto::{v1, WireEnum as _};
use cloudless_types::ClosedSet as _;
use tonic::{Request, Response, Status};

use super::{find_workload, namespace_or_default};
use crate::error::CoordinatorError;
use crate::handle::CoordinatorHandle;

/// `ExplainPlacement`: every node's verdict and score for one more replica
/// of the workload, as the scheduler would place it now.
pub(super) async fn explain_placement(
    handle: &CoordinatorHandle,
    req: Request<ExplainPlacementRequest>,
) -> Result<Response<ExplainPlacementResponse>, Status> {
    crate::authz::require(handle, &req, crate::authz::Allow::Admin)?;
    let r = req.into_inner();
    let reader = handle.reader();
    let ns = namespace_or_default(r.namespace);
    let w = find_workload(reader, &ns, &r.name)?;
    let nodes = reader.nodes().map_err(CoordinatorError::from)?;
    let replicas = reader.replicas().map_err(CoordinatorError::from)?;
    let cluster = handle.cluster()?;
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
        // The zone placement reads (any of the zone labels).
        let zone = crate::scheduler_input::node_zone(n);
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
