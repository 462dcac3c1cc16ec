//! Workloads: `PutWorkload`, `ScaleWorkload`, `DeleteWorkload`,
//! `AssignServiceVips`.
//!
//! Service virtual IPs: a workload with ports gets the lowest free address
//! of the cluster's `network.service_cidr` (see
//! `NetworkConfig::free_service_vip`) when it is created (or, stored before
//! services existed, through `AssignServiceVips`). It keeps it across spec
//! updates, also while it has no ports; `DeleteWorkload` removes the record,
//! which frees the address for the next workload.
//!
//! Ingress ports are the cluster's: a `PutWorkload` naming one that
//! another workload's current spec holds is refused.

use redb::{ReadableTable, WriteTransaction};

use cloudless_types::{Revision, Workload, WorkloadSpec, REVISION_HISTORY};

use super::replicas::{index_ids, remove_replica};
use crate::command::{Rejection, Response};
use crate::error::{ApplyError, RedbContext};
use crate::tables::{self, get_json, put_json, remove, workload_key, WORKLOADS, WORKLOAD_REPLICAS};

/// `PutWorkload`: creates or updates a workload. A new template (a spec
/// change beyond the replica count) is a new revision; the history keeps
/// the last [`REVISION_HISTORY`]. With `assign_vip`, a workload with ports
/// and no VIP gets one.
pub(super) fn put(
    txn: &WriteTransaction,
    workload: &Workload,
    cause: &str,
    now_ms: i64,
    assign_vip: bool,
) -> Result<Response, ApplyError> {
    let key = workload_key(&workload.namespace, &workload.name);
    let existing = get_json::<Workload>(txn, WORKLOADS, &key)?;
    let created = existing.is_none();
    let held = existing.as_ref().and_then(|w| w.vip.clone());
    let needs_vip = assign_vip && held.is_none() && !workload.spec.ports.is_empty();
    let others = if needs_vip || !workload.spec.ingress_ports().is_empty() {
        all(txn)?
            .into_iter()
            .filter(|w| {
                (w.namespace.as_str(), w.name.as_str()) != (&workload.namespace, &workload.name)
            })
            .collect()
    } else {
        Vec::new()
    };
    if let Some(&(index, port, ref holder)) = taken_ingress_ports(&others, &workload.spec).first() {
        return Ok(Response::Rejected(Rejection::IngressPortTaken {
            field: format!("spec.ports[{index}].ingressPort"),
            port,
            holder: holder.clone(),
        }));
    }
    let vip = if needs_vip {
        let network = super::cluster::config(txn)?.network;
        match network.free_service_vip(others.iter().filter_map(|w| w.vip.as_deref())) {
            Some(ip) => Some(ip.to_string()),
            None => {
                return Ok(Response::Rejected(Rejection::VipsExhausted {
                    namespace: workload.namespace.clone(),
                    name: workload.name.clone(),
                    service_cidr: network.service_cidr,
                }))
            }
        }
    } else {
        held
    };
    let revision = |template: u64| Revision {
        template,
        spec: workload.spec.clone(),
        at_ms: now_ms,
        cause: cause.to_owned(),
    };
    let mut stored = match existing {
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
    stored.vip = vip;
    put_json(txn, WORKLOADS, &key, &stored)?;
    Ok(Response::WorkloadStored {
        workload: stored,
        created,
    })
}

/// `(port index, ingress port, holder as namespace/name)` of each ingress
/// port of `spec` that one of `others` holds in its current spec.
pub(super) fn taken_ingress_ports(
    others: &[Workload],
    spec: &WorkloadSpec,
) -> Vec<(usize, u16, String)> {
    spec.ports
        .iter()
        .enumerate()
        .filter(|(_, p)| p.ingress_port != 0)
        .filter_map(|(i, p)| {
            others
                .iter()
                .find(|w| {
                    w.spec
                        .ports
                        .iter()
                        .any(|q| q.ingress_port == p.ingress_port)
                })
                .map(|w| (i, p.ingress_port, workload_key(&w.namespace, &w.name)))
        })
        .collect()
}

/// `AssignServiceVips`: gives each listed workload that has ports and no
/// VIP the lowest free one, in the order listed; skips workloads gone,
/// without ports or holding one, and stops when the range is exhausted.
pub(super) fn assign_vips(
    txn: &WriteTransaction,
    workloads: &[(String, String)],
) -> Result<Response, ApplyError> {
    let network = super::cluster::config(txn)?.network;
    let mut used: Vec<String> = all(txn)?.into_iter().filter_map(|w| w.vip).collect();
    let mut assigned = 0u32;
    for (namespace, name) in workloads {
        let key = workload_key(namespace, name);
        let Some(mut w) = get_json::<Workload>(txn, WORKLOADS, &key)? else {
            continue;
        };
        if w.vip.is_some() || w.spec.ports.is_empty() {
            continue;
        }
        let Some(free) = network.free_service_vip(used.iter().map(String::as_str)) else {
            break;
        };
        let vip = free.to_string();
        used.push(vip.clone());
        w.vip = Some(vip);
        put_json(txn, WORKLOADS, &key, &w)?;
        assigned += 1;
    }
    Ok(Response::VipsAssigned(assigned))
}

/// Every workload record.
pub(super) fn all(txn: &WriteTransaction) -> Result<Vec<Workload>, ApplyError> {
    let table = txn.open_table(WORKLOADS).at(WORKLOADS, "open")?;
    let mut out = Vec::new();
    for item in table.iter().at(WORKLOADS, "iter")? {
        let (k, v) = item.at(WORKLOADS, "iter")?;
        out.push(tables::decode(WORKLOADS, k.value(), v.value())?);
    }
    Ok(out)
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
#[path = "workloads_test.rs"]
mod tests;
