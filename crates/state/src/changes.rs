//! Change signals: counters the state machine bumps after a commit, so that
//! caches and watches holding a [`crate::StateReader`] know when to look
//! again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::command::{ProposalResult, Response};

/// The counters, shared by the state machine and every reader.
#[derive(Clone)]
pub(crate) struct Changes {
    /// Bumped after every commit that removed a node (and every snapshot install).
    removals: Arc<AtomicU64>,
    /// Bumped after every commit that changed a secret, the keyring or a
    /// token's revocation (and every snapshot install).
    secrets: Arc<AtomicU64>,
    /// Bumped after every commit that changed replicas, workloads (their
    /// VIPs too) or nodes (and every snapshot install): assignment watches
    /// and the reconciler wake on it.
    watch: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Changes {
    /// Counters at zero.
    pub(crate) fn new() -> Self {
        Self {
            removals: Arc::new(AtomicU64::new(0)),
            secrets: Arc::new(AtomicU64::new(0)),
            watch: Arc::new(tokio::sync::watch::Sender::new(0)),
        }
    }

    /// Bumps what the answers of one committed batch changed.
    pub(crate) fn committed(&self, out: &[ProposalResult]) {
        let removed = out
            .iter()
            .flat_map(|r| &r.responses)
            .any(|r| matches!(r, Response::NodeRemoved));
        if removed {
            self.removals.fetch_add(1, Ordering::Release);
        }
        let secrets_changed = out.iter().flat_map(|r| &r.responses).any(|r| {
            matches!(
                r,
                Response::SecretStored(_) | Response::Keyring(_) | Response::SecretChanged
            )
        });
        if secrets_changed {
            self.secrets.fetch_add(1, Ordering::Release);
        }
        let changed = out.iter().flat_map(|r| &r.responses).any(|r| {
            matches!(
                r,
                Response::NodeRemoved
                    | Response::Node(_)
                    | Response::NodesUpdated(_)
                    | Response::ReplicasChanged(_)
                    | Response::WorkloadStored { .. }
                    | Response::WorkloadDeleted
                    | Response::VipsAssigned(_)
                    | Response::ConfigSet(_)
                    | Response::EventsRecorded(_)
            )
        });
        if changed {
            self.watch.send_modify(|v| *v += 1);
        }
    }

    /// Bumps everything: a snapshot install may have changed anything.
    pub(crate) fn replaced(&self) {
        self.removals.fetch_add(1, Ordering::Release);
        self.secrets.fetch_add(1, Ordering::Release);
        self.watch.send_modify(|v| *v += 1);
    }

    /// See [`crate::StateReader::removal_generation`].
    pub(crate) fn removal_generation(&self) -> u64 {
        self.removals.load(Ordering::Acquire)
    }

    /// See [`crate::StateReader::secret_generation`].
    pub(crate) fn secret_generation(&self) -> u64 {
        self.secrets.load(Ordering::Acquire)
    }

    /// See [`crate::StateReader::changes`].
    pub(crate) fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.watch.subscribe()
    }
}
