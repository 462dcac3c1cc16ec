//! Raft metrics for Prometheus, fed from openraft's metrics watch, and the
//! overlay relay's, copied from its endpoint.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cloudless_state::Raft;
use openraft::ServerState;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// The coordinator's Raft metrics (listed in docs/metrics.md).
#[derive(Debug, Clone)]
pub struct RaftMetrics {
    term: Gauge,
    leader: Gauge,
    is_leader: Gauge,
    last_log_index: Gauge,
    commit_index: Gauge,
    applied_index: Gauge,
    snapshot_index: Gauge,
    voters: Gauge,
    leader_changes: Counter,
    /// Time to apply one batch of committed entries to the state machine.
    pub apply_latency: Histogram,
}

impl RaftMetrics {
    /// Registers every metric in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            term: Gauge::default(),
            leader: Gauge::default(),
            is_leader: Gauge::default(),
            last_log_index: Gauge::default(),
            commit_index: Gauge::default(),
            applied_index: Gauge::default(),
            snapshot_index: Gauge::default(),
            voters: Gauge::default(),
            leader_changes: Counter::default(),
            apply_latency: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
        };
        let r = registry.sub_registry_with_prefix("cloudless_raft");
        r.register("term", "Current Raft term", m.term.clone());
        r.register(
            "leader_id",
            "Node id of the known leader (0 if none)",
            m.leader.clone(),
        );
        r.register(
            "is_leader",
            "1 if this coordinator is the leader",
            m.is_leader.clone(),
        );
        r.register(
            "last_log_index",
            "Index of the last entry in the local log",
            m.last_log_index.clone(),
        );
        r.register(
            "commit_index",
            "Highest index known to be committed",
            m.commit_index.clone(),
        );
        r.register(
            "applied_index",
            "Highest index applied to the state machine",
            m.applied_index.clone(),
        );
        r.register(
            "snapshot_index",
            "Last index included in the current snapshot",
            m.snapshot_index.clone(),
        );
        r.register(
            "voters",
            "Voting members in the current configuration",
            m.voters.clone(),
        );
        r.register(
            "leader_changes",
            "Times the known leader changed",
            m.leader_changes.clone(),
        );
        r.register_with_unit(
            "apply_latency",
            "Time to apply a batch of committed entries",
            prometheus_client::registry::Unit::Seconds,
            m.apply_latency.clone(),
        );
        m
    }

    /// Follows `raft`'s metrics until `cancel` fires.
    pub async fn run(self, raft: Raft, committed: Arc<AtomicU64>, cancel: CancellationToken) {
        let mut rx = raft.metrics();
        let mut last_leader = None;
        loop {
            {
                let m = rx.borrow_and_update();
                self.term.set(m.current_term as i64);
                self.leader.set(m.current_leader.unwrap_or(0) as i64);
                self.is_leader
                    .set(i64::from(m.state == ServerState::Leader));
                self.last_log_index
                    .set(m.last_log_index.unwrap_or(0) as i64);
                self.applied_index
                    .set(m.last_applied.map_or(0, |l| l.index) as i64);
                self.snapshot_index
                    .set(m.snapshot.map_or(0, |l| l.index) as i64);
                self.commit_index
                    .set(committed.load(Ordering::Relaxed) as i64);
                self.voters
                    .set(m.membership_config.membership().voter_ids().count() as i64);
                if m.current_leader != last_leader {
                    if m.current_leader.is_some() {
                        self.leader_changes.inc();
                    }
                    last_leader = m.current_leader;
                }
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                changed = rx.changed() => if changed.is_err() { return },
            }
        }
    }
}

/// Prometheus counters of the overlay relay (docs/metrics.md), copied from
/// the endpoint's own counters every second.
pub(crate) struct RelayMetrics {
    overlay: cloudless_overlay::Overlay,
    relayed: prometheus_client::metrics::counter::Counter,
    refused: prometheus_client::metrics::counter::Counter,
    accepted: prometheus_client::metrics::counter::Counter,
    peers: prometheus_client::metrics::gauge::Gauge,
}

impl RelayMetrics {
    pub(crate) fn register(registry: &mut Registry, overlay: cloudless_overlay::Overlay) -> Self {
        let m = RelayMetrics {
            overlay,
            relayed: Default::default(),
            refused: Default::default(),
            accepted: Default::default(),
            peers: Default::default(),
        };
        let r = registry.sub_registry_with_prefix("cloudless_overlay");
        r.register(
            "streams_relayed",
            "Streams this coordinator relayed between two nodes",
            m.relayed.clone(),
        );
        r.register(
            "streams_refused",
            "Overlay streams refused (bad request, unreachable node)",
            m.refused.clone(),
        );
        r.register(
            "connections_accepted",
            "Overlay connections accepted after the certificate check",
            m.accepted.clone(),
        );
        r.register(
            "connected_peers",
            "Nodes with a live overlay connection to this relay",
            m.peers.clone(),
        );
        m
    }

    pub(crate) async fn run(metrics: Option<Self>, cancel: CancellationToken) {
        let Some(m) = metrics else { return };
        let mut last = cloudless_overlay::OverlayStats::default();
        loop {
            let now = m.overlay.stats();
            m.relayed
                .inc_by(now.streams_relayed.saturating_sub(last.streams_relayed));
            m.refused
                .inc_by(now.streams_refused.saturating_sub(last.streams_refused));
            m.accepted.inc_by(
                now.connections_accepted
                    .saturating_sub(last.connections_accepted),
            );
            m.peers
                .set(i64::try_from(m.overlay.connected_peers().len()).unwrap_or(i64::MAX));
            last = now;
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = cancel.cancelled() => return,
            }
        }
    }
}
