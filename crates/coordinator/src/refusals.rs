//! Refusal audits counted in memory and committed aggregated, so a caller
//! that provokes refusals as fast as it can (a junk token, a secret that does
//! not exist) costs one small Raft write per [`REFUSAL_FLUSH`] in all, not
//! one per call.
//!
//! Within a flush, repeats of a refusal (same actor, action, secret and
//! reason) are one record with a count; each actor gets at most
//! [`DISTINCT_PER_ACTOR`] such records, and everything beyond is counted in
//! one more record per actor and action, its secret and reason not itemised.

use std::collections::HashMap;

use cloudless_types::AuditRecord;

/// Refusals are committed at most this often.
pub(crate) const REFUSAL_FLUSH: std::time::Duration = std::time::Duration::from_millis(250);
/// Distinct refusals itemised per actor and flush.
pub(crate) const DISTINCT_PER_ACTOR: usize = 16;
/// What the record counting the rest says.
pub(crate) const NOT_ITEMISED: &str =
    "further refusals (secrets and reasons not itemised: more than 16 distinct in one flush)";

/// A record standing for `count` occurrences, the latest at `last_at_ms`.
pub(crate) type Counted = (AuditRecord, u32, i64);

/// Refusals counted since the last flush.
#[derive(Debug, Default)]
pub(crate) struct Refusals {
    itemised: HashMap<(String, String, String, String, String), Counted>,
    per_actor: HashMap<String, usize>,
    rest: HashMap<(String, String), Counted>,
}

impl Refusals {
    /// Counts one refusal (`audit.at_ms` set, `allowed` false).
    pub(crate) fn add(&mut self, audit: AuditRecord) {
        let at = audit.at_ms;
        let key = (
            audit.actor.clone(),
            audit.action.clone(),
            audit.namespace.clone(),
            audit.secret.clone(),
            audit.detail.clone(),
        );
        if let Some(c) = self.itemised.get_mut(&key) {
            c.1 = c.1.saturating_add(1);
            c.2 = c.2.max(at);
            return;
        }
        let distinct = self.per_actor.entry(audit.actor.clone()).or_default();
        if *distinct < DISTINCT_PER_ACTOR {
            *distinct += 1;
            self.itemised.insert(key, (audit, 1, at));
            return;
        }
        let c = self
            .rest
            .entry((audit.actor.clone(), audit.action.clone()))
            .or_insert_with(|| {
                let mut a = audit;
                a.namespace.clear();
                a.secret.clear();
                a.token_id.clear();
                a.detail = NOT_ITEMISED.to_owned();
                (a, 0, at)
            });
        c.1 = c.1.saturating_add(1);
        c.2 = c.2.max(at);
    }

    /// Whether nothing was counted since the last [`Self::take`].
    pub(crate) fn is_empty(&self) -> bool {
        self.itemised.is_empty() && self.rest.is_empty()
    }

    /// Everything counted, oldest first, and starts afresh.
    pub(crate) fn take(&mut self) -> Vec<Counted> {
        self.per_actor.clear();
        let mut out: Vec<Counted> = self
            .itemised
            .drain()
            .map(|(_, c)| c)
            .chain(self.rest.drain().map(|(_, c)| c))
            .collect();
        out.sort_by_key(|c| c.0.at_ms);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(actor: &str, secret: &str, at: i64) -> AuditRecord {
        AuditRecord {
            at_ms: at,
            actor: actor.into(),
            source: String::new(),
            action: "read".into(),
            namespace: "prod".into(),
            secret: secret.into(),
            token_id: String::new(),
            allowed: false,
            detail: "bad signature".into(),
        }
    }

    #[test]
    fn repeats_of_one_refusal_are_one_record_with_a_count() {
        let mut r = Refusals::default();
        for at in 0..1000 {
            r.add(refusal("node:evil", "db", at));
        }
        let out = r.take();
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].1, out[0].0.at_ms, out[0].2), (1000, 0, 999));
        assert!(r.is_empty());
    }

    #[test]
    fn a_caller_varying_its_refusals_gets_a_bounded_number_of_records() {
        let mut r = Refusals::default();
        for i in 0..10_000 {
            r.add(refusal("node:evil", &format!("s{i}"), i));
        }
        r.add(refusal("node:good", "db", 5));
        let out = r.take();
        assert_eq!(
            out.len(),
            DISTINCT_PER_ACTOR + 2,
            "16 itemised, 1 rest, 1 other actor"
        );
        let rest = out
            .iter()
            .find(|c| c.0.detail == NOT_ITEMISED)
            .expect("the rest is counted");
        assert_eq!(rest.1 as usize, 10_000 - DISTINCT_PER_ACTOR);
        assert_eq!(
            out.iter().map(|c| u64::from(c.1)).sum::<u64>(),
            10_001,
            "every refusal is counted"
        );
        assert!(out.iter().any(|c| c.0.actor == "node:good"));
    }
}
