//! `make bench-e2e`: the whole system on this machine (own containerd, local
//! registry, 3 coordinator processes with mTLS, 2 agents in zones a and b).
//!
//! - Node failure to replacements Ready, over `--trials` trials per timing
//!   profile: the agent holding replicas is SIGKILLed with its containers;
//!   detection is failure to node Down (seen through the API), reaction is
//!   Down to every replacement Ready. The default profile (1 s heartbeats,
//!   Down after 5 s) and a fast one (250 ms heartbeats, Down after 1 s).
//! - A 100-replica workload from apply to all Ready (image cached).
//! - Leader loss (SIGKILL) to the API answering a linearizable read.

use std::time::{Duration, Instant};

use clap::Parser;
use cloudless_test::e2e::{kill_containers, node_phase, Cluster};
use cloudless_test::{cluster_status, process_leader};
use hdrhistogram::Histogram;

#[derive(Parser, Debug)]
struct Args {
    /// Node-failure trials per profile.
    #[arg(long, default_value_t = 20)]
    trials: usize,
    /// Replicas for the scale measurement.
    #[arg(long, default_value_t = 100)]
    replicas: usize,
    /// Leader-loss trials.
    #[arg(long, default_value_t = 5)]
    leader_trials: usize,
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000, 3).expect("histogram")
}

fn line(name: &str, h: &Histogram<u64>) {
    println!(
        "  {name:<28} n={:<3} p50 {:>6} ms  p95 {:>6} ms  max {:>6} ms",
        h.len(),
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.95),
        h.max()
    );
}

/// Waits until every coordinator is a reachable voter.
async fn wait_voters(c: &Cluster) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(l) = process_leader(&c.coordinators).await {
            if let Some(s) = cluster_status(&c.coordinators[l].grpc).await {
                if s.coordinators.len() == c.coordinators.len()
                    && s.coordinators.iter().all(|m| {
                        m.reachable && m.state() != cloudless_proto::v1::RaftServerState::Learner
                    })
                {
                    return;
                }
            }
        }
        if Instant::now() > deadline {
            let mut seen = Vec::new();
            for p in &c.coordinators {
                seen.push((p.grpc.clone(), cluster_status(&p.grpc).await));
            }
            panic!("coordinators not all voting within 60 s: {seen:#?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_phase(c: &Cluster, name: &str, phase: &str, timeout: Duration) -> Instant {
    let deadline = Instant::now() + timeout;
    loop {
        if node_phase(c, name).await.as_deref() == Some(phase) {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "{name} not {phase} within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn failure_trials(c: &mut Cluster, trials: usize, profile: &str) {
    let (mut detect, mut react, mut total) = (hist(), hist(), hist());
    for trial in 0..trials {
        let rs = c
            .wait_ready("bench", 2, Duration::from_secs(60), |_| true)
            .await;
        // The agent holding the most replicas fails.
        let victim = (0..c.agents.len())
            .max_by_key(|i| {
                rs.iter()
                    .filter(|r| r.node_name == c.agents[*i].name)
                    .count()
            })
            .unwrap_or(0);
        let name = c.agents[victim].name.clone();
        let ns = c.agents[victim].namespace.clone();
        let failed = Instant::now();
        c.agents[victim].sigkill();
        kill_containers(&ns);
        let down = wait_phase(c, &name, "Down", Duration::from_secs(60)).await;
        c.wait_ready("bench", 2, Duration::from_secs(60), |rs| {
            rs.iter().all(|r| r.node_name != name)
        })
        .await;
        let ready = Instant::now();
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1);
        detect.record(ms(down - failed)).ok();
        react.record(ms(ready - down)).ok();
        total.record(ms(ready - failed)).ok();
        eprintln!(
            "{profile} trial {trial}: detection {} ms, reaction {} ms",
            ms(down - failed),
            ms(ready - down)
        );
        c.restart_agent(victim);
        wait_phase(c, &name, "Ready", Duration::from_secs(60)).await;
    }
    println!("node failure, {profile} profile ({trials} trials):");
    line("detection (fail -> Down)", &detect);
    line("reaction (Down -> Ready)", &react);
    line("end to end", &total);
}

/// The text of `http_addr`/metrics (empty when it cannot be read).
fn scrape(http_addr: &str) -> String {
    use std::io::{Read as _, Write as _};
    let Ok(mut conn) = std::net::TcpStream::connect(http_addr) else {
        return String::new();
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(conn, "GET /metrics HTTP/1.0\r\nHost: {http_addr}\r\n\r\n");
    let mut text = String::new();
    let _ = conn.read_to_string(&mut text);
    text
}

/// The value of the sample `name` (without labels) in a Prometheus text.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .sum()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    if let Some(why) = cloudless_test::e2e::missing() {
        eprintln!("bench-e2e cannot run here: {why}");
        std::process::exit(2);
    }
    let mut c = Cluster::start().await;
    let m = c.manifest("bench", "1", 2, "bench");
    let out = c.ctl(&[
        "apply",
        "-f",
        &m.display().to_string(),
        "--wait",
        "--timeout",
        "120",
    ]);
    assert!(out.status.success(), "apply: {out:?}");
    // A new leader declares nobody Down for its grace period (10 s by
    // default); trials start after it, as in a cluster that has been up.
    tokio::time::sleep(Duration::from_secs(11)).await;

    failure_trials(
        &mut c,
        args.trials,
        "default (1 s heartbeat, Down after 5 s)",
    )
    .await;

    // Scale: apply to all Ready with the image cached on both agents.
    let m = c.manifest(
        "many",
        "1",
        i64::try_from(args.replicas).unwrap_or(100),
        "many",
    );
    let started = Instant::now();
    let out = c.ctl(&[
        "apply",
        "-f",
        &m.display().to_string(),
        "--wait",
        "--timeout",
        "300",
    ]);
    assert!(out.status.success(), "apply many: {out:?}");
    println!(
        "{} replicas, apply to all Ready (image cached): {} ms",
        args.replicas,
        started.elapsed().as_millis()
    );
    for a in &c.agents {
        let containers = match c.agents.iter().position(|x| x.name == a.name) {
            Some(i) => c.container_pids(i).await.len(),
            None => 0,
        };
        let rss_kib = a
            .child
            .as_ref()
            .and_then(|ch| std::fs::read_to_string(format!("/proc/{}/status", ch.id())).ok())
            .and_then(|st| {
                st.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<u64>().ok())
            })
            .unwrap_or(0);
        println!(
            "  {} resident memory while running {containers} containers: {:.1} MiB",
            a.name,
            rss_kib as f64 / 1024.0
        );
    }
    let out = c.ctl(&["delete", "workload", "many"]);
    assert!(out.status.success(), "delete: {out:?}");
    // Let the agents stop those containers before timing anything else.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let running = c.container_pids(0).await.len() + c.container_pids(1).await.len();
        if running <= 2 {
            break;
        }
        if Instant::now() > deadline {
            let api = c.replicas("many").await.map(|r| r.len());
            let bench = c.replicas("bench").await.map(|r| r.len());
            panic!(
                "{running} containers still running; API: many {api:?}, bench {bench:?}; per agent {:?} / {:?}",
                c.container_pids(0).await.keys().take(5).collect::<Vec<_>>(),
                c.container_pids(1).await.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // How many Raft entries each reconcile decision took (every coordinator
    // has led only as long as this run; the counters are per process).
    let (mut decisions, mut entries) = (0.0, 0.0);
    for n in &c.coordinators {
        let text = scrape(&n.http);
        decisions += metric(&text, "cloudless_reconcile_decisions_total");
        entries += metric(&text, "cloudless_reconcile_raft_entries_total");
    }
    println!(
        "reconcile: {decisions} decisions committed as {entries} Raft entries ({:.2} per decision)",
        entries / decisions.max(1.0)
    );

    // Leader loss to the API answering again.
    let mut leader_loss = hist();
    let flags: Vec<String> = c.coordinator_flags.clone();
    for _ in 0..args.leader_trials {
        wait_voters(&c).await;
        let leader = process_leader(&c.coordinators).await.expect("leader");
        c.coordinators[leader].sigkill();
        let killed = Instant::now();
        loop {
            let out = c.ctl(&["get", "workloads"]);
            if out.status.success() {
                break;
            }
            assert!(
                killed.elapsed() < Duration::from_secs(30),
                "API did not recover"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        leader_loss
            .record(
                u64::try_from(killed.elapsed().as_millis())
                    .unwrap_or(u64::MAX)
                    .max(1),
            )
            .ok();
        let f: Vec<&str> = flags.iter().map(String::as_str).collect();
        c.coordinators[leader].spawn_with("run", None, &f);
    }
    println!("leader loss ({} trials, SIGKILL):", args.leader_trials);
    line("to API answering", &leader_loss);
    wait_voters(&c).await;
    // The last leader change started a new grace period.
    tokio::time::sleep(Duration::from_secs(11)).await;

    let out = c.ctl(&[
        "cluster",
        "set",
        "heartbeat_interval_ms=250",
        "suspect_after_missed_heartbeats=2",
        "down_after_ms=1000",
    ]);
    assert!(out.status.success(), "cluster set: {out:?}");
    // Agents pick the new period up from their next heartbeat answer.
    tokio::time::sleep(Duration::from_secs(3)).await;
    failure_trials(
        &mut c,
        args.trials,
        "fast (250 ms heartbeat, Down after 1 s)",
    )
    .await;
}
