//! Workloads: `PutWorkload`, `ScaleWorkload`, `DeleteWorkload`.

use redb::WriteTransaction;

use cloudless_types::{Revision, Workload, REVISION_HISTORY};

use super::replicas::{index_ids, remove_replica};
use crate::command::{Rejection, Response};
use crate::error::ApplyError;
use crate::tables::{get_json, put_json, remove, workload_key, WORKLOADS, WORKLOAD_REPLICAS};

/// `PutWorkload`: creates or updates a workload. A new template (a spec
/// change beyond the replica count) is a new revision; the history keeps
/// the last [`REVISION_HISTORY`].
pub(super) fn put(
    txn: &WriteTransaction,
    workload: &Workload,
    cause: &str,
    now_ms: i64,
) -> Result<Response, ApplyError> {
    let key = workload_key(&workload.namespace, &workload.name);
    let existing = get_json::<Workload>(txn, WORKLOADS, &key)?;
    let created = existing.is_none();
    let revision = |template: u64| Revision {
        template,
        spec: workload.spec.clone(),
        at_ms: now_ms,
        cause: cause.to_owned(),
    };
    let stored = match existing {
        Some(old) if old.spec == workload.spec => old,
        Some(old) if old.spec.same_template(&workload.spec) => Workload {
            spec: workload.spec.clone(),
            generation: old.generation + 1,
            updated_at_ms: now_ms,
            ..old
        },
        Some(old) => {
            let mut revisions = old.revisions.clone();
            revisions.push(revision(old.template + 1));
            let excess = revisions.len().saturating_sub(REVISION_HISTORY);
            revisions.drain(..excess);
            Workload {
                template: old.template + 1,
                spec: workload.spec.clone(),
                generation: old.generation + 1,
                updated_at_ms: now_ms,
                revisions,
                ..old
            }
        }
        None => Workload {
            generation: 1,
            template: 1,
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
            revisions: vec![revision(1)],
            ..workload.clone()
        },
    };
    put_json(txn, WORKLOADS, &key, &stored)?;
    Ok(Response::WorkloadStored {
        workload: stored,
        created,
    })
}

/// `ScaleWorkload`: sets the replica count.
pub(super) fn scale(
    txn: &WriteTransaction,
    namespace: &str,
    name: &str,
    replicas: u32,
    now_ms: i64,
) -> Result<Response, ApplyError> {
    let key = workload_key(namespace, name);
    let Some(mut w) = get_json::<Workload>(txn, WORKLOADS, &key)? else {
        return Ok(Response::Rejected(Rejection::WorkloadNotFound {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }));
    };
    if w.spec.replicas != replicas {
        w.spec.replicas = replicas;
        w.generation += 1;
        w.updated_at_ms = now_ms;
        put_json(txn, WORKLOADS, &key, &w)?;
    }
    Ok(Response::WorkloadStored {
        workload: w,
        created: false,
    })
}

/// `DeleteWorkload`: removes a workload and its replicas.
pub(super) fn delete(
    txn: &WriteTransaction,
    namespace: &str,
    name: &str,
) -> Result<Response, ApplyError> {
    let key = workload_key(namespace, name);
    if remove(txn, WORKLOADS, &key)? {
        let ids = index_ids(txn, WORKLOAD_REPLICAS, &format!("{key}/"))?;
        for id in ids {
            remove_replica(txn, &id)?;
        }
        Ok(Response::WorkloadDeleted)
    } else {
        Ok(Response::Rejected(Rejection::WorkloadNotFound {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::histogram::Histogram;

    use super::*;
    use crate::apply::testing::apply;
    use crate::command::Command;
    use crate::StateMachine;

    #[test]
    fn template_changes_make_revisions_and_the_history_is_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sm =
            StateMachine::open(&dir.path().join("s.redb"), Histogram::new([1.0])).expect("open");
        let put = |image: &str, replicas: u32, cause: &str, at: i64| {
            let w = Workload {
                namespace: "default".into(),
                name: "web".into(),
                spec: cloudless_types::WorkloadSpec {
                    image: image.into(),
                    replicas,
                    ..Default::default()
                },
                generation: 0,
                created_at_ms: 0,
                updated_at_ms: 0,
                template: 0,
                revisions: Vec::new(),
            };
            match apply(
                sm.db(),
                Command::PutWorkload {
                    workload: w,
                    cause: cause.into(),
                },
                at,
            ) {
                Response::WorkloadStored { workload, .. } => workload,
                other => panic!("{other:?}"),
            }
        };
        let w = put("busybox:1", 2, "apply", 10);
        assert_eq!((w.template, w.revisions.len()), (1, 1));
        // The replica count alone is not a new revision.
        let w = put("busybox:1", 5, "apply", 20);
        assert_eq!((w.template, w.revisions.len()), (1, 1));
        let w = put("busybox:2", 5, "apply", 30);
        let w2 = put("busybox:1", 5, "undo to 1", 40);
        assert_eq!(w.template, 2);
        assert_eq!(w2.template, 3, "an undo is a new revision");
        let history: Vec<(u64, &str, &str, i64)> = w2
            .revisions
            .iter()
            .map(|r| (r.template, r.spec.image.as_str(), r.cause.as_str(), r.at_ms))
            .collect();
        assert_eq!(
            history,
            [
                (1, "busybox:1", "apply", 10),
                (2, "busybox:2", "apply", 30),
                (3, "busybox:1", "undo to 1", 40)
            ]
        );
        let mut last = w2;
        for i in 0..12 {
            last = put(&format!("busybox:{}", 10 + i), 5, "apply", 50 + i);
        }
        assert_eq!(last.revisions.len(), REVISION_HISTORY);
        assert_eq!(last.revisions.last().map(|r| r.template), Some(15));
        assert_eq!(last.revisions[0].template, 6, "the oldest are dropped");
    }
}
