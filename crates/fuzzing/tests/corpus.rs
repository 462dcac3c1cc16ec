//! Replays every file of the checked-in fuzz corpus (`fuzz/corpus/<target>/`)
//! through its target's entry function, so `cargo test` catches a
//! regression on any input the fuzzers once found interesting.

use std::path::Path;

#[test]
fn every_corpus_file_runs_through_its_target_without_panicking() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
    for (name, target) in cloudless_fuzzing::TARGETS {
        let dir = root.join(name);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|f| f.expect("a directory entry").path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{}: no seed inputs", dir.display());
        for f in files {
            let data = std::fs::read(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            let outcome = std::panic::catch_unwind(|| target(&data));
            assert!(outcome.is_ok(), "{name} panicked on {}", f.display());
        }
    }
}

/// Writes the seed inputs of `fuzz/corpus/` (run with `--ignored` after a
/// format change; the fuzzers add their own finds next to them).
#[test]
#[ignore = "regenerates the checked-in seed corpus"]
fn write_seed_corpus() {
    use cloudless_state::snapshot_file::SnapshotWriter;
    use cloudless_state::{Command, Proposal, Request, SecretCommand, TypeConfig};
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Vote};

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
    let write = |target: &str, name: &str, data: &[u8]| {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).expect("corpus dir");
        std::fs::write(dir.join(name), data).expect("seed");
    };

    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    for f in std::fs::read_dir(&examples).expect("examples") {
        let f = f.expect("entry").path();
        let name = f.file_name().expect("name").to_string_lossy().into_owned();
        write("manifest", &name, &std::fs::read(&f).expect("example"));
    }

    let frame = |json: &str| {
        let mut v = (json.len() as u16).to_be_bytes().to_vec();
        v.extend_from_slice(json.as_bytes());
        v
    };
    write(
        "overlay_frame",
        "open",
        &frame(r#"{"kind":"open","target":"replica/r1:8080","origin":"n2"}"#),
    );
    write(
        "overlay_frame",
        "relay",
        &frame(r#"{"kind":"relay","to":"n3","target":"svc/api:80"}"#),
    );
    write("overlay_frame", "whoami", &frame(r#"{"kind":"whoAmI"}"#));
    write(
        "overlay_frame",
        "punch_from",
        &frame(r#"{"kind":"punchFrom","from":"n4","address":"203.0.113.9:4433"}"#),
    );
    write(
        "overlay_frame",
        "reply",
        &frame(r#"{"ok":false,"error":"refused","observed":"198.51.100.1:5000"}"#),
    );

    let key = cloudless_pki::TokenKey::from_bytes(&[7u8; 32]).expect("key");
    let join = cloudless_pki::JoinTokenClaims::new(
        "tok-1".into(),
        1_799_999_000,
        3600,
        3,
        [("zone".to_owned(), "eu-a".to_owned())].into(),
    );
    write("token", "join", key.sign(&join).expect("sign").as_bytes());
    let access = cloudless_secrets::AccessClaims {
        jti: "t1".into(),
        ns: "prod".into(),
        secret: "db".into(),
        aud: "api".into(),
        sub: "node:n1".into(),
        iat: 1_799_999_000_000,
        exp: 1_800_000_600_000,
        typ: String::new(),
    };
    let signed = cloudless_secrets::AccessTokenKey::from_cluster_key(&key)
        .sign(access.clone())
        .expect("sign");
    write("token", "access", signed.as_bytes());
    let mut claims = serde_json::to_value(&access).expect("json");
    claims["typ"] = "cloudless-secret-access".into();
    write("token", "access_claims.json", claims.to_string().as_bytes());
    write(
        "token",
        "join_claims.json",
        serde_json::to_string(&join).expect("json").as_bytes(),
    );

    let (csr, _key) =
        cloudless_pki::new_csr(&cloudless_pki::Identity::Node("n1".into())).expect("csr");
    write("csr", "node.pem", csr.as_bytes());
    let (anon, _key) = cloudless_pki::new_anonymous_csr().expect("csr");
    write("csr", "anonymous.pem", anon.as_bytes());

    let proposal = Proposal {
        requests: vec![
            Request {
                idempotency_key: Some("k1".into()),
                proposed_at_ms: 1_800_000_000_000,
                command: Command::ScaleWorkload {
                    namespace: "default".into(),
                    name: "web".into(),
                    replicas: 3,
                },
            },
            Request {
                idempotency_key: None,
                proposed_at_ms: 1_800_000_000_001,
                command: Command::Secret(SecretCommand::RevokeToken {
                    id: "t1".into(),
                    audit: cloudless_types::AuditRecord {
                        at_ms: 0,
                        actor: "admin:ops".into(),
                        source: "127.0.0.1:1".into(),
                        action: "token-revoke".into(),
                        namespace: "prod".into(),
                        secret: "db".into(),
                        token_id: "t1".into(),
                        allowed: true,
                        detail: String::new(),
                    },
                }),
            },
        ],
    };
    let entry = Entry::<TypeConfig> {
        log_id: LogId::new(CommittedLeaderId::new(3, 1), 42),
        payload: EntryPayload::Normal(proposal.clone()),
    };
    write(
        "raft_entry",
        "entry",
        &postcard::to_allocvec(&entry).expect("encode"),
    );
    write(
        "raft_entry",
        "proposal",
        &postcard::to_allocvec(&proposal).expect("encode"),
    );
    let append = openraft::raft::AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new_committed(3, 1),
        prev_log_id: Some(LogId::new(CommittedLeaderId::new(3, 1), 41)),
        entries: vec![entry],
        leader_commit: Some(LogId::new(CommittedLeaderId::new(3, 1), 41)),
    };
    write(
        "raft_entry",
        "append_entries",
        &postcard::to_allocvec(&append).expect("encode"),
    );
    let vote = openraft::raft::VoteRequest::<u64> {
        vote: Vote::new(4, 2),
        last_log_id: Some(LogId::new(CommittedLeaderId::new(3, 1), 42)),
    };
    write(
        "raft_entry",
        "vote",
        &postcard::to_allocvec(&vote).expect("encode"),
    );
    let mut w = SnapshotWriter::new(Vec::new()).expect("magic");
    w.table("workloads").expect("table");
    w.row("default/web", "{}").expect("row");
    write("raft_entry", "snapshot_file", &w.finish().expect("end"));
}
