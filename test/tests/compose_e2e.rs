//! The compose dev cluster end to end (`scripts/compose-test.sh`, what
//! `make compose-test` runs), here with this build's binaries: images built
//! offline, 3 coordinators, 3 agents (each a device with its own
//! containerd), Prometheus, a workload Running with its logs, an agent
//! stopped and its replicas replaced, every dashboard query and alert
//! rule evaluated against the live Prometheus, and nothing left behind.
//! Its own project name, image tag and Prometheus port, so a developer's
//! `make compose-up` cluster is left alone. Needs root and Docker Engine
//! with docker-compose (on every CI machine); skips loudly otherwise.

use std::process::Command;

fn missing() -> Option<String> {
    if !nix_is_root() {
        return Some("needs root".into());
    }
    let docker = Command::new("docker").arg("info").output();
    if !docker.is_ok_and(|o| o.status.success()) {
        return Some("no Docker Engine to talk to (`docker info` failed)".into());
    }
    let compose = Command::new("docker-compose").arg("version").output();
    let plugin = Command::new("docker").args(["compose", "version"]).output();
    if !compose.is_ok_and(|o| o.status.success()) && !plugin.is_ok_and(|o| o.status.success()) {
        return Some("neither docker-compose nor the docker compose plugin".into());
    }
    None
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

#[test]
fn the_compose_dev_cluster_runs_a_workload_and_shows_it_in_prometheus() {
    if let Some(why) = missing() {
        cloudless_test::skip_test(format!("compose dev cluster: {why}"));
        return;
    }
    let bin = cloudless_test::workspace_binary("cloudless-coordinator");
    let bin_dir = bin.parent().expect("the binaries' directory");
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let status = Command::new("bash")
        .arg("scripts/compose-test.sh")
        .current_dir(root)
        .env("CLOUDLESS_BIN", bin_dir)
        .env("CLOUDLESS_TAG", "test")
        .env("CLOUDLESS_COMPOSE_PROJECT", "cloudless-test")
        .env(
            "CLOUDLESS_PROMETHEUS_PORT",
            cloudless_test::free_port().to_string(),
        )
        .env(
            "CLOUDLESS_GRAFANA_PORT",
            cloudless_test::free_port().to_string(),
        )
        .env("CLOUDLESS_PULL_TIMEOUT", "20")
        .status()
        .expect("run scripts/compose-test.sh");
    assert!(status.success(), "scripts/compose-test.sh: {status}");
}
