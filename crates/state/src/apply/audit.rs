//! The audit log of secret access: records appended by the secret
//! commands, repeats within a window counted in one record, and retention by
//! age and count (both from the cluster configuration).

use redb::{ReadableTable, WriteTransaction};

use cloudless_types::{AuditLogEntry, AuditRecord};

use super::cluster::config;
use crate::command::{Rejection, Response};
use crate::error::{ApplyError, RedbContext};
use crate::seq_log::SeqLog;
use crate::tables::{AUDIT, AUDIT_OPEN};

/// Longest text kept in a stored audit field (actor, source, namespace,
/// secret, token id, detail); refusals carry caller-chosen text.
pub const AUDIT_FIELD_MAX: usize = 256;

const DAY_MS: i64 = 86_400_000;

/// Cuts `s` to [`AUDIT_FIELD_MAX`] bytes (at a character boundary), marked with `…`.
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
/// of refusal) first seen less than `audit_aggregate_window_s` ago is
/// counted in that record instead. Then drops records older than
/// `audit_retention_days` and, beyond `audit_max_records`, the oldest.
pub(super) fn append_audit(
    txn: &WriteTransaction,
    records: impl IntoIterator<Item = AuditRecord>,
    now_ms: i64,
) -> Result<(), ApplyError> {
    append_counted(txn, records.into_iter().map(|r| (r, 1, 0)), now_ms)
}

/// [`append_audit`] of records standing for `count` occurrences, the latest
/// at `last_at_ms` (0: at the record's `at_ms`).
pub(super) fn append_counted(
    txn: &WriteTransaction,
    records: impl IntoIterator<Item = (AuditRecord, u32, i64)>,
    now_ms: i64,
) -> Result<(), ApplyError> {
    let config = config(txn)?;
    let window_ms = i64::from(config.audit_aggregate_window_s) * 1000;
    let mut log = SeqLog::open(txn, AUDIT)?;
    let mut open = txn.open_table(AUDIT_OPEN).at(AUDIT_OPEN, "open")?;
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
                .at(AUDIT_OPEN, "get")?
                .map(|v| v.value().to_owned());
            let existing = match &at {
                Some(k) => log
                    .get_raw(k)?
                    .and_then(|v| serde_json::from_str::<AuditLogEntry>(&v).ok()),
                None => None,
            };
            if let (Some(k), Some(mut e)) = (at, existing) {
                if r.at_ms.saturating_sub(e.record.at_ms) < window_ms {
                    e.count = e.count.saturating_add(n);
                    e.last_at_ms = e.last_at_ms.max(last_at_ms);
                    e.record.detail = r.detail;
                    e.record.source = r.source;
                    e.record.token_id = r.token_id;
                    log.replace(&k, &e)?;
                    continue;
                }
            }
        }
        let key = log.append(&AuditLogEntry {
            last_at_ms,
            record: r,
            count: n,
        })?;
        if let Some(agg) = &agg {
            open.insert(agg.as_str(), key.as_str())
                .at(AUDIT_OPEN, "insert")?;
        }
    }
    log.store_next()?;
    // Retention: records are in time order; drop from the front while old
    // or while over the cap.
    let cutoff = now_ms - i64::from(config.audit_retention_days) * DAY_MS;
    let mut count = log.len()?;
    let cap = u64::from(config.audit_max_records);
    while let Some((k, v)) = log.oldest()? {
        let entry = serde_json::from_str::<AuditLogEntry>(&v).ok();
        let at = entry.as_ref().map_or(i64::MAX, |e| e.record.at_ms);
        if at >= cutoff && count <= cap {
            break;
        }
        log.remove(&k)?;
        count = count.saturating_sub(1);
        if let Some(e) = entry.filter(|e| e.record.aggregates()) {
            let agg = aggregate_key(&e.record);
            let points_here = open
                .get(agg.as_str())
                .at(AUDIT_OPEN, "get")?
                .is_some_and(|v| v.value() == k);
            if points_here {
                open.remove(agg.as_str()).at(AUDIT_OPEN, "remove")?;
            }
        }
    }
    Ok(())
}

/// Stores `audit` with `allowed` and `detail` set, then returns `r`.
pub(super) fn audited(
    txn: &WriteTransaction,
    mut audit: AuditRecord,
    now_ms: i64,
    outcome: Result<Response, Rejection>,
) -> Result<Response, ApplyError> {
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
