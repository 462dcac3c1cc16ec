//! Who may call what. The caller's identity comes from its client
//! certificate (verified against the cluster CA by TLS and again here), never
//! from a request field.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cloudless_pki::{verify_with_ca_cert, Identity};
use tonic::{Request, Status};

use crate::clock::now_ms;
use crate::handle::CoordinatorHandle;

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

/// How long a verified client certificate is trusted without re-checking
/// (signature, validity period, identity). TLS verified the chain at the
/// handshake; this bounds how long an expired certificate on a long-lived
/// connection keeps working.
const VERIFIED_FOR: Duration = Duration::from_secs(60);
/// Most certificates remembered; the cache is cleared when full.
const CACHE_LIMIT: usize = 65_536;

/// What a verified client certificate says.
#[derive(Debug, Clone)]
pub(crate) struct Verified {
    pub(crate) identity: Identity,
    /// When it was issued, Unix seconds.
    issued_at_s: i64,
    /// When it expires, Unix seconds.
    not_after_s: i64,
}

/// Identities of recently verified client certificates, by certificate bytes.
#[derive(Debug, Default)]
pub(crate) struct PeerCache {
    map: Mutex<HashMap<Vec<u8>, (Verified, Instant)>>,
    /// Node ids seen enrolled, with the state's removal generation at the time.
    nodes: Mutex<HashMap<String, u64>>,
}

impl PeerCache {
    /// Whether node `id` is still enrolled. A removal bumps the state's
    /// removal generation after it commits, so an answer recorded at the
    /// current generation is still true and needs no storage read.
    fn node_enrolled(&self, handle: &CoordinatorHandle, id: &str) -> Result<bool, Status> {
        let generation = handle.reader().removal_generation();
        let lock = || {
            self.nodes
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        if lock().get(id) == Some(&generation) {
            return Ok(true);
        }
        let exists = handle
            .reader()
            .node_exists(id)
            .map_err(|e| Status::internal(format!("cannot read the node record: {e}")))?;
        let mut nodes = lock();
        if exists {
            if nodes.len() >= CACHE_LIMIT {
                nodes.clear();
            }
            nodes.insert(id.to_owned(), generation);
        } else {
            nodes.remove(id);
        }
        Ok(exists)
    }

    pub(crate) fn identity(&self, ca_pem: &str, der: &[u8]) -> Result<Verified, Status> {
        let mut map = self
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((v, at)) = map.get(der) {
            // An expired certificate on a long-lived connection is refused
            // from its expiry on, not up to VERIFIED_FOR later.
            if at.elapsed() < VERIFIED_FOR && now_ms() / 1000 <= v.not_after_s {
                return Ok(v.clone());
            }
        }
        let refused = |e: cloudless_pki::PkiError| {
            Status::unauthenticated(format!("client certificate refused: {e}"))
        };
        let identity = verify_with_ca_cert(ca_pem, der, now_ms() / 1000).map_err(refused)?;
        let info = cloudless_pki::inspect_certificate_der(der).map_err(refused)?;
        let verified = Verified {
            identity,
            issued_at_s: info.not_before + cloudless_pki::BACKDATE_S,
            not_after_s: info.not_after,
        };
        if map.len() >= CACHE_LIMIT {
            map.clear();
        }
        map.insert(der.to_vec(), (verified.clone(), Instant::now()));
        Ok(verified)
    }
}

/// Refuses a node whose record has been removed.
pub(crate) fn node_still_enrolled(handle: &CoordinatorHandle, id: &str) -> Result<(), Status> {
    if handle.peer_cache().node_enrolled(handle, id)? {
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
        Status::internal(format!("cannot read the access records: {e}"))
    };
    match identity {
        Identity::Admin(name) => {
            let record = handle.reader().admin(name).map_err(read_err)?;
            if record.is_some_and(|r| issued_at_s <= r.revoked_before_s) {
                return Err(Status::permission_denied(format!(
                    "admin {name:?} was revoked; ask another admin for a new certificate (cloudlessctl admin issue {name})"
                )));
            }
        }
        Identity::Coordinator(id) => {
            // A removal records the retirement before the membership change
            // that follows it, so the leader being removed is heard until
            // then.
            if handle.reader().coordinator_retired(*id).map_err(read_err)? && !handle.is_member(*id)
            {
                return Err(Status::permission_denied(format!(
                    "coordinator {id} was removed from the cluster; its certificate is no longer accepted"
                )));
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
            return Err(Status::failed_precondition(
                "agent APIs need mTLS: this coordinator runs without a master key",
            ));
        }
        return Ok((Identity::Admin("plaintext".into()), 0));
    };
    let certs = req.peer_certs();
    let Some(leaf) = certs.as_ref().and_then(|c| c.first()) else {
        return Err(Status::unauthenticated(
            "a client certificate from this cluster's CA is required (cloudlessctl --config <data_dir>/admin/cloudlessctl.toml)",
        ));
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
        Err(Status::permission_denied(format!(
            "{identity} may not call {what}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudless_pki::ClusterCa;

    fn der(pem: &str) -> Vec<u8> {
        use base64::Engine as _;
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD
            .decode(body)
            .expect("PEM")
    }

    #[test]
    fn cache_returns_the_verified_identity_and_refuses_foreign_certificates() {
        let now = now_ms() / 1000;
        let ca = ClusterCa::generate("t", now).expect("ca");
        let rogue = ClusterCa::generate("r", now).expect("ca");
        let admin = ca
            .issue(&Identity::Admin("a".into()), &[], 3600, now)
            .expect("issue");
        let fake = rogue
            .issue(&Identity::Admin("a".into()), &[], 3600, now)
            .expect("issue");
        let cache = PeerCache::default();
        for _ in 0..2 {
            let v = cache
                .identity(ca.cert_pem(), &der(&admin.cert_pem))
                .expect("ok");
            assert_eq!(v.identity, Identity::Admin("a".into()));
            assert!(
                (v.issued_at_s - now).abs() <= 1,
                "issued at {}",
                v.issued_at_s
            );
        }
        let err = cache
            .identity(ca.cert_pem(), &der(&fake.cert_pem))
            .expect_err("foreign certificate");
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
    }
}
