//! `Reconcile`: the whole decision of one reconcile pass, applied at once.

use redb::WriteTransaction;

use cloudless_types::{EventRecord, Workload};

use super::events::append_events;
use super::{replicas, workloads};
use crate::command::{ReconcileDecision, Response};
use crate::error::ApplyError;
use crate::tables::{get_json, workload_key, WORKLOADS};

/// Applies the parts of `d` in order (rollbacks, replicas marked Unknown,
/// removals, placements, Unknown cleared, events), each as its own command
/// would, skipping what no longer fits. Answered as a replica change so
/// that watchers look again.
///
/// A rollback gives no VIP (entries of earlier log formats gave none; a
/// workload without one gets it through `AssignServiceVips`), and an
/// ingress port of the restored spec that another workload took meanwhile
/// is dropped from it, with an `IngressPortDropped` event: the rollback
/// restores the replicas, the port stays with its holder.
pub(super) fn apply(
    txn: &WriteTransaction,
    d: &ReconcileDecision,
    now_ms: i64,
) -> Result<Response, ApplyError> {
    let mut changed = 0u32;
    let mut events = Vec::new();
    for rb in &d.rollbacks {
        let key = workload_key(&rb.namespace, &rb.name);
        if let Some(w) = get_json::<Workload>(txn, WORKLOADS, &key)? {
            // A newer spec applied since the decision wins.
            if w.template == rb.from_template {
                let mut spec = rb.spec.clone();
                if !spec.ingress_ports().is_empty() {
                    let others: Vec<Workload> = workloads::all(txn)?
                        .into_iter()
                        .filter(|o| (&o.namespace, &o.name) != (&w.namespace, &w.name))
                        .collect();
                    for (index, port, holder) in workloads::taken_ingress_ports(&others, &spec) {
                        spec.ports[index].ingress_port = 0;
                        events.push(EventRecord {
                            at_ms: now_ms,
                            kind: "Workload".into(),
                            namespace: w.namespace.clone(),
                            object: w.name.clone(),
                            reason: "IngressPortDropped".into(),
                            message: format!(
                                "rolled back without ingress port {port} (spec.ports[{index}]): {holder} holds it now"
                            ),
                        });
                    }
                }
                let back = Workload { spec, ..w };
                workloads::put(txn, &back, "rollback", now_ms, false)?;
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
    events.extend(d.events.iter().cloned());
    append_events(txn, &events, now_ms)?;
    Ok(Response::ReplicasChanged(changed))
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::histogram::Histogram;

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
                vip: None,
            },
            cause: "apply".into(),
            assign_vip: true,
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

    #[test]
    fn a_rollback_drops_an_ingress_port_another_workload_took_meanwhile() {
        use crate::command::{ReconcileDecision, Rollback};
        let dir = tempfile::tempdir().expect("tempdir");
        let sm =
            StateMachine::open(&dir.path().join("s.redb"), Histogram::new([1.0])).expect("open");
        let db = sm.db();
        let spec = |image: &str, ingress_port: u16| cloudless_types::WorkloadSpec {
            image: image.into(),
            replicas: 1,
            ports: vec![cloudless_types::ContainerPort {
                container_port: 8080,
                ingress_port,
                ..Default::default()
            }],
            ..Default::default()
        };
        let put = |name: &str, spec: cloudless_types::WorkloadSpec| Command::PutWorkload {
            workload: Workload {
                namespace: "default".into(),
                name: name.into(),
                spec,
                generation: 0,
                created_at_ms: 0,
                updated_at_ms: 0,
                template: 0,
                revisions: Vec::new(),
                vip: None,
            },
            cause: "apply".into(),
            assign_vip: true,
        };
        apply(db, put("web", spec("web:1", 80)), 0);
        apply(db, put("web", spec("web:2", 0)), 1);
        apply(db, put("shop", spec("shop:1", 80)), 2);
        let r = apply(
            db,
            Command::Reconcile(ReconcileDecision {
                rollbacks: vec![Rollback {
                    namespace: "default".into(),
                    name: "web".into(),
                    from_template: 2,
                    spec: spec("web:1", 80),
                }],
                ..ReconcileDecision::default()
            }),
            3,
        );
        assert_eq!(r, Response::ReplicasChanged(1));
        let web = sm
            .reader()
            .workload("default", "web")
            .expect("read")
            .expect("web");
        assert_eq!((web.spec.image.as_str(), web.template), ("web:1", 3));
        assert_eq!(web.spec.ports[0].ingress_port, 0, "shop keeps port 80");
        assert_eq!(web.vip.as_deref(), Some("10.96.0.2"), "its VIP stays");
        let (events, _) = sm.reader().events(None, |_| true).expect("events");
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].1.reason, "IngressPortDropped");
        assert!(
            events[0].1.message.contains("default/shop"),
            "{}",
            events[0].1.message
        );
    }
}
