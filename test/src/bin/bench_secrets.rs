//! `make bench-secrets`: 3 coordinator processes with mTLS on this machine.
//! GetSecret (`SecretService.Reveal`) with valid tokens from N concurrent
//! clients: throughput, p50 and p99, for many-use tokens (counted by the
//! leader, committed in 10 ms batches) and for strict tokens (each use
//! committed through Raft before the answer); then CreateSecret committed
//! through Raft, one at a time and concurrently. Prints Markdown tables for
//! docs/benchmarks.md.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use cloudless_proto::v1 as pb;
use cloudless_test::{channel, start_process_cluster, wait_all_healthy, workload};
use hdrhistogram::Histogram;
use pb::secret_service_client::SecretServiceClient;
use pb::workload_service_client::WorkloadServiceClient;

#[derive(Parser, Debug)]
struct Args {
    /// Concurrent GetSecret clients.
    #[arg(long, value_delimiter = ',', default_value = "64")]
    clients: Vec<usize>,
    /// Seconds of load per level.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// gRPC connections shared by the clients.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Sequential creates measured.
    #[arg(long, default_value_t = 500)]
    creates: usize,
}

/// A secret of two values (64 and 3 bytes).
fn create(name: String) -> pb::PutSecretRequest {
    pb::PutSecretRequest {
        write: None,
        namespace: "bench".into(),
        name,
        data: HashMap::from([
            ("PASSWORD".to_owned(), vec![b'x'; 64]),
            ("USER".to_owned(), b"app".to_vec()),
        ]),
        audiences: vec!["api".into()],
        immutable: false,
        ttl_seconds: 0,
    }
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

fn hist() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

async fn token(
    client: &mut SecretServiceClient<tonic::transport::Channel>,
    uses: u32,
) -> anyhow::Result<String> {
    Ok(client
        .issue_token(pb::IssueTokenRequest {
            namespace: "bench".into(),
            name: "db".into(),
            audience: "api".into(),
            ttl_seconds: 3600,
            max_uses: uses,
        })
        .await?
        .into_inner()
        .token)
}

/// Reveals for `seconds` from `n` clients; each client gets a token from
/// `mint` (called again when a strict token is used up).
async fn load(
    target: &str,
    n: usize,
    connections: usize,
    seconds: u64,
    uses: u32,
) -> anyhow::Result<(f64, Histogram<u64>, u64)> {
    let channels: Vec<_> = (0..connections).map(|_| channel(target)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let all = Arc::new(Mutex::new(hist()));
    let mut tasks = Vec::new();
    for c in 0..n {
        let mut client = SecretServiceClient::new(channels[c % channels.len()].clone());
        let (stop, done, errors, all) = (stop.clone(), done.clone(), errors.clone(), all.clone());
        tasks.push(tokio::spawn(async move {
            let mut local = hist();
            let mut left = 0u32;
            let mut tok = String::new();
            while !stop.load(Ordering::Relaxed) {
                if left == 0 {
                    match token(&mut client, uses).await {
                        Ok(t) => {
                            tok = t;
                            left = uses;
                        }
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                    }
                }
                let t = Instant::now();
                let r = client
                    .reveal(pb::RevealSecretRequest { token: tok.clone() })
                    .await;
                match r {
                    Ok(v) if v.get_ref().data.contains_key("PASSWORD") => {
                        local.saturating_record(t.elapsed().as_micros() as u64);
                        done.fetch_add(1, Ordering::Relaxed);
                        left -= 1;
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        left = 0;
                    }
                }
            }
            all.lock().expect("histogram").add(&local).expect("merge");
        }));
    }
    // Warm up, then measure a window.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let start_count = done.load(Ordering::Relaxed);
    all.lock().expect("histogram").reset();
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let count = done.load(Ordering::Relaxed) - start_count;
    let rate = count as f64 / started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let h = all.lock().expect("histogram").clone();
    Ok((rate, h, errors.load(Ordering::Relaxed)))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let (nodes, _extra) = start_process_cluster(dir.path(), true).await?;
    let l = wait_all_healthy(&nodes).await?;
    let target = nodes[l].grpc.clone();
    let mut admin = SecretServiceClient::new(channel(&target));
    admin.create(create("db".into())).await?;

    println!(
        "GetSecret (Reveal) over mTLS, {} s per row (admin callers, one token per client):\n",
        args.seconds
    );
    println!("| tokens | clients | GetSecret/s | p50 ms | p99 ms | errors |");
    println!("|---|---:|---:|---:|---:|---:|");
    for &n in &args.clients {
        for (label, uses) in [
            ("many-use (1,000,000; ledger)", 1_000_000u32),
            ("strict (16 uses; Raft per use)", 16),
        ] {
            let (rate, h, errors) = load(&target, n, args.connections, args.seconds, uses).await?;
            println!(
                "| {label} | {n} | {rate:.0} | {:.2} | {:.2} | {errors} |",
                ms(&h, 0.5),
                ms(&h, 0.99)
            );
        }
    }

    println!("\nCreateSecret committed through Raft (new secret each):\n");
    println!("| clients | creates | creates/s | p50 ms | p99 ms |");
    println!("|---:|---:|---:|---:|---:|");
    let mut h = hist();
    let started = Instant::now();
    for i in 0..args.creates {
        let t = Instant::now();
        admin.create(create(format!("seq-{i}"))).await?;
        h.saturating_record(t.elapsed().as_micros() as u64);
    }
    println!(
        "| 1 | {} | {:.0} | {:.2} | {:.2} |",
        args.creates,
        args.creates as f64 / started.elapsed().as_secs_f64(),
        ms(&h, 0.5),
        ms(&h, 0.99)
    );
    // Baseline in the same run: the smallest committed write through the
    // same API stack (a workload apply), one at a time.
    let mut workloads = WorkloadServiceClient::new(channel(&target));
    let mut base = hist();
    for i in 0..args.creates {
        let t = Instant::now();
        workloads
            .apply(pb::ApplyWorkloadRequest {
                write: None,
                workload: Some(workload(&format!("base-{i}"), 1)),
            })
            .await?;
        base.saturating_record(t.elapsed().as_micros() as u64);
    }
    println!(
        "| 1 (baseline: workload apply, same run) | {} | - | {:.2} | {:.2} |",
        args.creates,
        ms(&base, 0.5),
        ms(&base, 0.99)
    );
    let all = Arc::new(Mutex::new(hist()));
    let started = Instant::now();
    let per = args.creates / 16;
    let mut tasks = Vec::new();
    for c in 0..16 {
        let mut client = SecretServiceClient::new(channel(&target));
        let all = all.clone();
        tasks.push(tokio::spawn(async move {
            let mut local = hist();
            for i in 0..per {
                let t = Instant::now();
                if client.create(create(format!("par-{c}-{i}"))).await.is_ok() {
                    local.saturating_record(t.elapsed().as_micros() as u64);
                }
            }
            all.lock().expect("histogram").add(&local).expect("merge");
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let h = all.lock().expect("histogram").clone();
    println!(
        "| 16 | {} | {:.0} | {:.2} | {:.2} |",
        h.len(),
        h.len() as f64 / started.elapsed().as_secs_f64(),
        ms(&h, 0.5),
        ms(&h, 0.99)
    );
    drop(nodes);
    Ok(())
}
