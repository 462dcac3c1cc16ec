//! Conversions between wire messages and domain types. Wire to domain checks
//! every field and names the one that is wrong.

use std::collections::BTreeMap;

use cloudless_types as t;

use crate::v1;

impl From<t::Resources> for v1::Resources {
    fn from(r: t::Resources) -> Self {
        Self {
            cpu_millis: r.cpu_millis,
            memory_bytes: r.memory_bytes,
            storage_bytes: r.storage_bytes,
            bandwidth_bps: r.bandwidth_bps,
        }
    }
}

impl From<v1::Resources> for t::Resources {
    fn from(r: v1::Resources) -> Self {
        Self {
            cpu_millis: r.cpu_millis,
            memory_bytes: r.memory_bytes,
            storage_bytes: r.storage_bytes,
            bandwidth_bps: r.bandwidth_bps,
        }
    }
}

impl From<t::WorkloadSpec> for v1::WorkloadSpec {
    fn from(s: t::WorkloadSpec) -> Self {
        Self {
            image: s.image,
            command: s.command,
            args: s.args,
            env: s.env.into_iter().collect(),
            replicas: s.replicas,
            requests: Some(s.requests.into()),
            limits: Some(s.limits.into()),
            labels: s.labels.into_iter().collect(),
            priority: s.priority,
            placement: Some(v1::Placement {
                zones: s.placement.zones,
                regions: s.placement.regions,
                node_selector: s.placement.node_selector.into_iter().collect(),
                anti_affinity: format!("{:?}", s.placement.anti_affinity),
                strategy: format!("{:?}", s.placement.strategy),
            }),
            restart_policy: format!("{:?}", s.restart_policy),
            rollout: Some(v1::Rollout {
                max_surge: s.rollout.max_surge,
                max_unavailable: s.rollout.max_unavailable,
                progress_deadline_seconds: s.rollout.progress_deadline_seconds,
                strategy: format!("{:?}", s.rollout.strategy),
            }),
            readiness_probe: s.readiness_probe.map(probe_to_wire),
            liveness_probe: s.liveness_probe.map(probe_to_wire),
        }
    }
}

fn probe_to_wire(p: t::ProbeSpec) -> v1::Probe {
    v1::Probe {
        exec: p.exec.unwrap_or_default(),
        http_path: p
            .http_get
            .as_ref()
            .map(|h| h.path.clone())
            .unwrap_or_default(),
        http_port: p.http_get.as_ref().map_or(0, |h| u32::from(h.port)),
        tcp_port: p.tcp_socket.as_ref().map_or(0, |t| u32::from(t.port)),
        initial_delay_seconds: p.initial_delay_seconds,
        period_seconds: p.period_seconds,
        timeout_seconds: p.timeout_seconds,
        failure_threshold: p.failure_threshold,
        success_threshold: p.success_threshold,
    }
}

fn probe_from_wire(p: v1::Probe, path: &str, errs: &mut t::ValidationErrors) -> t::ProbeSpec {
    let port = |v: u32, field: &str, errs: &mut t::ValidationErrors| {
        u16::try_from(v).unwrap_or_else(|_| {
            errs.push(format!("{path}.{field}"), format!("{v} is not a port"));
            0
        })
    };
    t::ProbeSpec {
        exec: (!p.exec.is_empty()).then_some(p.exec),
        http_get: (p.http_port != 0).then(|| t::HttpGet {
            path: if p.http_path.is_empty() {
                "/".into()
            } else {
                p.http_path.clone()
            },
            port: port(p.http_port, "httpPort", errs),
        }),
        tcp_socket: (p.tcp_port != 0).then(|| t::TcpSocket {
            port: port(p.tcp_port, "tcpPort", errs),
        }),
        initial_delay_seconds: p.initial_delay_seconds,
        period_seconds: p.period_seconds,
        timeout_seconds: p.timeout_seconds,
        failure_threshold: p.failure_threshold,
        success_threshold: p.success_threshold,
    }
}

/// A workload spec from the wire; enum strings and ports that do not parse
/// are reported in `errs` under `path` (and take their default).
pub fn spec_from_wire(
    s: v1::WorkloadSpec,
    path: &str,
    errs: &mut t::ValidationErrors,
) -> t::WorkloadSpec {
    let placement = s.placement.unwrap_or_default();
    let anti_affinity = match placement.anti_affinity.as_str() {
        "" | "None" => t::AntiAffinity::None,
        "Node" => t::AntiAffinity::Node,
        "Zone" => t::AntiAffinity::Zone,
        other => {
            errs.push(
                format!("{path}.placement.antiAffinity"),
                format!("{other:?} is not one of None, Node, Zone"),
            );
            t::AntiAffinity::None
        }
    };
    let strategy = match placement.strategy.as_str() {
        "" | "Auto" => t::PlacementStrategy::Auto,
        "Spread" => t::PlacementStrategy::Spread,
        "Binpack" => t::PlacementStrategy::Binpack,
        other => {
            errs.push(
                format!("{path}.placement.strategy"),
                format!("{other:?} is not one of Auto, Spread, Binpack"),
            );
            t::PlacementStrategy::Auto
        }
    };
    let restart_policy = match s.restart_policy.as_str() {
        "" | "Always" => t::RestartPolicy::Always,
        "OnFailure" => t::RestartPolicy::OnFailure,
        "Never" => t::RestartPolicy::Never,
        other => {
            errs.push(
                format!("{path}.restartPolicy"),
                format!("{other:?} is not one of Always, OnFailure, Never"),
            );
            t::RestartPolicy::Always
        }
    };
    t::WorkloadSpec {
        image: s.image,
        command: s.command,
        args: s.args,
        env: s.env.into_iter().collect(),
        replicas: s.replicas,
        requests: s.requests.map(Into::into).unwrap_or_default(),
        limits: s.limits.map(Into::into).unwrap_or_default(),
        labels: s.labels.into_iter().collect(),
        priority: s.priority,
        placement: t::Placement {
            zones: placement.zones,
            regions: placement.regions,
            node_selector: placement.node_selector.into_iter().collect(),
            anti_affinity,
            strategy,
        },
        restart_policy,
        rollout: s.rollout.map_or_else(t::Rollout::default, |r| t::Rollout {
            strategy: match r.strategy.as_str() {
                "" | "RollingUpdate" => t::RolloutStrategy::RollingUpdate,
                "Recreate" => t::RolloutStrategy::Recreate,
                "BlueGreen" => t::RolloutStrategy::BlueGreen,
                other => {
                    errs.push(
                        format!("{path}.rollout.type"),
                        format!("{other:?} is not one of RollingUpdate, Recreate, BlueGreen"),
                    );
                    t::RolloutStrategy::RollingUpdate
                }
            },
            max_surge: r.max_surge,
            max_unavailable: r.max_unavailable,
            progress_deadline_seconds: if r.progress_deadline_seconds == 0 {
                t::Rollout::default().progress_deadline_seconds
            } else {
                r.progress_deadline_seconds
            },
        }),
        readiness_probe: s
            .readiness_probe
            .map(|p| probe_from_wire(p, &format!("{path}.readinessProbe"), errs)),
        liveness_probe: s
            .liveness_probe
            .map(|p| probe_from_wire(p, &format!("{path}.livenessProbe"), errs)),
    }
}

impl From<v1::WorkloadSpec> for t::WorkloadSpec {
    /// Lenient: values that do not parse take their defaults (see
    /// [`spec_from_wire`] for the checking version).
    fn from(s: v1::WorkloadSpec) -> Self {
        spec_from_wire(s, "spec", &mut t::ValidationErrors::default())
    }
}

impl From<t::Workload> for v1::Workload {
    fn from(w: t::Workload) -> Self {
        let replicas = w.spec.replicas;
        Self {
            name: w.name,
            namespace: w.namespace,
            spec: Some(w.spec.into()),
            generation: w.generation,
            created_at_ms: w.created_at_ms,
            updated_at_ms: w.updated_at_ms,
            status: Some(v1::WorkloadStatus {
                desired_replicas: replicas,
                ..Default::default()
            }),
            template: w.template,
        }
    }
}

/// A workload from the wire, validated. An empty namespace means the default one.
pub fn workload_from_wire(w: Option<v1::Workload>) -> Result<t::Workload, t::ValidationErrors> {
    let mut errs = t::ValidationErrors::default();
    let Some(w) = w else {
        errs.push("workload", "is required");
        return Err(errs);
    };
    let Some(spec) = w.spec else {
        errs.push("workload.spec", "is required");
        return Err(errs);
    };
    let namespace = if w.namespace.is_empty() {
        t::DEFAULT_NAMESPACE.to_owned()
    } else {
        w.namespace
    };
    let spec = spec_from_wire(spec, "workload.spec", &mut errs);
    let workload = t::Workload {
        namespace,
        name: w.name,
        spec,
        generation: 0,
        created_at_ms: 0,
        updated_at_ms: 0,
        template: 0,
    };
    if let Err(e) = workload.validate() {
        errs.0.extend(e.0);
    }
    errs.into_result().map(|()| workload)
}

impl From<t::ClusterConfig> for v1::ClusterConfig {
    fn from(c: t::ClusterConfig) -> Self {
        let w = c.scheduler_weights;
        Self {
            cluster_name: c.cluster_name,
            heartbeat_interval_ms: c.heartbeat_interval_ms,
            suspect_after_missed_heartbeats: c.suspect_after_missed_heartbeats,
            down_after_ms: c.down_after_ms,
            leader_grace_ms: c.leader_grace_ms,
            node_cert_lifetime_s: c.node_cert_lifetime_s,
            scheduler_weights: Some(v1::SchedulerWeights {
                locality: w.locality,
                reliability: w.reliability,
                cost: w.cost,
                utilization: w.utilization,
                network_penalty: w.network_penalty,
            }),
            labels: c.labels.into_iter().collect(),
        }
    }
}

/// A cluster configuration from the wire, validated.
pub fn cluster_config_from_wire(
    c: Option<v1::ClusterConfig>,
) -> Result<t::ClusterConfig, t::ValidationErrors> {
    let Some(c) = c else {
        let mut errs = t::ValidationErrors::default();
        errs.push("config", "is required");
        return Err(errs);
    };
    let weights = c
        .scheduler_weights
        .map_or_else(t::SchedulerWeights::default, |w| t::SchedulerWeights {
            locality: w.locality,
            reliability: w.reliability,
            cost: w.cost,
            utilization: w.utilization,
            network_penalty: w.network_penalty,
        });
    let config = t::ClusterConfig {
        cluster_name: c.cluster_name,
        heartbeat_interval_ms: c.heartbeat_interval_ms,
        suspect_after_missed_heartbeats: c.suspect_after_missed_heartbeats,
        down_after_ms: c.down_after_ms,
        leader_grace_ms: c.leader_grace_ms,
        node_cert_lifetime_s: if c.node_cert_lifetime_s == 0 {
            t::ClusterConfig::default().node_cert_lifetime_s
        } else {
            c.node_cert_lifetime_s
        },
        scheduler_weights: weights,
        labels: c.labels.into_iter().collect::<BTreeMap<_, _>>(),
    };
    config.validate().map(|()| config)
}

impl From<t::ReplicaRecord> for v1::Replica {
    fn from(r: t::ReplicaRecord) -> Self {
        Self {
            image: r.spec.image.clone(),
            id: r.id,
            namespace: r.namespace,
            workload: r.workload,
            template: r.template,
            node_id: r.node_id,
            node_name: String::new(),
            state: r.state.as_str().to_owned(),
            exit_code: r.exit_code,
            restarts: r.restarts,
            message: r.message,
            created_at_ms: r.created_at_ms,
            updated_at_ms: r.updated_at_ms,
        }
    }
}
