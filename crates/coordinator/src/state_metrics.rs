//! Metrics read from the committed state and the data directory at each
//! scrape (docs/metrics.md): workloads, replicas by state, each workload's
//! desired, ready and updated replicas and template, each node's
//! reliability, capacity and requests, certificate expiry of this
//! coordinator and of every node, and the Raft files' sizes and the disk they are on. Every
//! coordinator serves them from its own copy of the state.

use std::path::PathBuf;
use std::sync::Arc;

use cloudless_state::StateReader;
use cloudless_types::{ClosedSet, ReplicaState};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;

use crate::tls::TlsMaterial;

/// See the module documentation.
pub(crate) struct StateCollector {
    pub reader: StateReader,
    pub data_dir: PathBuf,
    pub node_id: u64,
    pub tls: Option<Arc<TlsMaterial>>,
}

impl std::fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateCollector")
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

/// Bytes of the files directly in `dir` (0 when it cannot be read).
fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir).map_or(0, |d| {
        d.flatten()
            .filter_map(|e| e.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .sum()
    })
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    value: f64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(value);
    g.encode(encoder.encode_descriptor(name, help, unit.as_ref(), g.metric_type())?)
}

/// Each node's reliability, the capacity placement trusts, and what its
/// replicas request (`requested`: CPU millicores and memory bytes by node
/// id), labelled with the node's name.
fn node_gauges(
    encoder: &mut DescriptorEncoder,
    nodes: &[cloudless_types::NodeRecord],
    requested: &std::collections::HashMap<&str, (u64, u64)>,
) -> Result<(), std::fmt::Error> {
    type Value = fn(&cloudless_types::NodeRecord, (u64, u64)) -> f64;
    let families: [(&str, &str, Option<Unit>, Value); 5] = [
        (
            "cloudless_node_reliability",
            "Each node's reliability score, 0 to 1, from its uptime and times it went Down",
            None,
            |n, _| n.reliability,
        ),
        (
            "cloudless_node_capacity_cpu_cores",
            "CPU each node offers to replicas, as placement trusts it",
            None,
            |n, _| n.trusted_capacity.cpu_millis as f64 / 1000.0,
        ),
        (
            "cloudless_node_capacity_memory",
            "Memory each node offers to replicas, as placement trusts it",
            Some(Unit::Bytes),
            |n, _| n.trusted_capacity.memory_bytes as f64,
        ),
        (
            "cloudless_node_requested_cpu_cores",
            "CPU the replicas assigned to each node request",
            None,
            |_, r| r.0 as f64 / 1000.0,
        ),
        (
            "cloudless_node_requested_memory",
            "Memory the replicas assigned to each node request",
            Some(Unit::Bytes),
            |_, r| r.1 as f64,
        ),
    ];
    for (name, help, unit, value) in families {
        let mut m = encoder.encode_descriptor(
            name,
            help,
            unit.as_ref(),
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for n in nodes {
            let r = requested.get(n.id.as_str()).copied().unwrap_or_default();
            ConstGauge::new(value(n, r)).encode(m.encode_family(&[("node", n.name.as_str())])?)?;
        }
    }
    Ok(())
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // The state cannot be read (a storage fault): the scrape still
        // serves everything else, and the log says why.
        let read = || -> Result<_, cloudless_state::StateError> {
            Ok((
                self.reader.workloads(None)?,
                self.reader.replicas()?,
                self.reader.nodes()?,
            ))
        };
        match read() {
            Ok((workloads, replicas, nodes)) => {
                gauge(
                    &mut encoder,
                    "cloudless_workloads",
                    "Workloads in the cluster",
                    None,
                    workloads.len() as f64,
                )?;
                let mut by_state = [0u64; ReplicaState::NAMES.len()];
                let mut unknown = 0u64;
                let mut ready = std::collections::HashMap::<(&str, &str), u64>::new();
                let mut on_template = std::collections::HashMap::<(&str, &str, u64), u64>::new();
                // What the replicas assigned to each node request (as the
                // scheduler counts them: every replica record on it).
                let mut requested = std::collections::HashMap::<&str, (u64, u64)>::new();
                for r in &replicas {
                    let req = requested.entry(r.node_id.as_str()).or_default();
                    req.0 += r.spec.requests.cpu_millis;
                    req.1 += r.spec.requests.memory_bytes;
                    // On a Down node and kept for `lostAfterSeconds`: the
                    // API shows it Unknown, and it serves nobody.
                    if r.disconnected_at_ms > 0 {
                        unknown += 1;
                        continue;
                    }
                    *on_template
                        .entry((&r.namespace, &r.workload, r.template))
                        .or_default() += 1;
                    if let Some(i) = ReplicaState::NAMES.iter().position(|(_, s)| *s == r.state) {
                        by_state[i] += 1;
                    }
                    if r.state == ReplicaState::Ready {
                        *ready.entry((&r.namespace, &r.workload)).or_default() += 1;
                    }
                }
                {
                    let mut m = encoder.encode_descriptor(
                        "cloudless_replicas",
                        "Replicas in the cluster by state",
                        None,
                        prometheus_client::metrics::MetricType::Gauge,
                    )?;
                    for ((state, _), n) in ReplicaState::NAMES.iter().zip(by_state) {
                        let labels = [("state", *state)];
                        ConstGauge::new(n as f64).encode(m.encode_family(&labels)?)?;
                    }
                    ConstGauge::new(unknown as f64)
                        .encode(m.encode_family(&[("state", "Unknown")])?)?;
                }
                // Each workload's gauges: desired, Ready and updated
                // replicas, and its current template.
                type PerWorkload<'a> = Box<dyn Fn(&cloudless_types::Workload) -> u64 + 'a>;
                let families: [(&str, &str, PerWorkload); 4] = [
                    (
                        "cloudless_workload_replicas_desired",
                        "Replicas each workload asks for",
                        Box::new(|w| u64::from(w.spec.replicas)),
                    ),
                    (
                        "cloudless_workload_replicas_ready",
                        "Each workload's replicas that are Ready",
                        Box::new(|w| {
                            ready
                                .get(&(w.namespace.as_str(), w.name.as_str()))
                                .copied()
                                .unwrap_or(0)
                        }),
                    ),
                    (
                        "cloudless_workload_template",
                        "Each workload's current template (its spec's generation: a rollout starts at each change)",
                        Box::new(|w| w.template),
                    ),
                    (
                        "cloudless_workload_replicas_updated",
                        "Each workload's replicas that run its current template (a rollout is done when they are all its replicas and Ready)",
                        Box::new(|w| {
                            on_template
                                .get(&(w.namespace.as_str(), w.name.as_str(), w.template))
                                .copied()
                                .unwrap_or(0)
                        }),
                    ),
                ];
                for (name, help, value) in families {
                    let mut m = encoder.encode_descriptor(
                        name,
                        help,
                        None,
                        prometheus_client::metrics::MetricType::Gauge,
                    )?;
                    for w in &workloads {
                        let labels = [
                            ("namespace", w.namespace.as_str()),
                            ("workload", w.name.as_str()),
                        ];
                        ConstGauge::new(value(w) as f64).encode(m.encode_family(&labels)?)?;
                    }
                }
                node_gauges(&mut encoder, &nodes, &requested)?;
                let mut m = encoder.encode_descriptor(
                    "cloudless_certificate_expiry_timestamp",
                    "When a certificate expires (kind: coordinator or node; subject: its id or node name)",
                    Some(&Unit::Seconds),
                    prometheus_client::metrics::MetricType::Gauge,
                )?;
                if let Some(tls) = &self.tls {
                    let subject = self.node_id.to_string();
                    let labels = [("kind", "coordinator"), ("subject", subject.as_str())];
                    ConstGauge::new(tls.not_after() as f64).encode(m.encode_family(&labels)?)?;
                }
                for n in &nodes {
                    let labels = [("kind", "node"), ("subject", n.name.as_str())];
                    ConstGauge::new(n.cert_not_after_ms as f64 / 1000.0)
                        .encode(m.encode_family(&labels)?)?;
                }
            }
            Err(e) => tracing::warn!(error = %e, "metrics: cannot read the state"),
        }
        gauge(
            &mut encoder,
            "cloudless_raft_log",
            "Size of the Raft log file",
            Some(Unit::Bytes),
            std::fs::metadata(self.data_dir.join(cloudless_state::LOG_FILE)).map_or(0, |m| m.len())
                as f64,
        )?;
        gauge(
            &mut encoder,
            "cloudless_raft_snapshot",
            "Size of the snapshot files",
            Some(Unit::Bytes),
            dir_bytes(&self.data_dir.join(cloudless_state::SNAPSHOT_DIR)) as f64,
        )?;
        if let Ok(fs) = nix::sys::statvfs::statvfs(&self.data_dir) {
            let block = fs.fragment_size() as f64;
            gauge(
                &mut encoder,
                "cloudless_raft_disk_free",
                "Space left for unprivileged writers on the data directory's file system",
                Some(Unit::Bytes),
                fs.blocks_available() as f64 * block,
            )?;
            gauge(
                &mut encoder,
                "cloudless_raft_disk_total",
                "Size of the data directory's file system",
                Some(Unit::Bytes),
                fs.blocks() as f64 * block,
            )?;
        }
        Ok(())
    }
}
