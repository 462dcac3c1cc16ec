//! Envelope encryption: data under a per-version data key (DEK), the DEK
//! wrapped by a master key version, master key versions sealed by the root
//! key. Every layer binds its context (what it belongs to) as associated
//! data, so a ciphertext moved to another secret or version does not open.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use cloudless_pki::{MasterKey, Sealed};
use cloudless_types::{SecretCiphertext, SecretKeyVersion, SecretKeyring};
use zeroize::Zeroizing;

use crate::{Plaintext, SecretsError};

/// Associated-data prefix of wrapped data keys.
pub const DEK_CONTEXT_PREFIX: &str = "cloudless-dek";

/// The context a master key version is sealed under.
pub fn key_context(version: u32) -> String {
    format!("cloudless-secret-master-key:v{version}")
}

fn data_context(namespace: &str, name: &str, version: u64) -> String {
    format!("cloudless-secret:{namespace}/{name}:v{version}")
}

fn dek_context(namespace: &str, name: &str, version: u64, key_version: u32) -> String {
    format!("{DEK_CONTEXT_PREFIX}:{namespace}/{name}:v{version}:k{key_version}")
}

fn tampered(_: cloudless_pki::PkiError) -> SecretsError {
    SecretsError::Tampered
}

/// The unsealed master key versions a coordinator holds in memory.
#[derive(Default)]
pub struct KeyRing {
    active: u32,
    keys: BTreeMap<u32, MasterKey>,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing")
            .field("active", &self.active)
            .field("versions", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl KeyRing {
    /// Unseals every version of the replicated keyring with the root key.
    pub fn unseal(root: &MasterKey, stored: &SecretKeyring) -> Result<Self, SecretsError> {
        let mut keys = BTreeMap::new();
        for k in &stored.keys {
            let sealed = Sealed {
                nonce: k.nonce.clone(),
                ciphertext: k.sealed.clone(),
            };
            let bytes = root
                .open(&sealed, &key_context(k.version))
                .map_err(tampered)?;
            keys.insert(k.version, MasterKey::from_bytes(&bytes).map_err(tampered)?);
        }
        if stored.active != 0 && !keys.contains_key(&stored.active) {
            return Err(SecretsError::UnknownKeyVersion(stored.active));
        }
        Ok(Self {
            active: stored.active,
            keys,
        })
    }

    /// A new master key version (the next number), sealed for the keyring.
    pub fn new_version(
        root: &MasterKey,
        stored: &SecretKeyring,
        now_ms: i64,
    ) -> Result<SecretKeyVersion, SecretsError> {
        let version = stored.keys.iter().map(|k| k.version).max().unwrap_or(0) + 1;
        let key = MasterKey::generate().map_err(|e| SecretsError::Crypto(e.to_string()))?;
        let sealed = root
            .seal(key.expose_bytes(), &key_context(version))
            .map_err(|e| SecretsError::Crypto(e.to_string()))?;
        Ok(SecretKeyVersion {
            version,
            nonce: sealed.nonce,
            sealed: sealed.ciphertext,
            created_at_ms: now_ms,
            retired: false,
        })
    }

    /// The active version.
    pub fn active(&self) -> u32 {
        self.active
    }

    /// The versions held.
    pub fn versions(&self) -> Vec<u32> {
        self.keys.keys().copied().collect()
    }

    fn key(&self, version: u32) -> Result<&MasterKey, SecretsError> {
        self.keys
            .get(&version)
            .ok_or(SecretsError::UnknownKeyVersion(version))
    }

    /// Encrypts `plaintext` as `version` of secret `namespace/name` under a
    /// fresh data key wrapped by the active master key.
    pub fn seal(
        &self,
        namespace: &str,
        name: &str,
        version: u64,
        plaintext: &[u8],
    ) -> Result<SecretCiphertext, SecretsError> {
        if self.active == 0 {
            return Err(SecretsError::NoActiveKey);
        }
        let crypto = |e: cloudless_pki::PkiError| SecretsError::Crypto(e.to_string());
        let dek = MasterKey::generate().map_err(crypto)?;
        let data = dek
            .seal(plaintext, &data_context(namespace, name, version))
            .map_err(crypto)?;
        let wrapped = self
            .key(self.active)?
            .seal(
                dek.expose_bytes(),
                &dek_context(namespace, name, version, self.active),
            )
            .map_err(crypto)?;
        Ok(SecretCiphertext {
            key_version: self.active,
            dek_nonce: wrapped.nonce,
            dek: wrapped.ciphertext,
            nonce: data.nonce,
            data: data.ciphertext,
        })
    }

    fn unwrap_dek(
        &self,
        namespace: &str,
        name: &str,
        version: u64,
        c: &SecretCiphertext,
    ) -> Result<MasterKey, SecretsError> {
        let sealed = Sealed {
            nonce: c.dek_nonce.clone(),
            ciphertext: c.dek.clone(),
        };
        let bytes = self
            .key(c.key_version)?
            .open(
                &sealed,
                &dek_context(namespace, name, version, c.key_version),
            )
            .map_err(tampered)?;
        MasterKey::from_bytes(&bytes).map_err(tampered)
    }

    /// Decrypts `version` of secret `namespace/name`.
    pub fn open(
        &self,
        namespace: &str,
        name: &str,
        version: u64,
        c: &SecretCiphertext,
    ) -> Result<Plaintext, SecretsError> {
        let dek = self.unwrap_dek(namespace, name, version, c)?;
        let sealed = Sealed {
            nonce: c.nonce.clone(),
            ciphertext: c.data.clone(),
        };
        dek.open(&sealed, &data_context(namespace, name, version))
            .map_err(tampered)
    }

    /// The same ciphertext with its data key wrapped by the active master
    /// key instead (the data is not re-encrypted).
    pub fn rewrap(
        &self,
        namespace: &str,
        name: &str,
        version: u64,
        c: &SecretCiphertext,
    ) -> Result<SecretCiphertext, SecretsError> {
        if c.key_version == self.active {
            return Ok(c.clone());
        }
        let dek = self.unwrap_dek(namespace, name, version, c)?;
        let wrapped = self
            .key(self.active)?
            .seal(
                dek.expose_bytes(),
                &dek_context(namespace, name, version, self.active),
            )
            .map_err(|e| SecretsError::Crypto(e.to_string()))?;
        Ok(SecretCiphertext {
            key_version: self.active,
            dek_nonce: wrapped.nonce,
            dek: wrapped.ciphertext,
            ..c.clone()
        })
    }
}

/// A secret's values by key, wiped on drop.
pub type SecretValues = BTreeMap<String, Zeroizing<Vec<u8>>>;

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// The plaintext form of a secret's values (a JSON object of base64 values).
pub fn encode_values(values: &SecretValues) -> Result<Plaintext, SecretsError> {
    let map: BTreeMap<&str, Zeroizing<String>> = values
        .iter()
        .map(|(k, v)| (k.as_str(), Zeroizing::new(b64().encode(v.as_slice()))))
        .collect();
    let plain: BTreeMap<&str, &str> = map.iter().map(|(k, v)| (*k, v.as_str())).collect();
    serde_json::to_vec(&plain)
        .map(Zeroizing::new)
        .map_err(|e| SecretsError::Crypto(e.to_string()))
}

/// The values back from [`encode_values`]'s form.
pub fn decode_values(plain: &[u8]) -> Result<SecretValues, SecretsError> {
    let map: BTreeMap<String, String> =
        serde_json::from_slice(plain).map_err(|_| SecretsError::Tampered)?;
    map.into_iter()
        .map(|(k, v)| {
            // Moved, not copied: the buffer is wiped when `v` drops.
            let v = Zeroizing::new(v);
            b64()
                .decode(v.as_bytes())
                .map(|d| (k, Zeroizing::new(d)))
                .map_err(|_| SecretsError::Tampered)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn make_ring(root: &MasterKey) -> (KeyRing, SecretKeyring) {
        let mut stored = SecretKeyring::default();
        let v1 = KeyRing::new_version(root, &stored, 1).expect("v1");
        stored.keys.push(v1);
        stored.active = 1;
        (KeyRing::unseal(root, &stored).expect("open"), stored)
    }

    #[test]
    fn round_trip_and_every_tampering_is_an_error_never_garbage() {
        let root = MasterKey::generate().expect("root");
        let (ring, stored) = make_ring(&root);
        let c = ring.seal("prod", "db", 1, b"hunter2").expect("seal");
        assert_eq!(
            ring.open("prod", "db", 1, &c).expect("open").as_slice(),
            b"hunter2"
        );
        assert!(!c.data.contains("hunter2"));

        let flip = |s: &str| {
            let mut bytes = b64().decode(s).expect("b64");
            bytes[0] ^= 1;
            b64().encode(bytes)
        };
        let cases: Vec<(&str, SecretCiphertext)> = vec![
            (
                "data",
                SecretCiphertext {
                    data: flip(&c.data),
                    ..c.clone()
                },
            ),
            (
                "nonce",
                SecretCiphertext {
                    nonce: flip(&c.nonce),
                    ..c.clone()
                },
            ),
            (
                "wrapped key",
                SecretCiphertext {
                    dek: flip(&c.dek),
                    ..c.clone()
                },
            ),
            (
                "key nonce",
                SecretCiphertext {
                    dek_nonce: flip(&c.dek_nonce),
                    ..c.clone()
                },
            ),
        ];
        for (what, bad) in cases {
            assert!(
                matches!(
                    ring.open("prod", "db", 1, &bad),
                    Err(SecretsError::Tampered)
                ),
                "a flipped bit in the {what} opened"
            );
        }
        // Moved to another secret or version: refused too.
        assert!(matches!(
            ring.open("prod", "other", 1, &c),
            Err(SecretsError::Tampered)
        ));
        assert!(matches!(
            ring.open("prod", "db", 2, &c),
            Err(SecretsError::Tampered)
        ));
        // Another root key cannot open the keyring.
        let other = MasterKey::generate().expect("other");
        assert!(matches!(
            KeyRing::unseal(&other, &stored),
            Err(SecretsError::Tampered)
        ));
    }

    #[test]
    fn rotation_rewraps_data_keys_without_touching_the_data() {
        let root = MasterKey::generate().expect("root");
        let (ring1, mut stored) = make_ring(&root);
        let c1 = ring1.seal("prod", "db", 3, b"s3cret").expect("seal");
        let v2 = KeyRing::new_version(&root, &stored, 2).expect("v2");
        assert_eq!(v2.version, 2);
        stored.keys.push(v2);
        stored.active = 2;
        let ring2 = KeyRing::unseal(&root, &stored).expect("open");
        // Old ciphertext still opens with the old version in the ring.
        assert_eq!(
            ring2.open("prod", "db", 3, &c1).expect("old").as_slice(),
            b"s3cret"
        );
        let c2 = ring2.rewrap("prod", "db", 3, &c1).expect("rewrap");
        assert_eq!(c2.key_version, 2);
        assert_eq!(
            (c2.nonce.as_str(), c2.data.as_str()),
            (c1.nonce.as_str(), c1.data.as_str())
        );
        assert_ne!(c2.dek, c1.dek);
        // With version 1 retired (gone from the ring) only the rewrapped one opens.
        stored.keys.retain(|k| k.version != 1);
        let ring3 = KeyRing::unseal(&root, &stored).expect("open");
        assert_eq!(
            ring3.open("prod", "db", 3, &c2).expect("new").as_slice(),
            b"s3cret"
        );
        assert!(matches!(
            ring3.open("prod", "db", 3, &c1),
            Err(SecretsError::UnknownKeyVersion(1))
        ));
    }

    #[test]
    fn values_encode_and_decode() {
        let mut v = SecretValues::new();
        v.insert("A".into(), Zeroizing::new(b"x=1".to_vec()));
        v.insert("bin".into(), Zeroizing::new(vec![0, 255, 10]));
        let plain = encode_values(&v).expect("encode");
        let back = decode_values(&plain).expect("decode");
        assert_eq!(back.len(), 2);
        assert_eq!(back["bin"].as_slice(), [0, 255, 10]);
        assert!(decode_values(b"not json").is_err());
    }
}
