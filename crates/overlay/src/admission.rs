//! Which peers may hold a connection to an endpoint, beyond a certificate
//! from the cluster CA (for example: only nodes still enrolled).

use cloudless_pki::Identity;

/// Decides whether `peer` may use this endpoint. Asked when a connection is
/// adopted, for every stream it opens, for every node a relay request names,
/// and by [`crate::Overlay::enforce_admission`] for live connections.
/// Answers should be cheap: they sit on every stream's path.
pub trait Admission: Send + Sync + 'static {
    /// `Ok` to admit `peer`; otherwise the reason, sent to refused streams.
    fn admit(&self, peer: &Identity) -> Result<(), String>;
}

/// Admits every peer the cluster CA vouches for (the default).
#[derive(Debug, Default, Clone, Copy)]
pub struct AdmitAll;

impl Admission for AdmitAll {
    fn admit(&self, _peer: &Identity) -> Result<(), String> {
        Ok(())
    }
}
