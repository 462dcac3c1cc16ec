//! Picks a service's endpoint for each new connection, per its policy.
//! Pure: the caller passes where it is and the open connections it counts;
//! the only state is each service's turn (round robin) and its weighted
//! round-robin credits.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::services::{Endpoint, LoadBalancing, Service, ServicePort};

/// Where the connecting node is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Here {
    /// This node.
    pub node_id: String,
    /// Its zone.
    pub zone: String,
    /// Its region.
    pub region: String,
}

/// The turns of every service (keyed by `namespace/name`).
#[derive(Debug, Default)]
pub struct Balancer {
    turns: Mutex<HashMap<String, Turn>>,
}

#[derive(Debug, Default)]
struct Turn {
    next: usize,
    /// Smooth weighted round robin: each endpoint's current credit.
    credit: HashMap<String, i64>,
}

impl Balancer {
    /// The endpoints of `s` to try for a connection (or UDP flow) to
    /// `port`, best first: the policy's pick, then the rest as fallbacks.
    /// Each port of a service takes its own turns (as each virtual service
    /// of kube-proxy's IPVS mode does): a caller of one port does not shift
    /// the turn of another. `open` counts this node's open connections per
    /// replica (least connections).
    pub fn order<'a>(
        &self,
        s: &'a Service,
        port: ServicePort,
        here: &Here,
        open: &HashMap<String, usize>,
    ) -> Vec<&'a Endpoint> {
        let eps: Vec<&Endpoint> = s.endpoints.iter().collect();
        if eps.is_empty() {
            return eps;
        }
        let proto = if port.udp { "udp" } else { "tcp" };
        let key = format!("{}/{}:{}/{proto}", s.namespace, s.name, port.port);
        let mut turns = self
            .turns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let turn = turns.entry(key).or_default();
        match s.policy {
            LoadBalancing::RoundRobin => rotate(eps, &mut turn.next),
            LoadBalancing::LeastConnections => {
                let mut rotated = rotate(eps, &mut turn.next);
                // Stable: ties keep the round-robin order.
                rotated.sort_by_key(|e| open.get(&e.replica_id).copied().unwrap_or(0));
                rotated
            }
            LoadBalancing::Locality => {
                let rank = |e: &Endpoint| {
                    if e.node_id == here.node_id {
                        0
                    } else if !here.zone.is_empty() && e.zone == here.zone {
                        1
                    } else if !here.region.is_empty() && e.region == here.region {
                        2
                    } else {
                        3
                    }
                };
                let mut ranked = eps;
                ranked.sort_by_key(|e| rank(e));
                // Round robin within the nearest group.
                let best = rank(ranked[0]);
                let nearest = ranked.iter().take_while(|e| rank(e) == best).count();
                let rest = ranked.split_off(nearest);
                let mut order = rotate(ranked, &mut turn.next);
                order.extend(rest);
                order
            }
            LoadBalancing::Weighted => {
                let weight = |e: &Endpoint| i64::from(*s.weights.get(&e.zone).unwrap_or(&1));
                // Smooth weighted round robin (as nginx): every endpoint
                // gains its weight; the richest is picked and pays the total.
                let total: i64 = eps.iter().map(|e| weight(e)).sum();
                turn.credit
                    .retain(|id, _| eps.iter().any(|e| &e.replica_id == id));
                let mut best: Option<(&Endpoint, i64)> = None;
                for e in &eps {
                    let c = turn.credit.entry(e.replica_id.clone()).or_insert(0);
                    *c += weight(e);
                    if best.is_none_or(|(_, b)| *c > b) {
                        best = Some((e, *c));
                    }
                }
                let Some((pick, _)) = best else {
                    return eps;
                };
                if let Some(c) = turn.credit.get_mut(&pick.replica_id) {
                    *c -= total;
                }
                let mut order = vec![pick];
                order.extend(
                    eps.iter()
                        .copied()
                        .filter(|e| e.replica_id != pick.replica_id),
                );
                order
            }
        }
    }
}

/// `eps` from the next turn on (and the turn advanced).
fn rotate<'a>(mut eps: Vec<&'a Endpoint>, next: &mut usize) -> Vec<&'a Endpoint> {
    let n = eps.len();
    let start = *next % n;
    *next = next.wrapping_add(1);
    eps.rotate_left(start);
    eps
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    const P: ServicePort = ServicePort {
        port: 80,
        udp: false,
    };
    use crate::services::ServicePort;

    fn ep(id: &str, node: &str, zone: &str, region: &str) -> Endpoint {
        Endpoint {
            replica_id: id.into(),
            node_id: node.into(),
            address: None,
            zone: zone.into(),
            region: region.into(),
        }
    }

    fn service(policy: LoadBalancing, endpoints: Vec<Endpoint>) -> Service {
        Service {
            namespace: "default".into(),
            name: "api".into(),
            vip: [10, 96, 0, 1].into(),
            ports: vec![ServicePort {
                port: 80,
                udp: false,
            }],
            policy,
            allow_from: vec![],
            weights: BTreeMap::new(),
            endpoints,
        }
    }

    fn picks(b: &Balancer, s: &Service, here: &Here, n: usize) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for _ in 0..n {
            let first = b.order(s, P, here, &HashMap::new())[0].replica_id.clone();
            *counts.entry(first).or_insert(0) += 1;
        }
        counts
    }

    #[test]
    fn round_robin_takes_each_in_turn_and_offers_the_rest_as_fallbacks() {
        let s = service(
            LoadBalancing::RoundRobin,
            vec![
                ep("r1", "n1", "a", ""),
                ep("r2", "n2", "b", ""),
                ep("r3", "n3", "c", ""),
            ],
        );
        let b = Balancer::default();
        let here = Here::default();
        let first: Vec<String> = (0..6)
            .map(|_| b.order(&s, P, &here, &HashMap::new())[0].replica_id.clone())
            .collect();
        assert_eq!(first, ["r1", "r2", "r3", "r1", "r2", "r3"]);
        // Each port (and protocol) takes its own turns: callers alternating
        // between two ports still reach every endpoint on each.
        let dns = ServicePort {
            port: 80,
            udp: true,
        };
        let both: Vec<(String, String)> = (0..3)
            .map(|_| {
                let tcp = b.order(&s, P, &here, &HashMap::new())[0].replica_id.clone();
                let udp = b.order(&s, dns, &here, &HashMap::new())[0]
                    .replica_id
                    .clone();
                (tcp, udp)
            })
            .collect();
        let want = |a: &str, b: &str| (a.to_owned(), b.to_owned());
        assert_eq!(both, [want("r1", "r1"), want("r2", "r2"), want("r3", "r3")]);
        assert_eq!(b.order(&s, P, &here, &HashMap::new()).len(), 3);
        assert!(b
            .order(
                &service(LoadBalancing::RoundRobin, vec![]),
                P,
                &here,
                &HashMap::new()
            )
            .is_empty());
    }

    #[test]
    fn locality_prefers_this_node_then_zone_then_region() {
        let eps = vec![
            ep("far", "n4", "z", "other"),
            ep("region", "n3", "c", "eu"),
            ep("zone", "n2", "a", "eu"),
            ep("node", "n1", "a", "eu"),
        ];
        let b = Balancer::default();
        let here = Here {
            node_id: "n1".into(),
            zone: "a".into(),
            region: "eu".into(),
        };
        let s = service(LoadBalancing::Locality, eps.clone());
        let order: Vec<&str> = b
            .order(&s, P, &here, &HashMap::new())
            .iter()
            .map(|e| e.replica_id.as_str())
            .collect();
        assert_eq!(order, ["node", "zone", "region", "far"]);
        // Without a local one, the zone's replicas share the load.
        let s = service(
            LoadBalancing::Locality,
            vec![
                eps[0].clone(),
                ep("z1", "n2", "a", "eu"),
                ep("z2", "n5", "a", "eu"),
            ],
        );
        let counts = picks(&b, &s, &here, 100);
        assert_eq!(
            (counts.get("z1"), counts.get("z2"), counts.get("far")),
            (Some(&50), Some(&50), None)
        );
    }

    #[test]
    fn least_connections_picks_the_least_loaded() {
        let s = service(
            LoadBalancing::LeastConnections,
            vec![
                ep("r1", "n1", "", ""),
                ep("r2", "n2", "", ""),
                ep("r3", "n3", "", ""),
            ],
        );
        let b = Balancer::default();
        let mut open: HashMap<String, usize> = HashMap::new();
        // Long-lived connections: each stays open; they spread evenly.
        for _ in 0..30 {
            let pick = b.order(&s, P, &Here::default(), &open)[0]
                .replica_id
                .clone();
            *open.entry(pick).or_insert(0) += 1;
        }
        assert_eq!(open.values().copied().collect::<Vec<_>>(), [10, 10, 10]);
        open.insert("r2".into(), 0);
        assert_eq!(b.order(&s, P, &Here::default(), &open)[0].replica_id, "r2");
    }

    #[test]
    fn weights_split_connections_between_zones() {
        let mut s = service(
            LoadBalancing::Weighted,
            vec![
                ep("a1", "n1", "a", ""),
                ep("b1", "n2", "b", ""),
                ep("b2", "n3", "b", ""),
            ],
        );
        s.weights = BTreeMap::from([("a".into(), 6), ("b".into(), 2)]);
        let counts = picks(&Balancer::default(), &s, &Here::default(), 1000);
        // a1 weighs 6 of 10, b1 and b2 2 each.
        assert_eq!((counts["a1"], counts["b1"], counts["b2"]), (600, 200, 200));
    }
}
