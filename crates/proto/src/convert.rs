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
        }
    }
}

impl From<v1::WorkloadSpec> for t::WorkloadSpec {
    fn from(s: v1::WorkloadSpec) -> Self {
        Self {
            image: s.image,
            command: s.command,
            args: s.args,
            env: s.env.into_iter().collect(),
            replicas: s.replicas,
            requests: s.requests.map(Into::into).unwrap_or_default(),
            limits: s.limits.map(Into::into).unwrap_or_default(),
            labels: s.labels.into_iter().collect(),
            priority: s.priority,
        }
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
    let workload = t::Workload {
        namespace,
        name: w.name,
        spec: spec.into(),
        generation: 0,
        created_at_ms: 0,
        updated_at_ms: 0,
        template: 0,
    };
    workload.validate().map(|()| workload)
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
