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
    /// Time to build a snapshot.
    pub snapshot_seconds: Histogram,
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
            snapshot_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
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
        r.register_with_unit(
            "snapshot",
            "Time to build a snapshot of the state",
            prometheus_client::registry::Unit::Seconds,
            m.snapshot_seconds.clone(),
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
    datagrams_relayed: prometheus_client::metrics::counter::Counter,
    datagrams_dropped: prometheus_client::metrics::counter::Counter,
}

impl RelayMetrics {
    pub(crate) fn register(registry: &mut Registry, overlay: cloudless_overlay::Overlay) -> Self {
        let m = RelayMetrics {
            overlay,
            relayed: Default::default(),
            refused: Default::default(),
            accepted: Default::default(),
            peers: Default::default(),
            datagrams_relayed: Default::default(),
            datagrams_dropped: Default::default(),
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
        r.register(
            "udp_datagrams_relayed",
            "UDP flows' QUIC datagrams this coordinator forwarded between two nodes",
            m.datagrams_relayed.clone(),
        );
        r.register(
            "udp_datagrams_dropped",
            "UDP flows' QUIC datagrams this coordinator received and did not forward (no such flow, malformed, the flow's queue full, too large for the next node's packets, or that connection's datagram queue full, or half full and the flow above its share)",
            m.datagrams_dropped.clone(),
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
            m.datagrams_relayed
                .inc_by(now.datagrams_relayed.saturating_sub(last.datagrams_relayed));
            let dropped =
                |s: &cloudless_overlay::OverlayStats| s.datagrams_dropped + s.datagrams_queue_full;
            m.datagrams_dropped
                .inc_by(dropped(&now).saturating_sub(dropped(&last)));
            last = now;
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = cancel.cancelled() => return,
            }
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub(crate) struct ReasonLabel {
    pub(crate) reason: &'static str,
}

const SECRET_REFUSALS: [&str; 7] = [
    "not_found",
    "permission_denied",
    "unauthenticated",
    "invalid_argument",
    "failed_precondition",
    "resource_exhausted",
    "other",
];

const JOIN_REFUSALS: [&str; 5] = ["invalid", "unknown", "revoked", "expired", "used_up"];

/// Counters of the secrets and enrollment APIs (docs/metrics.md).
#[derive(Debug, Clone, Default)]
pub(crate) struct ApiMetrics {
    pub(crate) secret_reads: Counter,
    pub(crate) secret_mints: Counter,
    pub(crate) secret_refusals: prometheus_client::metrics::family::Family<ReasonLabel, Counter>,
    pub(crate) join_tokens_used: Counter,
    pub(crate) join_tokens_refused:
        prometheus_client::metrics::family::Family<ReasonLabel, Counter>,
}

impl ApiMetrics {
    pub(crate) fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        // Every reason is exported from the start, at 0.
        for reason in SECRET_REFUSALS {
            let _ = m.secret_refusals.get_or_create(&ReasonLabel { reason });
        }
        for reason in JOIN_REFUSALS {
            let _ = m.join_tokens_refused.get_or_create(&ReasonLabel { reason });
        }
        let r = registry.sub_registry_with_prefix("cloudless");
        r.register(
            "secrets_reads",
            "Secret values revealed to a caller",
            m.secret_reads.clone(),
        );
        r.register(
            "secrets_mints",
            "Secret access tokens issued",
            m.secret_mints.clone(),
        );
        r.register(
            "secrets_refusals",
            "Secret calls refused, by the status code the caller got",
            m.secret_refusals.clone(),
        );
        r.register(
            "join_tokens_used",
            "Enrollments that used a join token",
            m.join_tokens_used.clone(),
        );
        r.register(
            "join_tokens_refused",
            "Enrollments refused for their join token, by reason (invalid, unknown, revoked, expired, used_up)",
            m.join_tokens_refused.clone(),
        );
        m
    }

    /// Counts a refused secret call by its status code.
    pub(crate) fn secret_refused(&self, code: tonic::Code) {
        let reason = match code {
            tonic::Code::NotFound => "not_found",
            tonic::Code::PermissionDenied => "permission_denied",
            tonic::Code::Unauthenticated => "unauthenticated",
            tonic::Code::InvalidArgument => "invalid_argument",
            tonic::Code::FailedPrecondition => "failed_precondition",
            tonic::Code::ResourceExhausted => "resource_exhausted",
            _ => "other",
        };
        self.secret_refusals
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Counts a join token refused for `reason`.
    pub(crate) fn join_refused(&self, reason: &'static str) {
        self.join_tokens_refused
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }
}
