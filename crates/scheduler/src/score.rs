//! Soft preferences: a 0-100 score for each feasible node.

use crate::compiled::Compiled;
use crate::input::TaintEffect;
use crate::snapshot::{ClusterSnapshot, Node};

/// Round-trip time that counts as the full network penalty.
const RTT_FULL_PENALTY_MS: f32 = 200.0;
/// Points a battery-powered node loses for a long-running service, plus up to this again when empty.
const BATTERY_PENALTY: f32 = 10.0;
/// Points for an untolerated PreferNoSchedule taint.
const PREFER_NO_SCHEDULE_PENALTY: f32 = 15.0;
/// Points all preferred-affinity terms together can add.
const PREFERRED_BONUS: f32 = 10.0;

/// Each factor in 0..=1 and the resulting score.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub(crate) struct Factors {
    pub(crate) locality: f32,
    pub(crate) reliability: f32,
    pub(crate) cost: f32,
    pub(crate) utilization: f32,
    pub(crate) network_penalty: f32,
    /// Points added (preferred affinity) or removed (battery, PreferNoSchedule).
    pub(crate) adjustment: f32,
    pub(crate) total: f32,
}

/// Fraction of cpu and memory in use on `node` if the replica lands there.
fn utilization_after(node: &Node, c: &Compiled) -> f32 {
    let mut sum = 0f32;
    let mut dims = 0f32;
    for i in 0..2 {
        if node.capacity[i] > 0 {
            sum +=
                (node.reserved[i].saturating_add(c.requests[i])) as f32 / node.capacity[i] as f32;
            dims += 1.0;
        }
    }
    if dims == 0.0 {
        0.0
    } else {
        (sum / dims).min(1.0)
    }
}

pub(crate) fn score(snap: &ClusterSnapshot, node: &Node, c: &Compiled) -> Factors {
    let w = &snap.weights;
    let locality = match c.regions.iter().position(|r| *r == node.region) {
        Some(pos) => 1.0 - pos as f32 / c.regions.len() as f32,
        None => 1.0,
    };
    let network_penalty = match c.primary_region {
        Some(r) if r == node.region => 0.0,
        Some(r) => node
            .rtt
            .iter()
            .find(|(region, _)| *region == r)
            .map_or(1.0, |(_, ms)| (ms / RTT_FULL_PENALTY_MS).min(1.0)),
        None => 0.0,
    };
    let cost = if snap.max_cost > 0.0 {
        1.0 - node.cost / snap.max_cost
    } else {
        1.0
    };
    let used = utilization_after(node, c);
    let utilization = if c.binpack { used } else { 1.0 - used };
    let mut adjustment = 0f32;
    if c.preferred_total > 0 {
        let earned: u32 = c
            .preferred
            .iter()
            .filter(|(_, e)| e.matches(node))
            .map(|(w, _)| *w)
            .sum();
        adjustment += PREFERRED_BONUS * earned as f32 / c.preferred_total as f32;
    }
    if c.long_running {
        if let Some(percent) = node.battery {
            adjustment -= BATTERY_PENALTY + BATTERY_PENALTY * (1.0 - f32::from(percent) / 100.0);
        }
    }
    if node
        .taints
        .iter()
        .any(|&(k, v, e, at)| e == TaintEffect::PreferNoSchedule && !c.tolerates(k, v, e, at))
    {
        adjustment -= PREFER_NO_SCHEDULE_PENALTY;
    }
    let base = w.locality as f32 * locality
        + w.reliability as f32 * node.reliability
        + w.cost as f32 * cost
        + w.utilization as f32 * utilization
        - w.network_penalty as f32 * network_penalty;
    let total = (100.0 * base + adjustment).clamp(0.0, 100.0);
    Factors {
        locality,
        reliability: node.reliability,
        cost,
        utilization,
        network_penalty,
        adjustment,
        total,
    }
}
