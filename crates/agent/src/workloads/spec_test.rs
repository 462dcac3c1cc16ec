//! What the agent makes of a manifest before it runs: the default pids
//! limit, refusals by the device's policy reported as the replica's status,
//! and emptyDir directories. The containerd tests run a test-owned
//! containerd with a busybox image (skipped loudly without root and
//! containerd; under CI that is a failure).

use super::*;
use crate::workloads::status::wire_status;
use cloudless_runtime::test_support::{
    missing_prerequisite, skip_test, write_busybox_archive, Daemon,
};
use cloudless_runtime::ReplicaStatus;
use cloudless_runtime::{
    Backoff, Containerd, ImageRef, NodePolicy, ReplicaPhase, ReplicaSpec, Supervisor,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

fn workload(json: serde_json::Value) -> (pb::Assignment, cloudless_types::WorkloadSpec) {
    let spec: cloudless_types::WorkloadSpec = serde_json::from_value(json).expect("spec");
    let a = pb::Assignment {
        replica_id: format!(
            "default.t-{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ),
        workload: "t".into(),
        namespace: "default".into(),
        generation: 1,
        spec: Some(spec.clone().into()),
        trace_parent: String::new(),
    };
    (a, spec)
}

#[test]
fn every_container_gets_a_pids_limit_the_manifest_can_change() {
    let base = std::path::Path::new("/tmp/v");
    let (a, spec) = workload(serde_json::json!({"image": "busybox"}));
    let c = container_config(&a, &spec, base, base);
    assert_eq!(c.limits.pids, 4096);
    let (a, spec) = workload(serde_json::json!({"image": "busybox", "limits": {"pids": 64}}));
    let c = container_config(&a, &spec, base, base);
    assert_eq!(c.limits.pids, 64);
    // Out of range, or as a request: refused naming the field.
    for (bad, field) in [
        (serde_json::json!({"limits": {"pids": 3}}), "limits.pids"),
        (
            serde_json::json!({"limits": {"pids": 5_000_000u64}}),
            "limits.pids",
        ),
        (
            serde_json::json!({"requests": {"pids": 10}}),
            "requests.pids",
        ),
    ] {
        let mut w = serde_json::json!({"image": "busybox"});
        for (k, v) in bad.as_object().expect("object") {
            w[k] = v.clone();
        }
        let spec: cloudless_types::WorkloadSpec = serde_json::from_value(w).expect("spec");
        let mut errs = cloudless_types::ValidationErrors::default();
        spec.validate_into("spec", &mut errs);
        let text = format!("{errs:?}");
        assert!(text.contains(field), "{field}: {text}");
    }
}

#[test]
fn empty_dirs_are_never_world_writable() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path();
    let (a, spec) = workload(serde_json::json!({
        "image": "busybox",
        "volumes": [{"name": "scratch", "emptyDir": {}}],
        "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
    }));
    let c = container_config(&a, &spec, base, base);
    let vol = volume_dir(base, &c.id).join("scratch");
    prepare_volumes(&c, base, 0, 0).expect("as root");
    let meta = std::fs::metadata(&vol).expect("made");
    assert_eq!(meta.mode() & 0o7777, 0o755);
    if nix_is_root() {
        prepare_volumes(&c, base, 1234, 5678).expect("as a user");
        let meta = std::fs::metadata(&vol).expect("made");
        assert_eq!(
            (meta.mode() & 0o7777, meta.uid(), meta.gid()),
            (0o770, 1234, 5678)
        );
    }
}

fn nix_is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| {
        use std::os::unix::fs::MetadataExt;
        m.uid() == 0
    })
}

async fn daemon() -> Option<(Daemon, Containerd, ImageRef)> {
    if let Some(why) = missing_prerequisite() {
        skip_test(format!("agent containerd test: {why}"));
        return None;
    }
    let ns = format!(
        "agent-test-{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let (d, rt) = Daemon::start(&ns).await.expect("containerd");
    let archive = d.dir.path().join("busybox.tar");
    write_busybox_archive(&archive, "busybox:test", false).expect("archive");
    let image = rt
        .import(&archive, "docker.io/cloudless/busybox:test")
        .await
        .expect("import");
    Some((d, rt, image))
}

fn replica(c: ContainerConfig, image: &ImageRef) -> ReplicaSpec {
    ReplicaSpec {
        container: c,
        image: image.clone(),
        restart: cloudless_types::RestartPolicy::Never,
        liveness: None,
        readiness: None,
        stop_grace: Duration::from_secs(1),
    }
}

async fn until(
    rx: &mut watch::Receiver<ReplicaStatus>,
    what: &str,
    f: impl Fn(&ReplicaStatus) -> bool,
) -> ReplicaStatus {
    cloudless_runtime::test_support::wait_for_status(rx, what, Duration::from_secs(60), f).await
}

/// A workload asking for what the device does not allow fails with the
/// reason as its status message (what `cloudlessctl` shows), and runs once
/// the device allows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_security_context_the_device_does_not_allow_is_refused_with_the_reason() {
    let Some((_d, rt, image)) = daemon().await else {
        return;
    };
    let (a, spec) = workload(serde_json::json!({
        "image": "busybox",
        "command": ["/bin/sh", "-c", "grep CapEff /proc/self/status"],
        "securityContext": {"capabilities": {"add": ["NET_BIND_SERVICE", "SYS_ADMIN"]}},
    }));
    let dir = tempfile::tempdir().expect("tempdir");
    let c = container_config(&a, &spec, dir.path(), dir.path());
    let cancel = CancellationToken::new();
    let strict = Supervisor::new(rt.clone(), NodePolicy::default());
    let (mut rx, _task) = strict.run(
        replica(c.clone(), &image),
        Backoff::default(),
        cancel.clone(),
    );
    let s = until(&mut rx, "the refusal", |s| s.phase == ReplicaPhase::Failed).await;
    let wire = wire_status(&a.replica_id, &s);
    assert_eq!(wire.state(), pb::ReplicaState::Failed);
    assert!(
        wire.message
            .starts_with("securityContext.capabilities.add[1]: CAP_SYS_ADMIN")
            && wire.message.contains("--allow-capability SYS_ADMIN"),
        "{}",
        wire.message
    );
    assert!(rt.managed().await.expect("list").is_empty());

    let allowing = Supervisor::new(
        rt.clone(),
        NodePolicy {
            allowed_capabilities: vec!["SYS_ADMIN".into()],
            ..NodePolicy::default()
        },
    );
    let (mut rx, _task) = allowing.run(replica(c, &image), Backoff::default(), cancel.clone());
    let s = until(&mut rx, "the run", |s| s.phase == ReplicaPhase::Exited).await;
    assert_eq!(
        wire_status(&a.replica_id, &s).state(),
        pb::ReplicaState::Succeeded,
        "{s:?}"
    );
    cancel.cancel();
}

/// A fork bomb in a workload that sets no limit stops at the default pids
/// limit; the agent's runtime goes on running containers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_bomb_hits_the_default_pids_limit() {
    let Some((_d, rt, image)) = daemon().await else {
        return;
    };
    let (a, spec) = workload(serde_json::json!({
        "image": "busybox",
        "command": ["/bin/sh", "-c",
            "i=0; while [ $i -lt 6000 ]; do sleep 120 & i=$((i+1)); done 2>/dev/null; echo spawned; sleep 120"],
    }));
    let dir = tempfile::tempdir().expect("tempdir");
    let c = container_config(&a, &spec, dir.path(), dir.path());
    assert_eq!(c.limits.pids, 4096);
    rt.start(&c, &image, &NodePolicy::default())
        .await
        .expect("start");
    let cg1 = PathBuf::from(format!("/sys/fs/cgroup/pids/{}/{}", rt.namespace(), c.id));
    let cg2 = PathBuf::from(format!("/sys/fs/cgroup/{}/{}", rt.namespace(), c.id));
    let cg = if cg1.exists() { cg1 } else { cg2 };
    let read = |f: &str| std::fs::read_to_string(cg.join(f)).unwrap_or_default();
    assert_eq!(read("pids.max").trim(), "4096", "{}", cg.display());
    let refused = || -> u64 {
        read("pids.events")
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while refused() == 0 {
        let current: u64 = read("pids.current").trim().parse().unwrap_or(0);
        assert!(current <= 4096, "{current} processes");
        assert!(
            std::time::Instant::now() < deadline,
            "no fork refused after 120 s ({current} processes)"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let current: u64 = read("pids.current").trim().parse().expect("pids.current");
    assert!(current <= 4096, "{current} processes");
    let _ = rt.stop(&c.id, Duration::from_secs(1)).await;
    rt.remove(&c.id).await;

    // Still able to run containers.
    let (a, spec) = workload(serde_json::json!({
        "image": "busybox", "command": ["/bin/true"],
    }));
    let c = container_config(&a, &spec, dir.path(), dir.path());
    rt.start(&c, &image, &NodePolicy::default())
        .await
        .expect("start after the fork bomb");
    let exit = tokio::time::timeout(Duration::from_secs(30), rt.wait(&c.id))
        .await
        .expect("exit")
        .expect("wait");
    assert_eq!(exit.code, 0);
    rt.remove(&c.id).await;
}
