//! The kernel path for services served here. When every Ready endpoint of
//! a service runs on this node (or its policy is `Locality` and one does),
//! a replica's connection to `VIP:port` needs no proxy: the node's nat
//! table sends it straight to one of the endpoints (`DNAT`, picked at
//! random with equal chances), as kube-proxy does. The proxy's byte copy
//! and its second TCP connection are saved. UDP ports take the same path:
//! a caller's datagrams to `VIP:port/udp` are one conntrack mapping, held
//! by the endpoint its first datagram was sent to (as the proxy holds a
//! flow), until it is quiet for the kernel's UDP timeout or cut.
//!
//! What the proxy enforces holds on this path too:
//! - only callers the service admits have a rule (a replica of this node
//!   whose namespace is the service's or in its `allowFrom`, matched by its
//!   address, which the bridge's address locks keep honest); any other
//!   caller falls through to the proxy, which refuses it;
//! - when an endpoint leaves the service, or a caller is no longer
//!   admitted, the rules are rewritten at once and the connections already
//!   made are cut (their conntrack entries deleted);
//! - least connections needs the proxy's counts, so those services always
//!   go through it, as do services with endpoints on other nodes (the
//!   balancer must see them all).
//!
//! The endpoint sees the connection come from the bridge's address (a
//! hairpin masquerade), as it does through the proxy: replicas on one
//! bridge cannot answer each other directly (their ports are isolated).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use crate::proxy::Caller;
use crate::services::{LoadBalancing, ServiceTable};
use crate::NetworkError;

/// One service port served by the kernel: who may connect, and where to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FastRoute {
    /// The service's address.
    pub vip: Ipv4Addr,
    /// The port.
    pub port: u16,
    /// A UDP port (else TCP).
    pub udp: bool,
    /// Replicas of this node the service admits.
    pub callers: BTreeSet<Ipv4Addr>,
    /// The endpoints' addresses on this node.
    pub endpoints: BTreeSet<Ipv4Addr>,
}

/// The routes the kernel can serve on node `node_id`, given its replicas
/// (`callers`, by address).
pub fn routes(
    table: &ServiceTable,
    callers: &HashMap<IpAddr, Caller>,
    node_id: &str,
) -> Vec<FastRoute> {
    let mut out = Vec::new();
    for svc in table.services() {
        if svc.policy == LoadBalancing::LeastConnections {
            continue;
        }
        let local: BTreeSet<Ipv4Addr> = svc
            .endpoints
            .iter()
            .filter(|e| e.node_id == node_id)
            .filter_map(|e| e.address)
            .collect();
        let all_here = svc
            .endpoints
            .iter()
            .all(|e| e.node_id == node_id && e.address.is_some());
        if local.is_empty() || !(all_here || svc.policy == LoadBalancing::Locality) {
            continue;
        }
        let admitted = admitted(svc, callers);
        if admitted.is_empty() {
            continue;
        }
        for p in &svc.ports {
            out.push(FastRoute {
                vip: svc.vip,
                port: p.port,
                udp: p.udp,
                callers: admitted.clone(),
                endpoints: local.clone(),
            });
        }
    }
    out.sort_by_key(|r| (r.vip, r.port, r.udp));
    out
}

/// The replicas of this node that `svc` admits.
fn admitted(
    svc: &crate::services::Service,
    callers: &HashMap<IpAddr, Caller>,
) -> BTreeSet<Ipv4Addr> {
    callers
        .iter()
        .filter_map(|(ip, c)| match (ip, c) {
            (IpAddr::V4(ip), Caller::Workload { namespace, .. }) if svc.admits(namespace) => {
                Some(*ip)
            }
            _ => None,
        })
        .collect()
}

/// The connections to cut after `before` gave way to `table`: for each
/// route served before, the endpoints that are no longer endpoints of its
/// service here and the callers it no longer admits.
pub fn to_cut(
    before: &[FastRoute],
    table: &ServiceTable,
    callers: &HashMap<IpAddr, Caller>,
    node_id: &str,
) -> Vec<Cut> {
    let mut cuts = Vec::new();
    for r in before {
        let svc = table.by_vip(r.vip);
        let endpoints: BTreeSet<Ipv4Addr> = svc
            .as_ref()
            .map(|s| {
                s.endpoints
                    .iter()
                    .filter(|e| e.node_id == node_id)
                    .filter_map(|e| e.address)
                    .collect()
            })
            .unwrap_or_default();
        let still = svc
            .as_ref()
            .map(|s| admitted(s, callers))
            .unwrap_or_default();
        for e in r.endpoints.difference(&endpoints) {
            cuts.push(Cut::Endpoint {
                vip: r.vip,
                port: r.port,
                udp: r.udp,
                endpoint: *e,
            });
        }
        for c in r.callers.difference(&still) {
            cuts.push(Cut::Caller {
                vip: r.vip,
                port: r.port,
                udp: r.udp,
                caller: *c,
            });
        }
    }
    cuts
}

/// UDP routes that left the kernel path while mappings they made may live
/// on (a caller that keeps sending keeps its mapping to the endpoint it
/// had, whatever the rules say now): watched, so such a mapping is still
/// cut when its endpoint leaves the service or its caller is no longer
/// admitted. TCP needs none of this: a connection keeps its endpoint for
/// its life and ends with it (reset, or timed out), and the next one takes
/// the rules as they are.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Retired(Vec<FastRoute>);

impl Retired {
    /// After the kernel path went from `before` to `after`: the UDP routes
    /// of `before` no longer served are watched, those served again no
    /// longer.
    pub fn update(&mut self, before: &[FastRoute], after: &[FastRoute]) {
        let key = |r: &FastRoute| (r.vip, r.port, r.udp);
        let served: BTreeSet<_> = after.iter().map(key).collect();
        self.0.retain(|r| !served.contains(&key(r)));
        for r in before.iter().filter(|r| r.udp && !served.contains(&key(r))) {
            match self.0.iter_mut().find(|w| key(w) == key(r)) {
                Some(w) => {
                    w.endpoints.extend(r.endpoints.iter().copied());
                    w.callers.extend(r.callers.iter().copied());
                }
                None => self.0.push(r.clone()),
            }
        }
    }

    /// The mappings of watched routes to cut now (see [`to_cut`]); what is
    /// cut is no longer watched, nor a route with nothing left to cut.
    pub fn to_cut(
        &mut self,
        table: &ServiceTable,
        callers: &HashMap<IpAddr, Caller>,
        node_id: &str,
    ) -> Vec<Cut> {
        let cuts = to_cut(&self.0, table, callers, node_id);
        self.forget(&cuts);
        cuts
    }

    /// Stops watching what `cuts` cut (a route with nothing left to cut is
    /// dropped).
    pub fn forget(&mut self, cuts: &[Cut]) {
        for c in cuts {
            let (vip, port, udp, gone, is_endpoint) = match *c {
                Cut::Endpoint {
                    vip,
                    port,
                    udp,
                    endpoint,
                } => (vip, port, udp, endpoint, true),
                Cut::Caller {
                    vip,
                    port,
                    udp,
                    caller,
                } => (vip, port, udp, caller, false),
                Cut::Udp { .. } | Cut::UdpRange { .. } => continue,
            };
            for r in self
                .0
                .iter_mut()
                .filter(|r| (r.vip, r.port, r.udp) == (vip, port, udp))
            {
                if is_endpoint {
                    r.endpoints.remove(&gone);
                } else {
                    r.callers.remove(&gone);
                }
            }
        }
        self.0
            .retain(|r| !r.endpoints.is_empty() && !r.callers.is_empty());
    }

    /// Whether no route is watched.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Connections to cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cut {
    /// Every connection (UDP: mapping) to `vip:port` that went to
    /// `endpoint`.
    Endpoint {
        /// The service's address.
        vip: Ipv4Addr,
        /// Its port.
        port: u16,
        /// A UDP port.
        udp: bool,
        /// The endpoint that left.
        endpoint: Ipv4Addr,
    },
    /// Every UDP mapping to `vip:port` (where its datagrams go changed:
    /// a caller's next datagram is redirected anew).
    Udp {
        /// The service's address.
        vip: Ipv4Addr,
        /// Its UDP port.
        port: u16,
    },
    /// Every UDP mapping to an address of `range` (the service range: what
    /// a start cuts once its kernel path is written, since the rules of the
    /// agent's earlier life may have made mappings to endpoints that left
    /// while it was down).
    UdpRange {
        /// The range.
        range: ipnet::Ipv4Net,
    },
    /// Every connection (UDP: mapping) from `caller` to `vip:port`.
    Caller {
        /// The service's address.
        vip: Ipv4Addr,
        /// Its port.
        port: u16,
        /// A UDP port.
        udp: bool,
        /// The caller no longer admitted.
        caller: Ipv4Addr,
    },
}

/// Cuts the connections `cuts` names (deletes their conntrack entries:
/// their next packets match no translation and are refused). Without the
/// `conntrack` tool nothing is cut, with a warning.
pub async fn cut(cuts: &[Cut]) {
    let proto = |udp: bool| if udp { "udp" } else { "tcp" };
    for c in cuts {
        let args: Vec<String> = match c {
            Cut::Endpoint {
                vip,
                port,
                udp,
                endpoint,
            } => ["-D", "-p", proto(*udp), "-d", &vip.to_string(), "--dport"]
                .iter()
                .map(|s| (*s).to_owned())
                .chain([port.to_string(), "-r".into(), endpoint.to_string()])
                .collect(),
            Cut::Udp { vip, port } => ["-D", "-p", "udp", "-d", &vip.to_string(), "--dport"]
                .iter()
                .map(|s| (*s).to_owned())
                .chain([port.to_string()])
                .collect(),
            Cut::UdpRange { range } => vec![
                "-D".into(),
                "-p".into(),
                "udp".into(),
                "-d".into(),
                range.network().to_string(),
                "--mask-dst".into(),
                range.netmask().to_string(),
            ],
            Cut::Caller {
                vip,
                port,
                udp,
                caller,
            } => ["-D", "-p", proto(*udp), "-s", &caller.to_string()]
                .iter()
                .map(|s| (*s).to_owned())
                .chain([
                    "-d".into(),
                    vip.to_string(),
                    "--dport".into(),
                    port.to_string(),
                ])
                .collect(),
        };
        match tokio::process::Command::new("conntrack")
            .args(&args)
            .output()
            .await
        {
            // Exit status 1: no entry matched (nothing was open).
            Ok(_) => tracing::debug!(cut = ?c, "cut kernel-path connections"),
            Err(e) => tracing::warn!(
                error = %e,
                "cannot run conntrack (apt-get install conntrack): connections to a service endpoint that left stay open until they close"
            ),
        }
    }
}

/// The iptables-restore input that makes `fast` hold exactly `routes`,
/// each route's chain named by `chain_of`.
pub(crate) fn restore_script(
    fast: &str,
    routes: &[FastRoute],
    chain_of: impl Fn(&FastRoute) -> String,
) -> String {
    let mut chains: BTreeMap<String, &FastRoute> = BTreeMap::new();
    for r in routes {
        chains.insert(chain_of(r), r);
    }
    let mut s = format!("*nat\n:{fast} - [0:0]\n");
    for name in chains.keys() {
        s.push_str(&format!(":{name} - [0:0]\n"));
    }
    for (name, r) in &chains {
        let proto = if r.udp { "udp" } else { "tcp" };
        for c in &r.callers {
            s.push_str(&format!(
                "-A {fast} -s {c}/32 -d {}/32 -p {proto} -m {proto} --dport {} -j {name}\n",
                r.vip, r.port
            ));
        }
        let n = r.endpoints.len();
        for (i, e) in r.endpoints.iter().enumerate() {
            let pick = if i + 1 < n {
                format!(
                    "-m statistic --mode random --probability {:.10} ",
                    1.0 / (n - i) as f64
                )
            } else {
                String::new()
            };
            s.push_str(&format!(
                "-A {name} -p {proto} {pick}-j DNAT --to-destination {e}:{}\n",
                r.port
            ));
        }
    }
    s.push_str("COMMIT\n");
    s
}

/// Runs `iptables-restore --noflush` with `script`.
pub(crate) async fn restore(script: &str) -> Result<(), NetworkError> {
    crate::firewall::run_script("iptables-restore", &["-w", "10", "--noflush"], script).await
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::services::{Endpoint, Service, ServicePort};

    fn svc(vip: u8, policy: LoadBalancing, endpoints: &[(&str, u8)], allow: &[&str]) -> Service {
        Service {
            namespace: "shop".into(),
            name: format!("s{vip}"),
            vip: Ipv4Addr::new(10, 96, 0, vip),
            ports: vec![
                ServicePort {
                    port: 80,
                    udp: false,
                },
                ServicePort {
                    port: 53,
                    udp: true,
                },
            ],
            policy,
            allow_from: allow.iter().map(|s| (*s).to_owned()).collect(),
            weights: BTreeMap::new(),
            endpoints: endpoints
                .iter()
                .enumerate()
                .map(|(i, (node, last))| Endpoint {
                    replica_id: format!("r{i}"),
                    node_id: (*node).into(),
                    address: Some(Ipv4Addr::new(10, 0, 0, *last)),
                    zone: String::new(),
                    region: String::new(),
                })
                .collect(),
        }
    }

    fn callers(list: &[(u8, &str)]) -> HashMap<IpAddr, Caller> {
        list.iter()
            .map(|(last, ns)| {
                (
                    IpAddr::V4(Ipv4Addr::new(10, 0, 0, *last)),
                    Caller::Workload {
                        namespace: (*ns).into(),
                        workload: "w".into(),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn only_services_served_wholly_here_or_by_locality_and_only_admitted_callers() {
        let table = ServiceTable::new(
            "cluster.local",
            vec![
                // Every endpoint here: served by the kernel.
                svc(1, LoadBalancing::RoundRobin, &[("a", 10), ("a", 11)], &[]),
                // One endpoint elsewhere: the proxy balances.
                svc(2, LoadBalancing::RoundRobin, &[("a", 12), ("b", 13)], &[]),
                // Locality with one here: the kernel, to the one here.
                svc(
                    3,
                    LoadBalancing::Locality,
                    &[("a", 14), ("b", 15)],
                    &["web"],
                ),
                // Least connections: always the proxy.
                svc(4, LoadBalancing::LeastConnections, &[("a", 16)], &[]),
                // Nothing here.
                svc(5, LoadBalancing::Locality, &[("b", 17)], &[]),
            ],
        );
        let who = callers(&[(2, "shop"), (3, "web"), (4, "other")]);
        let r = routes(&table, &who, "a");
        // Each served service's UDP port 53 and TCP port 80, in that order.
        let served: Vec<_> = r
            .iter()
            .map(|r| (r.vip.octets()[3], r.port, r.udp))
            .collect();
        assert_eq!(
            served,
            [(1, 53, true), (1, 80, false), (3, 53, true), (3, 80, false)],
            "{r:#?}"
        );
        for r in &r[..2] {
            assert_eq!(
                r.callers,
                BTreeSet::from([Ipv4Addr::new(10, 0, 0, 2)]),
                "its own namespace only"
            );
            assert_eq!(r.endpoints.len(), 2);
        }
        for r in &r[2..] {
            assert_eq!(
                r.callers,
                BTreeSet::from([Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 3)]),
                "its namespace and allowFrom"
            );
            assert_eq!(r.endpoints, BTreeSet::from([Ipv4Addr::new(10, 0, 0, 14)]));
        }
    }

    #[test]
    fn endpoints_that_left_and_callers_no_longer_admitted_are_cut() {
        let who = callers(&[(2, "shop"), (3, "web")]);
        let before = routes(
            &ServiceTable::new(
                "cluster.local",
                vec![svc(
                    3,
                    LoadBalancing::Locality,
                    &[("a", 14), ("a", 15)],
                    &["web"],
                )],
            ),
            &who,
            "a",
        );
        // 15 left; web is no longer allowed.
        let after = ServiceTable::new(
            "cluster.local",
            vec![svc(3, LoadBalancing::Locality, &[("a", 14)], &[])],
        );
        let vip = Ipv4Addr::new(10, 96, 0, 3);
        // Both ports, each in its protocol.
        assert_eq!(
            to_cut(&before, &after, &who, "a"),
            [(53, true), (80, false)]
                .into_iter()
                .flat_map(|(port, udp)| [
                    Cut::Endpoint {
                        vip,
                        port,
                        udp,
                        endpoint: Ipv4Addr::new(10, 0, 0, 15)
                    },
                    Cut::Caller {
                        vip,
                        port,
                        udp,
                        caller: Ipv4Addr::new(10, 0, 0, 3)
                    },
                ])
                .collect::<Vec<_>>()
        );
        // An endpoint that moved behind the proxy (another node joined) is
        // still an endpoint: nothing is cut.
        let moved = ServiceTable::new(
            "cluster.local",
            vec![svc(
                3,
                LoadBalancing::RoundRobin,
                &[("a", 14), ("a", 15), ("b", 16)],
                &["web"],
            )],
        );
        assert!(to_cut(&before, &moved, &who, "a").is_empty());
    }

    #[test]
    fn the_script_spreads_evenly_and_names_every_caller() {
        let r = FastRoute {
            vip: Ipv4Addr::new(10, 96, 0, 1),
            port: 80,
            udp: false,
            callers: BTreeSet::from([Ipv4Addr::new(10, 0, 0, 2)]),
            endpoints: BTreeSet::from([
                Ipv4Addr::new(10, 0, 0, 10),
                Ipv4Addr::new(10, 0, 0, 11),
                Ipv4Addr::new(10, 0, 0, 12),
            ]),
        };
        let s = restore_script("P-FAST", std::slice::from_ref(&r), |_| "P-K-1".into());
        assert!(
            s.starts_with("*nat\n:P-FAST - [0:0]\n:P-K-1 - [0:0]\n"),
            "{s}"
        );
        assert!(s.contains(
            "-A P-FAST -s 10.0.0.2/32 -d 10.96.0.1/32 -p tcp -m tcp --dport 80 -j P-K-1\n"
        ));
        assert!(s.contains("--probability 0.3333333333 -j DNAT --to-destination 10.0.0.10:80\n"));
        assert!(s.contains("--probability 0.5000000000 -j DNAT --to-destination 10.0.0.11:80\n"));
        assert!(s.contains("-A P-K-1 -p tcp -j DNAT --to-destination 10.0.0.12:80\nCOMMIT\n"));
        // A UDP route matches UDP only.
        let udp = FastRoute {
            port: 53,
            udp: true,
            endpoints: BTreeSet::from([Ipv4Addr::new(10, 0, 0, 10)]),
            ..r
        };
        let s = restore_script("P-FAST", &[udp], |_| "P-K-2".into());
        assert!(s.contains(
            "-A P-FAST -s 10.0.0.2/32 -d 10.96.0.1/32 -p udp -m udp --dport 53 -j P-K-2\n"
        ));
        assert!(s.contains("-A P-K-2 -p udp -j DNAT --to-destination 10.0.0.10:53\nCOMMIT\n"));
    }

    #[test]
    fn a_udp_route_that_left_the_kernel_path_is_watched_until_its_endpoint_leaves() {
        let who = callers(&[(2, "shop")]);
        let here = |eps: &[(&str, u8)]| {
            ServiceTable::new(
                "cluster.local",
                vec![svc(1, LoadBalancing::RoundRobin, eps, &[])],
            )
        };
        let served = routes(&here(&[("a", 10)]), &who, "a");
        // An endpoint on another node joins: the service leaves the kernel
        // path, nothing is cut (10 is still an endpoint), its UDP route is
        // watched (a caller's mapping to 10 lives on), its TCP one not.
        let joined = here(&[("a", 10), ("b", 20)]);
        let now = routes(&joined, &who, "a");
        assert!(now.is_empty());
        assert!(to_cut(&served, &joined, &who, "a").is_empty());
        let mut retired = Retired::default();
        retired.update(&served, &now);
        assert!(retired.to_cut(&joined, &who, "a").is_empty());
        assert!(!retired.is_empty());
        // 10 leaves: its UDP mappings are cut, once; nothing is left to
        // watch.
        let left = here(&[("b", 20)]);
        let vip = Ipv4Addr::new(10, 96, 0, 1);
        assert_eq!(
            retired.to_cut(&left, &who, "a"),
            [Cut::Endpoint {
                vip,
                port: 53,
                udp: true,
                endpoint: Ipv4Addr::new(10, 0, 0, 10)
            }]
        );
        assert!(retired.is_empty());
        assert!(retired.to_cut(&left, &who, "a").is_empty());
        // A route served again is no longer watched.
        retired.update(&served, &now);
        retired.update(&now, &served);
        assert!(retired.is_empty());
        // A watched route served again in the same change as one of its
        // endpoints leaves: cut before it stops being watched (the agent
        // cuts what is watched, then updates).
        let two = here(&[("a", 10), ("a", 11)]);
        let served = routes(&two, &who, "a");
        let joined = here(&[("a", 10), ("a", 11), ("b", 20)]);
        let mut retired = Retired::default();
        retired.update(&served, &routes(&joined, &who, "a"));
        let back = here(&[("a", 10)]);
        assert_eq!(
            retired.to_cut(&back, &who, "a"),
            [Cut::Endpoint {
                vip,
                port: 53,
                udp: true,
                endpoint: Ipv4Addr::new(10, 0, 0, 11)
            }]
        );
        retired.update(&[], &routes(&back, &who, "a"));
        assert!(retired.is_empty());
        // What the change itself cut is not watched (nor cut again).
        let gone = here(&[("b", 20)]);
        let now = to_cut(&served, &gone, &who, "a");
        let mut retired = Retired::default();
        retired.update(&served, &routes(&gone, &who, "a"));
        retired.forget(&now);
        assert!(retired.is_empty(), "{retired:?}");
    }
}
