//! Secrets at rest and in transit: AES-256-GCM envelope encryption with a
//! fresh data key per secret version, wrapped by a versioned master key;
//! master keys themselves sealed by the cluster's root key (from a file,
//! the environment or another [`KeyProvider`]) so that they replicate
//! through Raft; audience-scoped access tokens.
//!
//! Plaintext only ever lives in [`Zeroizing`] buffers and is never logged.

mod envelope;
mod provider;
mod token;

pub use envelope::{
    decode_values, encode_values, key_context, KeyRing, SecretValues, DEK_CONTEXT_PREFIX,
};
pub use provider::{EnvKeyProvider, FileKeyProvider, KeyProvider, ROOT_KEY_ENV};
pub use token::{AccessClaims, AccessTokenKey};

use zeroize::Zeroizing;

/// What can go wrong with secrets.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    /// Ciphertext, nonce, wrapped key or context do not authenticate:
    /// tampered with, or a different key. Never garbage.
    #[error(
        "secret ciphertext does not authenticate (tampered with, or sealed under another key)"
    )]
    Tampered,
    /// The master key version a secret names is not in the keyring.
    #[error("master key version {0} is unknown to this coordinator")]
    UnknownKeyVersion(u32),
    /// No master key exists yet.
    #[error("no master key version is active yet")]
    NoActiveKey,
    /// The root key could not be loaded.
    #[error("root key from {source_name}: {problem}")]
    RootKey {
        /// Where it was looked for.
        source_name: String,
        /// What is wrong.
        problem: String,
    },
    /// Randomness or key setup failed.
    #[error("crypto failure: {0}")]
    Crypto(String),
    /// A token is malformed, forged, expired or for something else.
    #[error("access token refused: {0}")]
    Token(String),
    /// Input was invalid.
    #[error("{0}")]
    Invalid(String),
}

/// Plaintext bytes, wiped on drop.
pub type Plaintext = Zeroizing<Vec<u8>>;
