//! The metrics an operator relies on, from the real binaries (3 coordinator
//! processes, 2 agents with their own containerd and registry): every metric
//! docs/metrics.md lists is exported by a live coordinator or agent and
//! nothing exported is missing from it, and the figures follow what the
//! cluster does (enrollments, a workload's replicas, their containers and
//! cgroups, heartbeats, gRPC calls). Needs root, containerd, runc,
//! busybox-static and docker-registry (installed by .ci/run); skips loudly
//! otherwise.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use cloudless_test::e2e::{Cluster, Options};
use cloudless_test::http_get as get;

/// The metric names a scrape declares, as docs/metrics.md lists them
/// (counters with `_total`).
fn declared(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, kind)| {
            if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_owned()
            }
        })
        .collect()
}

/// Samples: `name{labels}` → value.
fn samples(scrape: &str) -> BTreeMap<String, f64> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' '))
        .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
        .collect()
}

/// The sum of every sample of `name` whose labels contain all of `with`.
fn sum(s: &BTreeMap<String, f64>, name: &str, with: &[&str]) -> f64 {
    s.iter()
        .filter(|(k, _)| {
            (k.as_str() == name || k.starts_with(&format!("{name}{{")))
                && with.iter().all(|w| k.contains(w))
        })
        .map(|(_, v)| v)
        .sum()
}

/// Lowers this process's soft limit of open files to the usual 1,024 (the
/// cluster's processes inherit it) and returns the hard limit.
fn lower_soft_open_files_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    setrlimit(Resource::RLIMIT_NOFILE, 1024.min(hard), hard).expect("setrlimit");
    hard
}

/// docs/metrics.md's names by section (`Every process`, `Coordinator`,
/// `Agent`).
fn documented() -> BTreeMap<String, BTreeSet<String>> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md");
    let text = std::fs::read_to_string(path).expect("docs/metrics.md");
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut section = String::new();
    for line in text.lines() {
        if let Some(h) = line.strip_prefix("## ") {
            section = h.trim().to_owned();
        } else if let Some(cell) = line.strip_prefix("| `") {
            let name = cell.split(['`', '{']).next().unwrap_or_default();
            out.entry(section.clone())
                .or_default()
                .insert(name.to_owned());
        }
    }
    out
}

fn compare(what: &str, exported: &BTreeSet<String>, documented: &BTreeSet<String>) {
    let undocumented: Vec<_> = exported.difference(documented).collect();
    let missing: Vec<_> = documented.difference(exported).collect();
    assert!(
        undocumented.is_empty() && missing.is_empty(),
        "{what}: exported but not in docs/metrics.md: {undocumented:?}; in docs/metrics.md but not exported: {missing:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_metric_is_exported_and_follows_the_cluster() {
    if let Some(why) = cloudless_test::e2e::missing() {
        cloudless_test::skip_test(format!("metrics end to end: {why}"));
        return;
    }
    let hard_files = lower_soft_open_files_limit();
    // The agents log JSON, as an operator's log pipeline would read it.
    let c = Cluster::start_with(Options {
        agent_args: vec!["--log-format".into(), "json".into()],
        ..Options::default()
    })
    .await;
    // Ready through a readiness probe (counted by the agents).
    let manifest = c.manifest_with(
        "metered",
        "1",
        2,
        "hello",
        "  readinessProbe:\n    exec: [\"/bin/true\"]\n    periodSeconds: 1\n  requests:\n    cpuMillis: 50\n    memoryBytes: 8000000\n",
    );
    c.ctl_ok(&[
        "apply",
        "-f",
        &manifest.display().to_string(),
        "--wait",
        "--timeout",
        "90",
    ]);
    c.wait_ready("metered", 2, Duration::from_secs(60), |_| true)
        .await;

    let docs = documented();
    let both = docs.get("Every process").cloned().unwrap_or_default();
    let section = |s: &str| -> BTreeSet<String> {
        docs.get(s)
            .cloned()
            .unwrap_or_default()
            .union(&both)
            .cloned()
            .collect()
    };

    // Coordinators: every one serves the same set of names.
    let mut coordinators = BTreeMap::new();
    for (i, p) in c.coordinators.iter().enumerate() {
        let (code, body) = get(&p.http, "/metrics");
        assert_eq!(code, 200, "coordinator {i}: {body}");
        compare(
            &format!("coordinator {i}"),
            &declared(&body),
            &section("Coordinator"),
        );
        for (k, v) in samples(&body) {
            *coordinators.entry(k).or_insert(0.0) += v;
        }
    }
    let all = |name: &str, with: &[&str]| sum(&coordinators, name, with);
    // Each agent enrolled once, on whichever coordinator led.
    assert_eq!(all("cloudless_join_tokens_used_total", &[]), 2.0);
    assert!(
        all(
            "cloudless_scheduler_decisions_total",
            &["result=\"placed\""]
        ) >= 2.0,
        "{coordinators:#?}"
    );
    // Each coordinator reads the same state: 3 x 2.
    assert_eq!(
        all(
            "cloudless_workload_replicas_desired",
            &["workload=\"metered\""]
        ),
        6.0
    );
    assert_eq!(
        all(
            "cloudless_workload_replicas_ready",
            &["workload=\"metered\""]
        ),
        6.0
    );
    assert_eq!(all("cloudless_replicas", &["state=\"Ready\""]), 6.0);
    // Both replicas run the workload's current template (no rollout
    // pending), and the nodes' requests add up to theirs (3 x 2 x 50m).
    assert_eq!(
        all(
            "cloudless_workload_replicas_updated",
            &["workload=\"metered\""]
        ),
        6.0
    );
    assert!(
        all("cloudless_workload_template", &["workload=\"metered\""]) >= 3.0,
        "{coordinators:#?}"
    );
    let cpu = all("cloudless_node_requested_cpu_cores", &[]);
    assert!((cpu - 0.3).abs() < 1e-9, "requested CPU {cpu}");
    assert_eq!(all("cloudless_node_requested_memory_bytes", &[]), 48e6);
    for agent in ["agent-a", "agent-b"] {
        let node = format!("node=\"{agent}\"");
        let reliability = all("cloudless_node_reliability", &[&node]) / 3.0;
        assert!(
            (0.0..=1.0).contains(&reliability),
            "{agent}'s reliability {reliability}"
        );
        assert!(
            all("cloudless_node_capacity_cpu_cores", &[&node]) > 0.0,
            "{agent}'s CPU capacity: {coordinators:#?}"
        );
        assert!(
            all("cloudless_node_capacity_memory_bytes", &[&node]) > 0.0,
            "{agent}'s memory capacity"
        );
    }
    // The apply went through the API: counted by service, method and code.
    assert!(
        all(
            "cloudless_grpc_requests_total",
            &[
                "service=\"WorkloadService\"",
                "method=\"Apply\"",
                "code=\"Ok\""
            ]
        ) >= 1.0,
        "{:#?}",
        coordinators
            .keys()
            .filter(|k| k.starts_with("cloudless_grpc_requests_total"))
            .collect::<Vec<_>>()
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    for agent in ["agent-a", "agent-b"] {
        let expiry = sum(
            &coordinators,
            "cloudless_certificate_expiry_timestamp_seconds",
            &["kind=\"node\"", &format!("subject=\"{agent}\"")],
        ) / 3.0;
        assert!(expiry > now, "{agent}'s certificate expiry {expiry}");
    }
    assert!(all("cloudless_raft_disk_total_bytes", &[]) > 0.0);
    assert!(all("process_resident_memory_bytes", &[]) > 0.0);

    // Agents.
    let mut ready = 0.0;
    for a in &c.agents {
        let (code, body) = get(&a.metrics_addr, "/metrics");
        assert_eq!(code, 200, "{}: {body}", a.name);
        compare(&a.name, &declared(&body), &section("Agent"));
        let s = samples(&body);
        let here = sum(&s, "cloudless_agent_containers", &["state=\"Ready\""]);
        ready += here;
        assert_eq!(sum(&s, "cloudless_agent_connected", &[]), 1.0, "{}", a.name);
        // It raised its limit of open files to the hard limit it inherited,
        // at most 2^20 (the service proxy's slots need far more than the
        // soft 1,024).
        assert_eq!(
            sum(&s, "process_max_fds", &[]),
            hard_files.min(1 << 20) as f64,
            "{}",
            a.name
        );
        assert!(
            sum(&s, "cloudless_agent_heartbeat_rtt_seconds_count", &[]) >= 1.0,
            "{}",
            a.name
        );
        assert!(
            sum(&s, "cloudless_agent_container_starts_total", &[]) >= here,
            "{}",
            a.name
        );
        if here > 0.0 {
            // Its replicas became Ready through their readiness probe.
            assert!(
                sum(
                    &s,
                    "cloudless_agent_probe_results_total",
                    &["probe=\"readiness\"", "result=\"success\""]
                ) >= here,
                "{}: {body}",
                a.name
            );
            assert!(
                sum(
                    &s,
                    "cloudless_agent_image_pulls_total",
                    &["result=\"pulled\""]
                ) >= 1.0,
                "{}",
                a.name
            );
            // Its pull downloaded the image's layers (busybox, over 500 kB).
            assert!(
                sum(&s, "cloudless_agent_image_pull_bytes_total", &[]) > 500_000.0,
                "{}: {body}",
                a.name
            );
            // Each of its replicas uses memory, read from its cgroup.
            let with_memory = s
                .iter()
                .filter(|(k, v)| {
                    k.starts_with("cloudless_agent_replica_memory_bytes{") && **v > 0.0
                })
                .count();
            assert_eq!(with_memory as f64, here, "{}: {body}", a.name);
            // And has network counters, read in its namespace (loopback
            // only here: nothing counted, but every replica listed).
            for name in [
                "cloudless_agent_replica_network_receive_bytes_total{",
                "cloudless_agent_replica_network_transmit_bytes_total{",
            ] {
                let listed = s.keys().filter(|k| k.starts_with(name)).count();
                assert_eq!(listed as f64, here, "{}: {name} {body}", a.name);
            }
        }
        assert_eq!(get(&a.metrics_addr, "/healthz").0, 200);
        assert_eq!(get(&a.metrics_addr, "/readyz").0, 200);
    }
    assert_eq!(ready, 2.0, "both replicas Ready on the agents");

    // The pulls' progress reached the workload's events: every agent
    // running a replica pulled the image (Pulling, then Pulled with its
    // size and time).
    let events = c.ctl_ok(&["describe", "workload", "metered"]);
    let nodes: BTreeSet<String> = c
        .replicas("metered")
        .await
        .expect("replicas")
        .into_iter()
        .map(|r| r.node_name)
        .collect();
    for node in &nodes {
        let pulled = events.lines().any(|l| {
            l.contains("Pulled")
                && l.contains(&format!("on {node}: pulled image"))
                && l.contains("downloaded")
        });
        assert!(pulled, "no Pulled event from {node}:\n{events}");
    }
    assert!(events.contains("Pulling"), "{events}");

    // Every line an agent logged is one JSON object with a level, a target
    // and its fields.
    for a in &c.agents {
        let log = std::fs::read_to_string(c.dir.path().join(format!("{}.log", a.name)))
            .expect("agent log");
        let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(lines.len() >= 3, "{}: {log}", a.name);
        for line in lines {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {line}", a.name));
            assert!(
                v["level"].is_string() && v["target"].is_string() && v["fields"].is_object(),
                "{}: {line}",
                a.name
            );
        }
    }
}
