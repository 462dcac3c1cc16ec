//! `Reconcile`: the whole decision of one reconcile pass, applied at once.

use redb::WriteTransaction;

use cloudless_types::Workload;

use super::events::append_events;
use super::{replicas, workloads};
use crate::command::{ReconcileDecision, Response};
use crate::error::ApplyError;
use crate::tables::{get_json, workload_key, WORKLOADS};

/// Applies the parts of `d` in order (rollbacks, replicas marked Unknown,
/// removals, placements, Unknown cleared, events), each as its own command
/// would, skipping what no longer fits. Answered as a replica change so
/// that watchers look again.
pub(super) fn apply(
    txn: &WriteTransaction,
    d: &ReconcileDecision,
    now_ms: i64,
) -> Result<Response, ApplyError> {
    let mut changed = 0u32;
    for rb in &d.rollbacks {
        let key = workload_key(&rb.namespace, &rb.name);
        if let Some(w) = get_json::<Workload>(txn, WORKLOADS, &key)? {
            // A newer spec applied since the decision wins.
            if w.template == rb.from_template {
                let back = Workload {
                    spec: rb.spec.clone(),
                    ..w
                };
                workloads::put(txn, &back, "rollback", now_ms)?;
                changed = changed.saturating_add(1);
            }
        }
    }
    let parts = [
        replicas::mark_unknown(txn, &d.mark_unknown, true, now_ms)?,
        replicas::remove_all(txn, &d.remove)?,
        replicas::place(txn, &d.place, now_ms)?,
        replicas::mark_unknown(txn, &d.clear_unknown, false, now_ms)?,
    ];
    for part in parts {
        if let Response::ReplicasChanged(n) = part {
            changed = changed.saturating_add(n);
        }
    }
    append_events(txn, &d.events, now_ms)?;
    Ok(Response::ReplicasChanged(changed))
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::histogram::Histogram;

    use cloudless_types::EventRecord;

    use super::*;
    use crate::apply::testing::apply;
    use crate::command::Command;
    use crate::StateMachine;

    #[test]
    fn a_reconcile_decision_applies_whole_and_its_rollback_yields_to_a_newer_spec() {
        use crate::command::{ReconcileDecision, Rollback};
        let dir = tempfile::tempdir().expect("tempdir");
        let sm =
            StateMachine::open(&dir.path().join("s.redb"), Histogram::new([1.0])).expect("open");
        let spec = |image: &str| cloudless_types::WorkloadSpec {
            image: image.into(),
            replicas: 1,
            ..Default::default()
        };
        let put = |image: &str| Command::PutWorkload {
            workload: Workload {
                namespace: "default".into(),
                name: "web".into(),
                spec: spec(image),
                generation: 0,
                created_at_ms: 0,
                updated_at_ms: 0,
                template: 0,
                revisions: Vec::new(),
            },
            cause: "apply".into(),
        };
        apply(sm.db(), put("web:1"), 0);
        apply(sm.db(), put("web:2"), 0);
        let current = || {
            sm.reader()
                .workload("default", "web")
                .expect("read")
                .expect("present")
        };
        let event = EventRecord {
            at_ms: 0,
            kind: "Workload".into(),
            namespace: "default".into(),
            object: "web".into(),
            reason: "RolledBack".into(),
            message: "back to web:1".into(),
        };
        let rollback = |from_template: u64| {
            Command::Reconcile(ReconcileDecision {
                rollbacks: vec![Rollback {
                    namespace: "default".into(),
                    name: "web".into(),
                    from_template,
                    spec: spec("web:1"),
                }],
                events: vec![event.clone()],
                ..ReconcileDecision::default()
            })
        };
        // Decided while template 1 was current: template 2 came since, and wins.
        apply(sm.db(), rollback(1), 5);
        assert_eq!(current().spec.image, "web:2");
        assert_eq!(current().template, 2);
        // Decided on template 2: rolled back, as a new template, with its event.
        let r = apply(sm.db(), rollback(2), 6);
        assert!(matches!(r, Response::ReplicasChanged(_)), "{r:?}");
        let w = current();
        assert_eq!((w.spec.image.as_str(), w.template), ("web:1", 3));
        assert_eq!(
            w.revisions.last().map(|r| r.cause.as_str()),
            Some("rollback")
        );
        let (events, _) = sm.reader().events(None, |_| true).expect("events");
        assert_eq!(events.len(), 2, "one event per applied decision");
        assert_eq!(events[1].1.at_ms, 6);
    }
}
