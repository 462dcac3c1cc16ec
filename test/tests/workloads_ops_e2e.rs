//! Day-two operations end to end with the real binaries (3 coordinator
//! processes, 2 agents, own containerd and registry): `exec` through the
//! coordinators and the agents' tunnels, a container's security context
//! and volumes as the process sees them, revision history and `rollout
//! undo`, BlueGreen availability, the placement explanation in `describe`.
//! Needs root, containerd, runc, busybox-static and docker-registry
//! (installed by .ci/run); skips loudly otherwise.

use std::time::{Duration, Instant};

use cloudless_proto::v1 as pb;
use cloudless_test::e2e::{output_text as text, Cluster, ReplicaSampler};

macro_rules! require_e2e {
    () => {
        if let Some(why) = cloudless_test::e2e::missing() {
            cloudless_test::skip_test(format!("end-to-end operations test: {why}"));
            return;
        }
    };
}

fn ok(c: &Cluster, args: &[&str]) -> String {
    c.ctl_ok(args)
}

const TOOLS: &str = "  securityContext:
    runAsUser: 1000
    runAsGroup: 1000
    readOnlyRootFilesystem: true
  volumes:
    - name: scratch
      emptyDir: {}
    - name: mem
      emptyDir: {medium: Memory, sizeLimitBytes: 1048576}
  volumeMounts:
    - {name: scratch, mountPath: /scratch}
    - {name: mem, mountPath: /mem}
  ports:
    - {name: http, containerPort: 8080}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_volumes_security_history_undo_and_blue_green() {
    require_e2e!();
    let c = Cluster::start().await;
    let v1 = c.manifest_with("tools", "1", 2, "one", TOOLS);
    ok(
        &c,
        &[
            "apply",
            "-f",
            &v1.display().to_string(),
            "--wait",
            "--timeout",
            "90",
        ],
    );
    let rs = c
        .wait_ready("tools", 2, Duration::from_secs(30), |_| true)
        .await;

    // exec reaches a replica through the coordinators and the tunnel; the
    // process runs as the manifest's user with its volumes mounted.
    assert_eq!(ok(&c, &["exec", "tools", "--", "id", "-u"]).trim(), "1000");
    assert_eq!(
        ok(
            &c,
            &[
                "exec",
                "tools",
                "--",
                "sh",
                "-c",
                "echo kept > /scratch/f && cat /scratch/f"
            ]
        )
        .trim(),
        "kept"
    );
    let mounts = ok(&c, &["exec", "tools", "--", "cat", "/proc/mounts"]);
    assert!(
        mounts
            .lines()
            .any(|l| l.contains(" /mem tmpfs ") && l.contains("size=1024k")),
        "{mounts}"
    );
    // The root is read-only: the command fails, and so does cloudlessctl,
    // with the command's exit code.
    let out = c.ctl(&["exec", "tools", "--", "sh", "-c", "touch /rootfile"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stdout.contains("Read-only file system"), "{stdout}");
    let out = c.ctl(&["exec", "tools", "--", "sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{:?}", text(&out));
    // Output larger than one gRPC message arrives whole (streamed in chunks
    // from memory, never staged on the device's disk).
    let big = c.ctl(&[
        "exec",
        "tools",
        "--",
        "sh",
        "-c",
        "yes 0123456789abcdef | head -c 6000000; exit 3",
    ]);
    assert_eq!(big.status.code(), Some(3), "{}", text(&big).1);
    assert_eq!(big.stdout.len(), 6_000_000);
    assert!(big.stdout.starts_with(b"0123456789abcdef\n0123"));
    // A chosen replica, and a missing workload.
    let target = &rs[1].id;
    let hostname = ok(
        &c,
        &[
            "exec",
            "tools",
            "--replica",
            target,
            "--",
            "cat",
            "/proc/sys/kernel/hostname",
        ],
    );
    assert_eq!(hostname.trim(), target.as_str());
    let out = c.ctl(&["exec", "nosuch", "--", "true"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("not found"), "{stderr}");

    // The emptyDir lives in the agent's data dir while the replica runs.
    let scratch_of = |r: &pb::Replica| {
        c.agents
            .iter()
            .find(|a| a.name == r.node_name)
            .expect("agent")
            .data_dir
            .join("volumes")
            .join(&r.id)
            .join("scratch")
    };
    let first_scratch = scratch_of(&rs[1]);
    assert!(
        first_scratch.join("f").is_file() || scratch_of(&rs[0]).join("f").is_file(),
        "the file written through exec is in neither replica's volume"
    );

    // describe: container settings and the placement explanation.
    let d = ok(&c, &["describe", "workload", "tools"]);
    for want in [
        "Ports:        http 8080/TCP",
        "user 1000",
        "read-only root true",
        "Volume:       scratch at /scratch (emptyDir Disk)",
        "Placement explanation",
        "agent-a",
        "agent-b",
        "score",
    ] {
        assert!(d.contains(want), "describe lacks {want:?}:\n{d}");
    }

    // Revision history and undo.
    let v2 = c.manifest_with("tools", "2", 2, "two", TOOLS);
    ok(
        &c,
        &[
            "apply",
            "-f",
            &v2.display().to_string(),
            "--wait",
            "--timeout",
            "90",
        ],
    );
    let h = ok(&c, &["rollout", "history", "tools"]);
    let rows: Vec<&str> = h.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{h}");
    assert!(
        rows[0].starts_with('1') && rows[0].contains("busybox:1"),
        "{h}"
    );
    assert!(
        rows[1].starts_with('2') && rows[1].contains("busybox:2") && rows[1].ends_with('*'),
        "{h}"
    );
    let undo = ok(
        &c,
        &["rollout", "undo", "tools", "--wait", "--timeout", "90"],
    );
    assert!(
        undo.contains("rolled back to revision 1 (now revision 3)"),
        "{undo}"
    );
    c.wait_ready("tools", 2, Duration::from_secs(30), |rs| {
        rs.iter()
            .all(|r| r.image.ends_with(":1") && r.template == 3)
    })
    .await;
    let h = ok(&c, &["rollout", "history", "tools"]);
    assert!(
        h.lines()
            .last()
            .is_some_and(|l| l.starts_with('3') && l.contains("undo to 1") && l.ends_with('*')),
        "{h}"
    );
    let out = c.ctl(&["rollout", "undo", "tools", "--to-revision", "9"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("toRevision: 9 is not in the history of default/tools (it holds 1, 2, 3)"),
        "{stderr}"
    );

    // BlueGreen: a full new set next to the old; Ready never drops below
    // the desired count and both sets exist at once.
    let sampler = ReplicaSampler::start(&c, "tools");
    let bg = c.manifest_with(
        "tools",
        "2",
        2,
        "blue-green",
        &format!("{TOOLS}  rollout:\n    type: BlueGreen\n"),
    );
    ok(
        &c,
        &[
            "apply",
            "-f",
            &bg.display().to_string(),
            "--wait",
            "--timeout",
            "90",
        ],
    );
    let rs = c
        .wait_ready("tools", 2, Duration::from_secs(30), |rs| {
            rs.iter().all(|r| r.image.ends_with(":2"))
        })
        .await;
    let seen = sampler.finish().await;
    assert!(seen.min_ready >= 2, "Ready dropped below 2: {seen:?}");
    assert_eq!(seen.max_total, 4, "no moment with both sets: {seen:?}");

    // Replaced replicas' scratch space went with them; deleting the
    // workload removes the rest.
    let scratch = scratch_of(&rs[0]);
    assert!(scratch.is_dir(), "{}", scratch.display());
    ok(&c, &["delete", "workload", "tools"]);
    let deadline = Instant::now() + Duration::from_secs(40);
    while scratch.exists() || first_scratch.exists() {
        assert!(
            Instant::now() < deadline,
            "{} or {} outlived its replica",
            scratch.display(),
            first_scratch.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
