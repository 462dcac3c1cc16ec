//! Every call is mutual TLS against the cluster CA; the caller's identity
//! comes from its certificate.

use std::time::Duration;

use cloudless_pki::{new_anonymous_csr, ClusterCa, Identity};
use cloudless_proto::v1 as pb;
use cloudless_test::{channel, InProcessCluster};
use pb::node_service_client::NodeServiceClient;
use pb::workload_service_client::WorkloadServiceClient;
use tonic::transport::Endpoint;
use tracing::info;

use cloudless_test::tls_channel;

async fn list_workloads(ch: tonic::transport::Channel) -> Result<usize, tonic::Status> {
    WorkloadServiceClient::new(ch)
        .list(pb::ListWorkloadsRequest::default())
        .await
        .map(|r| r.into_inner().workloads.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_cluster_admins_reach_admin_apis() {
    let cluster = InProcessCluster::start(3, |_| {}).await;
    let addr = cluster.addr(1);
    let ca_pem =
        std::fs::read_to_string(cluster.configs[0].data_dir.join("admin/ca.crt")).expect("ca.crt");

    info!("phase: the admin certificate written by init works");
    assert_eq!(list_workloads(channel(&addr)).await.expect("admin call"), 0);

    info!("phase: no client certificate");
    let err = list_workloads(tls_channel(&addr, &ca_pem, None))
        .await
        .expect_err("anonymous call accepted");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    assert!(
        err.message().contains("client certificate"),
        "{}",
        err.message()
    );

    info!("phase: a certificate from another CA is refused at the handshake");
    let rogue = ClusterCa::generate("rogue", cloudless_coordinator::now_ms() / 1000).expect("ca");
    let fake = rogue
        .issue(
            &Identity::Admin("admin".into()),
            &[],
            3600,
            cloudless_coordinator::now_ms() / 1000,
        )
        .expect("issue");
    let fake_key = fake.key_pem.as_ref().expect("key").to_string();
    let err = list_workloads(tls_channel(
        &addr,
        &ca_pem,
        Some((&fake.cert_pem, &fake_key)),
    ))
    .await
    .expect_err("foreign CA accepted");
    assert_ne!(err.code(), tonic::Code::Ok);

    info!("phase: a plaintext client cannot talk to a TLS coordinator");
    let plain = Endpoint::from_shared(format!("http://{addr}"))
        .expect("address")
        .timeout(Duration::from_secs(5))
        .connect_lazy();
    assert!(
        list_workloads(plain).await.is_err(),
        "plaintext call accepted"
    );

    info!("phase: an enrolled node's certificate cannot call admin APIs");
    let token = NodeServiceClient::new(channel(&addr))
        .create_join_token(pb::CreateJoinTokenRequest {
            ttl_seconds: 600,
            max_uses: 1,
            ..Default::default()
        })
        .await
        .expect("token")
        .into_inner()
        .token;
    let (csr, node_key) = new_anonymous_csr().expect("csr");
    // Enrollment needs no client certificate: the join token authenticates it.
    let enrolled = NodeServiceClient::new(tls_channel(&addr, &ca_pem, None))
        .enroll(pb::EnrollRequest {
            join_token: token,
            csr_pem: csr,
            name: "edge-1".into(),
        })
        .await
        .expect("enroll without a client certificate")
        .into_inner();
    let node_ch = tls_channel(&addr, &ca_pem, Some((&enrolled.certificate_pem, &node_key)));
    let err = list_workloads(node_ch.clone())
        .await
        .expect_err("node certificate reached an admin API");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(
        err.message().contains(&format!(
            "cloudless://node/{} may not call administrative APIs",
            enrolled.node_id
        )),
        "{}",
        err.message()
    );
    let err = NodeServiceClient::new(node_ch)
        .create_join_token(pb::CreateJoinTokenRequest {
            ttl_seconds: 600,
            max_uses: 1,
            ..Default::default()
        })
        .await
        .expect_err("a node minted a join token");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    cluster.shutdown().await;
}
