//! Join tokens and nodes: `CreateJoinToken`, `RevokeJoinToken`,
//! `EnrollNode`, `SetNodeFlags`, `SetNodeLabels`, `AcceptNodeCapacity`,
//! `RemoveNode`, `UpdateNodes`, `RenewNodeCert`, `AssignNodeSubnets`.
//!
//! Replica subnets: a node gets the lowest `/node_prefix_len` of the
//! cluster's `network.cluster_cidr` that no node record holds, when it
//! enrolls (or, enrolled before subnets existed, through
//! `AssignNodeSubnets`). It keeps it for as long as its record exists
//! (renewals and rejoins keep the record); `RemoveNode` deletes the record,
//! which frees the subnet for the next enrollment.

use std::collections::BTreeMap;

use redb::{ReadableTable, WriteTransaction};

use cloudless_types::{
    EventRecord, JoinTokenRecord, NodePhase, NodeRecord, ReplicaRecord, Resources,
};

use super::events::append_events;
use super::replicas::{index_ids, remove_replica};
use crate::command::{NodeUpdate, Rejection, Response};
use crate::error::{ApplyError, RedbContext};
use crate::tables::{
    self, get_json, put_json, put_raw, JOIN_TOKENS, NODES, NODE_NAMES, NODE_REPLICAS, REPLICAS,
};

/// `CreateJoinToken`: stores a new join token.
pub(super) fn create_join_token(
    txn: &WriteTransaction,
    token: &JoinTokenRecord,
) -> Result<Response, ApplyError> {
    if get_json::<JoinTokenRecord>(txn, JOIN_TOKENS, &token.id)?.is_some() {
        return Ok(Response::Rejected(Rejection::JoinToken {
            id: token.id.clone(),
            problem: "already exists".into(),
        }));
    }
    put_json(txn, JOIN_TOKENS, &token.id, token)?;
    Ok(Response::JoinToken(token.clone()))
}

/// `RevokeJoinToken`: no more enrollments with the token.
pub(super) fn revoke_join_token(
    txn: &WriteTransaction,
    token_id: &str,
) -> Result<Response, ApplyError> {
    let Some(mut t) = get_json::<JoinTokenRecord>(txn, JOIN_TOKENS, token_id)? else {
        return Ok(Response::Rejected(Rejection::JoinToken {
            id: token_id.to_owned(),
            problem: "is unknown".into(),
        }));
    };
    t.revoked = true;
    put_json(txn, JOIN_TOKENS, token_id, &t)?;
    Ok(Response::JoinToken(t))
}

/// `EnrollNode`: admits a node with a valid join token under a free name,
/// counting the token's use, and (with `assign_subnet`) gives it a replica
/// subnet.
pub(super) fn enroll(
    txn: &WriteTransaction,
    token_id: &str,
    node: &NodeRecord,
    assign_subnet: bool,
    now_ms: i64,
) -> Result<Response, ApplyError> {
    let refuse = |problem: String| {
        Ok(Response::Rejected(Rejection::JoinToken {
            id: token_id.to_owned(),
            problem,
        }))
    };
    let Some(mut t) = get_json::<JoinTokenRecord>(txn, JOIN_TOKENS, token_id)? else {
        return refuse("is unknown".into());
    };
    if t.revoked {
        return refuse("was revoked".into());
    }
    if now_ms >= t.expires_at_ms {
        return refuse("expired".into());
    }
    if t.uses >= t.max_uses {
        return refuse(format!("has been used {} of {} times", t.uses, t.max_uses));
    }
    let taken = {
        let names = txn.open_table(NODE_NAMES).at(NODE_NAMES, "open")?;
        let by_name = names
            .get(node.name.as_str())
            .at(NODE_NAMES, "get")?
            .map(|v| v.value().to_owned());
        drop(names);
        match by_name {
            Some(id) => Some(id),
            None => get_json::<NodeRecord>(txn, NODES, &node.id)?.map(|n| n.id),
        }
    };
    if let Some(id) = taken {
        return Ok(Response::Rejected(Rejection::NodeNameTaken {
            name: node.name.clone(),
            id,
        }));
    }
    let subnet = if assign_subnet {
        let network = super::cluster::config(txn)?.network;
        let nodes = all(txn)?;
        let Some(free) = network.free_node_subnet(nodes.iter().filter_map(|n| n.subnet.as_deref()))
        else {
            return Ok(Response::Rejected(Rejection::SubnetsExhausted {
                name: node.name.clone(),
                cluster_cidr: network.cluster_cidr,
                prefix_len: network.node_prefix_len,
            }));
        };
        Some(free.to_string())
    } else {
        node.subnet.clone()
    };
    t.uses += 1;
    put_json(txn, JOIN_TOKENS, token_id, &t)?;
    let record = NodeRecord {
        enrolled_at_ms: now_ms,
        token_id: token_id.to_owned(),
        labels: t.labels.clone(),
        phase_since_ms: now_ms,
        subnet,
        ..node.clone()
    };
    put_json(txn, NODES, &record.id, &record)?;
    put_raw(txn, NODE_NAMES, &record.name, &record.id)?;
    Ok(Response::Node(record))
}

/// `SetNodeFlags`: cordons or drains a node (draining also cordons).
pub(super) fn set_flags(
    txn: &WriteTransaction,
    node_id: &str,
    cordoned: Option<bool>,
    draining: Option<bool>,
) -> Result<Response, ApplyError> {
    let Some(mut n) = get_json::<NodeRecord>(txn, NODES, node_id)? else {
        return Ok(not_found(node_id));
    };
    if let Some(c) = cordoned {
        n.cordoned = c;
    }
    if let Some(d) = draining {
        n.draining = d;
        if d {
            n.cordoned = true;
        }
    }
    put_json(txn, NODES, node_id, &n)?;
    Ok(Response::Node(n))
}

/// `SetNodeLabels`: sets and removes a node's placement labels.
pub(super) fn set_labels(
    txn: &WriteTransaction,
    node_id: &str,
    set: &BTreeMap<String, String>,
    remove: &[String],
) -> Result<Response, ApplyError> {
    let Some(mut n) = get_json::<NodeRecord>(txn, NODES, node_id)? else {
        return Ok(not_found(node_id));
    };
    n.labels
        .extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
    for k in remove {
        n.labels.remove(k);
    }
    put_json(txn, NODES, node_id, &n)?;
    Ok(Response::Node(n))
}

/// `AcceptNodeCapacity`: trusts the capacity the node last reported.
pub(super) fn accept_capacity(
    txn: &WriteTransaction,
    node_id: &str,
) -> Result<Response, ApplyError> {
    let Some(mut n) = get_json::<NodeRecord>(txn, NODES, node_id)? else {
        return Ok(not_found(node_id));
    };
    n.trusted_capacity = n.status.capacity;
    put_json(txn, NODES, node_id, &n)?;
    Ok(Response::Node(n))
}

/// `RemoveNode`: removes a node, freeing its name, and its replicas with a
/// `Lost` event each.
pub(super) fn remove(
    txn: &WriteTransaction,
    node_id: &str,
    now_ms: i64,
) -> Result<Response, ApplyError> {
    let Some(n) = get_json::<NodeRecord>(txn, NODES, node_id)? else {
        return Ok(not_found(node_id));
    };
    tables::remove(txn, NODES, node_id)?;
    tables::remove(txn, NODE_NAMES, &n.name)?;
    // Its replicas go in the same entry: nothing supervises them any
    // more, so they are neither counted as running, nor endpoints,
    // nor callers; the reconciler places replacements at once.
    let mut events = Vec::new();
    for id in index_ids(txn, NODE_REPLICAS, &format!("{node_id}/"))? {
        let Some(r) = get_json::<ReplicaRecord>(txn, REPLICAS, &id)? else {
            continue;
        };
        remove_replica(txn, &id)?;
        events.push(EventRecord {
            at_ms: now_ms,
            kind: "Workload".into(),
            namespace: r.namespace,
            object: r.workload,
            reason: "Lost".into(),
            message: format!(
                "replica {id} on {}: its node was removed from the cluster; replacing it",
                n.name
            ),
        });
    }
    append_events(txn, &events, now_ms)?;
    Ok(Response::NodeRemoved)
}

/// `UpdateNodes`: folds liveness and status reports into node records,
/// skipping nodes that no longer exist.
pub(super) fn update(
    txn: &WriteTransaction,
    updates: &[NodeUpdate],
    now_ms: i64,
) -> Result<Response, ApplyError> {
    let mut applied = 0u32;
    for u in updates {
        let Some(mut n) = get_json::<NodeRecord>(txn, NODES, &u.node_id)? else {
            continue;
        };
        apply_node_update(&mut n, u, now_ms);
        put_json(txn, NODES, &u.node_id, &n)?;
        applied += 1;
    }
    Ok(Response::NodesUpdated(applied))
}

/// `RenewNodeCert`: records the expiry of a node's renewed certificate.
pub(super) fn renew_cert(
    txn: &WriteTransaction,
    node_id: &str,
    cert_not_after_ms: i64,
) -> Result<Response, ApplyError> {
    let Some(mut n) = get_json::<NodeRecord>(txn, NODES, node_id)? else {
        return Ok(not_found(node_id));
    };
    n.cert_not_after_ms = cert_not_after_ms;
    put_json(txn, NODES, node_id, &n)?;
    Ok(Response::Node(n))
}

/// `AssignNodeSubnets`: gives each listed node that has none the lowest
/// free subnet, in the order listed; skips nodes gone or holding one, and
/// stops when the range is exhausted.
pub(super) fn assign_subnets(
    txn: &WriteTransaction,
    node_ids: &[String],
) -> Result<Response, ApplyError> {
    let network = super::cluster::config(txn)?.network;
    let mut used: Vec<String> = all(txn)?.into_iter().filter_map(|n| n.subnet).collect();
    let mut assigned = 0u32;
    for id in node_ids {
        let Some(mut n) = get_json::<NodeRecord>(txn, NODES, id)? else {
            continue;
        };
        if n.subnet.is_some() {
            continue;
        }
        let Some(free) = network.free_node_subnet(used.iter().map(String::as_str)) else {
            break;
        };
        let subnet = free.to_string();
        used.push(subnet.clone());
        n.subnet = Some(subnet);
        put_json(txn, NODES, id, &n)?;
        assigned += 1;
    }
    Ok(Response::NodesUpdated(assigned))
}

/// Every node record.
pub(super) fn all(txn: &WriteTransaction) -> Result<Vec<NodeRecord>, ApplyError> {
    let table = txn.open_table(NODES).at(NODES, "open")?;
    let mut out = Vec::new();
    for item in table.iter().at(NODES, "iter")? {
        let (k, v) = item.at(NODES, "iter")?;
        out.push(tables::decode(NODES, k.value(), v.value())?);
    }
    Ok(out)
}

fn not_found(node_id: &str) -> Response {
    Response::Rejected(Rejection::NodeNotFound {
        id: node_id.to_owned(),
    })
}

/// Folds one liveness/status update into a node record.
fn apply_node_update(n: &mut NodeRecord, u: &NodeUpdate, now_ms: i64) {
    if let Some(phase) = u.phase {
        if phase != n.phase {
            if n.phase == NodePhase::Ready {
                let stretch = now_ms.saturating_sub(n.phase_since_ms).max(0);
                n.ready_ms = n.ready_ms.saturating_add(stretch.unsigned_abs());
            }
            if phase == NodePhase::Down {
                n.down_count = n.down_count.saturating_add(1);
            }
            n.phase = phase;
            n.phase_since_ms = now_ms;
        }
    }
    n.last_heartbeat_ms = n.last_heartbeat_ms.max(u.last_heartbeat_ms);
    if let Some(r) = u.reliability {
        if r.is_finite() {
            n.reliability = r.clamp(0.0, 1.0);
        }
    }
    if let Some(status) = &u.status {
        n.status = status.clone();
        // The first report after enrollment sets the trusted capacity; later
        // growth needs an admin (see `cloudless_types::placement_capacity`).
        if n.trusted_capacity == Resources::default() {
            n.trusted_capacity = status.capacity;
        }
    }
}

#[cfg(test)]
#[path = "nodes_test.rs"]
mod tests;
