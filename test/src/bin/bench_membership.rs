//! `make bench-membership`: simulated agents (each with its own node
//! certificate and mTLS connection, many per process, using the agent
//! library's client) heartbeating every second against 3 coordinator
//! processes. Reports heartbeat latency and leader CPU at each agent count,
//! join convergence (token presented to Ready on every coordinator), and
//! failure detection (heartbeats stopped to Down). Prints Markdown tables.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use cloudless_agent::{enroll, Coordinators, DeviceProbe, NodeIdentity};
use cloudless_proto::v1 as pb;
use cloudless_test::{channel, start_process_cluster, wait_all_healthy};
use hdrhistogram::Histogram;
use pb::node_service_client::NodeServiceClient;
use pb::workload_service_client::WorkloadServiceClient;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
struct Args {
    /// Agent counts, in increasing order.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000,10000")]
    agents: Vec<usize>,
    /// Seconds measured at each count.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Joins timed for convergence.
    #[arg(long, default_value_t = 30)]
    joins: usize,
    /// Agents stopped for failure detection.
    #[arg(long, default_value_t = 20)]
    trials: usize,
    /// Seconds between starting the new agents and measuring.
    #[arg(long, default_value_t = 15)]
    warmup: u64,
    /// Concurrent enrollments while populating.
    #[arg(long, default_value_t = 32)]
    enroll_concurrency: usize,
    /// Seconds of each window of the hostile-node comparison (quiet, one
    /// node flooding at its rate limits, one node as fast as it can) at the
    /// last agent count; 0 skips it.
    #[arg(long, default_value_t = 20)]
    hostile_seconds: u64,
    /// Rounds of those windows, interleaved so that the machine's drift
    /// falls on every condition alike.
    #[arg(long, default_value_t = 3)]
    hostile_rounds: usize,
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// User+system CPU seconds of process `pid` so far.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which is in parentheses).
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of /proc/pid/stat: 12 and 13 here.
    (ticks(11) + ticks(12)) / 100.0
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

struct Sim {
    node_id: String,
    cancel: CancellationToken,
}

struct Shared {
    addresses: Vec<String>,
    ca_pem: String,
    hist: Mutex<Histogram<u64>>,
    beats: AtomicU64,
    errors: AtomicU64,
}

/// Runs one simulated agent's heartbeat loop until `cancel`, the first
/// heartbeat after `offset`.
fn start_agent(
    shared: Arc<Shared>,
    identity: NodeIdentity,
    cancel: CancellationToken,
    offset: Duration,
) {
    tokio::spawn(async move {
        let mut c = Coordinators::new(shared.addresses.clone(), identity);
        let req = DeviceProbe::default().heartbeat();
        let mut next = tokio::time::Instant::now() + offset;
        let mut interval = Duration::from_secs(1);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep_until(next) => {}
            }
            let t0 = Instant::now();
            match c.heartbeat(req.clone()).await {
                Ok(r) => {
                    let us = t0.elapsed().as_micros() as u64;
                    if let Ok(mut h) = shared.hist.lock() {
                        let _ = h.record(us.max(1));
                    }
                    shared.beats.fetch_add(1, Ordering::Relaxed);
                    if r.heartbeat_interval_ms > 0 {
                        interval = Duration::from_millis(r.heartbeat_interval_ms);
                    }
                }
                Err(_) => {
                    shared.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            next += interval;
        }
    });
}

fn rand_offset(max_ms: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(max_ms);
    h.finish() % max_ms
}

async fn new_token(addr: &str, uses: u32) -> anyhow::Result<String> {
    Ok(NodeServiceClient::new(channel(addr))
        .create_join_token(pb::CreateJoinTokenRequest {
            write: None,
            ttl_seconds: 3 * 3600,
            max_uses: uses,
            labels: [("zone".to_owned(), "bench".to_owned())].into(),
        })
        .await?
        .into_inner()
        .token)
}

/// Room for every simulated node's replica subnet: a /28 each from
/// 10.0.0.0/12 (65,536 nodes; the default /24s of 10.244.0.0/16 hold 256).
async fn widen_node_subnets(addr: &str) -> anyhow::Result<()> {
    let mut c = pb::cluster_service_client::ClusterServiceClient::new(channel(addr));
    let cfg = c
        .get_config(pb::GetConfigRequest { read: None })
        .await?
        .into_inner()
        .config
        .ok_or_else(|| anyhow::anyhow!("no cluster configuration"))?;
    let network = pb::NetworkConfig {
        cluster_cidr: "10.0.0.0/12".into(),
        node_prefix_len: 28,
        ..cfg.network.clone().unwrap_or_default()
    };
    c.set_config(pb::SetConfigRequest {
        write: None,
        config: Some(pb::ClusterConfig {
            network: Some(network),
            ..cfg
        }),
        expected_revision: 0,
    })
    .await?;
    Ok(())
}

/// The committed phase of `id` on coordinator `addr` (local, stale read).
async fn phase_on(addr: &str, id: &str) -> Option<i32> {
    NodeServiceClient::new(channel(addr))
        .get(pb::GetNodeRequest {
            read: Some(pb::ReadOptions {
                consistency: pb::ReadConsistency::Stale as i32,
            }),
            id: id.to_owned(),
        })
        .await
        .ok()
        .and_then(|r| r.into_inner().node)
        .map(|n| n.phase)
}

/// Enrolls `n` agents with names `prefix-i`, `concurrency` at a time.
async fn enroll_many(
    shared: &Arc<Shared>,
    token: &str,
    prefix: &str,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<Vec<NodeIdentity>> {
    let mut out = Vec::with_capacity(n);
    let mut set = tokio::task::JoinSet::new();
    let mut next = 0;
    while out.len() < n {
        while set.len() < concurrency && next < n {
            let (s, t, name) = (shared.clone(), token.to_owned(), format!("{prefix}-{next}"));
            set.spawn(async move { enroll(&s.addresses, &s.ca_pem, &t, &name).await });
            next += 1;
        }
        if let Some(r) = set.join_next().await {
            out.push(r??);
        }
    }
    Ok(out)
}

/// Sequential admin writes through the leader for `secs`; their latencies.
async fn admin_writes(
    client: &mut WorkloadServiceClient<tonic::transport::Channel>,
    tag: &str,
    secs: u64,
) -> anyhow::Result<Histogram<u64>> {
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let end = Instant::now() + Duration::from_secs(secs);
    let mut i = 0;
    while Instant::now() < end {
        let t0 = Instant::now();
        // A few workloads changed over and over: the state stays the same
        // size from window to window, so later windows pay no more.
        let mut w = cloudless_test::workload(&format!("admin-{}", i % 8), 0);
        if let Some(spec) = w.spec.as_mut() {
            spec.env.insert("CHANGE".into(), format!("{tag}-{i}"));
        }
        client
            .apply(pb::ApplyWorkloadRequest {
                write: None,
                workload: Some(w),
            })
            .await?;
        h.record(t0.elapsed().as_micros() as u64)?;
        i += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(h)
}

/// A node's write limits (the coordinator defaults `limits.node_writes_per_s`
/// and `limits.node_write_bytes_per_s`).
#[derive(Clone, Copy)]
struct Limits {
    requests_per_s: f64,
    bytes_per_s: f64,
}

/// One enrolled node sending maximal status reports, certificate renewals
/// and heartbeats whose status changes every beat, 16 callers at once, on
/// threads of its own: paced to use all of its write `limits` (reports as
/// many bytes per second as it may send, renewals and heartbeats the rest of
/// its requests per second), or as fast as it can (`None`).
fn flood(
    shared: &Arc<Shared>,
    cert: String,
    key: String,
    stop: CancellationToken,
    limits: Option<Limits>,
) -> anyhow::Result<(tokio::runtime::Runtime, Arc<AtomicU64>)> {
    const CALLERS: u32 = 16;
    // Callers f % 3 == 0 send reports, the others renewals and heartbeats.
    let reporters = f64::from((0..CALLERS).filter(|f| f % 3 == 0).count() as u32);
    let others = f64::from(CALLERS) - reporters;
    use pb::agent_service_client::AgentServiceClient;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("hostile")
        .enable_all()
        .build()?;
    let sent = Arc::new(AtomicU64::new(0));
    let report = pb::ReportStatusRequest {
        replicas: (0..500)
            .map(|i| pb::ReplicaStatus {
                replica_id: format!("{i:0>256}"),
                state: pb::ReplicaState::Running.into(),
                message: "m".repeat(1000),
                ..Default::default()
            })
            .collect(),
        events: Vec::new(),
    };
    let report_bytes = prost::Message::encoded_len(&report) as f64;
    let (report_pause, other_pause) = match limits {
        Some(l) => {
            let reports_per_s = l.bytes_per_s / report_bytes;
            let rest = (l.requests_per_s - reports_per_s).max(0.1);
            (
                Some(Duration::from_secs_f64(reporters / reports_per_s)),
                Some(Duration::from_secs_f64(others / rest)),
            )
        }
        None => (None, None),
    };
    let (csr, _) = cloudless_pki::new_anonymous_csr()?;
    for f in 0..CALLERS as usize {
        let pause = if f % 3 == 0 {
            report_pause
        } else {
            other_pause
        };
        let (addr, ca) = (
            shared.addresses[f % shared.addresses.len()].clone(),
            shared.ca_pem.clone(),
        );
        let (cert, key, stop, sent) = (cert.clone(), key.clone(), stop.clone(), sent.clone());
        let (report, csr) = (report.clone(), csr.clone());
        rt.spawn(async move {
            let Ok(address) = cloudless_client::HostPort::parse(&addr) else {
                return;
            };
            let tls = cloudless_client::ClientTls::new(ca, cert, zeroize::Zeroizing::new(key))
                .config_for(&address);
            // No call timeout: the flood measures how the coordinator copes.
            let options = cloudless_client::ChannelOptions {
                call_timeout: None,
                ..Default::default()
            };
            let Ok(ch) = cloudless_client::channel(&address, Some(tls), &options) else {
                return;
            };
            let mut client = AgentServiceClient::new(ch);
            let mut beat = DeviceProbe::default().heartbeat();
            let mut k = 0u64;
            while !stop.is_cancelled() {
                k += 1;
                let _refused = match f % 3 {
                    0 => client.report_status(report.clone()).await.map(|_| ()),
                    1 => client
                        .renew(pb::RenewRequest {
                            csr_pem: csr.clone(),
                        })
                        .await
                        .map(|_| ()),
                    _ => {
                        beat.labels.insert("flap".into(), k.to_string());
                        client.heartbeat(beat.clone()).await.map(|_| ())
                    }
                };
                sent.fetch_add(1, Ordering::Relaxed);
                if let Some(p) = pause {
                    tokio::time::sleep(p).await;
                }
            }
        });
    }
    Ok((rt, sent))
}

/// Heartbeat p99 of the other agents and admin write p99, quiet and with one
/// hostile node flooding, in the same run: `rounds` rounds of the three
/// windows, each `secs` long, each condition's samples pooled over the rounds.
async fn hostile(
    shared: &Arc<Shared>,
    leader: &str,
    agents: usize,
    secs: u64,
    rounds: usize,
) -> anyhow::Result<()> {
    let token = new_token(leader, 1).await?;
    let (csr, key) = cloudless_pki::new_anonymous_csr()?;
    let enrolled = NodeServiceClient::new(channel(leader))
        .enroll(pb::EnrollRequest {
            join_token: token,
            csr_pem: csr,
            name: "hostile".into(),
        })
        .await?
        .into_inner();
    // One connection, as a client that stays open would use: the figure is
    // the write's latency, not a TLS handshake's.
    let mut admin = WorkloadServiceClient::new(channel(leader));
    let at_limit = Some(Limits {
        requests_per_s: 20.0,
        bytes_per_s: 65536.0,
    });
    let conditions = [
        ("quiet", None),
        (
            "one node at its rate limits (20 req/s, 64 KiB/s)",
            Some(at_limit),
        ),
        ("one node as fast as it can", Some(None)),
    ];
    let new_hist = || Histogram::<u64>::new_with_bounds(1, 60_000_000, 3);
    let mut pooled = Vec::new();
    for _ in &conditions {
        pooled.push((new_hist()?, new_hist()?, 0u64));
    }
    let mut per_round = Vec::new();
    for round in 0..rounds {
        for (c, (what, flooding)) in conditions.iter().enumerate() {
            let stop = CancellationToken::new();
            let flooder = match flooding {
                Some(limits) => Some(flood(
                    shared,
                    enrolled.certificate_pem.clone(),
                    key.to_string(),
                    stop.clone(),
                    *limits,
                )?),
                None => None,
            };
            tokio::time::sleep(Duration::from_secs(2)).await;
            if let Ok(mut h) = shared.hist.lock() {
                h.reset();
            }
            let writes = admin_writes(&mut admin, &format!("h{round}-{c}"), secs).await?;
            stop.cancel();
            let beats = shared
                .hist
                .lock()
                .map(|h| h.clone())
                .unwrap_or_else(|e| e.into_inner().clone());
            let sent = flooder.map_or(0, |(rt, sent)| {
                rt.shutdown_background();
                sent.load(Ordering::Relaxed)
            });
            per_round.push((round + 1, *what, ms(&beats, 0.99), ms(&writes, 0.99)));
            let p = &mut pooled[c];
            p.0.add(&beats)?;
            p.1.add(&writes)?;
            p.2 += sent;
            // Let the flood's last requests drain before the next window.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    println!();
    println!(
        "| {agents} agents, round, {secs} s windows | heartbeat p99 ms | admin write p99 ms |"
    );
    println!("|---|---:|---:|");
    for (round, what, hb, aw) in &per_round {
        println!("| {round}: {what} | {hb:.2} | {aw:.2} |");
    }
    println!();
    println!("| {agents} agents, {rounds} x {secs} s pooled | heartbeat p50 ms | heartbeat p99 ms | admin write p50 ms | admin write p99 ms | admin writes | hostile requests |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for ((what, _), (hb, aw, sent)) in conditions.iter().zip(&pooled) {
        println!(
            "| {what} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {sent} |",
            ms(hb, 0.5),
            ms(hb, 0.99),
            ms(aw, 0.5),
            ms(aw, 0.99),
            aw.len()
        );
    }
    let q = &pooled[0];
    for ((what, _), f) in conditions.iter().zip(&pooled).skip(1) {
        println!(
            "| ratio {what} / quiet | {:.2} | {:.2} | {:.2} | {:.2} | | |",
            ms(&f.0, 0.5) / ms(&q.0, 0.5).max(0.001),
            ms(&f.0, 0.99) / ms(&q.0, 0.99).max(0.001),
            ms(&f.1, 0.5) / ms(&q.1, 0.5).max(0.001),
            ms(&f.1, 0.99) / ms(&q.1, 0.99).max(0.001),
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let (nodes, _extra) = start_process_cluster(dir.path(), true).await?;
    let l = wait_all_healthy(&nodes).await?;
    let leader_pid = nodes[l].child.as_ref().map_or(0, std::process::Child::id);
    let leader_addr = nodes[l].grpc.clone();
    widen_node_subnets(&leader_addr).await?;
    // The leader first, so enrollments need no forwarding hop.
    let mut addresses = vec![leader_addr.clone()];
    addresses.extend(
        nodes
            .iter()
            .map(|n| n.grpc.clone())
            .filter(|a| *a != leader_addr),
    );
    let shared = Arc::new(Shared {
        addresses: addresses.clone(),
        ca_pem: std::fs::read_to_string(nodes[0].data_dir.join("admin/ca.crt"))?,
        hist: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3)?),
        beats: AtomicU64::new(0),
        errors: AtomicU64::new(0),
    });
    let self_pid = std::process::id();
    let mut sims: Vec<Sim> = Vec::new();

    println!("| agents | heartbeats/s | p50 ms | p99 ms | max ms | errors | leader CPU (cores) | leader RSS MiB | bench process CPU (cores) | enrollments/s |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &target in &args.agents {
        let add = target.saturating_sub(sims.len());
        let token = new_token(&leader_addr, u32::try_from(add.max(1))?).await?;
        let t0 = Instant::now();
        let ids = enroll_many(
            &shared,
            &token,
            &format!("sim{target}"),
            add,
            args.enroll_concurrency,
        )
        .await?;
        let enroll_rate = add as f64 / t0.elapsed().as_secs_f64();
        for id in ids {
            let cancel = CancellationToken::new();
            sims.push(Sim {
                node_id: id.node_id.clone(),
                cancel: cancel.clone(),
            });
            start_agent(
                shared.clone(),
                id,
                cancel,
                Duration::from_millis(rand_offset(1000)),
            );
        }
        // Warm up: every agent connected, heartbeating and Ready.
        tokio::time::sleep(Duration::from_secs(args.warmup)).await;
        if let Ok(mut h) = shared.hist.lock() {
            h.reset();
        }
        shared.errors.store(0, Ordering::Relaxed);
        let beats0 = shared.beats.load(Ordering::Relaxed);
        let (cpu0, self0, w0) = (
            cpu_seconds(leader_pid),
            cpu_seconds(self_pid),
            Instant::now(),
        );
        tokio::time::sleep(Duration::from_secs(args.seconds)).await;
        let wall = w0.elapsed().as_secs_f64();
        let leader_cpu = (cpu_seconds(leader_pid) - cpu0) / wall;
        let self_cpu = (cpu_seconds(self_pid) - self0) / wall;
        let beats = shared.beats.load(Ordering::Relaxed) - beats0;
        let h = shared
            .hist
            .lock()
            .map(|h| h.clone())
            .unwrap_or_else(|e| e.into_inner().clone());
        println!(
            "| {target} | {:.0} | {:.2} | {:.2} | {:.1} | {} | {leader_cpu:.2} | {:.0} | {self_cpu:.2} | {enroll_rate:.0} |",
            beats as f64 / wall,
            ms(&h, 0.5),
            ms(&h, 0.99),
            h.max() as f64 / 1000.0,
            shared.errors.load(Ordering::Relaxed),
            rss_mib(leader_pid),
        );
    }

    if args.hostile_seconds > 0 {
        hostile(
            &shared,
            &leader_addr,
            sims.len(),
            args.hostile_seconds,
            args.hostile_rounds.max(1),
        )
        .await?;
    }

    // Join convergence under the full load: token presented to Ready on every coordinator.
    let token = new_token(&leader_addr, u32::try_from(args.joins.max(1))?).await?;
    let all: Vec<String> = nodes.iter().map(|n| n.grpc.clone()).collect();
    let mut join = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for j in 0..args.joins {
        let t0 = Instant::now();
        let id = enroll(&addresses, &shared.ca_pem, &token, &format!("join-{j}")).await?;
        let node_id = id.node_id.clone();
        let cancel = CancellationToken::new();
        start_agent(shared.clone(), id, cancel.clone(), Duration::ZERO);
        sims.push(Sim {
            node_id: node_id.clone(),
            cancel,
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        'wait: loop {
            let mut ready = true;
            for a in &all {
                if phase_on(a, &node_id).await != Some(pb::NodePhase::Ready as i32) {
                    ready = false;
                    break;
                }
            }
            if ready {
                break 'wait;
            }
            anyhow::ensure!(Instant::now() < deadline, "join {j} not Ready within 30 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        join.record(t0.elapsed().as_micros() as u64)?;
    }
    println!();
    println!(
        "| join convergence at {} agents, {} joins | p50 ms | p95 ms | max ms |",
        sims.len() - args.joins,
        args.joins
    );
    println!("|---|---:|---:|---:|");
    println!(
        "| token presented to Ready on all 3 coordinators | {:.0} | {:.0} | {:.0} |",
        ms(&join, 0.5),
        ms(&join, 0.95),
        join.max() as f64 / 1000.0
    );

    // Failure detection: stop agents 250 ms apart; time each until Down on the leader.
    let mut set = tokio::task::JoinSet::new();
    for (k, sim) in sims.iter().take(args.trials).enumerate() {
        let (cancel, id, addr) = (sim.cancel.clone(), sim.node_id.clone(), leader_addr.clone());
        set.spawn(async move {
            tokio::time::sleep(Duration::from_millis(250 * k as u64)).await;
            cancel.cancel();
            let t0 = Instant::now();
            loop {
                if phase_on(&addr, &id).await == Some(pb::NodePhase::Down as i32) {
                    return Some(t0.elapsed());
                }
                if t0.elapsed() > Duration::from_secs(60) {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
    }
    let mut detect = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3)?;
    let mut missed = 0;
    while let Some(r) = set.join_next().await {
        match r? {
            Some(d) => detect.record(d.as_micros() as u64)?,
            None => missed += 1,
        }
    }
    println!();
    println!(
        "| failure detection, {} trials (default timings: heartbeat 1 s, Down after 5 s) | p50 ms | p95 ms | max ms | not detected |",
        args.trials
    );
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| heartbeats stopped to Down on the leader | {:.0} | {:.0} | {:.0} | {missed} |",
        ms(&detect, 0.5),
        ms(&detect, 0.95),
        detect.max() as f64 / 1000.0
    );
    for s in &sims {
        s.cancel.cancel();
    }
    drop(nodes);
    Ok(())
}
