//! Join tokens and CSR enrollment against a 3-coordinator cluster.

use std::collections::HashMap;
use std::time::Duration;

use cloudless_pki::{new_csr, Identity, JoinTokenClaims, TokenKey};
use cloudless_proto::v1 as pb;
use cloudless_test::{channel, InProcessCluster};
use pb::node_service_client::NodeServiceClient;
use tonic::Code;
use tracing::info;

async fn create_token(addr: &str, ttl_seconds: u64, max_uses: u32) -> pb::CreateJoinTokenResponse {
    NodeServiceClient::new(channel(addr))
        .create_join_token(pb::CreateJoinTokenRequest {
            write: None,
            ttl_seconds,
            max_uses,
            labels: HashMap::from([("zone".to_owned(), "eu-a".to_owned())]),
        })
        .await
        .expect("create token")
        .into_inner()
}

/// An agent's side: a fresh key and a CSR naming no identity, sent with the token.
async fn enroll(addr: &str, token: &str, name: &str) -> Result<pb::EnrollResponse, tonic::Status> {
    let (csr, _key) = cloudless_pki::new_anonymous_csr().expect("csr");
    enroll_csr(addr, token, name, csr).await
}

async fn enroll_csr(
    addr: &str,
    token: &str,
    name: &str,
    csr_pem: String,
) -> Result<pb::EnrollResponse, tonic::Status> {
    NodeServiceClient::new(channel(addr))
        .enroll(pb::EnrollRequest {
            join_token: token.to_owned(),
            csr_pem,
            name: name.to_owned(),
        })
        .await
        .map(tonic::Response::into_inner)
}

fn der(pem: &str) -> Vec<u8> {
    use base64::Engine as _;
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .expect("PEM")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn enrollment_issues_a_certificate_and_counts_token_uses() {
    let cluster = InProcessCluster::start(3, |_| {}).await;
    let follower = cluster.addr(cluster.follower());
    info!("phase: the cluster CA exists once init has run");
    cloudless_test::wait_until(
        "identity material committed",
        Duration::from_secs(10),
        || {
            cluster.nodes[0]
                .as_ref()
                .is_some_and(|c| matches!(c.handle().reader().identity(), Ok(Some(_))))
        },
    )
    .await;

    info!("phase: a single-use token, created and used through a follower");
    let t = create_token(&follower, 3600, 1).await;
    assert!(t.token.split('.').count() == 3);
    let r = enroll(&follower, &t.token, "laptop-1")
        .await
        .expect("enrolled");
    assert!(
        !r.ca_certificate_pem.contains("PRIVATE KEY"),
        "only the CA certificate is handed out"
    );
    let identity = cloudless_pki::verify_with_ca_cert(
        &r.ca_certificate_pem,
        &der(&r.certificate_pem),
        cloudless_coordinator::now_ms() / 1000,
    )
    .expect("the node certificate verifies against the cluster CA");
    assert_eq!(identity, Identity::Node(r.node_id.clone()));

    let nodes = NodeServiceClient::new(channel(&follower))
        .list(pb::ListNodesRequest { read: None })
        .await
        .expect("list")
        .into_inner()
        .nodes;
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].name, "laptop-1");
    assert_eq!(
        nodes[0].labels.get("zone").map(String::as_str),
        Some("eu-a"),
        "labels come from the token"
    );

    info!("phase: the token is used up");
    let err = enroll(&follower, &t.token, "laptop-2")
        .await
        .expect_err("second use accepted");
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(
        err.message().contains("has been used 1 of 1 times"),
        "{}",
        err.message()
    );
    let tokens = NodeServiceClient::new(channel(&follower))
        .list_join_tokens(pb::ListJoinTokensRequest { read: None })
        .await
        .expect("list tokens")
        .into_inner()
        .tokens;
    assert_eq!(tokens[0].remaining_uses, 0);
    assert!(
        !format!("{tokens:?}").contains(&t.token),
        "listing never shows the token itself"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_agents_racing_for_a_single_use_token_exactly_one_wins() {
    let cluster = InProcessCluster::start(3, |_| {}).await;
    let (a, b) = (cluster.addr(0), cluster.addr(1));
    let t = create_token(&a, 3600, 1).await;
    for round in 0..5 {
        let t = if round == 0 {
            t.clone()
        } else {
            create_token(&a, 3600, 1).await
        };
        let (name_a, name_b) = (format!("a{round}"), format!("b{round}"));
        let (ra, rb) = tokio::join!(enroll(&a, &t.token, &name_a), enroll(&b, &t.token, &name_b));
        let wins = [ra.is_ok(), rb.is_ok()].iter().filter(|w| **w).count();
        assert_eq!(wins, 1, "round {round}: {ra:?} / {rb:?}");
        let loser = ra.err().or(rb.err()).expect("one loser");
        assert!(
            loser.message().contains("has been used 1 of 1 times"),
            "{}",
            loser.message()
        );
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_tokens_and_csrs_are_refused_clearly() {
    let cluster = InProcessCluster::start(3, |_| {}).await;
    let addr = cluster.addr(cluster.follower());

    info!("phase: expired");
    let t = create_token(&addr, 1, 5).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let err = enroll(&addr, &t.token, "late")
        .await
        .expect_err("expired token accepted");
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("expired"), "{}", err.message());

    info!("phase: forged signature (another cluster's key)");
    let forger = TokenKey::generate().expect("key");
    let claims = JoinTokenClaims::new(
        "forged".into(),
        cloudless_coordinator::now_ms() / 1000,
        3600,
        100,
        Default::default(),
    );
    let err = enroll(&addr, &forger.sign(&claims).expect("sign"), "evil")
        .await
        .expect_err("forged token accepted");
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(
        err.message().contains("signature is invalid"),
        "{}",
        err.message()
    );

    info!("phase: revoked");
    let t = create_token(&addr, 3600, 5).await;
    NodeServiceClient::new(channel(&addr))
        .revoke_join_token(pb::RevokeJoinTokenRequest {
            write: None,
            token_id: t.token_id.clone(),
        })
        .await
        .expect("revoke");
    let err = enroll(&addr, &t.token, "too-late")
        .await
        .expect_err("revoked token accepted");
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("was revoked"), "{}", err.message());

    info!("phase: a CSR asking for another identity does not use the token");
    let t = create_token(&addr, 3600, 1).await;
    let (csr, _) = new_csr(&Identity::Admin("root".into())).expect("csr");
    let err = enroll_csr(&addr, &t.token, "sneaky", csr)
        .await
        .expect_err("identity swap accepted");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("asks for"), "{}", err.message());
    enroll(&addr, &t.token, "honest")
        .await
        .expect("the token still has its use");

    info!("phase: malformed input names the field");
    let t = create_token(&addr, 3600, 5).await;
    let err = enroll(&addr, &t.token, "Bad Name")
        .await
        .expect_err("bad name");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("name:"), "{}", err.message());
    let err = enroll_csr(&addr, &t.token, "ok-name", "junk".into())
        .await
        .expect_err("junk csr");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = enroll(&addr, "not-a-token", "ok-name")
        .await
        .expect_err("junk token");
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("malformed"), "{}", err.message());
    let err = NodeServiceClient::new(channel(&addr))
        .create_join_token(pb::CreateJoinTokenRequest {
            write: None,
            ttl_seconds: 90 * 24 * 3600,
            max_uses: 1,
            labels: HashMap::new(),
        })
        .await
        .expect_err("90-day token");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("ttl_seconds"), "{}", err.message());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_records_can_be_cordoned_drained_and_removed() {
    let cluster = InProcessCluster::start(3, |_| {}).await;
    let addr = cluster.addr(0);
    let t = create_token(&addr, 3600, 2).await;
    let id = enroll(&addr, &t.token, "pi-1")
        .await
        .expect("enroll")
        .node_id;
    let mut c = NodeServiceClient::new(channel(&cluster.addr(2)));
    let act = |id: &str| pb::NodeActionRequest {
        write: None,
        id: id.to_owned(),
    };
    let n = c
        .cordon(act(&id))
        .await
        .expect("cordon")
        .into_inner()
        .node
        .expect("node");
    assert!(n.cordoned && !n.draining);
    let n = c
        .drain(act(&id))
        .await
        .expect("drain")
        .into_inner()
        .node
        .expect("node");
    assert!(n.cordoned && n.draining);
    let n = c
        .uncordon(act(&id))
        .await
        .expect("uncordon")
        .into_inner()
        .node
        .expect("node");
    assert!(!n.cordoned && !n.draining);
    c.remove(act(&id)).await.expect("remove");
    let err = c
        .get(pb::GetNodeRequest {
            read: None,
            id: id.clone(),
        })
        .await
        .expect_err("removed node still there");
    assert_eq!(err.code(), Code::NotFound);
    let err = c.cordon(act("n-missing")).await.expect_err("missing node");
    assert_eq!(err.code(), Code::NotFound);
    info!("phase: a removed node's name can enroll again with a new id");
    let again = enroll(&addr, &t.token, "pi-1").await.expect("re-enroll");
    assert_ne!(again.node_id, id);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_a_master_key_identity_calls_fail_with_a_reason() {
    let cluster = InProcessCluster::start(1, |c| c.master_key_file = None).await;
    let err = NodeServiceClient::new(channel(&cluster.addr(0)))
        .create_join_token(pb::CreateJoinTokenRequest {
            write: None,
            ttl_seconds: 60,
            max_uses: 1,
            labels: HashMap::new(),
        })
        .await
        .expect_err("token without a CA");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("master key"), "{}", err.message());
    cluster.shutdown().await;
}
