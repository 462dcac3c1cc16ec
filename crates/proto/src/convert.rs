//! Conversions between wire messages and domain types. Wire to domain checks
//! every field and names the one that is wrong.

use std::collections::BTreeMap;

use cloudless_types::{self as t, ClosedSet as _};

use crate::enums::{defaulted, WireEnum};
use crate::v1;

impl From<t::Resources> for v1::Resources {
    fn from(r: t::Resources) -> Self {
        Self {
            cpu_millis: r.cpu_millis,
            memory_bytes: r.memory_bytes,
            storage_bytes: r.storage_bytes,
            bandwidth_bps: r.bandwidth_bps,
            pids: r.pids,
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
            pids: r.pids,
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
                legacy_anti_affinity: s.placement.anti_affinity.name().into(),
                legacy_strategy: s.placement.strategy.name().into(),
                anti_affinity: Some(v1::AntiAffinity::wire(s.placement.anti_affinity)),
                strategy: Some(v1::PlacementStrategy::wire(s.placement.strategy)),
            }),
            legacy_restart_policy: s.restart_policy.name().into(),
            restart_policy: Some(v1::RestartPolicy::wire(s.restart_policy)),
            rollout: Some(v1::Rollout {
                max_surge: s.rollout.max_surge,
                max_unavailable: s.rollout.max_unavailable,
                progress_deadline_seconds: s.rollout.progress_deadline_seconds,
                legacy_strategy: s.rollout.strategy.name().into(),
                strategy: Some(v1::RolloutStrategy::wire(s.rollout.strategy)),
                min_available: s.rollout.min_available,
            }),
            readiness_probe: s.readiness_probe.map(probe_to_wire),
            liveness_probe: s.liveness_probe.map(probe_to_wire),
            ports: s
                .ports
                .into_iter()
                .map(|p| v1::ContainerPort {
                    name: p.name,
                    container_port: u32::from(p.container_port),
                    legacy_protocol: p.protocol.name().into(),
                    protocol: Some(v1::Protocol::wire(p.protocol)),
                    host_port: u32::from(p.host_port),
                    ingress_port: u32::from(p.ingress_port),
                })
                .collect(),
            security_context: Some(security_to_wire(s.security_context)),
            volumes: s
                .volumes
                .into_iter()
                .map(|v| v1::Volume {
                    name: v.name,
                    empty_dir: v.empty_dir.map(|e| v1::EmptyDir {
                        legacy_medium: e.medium.name().into(),
                        medium: Some(v1::StorageMedium::wire(e.medium)),
                        size_limit_bytes: e.size_limit_bytes,
                    }),
                    host_path: v.host_path.map(|h| v1::HostPath { path: h.path }),
                    secret: v.secret.map(|s| v1::SecretVolume {
                        secret_name: s.secret_name,
                        items: s
                            .items
                            .into_iter()
                            .map(|i| v1::KeyToPath {
                                key: i.key,
                                path: i.path,
                            })
                            .collect(),
                    }),
                })
                .collect(),
            secret_env: s
                .secret_env
                .into_iter()
                .map(|e| v1::SecretEnv {
                    name: e.name,
                    secret_name: e.secret_key_ref.name,
                    key: e.secret_key_ref.key,
                })
                .collect(),
            upstreams: s
                .upstreams
                .into_iter()
                .map(|u| v1::Upstream {
                    workload: u.workload,
                    port: u32::from(u.port),
                    local_port: u32::from(u.local_port),
                })
                .collect(),
            volume_mounts: s
                .volume_mounts
                .into_iter()
                .map(|m| v1::VolumeMount {
                    name: m.name,
                    mount_path: m.mount_path,
                    read_only: m.read_only,
                })
                .collect(),
            disconnect: Some(v1::Disconnect {
                lost_after_seconds: s.disconnect.lost_after_seconds,
                replace: Some(s.disconnect.replace),
                stop_on_client_after_seconds: s.disconnect.stop_on_client_after_seconds,
                legacy_reconcile: s.disconnect.reconcile.name().into(),
                reconcile: Some(v1::ReconnectPolicy::wire(s.disconnect.reconcile)),
            }),
            egress: s.egress.map(Into::into),
            service: Some(s.service.into()),
        }
    }
}

impl From<t::ServiceSpec> for v1::ServiceSpec {
    fn from(s: t::ServiceSpec) -> Self {
        Self {
            load_balancing: Some(v1::LoadBalancing::wire(s.load_balancing)),
            allow_from: s.allow_from,
            zone_weights: s.zone_weights.into_iter().collect(),
        }
    }
}

/// A service section from the wire: an unset policy is the default; the
/// rest is checked by validation (`ServiceSpec::validate_into`).
fn service_from_wire(
    s: v1::ServiceSpec,
    path: &str,
    errs: &mut t::ValidationErrors,
) -> t::ServiceSpec {
    t::ServiceSpec {
        load_balancing: defaulted::<v1::LoadBalancing>(
            s.load_balancing,
            "",
            &format!("{path}.loadBalancing"),
            t::LoadBalancing::default(),
            errs,
        ),
        allow_from: s.allow_from,
        zone_weights: s.zone_weights.into_iter().collect(),
    }
}

impl From<t::EgressPolicy> for v1::EgressPolicy {
    fn from(e: t::EgressPolicy) -> Self {
        Self {
            allow: e
                .allow
                .into_iter()
                .map(|r| v1::EgressRule {
                    cidr: r.cidr,
                    ports: r.ports.into_iter().map(u32::from).collect(),
                })
                .collect(),
        }
    }
}

/// An egress policy from the wire; ports above 65535 are reported in
/// `errs` under `path` (`spec.egress`) and dropped. The networks are
/// checked by validation (`EgressPolicy::validate_into`).
pub fn egress_from_wire(
    e: v1::EgressPolicy,
    path: &str,
    errs: &mut t::ValidationErrors,
) -> t::EgressPolicy {
    t::EgressPolicy {
        allow: e
            .allow
            .into_iter()
            .enumerate()
            .map(|(i, r)| t::EgressRule {
                cidr: r.cidr,
                ports: r
                    .ports
                    .into_iter()
                    .enumerate()
                    .filter_map(|(j, p)| {
                        u16::try_from(p)
                            .map_err(|_| {
                                errs.push(
                                    format!("{path}.allow[{i}].ports[{j}]"),
                                    format!("{p} is not a port (1-65535)"),
                                );
                            })
                            .ok()
                    })
                    .collect(),
            })
            .collect(),
    }
}

impl From<t::NetworkConfig> for v1::NetworkConfig {
    fn from(n: t::NetworkConfig) -> Self {
        Self {
            cluster_cidr: n.cluster_cidr,
            node_prefix_len: u32::from(n.node_prefix_len),
            cluster_domain: n.cluster_domain,
            service_cidr: n.service_cidr,
            default_egress: Some(n.default_egress.into()),
        }
    }
}

/// A network section from the wire: empty fields take their defaults, an
/// unset `default_egress` allows everything; a prefix length above 255 is
/// reported in `errs` (validation checks the rest).
fn network_from_wire(n: v1::NetworkConfig, errs: &mut t::ValidationErrors) -> t::NetworkConfig {
    let d = t::NetworkConfig::default();
    let or = |v: String, default: String| if v.is_empty() { default } else { v };
    t::NetworkConfig {
        cluster_cidr: or(n.cluster_cidr, d.cluster_cidr),
        node_prefix_len: match n.node_prefix_len {
            0 => d.node_prefix_len,
            p => u8::try_from(p).unwrap_or_else(|_| {
                errs.push(
                    "network.node_prefix_len",
                    format!("{p} is not a prefix length"),
                );
                0
            }),
        },
        cluster_domain: or(n.cluster_domain, d.cluster_domain),
        service_cidr: or(n.service_cidr, d.service_cidr),
        default_egress: n.default_egress.map_or(d.default_egress, |e| {
            egress_from_wire(e, "network.default_egress", errs)
        }),
    }
}

fn security_to_wire(c: t::SecurityContextSpec) -> v1::SecurityContext {
    v1::SecurityContext {
        run_as_user: c.run_as_user,
        run_as_group: c.run_as_group,
        run_as_non_root: c.run_as_non_root,
        read_only_root_filesystem: c.read_only_root_filesystem,
        capabilities_add: c.capabilities.add,
        capabilities_drop: c.capabilities.drop,
        legacy_seccomp_type: c.seccomp_profile.kind.name().into(),
        seccomp_type: Some(v1::SeccompProfileType::wire(c.seccomp_profile.kind)),
        seccomp_localhost_profile: c.seccomp_profile.localhost_profile.unwrap_or_default(),
        app_armor_profile: c.app_armor_profile.unwrap_or_default(),
        se_linux_label: c.se_linux_label.unwrap_or_default(),
        host_network: c.host_network,
    }
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn security_from_wire(
    c: v1::SecurityContext,
    path: &str,
    errs: &mut t::ValidationErrors,
) -> t::SecurityContextSpec {
    t::SecurityContextSpec {
        run_as_user: c.run_as_user,
        run_as_group: c.run_as_group,
        run_as_non_root: c.run_as_non_root,
        read_only_root_filesystem: c.read_only_root_filesystem,
        capabilities: t::Capabilities {
            add: c.capabilities_add,
            drop: c.capabilities_drop,
        },
        seccomp_profile: t::SeccompProfileSpec {
            kind: defaulted::<v1::SeccompProfileType>(
                c.seccomp_type,
                &c.legacy_seccomp_type,
                &format!("{path}.seccompProfile.type"),
                t::SeccompType::default(),
                errs,
            ),
            localhost_profile: non_empty(c.seccomp_localhost_profile),
        },
        app_armor_profile: non_empty(c.app_armor_profile),
        se_linux_label: non_empty(c.se_linux_label),
        host_network: c.host_network,
    }
}

/// The container parts of a spec (ports, security, volumes, disconnect).
fn container_from_wire(
    s: &mut v1::WorkloadSpec,
    path: &str,
    errs: &mut t::ValidationErrors,
) -> (
    Vec<t::ContainerPort>,
    t::SecurityContextSpec,
    Vec<t::Volume>,
    Vec<t::VolumeMount>,
    t::Disconnect,
) {
    let ports = std::mem::take(&mut s.ports)
        .into_iter()
        .enumerate()
        .map(|(i, p)| t::ContainerPort {
            name: p.name,
            container_port: port_from_wire(
                p.container_port,
                &format!("{path}.ports[{i}].containerPort"),
                errs,
            ),
            protocol: defaulted::<v1::Protocol>(
                p.protocol,
                &p.legacy_protocol,
                &format!("{path}.ports[{i}].protocol"),
                t::Protocol::default(),
                errs,
            ),
            host_port: port_from_wire(p.host_port, &format!("{path}.ports[{i}].hostPort"), errs),
            ingress_port: port_from_wire(
                p.ingress_port,
                &format!("{path}.ports[{i}].ingressPort"),
                errs,
            ),
        })
        .collect();
    let security = s
        .security_context
        .take()
        .map_or_else(Default::default, |c| {
            security_from_wire(c, &format!("{path}.securityContext"), errs)
        });
    let volumes = std::mem::take(&mut s.volumes)
        .into_iter()
        .enumerate()
        .map(|(i, v)| t::Volume {
            name: v.name,
            empty_dir: v.empty_dir.map(|e| t::EmptyDir {
                medium: defaulted::<v1::StorageMedium>(
                    e.medium,
                    &e.legacy_medium,
                    &format!("{path}.volumes[{i}].emptyDir.medium"),
                    t::StorageMedium::default(),
                    errs,
                ),
                size_limit_bytes: e.size_limit_bytes,
            }),
            host_path: v.host_path.map(|h| t::HostPath { path: h.path }),
            secret: v.secret.map(|s| t::SecretVolume {
                secret_name: s.secret_name,
                items: s
                    .items
                    .into_iter()
                    .map(|i| t::KeyToPath {
                        key: i.key,
                        path: i.path,
                    })
                    .collect(),
            }),
        })
        .collect();
    let mounts = std::mem::take(&mut s.volume_mounts)
        .into_iter()
        .map(|m| t::VolumeMount {
            name: m.name,
            mount_path: m.mount_path,
            read_only: m.read_only,
        })
        .collect();
    let disconnect = s
        .disconnect
        .take()
        .map_or_else(Default::default, |d| t::Disconnect {
            lost_after_seconds: d.lost_after_seconds,
            replace: d.replace.unwrap_or(true),
            stop_on_client_after_seconds: d.stop_on_client_after_seconds,
            reconcile: defaulted::<v1::ReconnectPolicy>(
                d.reconcile,
                &d.legacy_reconcile,
                &format!("{path}.disconnect.reconcile"),
                t::ReconnectPolicy::default(),
                errs,
            ),
        });
    (ports, security, volumes, mounts, disconnect)
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
    mut s: v1::WorkloadSpec,
    path: &str,
    errs: &mut t::ValidationErrors,
) -> t::WorkloadSpec {
    let (ports, security_context, volumes, volume_mounts, disconnect) =
        container_from_wire(&mut s, path, errs);
    let placement = s.placement.unwrap_or_default();
    let anti_affinity = defaulted::<v1::AntiAffinity>(
        placement.anti_affinity,
        &placement.legacy_anti_affinity,
        &format!("{path}.placement.antiAffinity"),
        t::AntiAffinity::default(),
        errs,
    );
    let strategy = defaulted::<v1::PlacementStrategy>(
        placement.strategy,
        &placement.legacy_strategy,
        &format!("{path}.placement.strategy"),
        t::PlacementStrategy::default(),
        errs,
    );
    let restart_policy = defaulted::<v1::RestartPolicy>(
        s.restart_policy,
        &s.legacy_restart_policy,
        &format!("{path}.restartPolicy"),
        t::RestartPolicy::default(),
        errs,
    );
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
            strategy: defaulted::<v1::RolloutStrategy>(
                r.strategy,
                &r.legacy_strategy,
                &format!("{path}.rollout.type"),
                t::RolloutStrategy::default(),
                errs,
            ),
            max_surge: r.max_surge,
            max_unavailable: r.max_unavailable,
            progress_deadline_seconds: if r.progress_deadline_seconds == 0 {
                t::Rollout::default().progress_deadline_seconds
            } else {
                r.progress_deadline_seconds
            },
            min_available: r.min_available,
        }),
        readiness_probe: s
            .readiness_probe
            .map(|p| probe_from_wire(p, &format!("{path}.readinessProbe"), errs)),
        liveness_probe: s
            .liveness_probe
            .map(|p| probe_from_wire(p, &format!("{path}.livenessProbe"), errs)),
        ports,
        security_context,
        volumes,
        volume_mounts,
        disconnect,
        secret_env: s
            .secret_env
            .into_iter()
            .map(|e| t::SecretEnv {
                name: e.name,
                secret_key_ref: t::SecretKeyRef {
                    name: e.secret_name,
                    key: e.key,
                },
            })
            .collect(),
        upstreams: s
            .upstreams
            .into_iter()
            .enumerate()
            .map(|(i, u)| t::Upstream {
                workload: u.workload,
                port: port_from_wire(u.port, &format!("{path}.upstreams[{i}].port"), errs),
                local_port: port_from_wire(
                    u.local_port,
                    &format!("{path}.upstreams[{i}].localPort"),
                    errs,
                ),
            })
            .collect(),
        egress: s
            .egress
            .map(|e| egress_from_wire(e, &format!("{path}.egress"), errs)),
        service: s.service.map_or_else(t::ServiceSpec::default, |v| {
            service_from_wire(v, &format!("{path}.service"), errs)
        }),
    }
}

/// A TCP/UDP port from a wire u32: 0 (reported by validation) when too large.
fn port_from_wire(port: u32, path: &str, errs: &mut t::ValidationErrors) -> u16 {
    u16::try_from(port).unwrap_or_else(|_| {
        errs.push(path.to_owned(), format!("{port} is not a port (1-65535)"));
        0
    })
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
            vip: w.vip.unwrap_or_default(),
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
        revisions: Vec::new(),
        vip: None,
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
            audit_retention_days: c.audit_retention_days,
            secret_max_bytes: c.secret_max_bytes,
            audit_max_records: c.audit_max_records,
            audit_aggregate_window_s: c.audit_aggregate_window_s,
            access_token_max_records: c.access_token_max_records,
            admin_cert_lifetime_s: Some(c.admin_cert_lifetime_s),
            node_rejoin_grace_s: Some(c.node_rejoin_grace_s),
            network: Some(c.network.into()),
        }
    }
}

/// A cluster configuration from the wire, validated. An absent `network`
/// reads as the defaults (a coordinator keeps the stored one instead).
pub fn cluster_config_from_wire(
    c: Option<v1::ClusterConfig>,
) -> Result<t::ClusterConfig, t::ValidationErrors> {
    let mut errs = t::ValidationErrors::default();
    let Some(c) = c else {
        errs.push("config", "is required");
        return Err(errs);
    };
    let network = c.network.map_or_else(t::NetworkConfig::default, |n| {
        network_from_wire(n, &mut errs)
    });
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
        audit_retention_days: if c.audit_retention_days == 0 {
            t::DEFAULT_AUDIT_RETENTION_DAYS
        } else {
            c.audit_retention_days
        },
        secret_max_bytes: if c.secret_max_bytes == 0 {
            t::ClusterConfig::default().secret_max_bytes
        } else {
            c.secret_max_bytes
        },
        audit_max_records: if c.audit_max_records == 0 {
            t::DEFAULT_AUDIT_MAX_RECORDS
        } else {
            c.audit_max_records
        },
        audit_aggregate_window_s: if c.audit_aggregate_window_s == 0 {
            t::DEFAULT_AUDIT_AGGREGATE_WINDOW_S
        } else {
            c.audit_aggregate_window_s
        },
        access_token_max_records: if c.access_token_max_records == 0 {
            t::DEFAULT_ACCESS_TOKEN_MAX_RECORDS
        } else {
            c.access_token_max_records
        },
        admin_cert_lifetime_s: c
            .admin_cert_lifetime_s
            .unwrap_or(t::ClusterConfig::DEFAULT_ADMIN_CERT_LIFETIME_S),
        node_rejoin_grace_s: c
            .node_rejoin_grace_s
            .unwrap_or(t::DEFAULT_NODE_REJOIN_GRACE_S),
        network,
    };
    if let Err(e) = config.validate() {
        errs.0.extend(e.0);
    }
    errs.into_result().map(|()| config)
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
            legacy_state: if r.disconnected_at_ms > 0 {
                "Unknown".to_owned()
            } else {
                r.state.name().to_owned()
            },
            state: if r.disconnected_at_ms > 0 {
                v1::ReplicaState::Unknown.into()
            } else {
                v1::ReplicaState::wire(r.state)
            },
            exit_code: r.exit_code,
            restarts: r.restarts,
            message: r.message,
            created_at_ms: r.created_at_ms,
            updated_at_ms: r.updated_at_ms,
            address: r.address,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_enum_names_on_the_wire_are_refused_by_field() {
        let mut spec: v1::WorkloadSpec = t::WorkloadSpec {
            image: "busybox".into(),
            ..Default::default()
        }
        .into();
        // A client of the previous release sends only the string twins.
        spec.restart_policy = None;
        spec.legacy_restart_policy = "Sometimes".into();
        if let Some(p) = spec.placement.as_mut() {
            p.strategy = None;
            p.legacy_strategy = "Random".into();
        }
        if let Some(r) = spec.rollout.as_mut() {
            r.strategy = Some(0);
        }
        let mut errs = t::ValidationErrors::default();
        let back = spec_from_wire(spec, "spec", &mut errs);
        let fields: Vec<&str> = errs.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.placement.strategy",
                "spec.restartPolicy",
                "spec.rollout.type"
            ]
        );
        assert_eq!(
            errs.0[2].problem,
            "ROLLOUT_STRATEGY_UNSPECIFIED is not allowed: give one of \
             ROLLOUT_STRATEGY_ROLLING_UPDATE, ROLLOUT_STRATEGY_RECREATE, \
             ROLLOUT_STRATEGY_BLUE_GREEN (leave it unset for ROLLOUT_STRATEGY_ROLLING_UPDATE)"
        );
        assert_eq!(
            errs.0[1].problem,
            "\"Sometimes\" is not one of Always, OnFailure, Never"
        );
        assert_eq!(back.restart_policy, t::RestartPolicy::Always);
        // Unset fields take the default; known values round-trip.
        let mut ok: v1::WorkloadSpec = t::WorkloadSpec {
            image: "busybox".into(),
            restart_policy: t::RestartPolicy::Never,
            ..Default::default()
        }
        .into();
        ok.placement = None;
        let mut errs = t::ValidationErrors::default();
        let back = spec_from_wire(ok, "spec", &mut errs);
        assert!(errs.0.is_empty(), "{errs}");
        assert_eq!(back.restart_policy, t::RestartPolicy::Never);
    }

    #[test]
    fn an_empty_network_section_is_the_defaults_and_an_empty_policy_allows_nothing() {
        let mut wire: v1::ClusterConfig = t::ClusterConfig::default().into();
        wire.network = Some(v1::NetworkConfig::default());
        let c = cluster_config_from_wire(Some(wire.clone())).expect("valid");
        assert_eq!(c.network, t::NetworkConfig::default());
        wire.network = None;
        let c = cluster_config_from_wire(Some(wire.clone())).expect("valid");
        assert_eq!(c.network, t::NetworkConfig::default());
        wire.network = Some(v1::NetworkConfig {
            default_egress: Some(v1::EgressPolicy::default()),
            node_prefix_len: 300,
            ..Default::default()
        });
        let errs = cluster_config_from_wire(Some(wire.clone())).expect_err("prefix 300");
        let fields: Vec<&str> = errs.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields[0], "network.node_prefix_len", "{errs}");
        if let Some(n) = wire.network.as_mut() {
            n.node_prefix_len = 0;
        }
        let c = cluster_config_from_wire(Some(wire)).expect("valid");
        assert!(
            c.network.default_egress.allow.is_empty(),
            "no egress at all"
        );
    }
}
