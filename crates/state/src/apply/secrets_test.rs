//! Tests of the secret commands.

use prometheus_client::metrics::histogram::Histogram;

use super::*;
use crate::apply::apply_command;
use crate::apply::testing::{apply, db};
use crate::command::Command;
use crate::StateMachine;

#[test]
fn secret_commands_count_uses_refuse_what_they_must_and_prune_old_audit_and_tokens() {
    use crate::command::SecretCommand as S;
    use cloudless_types::{AuditRecord, SecretCiphertext, SecretKeyVersion, SecretVersion};
    let dir = tempfile::tempdir().expect("tempdir");
    let sm = StateMachine::open(&dir.path().join("s.redb"), Histogram::new([1.0])).expect("open");
    let day = 86_400_000i64;
    let audit = |action: &str| AuditRecord {
        at_ms: 0,
        actor: "admin:t".into(),
        source: String::new(),
        action: action.into(),
        namespace: "prod".into(),
        secret: "db".into(),
        token_id: String::new(),
        allowed: true,
        detail: String::new(),
    };
    let key = |v: u32| SecretKeyVersion {
        version: v,
        nonce: "n".into(),
        sealed: "s".into(),
        created_at_ms: 0,
        retired: false,
    };
    let version = |v: u64, k: u32| SecretVersion {
        version: v,
        ciphertext: SecretCiphertext {
            key_version: k,
            dek_nonce: "a".into(),
            dek: "b".into(),
            nonce: "c".into(),
            data: "d".into(),
        },
        keys: vec!["PASSWORD".into()],
        size: 5,
        created_at_ms: 0,
    };
    let put = |v: u64, create: bool, immutable: bool, at: i64| {
        apply(
            sm.db(),
            Command::Secret(S::Put {
                namespace: "prod".into(),
                name: "db".into(),
                version: version(v, 1),
                create,
                audiences: Some(vec!["api".into()]),
                immutable,
                expires_at_ms: None,
                audit: audit(if create { "create" } else { "update" }),
            }),
            at,
        )
    };
    apply(sm.db(), Command::Secret(S::InitKeyring { key: key(1) }), 0);
    assert!(matches!(put(1, true, false, 0), Response::SecretStored(_)));
    assert!(matches!(
        put(1, true, false, 0),
        Response::Rejected(Rejection::SecretExists { .. })
    ));
    assert!(matches!(
        put(5, false, false, 0),
        Response::Rejected(Rejection::SecretConflict(_))
    ));
    assert!(matches!(put(2, false, false, 0), Response::SecretStored(_)));

    let token = |id: &str, uses: u32| cloudless_types::AccessTokenRecord {
        id: id.into(),
        namespace: "prod".into(),
        secret: "db".into(),
        audience: "api".into(),
        issued_to: "node:a".into(),
        issued_at_ms: 0,
        expires_at_ms: 10 * day,
        max_uses: uses,
        uses: 0,
        revoked: false,
    };
    apply(
        sm.db(),
        Command::Secret(S::MintToken {
            token: token("t1", 2),
            audit: audit("token-mint"),
        }),
        0,
    );
    let use_as = |actor: &str, at: i64| match apply(
        sm.db(),
        Command::Secret(S::UseToken {
            id: "t1".into(),
            actor: actor.into(),
            audit: audit("read"),
        }),
        at,
    ) {
        Response::SecretAccess(r) => r.map(|s| s.current().map_or(0, |v| v.version)),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        use_as("node:b", 1),
        Err("the token was issued to node:a, not node:b".into())
    );
    assert_eq!(use_as("node:a", 1), Ok(2), "the current version");
    assert_eq!(use_as("node:a", 1), Ok(2));
    assert_eq!(
        use_as("node:a", 1),
        Err("the token was used 2 of 2 times".into())
    );
    // Batched uses from the leader's ledger add up.
    apply(
        sm.db(),
        Command::Secret(S::MintToken {
            token: token("t2", 100),
            audit: audit("token-mint"),
        }),
        0,
    );
    apply(
        sm.db(),
        Command::Secret(S::RecordUses {
            uses: vec![("t2".into(), 40), ("gone".into(), 3)],
            audits: vec![audit("read")],
        }),
        2,
    );
    let reader = sm.reader();
    assert_eq!(
        reader.access_token("t2").expect("read").map(|t| t.uses),
        Some(40)
    );
    // Revocation and immutability.
    apply(
        sm.db(),
        Command::Secret(S::RevokeToken {
            id: "t2".into(),
            audit: audit("token-revoke"),
        }),
        3,
    );
    assert!(reader
        .access_token("t2")
        .expect("read")
        .is_some_and(|t| t.revoked));
    // The active key cannot be retired; the old one only once unused.
    apply(
        sm.db(),
        Command::Secret(S::Rotate {
            key: key(2),
            expected_active: 1,
            rewrapped: vec![],
            audit: audit("rotate"),
        }),
        4,
    );
    assert!(matches!(
        apply(
            sm.db(),
            Command::Secret(S::Retire {
                version: 2,
                audit: audit("retire")
            }),
            4
        ),
        Response::Rejected(Rejection::Keyring(_))
    ));
    assert!(matches!(
        apply(sm.db(), Command::Secret(S::Retire { version: 1, audit: audit("retire") }), 4),
        Response::Rejected(Rejection::Keyring(m)) if m.contains("still has a data key")
    ));
    // The data key moves to v2 through a rewrap part; then v1 retires.
    let secret = reader
        .secrets(None)
        .expect("read")
        .into_iter()
        .next()
        .expect("a secret");
    let keys: Vec<crate::RewrappedKey> = secret
        .versions
        .iter()
        .map(|v| crate::RewrappedKey {
            namespace: secret.namespace.clone(),
            name: secret.name.clone(),
            version: v.version,
            old_dek_nonce: v.ciphertext.dek_nonce.clone(),
            dek_nonce: "n2".into(),
            dek: "k2".into(),
        })
        .collect();
    assert!(matches!(
        apply(
            sm.db(),
            Command::Secret(S::RewrapKeys {
                from_version: 1,
                to_version: 9,
                keys: keys.clone(),
            }),
            4
        ),
        Response::Rejected(Rejection::Keyring(m)) if m.contains("version 9 is unknown")
    ));
    // A key read before the secret was recreated is not applied to it.
    let stale: Vec<crate::RewrappedKey> = keys
        .iter()
        .cloned()
        .map(|mut k| {
            k.old_dek_nonce = "a nonce from a deleted secret".into();
            k
        })
        .collect();
    apply(
        sm.db(),
        Command::Secret(S::RewrapKeys {
            from_version: 1,
            to_version: 2,
            keys: stale,
        }),
        4,
    );
    assert!(reader
        .secret(&secret.namespace, &secret.name)
        .expect("read")
        .expect("secret")
        .versions
        .iter()
        .all(|v| v.ciphertext.key_version == 1));
    apply(
        sm.db(),
        Command::Secret(S::RewrapKeys {
            from_version: 1,
            to_version: 2,
            keys,
        }),
        4,
    );
    let moved = reader
        .secret(&secret.namespace, &secret.name)
        .expect("read")
        .expect("secret");
    assert!(moved
        .versions
        .iter()
        .all(|v| v.ciphertext.key_version == 2 && v.ciphertext.dek == "k2"));
    assert_eq!(
        moved
            .versions
            .iter()
            .map(|v| &v.ciphertext.data)
            .collect::<Vec<_>>(),
        secret
            .versions
            .iter()
            .map(|v| &v.ciphertext.data)
            .collect::<Vec<_>>(),
        "a rewrap changed the data"
    );
    assert!(!matches!(
        apply(
            sm.db(),
            Command::Secret(S::Retire {
                version: 1,
                audit: audit("retire")
            }),
            4
        ),
        Response::Rejected(_)
    ));
    // Stale rotation (expected_active moved) is refused.
    assert!(matches!(
        apply(
            sm.db(),
            Command::Secret(S::Rotate {
                key: key(3),
                expected_active: 1,
                rewrapped: vec![],
                audit: audit("rotate"),
            }),
            4,
        ),
        Response::Rejected(Rejection::SecretConflict(_))
    ));
    // Everything so far was audited, refusals included.
    let all = reader.audit(|_| true, 1000).expect("audit");
    assert!(all
        .iter()
        .any(|a| !a.record.allowed && a.record.detail.contains("issued to")));
    assert!(all
        .iter()
        .any(|a| !a.record.allowed && a.record.action == "create"));
    // Retention (default 90 days): an append 91 days later drops them.
    apply(
        sm.db(),
        Command::Secret(S::Audit {
            records: vec![audit("read")],
        }),
        91 * day,
    );
    let left = reader.audit(|_| true, 1000).expect("audit");
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].record.at_ms, 91 * day);

    // Token records go an hour after their expiry, on the next mint:
    // t1 and t2 expired at day 10; t3 (expiring at day 100) stays.
    let mint_at = |id: &str, expires: i64, at: i64| {
        let mut t = token(id, 1);
        t.expires_at_ms = expires;
        apply(
            sm.db(),
            Command::Secret(S::MintToken {
                token: t,
                audit: audit("token-mint"),
            }),
            at,
        );
    };
    mint_at("t3", 100 * day, 10 * day + TOKEN_RECORD_GRACE_MS - 1);
    assert!(
        reader.access_token("t1").expect("read").is_some(),
        "still within the grace period"
    );
    mint_at("t4", 100 * day, 10 * day + TOKEN_RECORD_GRACE_MS + 1);
    assert!(reader.access_token("t1").expect("read").is_none());
    assert!(reader.access_token("t2").expect("read").is_none());
    assert!(reader.access_token("t3").expect("read").is_some());
    // A use of a dropped token is refused, not counted against another.
    assert_eq!(
        use_as("node:a", 10 * day + 2 * TOKEN_RECORD_GRACE_MS),
        Err("the token is unknown to this cluster".into())
    );
}

/// A record that does not decode is a storage fault, not a refusal:
/// answering `Rejected` (and auditing it) from one coordinator's
/// unreadable table would make its state differ from its peers'.
#[test]
fn retiring_a_key_over_an_undecodable_secret_is_an_error_not_a_refusal() {
    use crate::command::SecretCommand as S;
    use cloudless_types::{AuditRecord, SecretKeyVersion};
    let db = db();
    let key = |v: u32| SecretKeyVersion {
        version: v,
        nonce: "n".into(),
        sealed: "s".into(),
        created_at_ms: 0,
        retired: false,
    };
    let audit = AuditRecord {
        at_ms: 0,
        actor: "admin:t".into(),
        source: String::new(),
        action: "retire".into(),
        namespace: String::new(),
        secret: String::new(),
        token_id: String::new(),
        allowed: true,
        detail: String::new(),
    };
    apply(&db, Command::Secret(S::InitKeyring { key: key(1) }), 0);
    apply(
        &db,
        Command::Secret(S::Rotate {
            key: key(2),
            expected_active: 1,
            rewrapped: vec![],
            audit: audit.clone(),
        }),
        0,
    );
    let txn = db.begin_write().expect("txn");
    txn.open_table(SECRETS)
        .expect("table")
        .insert("prod/db", r#"{"namespace":"prod"}"#)
        .expect("insert");
    let r = apply_command(&txn, &Command::Secret(S::Retire { version: 1, audit }), 0);
    let err = r.expect_err("an undecodable secret was answered as a refusal");
    assert!(
        matches!(&err, ApplyError::Decode { table, key, .. } if table == "secrets" && key == "prod/db"),
        "{err}"
    );
}
