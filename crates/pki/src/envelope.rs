//! The master key and AES-256-GCM envelope used to keep key material at rest.

use std::fmt;
use std::path::Path;

use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::error::PkiError;

/// The cluster master key: 32 bytes, read from a file or the environment.
pub struct MasterKey {
    bytes: Zeroizing<[u8; 32]>,
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

/// Ciphertext with its nonce; safe to store and replicate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    /// 12-byte nonce, base64.
    pub nonce: String,
    /// Ciphertext and tag, base64.
    pub ciphertext: String,
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

impl MasterKey {
    /// A fresh random key.
    pub fn generate() -> Result<Self, PkiError> {
        let mut bytes = Zeroizing::new([0u8; 32]);
        SystemRandom::new()
            .fill(bytes.as_mut())
            .map_err(|_| PkiError::Generate("system random source failed".into()))?;
        Ok(Self { bytes })
    }

    /// A key from 32 raw bytes (e.g. an unwrapped data key).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, PkiError> {
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| PkiError::Unseal)?;
        Ok(Self {
            bytes: Zeroizing::new(bytes),
        })
    }

    /// The raw key, for wrapping it under another key (never log it).
    pub fn expose_bytes(&self) -> &[u8] {
        self.bytes.as_ref()
    }

    /// The key as base64, for writing a new key file (never log it).
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(b64().encode(self.bytes.as_ref()))
    }

    /// Parses a base64 key (44 characters, surrounding whitespace ignored).
    pub fn from_base64(text: &str, source_name: &str) -> Result<Self, PkiError> {
        let bad = |problem: &str| PkiError::MasterKey {
            source_name: source_name.to_owned(),
            problem: problem.to_owned(),
        };
        let decoded = Zeroizing::new(
            b64()
                .decode(text.trim())
                .map_err(|_| bad("is not base64"))?,
        );
        let bytes: [u8; 32] = decoded
            .as_slice()
            .try_into()
            .map_err(|_| bad("must decode to exactly 32 bytes"))?;
        Ok(Self {
            bytes: Zeroizing::new(bytes),
        })
    }

    /// Reads a key file, refusing one that group or others can read.
    pub fn from_file(path: &Path) -> Result<Self, PkiError> {
        use std::os::unix::fs::PermissionsExt;
        let name = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|e| PkiError::MasterKey {
            source_name: name.clone(),
            problem: e.to_string(),
        })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(PkiError::MasterKey {
                source_name: name,
                problem: format!(
                    "is readable by group or others (mode {mode:o}); run chmod 600 on it"
                ),
            });
        }
        let text =
            Zeroizing::new(
                std::fs::read_to_string(path).map_err(|e| PkiError::MasterKey {
                    source_name: name.clone(),
                    problem: e.to_string(),
                })?,
            );
        Self::from_base64(&text, &name)
    }

    fn key(&self) -> Result<LessSafeKey, PkiError> {
        UnboundKey::new(&AES_256_GCM, self.bytes.as_ref())
            .map(LessSafeKey::new)
            .map_err(|_| PkiError::Generate("AES-256-GCM key setup failed".into()))
    }

    /// Encrypts `plaintext`; `context` is bound as associated data and must match on open.
    pub fn seal(&self, plaintext: &[u8], context: &str) -> Result<Sealed, PkiError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| PkiError::Generate("system random source failed".into()))?;
        let mut buf = plaintext.to_vec();
        self.key()?
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context.as_bytes()),
                &mut buf,
            )
            .map_err(|_| PkiError::Generate("AES-256-GCM seal failed".into()))?;
        Ok(Sealed {
            nonce: b64().encode(nonce),
            ciphertext: b64().encode(buf),
        })
    }

    /// Decrypts what [`MasterKey::seal`] produced under the same `context`.
    pub fn open(&self, sealed: &Sealed, context: &str) -> Result<Zeroizing<Vec<u8>>, PkiError> {
        let nonce: [u8; NONCE_LEN] = b64()
            .decode(&sealed.nonce)
            .ok()
            .and_then(|n| n.try_into().ok())
            .ok_or(PkiError::Unseal)?;
        let mut buf = Zeroizing::new(
            b64()
                .decode(&sealed.ciphertext)
                .map_err(|_| PkiError::Unseal)?,
        );
        let len = self
            .key()?
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context.as_bytes()),
                buf.as_mut_slice(),
            )
            .map_err(|_| PkiError::Unseal)?
            .len();
        buf.truncate(len);
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_tampering_fails() {
        let k = MasterKey::generate().expect("key");
        let sealed = k.seal(b"ca private key", "ca-key").expect("seal");
        assert_eq!(
            k.open(&sealed, "ca-key").expect("open").as_slice(),
            b"ca private key"
        );
        assert!(matches!(
            k.open(&sealed, "other-context"),
            Err(PkiError::Unseal)
        ));
        let other = MasterKey::generate().expect("key");
        assert!(matches!(
            other.open(&sealed, "ca-key"),
            Err(PkiError::Unseal)
        ));
        let mut bad = sealed.clone();
        bad.ciphertext = b64().encode(b"garbage that is long enough to hold a tag");
        assert!(matches!(k.open(&bad, "ca-key"), Err(PkiError::Unseal)));
        assert!(!format!("{k:?}").contains(&*k.to_base64()));
    }

    #[test]
    fn key_file_must_be_private_and_well_formed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("master.key");
        let k = MasterKey::generate().expect("key");
        std::fs::write(&path, format!("{}\n", &*k.to_base64())).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = MasterKey::from_file(&path).expect_err("world-readable key accepted");
        assert!(err.to_string().contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let loaded = MasterKey::from_file(&path).expect("private key file");
        let sealed = k.seal(b"x", "c").expect("seal");
        assert_eq!(
            loaded.open(&sealed, "c").expect("same key").as_slice(),
            b"x"
        );
        std::fs::write(&path, "c2hvcnQ=").expect("write");
        let err = MasterKey::from_file(&path).expect_err("short key accepted");
        assert!(err.to_string().contains("exactly 32 bytes"), "{err}");
    }
}
