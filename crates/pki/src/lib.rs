//! Cloudless identity primitives: the cluster CA, certificate issuance from
//! CSRs, peer identities carried in a URI SAN, the master-key envelope that
//! protects the CA key at rest, signed join tokens, and the proof with which
//! a device whose certificate expired rejoins.
//!
//! Nothing here logs or formats key material: key types redact themselves in
//! `Debug`, and secrets are zeroed on drop.

mod ca;
mod envelope;
mod error;
mod identity;
mod rejoin;
mod token;

pub use ca::{
    csr_for_key, inspect_certificate, inspect_certificate_der, key_matches_certificate,
    new_anonymous_csr, new_csr, verify_with_ca_cert, CertificateInfo, ClusterCa, IssuedCertificate,
    BACKDATE_S, DEFAULT_NODE_CERT_LIFETIME,
};
pub use envelope::{MasterKey, Sealed};
pub use error::PkiError;
pub use identity::Identity;
pub use rejoin::{
    sign_rejoin_proof, verify_rejoin_proof, RejoinError, RejoinGrant, RejoinProof,
    REJOIN_CLOCK_SKEW_S, REJOIN_MAX_PEM_BYTES, REJOIN_MAX_PROOF_BYTES,
};
pub use token::{JoinTokenClaims, TokenError, TokenKey};
