//! Containers through a real containerd (a test-owned instance on its own
//! socket and directories), with a busybox image built locally. Needs root,
//! containerd, runc and busybox-static (all installed by .ci/run); skips with
//! a loud message otherwise.

use std::path::PathBuf;

use std::time::{Duration, Instant};

use cloudless_runtime::test_support::{missing_prerequisite, write_busybox_archive, Daemon};
use cloudless_runtime::{
    ContainerConfig, Containerd, ImageRef, Limits, NodePolicy, RuntimeError, SeccompProfile,
};

macro_rules! require_containerd {
    () => {
        if let Some(why) = missing_prerequisite() {
            skip_test(format!("containerd test: {why}"));
            return;
        }
    };
}

async fn start_daemon() -> (Daemon, Containerd) {
    // A namespace of its own: runc keeps state per namespace and id under
    // /run/containerd/runc, shared by every containerd on the machine.
    let ns = format!(
        "test-{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    Daemon::start(&ns).await.expect("containerd")
}

async fn busybox(daemon: &Daemon, rt: &Containerd) -> ImageRef {
    let archive = daemon.dir.path().join("busybox.tar");
    write_busybox_archive(&archive, "busybox:test", false).expect("archive");
    rt.import(&archive, "docker.io/cloudless/busybox:test")
        .await
        .expect("import")
}

fn sh(id: &str, script: &str) -> ContainerConfig {
    ContainerConfig {
        id: id.into(),
        command: vec!["/bin/sh".into(), "-c".into(), script.into()],
        ..ContainerConfig::default()
    }
}

/// Runs `c` to completion; returns exit code and output.
async fn run(rt: &Containerd, image: &ImageRef, c: &ContainerConfig) -> (u32, String) {
    let started = rt
        .start(c, image, &NodePolicy::default())
        .await
        .unwrap_or_else(|e| panic!("start {}: {e}", c.id));
    let exit = tokio::time::timeout(Duration::from_secs(30), rt.wait(&c.id))
        .await
        .expect("container did not exit")
        .expect("wait");
    // The shim copies output to the file asynchronously: give it a moment.
    rt.remove(&c.id).await;
    let mut out = String::new();
    for _ in 0..30 {
        out = std::fs::read_to_string(&started.log_path).expect("log");
        if !out.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (exit.code, out)
}

fn status_field(out: &str, field: &str) -> String {
    out.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_exit_code_user_and_sandbox() {
    require_containerd!();
    let (daemon, rt) = start_daemon().await;
    let image = busybox(&daemon, &rt).await;

    let (code, out) = run(
        &rt,
        &image,
        &sh("exit3", "echo hello from cloudless; exit 3"),
    )
    .await;
    assert_eq!(code, 3);
    assert!(out.contains("hello from cloudless"), "{out}");

    // Seccomp filter on, no new privileges, only the capabilities asked for.
    let mut c = sh("status", "cat /proc/self/status");
    c.security.capabilities_add = vec!["NET_BIND_SERVICE".into()];
    let (code, out) = run(&rt, &image, &c).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(status_field(&out, "Seccomp:"), "2", "{out}");
    assert_eq!(status_field(&out, "NoNewPrivs:"), "1", "{out}");
    assert_eq!(status_field(&out, "CapEff:"), "0000000000000400", "{out}");
    assert_eq!(status_field(&out, "CapBnd:"), "0000000000000400", "{out}");

    // The strict profile blocks mkdir with EPERM; the default allows it.
    let mut c = sh("strict", "mkdir /tmp/x && echo made");
    c.security.seccomp = SeccompProfile::Strict;
    let (code, out) = run(&rt, &image, &c).await;
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("Operation not permitted"), "{out}");
    let (code, out) = run(&rt, &image, &sh("default", "mkdir /tmp/x && echo made")).await;
    assert_eq!((code, out.trim()), (0, "made"));

    // Read-only root, run as a user.
    let mut c = sh("ro", "touch /x");
    c.security.read_only_root_filesystem = true;
    let (code, out) = run(&rt, &image, &c).await;
    assert_ne!(code, 0);
    assert!(out.contains("Read-only file system"), "{out}");
    let mut c = sh("user", "id -u; id -g");
    c.security.run_as_user = Some(1000);
    c.security.run_as_group = Some(1001);
    let (_, out) = run(&rt, &image, &c).await;
    assert_eq!(out.split_whitespace().collect::<Vec<_>>(), ["1000", "1001"]);

    assert!(
        rt.managed().await.expect("list").is_empty(),
        "containers left behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_and_pids_limits_are_enforced() {
    require_containerd!();
    let (daemon, rt) = start_daemon().await;
    let image = busybox(&daemon, &rt).await;

    let mut c = sh("oom", "x=aaaaaaaaaaaaaaaa; while true; do x=$x$x; done");
    c.limits = Limits {
        memory_bytes: 16 << 20,
        ..Limits::default()
    };
    let (code, _) = run(&rt, &image, &c).await;
    assert_eq!(code, 137, "expected an OOM kill (SIGKILL)");

    // Checked in the kernel: the pids cgroup holds the limit and counted
    // refused forks while the shell tried to start 30 processes.
    let mut c = sh(
        "pids",
        "i=0; while [ $i -lt 30 ]; do sleep 3 & i=$((i+1)); done; wait",
    );
    // Room for runc's own init threads, which run in the cgroup before exec.
    c.limits = Limits {
        pids: 12,
        ..Limits::default()
    };
    rt.start(&c, &image, &NodePolicy::default())
        .await
        .expect("start");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let cg = PathBuf::from(format!("/sys/fs/cgroup/pids/{}/pids", rt.namespace()));
    let cg2 = PathBuf::from(format!("/sys/fs/cgroup/{}/pids", rt.namespace()));
    let dir = if cg.exists() { cg } else { cg2 };
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    assert_eq!(read("pids.max").trim(), "12", "{}", dir.display());
    let current: u32 = read("pids.current").trim().parse().expect("pids.current");
    assert!(current <= 12, "{current} processes");
    let refused: u64 = read("pids.events")
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(refused > 0, "no fork was refused: {}", read("pids.events"));
    let _ = rt.stop("pids", Duration::from_secs(1)).await;
    rt.remove("pids").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_sends_sigterm_then_sigkill_after_the_grace_period() {
    require_containerd!();
    let (daemon, rt) = start_daemon().await;
    let image = busybox(&daemon, &rt).await;
    let node = NodePolicy::default();

    // Handles SIGTERM: exits at once with its own code.
    let c = sh(
        "polite",
        "trap 'exit 7' TERM; while true; do sleep 0.1; done",
    );
    rt.start(&c, &image, &node).await.expect("start");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    let exit = rt
        .stop("polite", Duration::from_secs(5))
        .await
        .expect("stop");
    assert_eq!(exit.code, 7);
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    rt.remove("polite").await;

    // Ignores it (PID 1 without a handler): killed after the grace period.
    let c = sh("stubborn", "trap '' TERM; while true; do sleep 0.1; done");
    rt.start(&c, &image, &node).await.expect("start");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    let exit = rt
        .stop("stubborn", Duration::from_secs(1))
        .await
        .expect("stop");
    let took = t0.elapsed();
    assert_eq!(exit.code, 137);
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(3),
        "{took:?}"
    );
    rt.remove("stubborn").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_leaves_nothing_behind() {
    require_containerd!();
    let (daemon, rt) = start_daemon().await;
    let corrupt: PathBuf = daemon.dir.path().join("corrupt.tar");
    write_busybox_archive(&corrupt, "busybox:bad", true).expect("archive");
    match rt.import(&corrupt, "docker.io/cloudless/busybox:bad").await {
        Err(RuntimeError::BadImage { problem, .. }) => {
            assert!(problem.contains("corrupt"), "{problem}")
        }
        other => panic!("corrupt blob accepted: {other:?}"),
    }
    let image = busybox(&daemon, &rt).await;

    // An invalid Localhost seccomp profile: refused before containerd is asked.
    let profiles = daemon.dir.path().join("seccomp");
    std::fs::create_dir_all(&profiles).expect("mkdir");
    std::fs::write(profiles.join("bad.json"), "{\"defaultAction\": 3}").expect("write");
    let node = NodePolicy {
        seccomp_dir: profiles,
        ..NodePolicy::default()
    };
    let mut c = sh("badseccomp", "true");
    c.security.seccomp = SeccompProfile::Localhost("bad.json".into());
    let err = rt.start(&c, &image, &node).await.expect_err("bad profile");
    assert!(err.to_string().contains("localhostProfile"), "{err}");

    // A runtime class the node does not have: refused, nothing created.
    let mut c = sh("badclass", "true");
    c.runtime_class = Some("kata".into());
    let err = rt.start(&c, &image, &node).await.expect_err("bad class");
    assert!(err.to_string().contains("runtimeClassName"), "{err}");
    assert!(rt.managed().await.expect("list").is_empty());
}

/// A symbolic link planted under an allowed hostPath prefix cannot lead the
/// mount out of it: the source is opened beneath the prefix and mounted
/// through the open file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_path_symlinks_cannot_escape_the_allowed_prefix() {
    require_containerd!();
    let (daemon, rt) = start_daemon().await;
    let image = busybox(&daemon, &rt).await;
    let prefix = daemon.dir.path().join("shared");
    std::fs::create_dir_all(prefix.join("data")).expect("mkdir");
    std::fs::write(prefix.join("data/hello"), "from the host\n").expect("write");
    std::os::unix::fs::symlink("/", prefix.join("root")).expect("symlink");
    let node = NodePolicy {
        allowed_host_paths: vec![prefix.clone()],
        ..NodePolicy::default()
    };
    let with_host_path = |id: &str, path: PathBuf| {
        let mut c = sh(id, "cat /mnt/hello; ls /mnt");
        c.mounts = vec![cloudless_runtime::Mount {
            destination: "/mnt".into(),
            source: cloudless_runtime::MountSource::HostPath(path),
            read_only: true,
            field: "volumeMounts[0]".into(),
            volume: "shared".into(),
        }];
        c
    };

    // The host's /etc through the planted link: refused, nothing created.
    let c = with_host_path("escape", prefix.join("root/etc"));
    let err = rt.start(&c, &image, &node).await.expect_err("escaped");
    let text = err.to_string();
    assert!(
        text.starts_with("volumeMounts[0].hostPath: volume \"shared\"")
            && text.contains("outside the allowed directory"),
        "{text}"
    );
    assert!(rt.managed().await.expect("list").is_empty());

    // A real directory under the prefix is mounted (through the open file).
    let c = with_host_path("inside", prefix.join("data"));
    let started = rt.start(&c, &image, &node).await.expect("start");
    let exit = tokio::time::timeout(Duration::from_secs(30), rt.wait("inside"))
        .await
        .expect("container did not exit")
        .expect("wait");
    rt.remove("inside").await;
    let mut out = String::new();
    for _ in 0..30 {
        out = std::fs::read_to_string(&started.log_path).expect("log");
        if out.contains("hello\n") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(exit.code, 0, "{out}");
    assert!(out.contains("from the host"), "{out}");
}

mod supervised {
    use super::*;
    use cloudless_runtime::probe::{Probe, ProbeAction};
    use cloudless_runtime::{
        Backoff, ReplicaPhase, ReplicaSpec, ReplicaStatus, RestartPolicy, Supervisor,
    };
    use tokio::sync::watch;
    use tokio_util::sync::CancellationToken;

    fn fast() -> Backoff {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(400),
            reset_after: Duration::from_secs(60),
        }
    }

    fn replica(c: ContainerConfig, image: &ImageRef, restart: RestartPolicy) -> ReplicaSpec {
        ReplicaSpec {
            container: c,
            image: image.clone(),
            restart,
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
        cloudless_runtime::test_support::wait_for_status(rx, what, Duration::from_secs(30), f).await
    }

    fn probe(action: ProbeAction) -> Probe {
        Probe {
            action,
            initial_delay: Duration::from_millis(200),
            period: Duration::from_millis(200),
            timeout: Duration::from_secs(2),
            success_threshold: 1,
            failure_threshold: 2,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn restart_policies_and_oom_reporting() {
        require_containerd!();
        let (daemon, rt) = start_daemon().await;
        let image = busybox(&daemon, &rt).await;
        let sup = Supervisor::new(rt.clone(), NodePolicy::default());
        let cancel = CancellationToken::new();

        // Never: one run, its exit reported.
        let (mut rx, _) = sup.run(
            replica(sh("never", "exit 4"), &image, RestartPolicy::Never),
            fast(),
            cancel.clone(),
        );
        let s = until(&mut rx, "never to exit", |s| {
            s.phase == ReplicaPhase::Exited
        })
        .await;
        assert_eq!((s.restarts, s.last_exit.map(|e| e.code)), (0, Some(4)));

        // OnFailure: a failing container is restarted, with growing delays.
        let (mut rx, _) = sup.run(
            replica(sh("onfail", "exit 1"), &image, RestartPolicy::OnFailure),
            fast(),
            cancel.clone(),
        );
        let t0 = Instant::now();
        until(&mut rx, "four restarts", |s| s.restarts >= 4).await;
        // The fourth restart is counted when its back-off begins: the first
        // three (100 + 200 + 400 ms) are over.
        assert!(
            t0.elapsed() >= Duration::from_millis(700),
            "{:?}",
            t0.elapsed()
        );
        // ... but not a successful one.
        let (mut rx, _) = sup.run(
            replica(sh("onok", "exit 0"), &image, RestartPolicy::OnFailure),
            fast(),
            cancel.clone(),
        );
        let s = until(&mut rx, "onok to exit", |s| s.phase == ReplicaPhase::Exited).await;
        assert_eq!((s.restarts, s.last_exit.map(|e| e.code)), (0, Some(0)));

        // Always: even a clean exit is restarted.
        let (mut rx, _) = sup.run(
            replica(sh("always", "exit 0"), &image, RestartPolicy::Always),
            fast(),
            cancel.clone(),
        );
        until(&mut rx, "two restarts", |s| s.restarts >= 2).await;

        // An OOM kill is reported as such.
        let mut c = sh("oomsup", "x=aaaaaaaaaaaaaaaa; while true; do x=$x$x; done");
        c.limits = Limits {
            memory_bytes: 16 << 20,
            ..Limits::default()
        };
        let (mut rx, _) = sup.run(
            replica(c, &image, RestartPolicy::Never),
            fast(),
            cancel.clone(),
        );
        let s = until(&mut rx, "the OOM kill", |s| s.phase == ReplicaPhase::Exited).await;
        let exit = s.last_exit.expect("exit");
        assert!(exit.oom_killed, "{s:?}");
        assert!(s.message.contains("OOM"), "{s:?}");

        cancel.cancel();
        tokio::time::sleep(Duration::from_millis(500)).await;
        drop(daemon);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn probes_gate_readiness_and_a_failing_liveness_probe_restarts() {
        require_containerd!();
        let (daemon, rt) = start_daemon().await;
        let image = busybox(&daemon, &rt).await;
        let sup = Supervisor::new(rt.clone(), NodePolicy::default());
        let cancel = CancellationToken::new();

        // Readiness over HTTP (busybox httpd on the container's loopback),
        // liveness over TCP: ready, and never restarted.
        let mut spec = replica(
            sh(
                "web",
                "mkdir -p /www && echo ok > /www/index.html && sleep 1 && httpd -f -p 8080 -h /www",
            ),
            &image,
            RestartPolicy::Always,
        );
        spec.readiness = Some(probe(ProbeAction::Http {
            port: 8080,
            path: "/index.html".into(),
        }));
        spec.liveness = Some(Probe {
            initial_delay: Duration::from_secs(3),
            ..probe(ProbeAction::Tcp(8080))
        });
        let (mut web, _) = sup.run(spec, fast(), cancel.clone());
        let s = until(&mut web, "running", |s| s.phase == ReplicaPhase::Running).await;
        assert!(!s.ready, "ready before the server listens");
        until(&mut web, "ready", |s| s.ready).await;

        // Liveness by exec: healthy while /tmp/healthy exists.
        let mut spec = replica(
            sh(
                "sick",
                "touch /tmp/healthy; sleep 1; rm /tmp/healthy; sleep 1000",
            ),
            &image,
            RestartPolicy::Always,
        );
        spec.liveness = Some(probe(ProbeAction::Exec(vec![
            "cat".into(),
            "/tmp/healthy".into(),
        ])));
        let (mut sick, _) = sup.run(spec, fast(), cancel.clone());
        let s = until(&mut sick, "a liveness restart", |s| s.restarts >= 1).await;
        assert!(s.last_exit.is_some_and(|e| e.liveness_failed), "{s:?}");

        let s = web.borrow().clone();
        assert_eq!((s.restarts, s.ready), (0, true), "{s:?}");
        cancel.cancel();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(
            rt.managed().await.expect("list").is_empty(),
            "cancelled replicas left behind"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restarted_agent_adopts_running_containers_and_removes_unknown_ones() {
        require_containerd!();
        let (daemon, rt) = start_daemon().await;
        let image = busybox(&daemon, &rt).await;
        let sup = Supervisor::new(rt.clone(), NodePolicy::default());
        let cancel = CancellationToken::new();
        let (mut keep, keep_task) = sup.run(
            replica(sh("keep", "sleep 1000"), &image, RestartPolicy::Always),
            fast(),
            cancel.clone(),
        );
        let (mut gone, gone_task) = sup.run(
            replica(sh("gone", "sleep 1000"), &image, RestartPolicy::Always),
            fast(),
            cancel.clone(),
        );
        let pid = until(&mut keep, "keep running", |s| s.pid.is_some())
            .await
            .pid;
        until(&mut gone, "gone running", |s| s.pid.is_some()).await;
        // The agent dies: its supervisors vanish, the containers keep running.
        keep_task.abort();
        gone_task.abort();

        let sock = daemon.dir.path().join("c.sock");
        let rt2 = Containerd::connect(&sock, rt.namespace(), &daemon.dir.path().join("logs"))
            .await
            .expect("reconnect");
        let sup2 = Supervisor::new(rt2.clone(), NodePolicy::default());
        let before = rt2.managed().await.expect("list");
        let state = rt2.task_state("keep").await;
        let adopted = sup2.adopt(&["keep".to_owned()]).await.expect("adopt");
        assert_eq!(
            adopted,
            ["keep"],
            "managed before: {before:?}, keep: {state:?}"
        );
        assert_eq!(rt2.managed().await.expect("list"), ["keep"]);
        let cancel2 = CancellationToken::new();
        let (mut keep2, _) = sup2.run(
            replica(sh("keep", "sleep 1000"), &image, RestartPolicy::Always),
            fast(),
            cancel2.clone(),
        );
        let s = until(&mut keep2, "adopted", |s| s.phase == ReplicaPhase::Running).await;
        assert_eq!(s.pid, pid, "a second copy was started instead of adopting");
        assert_eq!(s.restarts, 0);
        cancel2.cancel();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(rt2.managed().await.expect("list").is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_rotated_and_tailed() {
    use cloudless_runtime::logs::{tail, Rotation};
    use cloudless_runtime::{Backoff, ReplicaPhase, ReplicaSpec, RestartPolicy, Supervisor};
    require_containerd!();
    let (daemon, rt) = start_daemon().await;
    let image = busybox(&daemon, &rt).await;
    let r = Rotation {
        max_bytes: 16 << 10,
        keep: 2,
    };
    let sup = Supervisor::new(rt.clone(), NodePolicy::default()).with_log_rotation(r);
    // About 40 KiB over 3 s, then the last line.
    let spec = ReplicaSpec {
        container: sh(
            "chatty",
            "i=0; while [ $i -lt 30 ]; do head -c 1400 /bin/busybox | od -c | head -20; i=$((i+1)); sleep 0.1; done; echo last line",
        ),
        image: image.clone(),
        restart: RestartPolicy::Never,
        liveness: None,
        readiness: None,
        stop_grace: Duration::from_secs(1),
    };
    let cancel = tokio_util::sync::CancellationToken::new();
    let (mut rx, _) = sup.run(spec, Backoff::default(), cancel.clone());
    tokio::time::timeout(
        Duration::from_secs(30),
        rx.wait_for(|s| s.phase == ReplicaPhase::Exited),
    )
    .await
    .expect("exit")
    .expect("status");
    let log = rt.log_path("chatty");
    let rotated = PathBuf::from(format!("{}.1", log.display()));
    assert!(rotated.exists(), "no rotation happened");
    let mut last = Vec::new();
    for _ in 0..30 {
        last = tail(&log, 1, r).expect("tail");
        if last == ["last line"] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(last, ["last line"]);
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_stats_and_unused_image_collection() {
    require_containerd!();
    let (daemon, rt) = start_daemon().await;
    let image = busybox(&daemon, &rt).await;
    let spare = daemon.dir.path().join("spare.tar");
    write_busybox_archive(&spare, "busybox:spare", false).expect("archive");
    rt.import(&spare, "docker.io/cloudless/busybox:spare")
        .await
        .expect("import");

    // A busy container: CPU time and memory show up in its usage.
    let c = sh("busy", "x=0; while true; do x=$((x+1)); done");
    rt.start(&c, &image, &NodePolicy::default())
        .await
        .expect("start");
    tokio::time::sleep(Duration::from_millis(800)).await;
    let u = rt.usage("busy").expect("usage of a running container");
    assert!(u.cpu_ns > 100_000_000, "{u:?}");
    assert!(u.memory_bytes > 0 && u.pids >= 1, "{u:?}");

    // The image in use and the one asked to keep stay; the spare goes.
    let removed = rt.remove_unused_images(&[]).await.expect("gc");
    assert_eq!(removed, ["docker.io/cloudless/busybox:spare"]);
    assert_eq!(
        rt.images().await.expect("images"),
        std::slice::from_ref(&image.name)
    );
    let _ = rt.stop("busy", Duration::from_millis(200)).await;
    rt.remove("busy").await;
    assert!(rt.usage("busy").is_none());
    let removed = rt
        .remove_unused_images(std::slice::from_ref(&image.name))
        .await
        .expect("gc");
    assert!(removed.is_empty(), "{removed:?}");
}

/// Reports a test that cannot run here: under CI (`CI` set) that is a
/// failure; elsewhere it is printed and listed in `$CLOUDLESS_SKIP_LOG`, so
/// the summary counts it as skipped, not passed.
fn skip_test(message: String) {
    assert!(
        std::env::var_os("CI").is_none(),
        "cannot run in CI: {message}"
    );
    eprintln!("\n!!!!!!!! SKIPPED {message} !!!!!!!!\n");
    if let Some(path) = std::env::var_os("CLOUDLESS_SKIP_LOG") {
        use std::io::Write as _;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{message}");
        }
    }
}
