//! Who may call what. The caller's identity comes from its client
//! certificate (verified against the cluster CA by TLS and again here), never
//! from a request field.

use cloudless_pki::{verify_with_ca_cert, Identity};
use tonic::{Request, Status};

use crate::coordinator::{now_ms, CoordinatorHandle};

/// Who a method admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Allow {
    /// Operators; coordinators too, since a follower forwards an operator's
    /// call it has already authorized.
    Admin,
    /// Coordinators only (Raft).
    Coordinator,
}

/// Checks the caller of `req` against `allow`. A coordinator serving
/// plaintext (no master key) admits everyone: that mode is for trusted
/// networks only and says so at start-up.
pub(crate) fn require<T>(
    handle: &CoordinatorHandle,
    req: &Request<T>,
    allow: Allow,
) -> Result<Identity, Status> {
    let Some(ca_pem) = handle.tls_ca_pem() else {
        return Ok(Identity::Admin("plaintext".into()));
    };
    let certs = req.peer_certs();
    let Some(leaf) = certs.as_ref().and_then(|c| c.first()) else {
        return Err(Status::unauthenticated(
            "a client certificate from this cluster's CA is required (cloudlessctl --config <data_dir>/admin/cloudlessctl.toml)",
        ));
    };
    let identity = verify_with_ca_cert(ca_pem, leaf.as_ref(), now_ms() / 1000)
        .map_err(|e| Status::unauthenticated(format!("client certificate refused: {e}")))?;
    let ok = matches!(
        (allow, &identity),
        (Allow::Admin, Identity::Admin(_) | Identity::Coordinator(_))
            | (Allow::Coordinator, Identity::Coordinator(_))
    );
    if ok {
        Ok(identity)
    } else {
        let what = match allow {
            Allow::Admin => "administrative APIs",
            Allow::Coordinator => "coordinator-to-coordinator (Raft) APIs",
        };
        Err(Status::permission_denied(format!(
            "{identity} may not call {what}"
        )))
    }
}
