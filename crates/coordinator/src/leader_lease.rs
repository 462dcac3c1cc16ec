//! A leader lease for reads served from local state (many-use secret tokens).
//!
//! openraft 0.9 has no check-quorum: a leader cut off from its followers
//! keeps calling itself Leader until it hears a higher term, while the
//! others elect a new leader and go on (revoking tokens, deleting secrets).
//! Reads answered from the old leader's memory would honour that stale state.
//!
//! The lease: a successful `ensure_linearizable` that *started* at `t` proves
//! a quorum acknowledged this leader at or after `t`. Followers refuse to
//! vote for `election_timeout_max` after hearing from their leader (openraft's
//! follower-side leader lease), so no other leader can exist before
//! `t + election_timeout_min`. Local reads are served until
//! `t + election_timeout_min / 2` (half, to absorb clock-rate differences and
//! scheduling delays); past that the next read renews the lease first, and a
//! leader that cannot renew refuses with `NotLeader` (UNAVAILABLE to the
//! client). One renewal is shared by every concurrent read, and a read in the
//! second half of the lease starts a renewal in the background, so a busy
//! leader never waits for one.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::ServerState;

use crate::error::CoordinatorError;
use crate::handle::CoordinatorHandle;

/// One confirmed lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Lease {
    /// The term it was confirmed in.
    term: u64,
    /// Local reads are allowed before this instant.
    valid_until: Instant,
    /// A read after this instant renews in the background.
    renew_after: Instant,
}

/// What a read may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Serve from local state.
    Valid,
    /// Serve from local state and renew in the background.
    ValidRenewSoon,
    /// Renew (or refuse) first.
    Expired,
}

/// The pure rule: a lease is good only in the term it was confirmed in,
/// while this coordinator still leads, and before it runs out.
fn verdict(lease: Option<Lease>, leading: bool, term: u64, now: Instant) -> Verdict {
    match lease {
        Some(l) if leading && l.term == term && now < l.valid_until => {
            if now < l.renew_after {
                Verdict::Valid
            } else {
                Verdict::ValidRenewSoon
            }
        }
        _ => Verdict::Expired,
    }
}

/// The lease shared by every read on this coordinator (cheap to clone).
#[derive(Debug, Clone)]
pub(crate) struct LeaderLease {
    duration: Duration,
    lease: Arc<Mutex<Option<Lease>>>,
    /// Held while a renewal runs (single flight).
    renewing: Arc<tokio::sync::Mutex<()>>,
}

impl LeaderLease {
    /// A lease of half of `election_timeout_min`.
    pub(crate) fn new(election_timeout_min: Duration) -> Self {
        Self {
            duration: election_timeout_min / 2,
            lease: Arc::default(),
            renewing: Arc::default(),
        }
    }

    fn verdict_now(&self, handle: &CoordinatorHandle) -> Verdict {
        let (leading, term) = {
            let m = handle.raft().metrics();
            let m = m.borrow();
            (m.state == ServerState::Leader, m.current_term)
        };
        let lease = *self
            .lease
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        verdict(lease, leading, term, Instant::now())
    }

    /// `Ok` when this coordinator may answer a read from its local state:
    /// it holds a lease, or renewed one just now.
    pub(crate) async fn ensure(&self, handle: &CoordinatorHandle) -> Result<(), CoordinatorError> {
        match self.verdict_now(handle) {
            Verdict::Valid => Ok(()),
            Verdict::ValidRenewSoon => {
                if let Ok(guard) = self.renewing.clone().try_lock_owned() {
                    let (this, handle) = (self.clone(), handle.clone());
                    tokio::spawn(async move {
                        let _guard = guard;
                        if let Err(e) = this.renew(&handle).await {
                            tracing::debug!(error = %e, "leader lease not renewed");
                        }
                    });
                }
                Ok(())
            }
            Verdict::Expired => {
                let _guard = self.renewing.lock().await;
                if self.verdict_now(handle) != Verdict::Expired {
                    return Ok(());
                }
                self.renew(handle).await
            }
        }
    }

    /// Confirms leadership with a quorum and extends the lease from the
    /// moment the confirmation started.
    async fn renew(&self, handle: &CoordinatorHandle) -> Result<(), CoordinatorError> {
        let start = Instant::now();
        let term = handle.raft().metrics().borrow().current_term;
        let confirmed = handle.read_barrier(None).await;
        let mut lease = self
            .lease
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match confirmed {
            Ok(()) => {
                *lease = Some(Lease {
                    term,
                    valid_until: start + self.duration,
                    renew_after: start + self.duration / 2,
                });
                Ok(())
            }
            Err(e) => {
                *lease = None;
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(at: Instant, term: u64) -> Lease {
        Lease {
            term,
            valid_until: at + Duration::from_millis(100),
            renew_after: at + Duration::from_millis(50),
        }
    }

    #[test]
    fn a_fresh_lease_in_the_same_term_serves_local_reads() {
        let t0 = Instant::now();
        let l = Some(lease(t0, 3));
        assert_eq!(verdict(l, true, 3, t0), Verdict::Valid);
        assert_eq!(
            verdict(l, true, 3, t0 + Duration::from_millis(60)),
            Verdict::ValidRenewSoon
        );
    }

    #[test]
    fn an_old_lease_a_new_term_or_lost_leadership_needs_a_quorum_first() {
        let t0 = Instant::now();
        let l = Some(lease(t0, 3));
        assert_eq!(
            verdict(l, true, 3, t0 + Duration::from_millis(100)),
            Verdict::Expired
        );
        assert_eq!(verdict(l, true, 4, t0), Verdict::Expired);
        assert_eq!(verdict(l, false, 3, t0), Verdict::Expired);
        assert_eq!(verdict(None, true, 3, t0), Verdict::Expired);
    }
}
