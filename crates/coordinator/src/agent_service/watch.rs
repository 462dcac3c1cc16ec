//! The assignment watch of one agent: on every change of the applied state
//! (`StateReader::changes`, bumped after each commit that touches replicas,
//! workloads or nodes), the node's view is computed again and sent when it
//! differs from the last one sent. The view holds every service's
//! endpoints, so a replica's readiness or address, or a node's phase, drain
//! or labels changing anywhere reaches every agent with the next commit.

use std::sync::Arc;

use cloudless_proto::v1::AssignmentSet;
use cloudless_state::StateReader;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::assignments::{assignments, NodeView, WatchCaches};
use crate::error::CoordinatorError;

/// Sends `node_id`'s view on `tx` now and after every change that alters
/// it, until the agent goes away (`tx` closed), `still_enrolled` refuses
/// (its refusal is sent last), the state cannot be read (the error is
/// sent) or `stopping` is cancelled (UNAVAILABLE is sent).
pub(super) async fn send_views(
    reader: StateReader,
    caches: Arc<WatchCaches>,
    node_id: String,
    tx: mpsc::Sender<Result<AssignmentSet, Status>>,
    still_enrolled: impl Fn() -> Result<(), Status>,
    stopping: CancellationToken,
) {
    let mut changes = reader.changes();
    let mut last: Option<NodeView> = None;
    loop {
        let revision = *changes.borrow_and_update();
        if let Err(status) = still_enrolled() {
            let _ = tx.send(Err(status)).await;
            return;
        }
        let view = match assignments(&reader, &caches, &node_id, revision) {
            Ok(view) => view,
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        };
        if last.as_ref() != Some(&view) {
            if tx.send(Ok(view.to_set(revision))).await.is_err() {
                return;
            }
            last = Some(view);
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            () = tx.closed() => return,
            () = stopping.cancelled() => {
                let _ = tx.send(Err(Status::from(CoordinatorError::Unavailable(String::from("this coordinator is shutting down"))))).await;
                return;
            }
        }
    }
}

#[cfg(test)]
#[path = "watch_test.rs"]
mod tests;
