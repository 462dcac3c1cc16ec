//! The event stream, served from this coordinator's applied state.

use cloudless_proto::v1::{Event, EventsRequest};
use cloudless_proto::{v1, WireEnum as _};
use cloudless_types::ClosedSet as _;
use tonic::{Request, Response, Status};

use super::Stream;
use crate::error::CoordinatorError;
use crate::handle::CoordinatorHandle;

/// `Events`: the recorded events, then (with `watch`) each new one.
pub(super) async fn events(
    handle: &CoordinatorHandle,
    req: Request<EventsRequest>,
) -> Result<Response<Stream<Event>>, Status> {
    // Served from this coordinator's applied state (events are in Raft).
    crate::authz::require(handle, &req, crate::authz::Allow::Admin)?;
    let r = req.into_inner();
    let reader = handle.reader().clone();
    let stopping = handle.stopping().clone();
    let (ns, name, watch) = (r.namespace, r.name, r.watch);
    let filter = move |e: &cloudless_types::EventRecord| {
        if !name.is_empty() {
            return e.kind == "Workload"
                && e.object == name
                && (ns.is_empty() || e.namespace == ns);
        }
        ns.is_empty() || e.namespace == ns
    };
    let to_wire = |e: cloudless_types::EventRecord| Event {
        at_ms: e.at_ms,
        kind: cloudless_types::ObjectKind::from_name(&e.kind).map_or(0, v1::ObjectKind::wire),
        legacy_kind: e.kind,
        object: if e.namespace.is_empty() {
            e.object
        } else {
            format!("{}/{}", e.namespace, e.object)
        },
        reason: e.reason,
        message: e.message,
    };
    let mut changes = reader.changes();
    let (first, cursor) = reader
        .events(None, &filter)
        .map_err(CoordinatorError::from)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Status>>(256);
    tokio::spawn(async move {
        let mut last = cursor;
        for (_, e) in first {
            if tx.send(Ok(to_wire(e))).await.is_err() {
                return;
            }
        }
        if !watch {
            return;
        }
        loop {
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                () = tx.closed() => return,
                () = stopping.cancelled() => return,
            }
            let batch = match reader.events(last, &filter) {
                Ok((b, cursor)) => {
                    last = cursor;
                    b
                }
                Err(e) => {
                    let _ = tx.send(Err(CoordinatorError::from(e).into())).await;
                    return;
                }
            };
            for (_, e) in batch {
                if tx.send(Ok(to_wire(e))).await.is_err() {
                    return;
                }
            }
        }
    });
    Ok(Response::new(Box::pin(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    )))
}
