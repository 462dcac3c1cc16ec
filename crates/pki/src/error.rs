//! Errors of the pki crate.

use crate::identity::Identity;

/// Why a PKI operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Generating or serialising a key or certificate failed.
    #[error("certificate generation failed: {0}")]
    Generate(String),
    /// A PEM or DER input does not parse.
    #[error("{what} does not parse: {detail}")]
    Parse {
        /// What was being parsed.
        what: &'static str,
        /// Parser message.
        detail: String,
    },
    /// The CSR's signature does not verify (no proof of key possession).
    #[error("the certificate signing request's signature is invalid")]
    CsrSignature,
    /// The CSR asks for an identity other than the one being issued.
    #[error("the certificate signing request asks for {requested}, but this enrollment issues {assigned}")]
    CsrIdentityMismatch {
        /// What the CSR asked for.
        requested: String,
        /// What the coordinator assigns.
        assigned: Identity,
    },
    /// The CSR asks to be a CA.
    #[error("the certificate signing request asks for a CA certificate")]
    CsrWantsCa,
    /// A certificate was not signed by the cluster CA.
    #[error("the certificate was not issued by this cluster's CA")]
    UnknownIssuer,
    /// A certificate is outside its validity period.
    #[error("the certificate is not valid at this time (valid {not_before} to {not_after} Unix seconds)")]
    NotValidNow {
        /// Start of validity.
        not_before: i64,
        /// End of validity.
        not_after: i64,
    },
    /// A certificate carries no Cloudless identity, or more than one.
    #[error("the certificate carries {0}")]
    Identity(String),
    /// The master key file is unusable.
    #[error("master key {source_name}: {problem}")]
    MasterKey {
        /// File path or environment variable.
        source_name: String,
        /// What is wrong.
        problem: String,
    },
    /// Sealed data does not open (wrong key or tampered data).
    #[error("sealed data does not open: wrong master key or corrupted data")]
    Unseal,
}
