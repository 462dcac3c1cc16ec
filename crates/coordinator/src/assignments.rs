//! What a node is told on its assignment watch: its replicas, the Ready
//! endpoints of the workloads they name as upstreams, which nodes may call
//! its workloads, its replica network, and the cluster's services. Read
//! from the applied state alone.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use cloudless_proto::v1::{
    Assignment, AssignmentSet, InboundSet, NodeNetwork, UpstreamEndpoint, UpstreamSet,
};
use cloudless_state::StateReader;
use cloudless_types::{NetworkConfig, ReplicaState};

use crate::error::CoordinatorError;
use crate::revision_cache::RevisionCache;
use crate::services::ClusterServices;

/// What a node is told: its assignments (by replica id), the endpoints of
/// the workloads they name as upstreams, who may call its workloads, its
/// replica network and the cluster's services.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct NodeView {
    /// Its replicas, by replica id.
    pub(crate) assignments: Vec<Assignment>,
    /// Ready endpoints of the workloads they name as upstreams.
    pub(crate) upstreams: Vec<UpstreamSet>,
    /// Who may open overlay streams to its workloads.
    pub(crate) inbound: Vec<InboundSet>,
    /// Its subnet and the cluster's network settings; `None` while it has
    /// no subnet.
    pub(crate) network: Option<NodeNetwork>,
    /// Every service with its endpoints, who runs what, the ingress nodes
    /// (the same for every node at one revision).
    pub(crate) services: Arc<ClusterServices>,
    /// Whether this node is labelled for ingress.
    pub(crate) ingress: bool,
}

impl NodeView {
    /// The message the watch sends at state `revision`.
    pub(crate) fn to_set(&self, revision: u64) -> AssignmentSet {
        AssignmentSet {
            revision,
            assignments: self.assignments.clone(),
            upstreams: self.upstreams.clone(),
            inbound: self.inbound.clone(),
            network: self.network.clone(),
            services: self.services.services.clone(),
            runs: self.services.runs.clone(),
            ingress_node_ids: self.services.ingress_node_ids.clone(),
            ingress: self.ingress,
        }
    }
}

/// What a node with `subnet` needs of the cluster's network settings.
pub(crate) fn node_network(subnet: &str, network: &NetworkConfig) -> NodeNetwork {
    NodeNetwork {
        subnet: subnet.to_owned(),
        cluster_cidr: network.cluster_cidr.clone(),
        cluster_domain: network.cluster_domain.clone(),
        default_egress: Some(network.default_egress.clone().into()),
        service_cidr: network.service_cidr.clone(),
        zone: String::new(),
        region: String::new(),
    }
}

/// (namespace, workload) -> the nodes running a replica of a workload (same
/// namespace) that lists it as an upstream.
pub(crate) type Callers = BTreeMap<(String, String), BTreeSet<String>>;

/// What every assignment watch on a coordinator shares: the parts of the
/// views that are the same for every node, each computed once per state
/// revision.
#[derive(Debug, Default)]
pub(crate) struct WatchCaches {
    /// Who calls each workload through upstreams.
    callers: RevisionCache<Callers>,
    /// The cluster's services.
    services: RevisionCache<ClusterServices>,
}

fn callers(reader: &StateReader) -> Result<Callers, CoordinatorError> {
    let mut callers = Callers::new();
    for w in reader.workloads(None)? {
        let targets: Vec<(String, String)> = w
            .spec
            .upstreams
            .iter()
            .map(|u| (w.namespace.clone(), u.workload.clone()))
            .collect();
        if targets.is_empty() {
            continue;
        }
        let nodes: BTreeSet<String> = reader
            .workload_replicas(&w.namespace, &w.name)?
            .into_iter()
            .map(|r| r.node_id)
            .collect();
        for t in targets {
            callers.entry(t).or_default().extend(nodes.iter().cloned());
        }
    }
    Ok(callers)
}

/// Who may open overlay streams to each workload in `local`.
fn inbound(callers: &Callers, local: &BTreeSet<(String, String)>) -> Vec<InboundSet> {
    local
        .iter()
        .map(|(namespace, workload)| InboundSet {
            namespace: namespace.clone(),
            workload: workload.clone(),
            node_ids: callers
                .get(&(namespace.clone(), workload.clone()))
                .map(|s| s.iter().cloned().collect())
                .unwrap_or_default(),
        })
        .collect()
}

/// The node's assignments, ordered by replica id, the endpoints of the
/// workloads they name as upstreams, who may call them, its network and
/// the cluster's services. At state `revision` (the callers map and the
/// services are shared by every watch at it).
pub(crate) fn assignments(
    reader: &StateReader,
    caches: &WatchCaches,
    node_id: &str,
    revision: u64,
) -> Result<NodeView, CoordinatorError> {
    let replicas = reader.node_replicas(node_id)?;
    let local: BTreeSet<(String, String)> = replicas
        .iter()
        .map(|r| (r.namespace.clone(), r.workload.clone()))
        .collect();
    let inbound = if local.is_empty() {
        Vec::new()
    } else {
        let map: Arc<Callers> = caches.callers.at(revision, || callers(reader))?;
        inbound(&map, &local)
    };
    let upstreams = upstream_sets(reader, &replicas)?;
    let assignments = replicas
        .into_iter()
        .map(|r| Assignment {
            replica_id: r.id,
            workload: r.workload,
            namespace: r.namespace,
            generation: r.template,
            spec: Some(r.spec.into()),
            trace_parent: r.trace,
        })
        .collect();
    let services = caches
        .services
        .at(revision, || ClusterServices::read(reader))?;
    let ingress = services.ingress_labelled.contains(node_id);
    let network = match reader.node(node_id)? {
        Some(n) => match &n.subnet {
            Some(subnet) => {
                let config = reader
                    .cluster()?
                    .map(|c| c.config.network)
                    .unwrap_or_default();
                let mut net = node_network(subnet, &config);
                // Where the node is, as placement sees it (its service
                // proxy's locality).
                net.zone = crate::scheduler_input::node_zone(&n);
                net.region = crate::scheduler_input::node_region(&n);
                Some(net)
            }
            None => None,
        },
        None => None,
    };
    Ok(NodeView {
        assignments,
        upstreams,
        inbound,
        network,
        services,
        ingress,
    })
}

/// The Ready endpoints of every workload `replicas` name as upstreams.
/// Replicas leave with their node (`RemoveNode`), so a removed node is
/// never an endpoint.
fn upstream_sets(
    reader: &StateReader,
    replicas: &[cloudless_types::ReplicaRecord],
) -> Result<Vec<UpstreamSet>, CoordinatorError> {
    let wanted: BTreeSet<(String, String)> = replicas
        .iter()
        .flat_map(|r| {
            r.spec
                .upstreams
                .iter()
                .map(|u| (r.namespace.clone(), u.workload.clone()))
        })
        .collect();
    let mut nodes: HashMap<String, Vec<String>> = HashMap::new();
    let mut upstreams = Vec::with_capacity(wanted.len());
    for (namespace, workload) in wanted {
        let mut endpoints = Vec::new();
        for r in reader.workload_replicas(&namespace, &workload)? {
            if r.state != ReplicaState::Ready {
                continue;
            }
            let overlay_addresses = match nodes.get(&r.node_id) {
                Some(a) => a.clone(),
                None => {
                    let a = reader
                        .node(&r.node_id)?
                        .map(|n| n.status.overlay_addresses)
                        .unwrap_or_default();
                    nodes.insert(r.node_id.clone(), a.clone());
                    a
                }
            };
            endpoints.push(UpstreamEndpoint {
                replica_id: r.id,
                node_id: r.node_id,
                overlay_addresses,
            });
        }
        upstreams.push(UpstreamSet {
            namespace,
            workload,
            endpoints,
        });
    }
    Ok(upstreams)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudless_state::{Command, Proposal, Request as SmRequest, StateMachine};
    use cloudless_types::{
        JoinTokenRecord, NodeRecord, ReplicaRecord, Upstream, Workload, WorkloadSpec,
    };
    use openraft::storage::RaftStateMachine;

    /// Applies `commands` to `sm`, one log entry each from index `first`.
    async fn apply(sm: &mut StateMachine, first: u64, commands: Vec<Command>) {
        let entries = commands
            .into_iter()
            .zip(first..)
            .map(
                |(command, index)| openraft::Entry::<cloudless_state::TypeConfig> {
                    log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
                    payload: openraft::EntryPayload::Normal(Proposal {
                        requests: vec![SmRequest {
                            idempotency_key: None,
                            proposed_at_ms: 1,
                            command,
                        }],
                    }),
                },
            );
        sm.apply(entries.collect::<Vec<_>>()).await.expect("apply");
    }

    fn replica(id: &str, workload: &Workload, node: &str) -> ReplicaRecord {
        ReplicaRecord {
            id: id.into(),
            namespace: workload.namespace.clone(),
            workload: workload.name.clone(),
            template: 1,
            spec: workload.spec.clone(),
            node_id: node.into(),
            state: ReplicaState::Ready,
            exit_code: None,
            restarts: 0,
            message: String::new(),
            created_at_ms: 0,
            updated_at_ms: 0,
            ready_at_ms: 0,
            disconnected_at_ms: 0,
            score: 0.0,
            address: String::new(),
            trace: String::new(),
        }
    }

    #[tokio::test]
    async fn a_node_is_told_its_subnet_and_the_cluster_network() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut sm = StateMachine::open(
            &dir.path().join("state.redb"),
            prometheus_client::metrics::histogram::Histogram::new([1.0]),
        )
        .expect("state");
        let mut config = cloudless_types::ClusterConfig::default();
        config.network.cluster_domain = "home.arpa".into();
        config.network.default_egress = cloudless_types::EgressPolicy::default();
        let token = JoinTokenRecord {
            id: "t".into(),
            created_at_ms: 0,
            expires_at_ms: i64::MAX,
            max_uses: 9,
            uses: 0,
            revoked: false,
            labels: Default::default(),
        };
        let enroll = |id: &str, assign_subnet: bool| Command::EnrollNode {
            token_id: "t".into(),
            node: NodeRecord::new(id.into(), id.into(), "t".into(), 0),
            assign_subnet,
        };
        apply(
            &mut sm,
            1,
            vec![
                Command::InitCluster {
                    cluster_id: "c".into(),
                    config,
                },
                Command::CreateJoinToken { token },
                enroll("n1", true),
                enroll("n2", true),
                enroll("old", false),
            ],
        )
        .await;
        let reader = sm.reader();
        let cache = WatchCaches::default();
        let view = assignments(&reader, &cache, "n2", 1).expect("view");
        let network = view.network.clone().expect("n2 has a subnet");
        assert_eq!(network.subnet, "10.244.1.0/24");
        assert_eq!(network.cluster_cidr, "10.244.0.0/16");
        assert_eq!(network.service_cidr, "10.96.0.0/16");
        assert_eq!(network.cluster_domain, "home.arpa");
        assert_eq!(
            network.default_egress.map(|e| e.allow.len()),
            Some(0),
            "the configured default: no egress"
        );
        assert_eq!(view.to_set(7).network, view.network);
        assert_eq!(
            assignments(&reader, &cache, "old", 1)
                .expect("view")
                .network,
            None,
            "no subnet, no network yet"
        );
    }

    #[tokio::test]
    async fn a_removed_node_is_neither_a_caller_nor_an_endpoint() {
        let dir = tempfile::tempdir().expect("tempdir");
        let workload = |name: &str, upstream: Option<&str>| Workload {
            namespace: "default".into(),
            name: name.into(),
            spec: WorkloadSpec {
                image: "busybox".into(),
                replicas: 2,
                upstreams: upstream
                    .map(|u| Upstream {
                        workload: u.into(),
                        port: 80,
                        local_port: 8080,
                    })
                    .into_iter()
                    .collect(),
                ..WorkloadSpec::default()
            },
            generation: 0,
            created_at_ms: 0,
            updated_at_ms: 0,
            template: 0,
            revisions: Vec::new(),
            vip: None,
        };
        let (db, web) = (workload("db", None), workload("web", Some("db")));
        let token = JoinTokenRecord {
            id: "t".into(),
            created_at_ms: 0,
            expires_at_ms: i64::MAX,
            max_uses: 9,
            uses: 0,
            revoked: false,
            labels: Default::default(),
        };
        let mut commands = vec![Command::CreateJoinToken { token }];
        for n in ["n1", "n2", "stolen"] {
            commands.push(Command::EnrollNode {
                token_id: "t".into(),
                node: NodeRecord::new(n.into(), n.into(), "t".into(), 0),
                assign_subnet: true,
            });
        }
        for w in [&db, &web] {
            commands.push(Command::PutWorkload {
                workload: w.clone(),
                cause: "apply".into(),
                assign_vip: true,
            });
        }
        commands.push(Command::PlaceReplicas {
            replicas: vec![
                replica("db-1", &db, "n1"),
                replica("db-2", &db, "stolen"),
                replica("web-1", &web, "n2"),
                replica("web-2", &web, "stolen"),
            ],
        });
        let mut sm = StateMachine::open(
            &dir.path().join("state.redb"),
            prometheus_client::metrics::histogram::Histogram::new([1.0]),
        )
        .expect("state");
        apply(&mut sm, 1, commands).await;
        let reader = sm.reader();
        let key = ("default".to_owned(), "db".to_owned());
        let web_on_n2 = reader.node_replicas("n2").expect("read");
        let endpoints = |reader: &cloudless_state::StateReader| -> Vec<String> {
            upstream_sets(reader, &web_on_n2).expect("upstreams")[0]
                .endpoints
                .iter()
                .map(|e| e.node_id.clone())
                .collect()
        };
        assert_eq!(
            callers(&reader).expect("callers")[&key],
            BTreeSet::from(["n2".to_owned(), "stolen".to_owned()])
        );
        assert_eq!(endpoints(&reader), ["n1", "stolen"]);

        apply(
            &mut sm,
            100,
            vec![Command::RemoveNode {
                node_id: "stolen".into(),
            }],
        )
        .await;
        assert_eq!(
            callers(&reader).expect("callers")[&key],
            BTreeSet::from(["n2".to_owned()]),
            "a removed node may still open streams to db"
        );
        assert_eq!(
            endpoints(&reader),
            ["n1"],
            "a removed node is still an endpoint"
        );
    }
}
