//! Node liveness. Agents heartbeat to the leader, which keeps what it hears in
//! memory and commits only changes: a phase change (Pending, Ready, Suspect,
//! Down), a changed device status, or a reliability score that moved.
//!
//! Phases, with the cluster configuration's timeouts:
//! - Ready: heard from within `suspect_after_missed_heartbeats` periods.
//! - Suspect: a Ready node silent for that long.
//! - Down: silent for `down_after_ms`, and this leader has led for at least
//!   `leader_grace_ms`. A new leader starts every node's silence clock at the
//!   moment it took over, so a leader change alone never marks a node Down.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use cloudless_state::{Command, NodeUpdate};
use cloudless_types::{ClusterConfig, NodePhase, NodeRecord};
use openraft::ServerState;
use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;
use crate::handle::CoordinatorHandle;
use crate::liveness::{next_phase, reliability, Liveness, PhaseLabel};

/// A tick this late means the process was paused.
const PAUSE_GAP: Duration = Duration::from_secs(2);
/// How often the leader re-evaluates every node when nothing wakes it.
const TICK: Duration = Duration::from_millis(100);
/// How often the leader re-reads the committed node records in full.
const RELOAD_EVERY: Duration = Duration::from_secs(2);
/// Most node updates in one Raft entry.
const UPDATES_PER_ENTRY: usize = 500;
/// A reliability change smaller than this is not committed.
const RELIABILITY_STEP: f64 = 0.02;
/// Least time between two reliability evaluations (and commits) for one node.
const RELIABILITY_EVERY: Duration = Duration::from_secs(30);
/// The heartbeat-ratio window.
const HEARTBEAT_WINDOW: Duration = Duration::from_secs(300);

/// The leader's membership loop. Runs on every coordinator; acts only while
/// this one leads.
pub(crate) async fn run(handle: CoordinatorHandle, cancel: CancellationToken) {
    let liveness = handle.liveness();
    let mut term: Option<(u64, Instant)> = None;
    let mut committed: HashMap<String, NodeRecord> = HashMap::new();
    let mut last_reload = Instant::now();
    let mut reliability_checked: HashMap<String, Instant> = HashMap::new();
    let mut last_tick = Instant::now();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(TICK) => {}
            () = liveness.wake.notified() => {}
        }
        // A gap far beyond the tick means this process was paused (SIGSTOP,
        // a frozen VM, a suspended laptop): the silence it measured is its
        // own, so the clocks restart as after a leader change.
        let paused = last_tick.elapsed() > PAUSE_GAP;
        last_tick = Instant::now();
        let (state, current_term) = {
            let m = handle.raft().metrics();
            let m = m.borrow();
            (m.state, m.current_term)
        };
        if state != ServerState::Leader {
            if term.take().is_some() {
                liveness.lock().clear();
                committed.clear();
            }
            continue;
        }
        let Ok(cluster) = handle.cluster() else {
            continue;
        };
        let cfg = cluster.config;
        liveness
            .interval_ms
            .store(cfg.heartbeat_interval_ms, Ordering::Relaxed);
        let now = Instant::now();
        let leader_since = match term {
            Some((t, since)) if t == current_term && !paused => since,
            _ => {
                tracing::info!(
                    term = current_term,
                    grace_ms = cfg.leader_grace_ms,
                    paused,
                    "leading: node liveness clocks start now"
                );
                liveness.lock().clear();
                term = Some((current_term, now));
                last_reload = now - RELOAD_EVERY;
                now
            }
        };
        if now.duration_since(last_reload) >= RELOAD_EVERY {
            match handle.reader().nodes() {
                Ok(nodes) => {
                    committed = nodes.into_iter().map(|n| (n.id.clone(), n)).collect();
                    last_reload = now;
                    let mut counts: HashMap<&'static str, i64> = HashMap::new();
                    for n in committed.values() {
                        *counts.entry(n.phase.as_str()).or_default() += 1;
                    }
                    for p in [
                        NodePhase::Pending,
                        NodePhase::Ready,
                        NodePhase::Suspect,
                        NodePhase::Down,
                    ] {
                        liveness
                            .metrics
                            .nodes
                            .get_or_create(&PhaseLabel { phase: p.as_str() })
                            .set(counts.get(p.as_str()).copied().unwrap_or(0));
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read node records");
                    continue;
                }
            }
        }
        let updates = collect_updates(
            &handle,
            &liveness,
            &mut committed,
            &mut reliability_checked,
            now,
            now.duration_since(leader_since),
            &cfg,
        );
        if updates.is_empty() {
            continue;
        }
        // Parts bounded by count and by bytes (a status carries labels), so
        // each fits one Raft entry and a fleet-wide change never wedges.
        let parts = crate::proposer::split_by_size(updates, UPDATES_PER_ENTRY, handle.part_bytes());
        for chunk in &parts {
            let command = Command::UpdateNodes {
                updates: chunk.to_vec(),
            };
            match handle.write(None, command).await {
                Ok(_) => {
                    let held_before: HashMap<&str, Vec<&'static str>> = chunk
                        .iter()
                        .filter(|u| u.status.is_some())
                        .filter_map(|u| {
                            let n = committed.get(&u.node_id)?;
                            Some((u.node_id.as_str(), n.placement_capacity().1))
                        })
                        .collect();
                    let mut events: Vec<cloudless_types::EventRecord> = chunk
                        .iter()
                        .filter_map(|u| {
                            let phase = u.phase?;
                            let name = committed
                                .get(&u.node_id)
                                .map_or_else(|| u.node_id.clone(), |n| n.name.clone());
                            Some(cloudless_types::EventRecord {
                                at_ms: 0,
                                kind: "Node".into(),
                                namespace: String::new(),
                                object: name,
                                reason: format!("Node{}", phase.as_str()),
                                message: format!("node {} is {}", u.node_id, phase.as_str()),
                            })
                        })
                        .collect();
                    for u in chunk {
                        refresh(&handle, &liveness, &mut committed, &u.node_id, u);
                    }
                    events.extend(chunk.iter().filter_map(|u| {
                        let before = held_before.get(u.node_id.as_str())?;
                        capacity_event(committed.get(&u.node_id)?, before)
                    }));
                    if !events.is_empty() {
                        if let Err(e) = handle.write(None, Command::RecordEvents { events }).await {
                            tracing::warn!(error = %e, "cannot record node events");
                        }
                    }
                    for u in chunk {
                        if let Some(phase) = u.phase {
                            liveness
                                .metrics
                                .phase_changes
                                .get_or_create(&PhaseLabel {
                                    phase: phase.as_str(),
                                })
                                .inc();
                            tracing::info!(node_id = %u.node_id, phase = phase.as_str(), "node phase changed");
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot commit node updates; retrying");
                    break;
                }
            }
        }
    }
}

/// The event for a node whose reported capacity newly grew beyond what
/// placement trusts (`held_before`: the resources held before the update).
fn capacity_event(
    n: &NodeRecord,
    held_before: &[&'static str],
) -> Option<cloudless_types::EventRecord> {
    let (trusted, held) = n.placement_capacity();
    if held.is_empty() || held == held_before {
        return None;
    }
    tracing::warn!(node_id = %n.id, resources = ?held, reported = ?n.status.capacity, "node capacity jump held back from placement");
    Some(cloudless_types::EventRecord {
        at_ms: 0,
        kind: "Node".into(),
        namespace: String::new(),
        object: n.name.clone(),
        reason: "NodeCapacityUnverified".into(),
        message: format!(
            "node {} reports {} beyond {}x its trusted capacity; placement keeps using {:?} until an admin runs `cloudlessctl node accept-capacity {}`",
            n.id,
            held.join(", "),
            cloudless_types::GROWTH_FACTOR,
            trusted,
            n.id
        ),
    })
}

/// Re-reads one node after a commit and tells the liveness table what is now committed.
fn refresh(
    handle: &CoordinatorHandle,
    liveness: &Liveness,
    committed: &mut HashMap<String, NodeRecord>,
    node_id: &str,
    u: &NodeUpdate,
) {
    match handle.reader().node(node_id) {
        Ok(Some(n)) => {
            if let Some(live) = liveness.lock().get_mut(node_id) {
                live.committed_phase = Some(n.phase);
                if u.status.as_ref() == Some(&live.status) {
                    live.status_committed = true;
                }
            }
            committed.insert(node_id.to_owned(), n);
        }
        Ok(None) => {
            committed.remove(node_id);
            liveness.forget(node_id);
        }
        Err(e) => tracing::warn!(error = %e, node_id, "cannot read node record"),
    }
}

fn collect_updates(
    handle: &CoordinatorHandle,
    liveness: &Liveness,
    committed: &mut HashMap<String, NodeRecord>,
    reliability_checked: &mut HashMap<String, Instant>,
    now: Instant,
    leading_for: Duration,
    cfg: &ClusterConfig,
) -> Vec<NodeUpdate> {
    let wall = now_ms();
    let interval = Duration::from_millis(cfg.heartbeat_interval_ms);
    // Nodes heard from for the first time this term; those enrolled since the
    // last full reload are read now.
    let fresh = std::mem::take(
        &mut *liveness
            .fresh
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    let mut live = liveness.lock();
    for id in fresh {
        if committed.contains_key(&id) {
            continue;
        }
        match handle.reader().node(&id) {
            Ok(Some(n)) => {
                committed.insert(id, n);
            }
            Ok(None) => {
                live.remove(&id);
            }
            Err(_) => {}
        }
    }
    let mut updates = Vec::new();
    for n in committed.values() {
        let entry = live.get_mut(&n.id);
        let (silence, heard) = match &entry {
            Some(l) => (now.duration_since(l.last_seen), true),
            None => {
                // Not heard this term: silent since this leader took over, or
                // since the node enrolled or changed phase if that is later.
                let since = n.enrolled_at_ms.max(n.phase_since_ms);
                let wall_silence = Duration::from_millis(u64::try_from(wall - since).unwrap_or(0));
                (leading_for.min(wall_silence), false)
            }
        };
        let phase = next_phase(n.phase, silence, heard, leading_for, cfg);
        let mut update = NodeUpdate {
            node_id: n.id.clone(),
            phase: (phase != n.phase).then_some(phase),
            last_heartbeat_ms: n.last_heartbeat_ms,
            reliability: None,
            status: None,
        };
        let mut ratio = None;
        if let Some(l) = entry {
            l.committed_phase = Some(n.phase);
            update.last_heartbeat_ms = l.last_seen_ms;
            if !l.status_committed && l.status != n.status {
                update.status = Some(l.status.clone());
            } else {
                l.status_committed = true;
            }
            let window = now.duration_since(l.window_start);
            if window >= HEARTBEAT_WINDOW {
                let expected = window.as_secs_f64() / interval.as_secs_f64();
                l.last_ratio = Some((f64::from(l.received) / expected).min(1.0));
                l.received = 0;
                l.window_start = now;
            }
            ratio = l.last_ratio;
        }
        let due = reliability_checked
            .get(&n.id)
            .is_none_or(|at| now.duration_since(*at) >= RELIABILITY_EVERY);
        if due {
            // At most once per period per node, committed or not: this loop
            // runs every tick over every node.
            reliability_checked.insert(n.id.clone(), now);
            let r = reliability(n, wall, ratio);
            if (r - n.reliability).abs() >= RELIABILITY_STEP {
                update.reliability = Some(r);
            }
        }
        if update.phase.is_some() || update.status.is_some() || update.reliability.is_some() {
            updates.push(update);
        }
    }
    updates
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ClusterConfig {
        ClusterConfig::default()
    }

    const S: fn(u64) -> Duration = Duration::from_secs;
    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn phases_follow_silence() {
        let c = cfg();
        // Heard 500 ms ago: Ready, whatever it was.
        for p in [
            NodePhase::Pending,
            NodePhase::Suspect,
            NodePhase::Down,
            NodePhase::Ready,
        ] {
            assert_eq!(next_phase(p, MS(500), true, S(60), &c), NodePhase::Ready);
        }
        // Three missed 1 s heartbeats: Suspect.
        assert_eq!(
            next_phase(NodePhase::Ready, MS(3000), true, S(60), &c),
            NodePhase::Suspect
        );
        assert_eq!(
            next_phase(NodePhase::Ready, MS(2900), true, S(60), &c),
            NodePhase::Ready
        );
        // 5 s: Down.
        assert_eq!(
            next_phase(NodePhase::Suspect, MS(5000), true, S(60), &c),
            NodePhase::Down
        );
        // A Pending node that never heartbeats goes Down, not Suspect.
        assert_eq!(
            next_phase(NodePhase::Pending, MS(3500), false, S(60), &c),
            NodePhase::Pending
        );
        assert_eq!(
            next_phase(NodePhase::Pending, MS(6000), false, S(60), &c),
            NodePhase::Down
        );
    }

    #[test]
    fn no_node_goes_down_during_the_leader_grace_period() {
        let c = cfg();
        // A new leader has heard nothing for 6 s but has led for only 6 s.
        assert_eq!(
            next_phase(NodePhase::Ready, S(6), false, S(6), &c),
            NodePhase::Suspect
        );
        assert_eq!(
            next_phase(NodePhase::Suspect, S(9), false, S(9), &c),
            NodePhase::Suspect
        );
        assert_eq!(
            next_phase(NodePhase::Suspect, S(10), false, S(10), &c),
            NodePhase::Down
        );
    }

    #[test]
    fn reliability_rewards_uptime_and_regular_heartbeats() {
        let hour = 3_600_000;
        let mut n = NodeRecord::new("n1".into(), "a".into(), "t".into(), 0);
        n.enrolled_at_ms = 0;
        n.phase = NodePhase::Ready;
        n.phase_since_ms = 0;
        // A node Ready for all of its 24 h.
        let always = reliability(&n, 24 * hour, Some(1.0));
        assert!(always > 0.99, "{always}");
        // Down for the last 12 of them.
        n.phase = NodePhase::Down;
        n.ready_ms = 12 * hour as u64;
        n.phase_since_ms = 12 * hour;
        let half = reliability(&n, 24 * hour, Some(1.0));
        assert!((0.5..0.7).contains(&half), "{half}");
        // Irregular heartbeats cost too.
        n.phase = NodePhase::Ready;
        n.ready_ms = 0;
        n.phase_since_ms = 0;
        let flaky = reliability(&n, 24 * hour, Some(0.5));
        assert!(flaky < always - 0.1, "{flaky} vs {always}");
        // A brand-new node starts at the prior, not at 0 or 1.
        let fresh = reliability(&n, 0, None);
        assert!((fresh - 0.8).abs() < 1e-9, "{fresh}");
    }
}
