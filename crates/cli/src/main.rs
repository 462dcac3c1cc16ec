//! `cloudlessctl`: the Cloudless command-line client.
//!
//! Exit codes: 0 success; 1 the server refused or failed the request; 2 bad
//! usage or input (including manifest validation); 3 no coordinator reachable.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use cloudless_client::{
    BackoffPolicy, CallError, ChannelOptions, ClientConfig, Cluster, ClusterOptions, RetryPolicy,
};
use cloudless_proto::v1::cluster_service_client::ClusterServiceClient;
use cloudless_proto::v1::node_service_client::NodeServiceClient;
use cloudless_proto::v1::workload_service_client::WorkloadServiceClient;
use cloudless_proto::v1::{self as pb, ReadConsistency, ReadOptions, WriteOptions};
use tonic::transport::Channel;
use tonic::Code;

mod admin;
mod secrets;

#[derive(Parser, Debug)]
#[command(name = "cloudlessctl", version, about = "Manage a Cloudless cluster")]
struct Cli {
    /// Coordinator addresses (host:port), comma-separated; tried in order.
    /// Default: the config file's `servers`, else 127.0.0.1:7400.
    #[arg(long, short = 's', env = "CLOUDLESS_SERVER", global = true)]
    server: Option<String>,
    /// cloudlessctl config (written by `cloudless-coordinator init` to
    /// <data_dir>/admin/cloudlessctl.toml): servers and mTLS credentials.
    #[arg(long, env = "CLOUDLESSCTL_CONFIG", global = true)]
    config: Option<std::path::PathBuf>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    /// Serve reads from the answering coordinator's local state (may be stale).
    #[arg(long, global = true)]
    stale: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Output {
    Table,
    Json,
    Yaml,
}

/// The structured format chosen with `-o` (JSON unless YAML was asked for).
static YAML: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Coordinator membership and status.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Admin certificates: renew yours, issue to others, revoke, list.
    #[command(subcommand)]
    Admin(admin::AdminCmd),
    /// Create or update the workload in a manifest (YAML or JSON).
    Apply {
        /// Manifest file, or - for standard input.
        #[arg(short = 'f', long = "filename")]
        file: String,
        /// Idempotency key: a retry with the same key is applied once.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Wait until every replica of the new template is Ready, showing progress.
        #[arg(long)]
        wait: bool,
        /// Longest wait with --wait, in seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// List workloads (or show one), nodes, or replicas.
    Get {
        /// What to get.
        #[arg(value_parser = ["workloads", "workload", "wl", "replicas", "replica", "nodes", "node"])]
        kind: String,
        /// A workload name.
        name: Option<String>,
        /// Namespace (default: all for lists, "default" for one).
        #[arg(long, short = 'n')]
        namespace: Option<String>,
    },
    /// Delete a workload.
    Delete {
        #[arg(value_parser = ["workload", "wl"])]
        kind: String,
        name: String,
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        /// Idempotency key: a retry with the same key is applied once.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Join tokens for enrolling devices.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Secrets, their access tokens, the master key and the audit log.
    #[command(subcommand)]
    Secrets(secrets::SecretsCmd),
    /// Enrolled nodes.
    #[command(subcommand)]
    Node(NodeCmd),
    /// A workload's spec, status and replicas (with node and state).
    Describe {
        #[arg(value_parser = ["workload", "wl"])]
        kind: String,
        name: String,
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
    },
    /// Rollout progress of a workload.
    #[command(subcommand)]
    Rollout(RolloutCmd),
    /// Container output of a workload's replicas (through the coordinators
    /// and the agents' tunnels).
    Logs {
        /// Workload name.
        name: String,
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        /// Only this replica.
        #[arg(long)]
        replica: Option<String>,
        /// Keep streaming new output.
        #[arg(long, short = 'f')]
        follow: bool,
        /// Lines of history per replica (0: all).
        #[arg(long, default_value_t = 0)]
        tail: u32,
    },
    /// Events: placements, losses, rollbacks, node phase changes.
    Events {
        /// Only this workload's.
        name: Option<String>,
        /// Only this namespace's (default: everything, nodes included).
        #[arg(long, short = 'n')]
        namespace: Option<String>,
        /// Keep streaming new events.
        #[arg(long, short = 'w')]
        watch: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completion { shell: clap_complete::Shell },
    /// Run a command in a replica's container (through the coordinators and
    /// the agent's tunnel); prints its output and exits with its exit code.
    Exec {
        /// Workload name.
        name: String,
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        /// This replica (default: the oldest Ready one).
        #[arg(long)]
        replica: Option<String>,
        /// Kill the command after this many seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u32,
        /// The command and its arguments (after --).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Change a workload's replica count.
    Scale {
        #[arg(value_parser = ["workload", "wl"])]
        kind: String,
        name: String,
        #[arg(long)]
        replicas: u32,
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        /// Idempotency key: a retry with the same key is applied once.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum RolloutCmd {
    /// Show progress (exit 0 when complete, 3 when not); --wait blocks until complete.
    Status {
        name: String,
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// The templates a workload ran (newest last) and why each was made.
    History {
        name: String,
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        /// Show this revision's spec in full.
        #[arg(long)]
        revision: Option<u64>,
    },
    /// Go back to an earlier template (the previous one by default); it
    /// rolls out as a new revision under the workload's rollout strategy.
    Undo {
        name: String,
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        /// The revision to restore.
        #[arg(long)]
        to_revision: Option<u64>,
        /// Idempotency key: a retry with the same key is applied once.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Wait until the restored template is rolled out.
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCmd {
    /// Create a join token and print it (shown once; only its id is stored in clear).
    Create {
        /// Lifetime: 90s, 30m, 1h, 7d (max 30d).
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: u64,
        /// Enrollments it allows.
        #[arg(long, default_value_t = 1)]
        max_uses: u32,
        /// Label for nodes enrolled with it: key=value (repeatable).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// List tokens (ids, remaining uses, expiry; never the tokens).
    List,
    /// Revoke a token by id.
    Revoke { token_id: String },
}

#[derive(Subcommand, Debug)]
enum NodeCmd {
    /// List nodes.
    List,
    /// Show one node.
    Get { id: String },
    /// Stop placing new replicas on a node.
    Cordon { id: String },
    /// Allow placements again (also ends a drain).
    Uncordon { id: String },
    /// Cordon and move the node's replicas to other nodes, each workload
    /// keeping its availability floor; waits until the node holds none,
    /// showing progress (`uncordon` ends a drain).
    Drain {
        id: String,
        /// Longest wait (90, 90s, 5m, 1h); the drain goes on after it.
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        timeout: u64,
    },
    /// Forget a node.
    Remove { id: String },
    /// Set placement labels (key=value) or remove them (key-). Only these
    /// and the join token's labels steer placement; what a node reports
    /// about itself is shown as reportedLabels and never used.
    Label {
        id: String,
        /// key=value to set, key- to remove.
        #[arg(required = true)]
        changes: Vec<String>,
    },
    /// Trust the node's reported capacity for placement (after a jump was held).
    AcceptCapacity { id: String },
}

/// Splits `node label` arguments into labels to set and keys to remove
/// (kubectl style: `key=value` sets, `key-` removes).
fn parse_label_changes(
    args: &[String],
) -> Result<(std::collections::HashMap<String, String>, Vec<String>), String> {
    let mut set = std::collections::HashMap::new();
    let mut remove = Vec::new();
    for a in args {
        if let Some((k, v)) = a.split_once('=') {
            set.insert(k.to_owned(), v.to_owned());
        } else if let Some(k) = a.strip_suffix('-').filter(|k| !k.is_empty()) {
            remove.push(k.to_owned());
        } else {
            return Err(format!("{a:?} is neither key=value nor key-"));
        }
    }
    Ok((set, remove))
}

/// Parses 90, 90s, 30m, 1h, 7d into seconds (positive).
fn parse_duration(s: &str) -> Result<u64, String> {
    match cloudless_types::parse_duration_secs(s)? {
        0 => Err(format!("{s:?} must be a positive duration")),
        n => Ok(n),
    }
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

fn fmt_ms(ms: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let secs = (ms - now) / 1000;
    if secs >= 0 {
        format!("in {}", human(secs))
    } else {
        format!("{} ago", human(-secs))
    }
}

fn human(secs: i64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

fn phase_name(n: &pb::Node) -> &'static str {
    match pb::NodePhase::try_from(n.phase).unwrap_or_default() {
        pb::NodePhase::Pending => "Pending",
        pb::NodePhase::Ready => "Ready",
        pb::NodePhase::Suspect => "Suspect",
        pb::NodePhase::Down => "Down",
        pb::NodePhase::Unspecified => "Unknown",
    }
}

fn node_json(n: &pb::Node) -> serde_json::Value {
    let res = |r: &Option<pb::Resources>| {
        r.as_ref().map(
            |r| serde_json::json!({ "cpuMillis": r.cpu_millis, "memoryBytes": r.memory_bytes }),
        )
    };
    serde_json::json!({ "id": n.id, "name": n.name, "phase": phase_name(n), "phaseSinceMs": n.phase_since_ms,
        "cordoned": n.cordoned, "draining": n.draining, "labels": n.labels, "zone": n.zone, "region": n.region,
        "arch": n.arch, "capacity": res(&n.capacity), "usage": res(&n.usage), "conditions": n.conditions,
        "reportedLabels": n.reported_labels, "reportedCapacity": res(&n.reported_capacity),
        "capacityUnverified": n.capacity_unverified,
        "powerSource": n.power_source, "batteryPercent": n.battery_percent, "reliability": n.reliability,
        "downCount": n.down_count, "lastHeartbeatMs": n.last_heartbeat_ms, "overlayAddresses": n.overlay_addresses,
        "enrolledAtMs": n.enrolled_at_ms, "certNotAfterMs": n.cert_not_after_ms })
}

#[derive(Subcommand, Debug)]
enum ClusterCmd {
    /// Members, leader, term, and commit/applied index per coordinator.
    Status,
    /// Remove a coordinator by node id.
    Remove { node_id: u64 },
    /// Show the cluster configuration record.
    Config,
    /// Change cluster configuration keys, e.g. `cluster set down_after_ms=8000`.
    /// Keys: cluster_name, heartbeat_interval_ms, suspect_after_missed_heartbeats,
    /// down_after_ms, leader_grace_ms, node_cert_lifetime_s,
    /// audit_retention_days, secret_max_bytes, audit_max_records,
    /// audit_aggregate_window_s, access_token_max_records, admin_cert_lifetime_s,
    /// node_rejoin_grace_s,
    /// scheduler_weights.{locality,reliability,cost,utilization,network_penalty}.
    Set {
        /// KEY=VALUE pairs.
        #[arg(required = true)]
        settings: Vec<String>,
    },
}

/// Applies `key=value` to a cluster configuration; the error names the key.
fn set_config_key(c: &mut pb::ClusterConfig, setting: &str) -> Result<(), String> {
    let (key, value) = setting
        .split_once('=')
        .ok_or_else(|| format!("{setting:?}: expected KEY=VALUE"))?;
    let int = |v: &str| {
        v.parse::<u64>()
            .map_err(|_| format!("{key}: {v:?} is not a non-negative integer"))
    };
    let float = |v: &str| {
        v.parse::<f64>()
            .map_err(|_| format!("{key}: {v:?} is not a number"))
    };
    let w = c.scheduler_weights.get_or_insert_with(Default::default);
    match key {
        "cluster_name" => c.cluster_name = value.to_owned(),
        "heartbeat_interval_ms" => c.heartbeat_interval_ms = int(value)?,
        "suspect_after_missed_heartbeats" => {
            c.suspect_after_missed_heartbeats =
                u32::try_from(int(value)?).map_err(|_| format!("{key}: {value} is too large"))?
        }
        "down_after_ms" => c.down_after_ms = int(value)?,
        "leader_grace_ms" => c.leader_grace_ms = int(value)?,
        "node_cert_lifetime_s" => c.node_cert_lifetime_s = int(value)?,
        "audit_retention_days" => {
            c.audit_retention_days =
                u32::try_from(int(value)?).map_err(|_| format!("{key}: {value} is too large"))?
        }
        "secret_max_bytes" => {
            c.secret_max_bytes =
                u32::try_from(int(value)?).map_err(|_| format!("{key}: {value} is too large"))?
        }
        "audit_max_records" => {
            c.audit_max_records =
                u32::try_from(int(value)?).map_err(|_| format!("{key}: {value} is too large"))?
        }
        "audit_aggregate_window_s" => {
            c.audit_aggregate_window_s =
                u32::try_from(int(value)?).map_err(|_| format!("{key}: {value} is too large"))?
        }
        "admin_cert_lifetime_s" => c.admin_cert_lifetime_s = Some(int(value)?),
        "access_token_max_records" => {
            c.access_token_max_records =
                u32::try_from(int(value)?).map_err(|_| format!("{key}: {value} is too large"))?
        }
        "node_rejoin_grace_s" => c.node_rejoin_grace_s = Some(int(value)?),
        "scheduler_weights.locality" => w.locality = float(value)?,
        "scheduler_weights.reliability" => w.reliability = float(value)?,
        "scheduler_weights.cost" => w.cost = float(value)?,
        "scheduler_weights.utilization" => w.utilization = float(value)?,
        "scheduler_weights.network_penalty" => w.network_penalty = float(value)?,
        other => return Err(format!("{other:?} is not a cluster configuration key")),
    }
    Ok(())
}

/// A failure with its exit code.
struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl Failure {
    /// Bad usage or input (exit code 2).
    fn usage(message: &str) -> Self {
        Failure {
            code: 2,
            error: anyhow::anyhow!("{message}"),
        }
    }
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure {
            code: 2,
            error: e.into(),
        }
    }
}

fn status_failure(s: tonic::Status) -> Failure {
    let code = if s.code() == Code::Unavailable { 3 } else { 1 };
    Failure {
        code,
        error: anyhow::anyhow!("{}: {}", code_name(s.code()), s.message()),
    }
}

fn code_name(c: Code) -> &'static str {
    match c {
        Code::InvalidArgument => "invalid argument",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::FailedPrecondition => "failed precondition",
        Code::Aborted => "conflict",
        Code::Unavailable => "unavailable",
        Code::Unimplemented => "not implemented",
        Code::DeadlineExceeded => "timed out",
        _ => "error",
    }
}

/// How `cloudlessctl` connects: 2 s to connect, 30 s per call; a call that
/// finds no leader is retried (every server, twice, then once more) with
/// pauses of at most 0.5 s.
fn cluster_options() -> ClusterOptions {
    ClusterOptions {
        channel: ChannelOptions::default(),
        retry: RetryPolicy {
            backoff: BackoffPolicy {
                base: Duration::from_millis(100),
                cap: Duration::from_millis(500),
            },
            ..RetryPolicy::default()
        },
    }
}

/// Calls `f` on the leader: each server in turn, following leader hints and
/// retrying `Unavailable` answers (see [`cluster_options`]).
async fn call<T, F, Fut>(target: &Target, f: F) -> Result<T, Failure>
where
    F: FnMut(Channel) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    target
        .call(f)
        .await
        .map_err(|e| call_failure(e, target.tls().is_none()))
}

/// The failure (and exit code) of a call that found no answer.
fn call_failure(e: CallError, plaintext: bool) -> Failure {
    match e {
        CallError::Exhausted { status, .. } => status_failure(status),
        CallError::Refused { status, .. } => {
            let mut f = status_failure(status);
            if plaintext && f.error.to_string().contains("h2 protocol error") {
                f.error = f.error.context(
                    "the coordinator speaks mTLS: pass --config <data_dir>/admin/cloudlessctl.toml (written by `cloudless-coordinator init`)",
                );
            }
            f
        }
        CallError::NoServers => Failure::usage("--server: no coordinator address given"),
        CallError::Address(e) => Failure {
            code: 2,
            error: anyhow::anyhow!("--server: {e}"),
        },
        CallError::Endpoint(e) => Failure {
            code: 2,
            error: anyhow::Error::new(e),
        },
    }
}

fn read_opts(stale: bool) -> Option<ReadOptions> {
    Some(ReadOptions {
        consistency: if stale {
            ReadConsistency::Stale
        } else {
            ReadConsistency::Linearizable
        } as i32,
    })
}

/// Prints `v` as JSON, or YAML with `-o yaml`.
fn print_json<T: serde::Serialize>(v: &T) -> Result<(), Failure> {
    if YAML.load(std::sync::atomic::Ordering::Relaxed) {
        let text = serde_yaml_ng::to_string(v).map_err(|e| Failure {
            code: 1,
            error: anyhow::anyhow!("cannot write YAML: {e}"),
        })?;
        print!("{text}");
    } else {
        println!("{}", serde_json::to_string_pretty(v)?);
    }
    Ok(())
}

fn workload_json(w: &pb::Workload) -> serde_json::Value {
    let spec = w.spec.clone().unwrap_or_default();
    serde_json::json!({
        "namespace": w.namespace, "name": w.name, "generation": w.generation,
        "template": w.template,
        "status": w.status.map(|st| serde_json::json!({
            "desiredReplicas": st.desired_replicas, "readyReplicas": st.ready_replicas,
            "updatedReplicas": st.updated_replicas, "currentReplicas": st.current_replicas,
        })),
        "createdAtMs": w.created_at_ms, "updatedAtMs": w.updated_at_ms,
        "spec": { "image": spec.image, "replicas": spec.replicas, "command": spec.command,
                  "args": spec.args, "env": spec.env, "labels": spec.labels, "priority": spec.priority }
    })
}

fn replica_json(r: &pb::Replica) -> serde_json::Value {
    serde_json::json!({
        "id": r.id, "namespace": r.namespace, "workload": r.workload, "template": r.template,
        "nodeId": r.node_id, "nodeName": r.node_name, "state": r.state, "exitCode": r.exit_code,
        "restarts": r.restarts, "message": r.message, "image": r.image,
        "createdAtMs": r.created_at_ms, "updatedAtMs": r.updated_at_ms,
    })
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Polls until every replica of the workload's current template is Ready
/// and no older one remains; prints progress when it changes.
async fn wait_rollout(
    servers: &Target,
    namespace: &str,
    name: &str,
    timeout: Duration,
) -> Result<(), Failure> {
    let deadline = std::time::Instant::now() + timeout;
    let mut last = String::new();
    loop {
        let w = call(servers, |ch| {
            let req = pb::GetWorkloadRequest {
                read: None,
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            };
            async move { WorkloadServiceClient::new(ch).get(req).await }
        })
        .await?
        .workload
        .unwrap_or_default();
        let st = w.status.unwrap_or_default();
        let desired = w.spec.as_ref().map_or(0, |s| s.replicas);
        let line = format!(
            "{}/{} ready, {} up to date, {} assigned (want {desired})",
            st.ready_replicas, desired, st.updated_replicas, st.current_replicas
        );
        if line != last {
            println!("  {line}");
            last = line;
        }
        if st.ready_replicas >= desired
            && st.updated_replicas == desired
            && st.current_replicas == desired
        {
            println!("rollout of {namespace}/{name} complete");
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(Failure {
                code: 3,
                error: anyhow::anyhow!(
                    "{namespace}/{name}: rollout not complete after {}s ({last})",
                    timeout.as_secs()
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Polls until node `id` holds no replica; prints what is left when it
/// changes. Fails if the drain is ended (uncordon) or the timeout passes.
async fn wait_drained(servers: &Target, id: &str, timeout: Duration) -> Result<(), Failure> {
    let deadline = std::time::Instant::now() + timeout;
    let mut last = String::new();
    loop {
        let replicas = call(servers, |ch| {
            let req = pb::ListReplicasRequest::default();
            async move { WorkloadServiceClient::new(ch).list_replicas(req).await }
        })
        .await?
        .replicas;
        let left: Vec<String> = replicas
            .iter()
            .filter(|r| r.node_id == id)
            .map(|r| format!("{} ({})", r.id, r.state))
            .collect();
        if left.is_empty() {
            println!("node {id} drained: it holds no replica");
            return Ok(());
        }
        let line = format!("{} replica(s) left: {}", left.len(), left.join(", "));
        if line != last {
            println!("  {line}");
            last = line;
        }
        let line = &last;
        let node = call(servers, |ch| {
            let req = pb::GetNodeRequest {
                read: None,
                id: id.to_owned(),
            };
            async move { NodeServiceClient::new(ch).get(req).await }
        })
        .await?
        .node
        .unwrap_or_default();
        if !node.draining {
            return Err(Failure {
                code: 1,
                error: anyhow::anyhow!("node {id} is no longer draining (uncordoned?); {line}"),
            });
        }
        if std::time::Instant::now() > deadline {
            return Err(Failure {
                code: 3,
                error: anyhow::anyhow!(
                    "node {id} not drained after {}s ({line}); the drain goes on: \
                     a replica stays while its workload would drop below its availability floor \
                     or no other node can take it (see `cloudlessctl events`)",
                    timeout.as_secs()
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Where and how to connect: the coordinators, with mTLS when configured.
type Target = Cluster;

/// Replaces control characters (terminal escapes) in text from the cluster
/// before it is printed.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let (file_servers, tls, paths) = match &cli.config {
        Some(p) => {
            let c = ClientConfig::load(p)?;
            (c.servers, c.tls, c.credential_paths)
        }
        None => (Vec::new(), None, None),
    };
    let servers: Vec<String> = match &cli.server {
        Some(s) => s
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect(),
        None if !file_servers.is_empty() => file_servers,
        None => vec!["127.0.0.1:7400".to_owned()],
    };
    let mut target = Target::new(servers, tls, cluster_options());
    // Every command keeps the admin certificate alive: renewed with two
    // thirds of its lifetime gone (`admin renew` does it at once).
    if let Some(p) = &paths {
        if !matches!(cli.command, Cmd::Admin(admin::AdminCmd::Renew)) {
            match admin::renew_if_due(&target, p, false).await {
                Ok(Some(cert)) => {
                    if let Some(mut t) = target.tls().cloned() {
                        t.cert_pem = cert;
                        target.set_tls(Some(t));
                    }
                }
                Ok(None) => {}
                // Still valid for a third of its lifetime: the command goes on.
                Err(f) if f.code != 2 => {
                    eprintln!(
                        "cloudlessctl: warning: cannot renew the admin certificate now: {:#}",
                        f.error
                    );
                }
                Err(f) => return Err(f),
            }
        }
    }
    let servers = &target;
    match cli.command {
        Cmd::Cluster(ClusterCmd::Status) => {
            let s = call(servers, |ch| async move {
                ClusterServiceClient::new(ch)
                    .status(pb::StatusRequest {})
                    .await
            })
            .await?;
            if cli.output != Output::Table {
                let coords: Vec<_> = s.coordinators.iter().map(|c| serde_json::json!({
                    "nodeId": c.node_id, "address": c.address, "reachable": c.reachable, "state": c.state,
                    "term": c.term, "leaderId": c.leader_id, "lastLogIndex": c.last_log_index,
                    "commitIndex": c.commit_index, "appliedIndex": c.applied_index,
                    "snapshotIndex": c.snapshot_index, "error": c.error })).collect();
                return print_json(
                    &serde_json::json!({ "clusterId": s.cluster_id, "clusterName": s.cluster_name,
                    "leaderId": s.leader_id, "term": s.term, "coordinators": coords }),
                );
            }
            println!(
                "cluster {} ({})  leader {}  term {}",
                s.cluster_name, s.cluster_id, s.leader_id, s.term
            );
            println!(
                "{:<20} {:<22} {:<8} {:<10} {:>6} {:>10} {:>10} {:>10}",
                "NODE", "ADDRESS", "ROLE", "STATE", "TERM", "LAST-LOG", "COMMIT", "APPLIED"
            );
            for c in &s.coordinators {
                let role = s
                    .members
                    .iter()
                    .find(|m| m.node_id == c.node_id)
                    .map_or("?", |m| {
                        if m.role == pb::member::Role::Voter as i32 {
                            "voter"
                        } else {
                            "learner"
                        }
                    });
                if c.reachable {
                    println!(
                        "{:<20} {:<22} {:<8} {:<10} {:>6} {:>10} {:>10} {:>10}",
                        c.node_id,
                        c.address,
                        role,
                        c.state,
                        c.term,
                        c.last_log_index,
                        c.commit_index,
                        c.applied_index
                    );
                } else {
                    println!(
                        "{:<20} {:<22} {:<8} unreachable: {}",
                        c.node_id, c.address, role, c.error
                    );
                }
            }
        }
        Cmd::Cluster(ClusterCmd::Remove { node_id }) => {
            let r = call(servers, |ch| async move {
                ClusterServiceClient::new(ch)
                    .remove_coordinator(pb::RemoveCoordinatorRequest {
                        write: None,
                        node_id,
                    })
                    .await
            })
            .await?;
            println!(
                "removed coordinator {node_id}; {} member(s) remain",
                r.members.len()
            );
        }
        Cmd::Cluster(ClusterCmd::Config) => {
            let read = read_opts(cli.stale);
            let r = call(servers, |ch| async move {
                ClusterServiceClient::new(ch)
                    .get_config(pb::GetConfigRequest { read })
                    .await
            })
            .await?;
            let c = r.config.unwrap_or_default();
            let w = c.scheduler_weights.unwrap_or_default();
            print_json(
                &serde_json::json!({ "revision": r.revision, "clusterName": c.cluster_name,
                "heartbeatIntervalMs": c.heartbeat_interval_ms, "suspectAfterMissedHeartbeats": c.suspect_after_missed_heartbeats,
                "downAfterMs": c.down_after_ms, "leaderGraceMs": c.leader_grace_ms,
                "nodeCertLifetimeS": c.node_cert_lifetime_s,
                "auditRetentionDays": c.audit_retention_days, "secretMaxBytes": c.secret_max_bytes,
                "auditMaxRecords": c.audit_max_records, "auditAggregateWindowS": c.audit_aggregate_window_s,
                "accessTokenMaxRecords": c.access_token_max_records,
                "nodeRejoinGraceS": c.node_rejoin_grace_s,
                "schedulerWeights": { "locality": w.locality, "reliability": w.reliability, "cost": w.cost,
                    "utilization": w.utilization, "networkPenalty": w.network_penalty }, "labels": c.labels }),
            )?;
        }
        Cmd::Cluster(ClusterCmd::Set { settings }) => {
            let current = call(servers, |ch| async move {
                ClusterServiceClient::new(ch)
                    .get_config(pb::GetConfigRequest { read: None })
                    .await
            })
            .await?;
            let mut config = current.config.unwrap_or_default();
            for s in &settings {
                set_config_key(&mut config, s).map_err(|e| Failure {
                    code: 2,
                    error: anyhow::anyhow!(e),
                })?;
            }
            let r = call(servers, |ch| {
                let req = pb::SetConfigRequest {
                    write: None,
                    config: Some(config.clone()),
                    expected_revision: current.revision,
                };
                async move { ClusterServiceClient::new(ch).set_config(req).await }
            })
            .await?;
            println!("cluster configuration is now at revision {}", r.revision);
        }
        Cmd::Apply {
            file,
            idempotency_key,
            wait,
            timeout,
        } => {
            let text = if file == "-" {
                std::io::read_to_string(std::io::stdin())
                    .context("reading the manifest from standard input")?
            } else {
                std::fs::read_to_string(&file).with_context(|| format!("reading {file}"))?
            };
            let w = cloudless_types::parse_manifest(&text).map_err(|e| Failure {
                code: 2,
                error: anyhow::anyhow!("{file}: {e}"),
            })?;
            let workload: pb::Workload = w.into();
            let write = Some(WriteOptions {
                idempotency_key: idempotency_key.unwrap_or_default(),
            });
            let r = call(servers, |ch| {
                let req = pb::ApplyWorkloadRequest {
                    write: write.clone(),
                    workload: Some(workload.clone()),
                };
                async move { WorkloadServiceClient::new(ch).apply(req).await }
            })
            .await?;
            let w = r.workload.unwrap_or_default();
            let verb = if r.created { "created" } else { "configured" };
            println!(
                "workload {}/{} {verb} (generation {}, log index {})",
                w.namespace,
                w.name,
                w.generation,
                r.commit.map_or(0, |c| c.log_index)
            );
            if wait {
                wait_rollout(servers, &w.namespace, &w.name, Duration::from_secs(timeout)).await?;
            }
        }
        Cmd::Get {
            kind,
            name,
            namespace,
        } if kind.starts_with("replica") => {
            let read = read_opts(cli.stale);
            let ns = namespace.unwrap_or_default();
            let r = call(servers, |ch| {
                let req = pb::ListReplicasRequest {
                    read,
                    namespace: ns.clone(),
                    name: name.clone().unwrap_or_default(),
                };
                async move { WorkloadServiceClient::new(ch).list_replicas(req).await }
            })
            .await?;
            if cli.output != Output::Table {
                return print_json(&r.replicas.iter().map(replica_json).collect::<Vec<_>>());
            }
            println!(
                "{:<44} {:<10} {:<12} {:>8} {:>5} {:<8} MESSAGE",
                "REPLICA", "STATE", "NODE", "RESTARTS", "EXIT", "AGE"
            );
            let now = now_ms();
            for x in &r.replicas {
                println!(
                    "{:<44} {:<10} {:<12} {:>8} {:>5} {:<8} {}",
                    x.id,
                    x.state,
                    if x.node_name.is_empty() {
                        &x.node_id
                    } else {
                        &x.node_name
                    },
                    x.restarts,
                    x.exit_code.map_or("-".to_owned(), |c| c.to_string()),
                    human((now - x.created_at_ms).max(0) / 1000),
                    x.message
                );
            }
        }
        Cmd::Get { kind, .. } if kind.starts_with("node") => {
            return Box::pin(run(Cli {
                command: Cmd::Node(NodeCmd::List),
                ..cli
            }))
            .await;
        }
        Cmd::Get {
            kind,
            name,
            namespace,
        } => {
            let read = read_opts(cli.stale);
            let workloads = match name {
                Some(name) => {
                    let ns = namespace.unwrap_or_else(|| "default".into());
                    let r = call(servers, |ch| {
                        let req = pb::GetWorkloadRequest {
                            read,
                            namespace: ns.clone(),
                            name: name.clone(),
                        };
                        async move { WorkloadServiceClient::new(ch).get(req).await }
                    })
                    .await?;
                    r.workload.into_iter().collect::<Vec<_>>()
                }
                None if kind == "workload" => {
                    return Err(Failure {
                        code: 2,
                        error: anyhow::anyhow!(
                            "get workload: a name is required (or use `get workloads`)"
                        ),
                    })
                }
                None => {
                    let ns = namespace.unwrap_or_default();
                    call(servers, |ch| {
                        let req = pb::ListWorkloadsRequest {
                            read,
                            namespace: ns.clone(),
                        };
                        async move { WorkloadServiceClient::new(ch).list(req).await }
                    })
                    .await?
                    .workloads
                }
            };
            if cli.output != Output::Table {
                return print_json(&workloads.iter().map(workload_json).collect::<Vec<_>>());
            }
            println!(
                "{:<12} {:<24} {:<40} {:>7} {:>10} {:>10}",
                "NAMESPACE", "NAME", "IMAGE", "READY", "UP-TO-DATE", "GENERATION"
            );
            for w in &workloads {
                let spec = w.spec.clone().unwrap_or_default();
                let st = w.status.unwrap_or_default();
                println!(
                    "{:<12} {:<24} {:<40} {:>7} {:>10} {:>10}",
                    w.namespace,
                    w.name,
                    spec.image,
                    format!("{}/{}", st.ready_replicas, spec.replicas),
                    st.updated_replicas,
                    w.generation
                );
            }
        }
        Cmd::Delete {
            name,
            namespace,
            idempotency_key,
            ..
        } => {
            let write = Some(WriteOptions {
                idempotency_key: idempotency_key.unwrap_or_default(),
            });
            call(servers, |ch| {
                let req = pb::DeleteWorkloadRequest {
                    write: write.clone(),
                    namespace: namespace.clone(),
                    name: name.clone(),
                };
                async move { WorkloadServiceClient::new(ch).delete(req).await }
            })
            .await?;
            println!("workload {namespace}/{name} deleted");
        }
        Cmd::Token(TokenCmd::Create {
            ttl,
            max_uses,
            labels,
        }) => {
            let labels: std::collections::HashMap<String, String> = labels.into_iter().collect();
            let r = call(servers, |ch| {
                let req = pb::CreateJoinTokenRequest {
                    write: None,
                    ttl_seconds: ttl,
                    max_uses,
                    labels: labels.clone(),
                };
                async move { NodeServiceClient::new(ch).create_join_token(req).await }
            })
            .await?;
            if cli.output != Output::Table {
                return print_json(
                    &serde_json::json!({ "tokenId": r.token_id, "token": r.token, "expiresAtMs": r.expires_at_ms }),
                );
            }
            eprintln!(
                "token {} expires {}, {max_uses} use(s):",
                r.token_id,
                fmt_ms(r.expires_at_ms)
            );
            println!("{}", r.token);
        }
        Cmd::Token(TokenCmd::List) => {
            let read = read_opts(cli.stale);
            let r = call(servers, |ch| async move {
                NodeServiceClient::new(ch)
                    .list_join_tokens(pb::ListJoinTokensRequest { read })
                    .await
            })
            .await?;
            if cli.output != Output::Table {
                let v: Vec<_> = r.tokens.iter().map(|t| serde_json::json!({ "tokenId": t.token_id,
                    "remainingUses": t.remaining_uses, "expiresAtMs": t.expires_at_ms, "revoked": t.revoked, "labels": t.labels })).collect();
                return print_json(&v);
            }
            println!(
                "{:<18} {:>9} {:<14} {:<8} LABELS",
                "ID", "USES-LEFT", "EXPIRES", "REVOKED"
            );
            for t in &r.tokens {
                let mut labels: Vec<String> =
                    t.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                labels.sort();
                println!(
                    "{:<18} {:>9} {:<14} {:<8} {}",
                    t.token_id,
                    t.remaining_uses,
                    fmt_ms(t.expires_at_ms),
                    t.revoked,
                    labels.join(",")
                );
            }
        }
        Cmd::Token(TokenCmd::Revoke { token_id }) => {
            call(servers, |ch| {
                let req = pb::RevokeJoinTokenRequest {
                    write: None,
                    token_id: token_id.clone(),
                };
                async move { NodeServiceClient::new(ch).revoke_join_token(req).await }
            })
            .await?;
            println!("token {token_id} revoked");
        }
        Cmd::Node(NodeCmd::List) => {
            let read = read_opts(cli.stale);
            let nodes = call(servers, |ch| async move {
                NodeServiceClient::new(ch)
                    .list(pb::ListNodesRequest { read })
                    .await
            })
            .await?
            .nodes;
            if cli.output != Output::Table {
                return print_json(&nodes.iter().map(node_json).collect::<Vec<_>>());
            }
            println!(
                "{:<16} {:<20} {:<28} {:<11} {:<12} LABELS",
                "ID", "NAME", "STATUS", "RELIABILITY", "CERT-EXPIRES"
            );
            for n in &nodes {
                let status = match (n.draining, n.cordoned) {
                    (true, _) => format!("{},Draining", phase_name(n)),
                    (false, true) => format!("{},SchedulingDisabled", phase_name(n)),
                    _ => phase_name(n).to_owned(),
                };
                let mut labels: Vec<String> =
                    n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                labels.sort();
                println!(
                    "{:<16} {:<20} {:<28} {:<11.2} {:<12} {}",
                    n.id,
                    n.name,
                    status,
                    n.reliability,
                    fmt_ms(n.cert_not_after_ms),
                    labels.join(",")
                );
            }
        }
        Cmd::Node(NodeCmd::Get { id }) => {
            let read = read_opts(cli.stale);
            let n = call(servers, |ch| {
                let req = pb::GetNodeRequest {
                    read,
                    id: id.clone(),
                };
                async move { NodeServiceClient::new(ch).get(req).await }
            })
            .await?
            .node
            .unwrap_or_default();
            print_json(&node_json(&n))?;
        }
        Cmd::Node(NodeCmd::Label { id, changes }) => {
            let (set, remove) = parse_label_changes(&changes).map_err(|e| Failure {
                code: 2,
                error: anyhow::anyhow!(e),
            })?;
            let n = call(servers, |ch| {
                let req = pb::LabelNodeRequest {
                    write: None,
                    id: id.clone(),
                    set: set.clone(),
                    remove: remove.clone(),
                };
                async move { NodeServiceClient::new(ch).label(req).await }
            })
            .await?
            .node
            .unwrap_or_default();
            let mut labels: Vec<String> =
                n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            labels.sort();
            println!("node {id} labeled: {}", labels.join(","));
        }
        Cmd::Node(NodeCmd::AcceptCapacity { id }) => {
            let n = call(servers, |ch| {
                let req = pb::NodeActionRequest {
                    write: None,
                    id: id.clone(),
                };
                async move { NodeServiceClient::new(ch).accept_capacity(req).await }
            })
            .await?
            .node
            .unwrap_or_default();
            let c = n.capacity.unwrap_or_default();
            println!(
                "node {id} capacity accepted: cpuMillis={} memoryBytes={}",
                c.cpu_millis, c.memory_bytes
            );
        }
        Cmd::Node(action) => {
            let (verb, id, drain_timeout) = match action {
                NodeCmd::Cordon { id } => ("cordoned", id, None),
                NodeCmd::Uncordon { id } => ("uncordoned", id, None),
                NodeCmd::Drain { id, timeout } => ("draining", id, Some(timeout)),
                NodeCmd::Remove { id } => ("removed", id, None),
                NodeCmd::List
                | NodeCmd::Get { .. }
                | NodeCmd::Label { .. }
                | NodeCmd::AcceptCapacity { .. } => {
                    return Err(Failure {
                        code: 2,
                        error: anyhow::anyhow!(
                            "node list/get/label/accept-capacity are handled above"
                        ),
                    })
                }
            };
            call(servers, |ch| {
                let req = pb::NodeActionRequest {
                    write: None,
                    id: id.clone(),
                };
                let mut c = NodeServiceClient::new(ch);
                async move {
                    match verb {
                        "cordoned" => c.cordon(req).await,
                        "uncordoned" => c.uncordon(req).await,
                        "draining" => c.drain(req).await,
                        _ => c.remove(req).await,
                    }
                }
            })
            .await?;
            println!("node {id} {verb}");
            if let Some(timeout) = drain_timeout {
                wait_drained(servers, &id, Duration::from_secs(timeout)).await?;
            }
        }
        Cmd::Logs {
            name,
            namespace,
            replica,
            follow,
            tail,
        } => {
            let mut stream = call(servers, |ch| {
                let req = pb::LogsRequest {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    replica_id: replica.clone().unwrap_or_default(),
                    follow,
                    tail_lines: tail,
                };
                async move { WorkloadServiceClient::new(ch).logs(req).await }
            })
            .await?;
            let prefix = replica.is_none();
            let mut partial: std::collections::HashMap<String, String> = Default::default();
            while let Some(chunk) = stream.message().await.map_err(status_failure)? {
                if chunk.stream == "error" {
                    eprintln!(
                        "{}: {}",
                        chunk.replica_id,
                        String::from_utf8_lossy(&chunk.data)
                    );
                    continue;
                }
                let buf = partial.entry(chunk.replica_id.clone()).or_default();
                buf.push_str(&String::from_utf8_lossy(&chunk.data));
                while let Some(i) = buf.find('\n') {
                    let line: String = buf.drain(..=i).collect();
                    if prefix {
                        print!("[{}] {line}", chunk.replica_id);
                    } else {
                        print!("{line}");
                    }
                }
            }
            for (id, rest) in partial {
                if !rest.is_empty() {
                    if prefix {
                        println!("[{id}] {rest}");
                    } else {
                        println!("{rest}");
                    }
                }
            }
        }
        Cmd::Events {
            name,
            namespace,
            watch,
        } => {
            let ns = match (&name, namespace) {
                (_, Some(ns)) => ns,
                (Some(_), None) => "default".to_owned(),
                (None, None) => String::new(),
            };
            let mut stream = call(servers, |ch| {
                let req = pb::EventsRequest {
                    namespace: ns.clone(),
                    name: name.clone().unwrap_or_default(),
                    watch,
                };
                async move { WorkloadServiceClient::new(ch).events(req).await }
            })
            .await?;
            let structured = cli.output != Output::Table;
            if !structured {
                println!(
                    "{:<8} {:<9} {:<24} {:<18} MESSAGE",
                    "AGE", "KIND", "OBJECT", "REASON"
                );
            }
            while let Some(e) = stream.message().await.map_err(status_failure)? {
                if structured {
                    print_json(&serde_json::json!({
                        "atMs": e.at_ms, "kind": e.kind, "object": e.object,
                        "reason": e.reason, "message": e.message,
                    }))?;
                } else {
                    println!(
                        "{:<8} {:<9} {:<24} {:<18} {}",
                        human((now_ms() - e.at_ms).max(0) / 1000),
                        e.kind,
                        e.object,
                        e.reason,
                        e.message
                    );
                }
            }
        }
        Cmd::Secrets(cmd) => secrets::run(cmd, servers, cli.output, cli.stale).await?,
        Cmd::Admin(cmd) => admin::run(cmd, servers, paths.as_ref(), cli.output).await?,
        Cmd::Completion { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "cloudlessctl", &mut std::io::stdout());
        }
        Cmd::Rollout(RolloutCmd::Status {
            name,
            namespace,
            wait,
            timeout,
        }) => {
            let secs = if wait { timeout } else { 0 };
            wait_rollout(servers, &namespace, &name, Duration::from_secs(secs)).await?;
        }
        Cmd::Rollout(RolloutCmd::History {
            name,
            namespace,
            revision,
        }) => {
            let read = read_opts(cli.stale);
            let h = call(servers, |ch| {
                let req = pb::RolloutHistoryRequest {
                    read,
                    namespace: namespace.clone(),
                    name: name.clone(),
                };
                async move { WorkloadServiceClient::new(ch).rollout_history(req).await }
            })
            .await?;
            if let Some(n) = revision {
                let Some(r) = h.revisions.iter().find(|r| r.revision == n) else {
                    let known: Vec<String> =
                        h.revisions.iter().map(|r| r.revision.to_string()).collect();
                    return Err(Failure {
                        code: 1,
                        error: anyhow::anyhow!(
                            "--revision: {n} is not in the history of {namespace}/{name} (it holds {})",
                            known.join(", ")
                        ),
                    });
                };
                let spec = cloudless_types::WorkloadSpec::from(r.spec.clone().unwrap_or_default());
                return print_json(&serde_json::json!({
                    "revision": r.revision, "appliedAtMs": r.applied_at_ms,
                    "cause": r.cause, "spec": spec,
                }));
            }
            if cli.output != Output::Table {
                let v: Vec<_> = h
                    .revisions
                    .iter()
                    .map(|r| {
                        serde_json::json!({
                            "revision": r.revision, "appliedAtMs": r.applied_at_ms,
                            "cause": r.cause, "current": r.revision == h.current,
                            "image": r.spec.as_ref().map(|s| s.image.clone()).unwrap_or_default(),
                        })
                    })
                    .collect();
                return print_json(&serde_json::Value::Array(v));
            }
            println!(
                "{:<9} {:<8} {:<14} {:<34} CURRENT",
                "REVISION", "AGE", "CAUSE", "IMAGE"
            );
            for r in &h.revisions {
                println!(
                    "{:<9} {:<8} {:<14} {:<34} {}",
                    r.revision,
                    human((now_ms() - r.applied_at_ms).max(0) / 1000),
                    r.cause,
                    r.spec.as_ref().map(|s| s.image.as_str()).unwrap_or(""),
                    if r.revision == h.current { "*" } else { "" }
                );
            }
        }
        Cmd::Rollout(RolloutCmd::Undo {
            name,
            namespace,
            to_revision,
            idempotency_key,
            wait,
            timeout,
        }) => {
            let write = Some(WriteOptions {
                idempotency_key: idempotency_key.unwrap_or_default(),
            });
            let r = call(servers, |ch| {
                let req = pb::RolloutUndoRequest {
                    write: write.clone(),
                    namespace: namespace.clone(),
                    name: name.clone(),
                    to_revision: to_revision.unwrap_or(0),
                };
                async move { WorkloadServiceClient::new(ch).rollout_undo(req).await }
            })
            .await?;
            let w = r.workload.unwrap_or_default();
            println!(
                "workload {}/{} rolled back to revision {} (now revision {})",
                w.namespace, w.name, r.restored, w.template
            );
            if wait {
                wait_rollout(servers, &namespace, &name, Duration::from_secs(timeout)).await?;
            }
        }
        Cmd::Exec {
            name,
            namespace,
            replica,
            timeout,
            command,
        } => {
            let mut stream = call(servers, |ch| {
                let req = pb::ExecRequest {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    replica_id: replica.clone().unwrap_or_default(),
                    command: command.clone(),
                    timeout_seconds: timeout,
                };
                async move { WorkloadServiceClient::new(ch).exec(req).await }
            })
            .await?;
            let mut code = None;
            while let Some(out) = stream.message().await.map_err(status_failure)? {
                use std::io::Write;
                let _ = std::io::stdout().write_all(&out.stdout);
                let _ = std::io::stderr().write_all(&out.stderr);
                if out.exit_code.is_some() {
                    code = out.exit_code;
                }
            }
            let _ = std::io::Write::flush(&mut std::io::stdout());
            match code {
                Some(0) => {}
                Some(c) => {
                    return Err(Failure {
                        code: u8::try_from(c.clamp(1, 255)).unwrap_or(1),
                        error: anyhow::anyhow!("command exited with code {c}"),
                    })
                }
                None => {
                    return Err(Failure {
                        code: 1,
                        error: anyhow::anyhow!("the command's exit code never arrived"),
                    })
                }
            }
        }
        Cmd::Describe {
            name, namespace, ..
        } => {
            let read = read_opts(cli.stale);
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
            if cli.output != Output::Table {
                let mut v = workload_json(&w);
                v["replicas"] =
                    serde_json::Value::Array(replicas.iter().map(replica_json).collect());
                return print_json(&v);
            }
            let spec = w.spec.clone().unwrap_or_default();
            let st = w.status.unwrap_or_default();
            println!("Name:         {}/{}", w.namespace, w.name);
            println!("Image:        {}", spec.image);
            println!("Generation:   {} (template {})", w.generation, w.template);
            println!(
                "Replicas:     {} desired, {} assigned, {} up to date, {} ready",
                spec.replicas, st.current_replicas, st.updated_replicas, st.ready_replicas
            );
            if let Some(p) = &spec.placement {
                println!(
                    "Placement:    zones {:?}, strategy {}, anti-affinity {}",
                    p.zones,
                    if p.strategy.is_empty() {
                        "Auto"
                    } else {
                        &p.strategy
                    },
                    if p.anti_affinity.is_empty() {
                        "None"
                    } else {
                        &p.anti_affinity
                    }
                );
            }
            println!(
                "Restart:      {}",
                if spec.restart_policy.is_empty() {
                    "Always"
                } else {
                    &spec.restart_policy
                }
            );
            if let Some(r) = &spec.rollout {
                println!(
                    "Rollout:      {} maxSurge {}, maxUnavailable {}, minAvailable {}, progress deadline {}s",
                    if r.strategy.is_empty() { "RollingUpdate" } else { &r.strategy },
                    r.max_surge,
                    r.max_unavailable,
                    r.min_available.map_or_else(|| "-".to_owned(), |m| m.to_string()),
                    r.progress_deadline_seconds
                );
            }
            let typed = cloudless_types::WorkloadSpec::from(spec.clone());
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
                        format!("{n}{}/{:?}", p.container_port, p.protocol)
                    })
                    .collect();
                println!("Ports:        {}", ports.join(", "));
            }
            let sc = &typed.security_context;
            println!(
                "Security:     user {}, non-root {}, read-only root {}, capabilities [{}], seccomp {:?}",
                sc.run_as_user.map_or_else(|| "image".to_owned(), |u| u.to_string()),
                sc.run_as_non_root,
                sc.read_only_root_filesystem,
                sc.capabilities.effective().join(", "),
                sc.seccomp_profile.kind
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
                println!(
                    "  {:<44} {:<10} {:<12} template {:<3} restarts {:<3} age {:<6} {}",
                    x.id,
                    x.state,
                    if x.node_name.is_empty() {
                        &x.node_id
                    } else {
                        &x.node_name
                    },
                    x.template,
                    x.restarts,
                    human((now - x.created_at_ms).max(0) / 1000),
                    x.message
                );
            }
            match explained {
                Ok(e) => {
                    println!(
                        "Placement explanation (one more replica, strategy {}):",
                        e.strategy
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
        }
        Cmd::Scale {
            name,
            replicas,
            namespace,
            idempotency_key,
            ..
        } => {
            let write = Some(WriteOptions {
                idempotency_key: idempotency_key.unwrap_or_default(),
            });
            let r = call(servers, |ch| {
                let req = pb::ScaleWorkloadRequest {
                    write: write.clone(),
                    namespace: namespace.clone(),
                    name: name.clone(),
                    replicas,
                };
                async move { WorkloadServiceClient::new(ch).scale(req).await }
            })
            .await?;
            let w = r.workload.unwrap_or_default();
            println!(
                "workload {namespace}/{name} scaled to {replicas} (generation {})",
                w.generation
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    YAML.store(
        cli.output == Output::Yaml,
        std::sync::atomic::Ordering::Relaxed,
    );
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cloudlessctl: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("cloudlessctl: {:#}", f.error);
            ExitCode::from(f.code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_set_changes_named_keys_and_names_bad_ones() {
        let mut c = pb::ClusterConfig::default();
        set_config_key(&mut c, "down_after_ms=8000").expect("valid");
        set_config_key(&mut c, "scheduler_weights.cost=0.2").expect("valid");
        assert_eq!(c.down_after_ms, 8000);
        assert_eq!(c.scheduler_weights.map(|w| w.cost), Some(0.2));
        for (bad, named) in [
            ("down_after_ms=-1", "down_after_ms"),
            ("heartbeat_interval_ms", "KEY=VALUE"),
            ("no_such_key=1", "no_such_key"),
            ("scheduler_weights.cost=lots", "scheduler_weights.cost"),
        ] {
            let err = set_config_key(&mut c, bad).expect_err(bad);
            assert!(err.contains(named), "{err}");
        }
    }

    #[test]
    fn call_errors_keep_their_exit_codes() {
        let exhausted = call_failure(
            CallError::Exhausted {
                address: "a:1".into(),
                attempts: 4,
                status: tonic::Status::unavailable("no leader"),
            },
            false,
        );
        assert_eq!(exhausted.code, 3);
        assert_eq!(exhausted.error.to_string(), "unavailable: no leader");
        let refused = call_failure(
            CallError::Refused {
                address: "a:1".into(),
                status: tonic::Status::not_found("no workload web"),
            },
            false,
        );
        assert_eq!(refused.code, 1);
        assert_eq!(refused.error.to_string(), "not found: no workload web");
        assert_eq!(call_failure(CallError::NoServers, false).code, 2);
        let bad = call_failure(
            CallError::Address(cloudless_client::HostPort::parse("::1:7400").expect_err("v6")),
            false,
        );
        assert_eq!(bad.code, 2);
        assert!(
            bad.error.to_string().starts_with("--server: \"::1:7400\""),
            "{:#}",
            bad.error
        );
    }

    #[test]
    fn node_label_arguments_set_with_equals_and_remove_with_a_trailing_dash() {
        let args: Vec<String> = ["tier=secure", "zone-", "empty="]
            .map(str::to_owned)
            .to_vec();
        let (set, remove) = parse_label_changes(&args).expect("valid");
        assert_eq!(set.get("tier").map(String::as_str), Some("secure"));
        assert_eq!(set.get("empty").map(String::as_str), Some(""));
        assert_eq!(remove, vec!["zone".to_owned()]);
        for bad in ["tier", "-"] {
            let err = parse_label_changes(&[bad.to_owned()]).expect_err(bad);
            assert!(err.contains("neither key=value nor key-"), "{err}");
        }
    }
}
