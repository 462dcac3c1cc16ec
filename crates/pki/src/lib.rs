//! Cloudless identity primitives: the cluster CA, certificate issuance from
//! CSRs, peer identities carried in a URI SAN, the master-key envelope that
//! protects the CA key at rest, and signed join tokens.
//!
//! Nothing here logs or formats key material: key types redact themselves in
//! `Debug`, and secrets are zeroed on drop.

mod ca;
mod envelope;
mod error;
mod identity;
mod token;

pub use ca::{
    inspect_certificate, inspect_certificate_der, key_matches_certificate, new_anonymous_csr,
    new_csr, verify_with_ca_cert, CertificateInfo, ClusterCa, IssuedCertificate,
    DEFAULT_NODE_CERT_LIFETIME,
};
pub use envelope::{MasterKey, Sealed};
pub use error::PkiError;
pub use identity::Identity;
pub use token::{JoinTokenClaims, TokenError, TokenKey};
