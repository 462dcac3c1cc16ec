//! `cloudlessctl describe`: a workload's spec, status, virtual IP, replicas
//! (with node and state), placement explanation and latest events; `describe
//! service` is in [`crate::cmd::service`].

use clap::Args;
use cloudless_proto::enums::shown;
use cloudless_proto::v1::workload_service_client::WorkloadServiceClient;
use cloudless_proto::v1::{self as pb};
use cloudless_types::ClosedSet as _;

use crate::client::{call, status_failure, Failure};
use crate::cmd::workload::{replica_json, replica_node, workload_json};
use crate::cmd::Ctx;
use crate::output::{human, now_ms, sanitize};

/// `describe`'s arguments.
#[derive(Args, Debug)]
pub(crate) struct DescribeArgs {
    #[arg(value_parser = ["workload", "wl", "service", "svc"])]
    kind: String,
    name: String,
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,
}

/// Prints the workload, or with `-o json`/`-o yaml` the workload and its
/// replicas; or the service (`describe service`).
pub(crate) async fn run(args: DescribeArgs, ctx: &Ctx) -> Result<(), Failure> {
    let servers = &ctx.target;
    let DescribeArgs {
        kind,
        name,
        namespace,
    } = args;
    if matches!(kind.as_str(), "service" | "svc") {
        return crate::cmd::service::describe(ctx, &name, &namespace).await;
    }
    let read = ctx.read_opts();
    let w = call(servers, |ch| {
        let req = pb::GetWorkloadRequest {
            read,
            namespace: namespace.clone(),
            name: name.clone(),
        };
        async move { WorkloadServiceClient::new(ch).get(req).await }
    })
    .await?
    .workload
    .unwrap_or_default();
    let replicas = call(servers, |ch| {
        let req = pb::ListReplicasRequest {
            read,
            namespace: namespace.clone(),
            name: name.clone(),
        };
        async move { WorkloadServiceClient::new(ch).list_replicas(req).await }
    })
    .await?
    .replicas;
    if ctx.output.is_structured() {
        let mut v = workload_json(&w);
        v["replicas"] = serde_json::Value::Array(replicas.iter().map(replica_json).collect());
        return ctx.output.print(&v);
    }
    let spec = w.spec.clone().unwrap_or_default();
    let st = w.status.unwrap_or_default();
    println!("Name:         {}/{}", w.namespace, w.name);
    println!("Image:        {}", spec.image);
    println!("Generation:   {} (template {})", w.generation, w.template);
    println!(
        "VIP:          {}",
        if w.vip.is_empty() {
            "-".to_owned()
        } else {
            sanitize(&w.vip)
        }
    );
    println!(
        "Replicas:     {} desired, {} assigned, {} up to date, {} ready",
        spec.replicas, st.current_replicas, st.updated_replicas, st.ready_replicas
    );
    let typed = cloudless_types::WorkloadSpec::from(spec.clone());
    if spec.placement.is_some() {
        let p = &typed.placement;
        println!(
            "Placement:    zones {:?}, strategy {}, anti-affinity {}",
            p.zones,
            p.strategy.name(),
            p.anti_affinity.name()
        );
    }
    println!("Restart:      {}", typed.restart_policy.name());
    if spec.rollout.is_some() {
        let r = &typed.rollout;
        println!(
            "Rollout:      {} maxSurge {}, maxUnavailable {}, minAvailable {}, progress deadline {}s",
            r.strategy.name(),
            r.max_surge,
            r.max_unavailable,
            r.min_available.map_or_else(|| "-".to_owned(), |m| m.to_string()),
            r.progress_deadline_seconds
        );
    }
    if !typed.ports.is_empty() {
        let ports: Vec<String> = typed
            .ports
            .iter()
            .map(|p| {
                let n = if p.name.is_empty() {
                    String::new()
                } else {
                    format!("{} ", p.name)
                };
                let host = if p.host_port == 0 {
                    String::new()
                } else {
                    format!(" (node port {})", p.host_port)
                };
                let ingress = if p.ingress_port == 0 {
                    String::new()
                } else {
                    format!(" (ingress {})", p.ingress_port)
                };
                format!(
                    "{n}{}/{}{host}{ingress}",
                    p.container_port,
                    p.protocol.name()
                )
            })
            .collect();
        println!("Ports:        {}", ports.join(", "));
    }
    println!("Egress:       {}", egress_line(typed.egress.as_ref()));
    let sc = &typed.security_context;
    println!(
        "Security:     user {}, non-root {}, read-only root {}, capabilities [{}], seccomp {}",
        sc.run_as_user
            .map_or_else(|| "image".to_owned(), |u| u.to_string()),
        sc.run_as_non_root,
        sc.read_only_root_filesystem,
        sc.capabilities.effective().join(", "),
        sc.seccomp_profile.kind.name()
    );
    for m in &typed.volume_mounts {
        let v = typed.volumes.iter().find(|v| v.name == m.name);
        let kind = match v {
            Some(v) if v.host_path.is_some() => format!(
                "hostPath {}",
                v.host_path.as_ref().map(|h| h.path.as_str()).unwrap_or("")
            ),
            Some(v) => format!(
                "emptyDir {:?}",
                v.empty_dir.map(|e| e.medium).unwrap_or_default()
            ),
            None => "?".into(),
        };
        println!(
            "Volume:       {} at {}{} ({kind})",
            m.name,
            m.mount_path,
            if m.read_only { " read-only" } else { "" }
        );
    }
    let d = typed.disconnect;
    if d.lost_after_seconds > 0 || d.stop_on_client_after_seconds.is_some() {
        println!(
            "Disconnect:   lost after {}s, replace {}, agent stops after {}, reconcile {:?}",
            d.lost_after_seconds,
            d.replace,
            d.stop_on_client_after_seconds
                .map_or_else(|| "its --max-disconnected".to_owned(), |s| format!("{s}s")),
            d.reconcile
        );
    }
    let explained = call(servers, |ch| {
        let req = pb::ExplainPlacementRequest {
            namespace: namespace.clone(),
            name: name.clone(),
        };
        async move { WorkloadServiceClient::new(ch).explain_placement(req).await }
    })
    .await;
    let events = {
        let mut stream = call(servers, |ch| {
            let req = pb::EventsRequest {
                namespace: namespace.clone(),
                name: name.clone(),
                watch: false,
            };
            async move { WorkloadServiceClient::new(ch).events(req).await }
        })
        .await?;
        let mut v = Vec::new();
        while let Some(e) = stream.message().await.map_err(status_failure)? {
            v.push(e);
        }
        v
    };
    println!("Replicas:");
    let now = now_ms();
    for x in &replicas {
        println!("{}", replica_line(x, now));
    }
    match explained {
        Ok(e) => {
            println!(
                "Placement explanation (one more replica, strategy {}):",
                shown::<pb::PlacementStrategy>(e.strategy, &e.legacy_strategy)
            );
            for n in &e.nodes {
                println!(
                    "  {:<16} zone {:<8} replicas {:<3} {} {}",
                    n.node_name,
                    if n.zone.is_empty() { "-" } else { &n.zone },
                    n.replicas_here,
                    if n.eligible {
                        format!("score {:>5.1}", n.score)
                    } else {
                        "ineligible ".to_owned()
                    },
                    n.reasons.join("; ")
                );
            }
        }
        Err(f) => println!("Placement explanation: unavailable ({:#})", f.error),
    }
    println!("Events (latest 15):");
    for e in events.iter().rev().take(15).rev() {
        println!(
            "  {:<8} {:<18} {}",
            human((now - e.at_ms).max(0) / 1000),
            e.reason,
            e.message
        );
    }
    Ok(())
}

/// One replica under `Replicas:`, with its address (`-` until reported).
fn replica_line(x: &pb::Replica, now: i64) -> String {
    format!(
        "  {:<44} {:<10} {:<12} address {:<15} template {:<3} restarts {:<3} age {:<6} {}",
        x.id,
        x.state_name(),
        replica_node(x),
        if x.address.is_empty() {
            "-".to_owned()
        } else {
            sanitize(&x.address)
        },
        x.template,
        x.restarts,
        human((now - x.created_at_ms).max(0) / 1000),
        x.message
    )
}

/// The workload's egress policy in one line.
fn egress_line(egress: Option<&cloudless_types::EgressPolicy>) -> String {
    let Some(e) = egress else {
        return "the cluster default (network.default_egress)".to_owned();
    };
    if e.allow.is_empty() {
        return "none".to_owned();
    }
    e.allow
        .iter()
        .map(|r| {
            if r.ports.is_empty() {
                r.cidr.clone()
            } else {
                let ports: Vec<String> = r.ports.iter().map(u16::to_string).collect();
                format!("{} ports {}", r.cidr, ports.join(","))
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_line_shows_its_address_or_a_dash() {
        let mut r = pb::Replica {
            id: "default.web-1-a".into(),
            node_name: "phone-1".into(),
            address: "10.244.0.5".into(),
            ..Default::default()
        };
        assert!(replica_line(&r, 0).contains("address 10.244.0.5 "));
        r.address.clear();
        assert!(replica_line(&r, 0).contains("address -  "));
    }

    #[test]
    fn the_egress_line_tells_default_none_and_rules_apart() {
        assert!(egress_line(None).contains("cluster default"));
        let mut e = cloudless_types::EgressPolicy::default();
        assert_eq!(egress_line(Some(&e)), "none");
        e.allow.push(cloudless_types::EgressRule {
            cidr: "203.0.113.0/24".into(),
            ports: vec![443, 80],
        });
        e.allow.push(cloudless_types::EgressRule {
            cidr: "0.0.0.0/0".into(),
            ports: Vec::new(),
        });
        assert_eq!(
            egress_line(Some(&e)),
            "203.0.113.0/24 ports 443,80; 0.0.0.0/0"
        );
    }
}
