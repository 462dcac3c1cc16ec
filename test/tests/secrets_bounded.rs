//! Secret traffic a caller provokes costs the cluster bounded Raft writes:
//! refusals are counted in the leader's memory and committed aggregated.

use std::time::{Duration, Instant};

use cloudless_proto::v1 as pb;
use cloudless_test::{channel, InProcessCluster};
use pb::secret_service_client::SecretServiceClient;
use tonic::Code;
use tracing::info;

const CALLS: u64 = 400;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_refusals_is_a_few_raft_writes_and_every_refusal_is_counted() {
    info!("phase: start three coordinators");
    let cluster = InProcessCluster::start(3, |_| {}).await;
    let leader = cluster.wait_for_leader().await;
    let mut client = SecretServiceClient::new(channel(&cluster.addr(leader)));

    info!("phase: {CALLS} token requests for a secret that does not exist");
    let before = cluster.applied(leader);
    let started = Instant::now();
    for _ in 0..CALLS {
        let e = client
            .issue_token(pb::IssueTokenRequest {
                namespace: "prod".into(),
                name: "missing".into(),
                audience: "api".into(),
                ttl_seconds: 0,
                max_uses: 1,
            })
            .await
            .expect_err("no such secret");
        assert_eq!(e.code(), Code::NotFound, "{e}");
    }
    let elapsed = started.elapsed();

    info!("phase: every refusal is audited, as one counted record");
    let deadline = Instant::now() + Duration::from_secs(10);
    let entries = loop {
        let entries = client
            .audit(pb::AuditRequest {
                namespace: "prod".into(),
                name: "missing".into(),
                refused_only: true,
                ..Default::default()
            })
            .await
            .expect("audit")
            .into_inner()
            .entries;
        let counted: u64 = entries.iter().map(|e| u64::from(e.count)).sum();
        if counted >= CALLS {
            break entries;
        }
        assert!(
            Instant::now() < deadline,
            "{counted} of {CALLS} refusals audited: {entries:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(entries.len(), 1, "{entries:#?}");
    assert_eq!(u64::from(entries[0].count), CALLS);
    assert!(entries[0].detail.contains("not found"), "{entries:#?}");

    info!("phase: the Raft log grew by about one entry per 250 ms, not one per call");
    let writes = cluster.applied(leader) - before;
    let bound = u64::try_from(elapsed.as_millis() / 250).unwrap_or(u64::MAX) + 5;
    assert!(
        writes <= bound,
        "{writes} Raft entries for {CALLS} refusals in {elapsed:?} (bound {bound})"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_updates_of_one_secret_all_commit_as_consecutive_versions() {
    const WRITERS: u64 = 8;
    let cluster = InProcessCluster::start(3, |_| {}).await;
    let leader = cluster.wait_for_leader().await;
    let addr = cluster.addr(leader);
    let put = |value: String| pb::PutSecretRequest {
        namespace: "prod".into(),
        name: "db".into(),
        data: [("PASSWORD".to_owned(), value.into_bytes())].into(),
        audiences: vec!["api".into()],
        ..Default::default()
    };
    SecretServiceClient::new(channel(&addr))
        .create(put("v1".into()))
        .await
        .expect("create");

    info!("phase: {WRITERS} updates of the same secret at once");
    let writers: Vec<_> = (0..WRITERS)
        .map(|i| {
            let (addr, req) = (addr.clone(), put(format!("writer-{i}")));
            tokio::spawn(async move { SecretServiceClient::new(channel(&addr)).update(req).await })
        })
        .collect();
    let mut versions = Vec::new();
    for w in writers {
        let meta = w
            .await
            .expect("task")
            .unwrap_or_else(|e| panic!("a concurrent update was refused: {e:?}"))
            .into_inner()
            .meta
            .expect("meta");
        versions.push(meta.version);
    }
    versions.sort_unstable();
    assert_eq!(
        versions,
        (2..2 + WRITERS).collect::<Vec<_>>(),
        "each update is its own version"
    );
    let meta = SecretServiceClient::new(channel(&addr))
        .get(pb::GetSecretRequest {
            namespace: "prod".into(),
            name: "db".into(),
            ..Default::default()
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(meta.version, 1 + WRITERS);
    cluster.shutdown().await;
}
