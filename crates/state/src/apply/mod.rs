//! Applying committed log entries to the state database.
//!
//! Deterministic: an entry's effect depends only on the entry and the state
//! it is applied to (time and ids are stamped by the proposer), so every
//! coordinator applying the same log holds the same state. A command that
//! cannot be carried out is answered with `Response::Rejected` and changes
//! nothing; an error is a fault of this coordinator's storage and stops the
//! apply.
//!
//! This module applies entries, proposals and requests (with their
//! idempotency keys); one submodule per command family does the rest.

mod access;
mod audit;
mod cluster;
mod events;
mod nodes;
mod reconcile;
mod replicas;
pub(crate) mod secrets;
#[cfg(test)]
pub(crate) mod testing;
mod workloads;

use openraft::{Entry, EntryPayload, StoredMembership};
use redb::{ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use crate::command::{Command, Proposal, ProposalResult, Rejection, Request, Response};
use crate::error::{ApplyError, RedbContext};
use crate::tables::{
    encode, get_json, put_json, put_raw, IDEMPOTENCY, IDEMPOTENCY_EXPIRY, KEY_APPLIED,
    KEY_MEMBERSHIP, SYSTEM,
};
use crate::type_config::TypeConfig;

/// How long an idempotency key is remembered, by proposer time.
pub const IDEMPOTENCY_RETENTION_MS: i64 = 24 * 60 * 60 * 1000;

/// What an applied request with an idempotency key left behind: a replay
/// of the same command gets the same response.
#[derive(Serialize, Deserialize)]
struct IdempotencyRecord {
    command: Command,
    response: Response,
}

/// Applies `entries` in order in `txn` and records the last applied log id
/// and membership; one result per entry.
pub(crate) fn apply_entries(
    txn: &WriteTransaction,
    entries: Vec<Entry<TypeConfig>>,
) -> Result<Vec<ProposalResult>, ApplyError> {
    let mut out = Vec::with_capacity(entries.len());
    let mut last_applied = None;
    let mut membership = None;
    for entry in entries {
        last_applied = Some(entry.log_id);
        match entry.payload {
            EntryPayload::Blank => out.push(ProposalResult {
                responses: Vec::new(),
            }),
            EntryPayload::Normal(p) => out.push(apply_proposal(txn, p)?),
            EntryPayload::Membership(m) => {
                membership = Some(StoredMembership::new(Some(entry.log_id), m));
                out.push(ProposalResult {
                    responses: Vec::new(),
                });
            }
        }
    }
    let mut system = txn.open_table(SYSTEM).at(SYSTEM, "open")?;
    if let Some(la) = last_applied {
        let v = encode(SYSTEM, KEY_APPLIED, &la)?;
        system
            .insert(KEY_APPLIED, v.as_str())
            .at(SYSTEM, "insert")?;
    }
    if let Some(m) = membership {
        let v = encode(SYSTEM, KEY_MEMBERSHIP, &m)?;
        system
            .insert(KEY_MEMBERSHIP, v.as_str())
            .at(SYSTEM, "insert")?;
    }
    Ok(out)
}

/// Applies a batch in order. Deterministic: uses only the proposal and the state.
fn apply_proposal(txn: &WriteTransaction, p: Proposal) -> Result<ProposalResult, ApplyError> {
    if let Some(latest) = p.requests.iter().map(|r| r.proposed_at_ms).max() {
        expire_idempotency(txn, latest)?;
    }
    let responses = p
        .requests
        .into_iter()
        .map(|r| apply_request(txn, r))
        .collect::<Result<_, _>>()?;
    Ok(ProposalResult { responses })
}

/// Applies one request.
fn apply_request(txn: &WriteTransaction, req: Request) -> Result<Response, ApplyError> {
    if let Some(key) = &req.idempotency_key {
        if let Some(rec) = get_json::<IdempotencyRecord>(txn, IDEMPOTENCY, key)? {
            return Ok(if rec.command == req.command {
                rec.response
            } else {
                Response::Rejected(Rejection::IdempotencyKeyReused { key: key.clone() })
            });
        }
    }
    let response = apply_command(txn, &req.command, req.proposed_at_ms)?;
    // A rejected request changed nothing: its key is not remembered, so the
    // same key can carry the retry (after a conflict, say).
    if let (Some(key), false) = (
        req.idempotency_key,
        matches!(response, Response::Rejected(_)),
    ) {
        let rec = IdempotencyRecord {
            command: req.command,
            response: response.clone(),
        };
        put_json(txn, IDEMPOTENCY, &key, &rec)?;
        let ek = expiry_key(req.proposed_at_ms, &key);
        put_raw(txn, IDEMPOTENCY_EXPIRY, &ek, "null")?;
    }
    Ok(response)
}

/// Forgets idempotency keys proposed more than the retention period before `now_ms`.
fn expire_idempotency(txn: &WriteTransaction, now_ms: i64) -> Result<(), ApplyError> {
    drop_indexed_before(
        txn,
        IDEMPOTENCY_EXPIRY,
        IDEMPOTENCY,
        now_ms - IDEMPOTENCY_RETENTION_MS,
    )
}

/// The key of `key` in an expiry index: `<ms, 20 digits>/<key>`, so the
/// index sorts by time (negative times count as 0).
fn expiry_key(ms: i64, key: &str) -> String {
    format!("{:020}/{key}", ms.max(0))
}

/// With `index` keyed by [`expiry_key`]: removes every index entry
/// before `cutoff_ms` and the `data` records they name.
fn drop_indexed_before(
    txn: &WriteTransaction,
    index: TableDefinition<&str, &str>,
    data: TableDefinition<&str, &str>,
    cutoff_ms: i64,
) -> Result<(), ApplyError> {
    let cutoff = format!("{:020}", cutoff_ms.max(0));
    let mut idx = txn.open_table(index).at(index, "open")?;
    let mut expired = Vec::new();
    for item in idx.range::<&str>(..cutoff.as_str()).at(index, "range")? {
        let (k, _) = item.at(index, "range")?;
        expired.push(k.value().to_owned());
    }
    if expired.is_empty() {
        return Ok(());
    }
    let mut records = txn.open_table(data).at(data, "open")?;
    for ek in expired {
        idx.remove(ek.as_str()).at(index, "remove")?;
        if let Some((_, key)) = ek.split_once('/') {
            records.remove(key).at(data, "remove")?;
        }
    }
    Ok(())
}

/// Applies one command.
fn apply_command(
    txn: &WriteTransaction,
    cmd: &Command,
    now_ms: i64,
) -> Result<Response, ApplyError> {
    match cmd {
        Command::InitCluster { cluster_id, config } => {
            cluster::init(txn, cluster_id, config, now_ms)
        }
        Command::SetClusterConfig {
            config,
            expected_revision,
        } => cluster::set_config(txn, config, *expected_revision),
        Command::InitIdentity { material } => cluster::init_identity(txn, material),
        Command::PutWorkload {
            workload,
            cause,
            assign_vip,
        } => workloads::put(txn, workload, cause, now_ms, *assign_vip),
        Command::AssignServiceVips { workloads } => workloads::assign_vips(txn, workloads),
        Command::ScaleWorkload {
            namespace,
            name,
            replicas,
        } => workloads::scale(txn, namespace, name, *replicas, now_ms),
        Command::DeleteWorkload { namespace, name } => workloads::delete(txn, namespace, name),
        Command::CreateJoinToken { token } => nodes::create_join_token(txn, token),
        Command::RevokeJoinToken { token_id } => nodes::revoke_join_token(txn, token_id),
        Command::EnrollNode {
            token_id,
            node,
            assign_subnet,
        } => nodes::enroll(txn, token_id, node, *assign_subnet, now_ms),
        Command::AssignNodeSubnets { node_ids } => nodes::assign_subnets(txn, node_ids),
        Command::SetNodeFlags {
            node_id,
            cordoned,
            draining,
        } => nodes::set_flags(txn, node_id, *cordoned, *draining),
        Command::SetNodeLabels {
            node_id,
            set,
            remove,
        } => nodes::set_labels(txn, node_id, set, remove),
        Command::AcceptNodeCapacity { node_id } => nodes::accept_capacity(txn, node_id),
        Command::RemoveNode { node_id } => nodes::remove(txn, node_id, now_ms),
        Command::UpdateNodes { updates } => nodes::update(txn, updates, now_ms),
        Command::RenewNodeCert {
            node_id,
            cert_not_after_ms,
        } => nodes::renew_cert(txn, node_id, *cert_not_after_ms),
        Command::PlaceReplicas { replicas } => replicas::place(txn, replicas, now_ms),
        Command::MarkReplicasUnknown { ids, unknown } => {
            replicas::mark_unknown(txn, ids, *unknown, now_ms)
        }
        Command::RemoveReplicas { ids } => replicas::remove_all(txn, ids),
        Command::UpdateReplicas { updates } => replicas::update(txn, updates, now_ms),
        Command::RecordEvents { events } => events::record(txn, events, now_ms),
        Command::PutAdmin { record, actor } => access::put_admin(txn, record, actor.as_ref()),
        Command::RetireCoordinator { node_id } => access::retire_coordinator(txn, *node_id, now_ms),
        Command::Secret(c) => secrets::apply(txn, c, now_ms),
        Command::Reconcile(d) => reconcile::apply(txn, d, now_ms),
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::histogram::Histogram;

    use super::testing::apply;
    use super::*;
    use crate::StateMachine;

    #[test]
    fn a_rejected_request_leaves_its_idempotency_key_for_the_retry() {
        use crate::command::SecretCommand as S;
        use cloudless_types::{AuditRecord, SecretCiphertext, SecretKeyVersion, SecretVersion};
        let dir = tempfile::tempdir().expect("tempdir");
        let sm =
            StateMachine::open(&dir.path().join("s.redb"), Histogram::new([1.0])).expect("open");
        let audit = |action: &str| AuditRecord {
            at_ms: 0,
            actor: "admin:t".into(),
            source: String::new(),
            action: action.into(),
            namespace: "prod".into(),
            secret: "cache".into(),
            token_id: String::new(),
            allowed: true,
            detail: String::new(),
        };
        let version = |v: u64| SecretVersion {
            version: v,
            ciphertext: SecretCiphertext {
                key_version: 1,
                dek_nonce: "a".into(),
                dek: "b".into(),
                nonce: "c".into(),
                data: "d".into(),
            },
            keys: vec!["PASSWORD".into()],
            size: 5,
            created_at_ms: 0,
        };
        apply(
            sm.db(),
            Command::Secret(S::InitKeyring {
                key: SecretKeyVersion {
                    version: 1,
                    nonce: "n".into(),
                    sealed: "s".into(),
                    created_at_ms: 0,
                    retired: false,
                },
            }),
            0,
        );
        // A rejected request leaves its idempotency key free for the retry;
        // an applied one answers its replay with the same response.
        let keyed = |v: u64| {
            let txn = sm.db().begin_write().expect("txn");
            let r = apply_request(
                &txn,
                Request {
                    idempotency_key: Some("retry-1".into()),
                    proposed_at_ms: 0,
                    command: Command::Secret(S::Put {
                        namespace: "prod".into(),
                        name: "cache".into(),
                        version: version(v),
                        create: true,
                        audiences: None,
                        immutable: false,
                        expires_at_ms: None,
                        audit: audit("create"),
                    }),
                },
            )
            .expect("apply");
            txn.commit().expect("commit");
            r
        };
        assert!(matches!(
            keyed(5),
            Response::Rejected(Rejection::SecretConflict(_))
        ));
        let stored = keyed(1);
        assert!(
            matches!(&stored, Response::SecretStored(r) if r.name == "cache"),
            "the retry under the same key was refused: {stored:?}"
        );
        assert_eq!(keyed(1), stored, "a replay is answered from the record");
        assert!(matches!(
            keyed(2),
            Response::Rejected(Rejection::IdempotencyKeyReused { .. })
        ));
    }
}
