//! What the scheduler decided, in terms a person can read.

use std::fmt;

use crate::filter::FilterReason;

/// One replica's outcome.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Placed on a node.
    Placed(Placement),
    /// No node could take it.
    Unplaced(Unplaced),
}

/// Where a replica went and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    /// Index of the replica within the request.
    pub replica: u32,
    /// Chosen node.
    pub node: String,
    /// Its score, 0-100.
    pub score: f64,
    /// Replicas evicted to make room (empty unless preemption was needed).
    pub preempted: Vec<String>,
    /// Best candidates with their factor scores, best first (only when explaining).
    pub candidates: Vec<CandidateScore>,
}

/// One candidate node's factor scores (each 0-1) and total (0-100).
#[derive(Debug, Clone, PartialEq)]
pub struct CandidateScore {
    /// Node.
    pub node: String,
    /// Total score.
    pub total: f64,
    /// Locality factor.
    pub locality: f64,
    /// Reliability factor.
    pub reliability: f64,
    /// Cost factor (cheaper is higher).
    pub cost: f64,
    /// Utilization factor (binpack: fuller is higher; spread: emptier is higher).
    pub utilization: f64,
    /// Network penalty (subtracted).
    pub network_penalty: f64,
    /// Points from preferred affinity, battery and PreferNoSchedule taints.
    pub adjustment: f64,
}

/// Why a replica could not be placed.
#[derive(Debug, Clone, PartialEq)]
pub struct Unplaced {
    /// Index of the replica within the request.
    pub replica: u32,
    /// Nodes removed per reason, most common first, with a readable reason.
    pub reasons: Vec<(FilterReason, u32, String)>,
}

impl fmt::Display for Unplaced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (_, n, why)) in self.reasons.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            if *n == 0 {
                f.write_str(why)?;
            } else {
                write!(f, "{n} node{}: {why}", if *n == 1 { "" } else { "s" })?;
            }
        }
        Ok(())
    }
}

impl fmt::Display for CandidateScore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {:.1} (locality {:.2}, reliability {:.2}, cost {:.2}, utilization {:.2}, network penalty {:.2}, adjustment {:+.1})",
            self.node, self.total, self.locality, self.reliability, self.cost, self.utilization, self.network_penalty, self.adjustment
        )
    }
}
