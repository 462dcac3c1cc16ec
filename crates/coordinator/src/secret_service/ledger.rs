//! The leader's ledger: uses of many-use tokens and refusals, counted in
//! memory and committed in batches with their audit records.

use std::sync::{Arc, Mutex};

use cloudless_secrets::AccessClaims;
use cloudless_state::{Command, SecretCommand};
use cloudless_types::{AccessTokenRecord, AuditRecord, SecretRecord};
use tonic::Status;

use super::caller::Caller;
use super::SecretApi;
use crate::clock::now_ms;
use crate::error::CoordinatorError;
use crate::handle::CoordinatorHandle;
use crate::refusals::{Counted, Refusals, REFUSAL_FLUSH};

/// Tokens allowing at most this many uses are counted synchronously: each
/// use is committed through Raft, with its audit record, before the answer
/// (exact across leader changes). Tokens allowing more go through the
/// [`Ledger`].
pub(crate) const STRICT_USES: u32 = 16;
/// How often the ledger commits what it counted.
const LEDGER_FLUSH: std::time::Duration = std::time::Duration::from_millis(10);

/// Uses of many-use tokens counted by the leader at once and committed in
/// batches (`RecordUses`) with their audit records, every [`LEDGER_FLUSH`].
/// A leader that dies loses at most that window of counts and records; a
/// token then allows at most that many extra uses.
#[derive(Debug, Default)]
pub(super) struct Ledger {
    /// The Raft term these counts belong to (a new term starts afresh from
    /// the committed state).
    term: u64,
    /// Per token: (uses committed when this leader first saw it, uses it
    /// counted since, of which not yet sent to Raft).
    counts: std::collections::HashMap<String, (u32, u32, u32)>,
    /// Allowed reads per token in this window: one audit record each,
    /// with the count and the window.
    reads: std::collections::HashMap<String, (AuditRecord, u32, i64)>,
    /// Refusals, of any call, counted in memory and committed aggregated
    /// at most every [`REFUSAL_FLUSH`].
    refusals: Refusals,
    /// When refusals were last committed.
    refusals_flushed: Option<std::time::Instant>,
    flusher: bool,
}

impl SecretApi {
    /// Records a refusal decided before any command could carry it: counted
    /// in memory and committed aggregated (see [`crate::refusals`]), so a
    /// caller cannot turn refusals into a Raft write each.
    pub(super) async fn refuse(&self, mut audit: AuditRecord, status: Status) -> Status {
        audit.allowed = false;
        self.handle.api_metrics().secret_refused(status.code());
        audit.detail = status.message().to_owned();
        audit.at_ms = now_ms();
        let mut ledger = self
            .ledger
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        ledger.refusals.add(audit);
        self.start_flusher(&mut ledger);
        status
    }

    /// Starts the ledger's flusher unless it runs.
    pub(super) fn start_flusher(&self, ledger: &mut Ledger) {
        if !ledger.flusher {
            ledger.flusher = true;
            tokio::spawn(flush_ledger(self.handle.clone(), self.ledger.clone()));
        }
    }

    /// Counts one use of the many-use token `tok` (signed as `claims`) by
    /// `caller` in the ledger, which commits it later with `audit`: the
    /// secret when the use is allowed, else the refusal (counted too).
    pub(super) fn count_use(
        &self,
        caller: &Caller,
        claims: &AccessClaims,
        tok: &AccessTokenRecord,
        secret: Option<Arc<SecretRecord>>,
        mut audit: AuditRecord,
        now: i64,
    ) -> Result<Arc<SecretRecord>, Status> {
        let reader = self.handle.reader();
        let term = self.handle.raft().metrics().borrow().current_term;
        let mut ledger = self
            .ledger
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if ledger.term != term {
            ledger.term = term;
            ledger.counts.clear();
        }
        if !ledger.counts.contains_key(&claims.jti) {
            // First use in this term: the committed count, read fresh.
            let committed = reader
                .access_token(&claims.jti)
                .map_err(CoordinatorError::from)?
                .map_or(tok.uses, |t| t.uses);
            ledger.counts.insert(claims.jti.clone(), (committed, 0, 0));
        }
        let (base, counted, _) = ledger.counts.get(&claims.jti).copied().unwrap_or_default();
        let mut at_base = AccessTokenRecord::clone(tok);
        at_base.uses = base;
        let verdict = cloudless_state::check_token_use(
            Some(&at_base),
            secret.as_deref(),
            &caller.actor,
            now,
            counted,
        );
        audit.at_ms = now;
        audit.allowed = verdict.is_ok();
        if let Err(why) = &verdict {
            audit.detail.clone_from(why);
            ledger.refusals.add(audit);
        } else {
            if let Some(c) = ledger.counts.get_mut(&claims.jti) {
                c.1 += 1;
                c.2 += 1;
            }
            let e = ledger
                .reads
                .entry(claims.jti.clone())
                .or_insert_with(|| (audit, 0, now));
            e.1 += 1;
            e.0.at_ms = now;
        }
        self.start_flusher(&mut ledger);
        drop(ledger);
        match (verdict, secret) {
            (Ok(()), Some(s)) => Ok(s),
            (Err(why), _) => Err(Status::from(CoordinatorError::Denied(why))),
            (Ok(()), None) => Err(Status::from(CoordinatorError::NotFound(String::from(
                "the secret is gone",
            )))),
        }
    }
}

/// Commits the ledger's counts and audit records every [`LEDGER_FLUSH`]
/// (refusals at most every [`REFUSAL_FLUSH`]) while there are any; stops
/// when idle (the next use or refusal starts it again).
pub(super) async fn flush_ledger(handle: CoordinatorHandle, ledger: Arc<Mutex<Ledger>>) {
    loop {
        tokio::time::sleep(LEDGER_FLUSH).await;
        let (uses, audits) = {
            let mut l = ledger
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let unsent = l.counts.values().any(|c| c.2 > 0);
            if !unsent && l.reads.is_empty() && l.refusals.is_empty() {
                l.flusher = false;
                return;
            }
            let refusals_due = !l.refusals.is_empty()
                && l.refusals_flushed
                    .is_none_or(|t| t.elapsed() >= REFUSAL_FLUSH);
            if !unsent && l.reads.is_empty() && !refusals_due {
                continue;
            }
            let mut uses = Vec::new();
            for (id, c) in &mut l.counts {
                if c.2 > 0 {
                    uses.push((id.clone(), c.2));
                    c.2 = 0;
                }
            }
            let mut audits: Vec<Counted> = Vec::new();
            if refusals_due {
                l.refusals_flushed = Some(std::time::Instant::now());
                audits = l.refusals.take();
            }
            for (_, (mut a, n, first)) in l.reads.drain() {
                let last = a.at_ms;
                a.at_ms = first;
                a.detail = "many-use token".to_owned();
                audits.push((a, n, last));
            }
            audits.sort_by_key(|a| a.0.at_ms);
            (uses, audits)
        };
        let (count, records) = (uses.iter().map(|u| u.1).sum::<u32>(), audits.len());
        // In parts that each fit a Raft entry, however many tokens and
        // actors the window saw.
        let written = async {
            handle
                .write_in_parts(uses, |uses| {
                    Command::Secret(SecretCommand::RecordCounted {
                        uses,
                        audits: Vec::new(),
                    })
                })
                .await?;
            handle
                .write_in_parts(audits, |audits| {
                    Command::Secret(SecretCommand::RecordCounted {
                        uses: Vec::new(),
                        audits,
                    })
                })
                .await
        };
        if let Err(e) = written.await {
            tracing::warn!(
                error = %e,
                uses = count,
                audit_records = records,
                "token uses and audit records were not committed (leadership lost?)"
            );
        }
    }
}
