//! Rejoining after a long absence: a device whose node certificate expired
//! while it was offline proves that it still holds that certificate's key,
//! and gets a new certificate for the same node without a join token.
//!
//! The proof is a signature, by the old certificate's key, over a statement
//! that binds this cluster (the SHA-256 of its CA certificate), the node id,
//! the time of signing and the SHA-256 of the new CSR. Binding the CSR means a
//! captured proof is useless to anyone else: it only ever gets the device's
//! own new public key signed. The coordinator accepts a signing time within
//! [`REJOIN_CLOCK_SKEW_S`] of its clock; a replay inside that window asks for
//! the same CSR again, and the coordinator refuses a certificate older than
//! the node's latest, so a rejoin that succeeded cannot be repeated.

use ring::digest::{digest, SHA256};
use ring::signature::{
    UnparsedPublicKey, VerificationAlgorithm, ECDSA_P256_SHA256_ASN1, ECDSA_P384_SHA384_ASN1,
    ED25519,
};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_SIG_ED25519,
};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::ca::{check_issued_by, identity_of, pem_to_der};
use crate::error::PkiError;
use crate::identity::Identity;

/// Largest certificate or CSR (PEM) a rejoin may carry.
pub const REJOIN_MAX_PEM_BYTES: usize = 16 * 1024;
/// Largest proof (signature) a rejoin may carry.
pub const REJOIN_MAX_PROOF_BYTES: usize = 512;
/// How far the proof's signing time may be from the coordinator's clock.
pub const REJOIN_CLOCK_SKEW_S: i64 = 300;
/// Domain separation: this signature means "rejoin", nothing else.
const CONTEXT: &str = "cloudless rejoin v1";

/// Why a rejoin proof was refused. Each message names the request field.
#[derive(Debug, thiserror::Error)]
pub enum RejoinError {
    /// A field is larger than a rejoin may carry.
    #[error("{field}: {bytes} bytes, at most {limit} are allowed")]
    TooLarge {
        /// The request field.
        field: &'static str,
        /// Its size.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// A field does not parse.
    #[error("{field}: does not parse: {detail}")]
    Parse {
        /// The request field.
        field: &'static str,
        /// Parser message.
        detail: String,
    },
    /// The certificate was not signed by this cluster's CA.
    #[error("cert_pem: the certificate was not issued by this cluster's CA")]
    UnknownIssuer,
    /// The certificate names something other than a node.
    #[error("cert_pem: the certificate names {identity}, not a node")]
    NotANode {
        /// What it names.
        identity: Identity,
    },
    /// The certificate expired longer ago than the grace allows.
    #[error("cert_pem: the certificate of node {node_id} expired at {not_after} (Unix seconds), more than the rejoin grace of {grace_s} s ago; enroll the device again with a new join token")]
    PastGrace {
        /// The node.
        node_id: String,
        /// End of the certificate's validity, Unix seconds.
        not_after: i64,
        /// The grace, seconds.
        grace_s: u64,
    },
    /// The proof's signing time is too far from the coordinator's clock.
    #[error("signed_at_s: {signed_at} is more than {REJOIN_CLOCK_SKEW_S} s away from the coordinator's clock ({now}); check the device's clock")]
    Stale {
        /// The time the device signed at, Unix seconds.
        signed_at: i64,
        /// The coordinator's time, Unix seconds.
        now: i64,
    },
    /// The certificate's key type cannot sign a rejoin proof.
    #[error("cert_pem: the certificate's key type ({algorithm}) is not supported for rejoining")]
    UnsupportedKey {
        /// The key algorithm's OID.
        algorithm: String,
    },
    /// The signature does not verify with the old certificate's key.
    #[error("proof: does not verify with the public key of the certificate in cert_pem")]
    BadProof,
    /// Signing the proof failed (device side).
    #[error("cannot sign the rejoin proof: {0}")]
    Sign(String),
}

/// What a device sends to rejoin (the request's fields).
#[derive(Debug, Clone, Copy)]
pub struct RejoinProof<'a> {
    /// The expired node certificate (PEM).
    pub cert_pem: &'a str,
    /// The new CSR (PEM), with a new key or the old one.
    pub csr_pem: &'a str,
    /// When the device signed, Unix seconds.
    pub signed_at: i64,
    /// The signature by the old certificate's key over the statement.
    pub signature: &'a [u8],
}

/// A rejoin the proof allows: the node, and its old certificate's end of
/// validity (the coordinator compares it with the node's latest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejoinGrant {
    /// The node id, from the old certificate.
    pub node_id: String,
    /// End of the old certificate's validity, Unix seconds.
    pub not_after: i64,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes the old key signs.
fn statement(ca_der: &[u8], node_id: &str, signed_at: i64, csr_pem: &str) -> Vec<u8> {
    format!(
        "{CONTEXT}\nca-sha256: {}\nnode: {node_id}\nsigned-at: {signed_at}\ncsr-sha256: {}\n",
        hex(digest(&SHA256, ca_der).as_ref()),
        hex(digest(&SHA256, csr_pem.as_bytes()).as_ref()),
    )
    .into_bytes()
}

fn parse_err(field: &'static str) -> impl Fn(PkiError) -> RejoinError {
    move |e| RejoinError::Parse {
        field,
        detail: e.to_string(),
    }
}

/// Signs a rejoin proof on the device, with the key of its old certificate
/// (`key_pem`), for the new CSR `csr_pem`.
pub fn sign_rejoin_proof(
    ca_cert_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    csr_pem: &str,
    signed_at: i64,
) -> Result<Vec<u8>, RejoinError> {
    use rcgen::SigningKey as _;
    let ca_der = pem_to_der(ca_cert_pem, "CA certificate").map_err(parse_err("ca_cert_pem"))?;
    let info = crate::ca::inspect_certificate(cert_pem).map_err(parse_err("cert_pem"))?;
    let Identity::Node(node_id) = info.identity else {
        return Err(RejoinError::NotANode {
            identity: info.identity,
        });
    };
    let key = rcgen::KeyPair::from_pem(key_pem).map_err(|e| RejoinError::Sign(e.to_string()))?;
    key.sign(&statement(&ca_der, &node_id, signed_at, csr_pem))
        .map_err(|e| RejoinError::Sign(e.to_string()))
}

fn check_size(field: &'static str, bytes: usize, limit: usize) -> Result<(), RejoinError> {
    if bytes > limit {
        return Err(RejoinError::TooLarge {
            field,
            bytes,
            limit,
        });
    }
    Ok(())
}

/// Checks a rejoin on the coordinator: the certificate was issued by this
/// cluster's CA (its expiry is ignored) to a node, expired no more than
/// `grace_s` before `now`, and the proof, signed within
/// [`REJOIN_CLOCK_SKEW_S`] of `now`, verifies with its public key. The CSR
/// itself is checked when it is signed.
pub fn verify_rejoin_proof(
    ca_cert_pem: &str,
    proof: &RejoinProof<'_>,
    now: i64,
    grace_s: u64,
) -> Result<RejoinGrant, RejoinError> {
    check_size("cert_pem", proof.cert_pem.len(), REJOIN_MAX_PEM_BYTES)?;
    check_size("csr_pem", proof.csr_pem.len(), REJOIN_MAX_PEM_BYTES)?;
    check_size("proof", proof.signature.len(), REJOIN_MAX_PROOF_BYTES)?;
    let ca_der = pem_to_der(ca_cert_pem, "CA certificate").map_err(parse_err("ca_cert_pem"))?;
    let der = pem_to_der(proof.cert_pem, "certificate").map_err(parse_err("cert_pem"))?;
    let (_, cert) = X509Certificate::from_der(&der).map_err(|e| RejoinError::Parse {
        field: "cert_pem",
        detail: e.to_string(),
    })?;
    check_issued_by(&ca_der, &cert).map_err(|e| match e {
        PkiError::UnknownIssuer => RejoinError::UnknownIssuer,
        other => parse_err("ca_cert_pem")(other),
    })?;
    let node_id = match identity_of(&cert).map_err(parse_err("cert_pem"))? {
        Identity::Node(id) => id,
        identity => return Err(RejoinError::NotANode { identity }),
    };
    let not_after = cert.validity().not_after.timestamp();
    let grace = i64::try_from(grace_s).unwrap_or(i64::MAX);
    if not_after.saturating_add(grace) < now {
        return Err(RejoinError::PastGrace {
            node_id,
            not_after,
            grace_s,
        });
    }
    if proof.signed_at.abs_diff(now) > REJOIN_CLOCK_SKEW_S.unsigned_abs() {
        return Err(RejoinError::Stale {
            signed_at: proof.signed_at,
            now,
        });
    }
    let spki = cert.public_key();
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    let algorithm: &'static dyn VerificationAlgorithm = match &spki.algorithm.algorithm {
        a if *a == OID_KEY_TYPE_EC_PUBLIC_KEY && curve.as_ref() == Some(&OID_EC_P256) => {
            &ECDSA_P256_SHA256_ASN1
        }
        a if *a == OID_KEY_TYPE_EC_PUBLIC_KEY && curve.as_ref() == Some(&OID_NIST_EC_P384) => {
            &ECDSA_P384_SHA384_ASN1
        }
        a if *a == OID_SIG_ED25519 => &ED25519,
        other => {
            return Err(RejoinError::UnsupportedKey {
                algorithm: other.to_id_string(),
            })
        }
    };
    let message = statement(&ca_der, &node_id, proof.signed_at, proof.csr_pem);
    UnparsedPublicKey::new(algorithm, spki.subject_public_key.data.as_ref())
        .verify(&message, proof.signature)
        .map_err(|_| RejoinError::BadProof)?;
    Ok(RejoinGrant { node_id, not_after })
}

#[cfg(test)]
#[path = "rejoin_test.rs"]
mod tests;
