//! Who may act on the cluster: `PutAdmin` (issue and revoke admin
//! certificates) and `RetireCoordinator`.

use redb::WriteTransaction;

use cloudless_types::{AdminRecord, RetiredCoordinator};

use crate::command::{Rejection, Response};
use crate::error::ApplyError;
use crate::tables::{admin_key, get_json, put_json, retired_coordinator_key, ACCESS};

/// `PutAdmin`: stores an admin record. Refused when the acting admin was
/// revoked, or when the record was issued under a revocation (read before
/// it committed); a revocation watermark never moves back.
pub(super) fn put_admin(
    txn: &WriteTransaction,
    record: &AdminRecord,
    actor: Option<&(String, i64)>,
) -> Result<Response, ApplyError> {
    let revoked_before = |name: &str| -> Result<i64, ApplyError> {
        Ok(get_json::<AdminRecord>(txn, ACCESS, &admin_key(name))?
            .map_or(0, |r| r.revoked_before_s))
    };
    if let Some((name, issued_at_s)) = actor {
        if *issued_at_s <= revoked_before(name)? {
            return Ok(Response::Rejected(Rejection::AdminRevoked {
                name: name.clone(),
            }));
        }
    }
    let mut r = record.clone();
    r.revoked_before_s = r.revoked_before_s.max(revoked_before(&r.name)?);
    if !r.revoked && r.issued_at_s <= r.revoked_before_s {
        // Issued from a read taken before a revocation committed.
        return Ok(Response::Rejected(Rejection::AdminRevoked { name: r.name }));
    }
    put_json(txn, ACCESS, &admin_key(&r.name), &r)?;
    Ok(Response::Admin(r))
}

/// `RetireCoordinator`: refuses a removed coordinator's certificate from
/// now on.
pub(super) fn retire_coordinator(
    txn: &WriteTransaction,
    node_id: u64,
    now_ms: i64,
) -> Result<Response, ApplyError> {
    let r = RetiredCoordinator {
        node_id,
        at_ms: now_ms,
    };
    put_json(txn, ACCESS, &retired_coordinator_key(node_id), &r)?;
    Ok(Response::CoordinatorRetired)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::testing::{apply, db};
    use crate::command::Command;

    #[test]
    fn admin_revocations_only_grow_and_refuse_revoked_actors_and_raced_issues() {
        let db = db();
        let rec = |issued_at_s: i64, revoked_before_s: i64, revoked: bool| AdminRecord {
            name: "alice".into(),
            issued_at_s,
            not_after_s: issued_at_s + 100,
            issued_by: "root".into(),
            revoked_before_s,
            revoked,
        };
        let put = |record: AdminRecord, actor: (&str, i64)| Command::PutAdmin {
            record,
            actor: Some((actor.0.to_owned(), actor.1)),
        };
        // Every command survives the log encoding.
        for c in [
            put(rec(1, 2, true), ("root", 3)),
            Command::RetireCoordinator { node_id: 7 },
        ] {
            let bytes = postcard::to_allocvec(&c).expect("encode");
            assert_eq!(postcard::from_bytes::<Command>(&bytes).expect("decode"), c);
        }
        let revoked = |r: &Response| matches!(r, Response::Rejected(Rejection::AdminRevoked { name }) if name == "alice");
        assert!(matches!(
            apply(&db, put(rec(100, 0, false), ("root", 50)), 1),
            Response::Admin(_)
        ));
        // Revoked at 200.
        let r = apply(&db, put(rec(100, 200, true), ("root", 50)), 2);
        assert!(matches!(r, Response::Admin(ref a) if a.revoked_before_s == 200 && a.revoked));
        // Alice's own renewal, decided before the revocation, is refused.
        assert!(revoked(&apply(
            &db,
            put(rec(150, 0, false), ("alice", 100)),
            3
        )));
        // So is an issue dated under the revocation (it read the record first).
        assert!(revoked(&apply(
            &db,
            put(rec(180, 0, false), ("root", 50)),
            4
        )));
        // A revocation never moves back.
        let r = apply(&db, put(rec(100, 10, true), ("root", 50)), 5);
        assert!(matches!(r, Response::Admin(ref a) if a.revoked_before_s == 200));
        // Issued after it, alice is accepted again, and the watermark stays.
        let r = apply(&db, put(rec(201, 0, false), ("root", 50)), 6);
        assert!(
            matches!(r, Response::Admin(ref a) if a.revoked_before_s == 200 && !a.revoked),
            "{r:?}"
        );
        // A revoked actor cannot act on anyone.
        let bob = AdminRecord {
            name: "bob".into(),
            ..rec(300, 0, false)
        };
        assert!(revoked(&apply(&db, put(bob, ("alice", 100)), 7)));
        apply(&db, Command::RetireCoordinator { node_id: 7 }, 8);
        let txn = db.begin_write().expect("txn");
        assert!(
            get_json::<cloudless_types::RetiredCoordinator>(&txn, ACCESS, "coordinator/7")
                .expect("read")
                .is_some()
        );
    }
}
