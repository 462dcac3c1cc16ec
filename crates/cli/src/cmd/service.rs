//! `cloudlessctl get services` and `describe service`: each workload's
//! ports under its virtual IP and DNS name, with its load-balancing policy,
//! who may connect, its ingress ports and its Ready endpoints, as agents
//! are told them.

use std::collections::HashMap;

use cloudless_proto::enums::shown;
use cloudless_proto::v1::cluster_service_client::ClusterServiceClient;
use cloudless_proto::v1::node_service_client::NodeServiceClient;
use cloudless_proto::v1::workload_service_client::WorkloadServiceClient;
use cloudless_proto::v1::{self as pb};

use crate::client::{call, Failure};
use crate::cmd::Ctx;
use crate::output::sanitize;
use crate::Exit;

/// The services of `namespace` (every one when `None`), by namespace and
/// name.
async fn list(ctx: &Ctx, namespace: Option<&str>) -> Result<Vec<pb::Service>, Failure> {
    let read = ctx.read_opts();
    let ns = namespace.unwrap_or_default().to_owned();
    Ok(call(&ctx.target, |ch| {
        let req = pb::ListServicesRequest {
            read,
            namespace: ns.clone(),
        };
        async move { WorkloadServiceClient::new(ch).list_services(req).await }
    })
    .await?
    .services)
}

/// `get services [NAME] [-n NAMESPACE]`.
pub(crate) async fn get(
    ctx: &Ctx,
    name: Option<&str>,
    namespace: Option<&str>,
) -> Result<(), Failure> {
    let services = match name {
        Some(name) => vec![one(ctx, name, namespace.unwrap_or("default")).await?],
        None => list(ctx, namespace).await?,
    };
    if ctx.output.is_structured() {
        return ctx
            .output
            .print(&services.iter().map(service_json).collect::<Vec<_>>());
    }
    print!("{}", services_table(&services, ctx.output.is_wide()));
    Ok(())
}

/// The service of `namespace/name`, or a failure saying there is none.
async fn one(ctx: &Ctx, name: &str, namespace: &str) -> Result<pb::Service, Failure> {
    list(ctx, Some(namespace))
        .await?
        .into_iter()
        .find(|s| s.workload == name)
        .ok_or_else(|| {
            Failure::new(
                Exit::Failed,
                anyhow::anyhow!(
                    "no service {namespace}/{name}: the workload does not exist, declares no ports, or has no virtual IP yet"
                ),
            )
        })
}

/// `8080/TCP,53/UDP`.
fn ports(s: &pb::Service) -> String {
    if s.ports.is_empty() {
        return "-".to_owned();
    }
    s.ports
        .iter()
        .map(|p| format!("{}/{}", p.port, shown::<pb::Protocol>(p.protocol, "")))
        .collect::<Vec<_>>()
        .join(",")
}

/// `80->8080,443->8443,53->5353/UDP`, or `-`.
fn ingress(s: &pb::Service) -> String {
    let routes: Vec<String> = s
        .ports
        .iter()
        .filter(|p| p.ingress_port != 0)
        .map(|p| {
            let udp = if p.protocol() == pb::Protocol::Udp {
                "/UDP"
            } else {
                ""
            };
            format!("{}->{}{udp}", p.ingress_port, p.port)
        })
        .collect();
    if routes.is_empty() {
        "-".to_owned()
    } else {
        routes.join(",")
    }
}

/// The namespaces besides its own that may connect, or `-`.
fn allow_from(s: &pb::Service) -> String {
    if s.allow_from.is_empty() {
        "-".to_owned()
    } else {
        sanitize(&s.allow_from.join(","))
    }
}

/// The `get services` table; `wide` adds ALLOW-FROM and INGRESS.
fn services_table(services: &[pb::Service], wide: bool) -> String {
    let mut out = format!(
        "{:<12} {:<24} {:<15} {:<24} {:<16} {:>9}",
        "NAMESPACE", "NAME", "VIP", "PORTS", "POLICY", "ENDPOINTS"
    );
    if wide {
        out.push_str(&format!(" {:<24} INGRESS", "ALLOW-FROM"));
    }
    out.push('\n');
    for s in services {
        out.push_str(&format!(
            "{:<12} {:<24} {:<15} {:<24} {:<16} {:>9}",
            s.namespace,
            s.workload,
            sanitize(&s.vip),
            ports(s),
            shown::<pb::LoadBalancing>(s.load_balancing, ""),
            s.endpoints.len()
        ));
        if wide {
            out.push_str(&format!(" {:<24} {}", allow_from(s), ingress(s)));
        }
        out.push('\n');
    }
    out
}

/// A service as printed with `-o json`/`-o yaml`.
fn service_json(s: &pb::Service) -> serde_json::Value {
    let weights: std::collections::BTreeMap<&String, &u32> = s.zone_weights.iter().collect();
    serde_json::json!({
        "namespace": s.namespace, "name": s.workload, "vip": s.vip,
        "ports": s.ports.iter().map(|p| serde_json::json!({
            "name": p.name, "port": p.port,
            "protocol": shown::<pb::Protocol>(p.protocol, ""), "ingressPort": p.ingress_port,
        })).collect::<Vec<_>>(),
        "loadBalancing": shown::<pb::LoadBalancing>(s.load_balancing, ""),
        "allowFrom": s.allow_from, "zoneWeights": weights,
        "endpoints": s.endpoints.iter().map(|e| serde_json::json!({
            "replicaId": e.replica_id, "nodeId": e.node_id, "address": e.address,
            "zone": e.zone, "region": e.region,
        })).collect::<Vec<_>>(),
    })
}

/// `describe service NAME`: the service, its DNS name under the cluster's
/// domain, and its endpoints with their nodes' names; with `-o json`/`-o
/// yaml` the service as `get services` prints it.
pub(crate) async fn describe(ctx: &Ctx, name: &str, namespace: &str) -> Result<(), Failure> {
    let s = one(ctx, name, namespace).await?;
    if ctx.output.is_structured() {
        return ctx.output.print(&service_json(&s));
    }
    let read = ctx.read_opts();
    let domain = call(&ctx.target, |ch| async move {
        ClusterServiceClient::new(ch)
            .get_config(pb::GetConfigRequest { read })
            .await
    })
    .await?
    .config
    .and_then(|c| c.network)
    .map(|n| n.cluster_domain)
    .filter(|d| !d.is_empty())
    .unwrap_or_else(|| cloudless_types::NetworkConfig::default().cluster_domain);
    let node_names: HashMap<String, String> = call(&ctx.target, |ch| async move {
        NodeServiceClient::new(ch)
            .list(pb::ListNodesRequest { read })
            .await
    })
    .await?
    .nodes
    .into_iter()
    .map(|n| (n.id, n.name))
    .collect();
    let (ns, workload) = (s.namespace.clone(), s.workload.clone());
    let replicas = call(&ctx.target, |ch| {
        let req = pb::ListReplicasRequest {
            read,
            namespace: ns.clone(),
            name: workload.clone(),
        };
        async move { WorkloadServiceClient::new(ch).list_replicas(req).await }
    })
    .await?
    .replicas;
    print!("{}", describe_text(&s, &domain, &node_names, &replicas));
    Ok(())
}

/// What `describe service` prints: `replicas` are the workload's, those
/// that are not endpoints are listed as out of the rotation.
fn describe_text(
    s: &pb::Service,
    domain: &str,
    node_names: &HashMap<String, String>,
    replicas: &[pb::Replica],
) -> String {
    let node = |id: &str| sanitize(node_names.get(id).map_or(id, String::as_str));
    let mut out = String::new();
    out.push_str(&format!("Name:         {}/{}\n", s.namespace, s.workload));
    out.push_str(&format!("VIP:          {}\n", sanitize(&s.vip)));
    out.push_str(&format!(
        "DNS:          {}.{}.{}\n",
        s.workload,
        s.namespace,
        sanitize(domain)
    ));
    let ports: Vec<String> = s
        .ports
        .iter()
        .map(|p| {
            let name = if p.name.is_empty() {
                String::new()
            } else {
                format!("{} ", p.name)
            };
            let ingress = if p.ingress_port == 0 {
                String::new()
            } else {
                format!(" (ingress {})", p.ingress_port)
            };
            format!(
                "{name}{}/{}{ingress}",
                p.port,
                shown::<pb::Protocol>(p.protocol, "")
            )
        })
        .collect();
    out.push_str(&format!(
        "Ports:        {}\n",
        if ports.is_empty() {
            "-".to_owned()
        } else {
            ports.join(", ")
        }
    ));
    out.push_str(&format!(
        "Policy:       {}\n",
        shown::<pb::LoadBalancing>(s.load_balancing, "")
    ));
    if !s.zone_weights.is_empty() {
        let mut weights: Vec<(&String, &u32)> = s.zone_weights.iter().collect();
        weights.sort();
        let weights: Vec<String> = weights
            .into_iter()
            .map(|(z, w)| format!("{}={w}", sanitize(z)))
            .collect();
        out.push_str(&format!(
            "Zone weights: {} (other zones 1)\n",
            weights.join(", ")
        ));
    }
    out.push_str(&format!(
        "Allow from:   {} (and its own namespace)\n",
        if s.allow_from.is_empty() {
            "-".to_owned()
        } else {
            allow_from(s)
        }
    ));
    out.push_str(&format!("Endpoints ({} ready):\n", s.endpoints.len()));
    for e in &s.endpoints {
        out.push_str(&format!(
            "  {:<44} node {:<16} zone {:<10} address {}\n",
            e.replica_id,
            node(&e.node_id),
            if e.zone.is_empty() {
                "-".to_owned()
            } else {
                sanitize(&e.zone)
            },
            sanitize(&e.address)
        ));
    }
    let out_of_rotation: Vec<&pb::Replica> = replicas
        .iter()
        .filter(|r| !s.endpoints.iter().any(|e| e.replica_id == r.id))
        .collect();
    if !out_of_rotation.is_empty() {
        out.push_str("Not in rotation (not Ready, no address yet, or its node is not Ready or is draining):\n");
        for r in out_of_rotation {
            out.push_str(&format!(
                "  {:<44} node {:<16} {}\n",
                r.id,
                node(&r.node_id),
                r.state_name()
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service() -> pb::Service {
        pb::Service {
            namespace: "prod".into(),
            workload: "web".into(),
            vip: "10.96.0.2".into(),
            ports: vec![
                pb::ServicePort {
                    name: "http".into(),
                    port: 8080,
                    protocol: pb::Protocol::Tcp.into(),
                    ingress_port: 80,
                },
                pb::ServicePort {
                    name: String::new(),
                    port: 53,
                    protocol: pb::Protocol::Udp.into(),
                    ingress_port: 5353,
                },
            ],
            load_balancing: pb::LoadBalancing::Weighted.into(),
            allow_from: vec!["dev".into(), "ops".into()],
            zone_weights: [("b".to_owned(), 1), ("a".to_owned(), 3)].into(),
            endpoints: vec![pb::ServiceEndpoint {
                replica_id: "prod.web-1-a".into(),
                node_id: "n1".into(),
                address: "10.244.0.5".into(),
                zone: "a".into(),
                region: String::new(),
                overlay_addresses: Vec::new(),
            }],
        }
    }

    #[test]
    fn the_services_table_counts_endpoints_and_wide_adds_allow_from_and_ingress() {
        let narrow = services_table(&[service()], false);
        let lines: Vec<&str> = narrow.lines().collect();
        assert_eq!(
            lines[0].split_whitespace().collect::<Vec<_>>(),
            ["NAMESPACE", "NAME", "VIP", "PORTS", "POLICY", "ENDPOINTS"]
        );
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            [
                "prod",
                "web",
                "10.96.0.2",
                "8080/TCP,53/UDP",
                "Weighted",
                "1"
            ]
        );
        let wide = services_table(&[service()], true);
        let lines: Vec<&str> = wide.lines().collect();
        assert!(
            lines[0].ends_with(" ALLOW-FROM               INGRESS"),
            "{wide}"
        );
        assert!(
            lines[1].ends_with(" dev,ops                  80->8080,5353->53/UDP"),
            "{wide}"
        );
        let mut plain = service();
        plain.allow_from.clear();
        plain.ports.truncate(1);
        plain.ports[0].ingress_port = 0;
        let wide = services_table(&[plain], true);
        assert!(
            wide.lines()
                .nth(1)
                .is_some_and(|l| l.ends_with(" -                        -")),
            "{wide}"
        );
    }

    #[test]
    fn describe_service_names_the_dns_name_ports_policy_and_endpoints_by_node_name() {
        let names: HashMap<String, String> = [("n1".to_owned(), "phone-1".to_owned())].into();
        let pending = pb::Replica {
            id: "prod.web-1-b".into(),
            node_id: "n2".into(),
            state: pb::ReplicaState::Running.into(),
            ..Default::default()
        };
        let ready = pb::Replica {
            id: "prod.web-1-a".into(),
            node_id: "n1".into(),
            state: pb::ReplicaState::Ready.into(),
            ..Default::default()
        };
        let text = describe_text(&service(), "home.arpa", &names, &[ready, pending]);
        let want = [
            "Name:         prod/web",
            "VIP:          10.96.0.2",
            "DNS:          web.prod.home.arpa",
            "Ports:        http 8080/TCP (ingress 80), 53/UDP (ingress 5353)",
            "Policy:       Weighted",
            "Zone weights: a=3, b=1 (other zones 1)",
            "Allow from:   dev,ops (and its own namespace)",
            "Endpoints (1 ready):",
        ];
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[..want.len()], want, "{text}");
        assert_eq!(
            lines[8].split_whitespace().collect::<Vec<_>>(),
            [
                "prod.web-1-a",
                "node",
                "phone-1",
                "zone",
                "a",
                "address",
                "10.244.0.5"
            ]
        );
        assert!(lines[9].starts_with("Not in rotation"), "{text}");
        assert_eq!(
            lines[10].split_whitespace().collect::<Vec<_>>(),
            ["prod.web-1-b", "node", "n2", "Running"]
        );
        assert_eq!(lines.len(), 11, "{text}");
    }

    #[test]
    fn a_service_in_json_names_its_policy_and_protocols() {
        let v = service_json(&service());
        assert_eq!(v["loadBalancing"], "Weighted");
        assert_eq!(v["ports"][1]["protocol"], "UDP");
        assert_eq!(v["ports"][0]["ingressPort"], 80);
        assert_eq!(v["zoneWeights"]["a"], 3);
        assert_eq!(v["endpoints"][0]["address"], "10.244.0.5");
    }
}
