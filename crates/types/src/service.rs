//! A workload's service: how its declared ports are reached under its
//! virtual IP and DNS name (`spec.service` in a manifest). Every workload
//! with at least one port is a service; this section only tunes it.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::validation::{check_dns_label, ValidationErrors};

/// Most namespaces one `allowFrom` may list.
pub const MAX_ALLOW_FROM: usize = 64;
/// Most zones one `zoneWeights` may list.
pub const MAX_ZONE_WEIGHTS: usize = 64;
/// The largest weight of a zone (`zoneWeights`); a zone not listed weighs 1.
pub const MAX_ZONE_WEIGHT: u32 = 1000;
/// The `allowFrom` entry that admits every namespace.
pub const ALL_NAMESPACES: &str = "*";

/// How a service spreads new connections over its Ready endpoints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LoadBalancing {
    /// Each endpoint in turn.
    #[default]
    RoundRobin,
    /// The endpoint with the fewest open connections from the calling node.
    LeastConnections,
    /// Same node, else same zone, else same region, else any.
    Locality,
    /// Each zone's endpoints get a share of the connections in proportion
    /// to the zone's weight (`zoneWeights`).
    Weighted,
}

/// `spec.service`: every field has a default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceSpec {
    /// How connections are spread (default `RoundRobin`).
    #[serde(default)]
    pub load_balancing: LoadBalancing,
    /// Namespaces besides the workload's own whose workloads may connect
    /// (each a DNS label, or `*` for every namespace). Empty: its own only.
    #[serde(default)]
    pub allow_from: Vec<String>,
    /// With `Weighted`: each zone's share (1..=1000); a zone not listed
    /// weighs 1.
    #[serde(default)]
    pub zone_weights: BTreeMap<String, u32>,
}

impl ServiceSpec {
    /// Whether a workload of namespace `caller` may connect to a service of
    /// namespace `own` with these settings.
    pub fn admits(&self, own: &str, caller: &str) -> bool {
        caller == own
            || self
                .allow_from
                .iter()
                .any(|n| n == caller || n == ALL_NAMESPACES)
    }

    /// Reports every invalid field with paths under `prefix`
    /// (`spec.service`); `has_ports` says whether the workload declares any
    /// (without one it has no service to tune).
    pub fn validate_into(&self, prefix: &str, has_ports: bool, errs: &mut ValidationErrors) {
        if !has_ports && self != &ServiceSpec::default() {
            errs.push(
                prefix.to_owned(),
                "the workload declares no ports, so it has no service to configure (add spec.ports or remove spec.service)",
            );
        }
        if self.allow_from.len() > MAX_ALLOW_FROM {
            errs.push(
                format!("{prefix}.allowFrom"),
                format!(
                    "{} namespaces; at most {MAX_ALLOW_FROM} are allowed (\"*\" admits every namespace)",
                    self.allow_from.len()
                ),
            );
        }
        let mut seen = HashSet::new();
        for (i, ns) in self.allow_from.iter().enumerate() {
            let f = format!("{prefix}.allowFrom[{i}]");
            if ns != ALL_NAMESPACES {
                check_dns_label(errs, &f, ns);
            }
            if !seen.insert(ns.as_str()) {
                errs.push(f, format!("{ns:?} is listed twice"));
            }
        }
        if !self.zone_weights.is_empty() && self.load_balancing != LoadBalancing::Weighted {
            errs.push(
                format!("{prefix}.zoneWeights"),
                format!(
                    "only apply with loadBalancing Weighted, not {}",
                    crate::ClosedSet::name(self.load_balancing)
                ),
            );
        }
        if self.zone_weights.len() > MAX_ZONE_WEIGHTS {
            errs.push(
                format!("{prefix}.zoneWeights"),
                format!(
                    "{} zones; at most {MAX_ZONE_WEIGHTS} are allowed",
                    self.zone_weights.len()
                ),
            );
        }
        for (zone, weight) in &self.zone_weights {
            let f = format!("{prefix}.zoneWeights.{zone}");
            if zone.is_empty() || zone.len() > 253 || zone.chars().any(char::is_control) {
                errs.push(
                    f.clone(),
                    "a zone is a node label value: 1-253 characters, no control characters",
                );
            }
            if !(1..=MAX_ZONE_WEIGHT).contains(weight) {
                errs.push(
                    f,
                    format!(
                        "{weight} is outside 1..={MAX_ZONE_WEIGHT} (a zone not listed weighs 1)"
                    ),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(errs: &ValidationErrors) -> Vec<&str> {
        errs.0.iter().map(|e| e.field.as_str()).collect()
    }

    #[test]
    fn the_default_service_admits_its_own_namespace_only() {
        let s = ServiceSpec::default();
        assert_eq!(s.load_balancing, LoadBalancing::RoundRobin);
        assert!(s.admits("prod", "prod"));
        assert!(!s.admits("prod", "dev"));
        let listed = ServiceSpec {
            allow_from: vec!["dev".into()],
            ..ServiceSpec::default()
        };
        assert!(listed.admits("prod", "dev") && !listed.admits("prod", "ops"));
        let all = ServiceSpec {
            allow_from: vec![ALL_NAMESPACES.into()],
            ..ServiceSpec::default()
        };
        assert!(all.admits("prod", "ops"));
    }

    #[test]
    fn every_bad_service_field_is_named() {
        let s = ServiceSpec {
            load_balancing: LoadBalancing::Locality,
            allow_from: vec!["dev".into(), "Bad_NS".into(), "dev".into(), "*".into()],
            zone_weights: [("a".to_owned(), 0), ("b".to_owned(), 1001)].into(),
        };
        let mut errs = ValidationErrors::default();
        s.validate_into("spec.service", true, &mut errs);
        assert_eq!(
            fields(&errs),
            [
                "spec.service.allowFrom[1]",
                "spec.service.allowFrom[2]",
                "spec.service.zoneWeights",
                "spec.service.zoneWeights.a",
                "spec.service.zoneWeights.b",
            ],
            "{errs}"
        );
        assert!(errs.0[2].problem.contains("Weighted"), "{errs}");
        assert!(errs.0[3].problem.contains("1..=1000"), "{errs}");
    }

    #[test]
    fn a_service_needs_ports_unless_it_is_the_default() {
        let mut errs = ValidationErrors::default();
        ServiceSpec::default().validate_into("spec.service", false, &mut errs);
        assert_eq!(errs.0, []);
        let s = ServiceSpec {
            load_balancing: LoadBalancing::LeastConnections,
            ..ServiceSpec::default()
        };
        s.validate_into("spec.service", false, &mut errs);
        assert_eq!(fields(&errs), ["spec.service"], "{errs}");
    }

    #[test]
    fn weights_are_bounded_and_checked_only_with_weighted() {
        let s = ServiceSpec {
            load_balancing: LoadBalancing::Weighted,
            zone_weights: (0..=MAX_ZONE_WEIGHTS)
                .map(|i| (format!("z{i}"), 1))
                .collect(),
            ..ServiceSpec::default()
        };
        let mut errs = ValidationErrors::default();
        s.validate_into("spec.service", true, &mut errs);
        assert_eq!(fields(&errs), ["spec.service.zoneWeights"], "{errs}");
        let ok = ServiceSpec {
            load_balancing: LoadBalancing::Weighted,
            zone_weights: [("a".to_owned(), 1000), ("b".to_owned(), 1)].into(),
            ..ServiceSpec::default()
        };
        let mut errs = ValidationErrors::default();
        ok.validate_into("spec.service", true, &mut errs);
        assert_eq!(errs.0, []);
    }
}
