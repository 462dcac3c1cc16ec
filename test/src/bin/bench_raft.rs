//! `make bench-raft`: a 3-coordinator cluster of real processes on this
//! machine; N concurrent clients write small records (workload specs) through
//! the public gRPC API; then leader failover time over repeated SIGKILLs.
//! Prints a Markdown table for docs/benchmarks.md.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use cloudless_proto::v1 as pb;
use cloudless_test::{channel, cluster_status, start_process_cluster, wait_all_healthy, workload};
use hdrhistogram::Histogram;
use pb::workload_service_client::WorkloadServiceClient;

#[derive(Parser, Debug)]
struct Args {
    /// Client concurrency levels.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    clients: Vec<usize>,
    /// Seconds of load per level.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Leader kills for the failover measurement.
    #[arg(long, default_value_t = 20)]
    kills: usize,
    /// Run the coordinators with a master key: mutual TLS on every connection.
    #[arg(long)]
    tls: bool,
    /// gRPC connections shared by the clients.
    #[arg(long, default_value_t = 8)]
    connections: usize,
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let (mut nodes, extra) = start_process_cluster(dir.path(), args.tls).await?;
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let l = wait_all_healthy(&nodes).await?;

    println!("| clients | committed writes/s | p50 ms | p99 ms | writes |");
    println!("|---:|---:|---:|---:|---:|");
    for &n in &args.clients {
        let target = nodes[l].grpc.clone();
        let channels: Vec<_> = (0..args.connections).map(|_| channel(&target)).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let hist = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
            1, 60_000_000, 3,
        )?));
        let mut tasks = Vec::new();
        for c in 0..n {
            let mut client = WorkloadServiceClient::new(channels[c % channels.len()].clone());
            let (stop, done, hist) = (stop.clone(), done.clone(), hist.clone());
            tasks.push(tokio::spawn(async move {
                let mut local =
                    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let req = pb::ApplyWorkloadRequest {
                        write: None,
                        workload: Some(workload(
                            &format!("b{n}-{c}-{}", i % 64),
                            1 + (i % 5) as u32,
                        )),
                    };
                    i += 1;
                    let t = Instant::now();
                    if client.apply(req).await.is_ok() {
                        local.saturating_record(t.elapsed().as_micros() as u64);
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
                hist.lock()
                    .expect("histogram lock")
                    .add(&local)
                    .expect("same bounds");
            }));
        }
        let started = Instant::now();
        tokio::time::sleep(Duration::from_secs(args.seconds)).await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await?;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let total = done.load(Ordering::Relaxed);
        let h = hist.lock().expect("histogram lock");
        println!(
            "| {n} | {:.0} | {:.2} | {:.2} | {total} |",
            total as f64 / elapsed,
            ms(&h, 0.5),
            ms(&h, 0.99)
        );
    }

    if args.kills > 0 {
        let mut failover = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        for k in 0..args.kills {
            let l = wait_all_healthy(&nodes).await?;
            nodes[l].sigkill();
            let killed_at = Instant::now();
            let others: Vec<String> = (0..3)
                .filter(|i| *i != l)
                .map(|i| nodes[i].grpc.clone())
                .collect();
            let mut attempt = 0usize;
            let mut elected_ms = None;
            loop {
                if elected_ms.is_none() {
                    for o in &others {
                        if cluster_status(o).await.is_some_and(|s| {
                            s.coordinators.iter().any(|c| {
                                c.state() == cloudless_proto::v1::RaftServerState::Leader
                                    && c.reachable
                                    && c.address == *o
                            })
                        }) {
                            elected_ms = Some(killed_at.elapsed().as_millis());
                        }
                    }
                }
                let mut client = WorkloadServiceClient::new(channel(&others[attempt % 2]));
                attempt += 1;
                let mut req = tonic::Request::new(pb::ApplyWorkloadRequest {
                    write: None,
                    workload: Some(workload(&format!("failover-{k}"), 1)),
                });
                req.set_timeout(Duration::from_millis(300));
                if client.apply(req).await.is_ok() {
                    break;
                }
                anyhow::ensure!(
                    killed_at.elapsed() < Duration::from_secs(30),
                    "no write accepted 30 s after kill {k}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            failover.record(killed_at.elapsed().as_micros() as u64)?;
            eprintln!("kill {k}: new leader seen at {elected_ms:?} ms, first write at {} ms after {attempt} attempts", killed_at.elapsed().as_millis());
            nodes[l].spawn_with("run", None, &extra);
        }
        println!();
        println!("| leader failover (kill to first committed write), {} kills | p50 ms | p95 ms | max ms |", args.kills);
        println!("|---|---:|---:|---:|");
        println!(
            "| SIGKILL leader | {:.0} | {:.0} | {:.0} |",
            ms(&failover, 0.5),
            ms(&failover, 0.95),
            failover.max() as f64 / 1000.0
        );
    }
    Ok(())
}
