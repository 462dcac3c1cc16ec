//! Replicas and their indexes: `PlaceReplicas`, `MarkReplicasUnknown`,
//! `RemoveReplicas`, `UpdateReplicas`.
//!
//! A replica is stored under its id in `replicas`, and indexed by node in
//! `node_replicas` and by workload in `workload_replicas`; the three change
//! together.

use redb::{ReadableTable, TableDefinition, WriteTransaction};

use cloudless_types::{NodeRecord, ReplicaRecord, ReplicaState, Workload};

use crate::command::{ReplicaUpdate, Response};
use crate::error::{ApplyError, RedbContext};
use crate::tables::{
    get_json, put_json, put_raw, remove, NODES, NODE_REPLICAS, REPLICAS, WORKLOADS,
    WORKLOAD_REPLICAS,
};

/// `PlaceReplicas`: stores new replicas, skipping any whose workload moved
/// to another template, whose node is gone or whose id exists.
pub(super) fn place(
    txn: &WriteTransaction,
    replicas: &[ReplicaRecord],
    now_ms: i64,
) -> Result<Response, ApplyError> {
    let mut placed = 0u32;
    for r in replicas {
        let w = get_json::<Workload>(txn, WORKLOADS, &r.workload_key())?;
        let current = w.is_some_and(|w| w.template == r.template);
        if !current
            || get_json::<NodeRecord>(txn, NODES, &r.node_id)?.is_none()
            || get_json::<ReplicaRecord>(txn, REPLICAS, &r.id)?.is_some()
        {
            continue;
        }
        let rec = ReplicaRecord {
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
            ..r.clone()
        };
        put_json(txn, REPLICAS, &r.id, &rec)?;
        put_raw(
            txn,
            NODE_REPLICAS,
            &format!("{}/{}", r.node_id, r.id),
            &r.id,
        )?;
        put_raw(
            txn,
            WORKLOAD_REPLICAS,
            &format!("{}/{}", r.workload_key(), r.id),
            &r.id,
        )?;
        placed += 1;
    }
    Ok(Response::ReplicasChanged(placed))
}

/// `MarkReplicasUnknown`: marks replicas disconnected (their node is down)
/// or clears the mark.
pub(super) fn mark_unknown(
    txn: &WriteTransaction,
    ids: &[String],
    unknown: bool,
    now_ms: i64,
) -> Result<Response, ApplyError> {
    let mut changed = 0u32;
    for id in ids {
        let Some(mut r) = get_json::<ReplicaRecord>(txn, REPLICAS, id)? else {
            continue;
        };
        let at = if unknown { now_ms.max(1) } else { 0 };
        if (r.disconnected_at_ms > 0) != unknown {
            r.disconnected_at_ms = at;
            put_json(txn, REPLICAS, id, &r)?;
            changed += 1;
        }
    }
    Ok(Response::ReplicasChanged(changed))
}

/// `RemoveReplicas`: removes replicas (those already gone are skipped).
pub(super) fn remove_all(txn: &WriteTransaction, ids: &[String]) -> Result<Response, ApplyError> {
    let mut removed = 0u32;
    for id in ids {
        if remove_replica(txn, id)? {
            removed += 1;
        }
    }
    Ok(Response::ReplicasChanged(removed))
}

/// `UpdateReplicas`: records what agents report, each only from the node
/// the replica is assigned to.
pub(super) fn update(
    txn: &WriteTransaction,
    updates: &[ReplicaUpdate],
    now_ms: i64,
) -> Result<Response, ApplyError> {
    let mut changed = 0u32;
    for u in updates {
        let Some(mut r) = get_json::<ReplicaRecord>(txn, REPLICAS, &u.id)? else {
            continue;
        };
        if r.node_id != u.node_id {
            continue;
        }
        if r.state != u.state {
            r.updated_at_ms = now_ms;
        }
        if u.state == ReplicaState::Ready && r.ready_at_ms == 0 {
            r.ready_at_ms = now_ms;
        }
        r.state = u.state;
        r.exit_code = u.exit_code;
        r.restarts = u.restarts;
        r.message.clone_from(&u.message);
        if !u.address.is_empty() {
            r.address.clone_from(&u.address);
        }
        put_json(txn, REPLICAS, &u.id, &r)?;
        changed += 1;
    }
    Ok(Response::ReplicasChanged(changed))
}

/// Values of index rows whose key starts with `prefix`.
pub(super) fn index_ids(
    txn: &WriteTransaction,
    def: TableDefinition<&str, &str>,
    prefix: &str,
) -> Result<Vec<String>, ApplyError> {
    let table = txn.open_table(def).at(def, "open")?;
    let mut out = Vec::new();
    for item in table.range::<&str>(prefix..).at(def, "range")? {
        let (k, v) = item.at(def, "range")?;
        if !k.value().starts_with(prefix) {
            break;
        }
        out.push(v.value().to_owned());
    }
    Ok(out)
}

/// Removes a replica and its index rows; false when it did not exist.
pub(super) fn remove_replica(txn: &WriteTransaction, id: &str) -> Result<bool, ApplyError> {
    let Some(r) = get_json::<ReplicaRecord>(txn, REPLICAS, id)? else {
        return Ok(false);
    };
    remove(txn, REPLICAS, id)?;
    remove(txn, NODE_REPLICAS, &format!("{}/{id}", r.node_id))?;
    remove(
        txn,
        WORKLOAD_REPLICAS,
        &format!("{}/{id}", r.workload_key()),
    )?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::histogram::Histogram;

    use cloudless_types::JoinTokenRecord;

    use super::*;
    use crate::apply::testing::apply;
    use crate::command::Command;
    use crate::StateMachine;

    #[test]
    fn replicas_are_indexed_survive_a_reopen_and_go_with_their_workload() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.redb");
        let hist = || Histogram::new([1.0]);
        let sm = StateMachine::open(&path, hist()).expect("open");
        let token = JoinTokenRecord {
            id: "t1".into(),
            created_at_ms: 0,
            expires_at_ms: 1_000_000,
            max_uses: 5,
            uses: 0,
            revoked: false,
            labels: Default::default(),
        };
        apply(sm.db(), Command::CreateJoinToken { token }, 0);
        apply(
            sm.db(),
            Command::EnrollNode {
                token_id: "t1".into(),
                node: NodeRecord::new("n1".into(), "alpha".into(), "t1".into(), 0),
                assign_subnet: true,
            },
            0,
        );
        let spec = cloudless_types::WorkloadSpec {
            image: "busybox".into(),
            replicas: 1,
            ..Default::default()
        };
        let w = Workload {
            namespace: "default".into(),
            name: "web".into(),
            spec: spec.clone(),
            generation: 0,
            created_at_ms: 0,
            updated_at_ms: 0,
            template: 0,
            revisions: Vec::new(),
            vip: None,
        };
        apply(
            sm.db(),
            Command::PutWorkload {
                workload: w,
                cause: "apply".into(),
                assign_vip: true,
            },
            0,
        );
        let replica = |id: &str, node: &str, template: u64| ReplicaRecord {
            id: id.into(),
            namespace: "default".into(),
            workload: "web".into(),
            template,
            spec: spec.clone(),
            node_id: node.into(),
            state: ReplicaState::Pending,
            exit_code: None,
            restarts: 0,
            message: String::new(),
            created_at_ms: 0,
            updated_at_ms: 0,
            ready_at_ms: 0,
            disconnected_at_ms: 0,
            score: 0.0,
            address: String::new(),
            trace: String::new(),
        };
        // A stale template and an unknown node are skipped.
        let r = apply(
            sm.db(),
            Command::PlaceReplicas {
                replicas: vec![
                    replica("r1", "n1", 1),
                    replica("r2", "n1", 7),
                    replica("r3", "nx", 1),
                ],
            },
            5,
        );
        assert_eq!(r, Response::ReplicasChanged(1));
        // A report from another node is ignored.
        let update = |node: &str, address: &str| Command::UpdateReplicas {
            updates: vec![ReplicaUpdate {
                id: "r1".into(),
                node_id: node.into(),
                state: ReplicaState::Ready,
                exit_code: None,
                restarts: 0,
                message: String::new(),
                address: address.into(),
            }],
        };
        assert_eq!(
            apply(sm.db(), update("n2", "10.244.9.9"), 6),
            Response::ReplicasChanged(0)
        );
        assert_eq!(
            apply(sm.db(), update("n1", "10.244.0.5"), 6),
            Response::ReplicasChanged(1)
        );
        // A report without an address keeps the stored one.
        assert_eq!(
            apply(sm.db(), update("n1", ""), 7),
            Response::ReplicasChanged(1)
        );
        drop(sm);

        let sm = StateMachine::open(&path, hist()).expect("reopen with replicas");
        let reader = sm.reader();
        let on_node = reader.node_replicas("n1").expect("read");
        assert_eq!(on_node.len(), 1);
        assert_eq!(
            (on_node[0].state, on_node[0].ready_at_ms),
            (ReplicaState::Ready, 6)
        );
        assert_eq!(
            on_node[0].address, "10.244.0.5",
            "the reported address is stored"
        );
        assert_eq!(
            reader
                .workload_replicas("default", "web")
                .expect("read")
                .len(),
            1
        );
        apply(
            sm.db(),
            Command::DeleteWorkload {
                namespace: "default".into(),
                name: "web".into(),
            },
            7,
        );
        assert!(reader.replicas().expect("read").is_empty());
        assert!(reader.node_replicas("n1").expect("read").is_empty());
    }
}
