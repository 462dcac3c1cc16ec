//! Who may call what. The caller's identity comes from its client
//! certificate (verified against the cluster CA by TLS and again here), never
//! from a request field.

use cloudless_pki::Identity;
use tonic::{Request, Status};

use crate::error::CoordinatorError;
use crate::handle::CoordinatorHandle;
use crate::peer_cache::Verified;

/// Who a method admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Allow {
    /// Operators; coordinators too, since a follower forwards an operator's
    /// call it has already authorized.
    Admin,
    /// Coordinators only (Raft).
    Coordinator,
    /// Enrolled nodes (agents), and only while their record exists.
    Node,
    /// Either operators (and coordinators) or enrolled nodes.
    AdminOrNode,
}

/// Refuses a node whose record has been removed.
pub(crate) fn node_still_enrolled(handle: &CoordinatorHandle, id: &str) -> Result<(), Status> {
    if handle.peer_cache().node_enrolled(handle.reader(), id)? {
        Ok(())
    } else {
        Err(cloudless_client::errors::refusal(
            tonic::Code::PermissionDenied,
            format!(
                "node {id} has been removed from the cluster; enroll it again with a new join token"
            ),
            cloudless_client::Reason::NodeRemoved,
            [(cloudless_client::errors::NODE_ID, id.to_owned())],
        ))
    }
}

/// Refuses a certificate whose identity was withdrawn after it was issued:
/// a revoked admin, a removed coordinator (nodes are checked by the caller).
pub(crate) fn still_trusted(
    handle: &CoordinatorHandle,
    identity: &Identity,
    issued_at_s: i64,
) -> Result<(), Status> {
    let read_err = |e: cloudless_state::StateError| {
        Status::from(CoordinatorError::Internal(format!(
            "cannot read the access records: {e}"
        )))
    };
    match identity {
        Identity::Admin(name) => {
            let record = handle.reader().admin(name).map_err(read_err)?;
            if record.is_some_and(|r| issued_at_s <= r.revoked_before_s) {
                return Err(Status::from(CoordinatorError::Denied(format!(
                    "admin {name:?} was revoked; ask another admin for a new certificate (cloudlessctl admin issue {name})"
                ))));
            }
        }
        Identity::Coordinator(id) => {
            // A removal records the retirement before the membership change
            // that follows it, so the leader being removed is heard until
            // then.
            if handle.reader().coordinator_retired(*id).map_err(read_err)? && !handle.is_member(*id)
            {
                return Err(Status::from(CoordinatorError::Denied(format!(
                    "coordinator {id} was removed from the cluster; its certificate is no longer accepted"
                ))));
            }
        }
        Identity::Node(_) => {}
    }
    Ok(())
}

/// Checks the caller of `req` against `allow`. A coordinator serving
/// plaintext (no master key) admits everyone: that mode is for trusted
/// networks only and says so at start-up.
pub(crate) fn require<T>(
    handle: &CoordinatorHandle,
    req: &Request<T>,
    allow: Allow,
) -> Result<Identity, Status> {
    require_issued(handle, req, allow).map(|(identity, _)| identity)
}

/// [`require`], with the time the caller's certificate was issued (Unix
/// seconds; 0 in plaintext mode).
pub(crate) fn require_issued<T>(
    handle: &CoordinatorHandle,
    req: &Request<T>,
    allow: Allow,
) -> Result<(Identity, i64), Status> {
    let Some(ca_pem) = handle.tls_ca_pem() else {
        if allow == Allow::Node {
            return Err(Status::from(CoordinatorError::FailedPrecondition(
                String::from("agent APIs need mTLS: this coordinator runs without a master key"),
            )));
        }
        return Ok((Identity::Admin("plaintext".into()), 0));
    };
    let certs = req.peer_certs();
    let Some(leaf) = certs.as_ref().and_then(|c| c.first()) else {
        return Err(Status::from(CoordinatorError::Unauthenticated(String::from(
            "a client certificate from this cluster's CA is required (cloudlessctl --config <data_dir>/admin/cloudlessctl.toml)",
        ))));
    };
    let Verified {
        identity,
        issued_at_s,
        ..
    } = handle.peer_cache().identity(ca_pem, leaf.as_ref())?;
    still_trusted(handle, &identity, issued_at_s)?;
    let ok = matches!(
        (allow, &identity),
        (Allow::Admin, Identity::Admin(_) | Identity::Coordinator(_))
            | (Allow::Coordinator, Identity::Coordinator(_))
            | (Allow::Node | Allow::AdminOrNode, Identity::Node(_))
            | (
                Allow::AdminOrNode,
                Identity::Admin(_) | Identity::Coordinator(_)
            )
    );
    if ok {
        if let Identity::Node(id) = &identity {
            // The certificate outlives a removal; the record does not.
            node_still_enrolled(handle, id)?;
        }
        Ok((identity, issued_at_s))
    } else {
        let what = match allow {
            Allow::Admin => "administrative APIs",
            Allow::Coordinator => "coordinator-to-coordinator (Raft) APIs",
            Allow::Node => "agent APIs",
            Allow::AdminOrNode => "administrative or agent APIs",
        };
        Err(Status::from(CoordinatorError::Denied(format!(
            "{identity} may not call {what}"
        ))))
    }
}
