//! Secrets in the state machine: ciphertext records, the sealed master
//! keyring, access tokens (uses counted, revocation at once) and the audit
//! log. Nothing here sees plaintext or key material in the clear.

use redb::{ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle, WriteTransaction};

use cloudless_types::{
    AccessTokenRecord, AuditLogEntry, AuditRecord, SecretKeyring, SecretRecord,
    SECRET_VERSIONS_KEPT,
};

use crate::command::{ClusterInfo, Rejection, Response, SecretCommand};
use crate::state_machine::{get_json, put_json, CLUSTER, CLUSTER_KEY};

/// `namespace/name` -> SecretRecord.
pub(crate) const SECRETS: TableDefinition<&str, &str> = TableDefinition::new("secrets");
/// `keyring` -> SecretKeyring.
pub(crate) const SECRET_KEYS: TableDefinition<&str, &str> = TableDefinition::new("secret_keys");
/// token id -> AccessTokenRecord.
pub(crate) const ACCESS_TOKENS: TableDefinition<&str, &str> = TableDefinition::new("access_tokens");
/// `<expiry ms, 20 digits>/<token id>` -> `null`: token records by expiry,
/// so expired ones can be dropped.
pub(crate) const ACCESS_TOKEN_EXPIRY: TableDefinition<&str, &str> =
    TableDefinition::new("access_token_expiry");
/// How long a token's record outlives its expiry. Until then a late use is
/// refused as expired by the record too; after it the JWT's own `exp` check
/// refuses it (the record is gone, and so is the use count).
pub const TOKEN_RECORD_GRACE_MS: i64 = 3_600_000;
/// `<sequence, 20 digits>` -> AuditRecord; `~seq` holds the next sequence.
pub(crate) const AUDIT: TableDefinition<&str, &str> = TableDefinition::new("audit");
pub(crate) const KEYRING_KEY: &str = "keyring";
const AUDIT_SEQ_KEY: &str = "~seq";
const DAY_MS: i64 = 86_400_000;

pub(crate) fn secret_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

fn keyring(txn: &WriteTransaction) -> Result<SecretKeyring, String> {
    Ok(get_json(txn, SECRET_KEYS, KEYRING_KEY)?.unwrap_or_default())
}

/// `<actor>\n<action>\n<allowed>\n<namespace>\n<secret>\n<refusal reason>` -> the `AUDIT` key
/// of the record that counts repeats of it in the current window.
pub(crate) const AUDIT_OPEN: TableDefinition<&str, &str> = TableDefinition::new("audit_open");
/// Longest text kept in a stored audit field (actor, source, namespace,
/// secret, token id, detail); refusals carry caller-chosen text.
pub const AUDIT_FIELD_MAX: usize = 256;

/// The cluster configuration, or the defaults before `InitCluster`.
fn config(txn: &WriteTransaction) -> Result<cloudless_types::ClusterConfig, String> {
    Ok(get_json::<ClusterInfo>(txn, CLUSTER, CLUSTER_KEY)?
        .map(|c| c.config)
        .unwrap_or_default())
}

fn truncate(s: &mut String) {
    if s.len() > AUDIT_FIELD_MAX {
        let mut cut = AUDIT_FIELD_MAX;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
}

/// Repeats of what: the actor, action and secret, and for a refusal its reason.
fn aggregate_key(r: &AuditRecord) -> String {
    let why = if r.allowed { "" } else { r.detail.as_str() };
    format!(
        "{}\n{}\n{}\n{}\n{}\n{why}",
        r.actor, r.action, r.allowed, r.namespace, r.secret
    )
}

/// Appends audit records (stamped with `now_ms` when 0). A read, token mint
/// or refusal repeating one (same actor, action, outcome, secret and reason
/// of refusal) first
/// seen less than `audit_aggregate_window_s` ago is counted in that record
/// instead. Then drops records older than `audit_retention_days` and, beyond
/// `audit_max_records`, the oldest.
fn append_audit(
    txn: &WriteTransaction,
    records: impl IntoIterator<Item = AuditRecord>,
    now_ms: i64,
) -> Result<(), String> {
    append_counted(txn, records.into_iter().map(|r| (r, 1, 0)), now_ms)
}

/// [`append_audit`] of records standing for `count` occurrences, the latest
/// at `last_at_ms` (0: at the record's `at_ms`).
fn append_counted(
    txn: &WriteTransaction,
    records: impl IntoIterator<Item = (AuditRecord, u32, i64)>,
    now_ms: i64,
) -> Result<(), String> {
    let config = config(txn)?;
    let window_ms = i64::from(config.audit_aggregate_window_s) * 1000;
    let mut table = txn.open_table(AUDIT).map_err(|e| e.to_string())?;
    let mut open = txn.open_table(AUDIT_OPEN).map_err(|e| e.to_string())?;
    let mut seq: u64 = match table.get(AUDIT_SEQ_KEY).map_err(|e| e.to_string())? {
        Some(v) => v
            .value()
            .parse()
            .map_err(|e| format!("audit sequence: {e}"))?,
        None => 0,
    };
    for (mut r, n, last_at_ms) in records {
        if r.at_ms == 0 {
            r.at_ms = now_ms;
        }
        let n = n.max(1);
        let last_at_ms = last_at_ms.max(r.at_ms);
        for f in [
            &mut r.actor,
            &mut r.source,
            &mut r.namespace,
            &mut r.secret,
            &mut r.token_id,
            &mut r.detail,
        ] {
            truncate(f);
        }
        let agg = r.aggregates().then(|| aggregate_key(&r));
        if let Some(agg) = &agg {
            let at = open
                .get(agg.as_str())
                .map_err(|e| e.to_string())?
                .map(|v| v.value().to_owned());
            let existing = match &at {
                Some(k) => table
                    .get(k.as_str())
                    .map_err(|e| e.to_string())?
                    .and_then(|v| serde_json::from_str::<AuditLogEntry>(v.value()).ok()),
                None => None,
            };
            if let (Some(k), Some(mut e)) = (at, existing) {
                if r.at_ms.saturating_sub(e.record.at_ms) < window_ms {
                    e.count = e.count.saturating_add(n);
                    e.last_at_ms = e.last_at_ms.max(last_at_ms);
                    e.record.detail = r.detail;
                    e.record.source = r.source;
                    e.record.token_id = r.token_id;
                    let v = serde_json::to_string(&e).map_err(|e| e.to_string())?;
                    table
                        .insert(k.as_str(), v.as_str())
                        .map_err(|e| e.to_string())?;
                    continue;
                }
            }
        }
        let key = format!("{seq:020}");
        let entry = AuditLogEntry {
            last_at_ms,
            record: r,
            count: n,
        };
        let v = serde_json::to_string(&entry).map_err(|e| e.to_string())?;
        table
            .insert(key.as_str(), v.as_str())
            .map_err(|e| e.to_string())?;
        if let Some(agg) = &agg {
            open.insert(agg.as_str(), key.as_str())
                .map_err(|e| e.to_string())?;
        }
        seq += 1;
    }
    table
        .insert(AUDIT_SEQ_KEY, seq.to_string().as_str())
        .map_err(|e| e.to_string())?;
    // Retention: records are in time order; drop from the front while old
    // or while over the cap (the sequence row sorts last and is not counted).
    let cutoff = now_ms - i64::from(config.audit_retention_days) * DAY_MS;
    let mut count = table.len().map_err(|e| e.to_string())?.saturating_sub(1);
    let cap = u64::from(config.audit_max_records);
    loop {
        let Some((k, v)) = table
            .first()
            .map_err(|e| e.to_string())?
            .map(|(k, v)| (k.value().to_owned(), v.value().to_owned()))
        else {
            break;
        };
        if k.as_str() >= AUDIT_SEQ_KEY {
            break;
        }
        let entry = serde_json::from_str::<AuditLogEntry>(&v).ok();
        let at = entry.as_ref().map_or(i64::MAX, |e| e.record.at_ms);
        if at >= cutoff && count <= cap {
            break;
        }
        table.remove(k.as_str()).map_err(|e| e.to_string())?;
        count = count.saturating_sub(1);
        if let Some(e) = entry.filter(|e| e.record.aggregates()) {
            let agg = aggregate_key(&e.record);
            let points_here = open
                .get(agg.as_str())
                .map_err(|e| e.to_string())?
                .is_some_and(|v| v.value() == k);
            if points_here {
                open.remove(agg.as_str()).map_err(|e| e.to_string())?;
            }
        }
    }
    Ok(())
}

/// Removes the soonest-expiring token records while there are more than `cap`.
fn drop_tokens_over(txn: &WriteTransaction, cap: u64) -> Result<(), String> {
    let mut tokens = txn.open_table(ACCESS_TOKENS).map_err(|e| e.to_string())?;
    let mut expiry = txn
        .open_table(ACCESS_TOKEN_EXPIRY)
        .map_err(|e| e.to_string())?;
    while tokens.len().map_err(|e| e.to_string())? > cap {
        let Some((ek, _)) = expiry.pop_first().map_err(|e| e.to_string())? else {
            break;
        };
        if let Some((_, id)) = ek.value().split_once('/') {
            tokens.remove(id).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

fn expiry_key(expires_at_ms: i64, id: &str) -> String {
    format!("{:020}/{id}", expires_at_ms.max(0))
}

/// Stores `audit` with `allowed` and `detail` set, then returns `r`.
fn audited(
    txn: &WriteTransaction,
    mut audit: AuditRecord,
    now_ms: i64,
    outcome: Result<Response, Rejection>,
) -> Result<Response, String> {
    match &outcome {
        Ok(_) => audit.allowed = true,
        Err(why) => {
            audit.allowed = false;
            audit.detail = why.to_string();
        }
    }
    append_audit(txn, [audit], now_ms)?;
    Ok(outcome.unwrap_or_else(Response::Rejected))
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
fn wrapped_by(txn: &WriteTransaction, version: u32) -> Result<Option<String>, String> {
    let table = txn.open_table(SECRETS).map_err(|e| e.to_string())?;
    for item in table.iter().map_err(|e| e.to_string())? {
        let (k, v) = item.map_err(|e| e.to_string())?;
        let r: SecretRecord = serde_json::from_str(v.value())
            .map_err(|e| format!("{} record {:?} is corrupt: {e}", SECRETS.name(), k.value()))?;
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
) -> Result<Response, String> {
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
            let removed = txn
                .open_table(SECRETS)
                .map_err(|e| e.to_string())?
                .remove(key.as_str())
                .map_err(|e| e.to_string())?
                .is_some();
            let outcome = if removed {
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
            txn.open_table(ACCESS_TOKEN_EXPIRY)
                .map_err(|e| e.to_string())?
                .insert(expiry_key(token.expires_at_ms, &token.id).as_str(), "null")
                .map_err(|e| e.to_string())?;
            // The table holds about one grace period's worth of expired
            // tokens however many agents mint (one single-use token per read).
            crate::state_machine::drop_indexed_before(
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
