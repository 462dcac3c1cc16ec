//! Builders for scheduler tests.
#![allow(dead_code)]

use std::collections::BTreeMap;

use cloudless_scheduler::{NodeInfo, NodePhase, PowerSource, WorkloadRequest};
use cloudless_types::Resources;

pub const GIB: u64 = 1 << 30;

pub fn res(cpu: u64, mem_gib: u64) -> Resources {
    Resources {
        cpu_millis: cpu,
        memory_bytes: mem_gib * GIB,
        storage_bytes: 0,
        bandwidth_bps: 0,
        pids: 0,
    }
}

/// A Ready amd64 mains node with 4 cores and 8 GiB.
pub fn node(id: &str, zone: &str) -> NodeInfo {
    NodeInfo {
        id: id.into(),
        region: "eu".into(),
        zone: zone.into(),
        labels: BTreeMap::new(),
        taints: Vec::new(),
        phase: NodePhase::Ready,
        cordoned: false,
        draining: false,
        capacity: res(4000, 8),
        reserved: Resources::default(),
        reliability: 0.9,
        cost_per_unit: 1.0,
        power: PowerSource::Mains,
        battery_percent: 0,
        arch: "amd64".into(),
        rtt_ms: BTreeMap::new(),
        runtime_classes: Vec::new(),
        replicas: Vec::new(),
    }
}

pub fn request(workload: &str, replicas: u32, cpu: u64, mem_gib: u64) -> WorkloadRequest {
    WorkloadRequest {
        workload: workload.into(),
        requests: res(cpu, mem_gib),
        replicas,
        ..WorkloadRequest::default()
    }
}
