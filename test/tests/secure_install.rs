//! Safe as installed: `init` with nothing but its flags serves mTLS,
//! plaintext needs an explicit flag and stays on loopback unless forced,
//! admin certificates are short-lived, renewed by cloudlessctl and
//! revocable, coordinator certificates renew without a restart, and a
//! removed coordinator's certificate is refused.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use cloudless_proto::v1 as pb;
use cloudless_test::{free_port, workspace_binary, InProcessCluster, ProcessNode};
use pb::cluster_service_client::ClusterServiceClient;
use pb::node_service_client::NodeServiceClient;
use pb::workload_service_client::WorkloadServiceClient;
use tonic::transport::{Channel, Endpoint};
use tracing::info;

use cloudless_test::tls_channel;

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

async fn list_workloads(ch: Channel) -> Result<usize, tonic::Status> {
    WorkloadServiceClient::new(ch)
        .list(pb::ListWorkloadsRequest::default())
        .await
        .map(|r| r.into_inner().workloads.len())
}

/// Runs cloudlessctl; (exit code, stdout, stderr).
fn ctl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(workspace_binary("cloudlessctl"))
        .args(args)
        .output()
        .expect("run cloudlessctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn not_after(cert_pem: &str) -> i64 {
    cloudless_pki::inspect_certificate(cert_pem)
        .expect("certificate")
        .not_after
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_init_serves_mtls_creates_its_master_key_and_refuses_clients_without_a_certificate()
{
    cloudless_test::init_test_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = ProcessNode::new(dir.path(), 0);
    node.plaintext = false;
    info!("phase: init with nothing but its data dir and addresses");
    node.spawn("init", None);
    let data = node.data_dir.clone();
    let ctl_config = data.join("admin/cloudlessctl.toml");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ctl_config.exists() {
        assert!(Instant::now() < deadline, "init wrote no admin credentials");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    info!("phase: key files are private, the data dir is the owner's");
    for f in ["master.key", "tls/coordinator.key", "admin/admin.key"] {
        assert_eq!(mode(&data.join(f)), 0o600, "{f}");
    }
    assert_eq!(mode(&data.join("admin")), 0o700);
    assert_eq!(mode(&data.join("tls")), 0o700);

    info!("phase: TLS without a client certificate is refused");
    let ca = read(&data.join("admin/ca.crt"));
    let err = list_workloads(tls_channel(&node.grpc, &ca, None))
        .await
        .expect_err("anonymous call accepted");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");

    info!("phase: the admin from init works and can create a join token");
    let (cert, key) = (
        read(&data.join("admin/admin.crt")),
        read(&data.join("admin/admin.key")),
    );
    let admin = tls_channel(&node.grpc, &ca, Some((&cert, &key)));
    let deadline = Instant::now() + Duration::from_secs(30);
    let token = loop {
        let r = NodeServiceClient::new(admin.clone())
            .create_join_token(pb::CreateJoinTokenRequest {
                ttl_seconds: 600,
                max_uses: 1,
                ..Default::default()
            })
            .await;
        match r {
            Ok(r) => break r.into_inner(),
            Err(e) => {
                assert!(Instant::now() < deadline, "no join token: {e:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert!(!token.token.is_empty());
    assert_eq!(list_workloads(admin).await.expect("admin call"), 0);

    info!("phase: plaintext clients get nowhere");
    let plain = Endpoint::from_shared(format!("http://{}", node.grpc))
        .expect("address")
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect_lazy();
    // The server is up (the admin call above worked): a plaintext client
    // fails on the protocol (an h2 error, or the server closing the
    // connection on the bytes that are no TLS handshake, depending on who
    // reads first), not on a closed port.
    let err = list_workloads(plain).await.expect_err("plaintext accepted");
    let text = format!("{err:?}");
    assert!(
        err.message().contains("h2 protocol error")
            || err.code() == tonic::Code::Unknown
            || (err.code() == tonic::Code::Cancelled && text.contains("connection closed")),
        "{err:?}"
    );
    assert!(!text.contains("Connection refused"), "{err:?}");
}

/// Runs the coordinator binary to exit (or kills it after `wait`).
fn run_coordinator(args: &[&str], wait: Duration) -> (Option<i32>, String) {
    let mut child = Command::new(workspace_binary("cloudless-coordinator"))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn coordinator");
    let deadline = Instant::now() + wait;
    let code = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status.code();
        }
        if Instant::now() >= deadline {
            child.kill().expect("kill");
            child.wait().expect("reap");
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut err);
    }
    (code, err)
}

#[test]
fn plaintext_on_a_non_loopback_address_is_refused_unless_forced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let (listen, advertise, http) = (
        format!("0.0.0.0:{port}"),
        format!("127.0.0.1:{port}"),
        format!("127.0.0.1:{}", free_port()),
    );
    let data = dir.path().join("d").display().to_string();
    let base = [
        "init",
        "--data-dir",
        &data,
        "--listen",
        &listen,
        "--advertise",
        &advertise,
        "--http",
        &http,
        "--insecure-plaintext",
    ];
    let (code, err) = run_coordinator(&base, Duration::from_secs(20));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("insecure_plaintext") && err.contains("not a loopback address"),
        "{err}"
    );
    assert!(
        err.contains("--insecure-plaintext-anywhere"),
        "the error says how to force it: {err}"
    );
    assert!(
        !dir.path().join("d").exists(),
        "a refused start touches no data dir"
    );

    // Forced, it starts (and is still running when we stop it).
    let mut forced = base.to_vec();
    forced.push("--insecure-plaintext-anywhere");
    let (code, err) = run_coordinator(&forced, Duration::from_secs(3));
    assert_eq!(code, None, "the forced start exited: {err}");
    assert!(err.contains("PLAINTEXT"), "it warns: {err}");

    // On loopback the flag alone is enough.
    let loopback = format!("127.0.0.1:{}", free_port());
    let data2 = dir.path().join("d2").display().to_string();
    let (code, err) = run_coordinator(
        &[
            "init",
            "--data-dir",
            &data2,
            "--listen",
            &loopback,
            "--http",
            &http,
            "--insecure-plaintext",
        ],
        Duration::from_secs(3),
    );
    assert_eq!(code, None, "the loopback start exited: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cloudlessctl_renews_an_admin_certificate_before_it_expires_and_a_revoked_admin_is_refused()
{
    let cluster = InProcessCluster::start(3, |_| {}).await;
    let root = cluster.configs[0].data_dir.join("admin/cloudlessctl.toml");
    let root = root.display().to_string();
    let dir = tempfile::tempdir().expect("tempdir");

    info!("phase: admin certificates live 15 s");
    let (code, out, err) = ctl(&[
        "--config",
        &root,
        "cluster",
        "set",
        "admin_cert_lifetime_s=15",
    ]);
    assert_eq!(code, 0, "{out}{err}");

    info!("phase: an admin issues a certificate to alice");
    let alice = dir.path().join("alice");
    let (code, out, err) = ctl(&[
        "--config",
        &root,
        "admin",
        "issue",
        "alice",
        "--out",
        &alice.display().to_string(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(mode(&alice.join("admin.key")), 0o600);
    assert_eq!(mode(&alice.join("cloudlessctl.toml")), 0o600);
    let alice_config = alice.join("cloudlessctl.toml").display().to_string();
    let first = read(&alice.join("admin.crt"));
    let first_not_after = not_after(&first);
    let key_before = read(&alice.join("admin.key"));

    info!("phase: alice keeps working past her first certificate's expiry");
    let mut renewals = 0;
    let mut last = first_not_after;
    let end = first_not_after + 8;
    while cloudless_coordinator::now_ms() / 1000 < end {
        let (code, out, err) = ctl(&["--config", &alice_config, "get", "workloads"]);
        assert_eq!(code, 0, "alice refused: {out}{err}");
        let now_after = not_after(&read(&alice.join("admin.crt")));
        if now_after > last {
            // Renewed with two thirds of its lifetime gone, not at once.
            assert!(
                cloudless_coordinator::now_ms() / 1000 >= last - 15 + 9,
                "renewed too early"
            );
            renewals += 1;
            assert!(err.contains("renewed the admin certificate"), "{err}");
            last = now_after;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(renewals >= 1, "the certificate was never renewed");
    assert_eq!(
        read(&alice.join("admin.key")),
        key_before,
        "renewal keeps the key, so key and certificate always match"
    );
    assert_eq!(mode(&alice.join("admin.key")), 0o600);

    info!("phase: certificates live an hour again; alice renews now");
    let (code, out, err) = ctl(&[
        "--config",
        &root,
        "cluster",
        "set",
        "admin_cert_lifetime_s=3600",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = ctl(&["--config", &alice_config, "admin", "renew"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        not_after(&read(&alice.join("admin.crt"))) > cloudless_coordinator::now_ms() / 1000 + 3000
    );

    info!("phase: alice is revoked");
    let (code, out, err) = ctl(&["--config", &root, "admin", "revoke", "alice"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = ctl(&["--config", &alice_config, "get", "workloads"]);
    assert_ne!(code, 0, "a revoked admin was served: {out}");
    assert!(err.contains("revoked"), "{err}");
    // Through every coordinator, followers (which forward) included.
    for i in 0..3 {
        let server = cluster.addr(i);
        let (code, _, err) = ctl(&[
            "--config",
            &alice_config,
            "--server",
            &server,
            "admin",
            "renew",
        ]);
        assert_ne!(code, 0, "a revoked admin renewed itself through {server}");
        assert!(err.contains("revoked"), "{err}");
        let (code, _, err) = ctl(&[
            "--config",
            &alice_config,
            "--server",
            &server,
            "admin",
            "issue",
            "mallory",
            "--out",
            &dir.path().join("mallory").display().to_string(),
        ]);
        assert_ne!(
            code, 0,
            "a revoked admin issued a certificate through {server}"
        );
        assert!(err.contains("revoked"), "{err}");
    }
    let (code, out, err) = ctl(&["--config", &root, "-o", "json", "admin", "list"]);
    assert_eq!(code, 0, "{err}");
    let list: serde_json::Value = serde_json::from_str(&out).expect("json");
    let rec = list
        .as_array()
        .expect("array")
        .iter()
        .find(|a| a["name"] == "alice")
        .expect("alice listed");
    assert_eq!(rec["revoked"], true, "{rec}");

    info!("phase: issued again, alice's new certificate works and the old one stays refused");
    let again = dir.path().join("alice2");
    let (code, out, err) = ctl(&[
        "--config",
        &root,
        "admin",
        "issue",
        "alice",
        "--out",
        &again.display().to_string(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = ctl(&[
        "--config",
        &again.join("cloudlessctl.toml").display().to_string(),
        "get",
        "workloads",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, _, err) = ctl(&["--config", &alice_config, "get", "workloads"]);
    assert_ne!(code, 0, "the revoked certificate came back");
    assert!(err.contains("revoked"), "{err}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn coordinators_renew_their_certificates_without_a_restart_and_a_removed_one_is_refused() {
    let mut cluster = InProcessCluster::start(3, |c| {
        c.coordinator_cert_lifetime = Duration::from_secs(30);
    })
    .await;
    let cert_file = |i: usize| cluster.configs[i].data_dir.join("tls/coordinator.crt");
    let first: Vec<i64> = (0..3).map(|i| not_after(&read(&cert_file(i)))).collect();
    let ca = read(&cluster.configs[0].data_dir.join("admin/ca.crt"));

    info!("phase: writes keep committing past every first certificate's expiry");
    let end = first.iter().max().copied().unwrap_or(0) + 6;
    let mut n = 0;
    while cloudless_coordinator::now_ms() / 1000 < end {
        let leader = cluster.wait_for_leader().await;
        cloudless_test::apply(&cluster.addr(leader), &format!("w{n}"), 1)
            .await
            .unwrap_or_else(|e| panic!("write {n} failed: {e:?}"));
        n += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for (i, before) in first.iter().enumerate() {
        let now_after = not_after(&read(&cert_file(i)));
        assert!(
            now_after > *before,
            "coordinator {i} did not renew ({now_after} <= {before})"
        );
    }
    // The certificate served now is the renewed one.
    let served = {
        let admin = cluster.configs[0].data_dir.join("admin");
        let ch = tls_channel(
            &cluster.addr(0),
            &ca,
            Some((
                &read(&admin.join("admin.crt")),
                &read(&admin.join("admin.key")),
            )),
        );
        list_workloads(ch)
            .await
            .expect("served with the renewed certificate")
    };
    assert_eq!(served, n);

    info!("phase: a removed coordinator's certificate is refused");
    let leader = cluster.wait_for_leader().await;
    let victim = (leader + 1) % 3;
    let victim_id = cluster.nodes[victim]
        .as_ref()
        .expect("running")
        .handle()
        .id();
    let victim_cert = read(&cert_file(victim));
    let victim_key = read(&cluster.configs[victim].data_dir.join("tls/coordinator.key"));
    let other = (0..3).find(|i| *i != victim).expect("another node");
    let other_addr = cluster.addr(other);
    let as_victim = || tls_channel(&other_addr, &ca, Some((&victim_cert, &victim_key)));
    // Before the removal a member coordinator may call admin APIs.
    list_workloads(as_victim())
        .await
        .expect("a member coordinator is trusted");
    ClusterServiceClient::new(cloudless_test::channel(&cluster.addr(leader)))
        .remove_coordinator(pb::RemoveCoordinatorRequest {
            node_id: victim_id,
            ..Default::default()
        })
        .await
        .expect("remove");
    cluster.stop(victim).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match list_workloads(as_victim()).await {
            Err(e) if e.code() == tonic::Code::PermissionDenied => {
                assert!(e.message().contains("removed"), "{}", e.message());
                break;
            }
            other => {
                assert!(
                    Instant::now() < deadline,
                    "a removed coordinator is still trusted: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    cluster.shutdown().await;
}
