//! Placement labels come from join tokens and admins, never from the node:
//! an agent (the real agent library, over mTLS) reporting `tier=secure`
//! does not attract a workload selecting it until an admin labels the node
//! with `cloudlessctl node label`.

use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::time::Duration;

use cloudless_agent::AgentConfig;
use cloudless_proto::v1 as pb;
use cloudless_test::{channel, wait_until, workspace_binary, InProcessCluster};
use pb::node_service_client::NodeServiceClient;
use pb::workload_service_client::WorkloadServiceClient;
use tokio_util::sync::CancellationToken;
use tracing::info;
use zeroize::Zeroizing;

fn ctl(cluster: &InProcessCluster, args: &[&str]) -> String {
    let out = Command::new(workspace_binary("cloudlessctl"))
        .arg("--config")
        .arg(cluster.configs[0].data_dir.join("admin/cloudlessctl.toml"))
        .args(["--server", &cluster.addr(0)])
        .args(args)
        .output()
        .expect("run cloudlessctl");
    assert!(out.status.success(), "cloudlessctl {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Workload `name` with one replica selecting `selector`.
async fn apply(addr: &str, name: &str, selector: &[(&str, &str)]) {
    let mut w = cloudless_test::workload(name, 1);
    if let Some(spec) = w.spec.as_mut() {
        spec.placement = Some(pb::Placement {
            node_selector: selector
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..pb::Placement::default()
        });
    }
    WorkloadServiceClient::new(channel(addr))
        .apply(pb::ApplyWorkloadRequest {
            write: None,
            workload: Some(w),
        })
        .await
        .expect("apply");
}

fn placed(cluster: &InProcessCluster, workload: &str) -> usize {
    let c = cluster.nodes[0].as_ref().expect("running");
    c.handle()
        .reader()
        .replicas()
        .expect("replicas")
        .iter()
        .filter(|r| r.workload == workload)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reported_label_attracts_nothing_until_an_admin_sets_it_with_cloudlessctl() {
    let cluster = InProcessCluster::start(1, |_| {}).await;
    let addr = cluster.addr(0);

    info!("phase: an agent enrolls with zone=a and reports tier=secure itself");
    let token = NodeServiceClient::new(channel(&addr))
        .create_join_token(pb::CreateJoinTokenRequest {
            write: None,
            ttl_seconds: 600,
            max_uses: 1,
            labels: HashMap::from([("zone".to_owned(), "a".to_owned())]),
        })
        .await
        .expect("token")
        .into_inner()
        .token;
    let cancel = CancellationToken::new();
    let agent = tokio::spawn(cloudless_agent::run(
        AgentConfig {
            data_dir: cluster.dir.path().join("agent"),
            coordinators: vec![addr.clone()],
            name: "laptop".to_owned(),
            join_token: Some(Zeroizing::new(token)),
            ca_cert: Some(cluster.configs[0].data_dir.join("admin/ca.crt")),
            labels: BTreeMap::from([("tier".to_owned(), "secure".to_owned())]),
            runtime: None,
            overlay_listen: None,
            overlay_advertise: Vec::new(),
            overlay_hole_punching: false,
            bandwidth_bps: None,
            metrics_listen: None,
        },
        cancel.clone(),
    ));

    info!("phase: a plain workload lands on it, the tier=secure one does not");
    apply(&addr, "plain", &[]).await;
    apply(&addr, "payments", &[("tier", "secure")]).await;
    wait_until("the plain workload placed", Duration::from_secs(20), || {
        placed(&cluster, "plain") == 1
    })
    .await;
    assert_eq!(
        placed(&cluster, "payments"),
        0,
        "a self-reported label attracted a workload"
    );
    let nodes: serde_json::Value =
        serde_json::from_str(&ctl(&cluster, &["-o", "json", "node", "list"])).expect("json");
    let node = &nodes[0];
    let id = node["id"].as_str().expect("node id").to_owned();
    assert_eq!(node["labels"], serde_json::json!({"zone": "a"}), "{node}");
    assert_eq!(node["reportedLabels"]["tier"], "secure", "{node}");

    info!("phase: an admin labels the node; the workload follows");
    let out = ctl(&cluster, &["node", "label", &id, "tier=secure", "rack=r1"]);
    assert!(out.contains("rack=r1,tier=secure,zone=a"), "{out}");
    wait_until("payments placed", Duration::from_secs(20), || {
        placed(&cluster, "payments") == 1
    })
    .await;

    info!("phase: key- removes a label");
    ctl(&cluster, &["node", "label", &id, "rack-"]);
    let node: serde_json::Value =
        serde_json::from_str(&ctl(&cluster, &["node", "get", &id])).expect("json");
    assert_eq!(
        node["labels"],
        serde_json::json!({"tier": "secure", "zone": "a"}),
        "{node}"
    );

    cancel.cancel();
    let _ = agent.await;
    cluster.shutdown().await;
}
