//! Secrets end to end with the real binaries: 3 coordinator processes with
//! mTLS and 2 enrolled agents running a workload (own containerd and
//! registry). The agents' own certificates are used as the callers, so
//! audiences are checked against real assignments. Needs root, containerd,
//! runc, busybox-static and docker-registry (installed by .ci/run); skips
//! loudly otherwise.

use std::path::Path;
use std::time::{Duration, Instant};

use cloudless_proto::v1 as pb;
use cloudless_test::e2e::{output_text as text, Cluster, Options};
use cloudless_test::wait_all_healthy;
use pb::secret_service_client::SecretServiceClient;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;

macro_rules! require_e2e {
    () => {
        if let Some(why) = cloudless_test::e2e::missing() {
            cloudless_test::skip_test(format!("end-to-end secrets test: {why}"));
            return;
        }
    };
}

/// The workload that reads the secret: env and a file for user 1000.
const API: &str = "  placement:
    zones: [a]
  securityContext:
    runAsUser: 1000
    runAsGroup: 1000
  secretEnv:
    - name: DB_PASSWORD
      secretKeyRef: {name: db, key: PASSWORD}
  volumes:
    - name: creds
      secret:
        secretName: db
        items: [{key: PASSWORD, path: password}]
  volumeMounts:
    - {name: creds, mountPath: /etc/creds}
";

/// The value the test looks for on disk afterwards.
const VALUE: &str = "pg-pass-7Qz9-never-on-disk";

fn ok(c: &Cluster, args: &[&str]) -> String {
    c.ctl_ok(args)
}

/// A SecretService client speaking as the agent whose data dir is `dir`.
fn as_node(dir: &Path, addr: &str) -> SecretServiceClient<tonic::transport::Channel> {
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).expect("node identity file");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.crt")))
        .identity(Identity::from_pem(read("node.crt"), read("node.key")))
        .domain_name("127.0.0.1");
    let ch = Endpoint::from_shared(format!("https://{addr}"))
        .expect("address")
        .tls_config(tls)
        .expect("tls")
        .timeout(Duration::from_secs(10))
        .connect_lazy();
    SecretServiceClient::new(ch)
}

fn issue(ns: &str, name: &str, audience: &str, uses: u32, ttl: u64) -> pb::IssueTokenRequest {
    pb::IssueTokenRequest {
        namespace: ns.into(),
        name: name.into(),
        audience: audience.into(),
        ttl_seconds: ttl,
        max_uses: uses,
    }
}

fn reveal(token: &str) -> pb::RevealSecretRequest {
    pb::RevealSecretRequest {
        token: token.into(),
    }
}

/// Every regular file under `dir` that contains `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    // tmpfs mounts (secret volumes) are memory, not disk.
    let tmpfs: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(" - tmpfs "))
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .collect();
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                if !tmpfs.iter().any(|m| Path::new(m) == p) {
                    stack.push(p);
                }
            } else if ft.is_file() {
                if let Ok(bytes) = std::fs::read(&p) {
                    if bytes.windows(needle.len()).any(|w| w == needle) {
                        found.push(p.display().to_string());
                    }
                }
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_scoped_audited_rotated_and_never_written_in_clear() {
    require_e2e!();
    let mut c = Cluster::start_with(Options {
        netns_zone: None,
        agent_args: vec!["--secret-refresh".into(), "1s".into()],
        ..Options::default()
    })
    .await;
    ok(
        &c,
        &[
            "secrets",
            "create",
            "default/db",
            "--data",
            &format!("PASSWORD={VALUE}"),
            "--data",
            "USER=app",
            "--audience",
            "api",
            "--ttl",
            "30d",
        ],
    );
    // One replica of "api", on agent-a, reading the secret as an env
    // variable and as a file.
    let m = c.manifest_with("api", "1", 1, "x", API);
    ok(
        &c,
        &[
            "apply",
            "-f",
            &m.display().to_string(),
            "--wait",
            "--timeout",
            "90",
        ],
    );
    let (holder, other) = (&c.agents[0], &c.agents[1]);
    assert_eq!((holder.zone.as_str(), other.zone.as_str()), ("a", "b"));
    let addr = c.coordinators[0].grpc.clone();
    let mut node_a = as_node(&holder.data_dir, &addr);
    let mut node_b = as_node(&other.data_dir, &addr);

    // The container sees it: env, and a 0400 file of its user on a tmpfs.
    let seen = ok(
        &c,
        &[
            "exec",
            "api",
            "--",
            "sh",
            "-c",
            "echo \"$DB_PASSWORD\"; stat -c '%a %u' /etc/creds/password; cat /etc/creds/password; echo; grep ' /etc/creds ' /proc/mounts",
        ],
    );
    let lines: Vec<&str> = seen.lines().collect();
    assert_eq!(lines.first().copied(), Some(VALUE), "{seen}");
    assert_eq!(lines.get(1).copied(), Some("400 1000"), "{seen}");
    assert_eq!(lines.get(2).copied(), Some(VALUE), "{seen}");
    assert!(
        lines
            .get(3)
            .is_some_and(|l| l.contains(" tmpfs ") && l.contains(" ro,")),
        "{seen}"
    );

    // The agent refreshes every second; with the secret unchanged a refresh
    // only checks the version: no token is minted, nothing is written.
    let mints = |c: &Cluster| -> u64 {
        let out = ok(
            c,
            &[
                "-o",
                "json",
                "secrets",
                "audit",
                "--secret",
                "default/db",
                "--action",
                "token-mint",
            ],
        );
        let entries: Vec<serde_json::Value> = serde_json::from_str(&out).expect("audit json");
        entries.iter().filter_map(|e| e["count"].as_u64()).sum()
    };
    let before = mints(&c);
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    assert_eq!(
        mints(&c),
        before,
        "refreshes of an unchanged secret minted tokens"
    );
    // A version check by a node that holds the audience answers the
    // version; one that does not is refused.
    let v = node_a
        .check_version(pb::CheckVersionRequest {
            namespace: "default".into(),
            name: "db".into(),
            audience: "api".into(),
        })
        .await
        .expect("version check")
        .into_inner();
    assert_eq!(v.version, 1);
    let e = node_b
        .check_version(pb::CheckVersionRequest {
            namespace: "default".into(),
            name: "db".into(),
            audience: "api".into(),
        })
        .await
        .expect_err("version check by a node without the workload");
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");

    let meta = ok(&c, &["secrets", "get", "default/db"]);
    assert!(meta.contains("Keys:        PASSWORD, USER"), "{meta}");
    assert!(!meta.contains(VALUE), "metadata shows the value");

    // The agent running an "api" replica gets a token and the values.
    let t = node_a
        .issue_token(issue("default", "db", "api", 1, 0))
        .await
        .expect("token for the holder")
        .into_inner();
    let r = node_a
        .reveal(reveal(&t.token))
        .await
        .expect("reveal")
        .into_inner();
    assert_eq!(
        r.data.get("PASSWORD").map(Vec::as_slice),
        Some(VALUE.as_bytes())
    );
    assert_eq!(r.version, 1);
    // Used up (one use).
    let e = node_a
        .reveal(reveal(&t.token))
        .await
        .expect_err("second use");
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    assert!(e.message().contains("used 1 of 1"), "{e}");

    // The other agent runs no "api" replica: no token.
    let e = node_b
        .issue_token(issue("default", "db", "api", 1, 0))
        .await
        .expect_err("token for a node without the workload");
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    assert!(
        e.message()
            .contains("runs no replica of workload default/api"),
        "{e}"
    );
    // An audience the secret does not list.
    let e = node_a
        .issue_token(issue("default", "db", "web", 1, 0))
        .await
        .expect_err("wrong audience");
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    // A token is only good for its holder.
    let t = node_a
        .issue_token(issue("default", "db", "api", 5, 0))
        .await
        .expect("token")
        .into_inner();
    let e = node_b
        .reveal(reveal(&t.token))
        .await
        .expect_err("stolen token");
    assert!(e.message().contains("was issued to node:"), "{e}");
    // Revoked: refused at once, by every coordinator.
    ok(&c, &["secrets", "revoke", &t.token_id]);
    let mut node_a_other = as_node(&holder.data_dir, &c.coordinators[2].grpc);
    let e = node_a_other
        .reveal(reveal(&t.token))
        .await
        .expect_err("revoked");
    assert!(e.message().contains("revoked"), "{e}");
    // Expired.
    let t = node_a
        .issue_token(issue("default", "db", "api", 5, 1))
        .await
        .expect("token")
        .into_inner();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let e = node_a.reveal(reveal(&t.token)).await.expect_err("expired");
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    assert!(e.message().contains("expired"), "{e}");
    // Forged: the claims changed (a longer expiry), the signature kept.
    let t = node_a
        .issue_token(issue("default", "db", "api", 5, 0))
        .await
        .expect("token")
        .into_inner();
    let mut parts: Vec<String> = t.token.split('.').map(str::to_owned).collect();
    {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut claims: serde_json::Value =
            serde_json::from_slice(&b64.decode(&parts[1]).expect("b64")).expect("claims");
        claims["exp"] = serde_json::json!(claims["exp"].as_i64().unwrap_or(0) + 86_400_000);
        parts[1] = b64.encode(serde_json::to_vec(&claims).expect("json"));
    }
    let e = node_a
        .reveal(reveal(&parts.join(".")))
        .await
        .expect_err("forged");
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    assert!(e.message().contains("signature"), "{e}");
    // A many-use token (counted by the leader, committed in batches): its
    // limit holds exactly, and its reads are audited with their count.
    let t = node_a
        .issue_token(issue("default", "db", "api", 20, 0))
        .await
        .expect("token")
        .into_inner();
    for i in 0..20 {
        node_a
            .reveal(reveal(&t.token))
            .await
            .unwrap_or_else(|e| panic!("use {i} of a 20-use token: {e}"));
    }
    let e = node_a.reveal(reveal(&t.token)).await.expect_err("21st use");
    assert!(e.message().contains("used 20 of 20"), "{e}");
    // Revoking a many-use token (its records cached by the leader) takes
    // effect at once too.
    let t = node_a
        .issue_token(issue("default", "db", "api", 50, 0))
        .await
        .expect("token")
        .into_inner();
    node_a.reveal(reveal(&t.token)).await.expect("first use");
    ok(&c, &["secrets", "revoke", &t.token_id]);
    let e = node_a
        .reveal(reveal(&t.token))
        .await
        .expect_err("revoked many-use token");
    assert!(e.message().contains("revoked"), "{e}");
    // Longer than 24 h is refused with the field named.
    let e = node_a
        .issue_token(issue("default", "db", "api", 1, 100_000))
        .await
        .expect_err("ttl");
    assert!(e.message().contains("ttlSeconds"), "{e}");

    // Every refusal is in the audit log, with the actor (refusals are
    // committed aggregated, at most every 250 ms: poll briefly).
    let wants = [
        "used 1 of 1",
        "runs no replica",
        "may not read",
        "issued to",
        "revoked",
        "expired",
        "signature",
    ];
    let refused = || {
        let audit = ok(
            &c,
            &[
                "-o",
                "json",
                "secrets",
                "audit",
                "--secret",
                "default/db",
                "--refused",
            ],
        );
        serde_json::from_str::<Vec<serde_json::Value>>(&audit).expect("audit json")
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut entries = refused();
    loop {
        let details: Vec<&str> = entries
            .iter()
            .filter_map(|e| e["detail"].as_str())
            .collect();
        let missing: Vec<&str> = wants
            .iter()
            .copied()
            .filter(|w| !details.iter().any(|d| d.contains(w)))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no audited refusal mentioning {missing:?}: {details:#?}\nall refusals: {}",
            ok(&c, &["secrets", "audit", "--refused"])
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        entries = refused();
    }
    assert!(entries.iter().all(|e| e["allowed"] == false));
    let all = ok(
        &c,
        &["-o", "json", "secrets", "audit", "--secret", "default/db"],
    );
    let all: Vec<serde_json::Value> = serde_json::from_str(&all).expect("audit json");
    assert!(all.iter().any(|e| e["action"] == "create"
        && e["allowed"] == true
        && e["actor"].as_str().is_some_and(|a| a.starts_with("admin"))));
    let batched: u64 = all
        .iter()
        .filter(|e| e["allowed"] == true && e["action"] == "read")
        .filter_map(|e| e["count"].as_u64())
        .sum();
    assert!(
        batched >= 20,
        "the 20 batched reads are not all audited: {all:#?}"
    );
    assert!(all.iter().any(|e| e["action"] == "read"
        && e["allowed"] == true
        && e["actor"].as_str().is_some_and(|a| a.starts_with("node:"))));

    // Immutable secrets refuse updates; the size limit is named.
    ok(
        &c,
        &[
            "secrets",
            "create",
            "fixed",
            "--data",
            "K=v",
            "--audience",
            "api",
            "--immutable",
        ],
    );
    let out = c.ctl(&["secrets", "update", "fixed", "--data", "K=w"]);
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("failed precondition") && err.contains("immutable"),
        "{err}"
    );
    let big = "x".repeat(70 * 1024);
    let out = c.ctl(&[
        "secrets",
        "create",
        "big",
        "--data",
        &format!("K={big}"),
        "--audience",
        "api",
    ]);
    let (_, err) = text(&out);
    assert!(
        err.contains("data: 71680 bytes is above the limit of 65536"),
        "{err}"
    );
    // Updates make versions; the current one is read.
    ok(
        &c,
        &[
            "secrets",
            "update",
            "default/db",
            "--data",
            &format!("PASSWORD={VALUE}-2"),
        ],
    );
    // The file follows the update (the env variable keeps the value the
    // container started with, as in Kubernetes).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = c.ctl(&["exec", "api", "--", "cat", "/etc/creds/password"]);
        if text(&out).0 == format!("{VALUE}-2") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the secret file was not refreshed: {:?}\n{}",
            text(&out),
            c.agent_logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Rotate the master key: data keys rewrapped, old version retired.
    let rot = ok(&c, &["secrets", "rotate-master-key"]);
    assert!(
        rot.contains("master key v2 active; 3 data keys rewrapped"),
        "{rot}"
    );
    let info = ok(&c, &["-o", "json", "secrets", "key-info"]);
    let info: serde_json::Value = serde_json::from_str(&info).expect("json");
    assert_eq!(info["keys"][0]["dataKeys"], 0, "{info}");
    assert_eq!(info["keys"][1]["active"], true, "{info}");
    ok(&c, &["secrets", "retire-master-key", "1"]);

    // Restart every coordinator: the secrets still read.
    let flags: Vec<String> = c.coordinator_flags.clone();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    for p in &mut c.coordinators {
        p.sigkill();
    }
    for p in &mut c.coordinators {
        p.spawn_with("run", None, &flags);
    }
    wait_all_healthy(&c.coordinators)
        .await
        .expect("healthy again");
    let deadline = Instant::now() + Duration::from_secs(30);
    let values = loop {
        let out = c.ctl(&["secrets", "get", "default/db", "--show"]);
        if out.status.success() {
            break text(&out).0;
        }
        assert!(
            Instant::now() < deadline,
            "no read after the restart: {:?}",
            text(&out)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(values.contains(&format!("PASSWORD={VALUE}-2")), "{values}");
    // An update replaces the whole set of values (a new version).
    assert!(!values.contains("USER="), "{values}");

    // Nothing under the cluster's directories (coordinator data, Raft log
    // and state, agent data and logs, registry) holds the value in clear.
    for log in ["c0.log", "agent-a.log"] {
        let len = std::fs::metadata(c.dir.path().join(log)).map_or(0, |m| m.len());
        assert!(
            len > 0,
            "{log} is empty: the scan would prove nothing about logs"
        );
    }
    let found = files_containing(c.dir.path(), VALUE.as_bytes());
    assert!(found.is_empty(), "plaintext secret on disk in {found:?}");
}
