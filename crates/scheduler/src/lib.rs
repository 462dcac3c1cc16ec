//! Cloudless placement: a pure library. Given a [`ClusterSnapshot`] and a
//! [`WorkloadRequest`], [`ClusterSnapshot::place`] filters nodes, scores the
//! feasible ones and reserves resources on the chosen node, so the next
//! replica in the same call sees the reservation. No I/O, no clock reads: the
//! caller passes `now_ms`.
//!
//! Cost per decision is bounded: like Kubernetes' `percentageOfNodesToScore`,
//! at most [`ClusterSnapshot::score_limit`] feasible nodes are scored per
//! replica, scanning from where the previous decision stopped; zone spread
//! scans zone by zone through a per-zone index.

mod compiled;
mod explain;
mod filter;
mod input;
mod place;
mod score;
mod snapshot;

/// The domain's node phase, power source and port protocol, used as they are.
pub use cloudless_types::{NodePhase, PowerSource, Protocol};
pub use explain::{CandidateScore, Decision, Placement, Unplaced};
pub use filter::{FilterReason, Filtered};
pub use input::{
    AntiAffinity, MatchExpression, NodeInfo, Operator, PreferredTerm, RunningReplica, Strategy,
    Taint, TaintEffect, Toleration, TolerationOperator, WorkloadRequest,
};
pub use place::NodeVerdict;
pub use snapshot::{ClusterSnapshot, SchedulerError};
