//! The secret keyring: master key versions unsealed with this
//! coordinator's master key, rotation and retirement, the access-token
//! signing key, and decryption of secret values.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use cloudless_proto::v1::{KeyInfoResponse, KeyVersionInfo, RotateMasterKeyResponse};
use cloudless_secrets::{AccessTokenKey, KeyRing};
use cloudless_state::{Command, Response as SmResponse, SecretCommand};
use cloudless_types::{SecretKeyring, SecretRecord, SecretVersion};
use tonic::Status;
use zeroize::Zeroizing;

use super::cache::PlainValues;
use super::caller::Caller;
use super::SecretApi;
use crate::clock::now_ms;
use crate::error::CoordinatorError;

/// The replicated keyring last unsealed, with its unsealed form.
pub(super) type RingCache = Mutex<Option<(SecretKeyring, Arc<KeyRing>)>>;

impl SecretApi {
    pub(super) fn root(&self) -> Result<&cloudless_pki::MasterKey, CoordinatorError> {
        self.handle.master_key().ok_or_else(|| {
            CoordinatorError::FailedPrecondition(
                "secrets need a master key (master_key_file or CLOUDLESS_MASTER_KEY) on every coordinator".into(),
            )
        })
    }

    /// The unsealed keyring matching the replicated one (cached).
    pub(super) fn keyring(&self) -> Result<Arc<KeyRing>, CoordinatorError> {
        let stored = self.handle.reader().secret_keyring()?;
        let mut cache = self
            .ring
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((s, ring)) = cache.as_ref() {
            if *s == stored {
                return Ok(ring.clone());
            }
        }
        let ring = Arc::new(KeyRing::unseal(self.root()?, &stored).map_err(|e| {
            CoordinatorError::FailedPrecondition(format!(
                "cannot open the secret keyring: {e}; is this coordinator's master key the cluster's?"
            ))
        })?);
        *cache = Some((stored, ring.clone()));
        Ok(ring)
    }

    /// The last unsealed keyring without looking at the state (the hot
    /// read path; a newer key version than it holds makes the caller use
    /// [`SecretApi::keyring`]).
    pub(super) fn cached_keyring(&self) -> Result<Arc<KeyRing>, CoordinatorError> {
        if let Some((_, ring)) = self
            .ring
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
        {
            return Ok(ring.clone());
        }
        self.keyring()
    }

    /// The keyring, creating the first master key version if there is none.
    pub(super) async fn active_keyring(&self) -> Result<Arc<KeyRing>, CoordinatorError> {
        let ring = self.keyring()?;
        if ring.active() != 0 {
            return Ok(ring);
        }
        let stored = self.handle.reader().secret_keyring()?;
        let key = KeyRing::new_version(self.root()?, &stored, now_ms())
            .map_err(|e| CoordinatorError::Fatal(e.to_string()))?;
        self.handle
            .write(None, Command::Secret(SecretCommand::InitKeyring { key }))
            .await?;
        self.keyring()
    }

    pub(super) fn access_key(&self) -> Result<Arc<AccessTokenKey>, CoordinatorError> {
        let mut cache = self
            .tokens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(k) = cache.as_ref() {
            return Ok(k.clone());
        }
        let keys = self.handle.identity_keys()?;
        let k = Arc::new(AccessTokenKey::from_cluster_key(&keys.tokens));
        *cache = Some(k.clone());
        Ok(k)
    }

    /// The decrypted values of `current`, a version of `record` (cached by
    /// secret, version and master key version).
    pub(super) fn decrypted(
        &self,
        record: &SecretRecord,
        current: &SecretVersion,
    ) -> Result<PlainValues, Status> {
        let key = (
            format!("{}/{}", record.namespace, record.name),
            current.version,
            current.ciphertext.key_version,
        );
        let cached = self.plain.get(&key);
        let values = match cached {
            Some(v) => v,
            None => {
                let open = |ring: &KeyRing| {
                    ring.open(
                        &record.namespace,
                        &record.name,
                        current.version,
                        &current.ciphertext,
                    )
                };
                let plain = match open(self.cached_keyring()?.as_ref()) {
                    Err(cloudless_secrets::SecretsError::UnknownKeyVersion(_)) => {
                        open(self.keyring()?.as_ref())
                    }
                    other => other,
                }
                .map_err(|e| Status::data_loss(e.to_string()))?;
                let values: Arc<Vec<(String, Zeroizing<Vec<u8>>)>> = Arc::new(
                    cloudless_secrets::decode_values(&plain)
                        .map_err(|e| Status::data_loss(e.to_string()))?
                        .into_iter()
                        .collect(),
                );
                self.plain.insert(key, values.clone());
                values
            }
        };
        Ok(values)
    }

    pub(super) async fn rotate(
        &self,
        caller: &Caller,
    ) -> Result<RotateMasterKeyResponse, CoordinatorError> {
        let old = self.active_keyring().await?;
        let stored = self.handle.reader().secret_keyring()?;
        let key = KeyRing::new_version(self.root()?, &stored, now_ms())
            .map_err(|e| CoordinatorError::Fatal(e.to_string()))?;
        let new_version = key.version;
        let mut next = stored.clone();
        next.keys.push(key.clone());
        next.active = new_version;
        let ring = KeyRing::unseal(self.root()?, &next)
            .map_err(|e| CoordinatorError::Fatal(e.to_string()))?;
        // Every data key not yet under the new version: those of the active
        // one, and any an interrupted rotation left under an older one.
        let mut rewrapped: BTreeMap<u32, Vec<cloudless_state::RewrappedKey>> = BTreeMap::new();
        for s in self.handle.reader().secrets(None)? {
            for v in &s.versions {
                let from = v.ciphertext.key_version;
                let c = ring
                    .rewrap(&s.namespace, &s.name, v.version, &v.ciphertext)
                    .map_err(|e| {
                        CoordinatorError::Fatal(format!("{}/{}: {e}", s.namespace, s.name))
                    })?;
                rewrapped
                    .entry(from)
                    .or_default()
                    .push(cloudless_state::RewrappedKey {
                        namespace: s.namespace.clone(),
                        name: s.name.clone(),
                        version: v.version,
                        old_dek_nonce: v.ciphertext.dek_nonce.clone(),
                        dek_nonce: c.dek_nonce,
                        dek: c.dek,
                    });
            }
        }
        let count: usize = rewrapped.values().map(Vec::len).sum();
        let mut audit = Self::audit(caller, "rotate", "", "");
        audit.detail = format!(
            "master key v{} -> v{new_version}; {count} data keys rewrapped",
            old.active()
        );
        // The new version first (old versions still decrypt), then the
        // rewrapped keys in parts small enough for one Raft entry each.
        let (resp, _) = self
            .handle
            .write(
                None,
                Command::Secret(SecretCommand::Rotate {
                    key,
                    expected_active: stored.active,
                    rewrapped: Vec::new(),
                    audit,
                }),
            )
            .await?;
        let keyring = match resp {
            SmResponse::Keyring(k) => k,
            SmResponse::Rejected(r) => return Err(r.into()),
            other => {
                return Err(CoordinatorError::Fatal(format!(
                    "unexpected answer {other:?}"
                )))
            }
        };
        for (from_version, keys) in rewrapped {
            for part in crate::proposer::split_by_size(keys, usize::MAX, self.handle.part_bytes()) {
                let (resp, _) = self
                    .handle
                    .write(
                        None,
                        Command::Secret(SecretCommand::RewrapKeys {
                            from_version,
                            to_version: new_version,
                            keys: part,
                        }),
                    )
                    .await?;
                if let SmResponse::Rejected(r) = resp {
                    return Err(r.into());
                }
            }
        }
        debug_assert_eq!(keyring.active, new_version);
        Ok(RotateMasterKeyResponse {
            key_version: new_version,
            rewrapped: u32::try_from(count).unwrap_or(u32::MAX),
        })
    }

    pub(super) fn key_info(&self) -> Result<KeyInfoResponse, CoordinatorError> {
        let stored = self.handle.reader().secret_keyring()?;
        let mut counts: BTreeMap<u32, u32> = BTreeMap::new();
        for s in self.handle.reader().secrets(None)? {
            for v in &s.versions {
                *counts.entry(v.ciphertext.key_version).or_default() += 1;
            }
        }
        Ok(KeyInfoResponse {
            keys: stored
                .keys
                .iter()
                .map(|k| KeyVersionInfo {
                    version: k.version,
                    created_at_ms: k.created_at_ms,
                    active: k.version == stored.active,
                    data_keys: counts.get(&k.version).copied().unwrap_or(0),
                })
                .collect(),
            root_key_source: self.handle.master_key_source(),
        })
    }
}
