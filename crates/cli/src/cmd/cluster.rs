//! `cloudlessctl cluster`: coordinator membership and status, and the
//! cluster configuration record.

use clap::Subcommand;
use cloudless_proto::v1::cluster_service_client::ClusterServiceClient;
use cloudless_proto::v1::{self as pb};

use crate::client::{call, Failure};
use crate::cmd::Ctx;
use crate::Exit;

/// `cloudlessctl cluster` subcommands.
#[derive(Subcommand, Debug)]
pub(crate) enum ClusterCmd {
    /// Members, leader, term, and commit/applied index per coordinator.
    Status,
    /// Remove a coordinator by node id.
    Remove { node_id: u64 },
    /// Show the cluster configuration record.
    Config,
    /// Change cluster configuration keys, e.g. `cluster set down_after_ms=8000`.
    /// Keys: cluster_name, heartbeat_interval_ms, suspect_after_missed_heartbeats,
    /// down_after_ms, leader_grace_ms, node_cert_lifetime_s,
    /// audit_retention_days, secret_max_bytes, audit_max_records,
    /// audit_aggregate_window_s, access_token_max_records, admin_cert_lifetime_s,
    /// node_rejoin_grace_s,
    /// scheduler_weights.{locality,reliability,cost,utilization,network_penalty},
    /// network.{cluster_cidr,node_prefix_len,cluster_domain,service_cidr},
    /// network.default_egress (all, none, or a policy in YAML/JSON such as
    /// '{allow: [{cidr: 0.0.0.0/0, ports: [443]}]}').
    Set {
        /// KEY=VALUE pairs.
        #[arg(required = true)]
        settings: Vec<String>,
    },
}

/// Applies `key=value` to a cluster configuration; the error names the key.
fn set_config_key(c: &mut pb::ClusterConfig, setting: &str) -> Result<(), String> {
    let (key, value) = setting
        .split_once('=')
        .ok_or_else(|| format!("{setting:?}: expected KEY=VALUE"))?;
    let int = |v: &str| {
        v.parse::<u64>()
            .map_err(|_| format!("{key}: {v:?} is not a non-negative integer"))
    };
    let float = |v: &str| {
        v.parse::<f64>()
            .map_err(|_| format!("{key}: {v:?} is not a number"))
    };
    let w = c.scheduler_weights.get_or_insert_with(Default::default);
    // The section as the coordinator holds it (`cluster set` reads it
    // first); an older coordinator sends none: start from the defaults.
    let n = c
        .network
        .get_or_insert_with(|| cloudless_types::NetworkConfig::default().into());
    match key {
        "network.cluster_cidr" => n.cluster_cidr = value.to_owned(),
        "network.node_prefix_len" => {
            n.node_prefix_len =
                u32::try_from(int(value)?).map_err(|_| format!("{key}: {value} is too large"))?
        }
        "network.cluster_domain" => n.cluster_domain = value.to_owned(),
        "network.service_cidr" => n.service_cidr = value.to_owned(),
        "network.default_egress" => n.default_egress = Some(egress_setting(value)?.into()),
        "cluster_name" => c.cluster_name = value.to_owned(),
        "heartbeat_interval_ms" => c.heartbeat_interval_ms = int(value)?,
        "suspect_after_missed_heartbeats" => {
            c.suspect_after_missed_heartbeats =
                u32::try_from(int(value)?).map_err(|_| format!("{key}: {value} is too large"))?
        }
        "down_after_ms" => c.down_after_ms = int(value)?,
        "leader_grace_ms" => c.leader_grace_ms = int(value)?,
        "node_cert_lifetime_s" => c.node_cert_lifetime_s = int(value)?,
        "audit_retention_days" => {
            c.audit_retention_days =
                u32::try_from(int(value)?).map_err(|_| format!("{key}: {value} is too large"))?
        }
        "secret_max_bytes" => {
            c.secret_max_bytes =
                u32::try_from(int(value)?).map_err(|_| format!("{key}: {value} is too large"))?
        }
        "audit_max_records" => {
            c.audit_max_records =
                u32::try_from(int(value)?).map_err(|_| format!("{key}: {value} is too large"))?
        }
        "audit_aggregate_window_s" => {
            c.audit_aggregate_window_s =
                u32::try_from(int(value)?).map_err(|_| format!("{key}: {value} is too large"))?
        }
        "admin_cert_lifetime_s" => c.admin_cert_lifetime_s = Some(int(value)?),
        "access_token_max_records" => {
            c.access_token_max_records =
                u32::try_from(int(value)?).map_err(|_| format!("{key}: {value} is too large"))?
        }
        "node_rejoin_grace_s" => c.node_rejoin_grace_s = Some(int(value)?),
        "scheduler_weights.locality" => w.locality = float(value)?,
        "scheduler_weights.reliability" => w.reliability = float(value)?,
        "scheduler_weights.cost" => w.cost = float(value)?,
        "scheduler_weights.utilization" => w.utilization = float(value)?,
        "scheduler_weights.network_penalty" => w.network_penalty = float(value)?,
        other => return Err(format!("{other:?} is not a cluster configuration key")),
    }
    Ok(())
}

/// `network.default_egress`: `all`, `none`, or a policy as a manifest
/// writes it (YAML or JSON).
fn egress_setting(value: &str) -> Result<cloudless_types::EgressPolicy, String> {
    let key = "network.default_egress";
    let policy = match value.trim() {
        "all" => cloudless_types::EgressPolicy::allow_all(),
        "none" => cloudless_types::EgressPolicy::default(),
        text => serde_yaml_ng::from_str(text).map_err(|e| {
            format!("{key}: {e} (give all, none, or e.g. '{{allow: [{{cidr: 0.0.0.0/0, ports: [443]}}]}}')")
        })?,
    };
    let mut errs = cloudless_types::ValidationErrors::default();
    policy.validate_into(key, &mut errs);
    errs.into_result().map_err(|e| e.to_string())?;
    Ok(policy)
}

/// Runs a `cluster` command.
pub(crate) async fn run(cmd: ClusterCmd, ctx: &Ctx) -> Result<(), Failure> {
    let servers = &ctx.target;
    match cmd {
        ClusterCmd::Status => {
            let s = call(servers, |ch| async move {
                ClusterServiceClient::new(ch)
                    .status(pb::StatusRequest {})
                    .await
            })
            .await?;
            if ctx.output.is_structured() {
                let coords: Vec<_> = s.coordinators.iter().map(|c| serde_json::json!({
                    "nodeId": c.node_id, "address": c.address, "reachable": c.reachable, "state": c.state_name(),
                    "term": c.term, "leaderId": c.leader_id, "lastLogIndex": c.last_log_index,
                    "commitIndex": c.commit_index, "appliedIndex": c.applied_index,
                    "snapshotIndex": c.snapshot_index, "error": c.error })).collect();
                return ctx.output.print(
                    &serde_json::json!({ "clusterId": s.cluster_id, "clusterName": s.cluster_name,
                    "leaderId": s.leader_id, "term": s.term, "coordinators": coords }),
                );
            }
            println!(
                "cluster {} ({})  leader {}  term {}",
                s.cluster_name, s.cluster_id, s.leader_id, s.term
            );
            println!(
                "{:<20} {:<22} {:<8} {:<10} {:>6} {:>10} {:>10} {:>10}",
                "NODE", "ADDRESS", "ROLE", "STATE", "TERM", "LAST-LOG", "COMMIT", "APPLIED"
            );
            for c in &s.coordinators {
                let role = s
                    .members
                    .iter()
                    .find(|m| m.node_id == c.node_id)
                    .map_or("?", |m| {
                        if m.role == pb::member::Role::Voter as i32 {
                            "voter"
                        } else {
                            "learner"
                        }
                    });
                if c.reachable {
                    println!(
                        "{:<20} {:<22} {:<8} {:<10} {:>6} {:>10} {:>10} {:>10}",
                        c.node_id,
                        c.address,
                        role,
                        c.state_name(),
                        c.term,
                        c.last_log_index,
                        c.commit_index,
                        c.applied_index
                    );
                } else {
                    println!(
                        "{:<20} {:<22} {:<8} unreachable: {}",
                        c.node_id, c.address, role, c.error
                    );
                }
            }
        }
        ClusterCmd::Remove { node_id } => {
            let r = call(servers, |ch| async move {
                ClusterServiceClient::new(ch)
                    .remove_coordinator(pb::RemoveCoordinatorRequest {
                        write: None,
                        node_id,
                    })
                    .await
            })
            .await?;
            println!(
                "removed coordinator {node_id}; {} member(s) remain",
                r.members.len()
            );
        }
        ClusterCmd::Config => {
            let read = ctx.read_opts();
            let r = call(servers, |ch| async move {
                ClusterServiceClient::new(ch)
                    .get_config(pb::GetConfigRequest { read })
                    .await
            })
            .await?;
            let c = r.config.unwrap_or_default();
            let w = c.scheduler_weights.unwrap_or_default();
            let network = c.network.clone().map(|n| {
                let egress = n.default_egress.clone().map(|e| {
                    e.allow
                        .iter()
                        .map(|r| serde_json::json!({ "cidr": r.cidr, "ports": r.ports }))
                        .collect::<Vec<_>>()
                });
                serde_json::json!({ "clusterCidr": n.cluster_cidr, "nodePrefixLen": n.node_prefix_len,
                    "clusterDomain": n.cluster_domain, "serviceCidr": n.service_cidr,
                    "defaultEgress": { "allow": egress } })
            });
            ctx.output.print(
                &serde_json::json!({ "revision": r.revision, "clusterName": c.cluster_name,
                "heartbeatIntervalMs": c.heartbeat_interval_ms, "suspectAfterMissedHeartbeats": c.suspect_after_missed_heartbeats,
                "downAfterMs": c.down_after_ms, "leaderGraceMs": c.leader_grace_ms,
                "nodeCertLifetimeS": c.node_cert_lifetime_s,
                "auditRetentionDays": c.audit_retention_days, "secretMaxBytes": c.secret_max_bytes,
                "auditMaxRecords": c.audit_max_records, "auditAggregateWindowS": c.audit_aggregate_window_s,
                "accessTokenMaxRecords": c.access_token_max_records,
                "nodeRejoinGraceS": c.node_rejoin_grace_s,
                "schedulerWeights": { "locality": w.locality, "reliability": w.reliability, "cost": w.cost,
                    "utilization": w.utilization, "networkPenalty": w.network_penalty }, "labels": c.labels,
                "network": network }),
            )?;
        }
        ClusterCmd::Set { settings } => {
            let current = call(servers, |ch| async move {
                ClusterServiceClient::new(ch)
                    .get_config(pb::GetConfigRequest { read: None })
                    .await
            })
            .await?;
            let mut config = current.config.unwrap_or_default();
            for s in &settings {
                set_config_key(&mut config, s)
                    .map_err(|e| Failure::new(Exit::Usage, anyhow::anyhow!(e)))?;
            }
            let r = call(servers, |ch| {
                let req = pb::SetConfigRequest {
                    write: None,
                    config: Some(config.clone()),
                    expected_revision: current.revision,
                };
                async move { ClusterServiceClient::new(ch).set_config(req).await }
            })
            .await?;
            println!("cluster configuration is now at revision {}", r.revision);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_set_changes_named_keys_and_names_bad_ones() {
        let mut c = pb::ClusterConfig::default();
        set_config_key(&mut c, "down_after_ms=8000").expect("valid");
        set_config_key(&mut c, "scheduler_weights.cost=0.2").expect("valid");
        assert_eq!(c.down_after_ms, 8000);
        assert_eq!(c.scheduler_weights.map(|w| w.cost), Some(0.2));
        for (bad, named) in [
            ("down_after_ms=-1", "down_after_ms"),
            ("heartbeat_interval_ms", "KEY=VALUE"),
            ("no_such_key=1", "no_such_key"),
            ("scheduler_weights.cost=lots", "scheduler_weights.cost"),
        ] {
            let err = set_config_key(&mut c, bad).expect_err(bad);
            assert!(err.contains(named), "{err}");
        }
    }

    #[test]
    fn cluster_set_changes_the_network_section() {
        let mut c = pb::ClusterConfig::default();
        set_config_key(&mut c, "network.cluster_cidr=10.200.0.0/16").expect("valid");
        set_config_key(&mut c, "network.node_prefix_len=26").expect("valid");
        set_config_key(&mut c, "network.default_egress=none").expect("valid");
        let n = c.network.clone().expect("network");
        assert_eq!(n.cluster_cidr, "10.200.0.0/16");
        assert_eq!(n.node_prefix_len, 26);
        assert_eq!(
            n.service_cidr, "10.96.0.0/16",
            "the others keep their values"
        );
        assert_eq!(n.default_egress.map(|e| e.allow.len()), Some(0));
        set_config_key(
            &mut c,
            "network.default_egress={allow: [{cidr: 203.0.113.0/24, ports: [443]}]}",
        )
        .expect("a policy");
        let e = c
            .network
            .clone()
            .and_then(|n| n.default_egress)
            .expect("egress");
        assert_eq!(
            (e.allow[0].cidr.as_str(), e.allow[0].ports.as_slice()),
            ("203.0.113.0/24", &[443][..])
        );
        set_config_key(&mut c, "network.default_egress=all").expect("all");
        for (bad, named) in [
            (
                "network.default_egress={allow: [{cidr: everywhere}]}",
                "network.default_egress.allow[0].cidr",
            ),
            ("network.default_egress=sometimes", "network.default_egress"),
            ("network.node_prefix_len=x", "network.node_prefix_len"),
        ] {
            let err = set_config_key(&mut c, bad).expect_err(bad);
            assert!(err.contains(named), "{err}");
        }
    }
}
