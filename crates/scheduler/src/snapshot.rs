//! The compact, interned cluster snapshot the scheduler works on.

use std::collections::HashMap;

use cloudless_types::{Resources, SchedulerWeights};

use crate::input::{NodeInfo, TaintEffect};
use cloudless_types::{NodePhase, PowerSource, Protocol};

/// Sentinel for a string the snapshot has never seen: matches nothing.
pub(crate) const UNKNOWN: u32 = u32::MAX;

/// Resource vector: cpu millis, memory bytes, storage bytes, bandwidth bps.
pub(crate) type Res = [u64; 4];

pub(crate) fn res(r: &Resources) -> Res {
    [
        r.cpu_millis,
        r.memory_bytes,
        r.storage_bytes,
        r.bandwidth_bps,
    ]
}

/// Why a snapshot or request was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SchedulerError {
    /// Two nodes share an id.
    #[error("nodes[{index}].id: {id:?} appears more than once")]
    DuplicateNode {
        /// Index of the second occurrence.
        index: usize,
        /// The id.
        id: String,
    },
    /// A node field is out of range.
    #[error("nodes[{index}] ({id}).{field}: {problem}")]
    InvalidNode {
        /// Index.
        index: usize,
        /// Node id.
        id: String,
        /// Field.
        field: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// A workload request field is out of range.
    #[error("workload {workload:?}.{field}: {problem}")]
    InvalidRequest {
        /// Workload.
        workload: String,
        /// Field.
        field: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// The weights are invalid.
    #[error("scheduler weights: {0}")]
    InvalidWeights(String),
}

#[derive(Debug, Default)]
pub(crate) struct Interner {
    map: HashMap<String, u32>,
    strings: Vec<String>,
}

impl Interner {
    pub(crate) fn intern(&mut self, s: &str) -> u32 {
        if let Some(&id) = self.map.get(s) {
            return id;
        }
        let id = u32::try_from(self.strings.len()).expect("fewer than 4 billion distinct strings");
        self.strings.push(s.to_owned());
        self.map.insert(s.to_owned(), id);
        id
    }

    pub(crate) fn get(&self, s: &str) -> u32 {
        self.map.get(s).copied().unwrap_or(UNKNOWN)
    }

    pub(crate) fn name(&self, id: u32) -> &str {
        self.strings.get(id as usize).map_or("?", String::as_str)
    }
}

/// How a resident replica is named.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ResidentId {
    /// Given in the input (interned).
    Named(u32),
    /// Placed through this snapshot: named `workload#seq` only when reported.
    Placed(u64),
}

/// A replica resident on a node.
#[derive(Debug, Clone)]
pub(crate) struct Resident {
    pub(crate) id: ResidentId,
    pub(crate) workload: u32,
    pub(crate) priority: i32,
    pub(crate) requests: Res,
    /// Node ports it holds (usually none).
    pub(crate) host_ports: Box<[(u16, Protocol)]>,
}

#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub(crate) id: u32,
    pub(crate) region: u32,
    pub(crate) zone: u32,
    pub(crate) arch: u32,
    pub(crate) schedulable: Schedulable,
    pub(crate) battery: Option<u8>,
    pub(crate) capacity: Res,
    pub(crate) reserved: Res,
    pub(crate) reliability: f32,
    pub(crate) cost: f32,
    /// Sorted by key.
    pub(crate) labels: Box<[(u32, u32)]>,
    pub(crate) taints: Box<[(u32, u32, TaintEffect, i64)]>,
    pub(crate) rtt: Box<[(u32, f32)]>,
    pub(crate) runtime_classes: Box<[u32]>,
    pub(crate) residents: Vec<Resident>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Schedulable {
    Yes,
    NotReady,
    Cordoned,
    Draining,
}

impl Node {
    /// The first of `ports` a resident holds, with the resident's workload.
    pub(crate) fn taken_port(&self, ports: &[(u16, Protocol)]) -> Option<((u16, Protocol), u32)> {
        if ports.is_empty() {
            return None;
        }
        self.residents.iter().find_map(|r| {
            r.host_ports
                .iter()
                .find(|p| ports.contains(p))
                .map(|p| (*p, r.workload))
        })
    }

    pub(crate) fn label(&self, key: u32) -> Option<u32> {
        self.labels
            .binary_search_by_key(&key, |(k, _)| *k)
            .ok()
            .map(|i| self.labels[i].1)
    }
}

/// The scheduler's view of the cluster. Build it from [`NodeInfo`]s with
/// [`ClusterSnapshot::new`]; [`ClusterSnapshot::place`] updates reservations
/// as it places, so one snapshot serves many decisions.
#[derive(Debug)]
pub struct ClusterSnapshot {
    pub(crate) strings: Interner,
    pub(crate) nodes: Vec<Node>,
    /// Zone id -> indexes of its nodes, in node order.
    pub(crate) by_zone: HashMap<u32, Vec<u32>>,
    /// Zones in id order (deterministic iteration).
    pub(crate) zones: Vec<u32>,
    /// (workload, zone) -> replicas placed there.
    pub(crate) zone_counts: HashMap<(u32, u32), u32>,
    pub(crate) max_cost: f32,
    pub(crate) weights: SchedulerWeights,
    pub(crate) runc: u32,
    /// Where the next unconstrained scan starts (rotates for fairness, deterministically).
    pub(crate) next_start: usize,
    /// Replicas placed through this snapshot (names them `workload#n`).
    pub(crate) placed: u64,
    /// Most feasible nodes scored per decision.
    pub score_limit: usize,
}

/// Kubernetes' adaptive rule: score 50% of nodes minus 1% per 125 nodes, at
/// least 5%, and never fewer than 100 nodes.
fn default_score_limit(n: usize) -> usize {
    let percent = 50usize.saturating_sub(n / 125).max(5);
    (n * percent / 100).max(100).min(n.max(1))
}

impl ClusterSnapshot {
    /// Builds a snapshot, checking every node. Nodes are ordered by id so the
    /// result does not depend on input order.
    pub fn new(nodes: &[NodeInfo], weights: SchedulerWeights) -> Result<Self, SchedulerError> {
        validate_weights(&weights)?;
        let mut order: Vec<usize> = (0..nodes.len()).collect();
        order.sort_by(|a, b| nodes[*a].id.cmp(&nodes[*b].id));
        let mut strings = Interner::default();
        let runc = strings.intern("runc");
        let mut out = Vec::with_capacity(nodes.len());
        let mut zone_counts = HashMap::new();
        let mut max_cost = 0f32;
        for (pos, &index) in order.iter().enumerate() {
            let n = &nodes[index];
            if pos > 0 && nodes[order[pos - 1]].id == n.id {
                return Err(SchedulerError::DuplicateNode {
                    index,
                    id: n.id.clone(),
                });
            }
            let bad = |field: &'static str, problem: String| SchedulerError::InvalidNode {
                index,
                id: n.id.clone(),
                field,
                problem,
            };
            if !(0.0..=1.0).contains(&n.reliability) {
                return Err(bad(
                    "reliability",
                    format!("{} is outside 0..=1", n.reliability),
                ));
            }
            if !n.cost_per_unit.is_finite() || n.cost_per_unit < 0.0 {
                return Err(bad(
                    "cost_per_unit",
                    format!("{} must be finite and >= 0", n.cost_per_unit),
                ));
            }
            if n.power == PowerSource::Battery {
                let percent = n.battery_percent;
                if percent > 100 {
                    return Err(bad("power", format!("battery at {percent}% is above 100")));
                }
            }
            for (region, rtt) in &n.rtt_ms {
                if !rtt.is_finite() || *rtt < 0.0 {
                    return Err(bad(
                        "rtt_ms",
                        format!("{rtt} ms to {region} must be finite and >= 0"),
                    ));
                }
            }
            let mut labels: Vec<(u32, u32)> = n
                .labels
                .iter()
                .map(|(k, v)| (strings.intern(k), strings.intern(v)))
                .collect();
            labels.sort_unstable();
            let taints = n
                .taints
                .iter()
                .map(|t| {
                    (
                        strings.intern(&t.key),
                        strings.intern(&t.value),
                        t.effect,
                        t.added_at_ms,
                    )
                })
                .collect();
            let rtt = n
                .rtt_ms
                .iter()
                .map(|(r, ms)| (strings.intern(r), *ms as f32))
                .collect();
            let mut runtime_classes: Vec<u32> = n
                .runtime_classes
                .iter()
                .map(|c| strings.intern(c))
                .collect();
            runtime_classes.push(runc);
            runtime_classes.sort_unstable();
            runtime_classes.dedup();
            let zone = strings.intern(&n.zone);
            let mut reserved = res(&n.reserved);
            let mut residents = Vec::with_capacity(n.replicas.len());
            for r in &n.replicas {
                let req = res(&r.requests);
                for (acc, v) in reserved.iter_mut().zip(req) {
                    *acc = acc.saturating_add(v);
                }
                let workload = strings.intern(&r.workload);
                *zone_counts.entry((workload, zone)).or_insert(0) += 1;
                residents.push(Resident {
                    id: ResidentId::Named(strings.intern(&r.id)),
                    workload,
                    priority: r.priority,
                    requests: req,
                    host_ports: r.host_ports.clone().into_boxed_slice(),
                });
            }
            max_cost = max_cost.max(n.cost_per_unit as f32);
            out.push(Node {
                id: strings.intern(&n.id),
                region: strings.intern(&n.region),
                zone,
                arch: strings.intern(&n.arch),
                schedulable: match (n.phase, n.cordoned, n.draining) {
                    (NodePhase::Pending | NodePhase::Suspect | NodePhase::Down, _, _) => {
                        Schedulable::NotReady
                    }
                    (NodePhase::Ready, true, _) => Schedulable::Cordoned,
                    (NodePhase::Ready, false, true) => Schedulable::Draining,
                    (NodePhase::Ready, false, false) => Schedulable::Yes,
                },
                battery: match n.power {
                    PowerSource::Mains => None,
                    PowerSource::Battery => Some(n.battery_percent),
                },
                capacity: res(&n.capacity),
                reserved,
                reliability: n.reliability as f32,
                cost: n.cost_per_unit as f32,
                labels: labels.into_boxed_slice(),
                taints,
                rtt,
                runtime_classes: runtime_classes.into_boxed_slice(),
                residents,
            });
        }
        let mut by_zone: HashMap<u32, Vec<u32>> = HashMap::new();
        for (i, n) in out.iter().enumerate() {
            by_zone.entry(n.zone).or_default().push(i as u32);
        }
        let mut zones: Vec<u32> = by_zone.keys().copied().collect();
        zones.sort_by(|a, b| strings.name(*a).cmp(strings.name(*b)));
        let score_limit = default_score_limit(out.len());
        Ok(Self {
            strings,
            nodes: out,
            by_zone,
            zones,
            zone_counts,
            max_cost,
            weights,
            runc,
            next_start: 0,
            placed: 0,
            score_limit,
        })
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether there are no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Reserved resources on `node_id` (including placements made through this snapshot).
    pub fn reserved(&self, node_id: &str) -> Option<Resources> {
        let id = self.strings.get(node_id);
        self.nodes.iter().find(|n| n.id == id).map(|n| Resources {
            cpu_millis: n.reserved[0],
            memory_bytes: n.reserved[1],
            storage_bytes: n.reserved[2],
            bandwidth_bps: n.reserved[3],
            pids: 0,
        })
    }
}

fn validate_weights(w: &SchedulerWeights) -> Result<(), SchedulerError> {
    let all = [
        w.locality,
        w.reliability,
        w.cost,
        w.utilization,
        w.network_penalty,
    ];
    if all.iter().any(|v| !(0.0..=1.0).contains(v)) {
        return Err(SchedulerError::InvalidWeights(format!(
            "every weight must be within 0..=1: {w:?}"
        )));
    }
    let sum: f64 = all.iter().sum();
    if (sum - 1.0).abs() > 0.001 {
        return Err(SchedulerError::InvalidWeights(format!(
            "the five weights must add up to 1, not {sum:.3}"
        )));
    }
    Ok(())
}
