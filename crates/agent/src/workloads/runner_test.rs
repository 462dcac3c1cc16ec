//! The runner and its replica tasks on an in-memory runtime: what a node
//! does with its assignments (restart policies, readiness, secret volumes,
//! running without a coordinator, adoption after a restart), read from the
//! states it reports and the containers it runs. Time is paused: back-off
//! and probe periods pass without waiting.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cloudless_proto::v1 as pb;
use cloudless_runtime::registry::{RegistryClient, RegistryConfig};
use cloudless_runtime::NodePolicy;
use tokio::time::Instant;
use zeroize::Zeroizing;

use super::{Runner, MAX_REPORT};
use crate::secrets::{SecretFuture, SecretSource, Values};
use crate::workloads::fake_runtime::FakeRuntime;
use crate::workloads::{container_id, RuntimeConfig};
use crate::AgentError;

/// A node: a runner on a fake runtime that has the image `busybox`.
struct Node {
    runner: Runner<FakeRuntime>,
    rt: FakeRuntime,
    dir: tempfile::TempDir,
}

impl Node {
    fn new(max_disconnected: Option<Duration>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::in_dir(dir, max_disconnected, None)
    }

    /// A node in `dir`, with `volume_dir` for its `emptyDir` volumes
    /// (default: `dir/volumes`).
    fn in_dir(
        dir: tempfile::TempDir,
        max_disconnected: Option<Duration>,
        volume_dir: Option<PathBuf>,
    ) -> Self {
        let rt = FakeRuntime::new(dir.path());
        rt.add_image("busybox");
        let config = RuntimeConfig {
            containerd_socket: dir.path().join("containerd.sock"),
            namespace: "test".into(),
            log_dir: dir.path().to_owned(),
            insecure_registries: Vec::new(),
            registry_ca_files: Vec::new(),
            volume_dir: volume_dir.unwrap_or_else(|| dir.path().join("volumes")),
            secret_dir: dir.path().join("secrets"),
            secret_refresh: Duration::from_secs(5),
            allowed_host_paths: Vec::new(),
            seccomp_dir: None,
            security: Default::default(),
            apparmor_dir: dir.path().to_owned(),
            max_disconnected,
            network: None,
        };
        let registry = RegistryClient::new(RegistryConfig::default()).expect("registry client");
        let runner = Runner::with_runtime(rt.clone(), NodePolicy::default(), registry, &config);
        Self { runner, rt, dir }
    }

    /// The state the node reports for `replica`.
    fn state(&self, replica: &str) -> Option<pb::ReplicaStatus> {
        let statuses = self.runner.ctx.statuses.lock().expect("statuses");
        statuses.get(replica).cloned()
    }

    /// Waits (in paused time, up to ten minutes of it) until the state
    /// reported for `replica` satisfies `f`.
    async fn until(
        &self,
        replica: &str,
        what: &str,
        f: impl Fn(&pb::ReplicaStatus) -> bool,
    ) -> pb::ReplicaStatus {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let now = self.state(replica);
            if let Some(s) = now.as_ref().filter(|s| f(s)) {
                return s.clone();
            }
            assert!(
                Instant::now() < deadline,
                "{replica}: timed out waiting for {what}; last reported {now:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `replica` is reported `state`.
    async fn until_state(&self, replica: &str, state: &str) -> pb::ReplicaStatus {
        self.until(replica, state, |s| s.state_name() == state)
            .await
    }

    /// Waits until the runtime has no container `id` any more.
    async fn until_gone(&self, id: &str) {
        let deadline = Instant::now() + Duration::from_secs(600);
        while self.rt.containers().iter().any(|c| c == id) {
            assert!(Instant::now() < deadline, "container {id} never went away");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// An assignment of replica `default.<name>-1` of workload `<name>` running
/// `spec` (JSON, with `image: busybox` unless it says otherwise).
fn assignment(name: &str, spec: serde_json::Value) -> pb::Assignment {
    let mut json = serde_json::json!({"image": "busybox"});
    for (k, v) in spec.as_object().expect("a spec object") {
        json[k] = v.clone();
    }
    let spec: cloudless_types::WorkloadSpec = serde_json::from_value(json).expect("spec");
    pb::Assignment {
        replica_id: format!("default.{name}-1"),
        workload: name.into(),
        namespace: "default".into(),
        generation: 1,
        spec: Some(spec.into()),
        trace_parent: String::new(),
    }
}

fn set(assignments: &[&pb::Assignment]) -> pb::AssignmentSet {
    pb::AssignmentSet {
        revision: 1,
        assignments: assignments.iter().map(|a| (*a).clone()).collect(),
        ..Default::default()
    }
}

#[tokio::test(start_paused = true)]
async fn always_restarts_a_container_after_a_clean_exit_and_after_a_failure() {
    let mut node = Node::new(None);
    let web = assignment("web", serde_json::json!({"restartPolicy": "Always"}));
    let id = container_id(&web.replica_id);
    node.runner.apply(&set(&[&web])).await;
    node.until_state(&web.replica_id, "Ready").await;
    assert_eq!(node.rt.starts(&id), 1);

    node.rt.exit(&id, 0);
    let s = node
        .until(&web.replica_id, "a restart after exit 0", |s| {
            s.restarts == 1 && s.state_name() == "Ready"
        })
        .await;
    assert_eq!(s.exit_code, Some(0), "{s:?}");
    assert_eq!(node.rt.starts(&id), 2);

    node.rt.exit(&id, 1);
    let s = node
        .until(&web.replica_id, "a restart after exit 1", |s| {
            s.restarts == 2 && s.state_name() == "Ready"
        })
        .await;
    assert_eq!(s.exit_code, Some(1), "{s:?}");
    assert_eq!(node.rt.starts(&id), 3);
}

#[tokio::test(start_paused = true)]
async fn on_failure_restarts_after_a_non_zero_exit_and_not_after_a_clean_one() {
    let mut node = Node::new(None);
    let job = assignment("job", serde_json::json!({"restartPolicy": "OnFailure"}));
    let id = container_id(&job.replica_id);
    node.runner.apply(&set(&[&job])).await;
    node.until_state(&job.replica_id, "Ready").await;

    node.rt.exit(&id, 3);
    let s = node
        .until(&job.replica_id, "a restart after exit 3", |s| {
            s.restarts == 1 && s.state_name() == "Ready"
        })
        .await;
    assert_eq!(s.exit_code, Some(3));
    assert_eq!(node.rt.starts(&id), 2);

    node.rt.exit(&id, 0);
    let s = node.until_state(&job.replica_id, "Succeeded").await;
    assert_eq!((s.exit_code, s.restarts), (Some(0), 1), "{s:?}");
    // Longer than any back-off: still not started again, and removed.
    tokio::time::sleep(Duration::from_secs(900)).await;
    assert_eq!(node.rt.starts(&id), 2);
    assert!(
        node.rt.containers().is_empty(),
        "{:?}",
        node.rt.containers()
    );
    assert_eq!(
        node.state(&job.replica_id).expect("state").state_name(),
        "Succeeded"
    );
}

#[tokio::test(start_paused = true)]
async fn never_reports_how_the_container_ended_and_does_not_restart_it() {
    let mut node = Node::new(None);
    let ok = assignment("ok", serde_json::json!({"restartPolicy": "Never"}));
    let bad = assignment("bad", serde_json::json!({"restartPolicy": "Never"}));
    node.runner.apply(&set(&[&ok, &bad])).await;
    node.until_state(&ok.replica_id, "Ready").await;
    node.until_state(&bad.replica_id, "Ready").await;

    node.rt.exit(&container_id(&ok.replica_id), 0);
    node.rt.exit(&container_id(&bad.replica_id), 2);
    let s = node.until_state(&ok.replica_id, "Succeeded").await;
    assert_eq!((s.exit_code, s.restarts), (Some(0), 0), "{s:?}");
    let s = node.until_state(&bad.replica_id, "Failed").await;
    assert_eq!((s.exit_code, s.restarts), (Some(2), 0), "{s:?}");
    assert!(s.message.contains("exited 2"), "{}", s.message);

    tokio::time::sleep(Duration::from_secs(900)).await;
    for a in [&ok, &bad] {
        assert_eq!(node.rt.starts(&container_id(&a.replica_id)), 1);
    }
    assert!(
        node.rt.containers().is_empty(),
        "{:?}",
        node.rt.containers()
    );
}

#[tokio::test(start_paused = true)]
async fn a_replica_is_running_but_not_ready_until_its_readiness_probe_passes() {
    let mut node = Node::new(None);
    let api = assignment(
        "api",
        serde_json::json!({"readinessProbe": {
            "exec": ["/bin/ready"], "periodSeconds": 1, "failureThreshold": 1,
        }}),
    );
    let id = container_id(&api.replica_id);
    node.runner.apply(&set(&[&api])).await;
    node.until_state(&api.replica_id, "Running").await;
    assert!(node.rt.running(&id).is_some());

    // Its probe fails for a minute: it runs, but is never reported Ready
    // (the cluster sends it no traffic).
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let s = node.state(&api.replica_id).expect("state");
        assert_eq!(s.state_name(), "Running", "{s:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let s = node.state(&api.replica_id).expect("state");
    assert!(
        s.message.starts_with("readiness probe failed"),
        "{}",
        s.message
    );

    node.rt.set_ready(&id, true);
    let s = node.until_state(&api.replica_id, "Ready").await;
    assert!(s.message.is_empty(), "{}", s.message);

    // Failing again: no longer Ready, without a restart.
    node.rt.set_ready(&id, false);
    let s = node.until_state(&api.replica_id, "Running").await;
    assert_eq!(s.restarts, 0);
    assert_eq!(node.rt.starts(&id), 1);
}

#[tokio::test(start_paused = true)]
async fn a_missing_image_keeps_the_replica_pending_with_the_reason_until_it_can_be_pulled() {
    let mut node = Node::new(None);
    let app = assignment("app", serde_json::json!({"image": "registry.local/app:2"}));
    node.runner.apply(&set(&[&app])).await;
    let s = node
        .until(&app.replica_id, "a failed pull", |s| {
            s.message.starts_with("image pull failed")
        })
        .await;
    assert_eq!(s.state_name(), "Pending");
    assert!(s.message.contains("registry.local/app:2"), "{}", s.message);
    assert_eq!(node.rt.starts(&container_id(&app.replica_id)), 0);

    node.rt.add_image("registry.local/app:2");
    node.until_state(&app.replica_id, "Ready").await;
}

#[tokio::test(start_paused = true)]
async fn after_an_agent_restart_a_running_replica_is_adopted_and_an_unassigned_one_removed() {
    let mut node = Node::new(None);
    let web = assignment("web", serde_json::json!({}));
    let id = container_id(&web.replica_id);
    node.rt.left_running(&id);
    node.rt.left_running("default.old-1");
    node.runner.apply(&set(&[&web])).await;
    node.until_state(&web.replica_id, "Ready").await;
    assert_eq!(node.rt.starts(&id), 0, "adopted, not started again");
    assert_eq!(node.rt.containers(), [id]);
    assert_eq!(node.rt.stops("default.old-1"), 1);
}

#[tokio::test(start_paused = true)]
async fn replicas_stop_after_their_disconnect_limit_and_start_again_once_in_touch() {
    let mut node = Node::new(None);
    let edge = assignment(
        "edge",
        serde_json::json!({"disconnect": {"stopOnClientAfterSeconds": 60}}),
    );
    let keep = assignment("keep", serde_json::json!({}));
    let (edge_id, keep_id) = (
        container_id(&edge.replica_id),
        container_id(&keep.replica_id),
    );
    let assigned = set(&[&edge, &keep]);
    node.runner.apply(&assigned).await;
    node.until_state(&edge.replica_id, "Ready").await;
    node.until_state(&keep.replica_id, "Ready").await;

    node.runner
        .enforce_disconnect(Duration::from_secs(59))
        .await;
    assert!(
        node.rt.running(&edge_id).is_some(),
        "stopped before its limit"
    );

    node.runner
        .enforce_disconnect(Duration::from_secs(60))
        .await;
    assert_eq!(node.rt.running(&edge_id), None);
    assert_eq!(node.rt.stops(&edge_id), 1);
    assert!(!node.rt.containers().contains(&edge_id), "removed");
    let s = node.state(&edge.replica_id).expect("state");
    assert_eq!(s.state_name(), "Pending");
    assert!(
        s.message.contains("disconnect.stopOnClientAfterSeconds"),
        "{}",
        s.message
    );
    assert!(
        node.runner.changed().contains(&s),
        "the stop is reported once a coordinator answers"
    );
    // Without a limit of its own (and no --max-disconnected): runs on.
    node.runner
        .enforce_disconnect(Duration::from_secs(30 * 86_400))
        .await;
    assert!(node.rt.running(&keep_id).is_some());
    assert_eq!(node.rt.stops(&keep_id), 0);

    assert!(!node.runner.should_resync(Duration::from_secs(61)));
    assert!(
        node.runner.should_resync(Duration::from_secs(1)),
        "a coordinator answers again: ask for the assignments"
    );
    node.runner.apply(&assigned).await;
    node.until(&edge.replica_id, "a new start", |s| {
        s.state_name() == "Ready"
    })
    .await;
    assert_eq!(node.rt.starts(&edge_id), 2);
    assert_eq!(node.rt.starts(&keep_id), 1, "the other one ran on");
    assert!(!node.runner.should_resync(Duration::from_secs(1)));
}

#[tokio::test(start_paused = true)]
async fn the_agent_wide_limit_applies_to_workloads_without_their_own() {
    let mut node = Node::new(Some(Duration::from_secs(120)));
    let plain = assignment("plain", serde_json::json!({}));
    let patient = assignment(
        "patient",
        serde_json::json!({"disconnect": {"stopOnClientAfterSeconds": 600}}),
    );
    node.runner.apply(&set(&[&plain, &patient])).await;
    node.until_state(&plain.replica_id, "Ready").await;
    node.until_state(&patient.replica_id, "Ready").await;

    node.runner
        .enforce_disconnect(Duration::from_secs(120))
        .await;
    assert_eq!(node.rt.running(&container_id(&plain.replica_id)), None);
    assert!(node
        .rt
        .running(&container_id(&patient.replica_id))
        .is_some());
    node.runner
        .enforce_disconnect(Duration::from_secs(600))
        .await;
    assert_eq!(node.rt.running(&container_id(&patient.replica_id)), None);
}

/// Secrets by name: version and values, changed by the test.
struct TableSecrets {
    secrets: Mutex<HashMap<String, (u64, Values)>>,
    refresh: Duration,
}

impl TableSecrets {
    fn put(&self, name: &str, version: u64, values: &[(&str, &str)]) {
        let values = values
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Zeroizing::new(v.as_bytes().to_vec())))
            .collect();
        self.secrets
            .lock()
            .expect("secrets")
            .insert(name.to_owned(), (version, values));
    }
}

impl SecretSource for TableSecrets {
    fn get<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        _audience: &'a str,
    ) -> SecretFuture<'a> {
        let found = self
            .secrets
            .lock()
            .expect("secrets")
            .get(name)
            .map(|(version, values)| (Arc::new(values.clone()), *version))
            .ok_or_else(|| AgentError::Unreachable(format!("no secret {namespace}/{name}")));
        Box::pin(async move { found })
    }

    fn refresh(&self) -> Duration {
        self.refresh
    }
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn is_mountpoint(dir: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let want = dir.display().to_string();
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

/// Unmounts a secret volume a failed test left behind.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        crate::secrets::unmount(&self.0);
    }
}

/// Secret volumes are tmpfs mounts, which need root.
fn can_mount(test: &str) -> bool {
    if is_root() {
        return true;
    }
    cloudless_runtime::test_support::skip_test(format!("{test}: mounting a tmpfs needs root"));
    false
}

#[tokio::test(start_paused = true)]
async fn a_secret_volume_is_rewritten_when_the_secret_changes_and_unmounted_with_the_replica() {
    if !can_mount("secret volume refresh") {
        return;
    }
    let mut node = Node::new(None);
    let secrets = Arc::new(TableSecrets {
        secrets: Mutex::default(),
        refresh: Duration::from_secs(5),
    });
    secrets.put("db", 1, &[("password", "first")]);
    node.runner.set_secrets(Some(secrets.clone()));
    let app = assignment(
        "app",
        serde_json::json!({
            "volumes": [{"name": "creds", "secret": {"secretName": "db"}}],
            "volumeMounts": [{"name": "creds", "mountPath": "/creds"}],
        }),
    );
    let id = container_id(&app.replica_id);
    let volume = crate::secrets::volume_dir(&node.dir.path().join("secrets"), &id, "creds");
    let file = volume.join("password");
    let _unmount = Unmount(volume.clone());
    node.runner.apply(&set(&[&app])).await;
    node.until_state(&app.replica_id, "Ready").await;
    assert!(
        is_mountpoint(&volume),
        "{} is not a tmpfs",
        volume.display()
    );
    assert_eq!(std::fs::read(&file).expect("secret file"), b"first");
    let mounts = node.rt.config(&id).expect("container").mounts;
    assert!(
        mounts
            .iter()
            .any(|m| m.destination == "/creds" && m.read_only),
        "{mounts:?}"
    );

    // The same version again: the files are left alone.
    secrets.put("db", 1, &[("password", "ignored")]);
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(std::fs::read(&file).expect("secret file"), b"first");

    secrets.put("db", 2, &[("password", "second")]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::read(&file).expect("secret file") != b"second" {
        assert!(
            Instant::now() < deadline,
            "the file still holds the old value"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        node.rt.starts(&id),
        1,
        "no restart for a new secret version"
    );

    // Unassigned: the secret leaves the node with the replica.
    node.runner.apply(&set(&[])).await;
    node.until_gone(&id).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while volume.exists() {
        assert!(
            Instant::now() < deadline,
            "the secret volume outlived its replica"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!is_mountpoint(&volume));
}

#[tokio::test(start_paused = true)]
async fn a_replica_no_longer_assigned_is_not_reported_again() {
    let mut node = Node::new(None);
    let web = assignment("web", serde_json::json!({}));
    node.runner.apply(&set(&[&web])).await;
    node.until_state(&web.replica_id, "Ready").await;
    let sent = node.runner.changed();
    node.runner.reported(sent);

    node.runner.apply(&set(&[])).await;
    node.until_gone(&container_id(&web.replica_id)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(node.state(&web.replica_id), None);
    assert_eq!(node.runner.changed(), []);
}

#[tokio::test(start_paused = true)]
async fn a_replica_stopped_while_cut_off_and_moved_away_meanwhile_is_forgotten() {
    let mut node = Node::new(None);
    let edge = assignment(
        "edge",
        serde_json::json!({"disconnect": {"stopOnClientAfterSeconds": 60}}),
    );
    node.runner.apply(&set(&[&edge])).await;
    node.until_state(&edge.replica_id, "Ready").await;
    let sent = node.runner.changed();
    node.runner.reported(sent);
    node.runner
        .enforce_disconnect(Duration::from_secs(60))
        .await;
    assert_eq!(
        node.state(&edge.replica_id).expect("state").state_name(),
        "Pending"
    );

    // Back in touch; the cluster has moved it to another node meanwhile.
    assert!(node.runner.should_resync(Duration::from_secs(1)));
    node.runner.apply(&set(&[])).await;
    assert_eq!(node.state(&edge.replica_id), None);
    assert_eq!(node.runner.changed(), []);
    assert!(!node.runner.should_resync(Duration::from_secs(1)));
    assert_eq!(node.rt.starts(&container_id(&edge.replica_id)), 1);
}

#[tokio::test(start_paused = true)]
async fn a_report_never_lists_more_replicas_than_a_coordinator_accepts() {
    let mut node = Node::new(None);
    let many: Vec<pb::Assignment> = (0..MAX_REPORT + 88)
        .map(|i| assignment(&format!("w{i}"), serde_json::json!({})))
        .collect();
    node.runner
        .apply(&set(&many.iter().collect::<Vec<_>>()))
        .await;
    for a in &many {
        node.until_state(&a.replica_id, "Ready").await;
    }
    let first = node.runner.changed();
    assert_eq!(first.len(), MAX_REPORT);
    node.runner.reported(first);
    let rest = node.runner.changed();
    assert_eq!(rest.len(), 88);
    node.runner.reported(rest);
    assert_eq!(node.runner.changed(), []);
}

#[tokio::test(start_paused = true)]
async fn a_replica_that_cannot_make_its_volumes_leaves_no_secret_mounted() {
    if !can_mount("secret volume cleanup") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    // emptyDir volumes cannot be made under a file.
    let not_a_dir = dir.path().join("volumes");
    std::fs::write(&not_a_dir, b"").expect("file");
    let mut node = Node::in_dir(dir, None, Some(not_a_dir));
    let secrets = Arc::new(TableSecrets {
        secrets: Mutex::default(),
        refresh: Duration::from_secs(5),
    });
    secrets.put("db", 1, &[("password", "first")]);
    node.runner.set_secrets(Some(secrets));
    let app = assignment(
        "app",
        serde_json::json!({
            "volumes": [
                {"name": "creds", "secret": {"secretName": "db"}},
                {"name": "scratch", "emptyDir": {}},
            ],
            "volumeMounts": [
                {"name": "creds", "mountPath": "/creds"},
                {"name": "scratch", "mountPath": "/scratch"},
            ],
        }),
    );
    let id = container_id(&app.replica_id);
    let volume = crate::secrets::volume_dir(&node.dir.path().join("secrets"), &id, "creds");
    let _unmount = Unmount(volume.clone());
    node.runner.apply(&set(&[&app])).await;
    let s = node.until_state(&app.replica_id, "Failed").await;
    assert!(
        s.message.starts_with("cannot make its volumes"),
        "{}",
        s.message
    );
    assert!(!is_mountpoint(&volume), "the secret stays mounted");
    assert!(!volume.exists(), "{} is left", volume.display());
    assert_eq!(node.rt.starts(&id), 0);
}
