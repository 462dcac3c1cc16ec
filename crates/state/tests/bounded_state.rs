//! State stays proportional to live data: 1,000 replicas refreshing a secret
//! every minute for an hour (time compressed: the commands their agents'
//! refreshes cause, applied straight to the state machine with the
//! proposer's clock advancing) leave the audit log, the token records and
//! the snapshot within their caps, and the snapshot installs elsewhere.

use cloudless_state::{
    open_stores, Command, Proposal, Request, SecretCommand, StateMachine, TypeConfig,
};
use cloudless_types::{
    AccessTokenRecord, AuditRecord, ClusterConfig, SecretCiphertext, SecretKeyVersion,
    SecretVersion,
};
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};
use prometheus_client::metrics::histogram::Histogram;

const REPLICAS: usize = 1000;
const NODES: usize = 100;
const MINUTES: i64 = 60;
/// The caps this cluster runs with (the smallest allowed, so the hour
/// exceeds them many times over without the caps).
const AUDIT_CAP: u32 = 1000;
const TOKEN_CAP: u32 = 1000;
/// A snapshot holding both caps' worth of records is far below this; one
/// holding the uncapped hour (120,000 audit and 60,000 token records) is
/// above 30 MB.
const SNAPSHOT_CAP_BYTES: u64 = 2 << 20;
const START_MS: i64 = 1_750_000_000_000;

fn audit(actor: &str, action: &str) -> AuditRecord {
    AuditRecord {
        at_ms: 0,
        actor: actor.into(),
        source: "10.0.0.1:5000".into(),
        action: action.into(),
        namespace: "prod".into(),
        secret: "db".into(),
        token_id: String::new(),
        allowed: true,
        detail: "audience api".into(),
    }
}

fn request(at_ms: i64, command: Command) -> Request {
    Request {
        idempotency_key: None,
        proposed_at_ms: at_ms,
        command,
    }
}

struct Log {
    sm: StateMachine,
    index: u64,
}

impl Log {
    async fn apply(&mut self, requests: Vec<Request>) {
        self.index += 1;
        let entry = Entry::<TypeConfig> {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), self.index),
            payload: EntryPayload::Normal(Proposal { requests }),
        };
        self.sm.apply([entry]).await.expect("apply");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hour_of_1000_replicas_refreshing_a_secret_stays_within_the_caps() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_log, sm) = open_stores(dir.path(), Histogram::new([1.0])).expect("open");
    let mut log = Log { sm, index: 0 };
    let config = ClusterConfig {
        audit_max_records: AUDIT_CAP,
        access_token_max_records: TOKEN_CAP,
        ..ClusterConfig::default()
    };
    config.validate().expect("caps within range");
    let version = SecretVersion {
        version: 1,
        ciphertext: SecretCiphertext {
            key_version: 1,
            dek_nonce: "a".into(),
            dek: "b".into(),
            nonce: "c".into(),
            data: "d".into(),
        },
        keys: vec!["PASSWORD".into()],
        size: 8,
        created_at_ms: START_MS,
    };
    log.apply(vec![
        request(
            START_MS,
            Command::InitCluster {
                cluster_id: "c1".into(),
                config,
            },
        ),
        request(
            START_MS,
            Command::Secret(SecretCommand::InitKeyring {
                key: SecretKeyVersion {
                    version: 1,
                    nonce: "n".into(),
                    sealed: "s".into(),
                    created_at_ms: START_MS,
                    retired: false,
                },
            }),
        ),
        request(
            START_MS,
            Command::Secret(SecretCommand::Put {
                namespace: "prod".into(),
                name: "db".into(),
                version,
                create: true,
                audiences: Some(vec!["api".into()]),
                immutable: false,
                expires_at_ms: None,
                audit: audit("admin:ops", "create"),
            }),
        ),
    ])
    .await;

    // Every minute each replica's refresh mints a single-use token and
    // reveals with it: the two writes an agent made per refresh before it
    // learnt to check the version first.
    for minute in 0..MINUTES {
        let now = START_MS + minute * 60_000 + 1;
        let mut requests = Vec::with_capacity(2 * REPLICAS);
        for replica in 0..REPLICAS {
            let actor = format!("node:n{}", replica % NODES);
            let id = format!("t{minute}-{replica}");
            let mut mint = audit(&actor, "token-mint");
            mint.token_id.clone_from(&id);
            requests.push(request(
                now,
                Command::Secret(SecretCommand::MintToken {
                    token: AccessTokenRecord {
                        id: id.clone(),
                        namespace: "prod".into(),
                        secret: "db".into(),
                        audience: "api".into(),
                        issued_to: actor.clone(),
                        issued_at_ms: now,
                        expires_at_ms: now + 600_000,
                        max_uses: 1,
                        uses: 0,
                        revoked: false,
                    },
                    audit: mint,
                }),
            ));
            let mut read = audit(&actor, "read");
            read.token_id.clone_from(&id);
            requests.push(request(
                now,
                Command::Secret(SecretCommand::UseToken {
                    id,
                    actor,
                    audit: read,
                }),
            ));
        }
        log.apply(requests).await;
    }

    let reader = log.sm.reader();
    let entries = reader.audit(|_| true, usize::MAX).expect("audit");
    assert!(
        entries.len() <= AUDIT_CAP as usize,
        "{} audit records, cap {AUDIT_CAP}",
        entries.len()
    );
    // Aggregated, not lost: every read is counted, one record per node.
    let reads: Vec<_> = entries
        .iter()
        .filter(|e| e.record.action == "read" && e.record.allowed)
        .collect();
    assert_eq!(reads.len(), NODES, "one read record per node in the window");
    assert_eq!(
        reads.iter().map(|e| u64::from(e.count)).sum::<u64>(),
        (REPLICAS as u64) * (MINUTES as u64),
        "every read is counted"
    );
    assert!(
        entries.iter().all(|e| e.record.allowed),
        "no refresh was refused: {:?}",
        entries.iter().find(|e| !e.record.allowed)
    );
    let tokens = reader.access_token_count().expect("count");
    assert!(
        tokens <= u64::from(TOKEN_CAP),
        "{tokens} token records, cap {TOKEN_CAP}"
    );

    let snapshot = log
        .sm
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .expect("snapshot");
    let bytes = snapshot.snapshot.metadata().await.expect("stat").len();
    eprintln!(
        "after the hour: {} audit records, {tokens} token records, snapshot {bytes} bytes",
        entries.len()
    );
    assert!(
        bytes <= SNAPSHOT_CAP_BYTES,
        "snapshot of {bytes} bytes, cap {SNAPSHOT_CAP_BYTES}"
    );

    // The streamed snapshot installs on another coordinator, state equal.
    let other = tempfile::tempdir().expect("tempdir");
    let (_l2, mut follower) = open_stores(other.path(), Histogram::new([1.0])).expect("open");
    let mut receiving = follower.begin_receiving_snapshot().await.expect("begin");
    *receiving = *snapshot.snapshot;
    follower
        .install_snapshot(&snapshot.meta, receiving)
        .await
        .expect("install");
    assert_eq!(
        follower
            .reader()
            .audit(|_| true, usize::MAX)
            .expect("audit"),
        entries
    );
    assert_eq!(
        follower.reader().access_token_count().expect("count"),
        tokens
    );
    let current = follower
        .get_current_snapshot()
        .await
        .expect("current")
        .expect("kept");
    assert_eq!(current.meta, snapshot.meta);
}

fn refusal(actor: &str, secret: &str, why: &str) -> AuditRecord {
    AuditRecord {
        allowed: false,
        detail: why.into(),
        secret: secret.into(),
        ..audit(actor, "read")
    }
}

#[tokio::test]
async fn repeats_aggregate_per_reason_within_the_window_changes_never_and_the_oldest_go_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_log, sm) = open_stores(dir.path(), Histogram::new([1.0])).expect("open");
    let mut log = Log { sm, index: 0 };
    let config = ClusterConfig {
        audit_max_records: 1000,
        audit_aggregate_window_s: 60,
        ..ClusterConfig::default()
    };
    log.apply(vec![request(
        START_MS,
        Command::InitCluster {
            cluster_id: "c1".into(),
            config,
        },
    )])
    .await;
    let audit_at = |at: i64, records: Vec<AuditRecord>| {
        request(at, Command::Secret(SecretCommand::Audit { records }))
    };
    // Two reasons, repeated; a change twice; a counted batch from a leader.
    log.apply(vec![
        audit_at(START_MS, vec![refusal("node:x", "db", "bad signature"); 3]),
        audit_at(START_MS + 1, vec![refusal("node:x", "db", "expired")]),
        audit_at(
            START_MS + 2,
            vec![audit("admin:ops", "update"), audit("admin:ops", "update")],
        ),
        request(
            START_MS + 3,
            Command::Secret(SecretCommand::RecordCounted {
                uses: vec![],
                audits: vec![(refusal("node:x", "db", "bad signature"), 500, START_MS + 3)],
            }),
        ),
    ])
    .await;
    let reader = log.sm.reader();
    let entries = reader.audit(|_| true, usize::MAX).expect("audit");
    let counts: Vec<(String, String, u32)> = entries
        .iter()
        .map(|e| (e.record.action.clone(), e.record.detail.clone(), e.count))
        .collect();
    assert_eq!(
        counts,
        vec![
            ("read".into(), "bad signature".into(), 503),
            ("read".into(), "expired".into(), 1),
            ("update".into(), "audience api".into(), 1),
            ("update".into(), "audience api".into(), 1),
        ]
    );
    assert_eq!(entries[0].last_at_ms, START_MS + 3);
    // Beyond the cap the oldest go first, and a dropped aggregate is not
    // counted into again.
    let many: Vec<_> = (0..1200)
        .map(|i| refusal("node:y", &format!("s{i}"), "not found"))
        .collect();
    log.apply(vec![audit_at(START_MS + 10, many)]).await;
    let entries = reader.audit(|_| true, usize::MAX).expect("audit");
    assert_eq!(entries.len(), 1000);
    assert_eq!(entries[0].record.secret, "s200", "the oldest were dropped");
    log.apply(vec![audit_at(
        START_MS + 20,
        vec![refusal("node:x", "db", "expired")],
    )])
    .await;
    let entries = reader.audit(|_| true, usize::MAX).expect("audit");
    let last = entries.last().expect("one");
    assert_eq!(
        (last.record.detail.as_str(), last.count),
        ("expired", 1),
        "a new record, not a count on a dropped one"
    );
    // Within the window a repeat is counted; after it, a new record starts.
    let expired_counts = |log: &Log| {
        log.sm
            .reader()
            .audit(|a| a.detail == "expired", usize::MAX)
            .expect("audit")
            .iter()
            .map(|e| e.count)
            .collect::<Vec<_>>()
    };
    let expired = |at: i64| audit_at(at, vec![refusal("node:x", "db", "expired")]);
    log.apply(vec![expired(START_MS + 20 + 59_999)]).await;
    assert_eq!(expired_counts(&log), vec![2]);
    log.apply(vec![expired(START_MS + 20 + 60_000)]).await;
    assert_eq!(expired_counts(&log), vec![2, 1]);
}

#[tokio::test]
async fn a_corrupt_snapshot_is_refused_and_leaves_the_state_as_it_was() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let (_log, sm) = open_stores(dir.path(), Histogram::new([1.0])).expect("open");
    let mut log = Log { sm, index: 0 };
    log.apply(vec![request(
        START_MS,
        Command::InitCluster {
            cluster_id: "c1".into(),
            config: ClusterConfig::default(),
        },
    )])
    .await;
    let snapshot = log
        .sm
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .expect("snapshot");
    let mut sm = log.sm.clone();
    let before = sm.applied_state().await.expect("applied");
    for junk in [&b"CLDSNAP1\x01\xff\xff\xff\xff"[..], b"not a snapshot", b""] {
        let mut f = sm.begin_receiving_snapshot().await.expect("begin");
        f.write_all(junk).await.expect("write");
        f.flush().await.expect("flush");
        let mut meta = snapshot.meta.clone();
        meta.snapshot_id = "junk".into();
        assert!(sm.install_snapshot(&meta, f).await.is_err(), "{junk:?}");
        assert_eq!(sm.applied_state().await.expect("applied"), before);
        assert_eq!(
            sm.reader().cluster().expect("read").map(|c| c.cluster_id),
            Some("c1".to_owned())
        );
    }
    assert_eq!(
        sm.get_current_snapshot()
            .await
            .expect("current")
            .expect("kept")
            .meta,
        snapshot.meta
    );
}
