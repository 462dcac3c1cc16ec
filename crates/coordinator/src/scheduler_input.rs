//! What the scheduler is given: the nodes that can take replicas, as
//! [`NodeInfo`]s, and a workload's request. Shared by the reconcile loop,
//! which places replicas, and `ExplainPlacement`, which shows why.

use std::collections::{BTreeMap, HashMap};

use cloudless_scheduler::{NodeInfo, RunningReplica, WorkloadRequest};
use cloudless_types::{NodePhase, NodeRecord, ReplicaRecord, Workload};

/// Labels that name a node's zone and region (the first found wins).
const ZONE_LABELS: [&str; 3] = [
    "zone",
    "topology.cloudless.dev/zone",
    "topology.kubernetes.io/zone",
];
const REGION_LABELS: [&str; 3] = [
    "region",
    "topology.cloudless.dev/region",
    "topology.kubernetes.io/region",
];

/// A node's placement labels: the join token's and the admins', never what
/// the node reports about itself (a compromised node could otherwise
/// attract workloads, and then their secrets).
pub(crate) fn node_labels(n: &NodeRecord) -> BTreeMap<String, String> {
    n.labels.clone()
}

/// The zone placement sees for `n` (the first of [`ZONE_LABELS`] it has).
pub(crate) fn node_zone(n: &NodeRecord) -> String {
    first_label(&node_labels(n), &ZONE_LABELS)
}

/// The region placement sees for `n` (the first of [`REGION_LABELS`] it
/// has).
pub(crate) fn node_region(n: &NodeRecord) -> String {
    first_label(&node_labels(n), &REGION_LABELS)
}

fn first_label(labels: &BTreeMap<String, String>, keys: &[&str]) -> String {
    keys.iter()
        .find_map(|k| labels.get(*k))
        .cloned()
        .unwrap_or_default()
}

/// The scheduler's view of the nodes that can take replicas.
pub(crate) fn node_infos(nodes: &[NodeRecord], replicas: &[ReplicaRecord]) -> Vec<NodeInfo> {
    let mut by_node: HashMap<&str, Vec<RunningReplica>> = HashMap::new();
    for r in replicas {
        by_node
            .entry(r.node_id.as_str())
            .or_default()
            .push(RunningReplica {
                id: r.id.clone(),
                workload: r.workload_key(),
                priority: r.spec.priority,
                requests: r.spec.requests,
                host_ports: r.spec.host_ports(),
            });
    }
    nodes
        .iter()
        .filter_map(|n| {
            // Nodes that never heartbeat, or are gone, are not candidates
            // (nor listed in explanations).
            if matches!(n.phase, NodePhase::Pending | NodePhase::Down) {
                return None;
            }
            let labels = node_labels(n);
            Some(NodeInfo {
                id: n.id.clone(),
                region: first_label(&labels, &REGION_LABELS),
                zone: first_label(&labels, &ZONE_LABELS),
                taints: Vec::new(),
                phase: n.phase,
                cordoned: n.cordoned,
                draining: n.draining,
                // Bounded and held on sudden growth (`node_capacity`).
                capacity: n.placement_capacity().0,
                reserved: cloudless_types::Resources::default(),
                reliability: n.reliability.clamp(0.0, 1.0),
                cost_per_unit: 0.0,
                // Stored by name (checked when reported).
                power: <cloudless_types::PowerSource as cloudless_types::ClosedSet>::from_name(
                    &n.status.power_source,
                )
                .unwrap_or_default(),
                battery_percent: n.status.battery_percent.min(100),
                arch: labels.get("arch").cloned().unwrap_or_default(),
                rtt_ms: BTreeMap::new(),
                runtime_classes: vec!["runc".to_owned()],
                replicas: by_node.remove(n.id.as_str()).unwrap_or_default(),
                labels,
            })
        })
        .collect()
}

/// The scheduler's request for `count` replicas of `w`.
pub(crate) fn workload_request(w: &Workload, count: usize) -> WorkloadRequest {
    let p = &w.spec.placement;
    WorkloadRequest {
        workload: format!("{}/{}", w.namespace, w.name),
        requests: w.spec.requests,
        replicas: u32::try_from(count).unwrap_or(u32::MAX),
        priority: w.spec.priority,
        long_running: true,
        zones: p.zones.clone(),
        regions: p.regions.clone(),
        node_selector: p.node_selector.clone(),
        anti_affinity: p.anti_affinity,
        strategy: p.strategy,
        host_ports: w.spec.host_ports(),
        ..WorkloadRequest::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The zone an explanation shows is the one placement uses, whichever
    /// of the zone labels the node carries.
    #[test]
    fn a_node_zone_comes_from_any_zone_label_as_placement_reads_it() {
        let mut n = NodeRecord::new("n1".into(), "a".into(), "t".into(), 0);
        n.phase = NodePhase::Ready;
        n.labels = [("topology.kubernetes.io/zone".to_owned(), "b".to_owned())].into();
        assert_eq!(node_zone(&n), "b");
        assert_eq!(node_infos(&[n.clone()], &[])[0].zone, "b");
        n.labels.insert("zone".into(), "a".into());
        assert_eq!(node_zone(&n), "a");
        assert_eq!(node_infos(&[n], &[])[0].zone, "a");
    }
    use cloudless_scheduler::{ClusterSnapshot, Decision};
    use cloudless_types::WorkloadSpec;

    fn workload() -> Workload {
        Workload {
            namespace: "default".into(),
            name: "web".into(),
            spec: WorkloadSpec {
                image: "busybox".into(),
                replicas: 1,
                ..WorkloadSpec::default()
            },
            generation: 1,
            created_at_ms: 0,
            updated_at_ms: 0,
            template: 1,
            revisions: Vec::new(),
            vip: None,
        }
    }

    fn ready_with(id: &str, cpu_millis: u64, trusted_cpu_millis: u64) -> NodeRecord {
        let mut n = NodeRecord::new(id.into(), id.into(), "t".into(), 0);
        n.phase = NodePhase::Ready;
        let gib = 1 << 30;
        n.status.capacity = cloudless_types::Resources {
            cpu_millis,
            memory_bytes: 4 * gib,
            ..Default::default()
        };
        n.trusted_capacity = cloudless_types::Resources {
            cpu_millis: trusted_cpu_millis,
            memory_bytes: 4 * gib,
            ..Default::default()
        };
        n
    }

    /// Where the scheduler puts one replica of `w` among `nodes`.
    fn place_one(w: &Workload, nodes: &[NodeRecord]) -> Option<String> {
        let infos = node_infos(nodes, &[]);
        let mut snapshot =
            ClusterSnapshot::new(&infos, cloudless_types::SchedulerWeights::default())
                .expect("snapshot");
        let decisions = snapshot
            .place(&workload_request(w, 1), 0, false)
            .expect("place");
        decisions.into_iter().find_map(|d| match d {
            Decision::Placed(p) => Some(p.node),
            _ => None,
        })
    }

    #[test]
    fn a_label_a_node_reports_about_itself_does_not_attract_a_workload_selecting_it() {
        let mut w = workload();
        w.spec.placement.node_selector = [("tier".to_owned(), "secure".to_owned())].into();
        w.spec.placement.zones = vec!["a".into()];
        let mut liar = ready_with("liar", 4000, 4000);
        liar.status.reported_labels = [
            ("tier".to_owned(), "secure".to_owned()),
            ("zone".to_owned(), "a".to_owned()),
        ]
        .into();
        assert_eq!(place_one(&w, std::slice::from_ref(&liar)), None);

        let mut labelled = ready_with("labelled", 4000, 4000);
        labelled.labels = [
            ("tier".to_owned(), "secure".to_owned()),
            ("zone".to_owned(), "a".to_owned()),
        ]
        .into();
        assert_eq!(
            place_one(&w, &[liar, labelled]).as_deref(),
            Some("labelled")
        );
    }

    #[test]
    fn a_capacity_jump_does_not_make_a_node_more_attractive() {
        let mut w = workload();
        w.spec.requests.cpu_millis = 3000;
        w.spec.placement.strategy = cloudless_types::PlacementStrategy::Spread;
        // The jumper claims 1,000 cores but was trusted with 2: it is placed
        // as a 2-core node and cannot take a 3-core replica.
        let jumper = ready_with("jumper", 1_000_000, 2000);
        assert_eq!(place_one(&w, std::slice::from_ref(&jumper)), None);
        let honest = ready_with("honest", 4000, 4000);
        assert_eq!(place_one(&w, &[jumper, honest]).as_deref(), Some("honest"));
    }

    /// A replica already holding a host port keeps another workload that
    /// publishes it off its node, and explains why.
    #[test]
    fn a_published_host_port_keeps_other_replicas_publishing_it_off_the_node() {
        let port = |host_port| cloudless_types::ContainerPort {
            container_port: 8080,
            host_port,
            ..Default::default()
        };
        let mut web = workload();
        web.spec.ports = vec![port(80)];
        let mut api = workload();
        api.name = "api".into();
        api.spec.ports = vec![port(80)];
        let a = ready_with("a", 4000, 4000);
        let b = ready_with("b", 4000, 4000);
        let running = ReplicaRecord {
            id: "default.web-1-x".into(),
            namespace: "default".into(),
            workload: "web".into(),
            template: 1,
            spec: web.spec.clone(),
            node_id: "a".into(),
            state: cloudless_types::ReplicaState::Ready,
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
        };
        let infos = node_infos(&[a, b], &[running]);
        let mut snapshot =
            ClusterSnapshot::new(&infos, cloudless_types::SchedulerWeights::default())
                .expect("snapshot");
        let verdicts = snapshot
            .evaluate(&workload_request(&api, 1), 0)
            .expect("evaluate");
        let a = verdicts.iter().find(|(id, _)| id == "a").expect("a");
        assert_eq!(
            a.1.as_ref().map(|_| ()).map_err(ToString::to_string),
            Err("host port 80/TCP is taken by default/web".to_owned())
        );
        assert!(verdicts.iter().any(|(id, v)| id == "b" && v.is_ok()));
    }
}
