//! The agent's metrics (docs/metrics.md), served with `/healthz` and
//! `/readyz` on `--metrics-addr`. Events are counted where they happen
//! (containers started and exited, image pulls, heartbeats); what the node
//! holds now (containers by state, each replica's CPU and memory from its
//! cgroup, the overlay's counters) is read at each scrape.

use std::sync::Arc;

use cloudless_proto::v1 as pb;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// Counters and gauges the agent updates as things happen.
#[derive(Debug, Clone)]
pub(crate) struct AgentMetrics {
    starts: Counter,
    restarts: Counter,
    exits: Family<ReasonLabel, Counter>,
    oom_kills: Counter,
    pulls: Family<ResultLabel, Counter>,
    pull_seconds: Histogram,
    pull_bytes: Counter,
    heartbeat_rtt: Histogram,
    connected: Gauge,
    battery_percent: Gauge,
    on_battery: Gauge,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self {
            starts: Counter::default(),
            restarts: Counter::default(),
            exits: Family::default(),
            oom_kills: Counter::default(),
            pulls: Family::default(),
            pull_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 16)),
            pull_bytes: Counter::default(),
            heartbeat_rtt: Histogram::new(exponential_buckets(0.000_5, 2.0, 16)),
            connected: Gauge::default(),
            battery_percent: Gauge::default(),
            on_battery: Gauge::default(),
        }
    }
}

/// How a container's run ended, as a label.
pub(crate) fn exit_reason(e: &cloudless_runtime::LastExit) -> &'static str {
    if e.oom_killed {
        "oom_killed"
    } else if e.liveness_failed {
        "liveness_failed"
    } else if e.code == 0 {
        "completed"
    } else {
        "error"
    }
}

impl AgentMetrics {
    /// Registers every metric in `registry`.
    pub(crate) fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        // Every reason and result is exported from the start, at 0.
        for reason in ["completed", "error", "oom_killed", "liveness_failed"] {
            let _ = m.exits.get_or_create(&ReasonLabel { reason });
        }
        for result in ["pulled", "failed"] {
            let _ = m.pulls.get_or_create(&ResultLabel { result });
        }
        let r = registry.sub_registry_with_prefix("cloudless_agent");
        r.register(
            "container_starts",
            "Container processes started (first starts and restarts)",
            m.starts.clone(),
        );
        r.register(
            "container_restarts",
            "Containers restarted by their restart policy or a failed liveness probe",
            m.restarts.clone(),
        );
        r.register(
            "container_exits",
            "Container processes that ended, by reason (completed, error, oom_killed, liveness_failed)",
            m.exits.clone(),
        );
        r.register(
            "oom_kills",
            "Containers killed by the kernel's OOM killer",
            m.oom_kills.clone(),
        );
        r.register(
            "image_pulls",
            "Image pulls, by result (pulled, failed)",
            m.pulls.clone(),
        );
        r.register_with_unit(
            "image_pull",
            "Time of an image pull that succeeded",
            Unit::Seconds,
            m.pull_seconds.clone(),
        );
        r.register_with_unit(
            "image_pull",
            "Bytes of image layers downloaded from registries (layers already on the node are not counted)",
            Unit::Bytes,
            m.pull_bytes.clone(),
        );
        r.register_with_unit(
            "heartbeat_rtt",
            "Round trip of a heartbeat to the coordinators",
            Unit::Seconds,
            m.heartbeat_rtt.clone(),
        );
        r.register(
            "connected",
            "1 while the last heartbeat reached a coordinator",
            m.connected.clone(),
        );
        r.register(
            "battery_percent",
            "Battery charge in percent, as the device reports it (0 without a battery)",
            m.battery_percent.clone(),
        );
        r.register(
            "on_battery",
            "1 while the device runs on its battery",
            m.on_battery.clone(),
        );
        m
    }

    /// A container process started.
    pub(crate) fn started(&self) {
        self.starts.inc();
    }

    /// `n` restarts, the last after `exit`.
    pub(crate) fn exited(&self, exit: &cloudless_runtime::LastExit, n: u64) {
        self.exits
            .get_or_create(&ReasonLabel {
                reason: exit_reason(exit),
            })
            .inc_by(n);
        if exit.oom_killed {
            self.oom_kills.inc_by(n);
        }
    }

    /// `n` restarts.
    pub(crate) fn restarted(&self, n: u64) {
        self.restarts.inc_by(n);
    }

    /// An image pull downloaded `bytes` more.
    pub(crate) fn pull_bytes(&self, bytes: u64) {
        self.pull_bytes.inc_by(bytes);
    }

    /// An image pull ended.
    pub(crate) fn pulled(&self, ok: bool, seconds: f64) {
        let result = if ok { "pulled" } else { "failed" };
        self.pulls.get_or_create(&ResultLabel { result }).inc();
        if ok {
            self.pull_seconds.observe(seconds);
        }
    }

    /// A heartbeat ended: reached a coordinator after `rtt`, or not.
    pub(crate) fn heartbeat(&self, rtt: Option<std::time::Duration>) {
        match rtt {
            Some(d) => {
                self.heartbeat_rtt.observe(d.as_secs_f64());
                self.connected.set(1);
            }
            None => {
                self.connected.set(0);
            }
        }
    }

    /// Whether the last heartbeat reached a coordinator.
    pub(crate) fn is_connected(&self) -> bool {
        self.connected.get() == 1
    }

    /// The device's power as the last heartbeat reported it.
    pub(crate) fn power(&self, hb: &pb::HeartbeatRequest) {
        let on_battery = hb.power_source == pb::PowerSource::Battery as i32;
        self.on_battery.set(i64::from(on_battery));
        self.battery_percent
            .set(i64::from(hb.battery_percent.min(100)));
    }
}

/// Resource use of a running container: CPU seconds and memory bytes.
pub(crate) type UsageFn = Arc<dyn Fn(&str) -> Option<crate::workloads::ReplicaUsage> + Send + Sync>;

/// What the node holds now, read at each scrape.
pub(crate) struct NodeCollector {
    /// Each replica's last status, by replica id.
    pub(crate) statuses: crate::workloads::SharedStatuses,
    /// CPU and memory of a container, from its cgroup.
    pub(crate) usage: Option<UsageFn>,
    /// The overlay endpoint, when it runs.
    pub(crate) overlay: Option<cloudless_overlay::Overlay>,
    /// When the agent last reached a coordinator.
    pub(crate) contact: crate::workloads::Contact,
    /// Probe results of every replica, from the supervisor.
    pub(crate) probes: Option<Arc<cloudless_runtime::ProbeCounts>>,
    /// The service proxy, once the node's network is up.
    pub(crate) proxy: Option<crate::workloads::SharedProxy>,
}

impl std::fmt::Debug for NodeCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCollector").finish_non_exhaustive()
    }
}

impl Collector for NodeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let statuses: Vec<(String, pb::ReplicaStatus)> = self
            .statuses
            .lock()
            .map(|s| s.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        let mut by_state = std::collections::BTreeMap::<&'static str, u64>::new();
        for name in ["Pending", "Running", "Ready", "Failed", "Succeeded"] {
            by_state.insert(name, 0);
        }
        for (_, s) in &statuses {
            let state = cloudless_proto::enums::required::<pb::ReplicaState>(
                s.state,
                &s.legacy_state,
                "state",
            )
            .map_or("Pending", |st| {
                use cloudless_types::ClosedSet as _;
                st.name()
            });
            *by_state.entry(state).or_default() += 1;
        }
        {
            let mut m = encoder.encode_descriptor(
                "cloudless_agent_containers",
                "Replicas on this node by state",
                None,
                MetricType::Gauge,
            )?;
            for (state, n) in &by_state {
                ConstGauge::new(*n as f64).encode(m.encode_family(&[("state", *state)])?)?;
            }
        }
        if let Some(usage) = &self.usage {
            let used: Vec<(String, crate::workloads::ReplicaUsage)> = statuses
                .iter()
                .filter_map(|(id, _)| {
                    usage(&crate::workloads::container_id(id)).map(|u| (id.clone(), u))
                })
                .collect();
            {
                let mut m = encoder.encode_descriptor(
                    "cloudless_agent_replica_cpu",
                    "CPU time each running replica used, from its cgroup",
                    Some(&Unit::Seconds),
                    MetricType::Counter,
                )?;
                for (id, u) in &used {
                    ConstCounter::new(u.cpu_seconds)
                        .encode(m.encode_family(&[("replica", id.as_str())])?)?;
                }
            }
            for (name, help, sent) in [
                (
                    "cloudless_agent_replica_network_receive",
                    "Bytes each running replica's network namespace received (not loopback)",
                    false,
                ),
                (
                    "cloudless_agent_replica_network_transmit",
                    "Bytes each running replica's network namespace sent (not loopback)",
                    true,
                ),
            ] {
                let mut m = encoder.encode_descriptor(
                    name,
                    help,
                    Some(&Unit::Bytes),
                    MetricType::Counter,
                )?;
                for (id, u) in &used {
                    if let Some((received, transmitted)) = u.network {
                        ConstCounter::new(if sent { transmitted } else { received })
                            .encode(m.encode_family(&[("replica", id.as_str())])?)?;
                    }
                }
            }
            let mut m = encoder.encode_descriptor(
                "cloudless_agent_replica_memory",
                "Memory each running replica uses, from its cgroup",
                Some(&Unit::Bytes),
                MetricType::Gauge,
            )?;
            for (id, u) in &used {
                ConstGauge::new(u.memory_bytes as f64)
                    .encode(m.encode_family(&[("replica", id.as_str())])?)?;
            }
        }
        if let Some(p) = &self.probes {
            use std::sync::atomic::Ordering::Relaxed;
            let mut m = encoder.encode_descriptor(
                "cloudless_agent_probe_results",
                "Liveness and readiness probes run, by probe and result (success, failure)",
                None,
                MetricType::Counter,
            )?;
            for (probe, result, n) in [
                ("liveness", "success", &p.liveness_success),
                ("liveness", "failure", &p.liveness_failure),
                ("readiness", "success", &p.readiness_success),
                ("readiness", "failure", &p.readiness_failure),
            ] {
                ConstCounter::new(n.load(Relaxed))
                    .encode(m.encode_family(&[("probe", probe), ("result", result)])?)?;
            }
        }
        let disconnected = self.contact.elapsed().as_secs_f64();
        let g = ConstGauge::new(disconnected);
        g.encode(encoder.encode_descriptor(
            "cloudless_agent_disconnected",
            "Time since the agent last reached a coordinator (under a heartbeat interval while connected)",
            Some(&Unit::Seconds),
            g.metric_type(),
        )?)?;
        if let Some(o) = &self.overlay {
            let s = o.stats();
            for (name, help, v) in [
                (
                    "cloudless_overlay_streams_opened",
                    "Overlay streams this node opened",
                    s.streams_opened,
                ),
                (
                    "cloudless_overlay_streams_served",
                    "Overlay streams this node accepted and connected to a local target",
                    s.streams_served,
                ),
                (
                    "cloudless_overlay_streams_refused",
                    "Overlay streams refused (bad request, unknown target, not allowed)",
                    s.streams_refused,
                ),
                (
                    "cloudless_overlay_connections_accepted",
                    "Overlay connections accepted after the certificate check",
                    s.connections_accepted,
                ),
            ] {
                let c = ConstCounter::new(v);
                c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
            }
            let mut m = encoder.encode_descriptor(
                "cloudless_overlay_stream",
                "Payload bytes carried by overlay streams, by direction (sent, received)",
                Some(&Unit::Bytes),
                MetricType::Counter,
            )?;
            for (direction, n) in [("sent", s.bytes_sent), ("received", s.bytes_received)] {
                ConstCounter::new(n).encode(m.encode_family(&[("direction", direction)])?)?;
            }
            let mut m = encoder.encode_descriptor(
                "cloudless_overlay_udp_datagrams",
                "UDP flows' datagrams this node sent to other nodes, by way (frame: queued as a QUIC datagram; stream: on the flow's stream, when too large for a packet or the rest of a relayed path, through a relay of an earlier release, or to a node of one; dropped: not sent, the connection's datagram queue was full, or half full and the flow above its share)",
                None,
                MetricType::Counter,
            )?;
            for (way, n) in [
                ("frame", s.datagrams_as_frames),
                ("stream", s.datagrams_on_streams),
                ("dropped", s.datagrams_queue_full),
            ] {
                ConstCounter::new(n).encode(m.encode_family(&[("way", way)])?)?;
            }
            let c = ConstCounter::new(s.datagrams_dropped);
            c.encode(encoder.encode_descriptor(
                "cloudless_overlay_udp_datagrams_dropped",
                "QUIC datagrams received for no open UDP flow of their connection or for a flow whose queue was full, dropped",
                None,
                c.metric_type(),
            )?)?;
            let mut m = encoder.encode_descriptor(
                "cloudless_overlay_traversal_attempts",
                "Attempts to reach a peer with no live connection for a stream, by method (direct, hole_punch, relay) and result (success, failure)",
                None,
                MetricType::Counter,
            )?;
            for t in &s.traversal {
                for (result, n) in [("success", t.succeeded), ("failure", t.failed)] {
                    ConstCounter::new(n)
                        .encode(m.encode_family(&[("method", t.method), ("result", result)])?)?;
                }
            }
            let g = ConstGauge::new(o.connected_peers().len() as i64);
            g.encode(encoder.encode_descriptor(
                "cloudless_overlay_connected_peers",
                "Peers with a live overlay connection",
                None,
                g.metric_type(),
            )?)?;
        }
        {
            // Zero until the node's network is up (no proxy, nothing carried).
            let stats = self
                .proxy
                .as_ref()
                .and_then(|p| p.get())
                .map(|p| p.stats())
                .unwrap_or_default();
            let pools = [
                ("vip", stats.vips),
                ("ingress", stats.ingress),
                ("ingress_udp", stats.ingress_udp),
            ];
            let mut m = encoder.encode_descriptor(
                "cloudless_agent_proxy_connections",
                "Connections the node's service proxy carries now, by listener (vip: replicas to service VIPs, UDP flows included; ingress: TCP from outside; ingress_udp: UDP flows from outside)",
                None,
                MetricType::Gauge,
            )?;
            for (listener, pool) in pools {
                ConstGauge::new(i64::try_from(pool.open).unwrap_or(i64::MAX))
                    .encode(m.encode_family(&[("listener", listener)])?)?;
            }
            let mut m = encoder.encode_descriptor(
                "cloudless_agent_proxy_closed_connections",
                "Connections the service proxy closed itself, by listener and reason (source_limit, source_rate, idle, idle_under_pressure)",
                None,
                MetricType::Counter,
            )?;
            for (listener, pool) in pools {
                for why in cloudless_network::proxy::Closed::ALL {
                    ConstCounter::new(pool.closed_for(why)).encode(
                        m.encode_family(&[("listener", listener), ("reason", why.as_str())])?,
                    )?;
                }
            }
            let m = encoder.encode_descriptor(
                "cloudless_agent_proxy_dropped_datagrams",
                "Datagrams to UDP service ports the proxy dropped because a flow's queue (256 KiB) or its own (32 MiB) was full",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(stats.dropped_datagrams).encode(m)?;
        }
        Ok(())
    }
}
