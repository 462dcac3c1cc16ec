//! A leader cut off from its followers must not answer secret reads from
//! its own memory: the others elect a new leader, which may revoke tokens
//! and delete secrets the old one never hears about (openraft 0.9 has no
//! check-quorum, so the old leader keeps calling itself Leader).

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::Duration;

use cloudless_proto::v1 as pb;
use cloudless_test::proxy::TcpProxy;
use cloudless_test::{channel, register_admin_tls, wait_until, InProcessCluster};
use openraft::ServerState;
use pb::secret_service_client::SecretServiceClient;
use tonic::Code;
use tracing::info;

fn state_and_term(cluster: &InProcessCluster, i: usize) -> (ServerState, u64) {
    let c = cluster.nodes[i].as_ref().expect("running");
    let m = c.handle().raft().metrics().borrow().clone();
    (m.state, m.current_term)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deposed_leader_refuses_a_many_use_token_the_new_leader_revoked() {
    // Every coordinator is reached by its peers through a proxy the test can
    // cut; the test talks to the old leader on its own port.
    let proxies = RefCell::new(Vec::new());
    let cluster = InProcessCluster::start_with(3, |_, c| {
        let p = TcpProxy::start(c.listen_addr);
        c.advertise_addr = p.addr();
        proxies.borrow_mut().push(p);
    })
    .await;
    let proxies = proxies.into_inner();
    let old = cluster.wait_for_leader().await;
    let direct = cluster.configs[old].listen_addr.to_string();
    register_admin_tls(&direct, &cluster.configs[0].data_dir.join("admin"));
    let mut at_old = SecretServiceClient::new(channel(&direct));

    info!("phase: a 1,000-use token read once through the leader");
    at_old
        .create(pb::PutSecretRequest {
            write: None,
            namespace: "default".into(),
            name: "db".into(),
            data: HashMap::from([("PASSWORD".to_owned(), b"hunter2".to_vec())]),
            audiences: vec!["api".into()],
            immutable: false,
            ttl_seconds: 0,
        })
        .await
        .expect("create secret");
    let token = at_old
        .issue_token(pb::IssueTokenRequest {
            namespace: "default".into(),
            name: "db".into(),
            audience: "api".into(),
            ttl_seconds: 3600,
            max_uses: 1000,
        })
        .await
        .expect("issue token")
        .into_inner();
    let read = || pb::RevealSecretRequest {
        token: token.token.clone(),
    };
    at_old.reveal(read()).await.expect("first read");
    // The read's use count is committed in a batch; let it reach everyone.
    wait_until(
        "the use count on every node",
        Duration::from_secs(10),
        || (0..3).all(|i| cluster.applied(i) == cluster.applied(old)),
    )
    .await;

    info!("phase: the leader is cut off; the others elect a new one");
    let (_, old_term) = state_and_term(&cluster, old);
    cluster.nodes[old]
        .as_ref()
        .expect("running")
        .handle()
        .raft()
        .runtime_config()
        .heartbeat(false);
    proxies[old].cut();
    let mut new = None;
    wait_until("a new leader", Duration::from_secs(10), || {
        new = (0..3).filter(|i| *i != old).find(|i| {
            let (s, t) = state_and_term(&cluster, *i);
            s == ServerState::Leader && t > old_term
        });
        new.is_some()
    })
    .await;
    let new = new.expect("new leader");

    info!("phase: the new leader revokes the token");
    SecretServiceClient::new(channel(&cluster.addr(new)))
        .revoke_token(pb::RevokeTokenRequest {
            token_id: token.token_id.clone(),
        })
        .await
        .expect("revoke on the new leader");
    assert_eq!(
        state_and_term(&cluster, old),
        (ServerState::Leader, old_term),
        "the old leader must still believe it leads for this test to mean anything"
    );

    info!("phase: a read through the old leader is refused");
    let e = at_old
        .reveal(read())
        .await
        .expect_err("a deposed leader served a revoked token");
    assert!(
        matches!(e.code(), Code::Unavailable | Code::PermissionDenied),
        "{e}"
    );
    cluster.shutdown().await;
}
