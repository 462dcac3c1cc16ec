//! `make bench-runtime` (as root, with containerd, runc and busybox-static):
//! start latency through this runtime against `ctr run` of the same image on
//! the same containerd, interleaved, 30 trials each; 50 containers started
//! concurrently; resident memory of this process while it supervises 20
//! containers. Prints Markdown tables for docs/benchmarks.md.

use std::process::Command;
use std::time::{Duration, Instant};

use cloudless_runtime::test_support::{missing_prerequisite, write_busybox_archive, Daemon};
use cloudless_runtime::{
    Backoff, ContainerConfig, NodePolicy, ReplicaPhase, ReplicaSpec, RestartPolicy, Supervisor,
};
use tokio_util::sync::CancellationToken;

const NAMESPACE: &str = "cloudless-bench";
const IMAGE: &str = "docker.io/cloudless/busybox:bench";

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn sleeper(id: &str) -> ContainerConfig {
    ContainerConfig {
        id: id.into(),
        command: vec!["/bin/sleep".into(), "1000".into()],
        ..ContainerConfig::default()
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    if let Some(why) = missing_prerequisite() {
        return Err(format!(
            "bench-runtime needs root, containerd, runc and busybox-static: {why}"
        )
        .into());
    }
    let trials: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(30);
    let (daemon, rt) = Daemon::start(NAMESPACE).await?;
    let archive = daemon.dir.path().join("busybox.tar");
    write_busybox_archive(&archive, "busybox:bench", false)?;
    let image = rt.import(&archive, IMAGE).await?;
    let node = NodePolicy::default();
    let sock = daemon.socket();
    let ctr = |args: &[&str]| {
        Command::new("ctr")
            .arg("-a")
            .arg(&sock)
            .args(["-n", NAMESPACE])
            .args(args)
            .output()
    };

    // Start latency, interleaved so that drift hits both alike.
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for i in 0..trials {
        let id = format!("ours-{i}");
        let t0 = Instant::now();
        rt.start(&sleeper(&id), &image, &node).await?;
        ours.push(t0.elapsed().as_secs_f64() * 1000.0);
        rt.stop(&id, Duration::from_millis(100)).await?;
        rt.remove(&id).await;

        let id = format!("ctr-{i}");
        let t0 = Instant::now();
        let out = ctr(&["run", "-d", IMAGE, &id, "/bin/sleep", "1000"])?;
        theirs.push(t0.elapsed().as_secs_f64() * 1000.0);
        if !out.status.success() {
            return Err(format!("ctr run: {}", String::from_utf8_lossy(&out.stderr)).into());
        }
        let _ = ctr(&["task", "kill", "-s", "SIGKILL", &id]);
        for _ in 0..50 {
            if ctr(&["task", "delete", &id]).is_ok_and(|o| o.status.success()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = ctr(&["container", "delete", &id]);
    }
    ours.sort_by(f64::total_cmp);
    theirs.sort_by(f64::total_cmp);
    let (o50, t50) = (percentile(&ours, 0.5), percentile(&theirs, 0.5));
    println!("| start latency, {trials} trials each (create to process running) | p50 ms | p95 ms | max ms |");
    println!("|---|---:|---:|---:|");
    for (name, v) in [
        ("cloudless runtime", &ours),
        ("`ctr run -d` (same image, same containerd)", &theirs),
    ] {
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} |",
            percentile(v, 0.5),
            percentile(v, 0.95),
            v.last().copied().unwrap_or(0.0)
        );
    }
    println!("\nratio at p50 (ours / ctr): {:.2}\n", o50 / t50);

    // Fifty at once.
    let t0 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..50 {
        let (rt, image, node) = (rt.clone(), image.clone(), node.clone());
        set.spawn(async move {
            let t = Instant::now();
            rt.start(&sleeper(&format!("many-{i}")), &image, &node)
                .await
                .map(|_| t.elapsed().as_secs_f64() * 1000.0)
        });
    }
    let mut each = Vec::new();
    while let Some(r) = set.join_next().await {
        each.push(r??);
    }
    let all = t0.elapsed().as_secs_f64() * 1000.0;
    each.sort_by(f64::total_cmp);
    println!("| 50 containers started concurrently | all running after ms | per container p50 ms | p95 ms |");
    println!("|---|---:|---:|---:|");
    println!(
        "| cloudless runtime | {all:.0} | {:.0} | {:.0} |\n",
        percentile(&each, 0.5),
        percentile(&each, 0.95)
    );
    for i in 0..50 {
        let id = format!("many-{i}");
        let _ = rt.stop(&id, Duration::from_millis(100)).await;
        rt.remove(&id).await;
    }

    // Memory while supervising 20 containers.
    let rss_before = rss_kib();
    let sup = Supervisor::new(rt.clone(), node.clone());
    let cancel = CancellationToken::new();
    let mut watches = Vec::new();
    for i in 0..20 {
        let spec = ReplicaSpec {
            container: sleeper(&format!("kept-{i}")),
            image: image.clone(),
            restart: RestartPolicy::Always,
            liveness: None,
            readiness: None,
            stop_grace: Duration::from_millis(100),
        };
        watches.push(sup.run(spec, Backoff::default(), cancel.clone()).0);
    }
    for w in &mut watches {
        w.wait_for(|s| s.phase == ReplicaPhase::Running).await?;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss = rss_kib();
    println!("| resident memory | MiB |");
    println!("|---|---:|");
    println!(
        "| this process (runtime + 20 supervisors + containerd client), before the 20 / while supervising them | {:.1} / {:.1} |",
        rss_before as f64 / 1024.0,
        rss as f64 / 1024.0
    );
    cancel.cancel();
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(daemon);
    Ok(())
}
