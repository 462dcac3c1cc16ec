//! Follower-to-leader forwarding and the request checks every service
//! shares: a call this coordinator cannot serve as a follower goes once to
//! the leader, carrying the caller's trace.

use std::future::Future;
use std::time::Duration;

use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::error::{CoordinatorError, FORWARDED_KEY, LEADER_HINT_KEY};
use crate::handle::CoordinatorHandle;

/// How long a forwarded call may take.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(30);

/// An administrative call: refused unless the caller holds an admin (or
/// coordinator) certificate, then served by [`leader_or_forward`].
pub(crate) async fn admin_call<Req, Resp, L, LF, R, RF>(
    handle: &CoordinatorHandle,
    request: Request<Req>,
    local: L,
    remote: R,
) -> Result<Response<Resp>, Status>
where
    Req: Clone,
    L: FnOnce(Req) -> LF,
    LF: Future<Output = Result<Resp, CoordinatorError>>,
    R: FnOnce(Channel, Request<Req>) -> RF,
    RF: Future<Output = Result<Response<Resp>, Status>>,
{
    crate::authz::require(handle, &request, crate::authz::Allow::Admin)?;
    leader_or_forward(handle, request, local, remote).await
}

/// Runs `local`; if this coordinator is not the leader and the call was not
/// already forwarded, sends the same request to the leader with `remote`.
pub(crate) async fn leader_or_forward<Req, Resp, L, LF, R, RF>(
    handle: &CoordinatorHandle,
    request: Request<Req>,
    local: L,
    remote: R,
) -> Result<Response<Resp>, Status>
where
    Req: Clone,
    L: FnOnce(Req) -> LF,
    LF: Future<Output = Result<Resp, CoordinatorError>>,
    R: FnOnce(Channel, Request<Req>) -> RF,
    RF: Future<Output = Result<Response<Resp>, Status>>,
{
    let forwarded = request.metadata().contains_key(FORWARDED_KEY);
    let req = request.into_inner();
    match local(req.clone()).await {
        Ok(r) => Ok(Response::new(r)),
        Err(CoordinatorError::NotLeader {
            leader: Some((leader_id, address)),
        }) if !forwarded && leader_id != handle.id() => {
            let channel = handle.peer_channel(&address)?;
            let mut fwd = Request::new(req);
            fwd.metadata_mut().insert(
                FORWARDED_KEY,
                tonic::metadata::MetadataValue::from_static("1"),
            );
            fwd.set_timeout(FORWARD_TIMEOUT);
            propagate_trace(fwd.metadata_mut());
            tracing::debug!(leader_id, %address, "forwarding to the leader");
            remote(channel, fwd).await.map_err(|mut status| {
                if status.code() == tonic::Code::Unavailable {
                    if let Ok(v) = address.parse() {
                        status.metadata_mut().insert(LEADER_HINT_KEY, v);
                    }
                }
                status
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// Adds the current span's trace context (`traceparent`) to a call made on
/// its behalf, so the callee's spans join the same trace.
pub(crate) fn propagate_trace(metadata: &mut tonic::metadata::MetadataMap) {
    for (k, v) in cloudless_telemetry::trace_headers() {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(k.as_bytes()),
            tonic::metadata::MetadataValue::try_from(v.as_str()),
        ) {
            metadata.insert(k, v);
        }
    }
}

/// The idempotency key of a mutating request, checked.
pub(crate) fn idempotency_key(
    write: Option<&cloudless_proto::v1::WriteOptions>,
) -> Result<Option<String>, CoordinatorError> {
    match write.map(|w| w.idempotency_key.as_str()) {
        None | Some("") => Ok(None),
        Some(k) if k.len() > 128 => Err(CoordinatorError::InvalidArgument(format!(
            "write.idempotency_key: {} bytes long, at most 128 are allowed",
            k.len()
        ))),
        Some(k) => Ok(Some(k.to_owned())),
    }
}
