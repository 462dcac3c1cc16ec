//! Each replica's network on this node: the node's container network,
//! opened once the coordinators have given the node its replica subnet, and
//! what a replica asks of it (published ports, egress policy, rate limits).

use std::sync::Arc;

use cloudless_network::{
    AttachRequest, Bandwidth, EgressRule, HostPort, NodeNetwork, NodeNetworkConfig, Protocol,
};
use cloudless_proto::v1 as pb;
use cloudless_types::{EgressPolicy, WorkloadSpec};

use super::config::NetworkSettings;

/// The node's container network: not opened until the coordinators give
/// the node a subnet; never if this agent runs replicas without one.
#[derive(Debug)]
pub(crate) struct NodeNet {
    /// This agent's settings (`None`: replicas get only loopback).
    settings: Option<NetworkSettings>,
    /// The network, once opened.
    opened: Option<Arc<NodeNetwork>>,
    /// Why it could not be opened (logged when it changes).
    failed: Option<String>,
    /// The cluster's egress policy for workloads that set none.
    pub(crate) default_egress: Option<EgressPolicy>,
}

impl NodeNet {
    pub(crate) fn new(settings: Option<NetworkSettings>) -> Self {
        Self {
            settings,
            opened: None,
            failed: None,
            default_egress: None,
        }
    }

    /// The network, opened with `n` (the node's subnet and the cluster's
    /// settings from its assignments) if it is not yet. `None`: this agent
    /// runs replicas without one, the cluster gave none, or it cannot be
    /// opened here (logged: replicas then run with loopback only).
    pub(crate) async fn open(&mut self, n: Option<&pb::NodeNetwork>) -> Option<Arc<NodeNetwork>> {
        let Some(n) = n else {
            return self.opened.clone();
        };
        self.default_egress = n.default_egress.clone().map(|e| {
            let mut errs = cloudless_types::ValidationErrors::default();
            let policy = cloudless_proto::egress_from_wire(e, "network.defaultEgress", &mut errs);
            if !errs.0.is_empty() {
                tracing::warn!(errors = %errs, "the cluster's default egress policy has rules that allow nothing");
            }
            policy
        });
        if let Some(net) = &self.opened {
            if net.config().subnet.to_string() != n.subnet {
                tracing::error!(
                    subnet = %net.config().subnet,
                    assigned = %n.subnet,
                    "the coordinators changed this node's replica subnet; replicas keep the old one until the agent restarts"
                );
            }
            return Some(net.clone());
        }
        let settings = self.settings.as_ref()?;
        let opened = match node_config(settings, n) {
            Ok(config) => NodeNetwork::open(config).await.map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        match opened {
            Ok(net) => {
                tracing::info!(subnet = %n.subnet, bridge = %settings.bridge, "replica network ready");
                self.failed = None;
                let net = Arc::new(net);
                self.opened = Some(net.clone());
                Some(net)
            }
            Err(e) => {
                if self.failed.as_ref() != Some(&e) {
                    tracing::warn!(
                        reason = "ContainerNetworkUnavailable",
                        error = %e,
                        "!!! the node's container network cannot be made: replicas run with loopback only (no address, egress or published ports) !!!"
                    );
                    self.failed = Some(e);
                }
                None
            }
        }
    }
}

/// The node network's settings: the agent's, with the subnet and the
/// cluster's ranges from the coordinators.
fn node_config(s: &NetworkSettings, n: &pb::NodeNetwork) -> Result<NodeNetworkConfig, String> {
    let subnet = n
        .subnet
        .parse()
        .map_err(|e| format!("network.subnet {:?} from the coordinators: {e}", n.subnet))?;
    let internal = [&n.cluster_cidr, &n.service_cidr]
        .into_iter()
        .filter(|c| !c.is_empty())
        .filter_map(|c| c.parse().ok())
        .collect();
    Ok(NodeNetworkConfig {
        subnet,
        internal,
        bridge: s.bridge.clone(),
        cni_bin_dir: s.cni_bin_dir.clone(),
        state_dir: s.state_dir.clone(),
        netns_dir: s.netns_dir.clone(),
        chain_prefix: s.chain_prefix.clone(),
        service_cidr: n.service_cidr.parse().ok(),
        proxy_port: s.proxy_port,
        dns_port: 53,
        isolate_replicas: true,
    })
}

/// What replica `container_id` of `spec` asks of the node's network: its
/// published ports, its egress policy (else `default`, else everything)
/// and its bandwidth limit (both ways).
pub(crate) fn attach_request(
    container_id: &str,
    spec: &WorkloadSpec,
    default: Option<&EgressPolicy>,
) -> AttachRequest {
    let host_ports = spec
        .ports
        .iter()
        .filter(|p| p.host_port != 0)
        .map(|p| HostPort {
            host_port: p.host_port,
            container_port: p.container_port,
            protocol: match p.protocol {
                cloudless_types::Protocol::TCP => Protocol::Tcp,
                cloudless_types::Protocol::UDP => Protocol::Udp,
            },
        })
        .collect();
    let egress = match spec.egress.as_ref().or(default) {
        Some(policy) => egress_rules(policy),
        None => vec![EgressRule::any()],
    };
    let rate = spec.limits.bandwidth_bps;
    AttachRequest {
        container_id: container_id.to_owned(),
        host_ports,
        egress,
        bandwidth: Bandwidth {
            ingress_bps: rate,
            egress_bps: rate,
        },
    }
}

/// Why the node cannot publish `ports`, if it cannot: a port the node's
/// own resolver or service proxy answers on, or one a process of the node
/// listens on (its SSH, the overlay, a coordinator): the port mapping would
/// take the node's own traffic.
pub(crate) fn host_ports_refused(ports: &[HostPort], net: &NodeNetworkConfig) -> Option<String> {
    ports.iter().find_map(|p| {
        let (port, proto) = (p.host_port, p.protocol);
        let name = match proto {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        };
        if port == net.dns_port {
            return Some(format!(
                "hostPort {port}/{name}: the node's resolver answers there"
            ));
        }
        if port == net.proxy_port && proto == Protocol::Tcp {
            return Some(format!(
                "hostPort {port}/{name}: the node's service proxy listens there"
            ));
        }
        let taken = match proto {
            Protocol::Tcp => std::net::TcpListener::bind(("0.0.0.0", port)).err(),
            Protocol::Udp => std::net::UdpSocket::bind(("0.0.0.0", port)).err(),
        };
        taken
            .filter(|e| e.kind() == std::io::ErrorKind::AddrInUse)
            .map(|_| format!("hostPort {port}/{name}: a process of the node listens there"))
    })
}

/// A policy's rules (validated when the workload was applied; a rule that
/// does not parse allows nothing).
fn egress_rules(policy: &EgressPolicy) -> Vec<EgressRule> {
    policy
        .allow
        .iter()
        .filter_map(|r| match r.cidr.parse() {
            Ok(cidr) => Some(EgressRule {
                cidr,
                ports: r.ports.clone(),
            }),
            Err(e) => {
                tracing::warn!(cidr = %r.cidr, error = %e, "an egress rule that does not parse allows nothing");
                None
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> WorkloadSpec {
        let m = format!(
            "apiVersion: cloudless.dev/v1\nkind: Workload\nmetadata:\n  name: web\nspec:\n  image: busybox:1\n{yaml}"
        );
        cloudless_types::parse_manifest(&m).expect("manifest").spec
    }

    #[test]
    fn a_replica_asks_for_its_published_ports_policy_and_bandwidth() {
        let s = spec(
            "  ports:\n    - {containerPort: 80, hostPort: 8080}\n    - {containerPort: 53, protocol: UDP, hostPort: 5353}\n    - {containerPort: 9090}\n  limits: {bandwidthBps: 8000000}\n  egress:\n    allow:\n      - {cidr: 192.0.2.0/24, ports: [443]}\n",
        );
        let req = attach_request("web-1", &s, None);
        assert_eq!(
            req.host_ports,
            [
                HostPort {
                    host_port: 8080,
                    container_port: 80,
                    protocol: Protocol::Tcp
                },
                HostPort {
                    host_port: 5353,
                    container_port: 53,
                    protocol: Protocol::Udp
                },
            ]
        );
        assert_eq!(
            req.egress,
            [EgressRule {
                cidr: "192.0.2.0/24".parse().expect("net"),
                ports: vec![443]
            }]
        );
        assert_eq!(
            req.bandwidth,
            Bandwidth {
                ingress_bps: 8_000_000,
                egress_bps: 8_000_000
            }
        );
    }

    #[test]
    fn ports_the_node_uses_itself_are_not_published() {
        let config = NodeNetworkConfig {
            subnet: "10.244.3.0/24".parse().expect("net"),
            internal: vec![],
            bridge: "cld0".into(),
            cni_bin_dir: "/usr/lib/cni".into(),
            state_dir: "/tmp".into(),
            netns_dir: "/tmp".into(),
            chain_prefix: "CLOUDLESS".into(),
            service_cidr: None,
            proxy_port: 7681,
            dns_port: 53,
            isolate_replicas: true,
        };
        let port = |host_port, protocol| HostPort {
            host_port,
            container_port: 80,
            protocol,
        };
        let why = host_ports_refused(&[port(53, Protocol::Udp)], &config).expect("refused");
        assert!(why.contains("53/UDP") && why.contains("resolver"), "{why}");
        assert!(host_ports_refused(&[port(7681, Protocol::Tcp)], &config).is_some());
        let busy = std::net::TcpListener::bind("0.0.0.0:0").expect("bind");
        let taken = busy.local_addr().expect("addr").port();
        let why = host_ports_refused(&[port(taken, Protocol::Tcp)], &config).expect("refused");
        assert!(why.contains("listens there"), "{why}");
        drop(busy);
        assert_eq!(
            host_ports_refused(&[port(taken, Protocol::Tcp)], &config),
            None
        );
    }

    #[test]
    fn without_a_policy_the_cluster_default_applies_else_everything() {
        let s = spec("");
        assert_eq!(attach_request("w", &s, None).egress, [EgressRule::any()]);
        let none = EgressPolicy { allow: vec![] };
        assert!(attach_request("w", &s, Some(&none)).egress.is_empty());
        assert_eq!(
            attach_request("w", &s, None).bandwidth,
            Bandwidth::default()
        );
    }
}
