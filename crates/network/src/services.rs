//! The cluster's services as this node sees them: each workload's declared
//! ports under a stable virtual IP and DNS name, with its Ready endpoints,
//! load-balancing policy and who may call it. Built from the assignment
//! watch; read by the node's resolver and service proxy.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;

/// How a service spreads connections over its endpoints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LoadBalancing {
    /// Each endpoint in turn.
    #[default]
    RoundRobin,
    /// The endpoint with the fewest open connections from this node.
    LeastConnections,
    /// Same node, else same zone, else same region, else any (round robin
    /// within the nearest group).
    Locality,
    /// Endpoints in each zone get connections in proportion to the zone's
    /// weight.
    Weighted,
}

/// A port of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ServicePort {
    /// The port (the same on the VIP and on the replicas).
    pub port: u16,
    /// A UDP port (else TCP).
    pub udp: bool,
}

/// A Ready replica of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The replica.
    pub replica_id: String,
    /// Its node.
    pub node_id: String,
    /// Its address on its node's bridge (reachable from that node only).
    pub address: Option<Ipv4Addr>,
    /// Its node's zone (may be empty).
    pub zone: String,
    /// Its node's region (may be empty).
    pub region: String,
}

/// One service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// Its namespace.
    pub namespace: String,
    /// Its workload's name.
    pub name: String,
    /// Its virtual IP.
    pub vip: Ipv4Addr,
    /// Its ports.
    pub ports: Vec<ServicePort>,
    /// How connections are spread.
    pub policy: LoadBalancing,
    /// Namespaces besides its own whose workloads may connect.
    pub allow_from: Vec<String>,
    /// Zone weights (`Weighted`; a zone not listed weighs 1).
    pub weights: BTreeMap<String, u32>,
    /// Its Ready endpoints.
    pub endpoints: Vec<Endpoint>,
}

impl Service {
    /// Whether a workload of namespace `caller` may connect.
    pub fn admits(&self, caller: &str) -> bool {
        caller == self.namespace || self.allow_from.iter().any(|n| n == caller || n == "*")
    }

    /// Whether `port` is one of its TCP ports.
    pub fn has_tcp_port(&self, port: u16) -> bool {
        self.has_port(port, false)
    }

    /// Whether `port` is one of its UDP ports (`udp`) or TCP ports.
    pub fn has_port(&self, port: u16, udp: bool) -> bool {
        self.ports.iter().any(|p| p.port == port && p.udp == udp)
    }
}

/// Every service, by VIP and by DNS name.
#[derive(Debug, Clone, Default)]
pub struct ServiceTable {
    /// The cluster domain (`cloudless.local`).
    pub domain: String,
    by_vip: HashMap<Ipv4Addr, Arc<Service>>,
    by_name: HashMap<String, Ipv4Addr>,
}

impl ServiceTable {
    /// The table of `services` under `domain`.
    pub fn new(domain: &str, services: Vec<Service>) -> Self {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let mut t = Self {
            domain: domain.clone(),
            ..Self::default()
        };
        for s in services {
            let fqdn = format!("{}.{}.{domain}", s.name, s.namespace).to_ascii_lowercase();
            t.by_name.insert(fqdn, s.vip);
            t.by_vip.insert(s.vip, Arc::new(s));
        }
        t
    }

    /// The service at `vip`.
    pub fn by_vip(&self, vip: Ipv4Addr) -> Option<Arc<Service>> {
        self.by_vip.get(&vip).cloned()
    }

    /// The VIP of a fully qualified name (`web.default.cloudless.local`,
    /// with or without the final dot, any case).
    pub fn resolve(&self, name: &str) -> Option<Ipv4Addr> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        self.by_name.get(&name).copied()
    }

    /// Whether `name` is in the cluster domain (answered here, never
    /// forwarded).
    pub fn in_domain(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        !self.domain.is_empty()
            && (name == self.domain || name.ends_with(&format!(".{}", self.domain)))
    }

    /// The services.
    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.by_vip.values()
    }
}

/// The current service table, shared by the resolver and the proxy and
/// replaced whole on every assignment change.
#[derive(Debug, Clone)]
pub struct SharedServices(Arc<tokio::sync::watch::Sender<Arc<ServiceTable>>>);

impl Default for SharedServices {
    fn default() -> Self {
        Self(Arc::new(tokio::sync::watch::Sender::new(Arc::default())))
    }
}

impl SharedServices {
    /// The table now.
    pub fn get(&self) -> Arc<ServiceTable> {
        self.0.borrow().clone()
    }

    /// Replaces the table.
    pub fn set(&self, table: ServiceTable) {
        self.0.send_replace(Arc::new(table));
    }

    /// Sees every replacement from now on.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Arc<ServiceTable>> {
        self.0.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(ns: &str, name: &str, vip: [u8; 4]) -> Service {
        Service {
            namespace: ns.into(),
            name: name.into(),
            vip: vip.into(),
            ports: vec![ServicePort {
                port: 8080,
                udp: false,
            }],
            policy: LoadBalancing::RoundRobin,
            allow_from: vec!["web".into()],
            weights: BTreeMap::new(),
            endpoints: vec![],
        }
    }

    #[test]
    fn names_resolve_in_the_cluster_domain_only() {
        let t = ServiceTable::new(
            "Cloudless.Local.",
            vec![
                svc("default", "api", [10, 96, 0, 5]),
                svc("prod", "db", [10, 96, 0, 6]),
            ],
        );
        assert_eq!(
            t.resolve("api.default.cloudless.local."),
            Some([10, 96, 0, 5].into())
        );
        assert_eq!(
            t.resolve("DB.prod.cloudless.local"),
            Some([10, 96, 0, 6].into())
        );
        assert_eq!(t.resolve("api.prod.cloudless.local"), None);
        assert!(t.in_domain("nothing.prod.cloudless.local"));
        assert!(!t.in_domain("example.com"));
        assert!(!t.in_domain("evilcloudless.local"));
        let api = t.by_vip([10, 96, 0, 5].into()).expect("by vip");
        assert!(api.admits("default") && api.admits("web") && !api.admits("other"));
        assert!(api.has_tcp_port(8080) && !api.has_tcp_port(80));
    }
}
