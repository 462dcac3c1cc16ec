//! Workloads: the desired state a user submits.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::validation::{check_dns_label, check_labels, ValidationErrors};

/// Namespace used when none is given.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Resource amounts: CPU in millicores, sizes in bytes, bandwidth in bits/s.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Resources {
    /// CPU in millicores.
    #[serde(default)]
    pub cpu_millis: u64,
    /// Memory in bytes.
    #[serde(default)]
    pub memory_bytes: u64,
    /// Local storage in bytes.
    #[serde(default)]
    pub storage_bytes: u64,
    /// Network bandwidth in bits per second.
    #[serde(default)]
    pub bandwidth_bps: u64,
}

/// What a workload runs and how much of it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadSpec {
    /// OCI image reference.
    pub image: String,
    /// Entrypoint override.
    #[serde(default)]
    pub command: Vec<String>,
    /// Arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Desired replica count.
    #[serde(default = "one")]
    pub replicas: u32,
    /// Resources reserved for each replica.
    #[serde(default)]
    pub requests: Resources,
    /// Hard limits for each replica.
    #[serde(default)]
    pub limits: Resources,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Scheduling priority.
    #[serde(default)]
    pub priority: i32,
}

fn one() -> u32 {
    1
}

/// A workload as stored in the cluster state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    /// Namespace (DNS label).
    pub namespace: String,
    /// Name (DNS label), unique in its namespace.
    pub name: String,
    /// The desired state.
    pub spec: WorkloadSpec,
    /// Increments on every change of the spec; 1 when created.
    pub generation: u64,
    /// Creation time, milliseconds since the Unix epoch (stamped by the proposer).
    pub created_at_ms: i64,
    /// Last update time, milliseconds since the Unix epoch.
    pub updated_at_ms: i64,
    /// Increments when the spec changes in anything but the replica count:
    /// replicas of an older template are replaced by a rollout.
    #[serde(default)]
    pub template: u64,
}

/// What a replica is doing, as its agent last reported (or the coordinator decided).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicaState {
    /// Assigned; the agent has not reported it running yet (pulling, starting).
    #[default]
    Pending,
    /// Its container runs but is not (yet) ready.
    Running,
    /// Running and passing its readiness probe (or it has none).
    Ready,
    /// It exited and its restart policy will not restart it, or it cannot start.
    Failed,
    /// It exited successfully and will not be restarted.
    Succeeded,
}

impl ReplicaState {
    /// Its name as shown and sent on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Running => "Running",
            Self::Ready => "Ready",
            Self::Failed => "Failed",
            Self::Succeeded => "Succeeded",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "Pending" => Self::Pending,
            "Running" => Self::Running,
            "Ready" => Self::Ready,
            "Failed" => Self::Failed,
            "Succeeded" => Self::Succeeded,
            _ => return None,
        })
    }
}

/// One replica of a workload, placed on a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    /// Unique id: `<namespace>.<workload>-<template>-<suffix>`.
    pub id: String,
    /// Workload namespace.
    pub namespace: String,
    /// Workload name.
    pub workload: String,
    /// The workload's template generation this replica runs.
    pub template: u64,
    /// The spec it runs (a copy, so that a rollout can run two at once).
    pub spec: WorkloadSpec,
    /// The node it is assigned to.
    pub node_id: String,
    /// State as last reported.
    pub state: ReplicaState,
    /// Last exit code, if it exited.
    pub exit_code: Option<i32>,
    /// Restarts the agent made.
    pub restarts: u32,
    /// A human-readable detail (last error, OOM kill, probe failure).
    pub message: String,
    /// Placement time, ms since the epoch.
    pub created_at_ms: i64,
    /// Last state change, ms since the epoch.
    pub updated_at_ms: i64,
    /// When it first became Ready, ms since the epoch (0: never).
    #[serde(default)]
    pub ready_at_ms: i64,
}

impl ReplicaRecord {
    /// The key of its workload, `namespace/name`.
    pub fn workload_key(&self) -> String {
        format!("{}/{}", self.namespace, self.workload)
    }
}

/// Largest replica count one workload may ask for.
pub const MAX_REPLICAS: u32 = 10_000;

impl WorkloadSpec {
    /// Whether `other` runs the same containers (differs at most in the replica count).
    pub fn same_template(&self, other: &WorkloadSpec) -> bool {
        let mut a = self.clone();
        a.replicas = other.replicas;
        &a == other
    }

    /// Reports every invalid field, with paths under `prefix` (e.g. `spec`).
    pub fn validate_into(&self, prefix: &str, errs: &mut ValidationErrors) {
        let image = self.image.trim();
        if image.is_empty() {
            errs.push(format!("{prefix}.image"), "must not be empty");
        } else if image.len() > 512 || image.chars().any(char::is_whitespace) {
            errs.push(
                format!("{prefix}.image"),
                "must be an image reference without whitespace, at most 512 characters",
            );
        }
        if self.replicas > MAX_REPLICAS {
            errs.push(
                format!("{prefix}.replicas"),
                format!("{} is above the maximum of {MAX_REPLICAS}", self.replicas),
            );
        }
        for k in self.env.keys() {
            let ok = !k.is_empty()
                && !k.starts_with(|c: char| c.is_ascii_digit())
                && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !ok {
                errs.push(
                    format!("{prefix}.env.{k}"),
                    "environment variable names are letters, digits and '_', not starting with a digit",
                );
            }
        }
        for (field, lim, req) in [
            (
                "cpuMillis",
                self.limits.cpu_millis,
                self.requests.cpu_millis,
            ),
            (
                "memoryBytes",
                self.limits.memory_bytes,
                self.requests.memory_bytes,
            ),
        ] {
            if lim != 0 && lim < req {
                errs.push(
                    format!("{prefix}.limits.{field}"),
                    format!("{lim} is below the request of {req}"),
                );
            }
        }
        check_labels(errs, &format!("{prefix}.labels"), &self.labels);
    }
}

impl Workload {
    /// Reports every invalid field at once.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errs = ValidationErrors::default();
        check_dns_label(&mut errs, "metadata.namespace", &self.namespace);
        check_dns_label(&mut errs, "metadata.name", &self.name);
        self.spec.validate_into("spec", &mut errs);
        errs.into_result()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Manifest {
    api_version: String,
    kind: String,
    metadata: Metadata,
    spec: WorkloadSpec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Metadata {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
}

/// Parses and validates a workload manifest in YAML or JSON
/// (`apiVersion: cloudless.dev/v1`, `kind: Workload`). Unknown fields are rejected.
/// The returned workload has generation 0 and no timestamps: the coordinator stamps them.
pub fn parse_manifest(text: &str) -> Result<Workload, ValidationErrors> {
    let m: Manifest = serde_yaml_ng::from_str(text).map_err(|e| {
        let mut errs = ValidationErrors::default();
        // serde_yaml_ng's message already names the field path, line and column.
        errs.push("manifest", e.to_string());
        errs
    })?;
    let mut errs = ValidationErrors::default();
    if m.api_version != "cloudless.dev/v1" {
        errs.push(
            "apiVersion",
            format!(
                "{:?} is not supported, use \"cloudless.dev/v1\"",
                m.api_version
            ),
        );
    }
    if m.kind != "Workload" {
        errs.push(
            "kind",
            format!("{:?} is not supported, use \"Workload\"", m.kind),
        );
    }
    let w = Workload {
        namespace: m
            .metadata
            .namespace
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned()),
        name: m.metadata.name,
        spec: m.spec,
        generation: 0,
        created_at_ms: 0,
        updated_at_ms: 0,
        template: 0,
    };
    if let Err(e) = w.validate() {
        errs.0.extend(e.0);
    }
    errs.into_result().map(|()| w)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "apiVersion: cloudless.dev/v1\nkind: Workload\nmetadata:\n  name: web\nspec:\n  image: busybox:latest\n  replicas: 3\n  env:\n    GREETING: hi\n  requests:\n    cpuMillis: 100\n";

    #[test]
    fn parses_a_valid_manifest() {
        let w = parse_manifest(GOOD).expect("valid manifest");
        assert_eq!(w.name, "web");
        assert_eq!(w.namespace, DEFAULT_NAMESPACE);
        assert_eq!(w.spec.replicas, 3);
        assert_eq!(w.spec.requests.cpu_millis, 100);
        assert_eq!(w.spec.env.get("GREETING").map(String::as_str), Some("hi"));
    }

    #[test]
    fn rejects_unknown_fields_with_location() {
        let text = GOOD.replace("replicas: 3", "replicas: 3\n  replica: 4");
        let err = parse_manifest(&text).expect_err("unknown field accepted");
        let msg = err.to_string();
        assert!(msg.contains("unknown field `replica`"), "{msg}");
        assert!(msg.contains("spec: unknown field"), "{msg}");
        assert!(msg.contains("line 8"), "{msg}");
    }

    #[test]
    fn names_every_bad_field() {
        let text = GOOD
            .replace("name: web", "name: Web_1")
            .replace("image: busybox:latest", "image: \"\"")
            .replace("GREETING", "1BAD")
            .replace("kind: Workload", "kind: Pod");
        let err = parse_manifest(&text).expect_err("bad manifest accepted");
        let fields: Vec<_> = err.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            ["kind", "metadata.name", "spec.image", "spec.env.1BAD"],
            "{err}"
        );
    }

    #[test]
    fn limit_below_request_is_refused() {
        let text = GOOD.replace(
            "cpuMillis: 100",
            "cpuMillis: 100\n  limits:\n    cpuMillis: 50",
        );
        let err = parse_manifest(&text).expect_err("limit below request accepted");
        assert_eq!(err.0[0].field, "spec.limits.cpuMillis", "{err}");
    }
}
