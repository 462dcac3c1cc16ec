//! Identities of recently verified client certificates, and nodes recently
//! seen enrolled: what `authz` checks on every call, remembered so that most
//! calls cost no signature check and no storage read.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cloudless_pki::{verify_with_ca_cert, Identity};
use cloudless_state::StateReader;
use tonic::Status;

use crate::clock::now_ms;
use crate::error::CoordinatorError;

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
    pub(crate) issued_at_s: i64,
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
    pub(crate) fn node_enrolled(&self, reader: &StateReader, id: &str) -> Result<bool, Status> {
        let generation = reader.removal_generation();
        let lock = || {
            self.nodes
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        if lock().get(id) == Some(&generation) {
            return Ok(true);
        }
        let exists = reader.node_exists(id).map_err(|e| {
            Status::from(CoordinatorError::Internal(format!(
                "cannot read the node record: {e}"
            )))
        })?;
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
            Status::from(CoordinatorError::Unauthenticated(format!(
                "client certificate refused: {e}"
            )))
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
