//! The cluster-wide configuration record kept in Raft.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::validation::{check_labels, ValidationErrors};
use crate::NetworkConfig;

/// Weights of the scheduler's scoring factors. Each is in `[0, 1]` and the
/// five add up to 1 (within 0.001).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SchedulerWeights {
    /// Weight of region/zone locality. Default 0.30.
    pub locality: f64,
    /// Weight of node reliability. Default 0.25.
    pub reliability: f64,
    /// Weight of cost. Default 0.15.
    pub cost: f64,
    /// Weight of utilisation. Default 0.20.
    pub utilization: f64,
    /// Weight of the network penalty (subtracted). Default 0.10.
    pub network_penalty: f64,
}

impl Default for SchedulerWeights {
    fn default() -> Self {
        Self {
            locality: 0.30,
            reliability: 0.25,
            cost: 0.15,
            utilization: 0.20,
            network_penalty: 0.10,
        }
    }
}

/// The replicated cluster configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterConfig {
    /// Human-readable cluster name. Default "cloudless".
    pub cluster_name: String,
    /// Agent heartbeat period in milliseconds. Default 1000.
    pub heartbeat_interval_ms: u64,
    /// Missed heartbeats before a node is Suspect. Default 3.
    pub suspect_after_missed_heartbeats: u32,
    /// Silence in milliseconds before a node is Down. Default 5000.
    pub down_after_ms: u64,
    /// Grace after a leader change before any node may be declared Down. Default 10000.
    pub leader_grace_ms: u64,
    /// Lifetime of node certificates in seconds; agents renew at two thirds.
    /// Default 86400 (24 h).
    #[serde(default = "default_node_cert_lifetime_s")]
    pub node_cert_lifetime_s: u64,
    /// Scheduler scoring weights.
    pub scheduler_weights: SchedulerWeights,
    /// Free-form labels.
    pub labels: BTreeMap<String, String>,
    /// Secret audit records older than this are dropped. Default 90.
    #[serde(default = "default_audit_retention_days")]
    pub audit_retention_days: u32,
    /// Largest secret (its values together) in bytes. Default 65536.
    #[serde(default = "default_secret_max_bytes")]
    pub secret_max_bytes: u32,
    /// Most secret audit records kept; the oldest go first beyond it.
    /// Default 100000 (about 25 MB); 1000..=10000000.
    #[serde(default = "default_audit_max_records")]
    pub audit_max_records: u32,
    /// Repeated reads, token mints and refusals by one actor on one secret
    /// within this many seconds are one audit record with a count. Default
    /// 3600; 1..=86400.
    #[serde(default = "default_audit_aggregate_window_s")]
    pub audit_aggregate_window_s: u32,
    /// Most access token records kept; beyond it the soonest to expire go
    /// first (their tokens are then refused as unknown). Default 100000;
    /// 1000..=10000000.
    #[serde(default = "default_access_token_max_records")]
    pub access_token_max_records: u32,
    /// How long after its certificate expired a node may still rejoin
    /// without a join token, by proving it holds the old certificate's key,
    /// in seconds. 0 turns rejoining off. Default 2592000 (30 days);
    /// 0..=31536000 (one year).
    #[serde(default = "default_node_rejoin_grace_s")]
    pub node_rejoin_grace_s: u64,
    /// Lifetime of admin certificates in seconds; `cloudlessctl` renews its
    /// own with two thirds gone. Default 604800 (7 days); 10..=31536000
    /// (below an hour only for tests).
    #[serde(default = "default_admin_cert_lifetime_s")]
    pub admin_cert_lifetime_s: u64,
    /// The replica network: address ranges, cluster domain and the default
    /// egress policy (see [`NetworkConfig`] for each default).
    #[serde(default)]
    pub network: NetworkConfig,
}

fn default_admin_cert_lifetime_s() -> u64 {
    ClusterConfig::DEFAULT_ADMIN_CERT_LIFETIME_S
}

fn default_audit_max_records() -> u32 {
    crate::DEFAULT_AUDIT_MAX_RECORDS
}

fn default_audit_aggregate_window_s() -> u32 {
    crate::DEFAULT_AUDIT_AGGREGATE_WINDOW_S
}

fn default_access_token_max_records() -> u32 {
    crate::DEFAULT_ACCESS_TOKEN_MAX_RECORDS
}

/// Default of [`ClusterConfig::node_rejoin_grace_s`]: 30 days.
pub const DEFAULT_NODE_REJOIN_GRACE_S: u64 = 30 * 24 * 3600;
/// Longest [`ClusterConfig::node_rejoin_grace_s`]: one year.
pub const MAX_NODE_REJOIN_GRACE_S: u64 = 365 * 24 * 3600;

fn default_node_rejoin_grace_s() -> u64 {
    DEFAULT_NODE_REJOIN_GRACE_S
}

fn default_audit_retention_days() -> u32 {
    crate::DEFAULT_AUDIT_RETENTION_DAYS
}

fn default_secret_max_bytes() -> u32 {
    crate::DEFAULT_SECRET_LIMIT as u32
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            cluster_name: "cloudless".to_owned(),
            heartbeat_interval_ms: 1000,
            suspect_after_missed_heartbeats: 3,
            down_after_ms: 5000,
            leader_grace_ms: 10_000,
            node_cert_lifetime_s: default_node_cert_lifetime_s(),
            scheduler_weights: SchedulerWeights::default(),
            labels: BTreeMap::new(),
            audit_retention_days: default_audit_retention_days(),
            secret_max_bytes: default_secret_max_bytes(),
            audit_max_records: default_audit_max_records(),
            audit_aggregate_window_s: default_audit_aggregate_window_s(),
            access_token_max_records: default_access_token_max_records(),
            admin_cert_lifetime_s: default_admin_cert_lifetime_s(),
            node_rejoin_grace_s: default_node_rejoin_grace_s(),
            network: NetworkConfig::default(),
        }
    }
}

fn default_node_cert_lifetime_s() -> u64 {
    24 * 3600
}

impl ClusterConfig {
    /// Default lifetime of admin certificates: 7 days.
    pub const DEFAULT_ADMIN_CERT_LIFETIME_S: u64 = 7 * 24 * 3600;

    /// Reports every invalid field at once.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errs = ValidationErrors::default();
        if self.cluster_name.trim().is_empty() || self.cluster_name.len() > 128 {
            errs.push("cluster_name", "must be 1-128 characters");
        }
        if !(100..=60_000).contains(&self.heartbeat_interval_ms) {
            errs.push(
                "heartbeat_interval_ms",
                format!("{} is outside 100..=60000", self.heartbeat_interval_ms),
            );
        }
        if !(1..=100).contains(&self.suspect_after_missed_heartbeats) {
            errs.push(
                "suspect_after_missed_heartbeats",
                format!(
                    "{} is outside 1..=100",
                    self.suspect_after_missed_heartbeats
                ),
            );
        }
        if self.down_after_ms <= self.heartbeat_interval_ms {
            errs.push(
                "down_after_ms",
                format!(
                    "{} must be greater than heartbeat_interval_ms ({})",
                    self.down_after_ms, self.heartbeat_interval_ms
                ),
            );
        }
        if self.leader_grace_ms > 600_000 {
            errs.push(
                "leader_grace_ms",
                format!("{} is above 600000", self.leader_grace_ms),
            );
        }
        if !(1..=3650).contains(&self.audit_retention_days) {
            errs.push(
                "audit_retention_days",
                format!("{} is outside 1..=3650", self.audit_retention_days),
            );
        }
        if !(1..=1 << 20).contains(&self.secret_max_bytes) {
            errs.push(
                "secret_max_bytes",
                format!("{} is outside 1..=1048576", self.secret_max_bytes),
            );
        }
        if !(1000..=10_000_000).contains(&self.audit_max_records) {
            errs.push(
                "audit_max_records",
                format!("{} is outside 1000..=10000000", self.audit_max_records),
            );
        }
        if !(1..=86_400).contains(&self.audit_aggregate_window_s) {
            errs.push(
                "audit_aggregate_window_s",
                format!(
                    "{} is outside 1..=86400 (one day)",
                    self.audit_aggregate_window_s
                ),
            );
        }
        if !(1000..=10_000_000).contains(&self.access_token_max_records) {
            errs.push(
                "access_token_max_records",
                format!(
                    "{} is outside 1000..=10000000",
                    self.access_token_max_records
                ),
            );
        }
        if !(10..=365 * 24 * 3600).contains(&self.admin_cert_lifetime_s) {
            errs.push(
                "admin_cert_lifetime_s",
                format!(
                    "{} is outside 10..=31536000 (ten seconds to a year)",
                    self.admin_cert_lifetime_s
                ),
            );
        }
        if !(60..=31 * 24 * 3600).contains(&self.node_cert_lifetime_s) {
            errs.push(
                "node_cert_lifetime_s",
                format!(
                    "{} is outside 60..=2678400 (one minute to 31 days)",
                    self.node_cert_lifetime_s
                ),
            );
        }
        if self.node_rejoin_grace_s > MAX_NODE_REJOIN_GRACE_S {
            errs.push(
                "node_rejoin_grace_s",
                format!(
                    "{} is above {MAX_NODE_REJOIN_GRACE_S} (one year); 0 turns rejoining off",
                    self.node_rejoin_grace_s
                ),
            );
        }
        let w = &self.scheduler_weights;
        for (name, v) in [
            ("locality", w.locality),
            ("reliability", w.reliability),
            ("cost", w.cost),
            ("utilization", w.utilization),
            ("network_penalty", w.network_penalty),
        ] {
            if !(0.0..=1.0).contains(&v) {
                errs.push(
                    format!("scheduler_weights.{name}"),
                    format!("{v} is outside 0..=1"),
                );
            }
        }
        let sum = w.locality + w.reliability + w.cost + w.utilization + w.network_penalty;
        if (sum - 1.0).abs() > 0.001 {
            errs.push(
                "scheduler_weights",
                format!("the five weights must add up to 1, not {sum:.3}"),
            );
        }
        check_labels(&mut errs, "labels", &self.labels);
        self.network.validate_into("network", &mut errs);
        errs.into_result()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid() {
        assert_eq!(ClusterConfig::default().validate(), Ok(()));
    }

    #[test]
    fn reports_every_bad_field() {
        let mut c = ClusterConfig {
            heartbeat_interval_ms: 10,
            cluster_name: String::new(),
            ..ClusterConfig::default()
        };
        c.scheduler_weights.cost = 2.0;
        let errs = c.validate().expect_err("invalid config accepted");
        let fields: Vec<_> = errs.0.iter().map(|e| e.field.as_str()).collect();
        assert!(fields.contains(&"cluster_name"), "{errs}");
        assert!(fields.contains(&"heartbeat_interval_ms"), "{errs}");
        assert!(fields.contains(&"scheduler_weights.cost"), "{errs}");
        assert!(fields.contains(&"scheduler_weights"), "{errs}");
    }

    #[test]
    fn state_caps_are_bounded_and_default_when_absent() {
        let c = ClusterConfig {
            audit_max_records: 10,
            audit_aggregate_window_s: 0,
            access_token_max_records: 20_000_000,
            ..ClusterConfig::default()
        };
        let errs = c.validate().expect_err("caps out of range accepted");
        let fields: Vec<_> = errs.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "audit_max_records",
                "audit_aggregate_window_s",
                "access_token_max_records"
            ],
            "{errs}"
        );
        // A record stored before the caps existed reads with the defaults.
        let mut old = serde_json::to_value(ClusterConfig::default()).expect("json");
        let obj = old.as_object_mut().expect("object");
        obj.remove("audit_max_records");
        obj.remove("audit_aggregate_window_s");
        obj.remove("access_token_max_records");
        obj.remove("node_rejoin_grace_s");
        obj.remove("network");
        let back: ClusterConfig = serde_json::from_value(old).expect("old record");
        assert_eq!(back, ClusterConfig::default());
    }

    #[test]
    fn the_network_section_defaults_field_by_field_and_is_validated() {
        // A network section missing fields (a later release may add some)
        // takes the defaults of the missing ones.
        let mut v = serde_json::to_value(ClusterConfig::default()).expect("json");
        v["network"] = serde_json::json!({ "cluster_cidr": "10.200.0.0/16" });
        let c: ClusterConfig = serde_json::from_value(v).expect("partial network");
        assert_eq!(c.network.cluster_cidr, "10.200.0.0/16");
        assert_eq!(c.network.node_prefix_len, 24);
        assert_eq!(c.network.default_egress, crate::EgressPolicy::allow_all());
        assert_eq!(c.validate(), Ok(()));
        let mut bad = c;
        bad.network.service_cidr = "10.200.16.0/20".into();
        let errs = bad.validate().expect_err("overlapping ranges accepted");
        let fields: Vec<_> = errs.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["network.service_cidr"], "{errs}");
    }

    #[test]
    fn rejoin_grace_is_bounded_and_zero_turns_it_off() {
        let off = ClusterConfig {
            node_rejoin_grace_s: 0,
            ..ClusterConfig::default()
        };
        assert_eq!(off.validate(), Ok(()));
        let c = ClusterConfig {
            node_rejoin_grace_s: MAX_NODE_REJOIN_GRACE_S + 1,
            ..ClusterConfig::default()
        };
        let errs = c.validate().expect_err("grace above a year accepted");
        let fields: Vec<_> = errs.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["node_rejoin_grace_s"], "{errs}");
        assert_eq!(
            ClusterConfig::default().node_rejoin_grace_s,
            DEFAULT_NODE_REJOIN_GRACE_S
        );
    }
}
