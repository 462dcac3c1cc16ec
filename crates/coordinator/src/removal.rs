//! Cuts nodes removed from the cluster off this coordinator. gRPC refuses
//! their certificate on every call (`authz`); this closes what was already
//! open when the removal committed: their `Tunnel` streams (so no exec or
//! logs request reaches them) and their overlay relay connections (which
//! the relay's [`EnrolledNodes`] admission then refuses for good).

use cloudless_overlay::Admission;
use cloudless_pki::Identity;
use cloudless_state::StateReader;
use tokio_util::sync::CancellationToken;

use crate::handle::CoordinatorHandle;

/// The relay's admission: coordinators, and nodes while their record
/// exists in this coordinator's applied state.
#[derive(Debug, Clone)]
pub(crate) struct EnrolledNodes(pub(crate) StateReader);

impl Admission for EnrolledNodes {
    fn admit(&self, peer: &Identity) -> Result<(), String> {
        match peer {
            Identity::Node(id) => match self.0.node_exists(id) {
                Ok(true) => Ok(()),
                Ok(false) => Err(format!("node {id} has been removed from the cluster")),
                Err(e) => Err(format!("cannot read the node record of {id}: {e}")),
            },
            _ => Ok(()),
        }
    }
}

/// Closes the tunnels and relay connections of nodes no longer enrolled;
/// returns how many it closed.
pub(crate) fn sweep(handle: &CoordinatorHandle) -> usize {
    let reader = handle.reader();
    let mut closed = 0;
    for node in handle.tunnels().nodes() {
        if matches!(reader.node_exists(&node), Ok(false)) && handle.tunnels().cut(&node) {
            tracing::info!(node_id = %node, "closed the tunnel of a removed node");
            closed += 1;
        }
    }
    if let Some(relay) = handle.relay_overlay() {
        closed += relay.enforce_admission().len();
    }
    closed
}

/// Sweeps after every commit that removed a node (or installed a snapshot),
/// until `cancel`.
pub(crate) async fn run(handle: CoordinatorHandle, cancel: CancellationToken) {
    let reader = handle.reader().clone();
    let mut changes = reader.changes();
    let mut seen = reader.removal_generation();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            r = changes.changed() => if r.is_err() { return },
        }
        let generation = reader.removal_generation();
        if generation != seen {
            seen = generation;
            sweep(&handle);
        }
    }
}
