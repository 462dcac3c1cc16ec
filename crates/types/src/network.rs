//! Replica networking as the cluster configures it: the address ranges, the
//! per-node replica subnets cut from them, and egress policies.

use std::collections::HashSet;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::validation::{check_dns_label, ValidationErrors};

/// Most rules one egress policy may list.
pub const MAX_EGRESS_RULES: usize = 64;
/// Most ports one egress rule may list.
pub const MAX_EGRESS_PORTS: usize = 64;
/// Longest node prefix for an IPv4 cluster range: a /30 leaves two addresses
/// (the bridge's and one replica's).
pub const MAX_NODE_PREFIX_LEN_V4: u8 = 30;
/// Longest node prefix for an IPv6 cluster range.
pub const MAX_NODE_PREFIX_LEN_V6: u8 = 126;

/// Which destinations outside the cluster a replica may connect to. Only
/// connections that leave the cluster's replica and service ranges
/// (`network.cluster_cidr`, `network.service_cidr`) are egress; the node's
/// DNS resolver is always reachable.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EgressPolicy {
    /// Allowed destinations; a connection matching none is refused. Empty:
    /// no egress at all.
    #[serde(default)]
    pub allow: Vec<EgressRule>,
}

impl EgressPolicy {
    /// Every destination, every port (the cluster default unless changed).
    pub fn allow_all() -> Self {
        Self {
            allow: vec![EgressRule {
                cidr: "0.0.0.0/0".to_owned(),
                ports: Vec::new(),
            }],
        }
    }

    /// Reports every invalid rule with paths under `prefix` (`spec.egress`).
    pub fn validate_into(&self, prefix: &str, errs: &mut ValidationErrors) {
        if self.allow.len() > MAX_EGRESS_RULES {
            errs.push(
                format!("{prefix}.allow"),
                format!(
                    "{} rules; at most {MAX_EGRESS_RULES} are allowed",
                    self.allow.len()
                ),
            );
        }
        for (i, rule) in self.allow.iter().enumerate() {
            let f = format!("{prefix}.allow[{i}]");
            check_network(errs, &format!("{f}.cidr"), &rule.cidr);
            if rule.ports.len() > MAX_EGRESS_PORTS {
                errs.push(
                    format!("{f}.ports"),
                    format!(
                        "{} ports; at most {MAX_EGRESS_PORTS} are allowed (leave it empty for every port)",
                        rule.ports.len()
                    ),
                );
            }
            for (j, p) in rule.ports.iter().enumerate() {
                if *p == 0 {
                    errs.push(format!("{f}.ports[{j}]"), "must be 1-65535");
                }
            }
        }
    }
}

/// One allowed egress destination.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EgressRule {
    /// An IPv4 or IPv6 network in CIDR notation (`203.0.113.0/24`,
    /// `0.0.0.0/0`, `2001:db8::/32`; one address is `/32` or `/128`).
    pub cidr: String,
    /// Destination ports, TCP and UDP; empty: every port and protocol.
    #[serde(default)]
    pub ports: Vec<u16>,
}

/// The cluster's replica network (`network` in the cluster configuration).
/// Every field has a default, so a configuration stored before it existed
/// reads as the defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NetworkConfig {
    /// The range every replica address comes from, cut into one subnet per
    /// node. Default `10.244.0.0/16`. While nodes hold subnets it may only
    /// grow to a range that still contains every one of them.
    pub cluster_cidr: String,
    /// Prefix length of each node's subnet, longer than the cluster range's
    /// and at most 30 (IPv4) or 126 (IPv6). Default 24 (254 replicas per
    /// node, 256 nodes in the default range). Cannot change while any node
    /// holds a subnet.
    pub node_prefix_len: u8,
    /// The DNS suffix of service names (`<workload>.<namespace>.<domain>`).
    /// Default `cloudless.local`.
    pub cluster_domain: String,
    /// The range service virtual IPs come from; must not overlap
    /// `cluster_cidr`. Default `10.96.0.0/16`.
    pub service_cidr: String,
    /// The egress policy of workloads that set none. Default: every
    /// destination and port (as Docker and Kubernetes do).
    pub default_egress: EgressPolicy,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            cluster_cidr: "10.244.0.0/16".to_owned(),
            node_prefix_len: 24,
            cluster_domain: "cloudless.local".to_owned(),
            service_cidr: "10.96.0.0/16".to_owned(),
            default_egress: EgressPolicy::allow_all(),
        }
    }
}

impl NetworkConfig {
    /// Reports every invalid field with paths under `prefix` (`network`).
    pub fn validate_into(&self, prefix: &str, errs: &mut ValidationErrors) {
        let mut cluster =
            check_network(errs, &format!("{prefix}.cluster_cidr"), &self.cluster_cidr);
        let mut service =
            check_network(errs, &format!("{prefix}.service_cidr"), &self.service_cidr);
        // Agents give replicas IPv4 addresses only (docs/networking.md).
        for (field, net) in [
            ("cluster_cidr", &mut cluster),
            ("service_cidr", &mut service),
        ] {
            if let Some(n @ IpNet::V6(_)) = *net {
                errs.push(
                    format!("{prefix}.{field}"),
                    format!("{n} is an IPv6 network; replicas have IPv4 addresses only"),
                );
                *net = None;
            }
        }
        if let Some(cluster) = cluster {
            let max = match cluster {
                IpNet::V4(_) => MAX_NODE_PREFIX_LEN_V4,
                IpNet::V6(_) => MAX_NODE_PREFIX_LEN_V6,
            };
            if self.node_prefix_len <= cluster.prefix_len() || self.node_prefix_len > max {
                errs.push(
                    format!("{prefix}.node_prefix_len"),
                    format!(
                        "{} must be longer than the cluster range's /{} and at most {max}",
                        self.node_prefix_len,
                        cluster.prefix_len()
                    ),
                );
            }
        }
        if let (Some(c), Some(s)) = (cluster, service) {
            if c.contains(&s.network()) || s.contains(&c.network()) {
                errs.push(
                    format!("{prefix}.service_cidr"),
                    format!("{s} overlaps cluster_cidr {c}"),
                );
            }
        }
        check_domain(
            errs,
            &format!("{prefix}.cluster_domain"),
            &self.cluster_domain,
        );
        self.default_egress
            .validate_into(&format!("{prefix}.default_egress"), errs);
    }

    /// Whether `subnet` (as stored) is one of the node subnets these
    /// settings define: a `/node_prefix_len` inside `cluster_cidr`. A
    /// change that leaves a node's subnet outside is refused.
    pub fn holds_node_subnet(&self, subnet: &str) -> bool {
        match (self.cluster_cidr.parse::<IpNet>(), subnet.parse::<IpNet>()) {
            (Ok(cluster), Ok(s)) => s.prefix_len() == self.node_prefix_len && cluster.contains(&s),
            _ => false,
        }
    }

    /// The lowest node subnet of the cluster range that is not in `used`
    /// (subnets as stored, e.g. `10.244.3.0/24`), or `None` when every one
    /// is taken or the settings do not parse (they are validated before
    /// they are stored).
    pub fn free_node_subnet<'a>(&self, used: impl IntoIterator<Item = &'a str>) -> Option<IpNet> {
        let cluster: IpNet = self.cluster_cidr.parse().ok()?;
        let used: HashSet<IpNet> = used
            .into_iter()
            .filter_map(|s| s.parse::<IpNet>().ok())
            .collect();
        cluster
            .subnets(self.node_prefix_len)
            .ok()?
            .find(|s| !used.contains(s))
    }

    /// The lowest service virtual IP of `service_cidr` not in `used` (as
    /// stored, e.g. `10.96.0.7`): the range's network address, its first
    /// address (kept back, as Kubernetes keeps it for its API) and its last
    /// (the IPv4 broadcast) are never given. `None` when every one is taken
    /// or the settings do not parse (they are validated before they are
    /// stored).
    pub fn free_service_vip<'a>(&self, used: impl IntoIterator<Item = &'a str>) -> Option<IpAddr> {
        let range: IpNet = self.service_cidr.parse().ok()?;
        let used: HashSet<IpAddr> = used
            .into_iter()
            .filter_map(|s| s.parse::<IpAddr>().ok())
            .collect();
        let (first, last) = match range {
            IpNet::V4(n) => (
                u128::from(u32::from(n.network())),
                u128::from(u32::from(n.broadcast())),
            ),
            IpNet::V6(n) => (u128::from(n.network()), u128::from(n.broadcast())),
        };
        let as_ip = |v: u128| -> Option<IpAddr> {
            match range {
                IpNet::V4(_) => u32::try_from(v)
                    .ok()
                    .map(|v| IpAddr::V4(std::net::Ipv4Addr::from(v))),
                IpNet::V6(_) => Some(IpAddr::V6(std::net::Ipv6Addr::from(v))),
            }
        };
        // At most `used.len() + 1` candidates are looked at.
        (first.checked_add(2)?..last)
            .filter_map(as_ip)
            .find(|ip| !used.contains(ip))
    }

    /// Whether `vip` (as stored) is one these settings could give: inside
    /// `service_cidr`. A change that leaves a workload's VIP outside is
    /// refused.
    pub fn holds_service_vip(&self, vip: &str) -> bool {
        match (self.service_cidr.parse::<IpNet>(), vip.parse::<IpAddr>()) {
            (Ok(range), Ok(ip)) => range.contains(&ip),
            _ => false,
        }
    }

    /// How many node subnets the cluster range holds (saturating).
    pub fn node_subnet_count(&self) -> u128 {
        let Ok(cluster) = self.cluster_cidr.parse::<IpNet>() else {
            return 0;
        };
        let bits = u32::from(self.node_prefix_len.saturating_sub(cluster.prefix_len()));
        1u128.checked_shl(bits).unwrap_or(u128::MAX)
    }
}

/// Checks a network in CIDR notation without host bits; returns it parsed.
fn check_network(errs: &mut ValidationErrors, field: &str, value: &str) -> Option<IpNet> {
    match value.parse::<IpNet>() {
        Ok(net) if net.trunc() == net => Some(net),
        Ok(net) => {
            errs.push(
                field,
                format!(
                    "{value:?} has host bits set; the network is {}",
                    net.trunc()
                ),
            );
            None
        }
        Err(_) => {
            let hint = if value.parse::<IpAddr>().is_ok() {
                " (one address is /32 for IPv4, /128 for IPv6)"
            } else {
                ""
            };
            errs.push(
                field,
                format!("{value:?} is not an IPv4 or IPv6 network in CIDR notation{hint}"),
            );
            None
        }
    }
}

/// Checks a DNS name: dot-separated DNS labels, at most 253 characters.
fn check_domain(errs: &mut ValidationErrors, field: &str, value: &str) {
    if value.len() > 253 {
        errs.push(
            field,
            format!(
                "is {} characters long, at most 253 are allowed",
                value.len()
            ),
        );
        return;
    }
    let mut label_errs = ValidationErrors::default();
    for label in value.split('.') {
        check_dns_label(&mut label_errs, field, label);
    }
    if !label_errs.0.is_empty() {
        errs.push(
            field,
            format!("{value:?} is not a DNS name (lowercase labels of letters, digits and '-', separated by '.')"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(errs: &ValidationErrors) -> Vec<&str> {
        errs.0.iter().map(|e| e.field.as_str()).collect()
    }

    #[test]
    fn the_default_network_is_valid_and_allows_all_egress() {
        let mut errs = ValidationErrors::default();
        NetworkConfig::default().validate_into("network", &mut errs);
        assert_eq!(errs.0, []);
        let d = NetworkConfig::default();
        assert_eq!(d.default_egress.allow[0].cidr, "0.0.0.0/0");
        assert!(d.default_egress.allow[0].ports.is_empty());
        assert_eq!(d.node_subnet_count(), 256);
    }

    #[test]
    fn every_bad_network_field_is_named() {
        let c = NetworkConfig {
            cluster_cidr: "10.244.1.0/16".into(),
            node_prefix_len: 8,
            cluster_domain: "Cloudless..local".into(),
            service_cidr: "10.96.0.0".into(),
            default_egress: EgressPolicy {
                allow: vec![EgressRule {
                    cidr: "everywhere".into(),
                    ports: vec![443, 0],
                }],
            },
        };
        let mut errs = ValidationErrors::default();
        c.validate_into("network", &mut errs);
        assert_eq!(
            fields(&errs),
            [
                "network.cluster_cidr",
                "network.service_cidr",
                "network.cluster_domain",
                "network.default_egress.allow[0].cidr",
                "network.default_egress.allow[0].ports[1]",
            ],
            "{errs}"
        );
        assert!(errs.0[0].problem.contains("10.244.0.0/16"), "{errs}");
        assert!(errs.0[1].problem.contains("/32"), "{errs}");
    }

    #[test]
    fn node_prefix_must_be_longer_than_the_range_and_leave_room() {
        for (cidr, len, ok) in [
            ("10.244.0.0/16", 16, false),
            ("10.244.0.0/16", 17, true),
            ("10.244.0.0/16", 30, true),
            ("10.244.0.0/16", 31, false),
            // Replicas have IPv4 addresses only.
            ("fd00:244::/48", 64, false),
        ] {
            let c = NetworkConfig {
                cluster_cidr: cidr.into(),
                node_prefix_len: len,
                ..NetworkConfig::default()
            };
            let mut errs = ValidationErrors::default();
            c.validate_into("network", &mut errs);
            assert_eq!(errs.0.is_empty(), ok, "{cidr} /{len}: {errs}");
        }
    }

    #[test]
    fn the_service_range_may_not_overlap_the_cluster_range() {
        for service in ["10.244.128.0/20", "10.0.0.0/8"] {
            let c = NetworkConfig {
                service_cidr: service.into(),
                ..NetworkConfig::default()
            };
            let mut errs = ValidationErrors::default();
            c.validate_into("network", &mut errs);
            assert_eq!(fields(&errs), ["network.service_cidr"], "{service}: {errs}");
            assert!(errs.0[0].problem.contains("overlaps"), "{errs}");
        }
    }

    #[test]
    fn the_lowest_free_node_subnet_is_chosen() {
        let c = NetworkConfig {
            cluster_cidr: "10.0.0.0/22".into(),
            ..NetworkConfig::default()
        };
        assert_eq!(c.node_subnet_count(), 4);
        let pick = |used: &[&str]| {
            c.free_node_subnet(used.iter().copied())
                .map(|n| n.to_string())
        };
        assert_eq!(pick(&[]).as_deref(), Some("10.0.0.0/24"));
        assert_eq!(
            pick(&["10.0.0.0/24", "10.0.2.0/24"]).as_deref(),
            Some("10.0.1.0/24")
        );
        assert_eq!(
            pick(&["10.0.0.0/24", "10.0.1.0/24", "10.0.2.0/24", "10.0.3.0/24"]),
            None
        );
    }

    #[test]
    fn the_lowest_free_service_vip_skips_the_network_first_and_last_addresses() {
        let c = NetworkConfig {
            service_cidr: "10.96.0.0/29".into(),
            ..NetworkConfig::default()
        };
        let pick = |used: &[&str]| {
            c.free_service_vip(used.iter().copied())
                .map(|ip| ip.to_string())
        };
        assert_eq!(pick(&[]).as_deref(), Some("10.96.0.2"));
        assert_eq!(
            pick(&["10.96.0.2", "10.96.0.4", "garbage"]).as_deref(),
            Some("10.96.0.3")
        );
        let all = [
            "10.96.0.2",
            "10.96.0.3",
            "10.96.0.4",
            "10.96.0.5",
            "10.96.0.6",
        ];
        assert_eq!(pick(&all), None, "10.96.0.7 is the broadcast");
        let tiny = NetworkConfig {
            service_cidr: "10.96.0.0/31".into(),
            ..NetworkConfig::default()
        };
        assert_eq!(tiny.free_service_vip([]), None);
        let v6 = NetworkConfig {
            service_cidr: "fd00:96::/112".into(),
            ..NetworkConfig::default()
        };
        assert_eq!(
            v6.free_service_vip(["fd00:96::2"]).map(|ip| ip.to_string()),
            Some("fd00:96::3".to_owned())
        );
        assert!(c.holds_service_vip("10.96.0.3"));
        assert!(!c.holds_service_vip("10.96.1.3"));
        assert!(!c.holds_service_vip("garbage"));
    }

    #[test]
    fn a_wider_range_still_holds_the_node_subnets_another_does_not() {
        let mut c = NetworkConfig::default();
        assert!(c.holds_node_subnet("10.244.7.0/24"));
        c.cluster_cidr = "10.240.0.0/12".into();
        assert!(c.holds_node_subnet("10.244.7.0/24"), "wider");
        c.node_prefix_len = 25;
        assert!(!c.holds_node_subnet("10.244.7.0/24"), "another prefix");
        c = NetworkConfig {
            cluster_cidr: "10.245.0.0/16".into(),
            ..NetworkConfig::default()
        };
        assert!(!c.holds_node_subnet("10.244.7.0/24"), "another range");
        assert!(!c.holds_node_subnet("garbage"));
    }

    #[test]
    fn egress_rules_are_bounded() {
        let p = EgressPolicy {
            allow: vec![
                EgressRule {
                    cidr: "203.0.113.0/24".into(),
                    ports: (1..=65).collect(),
                };
                MAX_EGRESS_RULES + 1
            ],
        };
        let mut errs = ValidationErrors::default();
        p.validate_into("spec.egress", &mut errs);
        assert_eq!(fields(&errs)[0], "spec.egress.allow");
        assert_eq!(fields(&errs)[1], "spec.egress.allow[0].ports");
    }
}
