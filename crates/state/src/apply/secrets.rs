//! Secrets: `SecretCommand`s on ciphertext records, the sealed master
//! keyring and access tokens (uses counted, revocation at once), each
//! audited. Nothing here sees plaintext or key material in the clear.

use redb::{ReadableTable, ReadableTableMetadata, WriteTransaction};

use cloudless_types::{AccessTokenRecord, SecretKeyring, SecretRecord, SECRET_VERSIONS_KEPT};

use super::audit::{append_audit, append_counted, audited};
use super::cluster::config;
use super::{drop_indexed_before, expiry_key};
use crate::command::{Rejection, Response, SecretCommand};
use crate::error::{ApplyError, RedbContext};
use crate::tables::{
    decode, get_json, put_json, put_raw, remove, secret_key, ACCESS_TOKENS, ACCESS_TOKEN_EXPIRY,
    KEYRING_KEY, SECRETS, SECRET_KEYS,
};

/// How long a token's record outlives its expiry. Until then a late use is
/// refused as expired by the record too; after it the JWT's own `exp` check
/// refuses it (the record is gone, and so is the use count).
pub const TOKEN_RECORD_GRACE_MS: i64 = 3_600_000;

/// The sealed master keyring (empty before `InitKeyring`).
fn keyring(txn: &WriteTransaction) -> Result<SecretKeyring, ApplyError> {
    Ok(get_json(txn, SECRET_KEYS, KEYRING_KEY)?.unwrap_or_default())
}

/// Removes the soonest-expiring token records while there are more than `cap`.
fn drop_tokens_over(txn: &WriteTransaction, cap: u64) -> Result<(), ApplyError> {
    let mut tokens = txn.open_table(ACCESS_TOKENS).at(ACCESS_TOKENS, "open")?;
    let mut expiry = txn
        .open_table(ACCESS_TOKEN_EXPIRY)
        .at(ACCESS_TOKEN_EXPIRY, "open")?;
    while tokens.len().at(ACCESS_TOKENS, "len")? > cap {
        let Some((ek, _)) = expiry.pop_first().at(ACCESS_TOKEN_EXPIRY, "pop_first")? else {
            break;
        };
        if let Some((_, id)) = ek.value().split_once('/') {
            tokens.remove(id).at(ACCESS_TOKENS, "remove")?;
        }
    }
    Ok(())
}

/// Whether `actor` may use `token` now to read `secret`, with `pending`
/// uses counted but not yet committed. The reason names what is wrong.
pub fn check_token_use(
    token: Option<&AccessTokenRecord>,
    secret: Option<&SecretRecord>,
    actor: &str,
    now_ms: i64,
    pending: u32,
) -> Result<(), String> {
    let Some(t) = token else {
        return Err("the token is unknown to this cluster".into());
    };
    if t.revoked {
        return Err("the token was revoked".into());
    }
    if now_ms >= t.expires_at_ms {
        return Err("the token expired".into());
    }
    let used = t.uses.saturating_add(pending);
    if used >= t.max_uses {
        return Err(format!("the token was used {used} of {} times", t.max_uses));
    }
    if t.issued_to != actor {
        return Err(format!(
            "the token was issued to {}, not {actor}",
            t.issued_to
        ));
    }
    match secret {
        None => Err(format!(
            "secret {}/{} does not exist",
            t.namespace, t.secret
        )),
        Some(s) if s.expires_at_ms != 0 && now_ms >= s.expires_at_ms => {
            Err(format!("secret {}/{} expired", t.namespace, t.secret))
        }
        Some(s) if !s.audiences.contains(&t.audience) => Err(format!(
            "audience {:?} may no longer read {}/{}",
            t.audience, t.namespace, t.secret
        )),
        Some(_) => Ok(()),
    }
}

/// The first secret (by key) with a data key wrapped by master key `version`.
fn wrapped_by(txn: &WriteTransaction, version: u32) -> Result<Option<String>, ApplyError> {
    let table = txn.open_table(SECRETS).at(SECRETS, "open")?;
    for item in table.iter().at(SECRETS, "iter")? {
        let (k, v) = item.at(SECRETS, "iter")?;
        let r: SecretRecord = decode(SECRETS, k.value(), v.value())?;
        if r.versions
            .iter()
            .any(|x| x.ciphertext.key_version == version)
        {
            return Ok(Some(k.value().to_owned()));
        }
    }
    Ok(None)
}

/// Applies one secret command.
pub(crate) fn apply(
    txn: &WriteTransaction,
    cmd: &SecretCommand,
    now_ms: i64,
) -> Result<Response, ApplyError> {
    match cmd {
        SecretCommand::InitKeyring { key } => {
            let mut ring = keyring(txn)?;
            if ring.active == 0 {
                ring.keys.push(key.clone());
                ring.active = key.version;
                put_json(txn, SECRET_KEYS, KEYRING_KEY, &ring)?;
            }
            Ok(Response::Keyring(ring))
        }
        SecretCommand::Put {
            namespace,
            name,
            version,
            create,
            audiences,
            immutable,
            expires_at_ms,
            audit,
        } => {
            let key = secret_key(namespace, name);
            let existing = get_json::<SecretRecord>(txn, SECRETS, &key)?;
            let ring = keyring(txn)?;
            let outcome = (|| {
                if !ring
                    .keys
                    .iter()
                    .any(|k| k.version == version.ciphertext.key_version)
                {
                    return Err(Rejection::SecretConflict(format!(
                        "master key version {} is not in the keyring",
                        version.ciphertext.key_version
                    )));
                }
                let record = match (existing, create) {
                    (Some(_), true) => {
                        return Err(Rejection::SecretExists {
                            namespace: namespace.clone(),
                            name: name.clone(),
                        })
                    }
                    (None, false) => {
                        return Err(Rejection::SecretNotFound {
                            namespace: namespace.clone(),
                            name: name.clone(),
                        })
                    }
                    (None, true) => {
                        if version.version != 1 {
                            return Err(Rejection::SecretConflict(
                                "a new secret starts at version 1".into(),
                            ));
                        }
                        SecretRecord {
                            namespace: namespace.clone(),
                            name: name.clone(),
                            audiences: audiences.clone().unwrap_or_default(),
                            immutable: *immutable,
                            expires_at_ms: expires_at_ms.unwrap_or(0),
                            versions: vec![version.clone()],
                            created_at_ms: now_ms,
                            updated_at_ms: now_ms,
                        }
                    }
                    (Some(mut r), false) => {
                        if r.immutable {
                            return Err(Rejection::SecretImmutable {
                                namespace: namespace.clone(),
                                name: name.clone(),
                            });
                        }
                        let current = r.current().map_or(0, |v| v.version);
                        if version.version != current + 1 {
                            return Err(Rejection::SecretConflict(format!(
                                "secret {key} is at version {current}, not {}",
                                version.version - 1
                            )));
                        }
                        r.versions.push(version.clone());
                        let excess = r.versions.len().saturating_sub(SECRET_VERSIONS_KEPT);
                        r.versions.drain(..excess);
                        if let Some(a) = audiences {
                            r.audiences.clone_from(a);
                        }
                        if let Some(e) = expires_at_ms {
                            r.expires_at_ms = *e;
                        }
                        r.updated_at_ms = now_ms;
                        r
                    }
                };
                Ok(record)
            })();
            let outcome = match outcome {
                Ok(record) => {
                    put_json(txn, SECRETS, &key, &record)?;
                    Ok(Response::SecretStored(record))
                }
                Err(e) => Err(e),
            };
            audited(txn, audit.clone(), now_ms, outcome)
        }
        SecretCommand::Delete {
            namespace,
            name,
            audit,
        } => {
            let key = secret_key(namespace, name);
            let outcome = if remove(txn, SECRETS, &key)? {
                Ok(Response::SecretChanged)
            } else {
                Err(Rejection::SecretNotFound {
                    namespace: namespace.clone(),
                    name: name.clone(),
                })
            };
            audited(txn, audit.clone(), now_ms, outcome)
        }
        SecretCommand::Rotate {
            key,
            expected_active,
            rewrapped,
            audit,
        } => {
            let mut ring = keyring(txn)?;
            if ring.active != *expected_active || ring.keys.iter().any(|k| k.version == key.version)
            {
                return audited(
                    txn,
                    audit.clone(),
                    now_ms,
                    Err(Rejection::SecretConflict(format!(
                        "the active master key is version {}, not {expected_active}",
                        ring.active
                    ))),
                );
            }
            ring.keys.push(key.clone());
            ring.active = key.version;
            put_json(txn, SECRET_KEYS, KEYRING_KEY, &ring)?;
            for (ns, name, version, c) in rewrapped {
                let k = secret_key(ns, name);
                let Some(mut r) = get_json::<SecretRecord>(txn, SECRETS, &k)? else {
                    continue;
                };
                let mut changed = false;
                for v in &mut r.versions {
                    // Only what the proposer saw: a version written since
                    // (under the old key) stays as it is, still readable.
                    if v.version == *version && v.ciphertext.key_version == *expected_active {
                        v.ciphertext = c.clone();
                        changed = true;
                    }
                }
                if changed {
                    put_json(txn, SECRETS, &k, &r)?;
                }
            }
            audited(txn, audit.clone(), now_ms, Ok(Response::Keyring(ring)))
        }
        SecretCommand::Retire { version, audit } => {
            let mut ring = keyring(txn)?;
            let outcome = (|| {
                if *version == ring.active {
                    return Err(Rejection::Keyring(format!(
                        "master key version {version} is active; rotate first"
                    )));
                }
                if !ring
                    .keys
                    .iter()
                    .any(|k| k.version == *version && !k.retired)
                {
                    return Err(Rejection::Keyring(format!(
                        "master key version {version} is unknown or already retired"
                    )));
                }
                Ok(())
            })();
            // Read faults are errors, not refusals: only what is stored
            // decides the answer, the same on every coordinator.
            let outcome = match outcome {
                Ok(()) => match wrapped_by(txn, *version)? {
                    Some(k) => Err(Rejection::Keyring(format!(
                        "secret {k} still has a data key wrapped by version {version}; rotate again first"
                    ))),
                    None => Ok(()),
                },
                Err(e) => Err(e),
            };
            let outcome = match outcome {
                Ok(()) => {
                    ring.keys.retain(|k| k.version != *version);
                    put_json(txn, SECRET_KEYS, KEYRING_KEY, &ring)?;
                    Ok(Response::Keyring(ring))
                }
                Err(e) => Err(e),
            };
            audited(txn, audit.clone(), now_ms, outcome)
        }
        SecretCommand::MintToken { token, audit } => {
            put_json(txn, ACCESS_TOKENS, &token.id, token)?;
            put_raw(
                txn,
                ACCESS_TOKEN_EXPIRY,
                &expiry_key(token.expires_at_ms, &token.id),
                "null",
            )?;
            // The table holds about one grace period's worth of expired
            // tokens however many agents mint (one single-use token per read).
            drop_indexed_before(
                txn,
                ACCESS_TOKEN_EXPIRY,
                ACCESS_TOKENS,
                now_ms - TOKEN_RECORD_GRACE_MS,
            )?;
            // And never more than the cap: the soonest to expire go first.
            drop_tokens_over(txn, u64::from(config(txn)?.access_token_max_records))?;
            audited(txn, audit.clone(), now_ms, Ok(Response::SecretDone))
        }
        SecretCommand::UseToken { id, actor, audit } => {
            let token = get_json::<AccessTokenRecord>(txn, ACCESS_TOKENS, id)?;
            let secret = match &token {
                Some(t) => {
                    get_json::<SecretRecord>(txn, SECRETS, &secret_key(&t.namespace, &t.secret))?
                }
                None => None,
            };
            let result = match check_token_use(token.as_ref(), secret.as_ref(), actor, now_ms, 0) {
                Ok(()) => {
                    if let Some(mut t) = token {
                        t.uses += 1;
                        put_json(txn, ACCESS_TOKENS, id, &t)?;
                    }
                    secret.ok_or_else(|| "the secret is gone".to_owned())
                }
                Err(why) => Err(why),
            };
            let mut audit = audit.clone();
            match &result {
                Ok(_) => audit.allowed = true,
                Err(why) => {
                    audit.allowed = false;
                    audit.detail.clone_from(why);
                }
            }
            append_audit(txn, [audit], now_ms)?;
            Ok(Response::SecretAccess(result))
        }
        SecretCommand::RecordUses { uses, audits } => {
            for (id, n) in uses {
                if let Some(mut t) = get_json::<AccessTokenRecord>(txn, ACCESS_TOKENS, id)? {
                    t.uses = t.uses.saturating_add(*n);
                    put_json(txn, ACCESS_TOKENS, id, &t)?;
                }
            }
            append_audit(txn, audits.iter().cloned(), now_ms)?;
            Ok(Response::SecretDone)
        }
        SecretCommand::RecordCounted { uses, audits } => {
            for (id, n) in uses {
                if let Some(mut t) = get_json::<AccessTokenRecord>(txn, ACCESS_TOKENS, id)? {
                    t.uses = t.uses.saturating_add(*n);
                    put_json(txn, ACCESS_TOKENS, id, &t)?;
                }
            }
            append_counted(txn, audits.iter().cloned(), now_ms)?;
            Ok(Response::SecretDone)
        }
        SecretCommand::RevokeToken { id, audit } => {
            let outcome = match get_json::<AccessTokenRecord>(txn, ACCESS_TOKENS, id)? {
                Some(mut t) => {
                    t.revoked = true;
                    put_json(txn, ACCESS_TOKENS, id, &t)?;
                    Ok(Response::SecretChanged)
                }
                None => Err(Rejection::TokenNotFound { id: id.clone() }),
            };
            audited(txn, audit.clone(), now_ms, outcome)
        }
        SecretCommand::RewrapKeys {
            from_version,
            to_version,
            keys,
        } => {
            let ring = keyring(txn)?;
            if !ring
                .keys
                .iter()
                .any(|k| k.version == *to_version && !k.retired)
            {
                return Ok(Response::Rejected(Rejection::Keyring(format!(
                    "master key version {to_version} is unknown or retired"
                ))));
            }
            for key in keys {
                let k = secret_key(&key.namespace, &key.name);
                let Some(mut r) = get_json::<SecretRecord>(txn, SECRETS, &k)? else {
                    continue;
                };
                let mut changed = false;
                for v in &mut r.versions {
                    if v.version == key.version
                        && v.ciphertext.key_version == *from_version
                        && v.ciphertext.dek_nonce == key.old_dek_nonce
                    {
                        v.ciphertext.key_version = *to_version;
                        v.ciphertext.dek_nonce.clone_from(&key.dek_nonce);
                        v.ciphertext.dek.clone_from(&key.dek);
                        changed = true;
                    }
                }
                if changed {
                    put_json(txn, SECRETS, &k, &r)?;
                }
            }
            Ok(Response::SecretDone)
        }
        SecretCommand::Audit { records } => {
            append_audit(txn, records.iter().cloned(), now_ms)?;
            Ok(Response::SecretDone)
        }
    }
}

#[cfg(test)]
#[path = "secrets_test.rs"]
mod tests;
