//! `make bench-scheduler`: clusters of 100 to 10,000 nodes with realistic
//! variety; 100,000 replicas placed workload after workload on one thread.
//! Prints time per replica decision (p50/p95/p99), placements per second, and
//! snapshot memory per node (measured by a counting allocator).
//!
//! Run pinned to one core: `taskset -c 0 target/release/bench-scheduler`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Instant;

use cloudless_scheduler::{
    AntiAffinity, ClusterSnapshot, Decision, MatchExpression, NodeInfo, NodePhase, Operator,
    PowerSource, PreferredTerm, Strategy, Taint, TaintEffect, Toleration, TolerationOperator,
    WorkloadRequest,
};
use cloudless_types::{Resources, SchedulerWeights};

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY-free wrapper: delegates to System and counts bytes.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// xorshift64*: deterministic, dependency-free.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

const REGIONS: [&str; 3] = ["eu", "us", "ap"];
const GIB: u64 = 1 << 30;

fn cluster(n: usize, rng: &mut Rng) -> Vec<NodeInfo> {
    (0..n)
        .map(|i| {
            let r = rng.below(3) as usize;
            let zone = format!("{}-{}", REGIONS[r], (b'a' + rng.below(4) as u8) as char);
            let cores = [2, 4, 8, 16, 32, 64][rng.below(6) as usize];
            let gib = cores * [2, 4, 8][rng.below(3) as usize];
            let capacity = Resources {
                cpu_millis: cores * 1000,
                memory_bytes: gib * GIB,
                storage_bytes: 200 * GIB,
                bandwidth_bps: 1_000_000_000,
                pids: 0,
            };
            let reserved = if rng.chance(30) {
                let f = 20 + rng.below(60);
                Resources {
                    cpu_millis: capacity.cpu_millis * f / 100,
                    memory_bytes: capacity.memory_bytes * f / 100,
                    ..Resources::default()
                }
            } else {
                Resources::default()
            };
            let mut labels = BTreeMap::new();
            labels.insert(
                "disk".to_owned(),
                if rng.chance(60) { "ssd" } else { "hdd" }.to_owned(),
            );
            labels.insert(
                "tier".to_owned(),
                if rng.chance(30) { "edge" } else { "core" }.to_owned(),
            );
            labels.insert("kubernetes.io/hostname".to_owned(), format!("host-{i}"));
            if rng.chance(5) {
                labels.insert("gpu".to_owned(), "a100".to_owned());
            }
            let mut taints = Vec::new();
            if rng.chance(10) {
                taints.push(Taint {
                    key: "dedicated".into(),
                    value: "db".into(),
                    effect: TaintEffect::NoSchedule,
                    added_at_ms: 0,
                });
            }
            if rng.chance(5) {
                taints.push(Taint {
                    key: "spot".into(),
                    value: String::new(),
                    effect: TaintEffect::PreferNoSchedule,
                    added_at_ms: 0,
                });
            }
            let rtt_ms = REGIONS
                .iter()
                .map(|reg| {
                    (
                        reg.to_string(),
                        if *reg == REGIONS[r] {
                            2.0
                        } else {
                            60.0 + rng.unit() * 150.0
                        },
                    )
                })
                .collect();
            NodeInfo {
                id: format!("node-{i:05}"),
                region: REGIONS[r].into(),
                zone,
                labels,
                taints,
                phase: if rng.chance(2) {
                    NodePhase::Suspect
                } else {
                    NodePhase::Ready
                },
                cordoned: rng.chance(1),
                draining: false,
                capacity,
                reserved,
                reliability: 0.5 + rng.unit() * 0.5,
                cost_per_unit: 0.5 + rng.unit() * 2.0,
                power: if rng.chance(20) {
                    PowerSource::Battery
                } else {
                    PowerSource::Mains
                },
                battery_percent: rng.below(101) as u8,
                arch: if rng.chance(15) { "arm64" } else { "amd64" }.into(),
                rtt_ms,
                runtime_classes: if rng.chance(10) {
                    vec!["runsc".into()]
                } else {
                    vec![]
                },
                replicas: Vec::new(),
            }
        })
        .collect()
}

/// A workload with realistic variety; `scale` shrinks requests so 100,000
/// replicas fit in small clusters.
fn workload(i: usize, rng: &mut Rng, scale: f64) -> WorkloadRequest {
    let replicas = [1, 1, 2, 3, 3, 5, 10][rng.below(7) as usize];
    let cpu = ((100 + rng.below(1900)) as f64 * scale).max(1.0) as u64;
    let mem = (((128 + rng.below(3968)) << 20) as f64 * scale).max(1.0) as u64;
    let mut w = WorkloadRequest {
        workload: format!("ns/w{i}"),
        requests: Resources {
            cpu_millis: cpu,
            memory_bytes: mem,
            ..Resources::default()
        },
        replicas,
        priority: rng.below(100) as i32,
        long_running: rng.chance(70),
        ..WorkloadRequest::default()
    };
    if rng.chance(30) {
        w.regions = vec![REGIONS[rng.below(3) as usize].into()];
    }
    if rng.chance(20) {
        w.node_selector.insert("disk".into(), "ssd".into());
    }
    if rng.chance(10) {
        w.tolerations.push(Toleration {
            key: "dedicated".into(),
            operator: TolerationOperator::Equal,
            value: "db".into(),
            effect: None,
            toleration_seconds: None,
        });
    }
    if rng.chance(20) {
        w.anti_affinity = AntiAffinity::Node;
    }
    if rng.chance(15) {
        w.preferred.push(PreferredTerm {
            weight: 50,
            expression: MatchExpression {
                key: "tier".into(),
                operator: Operator::In,
                values: vec!["edge".into()],
            },
        });
    }
    if rng.chance(10) {
        w.required.push(MatchExpression {
            key: "gpu".into(),
            operator: Operator::DoesNotExist,
            values: vec![],
        });
    }
    if rng.chance(10) {
        w.strategy = Strategy::Binpack;
    }
    if rng.chance(15) {
        w.arch = Some("amd64".into());
    }
    w
}

fn pct(sorted: &[u64], q: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * q) as usize] as f64 / 1000.0
}

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .nth(1)
        .map_or(vec![100, 1_000, 5_000, 10_000], |a| {
            a.split(',').filter_map(|s| s.parse().ok()).collect()
        });
    let target: usize = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    println!("| nodes | replicas placed | unplaced | placements/s | decision p50 us | p95 us | p99 us | snapshot bytes/node |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for n in sizes {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ n as u64);
        let nodes = cluster(n, &mut rng);
        let before = LIVE.load(Ordering::Relaxed);
        let mut snap =
            ClusterSnapshot::new(&nodes, SchedulerWeights::default()).expect("valid cluster");
        let per_node = (LIVE.load(Ordering::Relaxed) - before) as f64 / n as f64;
        // Leave ~40% headroom: average replica ~1 core, cluster ~20 usable cores per node.
        let scale = (n as f64 * 12.0 / target as f64).min(1.0);
        let mut times_ns: Vec<u64> = Vec::with_capacity(target);
        let (mut placed, mut unplaced, mut i) = (0usize, 0usize, 0usize);
        let started = Instant::now();
        while placed + unplaced < target {
            let w = workload(i, &mut rng, scale);
            i += 1;
            let t = Instant::now();
            let decisions = snap.place(&w, 0, false).expect("valid workload");
            let per = t.elapsed().as_nanos() as u64 / decisions.len().max(1) as u64;
            for d in &decisions {
                times_ns.push(per);
                match d {
                    Decision::Placed(_) => placed += 1,
                    Decision::Unplaced(_) => unplaced += 1,
                }
            }
        }
        let secs = started.elapsed().as_secs_f64();
        times_ns.sort_unstable();
        println!(
            "| {n} | {placed} | {unplaced} | {:.0} | {:.1} | {:.1} | {:.1} | {per_node:.0} |",
            placed as f64 / secs,
            pct(&times_ns, 0.5),
            pct(&times_ns, 0.95),
            pct(&times_ns, 0.99),
        );
        drop(nodes);
    }
}
