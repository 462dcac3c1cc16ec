//! Hard constraints: a node either passes or is removed with one reason.

use std::fmt;

use crate::compiled::Compiled;
use crate::input::{AntiAffinity, TaintEffect};
use crate::snapshot::{ClusterSnapshot, Node, Schedulable};

/// Why a node was removed from consideration (the first failing check).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FilterReason {
    /// Phase is Pending, Suspect or Down.
    NotReady,
    /// Cordoned.
    Cordoned,
    /// Draining.
    Draining,
    /// CPU architecture differs.
    Architecture,
    /// Runtime class not offered.
    RuntimeClass,
    /// Region not allowed.
    Region,
    /// Zone not allowed.
    Zone,
    /// Node selector does not match.
    NodeSelector,
    /// Required node affinity does not match.
    RequiredAffinity,
    /// An untolerated NoSchedule or NoExecute taint.
    Taint,
    /// Already runs a replica of the workload (node anti-affinity).
    AntiAffinityNode,
    /// Its zone already runs a replica of the workload (zone anti-affinity).
    AntiAffinityZone,
    /// A replica there (of any workload, this one's included) holds a node
    /// port the replica would publish.
    HostPort,
    /// Not enough unreserved CPU.
    InsufficientCpu,
    /// Not enough unreserved memory.
    InsufficientMemory,
    /// Not enough unreserved storage.
    InsufficientStorage,
    /// Not enough unreserved bandwidth.
    InsufficientBandwidth,
}

pub(crate) const REASONS: usize = 17;

impl FilterReason {
    /// Every reason, in declaration order.
    pub const ALL: [FilterReason; REASONS] = [
        Self::NotReady,
        Self::Cordoned,
        Self::Draining,
        Self::Architecture,
        Self::RuntimeClass,
        Self::Region,
        Self::Zone,
        Self::NodeSelector,
        Self::RequiredAffinity,
        Self::Taint,
        Self::AntiAffinityNode,
        Self::AntiAffinityZone,
        Self::HostPort,
        Self::InsufficientCpu,
        Self::InsufficientMemory,
        Self::InsufficientStorage,
        Self::InsufficientBandwidth,
    ];

    pub(crate) fn index(self) -> usize {
        self as usize
    }

    /// A short snake_case name, for metric labels.
    pub fn label(self) -> &'static str {
        match self {
            Self::NotReady => "not_ready",
            Self::Cordoned => "cordoned",
            Self::Draining => "draining",
            Self::Architecture => "architecture",
            Self::RuntimeClass => "runtime_class",
            Self::Region => "region",
            Self::Zone => "zone",
            Self::NodeSelector => "node_selector",
            Self::RequiredAffinity => "required_affinity",
            Self::Taint => "taint",
            Self::AntiAffinityNode => "anti_affinity_node",
            Self::AntiAffinityZone => "anti_affinity_zone",
            Self::HostPort => "host_port",
            Self::InsufficientCpu => "insufficient_cpu",
            Self::InsufficientMemory => "insufficient_memory",
            Self::InsufficientStorage => "insufficient_storage",
            Self::InsufficientBandwidth => "insufficient_bandwidth",
        }
    }
}

impl fmt::Display for FilterReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotReady => "not ready",
            Self::Cordoned => "cordoned",
            Self::Draining => "draining",
            Self::Architecture => "architecture",
            Self::RuntimeClass => "runtime class",
            Self::Region => "region",
            Self::Zone => "zone",
            Self::NodeSelector => "node selector",
            Self::RequiredAffinity => "required affinity",
            Self::Taint => "untolerated taint",
            Self::AntiAffinityNode => "anti-affinity (node already runs a replica)",
            Self::AntiAffinityZone => "anti-affinity (zone already runs a replica)",
            Self::HostPort => "host port taken",
            Self::InsufficientCpu => "insufficient cpu",
            Self::InsufficientMemory => "insufficient memory",
            Self::InsufficientStorage => "insufficient storage",
            Self::InsufficientBandwidth => "insufficient bandwidth",
        })
    }
}

const RESOURCE_REASONS: [FilterReason; 4] = [
    FilterReason::InsufficientCpu,
    FilterReason::InsufficientMemory,
    FilterReason::InsufficientStorage,
    FilterReason::InsufficientBandwidth,
];

/// Whether `node` may host a replica of `c`. With `skip_resources`, only the
/// non-resource checks run (used to find preemption candidates).
pub(crate) fn check(
    snap: &ClusterSnapshot,
    node: &Node,
    c: &Compiled,
    skip_resources: bool,
) -> Result<(), FilterReason> {
    match node.schedulable {
        Schedulable::Yes => {}
        Schedulable::NotReady => return Err(FilterReason::NotReady),
        Schedulable::Cordoned => return Err(FilterReason::Cordoned),
        Schedulable::Draining => return Err(FilterReason::Draining),
    }
    if c.arch.is_some_and(|a| a != node.arch) {
        return Err(FilterReason::Architecture);
    }
    if c.runtime_class != snap.runc
        && node
            .runtime_classes
            .binary_search(&c.runtime_class)
            .is_err()
    {
        return Err(FilterReason::RuntimeClass);
    }
    if !c.regions.is_empty() && !c.regions.contains(&node.region) {
        return Err(FilterReason::Region);
    }
    if !c.zones.is_empty() && !c.zones.contains(&node.zone) {
        return Err(FilterReason::Zone);
    }
    if !c.selector.iter().all(|(k, v)| node.label(*k) == Some(*v)) {
        return Err(FilterReason::NodeSelector);
    }
    if !c.required.iter().all(|e| e.matches(node)) {
        return Err(FilterReason::RequiredAffinity);
    }
    for &(key, value, effect, added_at) in node.taints.iter() {
        if effect != TaintEffect::PreferNoSchedule && !c.tolerates(key, value, effect, added_at) {
            return Err(FilterReason::Taint);
        }
    }
    match c.anti_affinity {
        AntiAffinity::None => {}
        AntiAffinity::Node => {
            if node.residents.iter().any(|r| r.workload == c.workload) {
                return Err(FilterReason::AntiAffinityNode);
            }
        }
        AntiAffinity::Zone => {
            if snap
                .zone_counts
                .get(&(c.workload, node.zone))
                .is_some_and(|n| *n > 0)
            {
                return Err(FilterReason::AntiAffinityZone);
            }
        }
    }
    // Not freed by preemption: a node where the port is held is no
    // candidate at all.
    if node.taken_port(&c.host_ports).is_some() {
        return Err(FilterReason::HostPort);
    }
    if !skip_resources {
        for (i, reason) in RESOURCE_REASONS.iter().enumerate() {
            let need = c.requests[i];
            if need > 0 && node.reserved[i].saturating_add(need) > node.capacity[i] {
                return Err(*reason);
            }
        }
    }
    Ok(())
}

/// A node the filters removed, with the reason in words
/// (`host port 8080/TCP is taken by default/web`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filtered {
    /// The first check it failed.
    pub reason: FilterReason,
    /// The reason for people, with the specifics of this node.
    pub detail: String,
}

impl fmt::Display for Filtered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail)
    }
}

fn port_name((port, protocol): (u16, cloudless_types::Protocol)) -> String {
    format!("{port}/{protocol:?}")
}

/// Why `node` failed `reason`, in words, with this node's specifics.
pub(crate) fn detail(
    snap: &ClusterSnapshot,
    node: &Node,
    c: &Compiled,
    reason: FilterReason,
) -> String {
    let list = |ids: &[u32]| {
        ids.iter()
            .map(|i| snap.strings.name(*i))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match reason {
        FilterReason::Region => format!("region not in [{}]", list(&c.regions)),
        FilterReason::Zone => format!("zone not in [{}]", list(&c.zones)),
        FilterReason::HostPort => match node.taken_port(&c.host_ports) {
            Some((port, holder)) => format!(
                "host port {} is taken by {}",
                port_name(port),
                snap.strings.name(holder)
            ),
            None => reason.to_string(),
        },
        other => other.to_string(),
    }
}

/// Every requested node port some node holds, with who holds it:
/// `8080/TCP (by default/web)`, for an unplaced replica's reasons.
fn taken_ports(snap: &ClusterSnapshot, c: &Compiled) -> String {
    let mut taken: Vec<((u16, bool), String, Vec<&str>)> = Vec::new();
    for node in &snap.nodes {
        for r in &node.residents {
            for p in r.host_ports.iter().filter(|p| c.host_ports.contains(p)) {
                let key = (p.0, p.1 == cloudless_types::Protocol::UDP);
                let holder = snap.strings.name(r.workload);
                match taken.iter_mut().find(|(k, _, _)| *k == key) {
                    Some((_, _, holders)) => {
                        if !holders.contains(&holder) {
                            holders.push(holder);
                        }
                    }
                    None => taken.push((key, port_name(*p), vec![holder])),
                }
            }
        }
    }
    taken.sort_by_key(|t| t.0);
    taken
        .into_iter()
        .map(|(_, port, mut holders)| {
            holders.sort_unstable();
            let more = holders.len().saturating_sub(3);
            holders.truncate(3);
            let by = holders.join(", ");
            if more > 0 {
                format!("{port} (by {by} and {more} more)")
            } else {
                format!("{port} (by {by})")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Formats per-reason counts: "7 nodes: insufficient memory; 3 nodes: zone not in [eu-a]".
pub(crate) fn describe(
    counts: &[u32; REASONS],
    c: &Compiled,
    snap: &ClusterSnapshot,
    total_nodes: usize,
) -> Vec<(FilterReason, u32, String)> {
    let list = |ids: &[u32]| {
        ids.iter()
            .map(|i| snap.strings.name(*i))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out: Vec<(FilterReason, u32, String)> = FilterReason::ALL
        .iter()
        .filter(|r| counts[r.index()] > 0)
        .map(|r| {
            let detail = match r {
                FilterReason::Region => format!("region not in [{}]", list(&c.regions)),
                FilterReason::Zone => format!("zone not in [{}]", list(&c.zones)),
                FilterReason::HostPort => format!("host port taken: {}", taken_ports(snap, c)),
                other => other.to_string(),
            };
            (*r, counts[r.index()], detail)
        })
        .collect();
    out.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    if total_nodes == 0 {
        out.push((FilterReason::NotReady, 0, "the cluster has no nodes".into()));
    }
    out
}
