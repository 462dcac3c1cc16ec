//! The cluster's services as every agent is told them on its assignment
//! watch and `ListServices` lists them: each workload with a virtual IP,
//! its ports and settings, and its endpoints; which nodes run which
//! workloads; which nodes carry ingress. A pure function of the applied
//! workloads, replicas and nodes, computed once per state revision for all
//! watches (see [`crate::revision_cache`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use cloudless_proto::v1;
use cloudless_proto::WireEnum as _;
use cloudless_state::StateReader;
use cloudless_types::{NodePhase, NodeRecord, ReplicaRecord, ReplicaState, Workload};

use crate::error::CoordinatorError;
use crate::scheduler_input::{node_region, node_zone};

/// The node label that marks a node for ingress, and its value.
pub(crate) const INGRESS_LABEL: (&str, &str) = ("ingress", "true");

/// What every node is told about services, at one state revision.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct ClusterServices {
    /// Every workload with a VIP, by namespace and name, with its
    /// endpoints.
    pub(crate) services: Vec<v1::Service>,
    /// For every workload with a replica that has not ended: the nodes
    /// running one, by namespace and name.
    pub(crate) runs: Vec<v1::WorkloadNodes>,
    /// Nodes labelled for ingress and in phase Ready, by id.
    pub(crate) ingress_node_ids: Vec<String>,
    /// Nodes labelled for ingress, whatever their phase.
    pub(crate) ingress_labelled: BTreeSet<String>,
}

impl ClusterServices {
    /// Reads the applied state and computes them.
    pub(crate) fn read(reader: &StateReader) -> Result<Self, CoordinatorError> {
        Ok(cluster_services(
            &reader.workloads(None)?,
            &reader.replicas()?,
            &reader.nodes()?,
        ))
    }
}

/// Whether `n` carries the ingress label.
fn labelled_for_ingress(n: &NodeRecord) -> bool {
    n.labels.get(INGRESS_LABEL.0).map(String::as_str) == Some(INGRESS_LABEL.1)
}

/// Whether the replicas on `n` may serve: the node is Ready (not Pending,
/// Suspect or Down) and not draining. A removed node has no record (and
/// no replicas).
fn serves(n: &NodeRecord) -> bool {
    n.phase == NodePhase::Ready && !n.draining
}

/// Whether `r` is an endpoint on a node that serves: Ready, with an
/// address, and not kept as Unknown.
fn is_endpoint(r: &ReplicaRecord) -> bool {
    r.state == ReplicaState::Ready && !r.address.is_empty() && r.disconnected_at_ms == 0
}

/// The services, runs and ingress nodes of this state.
pub(crate) fn cluster_services(
    workloads: &[Workload],
    replicas: &[ReplicaRecord],
    nodes: &[NodeRecord],
) -> ClusterServices {
    let nodes: HashMap<&str, &NodeRecord> = nodes.iter().map(|n| (n.id.as_str(), n)).collect();
    let mut endpoints: HashMap<(&str, &str), Vec<v1::ServiceEndpoint>> = HashMap::new();
    let mut runs: BTreeMap<(&str, &str), BTreeSet<&str>> = BTreeMap::new();
    for r in replicas {
        if !matches!(r.state, ReplicaState::Failed | ReplicaState::Succeeded) {
            runs.entry((&r.namespace, &r.workload))
                .or_default()
                .insert(&r.node_id);
        }
        let Some(node) = nodes.get(r.node_id.as_str()) else {
            continue;
        };
        if !is_endpoint(r) || !serves(node) {
            continue;
        }
        endpoints
            .entry((&r.namespace, &r.workload))
            .or_default()
            .push(v1::ServiceEndpoint {
                replica_id: r.id.clone(),
                node_id: r.node_id.clone(),
                address: r.address.clone(),
                zone: node_zone(node),
                region: node_region(node),
                overlay_addresses: node.status.overlay_addresses.clone(),
            });
    }
    let mut services: Vec<v1::Service> = workloads
        .iter()
        .filter_map(|w| {
            let vip = w.vip.clone()?;
            let mut endpoints = endpoints
                .remove(&(w.namespace.as_str(), w.name.as_str()))
                .unwrap_or_default();
            endpoints.sort_by(|a, b| a.replica_id.cmp(&b.replica_id));
            let s = &w.spec.service;
            Some(v1::Service {
                namespace: w.namespace.clone(),
                workload: w.name.clone(),
                vip,
                ports: w
                    .spec
                    .ports
                    .iter()
                    .map(|p| v1::ServicePort {
                        name: p.name.clone(),
                        port: u32::from(p.container_port),
                        protocol: v1::Protocol::wire(p.protocol),
                        ingress_port: u32::from(p.ingress_port),
                    })
                    .collect(),
                load_balancing: v1::LoadBalancing::wire(s.load_balancing),
                allow_from: s.allow_from.clone(),
                zone_weights: s
                    .zone_weights
                    .iter()
                    .map(|(k, v)| (k.clone(), *v))
                    .collect(),
                endpoints,
            })
        })
        .collect();
    services.sort_by(|a, b| (&a.namespace, &a.workload).cmp(&(&b.namespace, &b.workload)));
    let mut ingress_node_ids: Vec<String> = nodes
        .values()
        .filter(|n| labelled_for_ingress(n) && n.phase == NodePhase::Ready)
        .map(|n| n.id.clone())
        .collect();
    ingress_node_ids.sort();
    ClusterServices {
        services,
        runs: runs
            .into_iter()
            .map(|((namespace, workload), node_ids)| v1::WorkloadNodes {
                namespace: namespace.to_owned(),
                workload: workload.to_owned(),
                node_ids: node_ids.into_iter().map(str::to_owned).collect(),
            })
            .collect(),
        ingress_node_ids,
        ingress_labelled: nodes
            .values()
            .filter(|n| labelled_for_ingress(n))
            .map(|n| n.id.clone())
            .collect(),
    }
}

#[cfg(test)]
#[path = "services_test.rs"]
mod tests;
