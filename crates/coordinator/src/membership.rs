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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cloudless_state::{Command, NodeUpdate};
use cloudless_types::{ClusterConfig, NodePhase, NodeRecord, NodeStatus, Resources};
use openraft::ServerState;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;
use crate::handle::CoordinatorHandle;

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

/// What the leader heard from one node during its current term.
#[derive(Debug, Clone)]
struct Live {
    last_seen: Instant,
    last_seen_ms: i64,
    status: NodeStatus,
    usage: Resources,
    /// Heartbeats in the current window, and when it began.
    received: u32,
    window_start: Instant,
    /// The ratio of heartbeats received to expected over the last full window.
    last_ratio: Option<f64>,
    /// The phase and status as last committed (known to the worker).
    committed_phase: Option<NodePhase>,
    status_committed: bool,
}

/// In-memory liveness, shared by the heartbeat handler and the worker.
#[derive(Debug)]
pub(crate) struct Liveness {
    nodes: Mutex<HashMap<String, Live>>,
    /// Nodes first heard from since the worker last looked.
    fresh: Mutex<Vec<String>>,
    wake: Notify,
    interval_ms: AtomicU64,
    metrics: MembershipMetrics,
}

/// Prometheus metrics of the membership loop (docs/metrics.md).
#[derive(Debug, Clone, Default)]
pub(crate) struct MembershipMetrics {
    heartbeats: Counter,
    phase_changes: Family<PhaseLabel, Counter>,
    nodes: Family<PhaseLabel, Gauge>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct PhaseLabel {
    phase: &'static str,
}

impl MembershipMetrics {
    pub(crate) fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("cloudless_membership");
        r.register(
            "heartbeats",
            "Heartbeats accepted by this coordinator as leader",
            m.heartbeats.clone(),
        );
        r.register(
            "phase_changes",
            "Node phase changes committed by this coordinator, by new phase",
            m.phase_changes.clone(),
        );
        r.register(
            "nodes",
            "Nodes by committed phase (on the leader)",
            m.nodes.clone(),
        );
        m
    }
}

/// The reply to one heartbeat.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HeartbeatAnswer {
    pub interval_ms: u64,
    pub phase: Option<NodePhase>,
}

impl Liveness {
    pub(crate) fn new(metrics: MembershipMetrics) -> Self {
        Self {
            nodes: Mutex::new(HashMap::new()),
            fresh: Mutex::new(Vec::new()),
            wake: Notify::new(),
            interval_ms: AtomicU64::new(ClusterConfig::default().heartbeat_interval_ms),
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Live>> {
        self.nodes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records a heartbeat from `node_id` (already authenticated, enrolled,
    /// and this coordinator the leader). A changed status is committed
    /// through Raft, so it is taken only when `admit_change` allows (the
    /// node's write rate); otherwise the beat counts and the change waits for
    /// a later beat.
    pub(crate) fn heartbeat(
        &self,
        node_id: &str,
        status: NodeStatus,
        usage: Resources,
        admit_change: impl FnOnce() -> bool,
    ) -> HeartbeatAnswer {
        let now = Instant::now();
        let mut wake = false;
        let phase = {
            let mut nodes = self.lock();
            let live = nodes.entry(node_id.to_owned()).or_insert_with(|| {
                wake = true;
                Live {
                    last_seen: now,
                    last_seen_ms: 0,
                    status: status.clone(),
                    usage: Resources::default(),
                    received: 0,
                    window_start: now,
                    last_ratio: None,
                    committed_phase: None,
                    status_committed: false,
                }
            });
            live.last_seen = now;
            live.last_seen_ms = now_ms();
            live.received = live.received.saturating_add(1);
            live.usage = usage;
            if live.status != status && admit_change() {
                live.status = status;
                live.status_committed = false;
                wake = true;
            }
            if live.committed_phase != Some(NodePhase::Ready) {
                wake = true;
            }
            live.committed_phase
        };
        self.metrics.heartbeats.inc();
        if phase.is_none() {
            self.fresh
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(node_id.to_owned());
        }
        if wake {
            self.wake.notify_one();
        }
        HeartbeatAnswer {
            interval_ms: self.interval_ms.load(Ordering::Relaxed),
            phase,
        }
    }

    /// Last reported usage and heartbeat time of `node_id`, if heard from this term.
    pub(crate) fn live_view(&self, node_id: &str) -> Option<(Resources, i64)> {
        self.lock().get(node_id).map(|l| (l.usage, l.last_seen_ms))
    }

    fn forget(&self, node_id: &str) {
        self.lock().remove(node_id);
    }
}

/// The phase a node should be in now.
fn next_phase(
    current: NodePhase,
    silence: Duration,
    heard_this_term: bool,
    leading_for: Duration,
    cfg: &ClusterConfig,
) -> NodePhase {
    let suspect_after = Duration::from_millis(
        cfg.heartbeat_interval_ms
            .saturating_mul(u64::from(cfg.suspect_after_missed_heartbeats)),
    );
    let down_after = Duration::from_millis(cfg.down_after_ms);
    let grace = Duration::from_millis(cfg.leader_grace_ms);
    if heard_this_term && silence < suspect_after.min(down_after) {
        return NodePhase::Ready;
    }
    if silence >= down_after && leading_for >= grace {
        return NodePhase::Down;
    }
    if current == NodePhase::Ready && silence >= suspect_after {
        return NodePhase::Suspect;
    }
    current
}

/// Reliability in [0, 1]: mostly the share of its enrolled life the node
/// spent Ready (smoothed towards 0.8 with one hour of prior, so a new node is
/// neither trusted nor punished), plus how regularly it heartbeats.
pub(crate) fn reliability(n: &NodeRecord, now_ms: i64, heartbeat_ratio: Option<f64>) -> f64 {
    const PRIOR: f64 = 0.8;
    const PRIOR_MS: f64 = 3_600_000.0;
    let age = (now_ms - n.enrolled_at_ms).max(0) as f64;
    let mut ready = n.ready_ms as f64;
    if n.phase == NodePhase::Ready {
        ready += (now_ms - n.phase_since_ms).max(0) as f64;
    }
    let uptime = ((ready.min(age) + PRIOR * PRIOR_MS) / (age + PRIOR_MS)).clamp(0.0, 1.0);
    let score = match heartbeat_ratio {
        Some(r) => 0.7 * uptime + 0.3 * r.clamp(0.0, 1.0),
        None => uptime,
    };
    (score * 1000.0).round() / 1000.0
}

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
