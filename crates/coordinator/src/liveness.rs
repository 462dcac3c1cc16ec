//! The leader's in-memory view of node liveness: what it heard from each
//! node this term, the phase rules and the reliability score. Shared by the
//! heartbeat handler (through the handle) and the membership loop; imports
//! neither.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cloudless_types::{ClusterConfig, NodePhase, NodeRecord, NodeStatus, Resources};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::Notify;

use crate::clock::now_ms;

/// What the leader heard from one node during its current term.
#[derive(Debug, Clone)]
pub(crate) struct Live {
    pub(crate) last_seen: Instant,
    pub(crate) last_seen_ms: i64,
    pub(crate) status: NodeStatus,
    pub(crate) usage: Resources,
    /// Heartbeats in the current window, and when it began.
    pub(crate) received: u32,
    pub(crate) window_start: Instant,
    /// The ratio of heartbeats received to expected over the last full window.
    pub(crate) last_ratio: Option<f64>,
    /// The phase and status as last committed (known to the worker).
    pub(crate) committed_phase: Option<NodePhase>,
    pub(crate) status_committed: bool,
}

/// In-memory liveness, shared by the heartbeat handler and the worker.
#[derive(Debug)]
pub(crate) struct Liveness {
    pub(crate) nodes: Mutex<HashMap<String, Live>>,
    /// Nodes first heard from since the worker last looked.
    pub(crate) fresh: Mutex<Vec<String>>,
    pub(crate) wake: Notify,
    pub(crate) interval_ms: AtomicU64,
    pub(crate) metrics: MembershipMetrics,
}

/// Prometheus metrics of the membership loop (docs/metrics.md).
#[derive(Debug, Clone, Default)]
pub(crate) struct MembershipMetrics {
    pub(crate) heartbeats: Counter,
    pub(crate) phase_changes: Family<PhaseLabel, Counter>,
    pub(crate) nodes: Family<PhaseLabel, Gauge>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub(crate) struct PhaseLabel {
    pub(crate) phase: &'static str,
}

impl MembershipMetrics {
    pub(crate) fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        // Every phase is exported from the start, at 0 (on followers too).
        for (phase, _) in <NodePhase as cloudless_types::ClosedSet>::NAMES {
            let _ = m.phase_changes.get_or_create(&PhaseLabel { phase });
            let _ = m.nodes.get_or_create(&PhaseLabel { phase });
        }
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

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Live>> {
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

    pub(crate) fn forget(&self, node_id: &str) {
        self.lock().remove(node_id);
    }
}

/// The phase a node should be in now.
pub(crate) fn next_phase(
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
