//! Property tests over random clusters and workloads.

mod common;

use std::collections::{BTreeMap, HashMap};

use cloudless_scheduler::{
    AntiAffinity, ClusterSnapshot, Decision, NodeInfo, NodePhase, Protocol, RunningReplica,
    Strategy as Placing, Taint, TaintEffect, Toleration, TolerationOperator, WorkloadRequest,
};
use cloudless_types::{Resources, SchedulerWeights};
use common::{node, res};
use proptest::prelude::*;

const ZONES: [&str; 4] = ["za", "zb", "zc", "zd"];
const TAINT_KEYS: [&str; 2] = ["dedicated", "spot"];

fn arb_effect() -> impl Strategy<Value = TaintEffect> {
    prop_oneof![
        Just(TaintEffect::NoSchedule),
        Just(TaintEffect::PreferNoSchedule),
        Just(TaintEffect::NoExecute)
    ]
}

fn arb_node(i: usize) -> impl Strategy<Value = NodeInfo> {
    (
        0..ZONES.len(),
        1u64..=8,   // cores
        1u64..=16,  // GiB
        0u64..=100, // percent reserved
        prop::option::of((0..TAINT_KEYS.len(), arb_effect())),
        0u8..10,         // phase / cordon dice
        prop::bool::ANY, // ssd label
        0usize..3,       // running replicas of "web"
    )
        .prop_map(move |(z, cores, gib, pct, taint, dice, ssd, web)| {
            let mut n = node(&format!("n{i:03}"), ZONES[z]);
            n.capacity = res(cores * 1000, gib);
            n.reserved = Resources {
                cpu_millis: cores * 1000 * pct / 200,
                memory_bytes: n.capacity.memory_bytes * pct / 200,
                ..Resources::default()
            };
            if let Some((k, effect)) = taint {
                n.taints.push(Taint {
                    key: TAINT_KEYS[k].into(),
                    value: "x".into(),
                    effect,
                    added_at_ms: 0,
                });
            }
            match dice {
                0 => n.phase = NodePhase::Down,
                1 => n.cordoned = true,
                _ => {}
            }
            if ssd {
                n.labels.insert("disk".into(), "ssd".into());
            }
            n.replicas = (0..web)
                .map(|r| RunningReplica {
                    id: format!("n{i}-web{r}"),
                    workload: "web".into(),
                    priority: 0,
                    requests: res(100, 0),
                    host_ports: Vec::new(),
                })
                .collect();
            n
        })
}

fn arb_cluster() -> impl Strategy<Value = Vec<NodeInfo>> {
    (1usize..30).prop_flat_map(|n| (0..n).map(arb_node).collect::<Vec<_>>())
}

fn arb_request() -> impl Strategy<Value = WorkloadRequest> {
    (
        prop_oneof![Just("web"), Just("api")],
        1u32..10,
        100u64..3000,
        0u64..4,
        prop_oneof![
            Just(Placing::Auto),
            Just(Placing::Binpack),
            Just(Placing::Spread)
        ],
        prop_oneof![
            Just(AntiAffinity::None),
            Just(AntiAffinity::Node),
            Just(AntiAffinity::Zone)
        ],
        prop::option::of(0..TAINT_KEYS.len()),
        prop::bool::ANY,
    )
        .prop_map(|(w, replicas, cpu, gib, strategy, anti, tol, ssd)| {
            let mut r = WorkloadRequest {
                workload: w.into(),
                requests: res(cpu, gib),
                replicas,
                strategy,
                anti_affinity: anti,
                ..WorkloadRequest::default()
            };
            if let Some(k) = tol {
                r.tolerations.push(Toleration {
                    key: TAINT_KEYS[k].into(),
                    operator: TolerationOperator::Exists,
                    value: String::new(),
                    effect: None,
                    toleration_seconds: None,
                });
            }
            if ssd {
                r.node_selector = BTreeMap::from([("disk".to_owned(), "ssd".to_owned())]);
            }
            r
        })
}

fn untolerated_hard_taint(n: &NodeInfo, r: &WorkloadRequest) -> bool {
    n.taints.iter().any(|t| {
        t.effect != TaintEffect::PreferNoSchedule
            && !r.tolerations.iter().any(|tol| tol.key == t.key)
    })
}

/// Independent feasibility oracle (resources, readiness, taints, selector, anti-affinity).
fn feasible(
    n: &NodeInfo,
    reserved: &Resources,
    r: &WorkloadRequest,
    on_node: u32,
    in_zone: u32,
) -> bool {
    n.phase == NodePhase::Ready
        && !n.cordoned
        && !n.draining
        && !untolerated_hard_taint(n, r)
        && r.node_selector
            .iter()
            .all(|(k, v)| n.labels.get(k) == Some(v))
        && (r.anti_affinity != AntiAffinity::Node || on_node == 0)
        && (r.anti_affinity != AntiAffinity::Zone || in_zone == 0)
        && (r.requests.cpu_millis == 0
            || reserved.cpu_millis + r.requests.cpu_millis <= n.capacity.cpu_millis)
        && (r.requests.memory_bytes == 0
            || reserved.memory_bytes + r.requests.memory_bytes <= n.capacity.memory_bytes)
}

fn placements(d: &[Decision]) -> Vec<Option<String>> {
    d.iter()
        .map(|d| match d {
            Decision::Placed(p) => Some(p.node.clone()),
            Decision::Unplaced(_) => None,
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, .. ProptestConfig::default() })]

    #[test]
    fn never_exceeds_capacity_or_breaks_taints_and_anti_affinity(nodes in arb_cluster(), req in arb_request()) {
        let mut snap = ClusterSnapshot::new(&nodes, SchedulerWeights::default()).expect("valid");
        let decisions = snap.place(&req, 0, false).expect("place");
        let by_id: HashMap<&str, &NodeInfo> = nodes.iter().map(|n| (n.id.as_str(), n)).collect();
        let mut per_node: HashMap<String, u32> = HashMap::new();
        let mut per_zone: HashMap<String, u32> = HashMap::new();
        for n in &nodes {
            let existing = n.replicas.iter().filter(|r| r.workload == req.workload).count() as u32;
            *per_node.entry(n.id.clone()).or_default() += existing;
            *per_zone.entry(n.zone.clone()).or_default() += existing;
        }
        for node_id in placements(&decisions).into_iter().flatten() {
            let n = by_id[node_id.as_str()];
            prop_assert!(!untolerated_hard_taint(n, &req), "placed on {} despite its taint", n.id);
            prop_assert!(n.phase == NodePhase::Ready && !n.cordoned);
            let on_node = per_node.entry(node_id.clone()).or_default();
            *on_node += 1;
            let in_zone = per_zone.entry(n.zone.clone()).or_default();
            *in_zone += 1;
            if req.anti_affinity == AntiAffinity::Node { prop_assert!(*on_node <= 1, "two replicas on {}", n.id); }
            if req.anti_affinity == AntiAffinity::Zone { prop_assert!(*in_zone <= 1, "two replicas in {}", n.zone); }
        }
        for n in &nodes {
            let r = snap.reserved(&n.id).expect("node");
            let before_cpu = n.reserved.cpu_millis + n.replicas.iter().map(|x| x.requests.cpu_millis).sum::<u64>();
            let before_mem = n.reserved.memory_bytes + n.replicas.iter().map(|x| x.requests.memory_bytes).sum::<u64>();
            // Nodes that were already over (never in this generator) stay as they were; others stay within capacity.
            prop_assert!(r.cpu_millis <= n.capacity.cpu_millis.max(before_cpu), "{} cpu {} > {}", n.id, r.cpu_millis, n.capacity.cpu_millis);
            prop_assert!(r.memory_bytes <= n.capacity.memory_bytes.max(before_mem), "{} memory over", n.id);
        }
    }

    #[test]
    fn same_input_same_output_whatever_the_node_order(nodes in arb_cluster(), req in arb_request(), seed in any::<u64>()) {
        let mut shuffled = nodes.clone();
        // A deterministic shuffle from the seed.
        let mut s = seed | 1;
        for i in (1..shuffled.len()).rev() {
            s ^= s << 13; s ^= s >> 7; s ^= s << 17;
            shuffled.swap(i, (s % (i as u64 + 1)) as usize);
        }
        let mut a = ClusterSnapshot::new(&nodes, SchedulerWeights::default()).expect("valid");
        let mut b = ClusterSnapshot::new(&shuffled, SchedulerWeights::default()).expect("valid");
        let da = a.place(&req, 0, true).expect("place");
        let db = b.place(&req, 0, true).expect("place");
        prop_assert_eq!(da, db);
    }

    #[test]
    fn spread_fills_the_emptiest_eligible_zone_first(nodes in arb_cluster(), mut req in arb_request()) {
        req.strategy = Placing::Spread;
        let total = req.replicas;
        req.replicas = 1;
        let mut snap = ClusterSnapshot::new(&nodes, SchedulerWeights::default()).expect("valid");
        let mut reserved: HashMap<String, Resources> = nodes.iter().map(|n| {
            let mut r = n.reserved;
            for x in &n.replicas { r.cpu_millis += x.requests.cpu_millis; r.memory_bytes += x.requests.memory_bytes; }
            (n.id.clone(), r)
        }).collect();
        let mut on_node: HashMap<String, u32> = HashMap::new();
        let mut in_zone: HashMap<String, u32> = HashMap::new();
        for n in &nodes {
            let c = n.replicas.iter().filter(|r| r.workload == req.workload).count() as u32;
            *on_node.entry(n.id.clone()).or_default() += c;
            *in_zone.entry(n.zone.clone()).or_default() += c;
        }
        for _ in 0..total {
            let eligible_min = nodes
                .iter()
                .filter(|n| feasible(n, &reserved[&n.id], &req, on_node.get(&n.id).copied().unwrap_or(0), in_zone.get(&n.zone).copied().unwrap_or(0)))
                .map(|n| in_zone.get(&n.zone).copied().unwrap_or(0))
                .min();
            let d = snap.place(&req, 0, false).expect("place");
            match (&d[0], eligible_min) {
                (Decision::Placed(p), Some(min)) => {
                    let n = nodes.iter().find(|n| n.id == p.node).expect("known node");
                    let count = in_zone.get(&n.zone).copied().unwrap_or(0);
                    prop_assert_eq!(count, min, "placed in {} holding {} while a zone holding {} had room", n.zone, count, min);
                    let r = reserved.get_mut(&n.id).expect("node");
                    r.cpu_millis += req.requests.cpu_millis;
                    r.memory_bytes += req.requests.memory_bytes;
                    *on_node.entry(n.id.clone()).or_default() += 1;
                    *in_zone.entry(n.zone.clone()).or_default() += 1;
                }
                (Decision::Unplaced(_), None) => {}
                (Decision::Placed(p), None) => prop_assert!(false, "placed on {} but the oracle found no feasible node", p.node),
                (Decision::Unplaced(u), Some(_)) => prop_assert!(false, "unplaced ({}) but the oracle found a feasible node", u),
            }
        }
    }

    #[test]
    fn a_host_port_is_never_held_twice_on_a_node(
        nodes in arb_cluster(),
        mut req in arb_request(),
        holders in proptest::collection::vec(any::<bool>(), 30),
    ) {
        let port = (8080, Protocol::TCP);
        let mut nodes = nodes;
        for (n, holds) in nodes.iter_mut().zip(&holders) {
            if *holds {
                n.replicas.push(RunningReplica {
                    id: format!("{}-proxy", n.id),
                    workload: "proxy".into(),
                    priority: 0,
                    requests: Resources::default(),
                    host_ports: vec![port],
                });
            }
        }
        req.host_ports = vec![port];
        // Preemption never frees the port, whatever the priorities.
        req.priority = 1000;
        let mut snap = ClusterSnapshot::new(&nodes, SchedulerWeights::default()).expect("valid");
        let d = snap.place(&req, 0, false).expect("place");
        let mut used = std::collections::HashSet::new();
        for p in d.iter().filter_map(|d| match d {
            Decision::Placed(p) => Some(p),
            Decision::Unplaced(_) => None,
        }) {
            let n = nodes.iter().find(|n| n.id == p.node).expect("known node");
            prop_assert!(!n.replicas.iter().any(|r| r.host_ports.contains(&port)), "{} already held the port", n.id);
            prop_assert!(used.insert(p.node.clone()), "two replicas on {}", p.node);
            prop_assert!(!p.preempted.iter().any(|v| v.ends_with("-proxy")), "evicted a holder: {:?}", p.preempted);
        }
    }
}
