//! `cloudlessctl node` (and `get nodes`): enrolled nodes, their labels,
//! cordon, drain and removal.

use cloudless_proto::enums::shown;
use std::time::Duration;

use clap::Subcommand;
use cloudless_proto::v1::node_service_client::NodeServiceClient;
use cloudless_proto::v1::workload_service_client::WorkloadServiceClient;
use cloudless_proto::v1::{self as pb};

use crate::client::{call, Failure, Target};
use crate::cmd::{parse_duration, Ctx};
use crate::output::{fmt_ms, sanitize};
use crate::Exit;

/// `cloudlessctl node` subcommands.
#[derive(Subcommand, Debug)]
pub(crate) enum NodeCmd {
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

/// Runs a `node` command.
pub(crate) async fn run(cmd: NodeCmd, ctx: &Ctx) -> Result<(), Failure> {
    let servers = &ctx.target;
    match cmd {
        NodeCmd::List => list(ctx).await?,
        NodeCmd::Get { id } => {
            let read = ctx.read_opts();
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
            ctx.output.print(&node_json(&n))?;
        }
        NodeCmd::Label { id, changes } => {
            let (set, remove) = parse_label_changes(&changes)
                .map_err(|e| Failure::new(Exit::Usage, anyhow::anyhow!(e)))?;
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
        NodeCmd::AcceptCapacity { id } => {
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
        NodeCmd::Cordon { id } => action(servers, "cordoned", id, None).await?,
        NodeCmd::Uncordon { id } => action(servers, "uncordoned", id, None).await?,
        NodeCmd::Drain { id, timeout } => action(servers, "draining", id, Some(timeout)).await?,
        NodeCmd::Remove { id } => action(servers, "removed", id, None).await?,
    }
    Ok(())
}

/// `node list` (and `get nodes`).
pub(crate) async fn list(ctx: &Ctx) -> Result<(), Failure> {
    let servers = &ctx.target;
    let read = ctx.read_opts();
    let nodes = call(servers, |ch| async move {
        NodeServiceClient::new(ch)
            .list(pb::ListNodesRequest { read })
            .await
    })
    .await?
    .nodes;
    if ctx.output.is_structured() {
        return ctx
            .output
            .print(&nodes.iter().map(node_json).collect::<Vec<_>>());
    }
    print!("{}", nodes_table(&nodes, ctx.output.is_wide()));
    Ok(())
}

/// The `get nodes` table; `wide` adds the SUBNET column (`-` when the node
/// has none yet).
fn nodes_table(nodes: &[pb::Node], wide: bool) -> String {
    let subnet = |s: &str| {
        if !wide {
            String::new()
        } else if s.is_empty() {
            format!("{:<20} ", "-")
        } else {
            format!("{:<20} ", sanitize(s))
        }
    };
    let mut out = format!(
        "{:<16} {:<20} {:<28} {:<11} {:<12} {}LABELS\n",
        "ID",
        "NAME",
        "STATUS",
        "RELIABILITY",
        "CERT-EXPIRES",
        if wide {
            format!("{:<20} ", "SUBNET")
        } else {
            String::new()
        }
    );
    for n in nodes {
        let status = match (n.draining, n.cordoned) {
            (true, _) => format!("{},Draining", phase_name(n)),
            (false, true) => format!("{},SchedulingDisabled", phase_name(n)),
            _ => phase_name(n).to_owned(),
        };
        let mut labels: Vec<String> = n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        out.push_str(&format!(
            "{:<16} {:<20} {:<28} {:<11.2} {:<12} {}{}\n",
            n.id,
            n.name,
            status,
            n.reliability,
            fmt_ms(n.cert_not_after_ms),
            subnet(&n.subnet),
            labels.join(",")
        ));
    }
    out
}

/// `node cordon`, `uncordon`, `drain` (then waits for it) and `remove`;
/// `verb` names the action in what is printed.
async fn action(
    servers: &Target,
    verb: &'static str,
    id: String,
    drain_timeout: Option<u64>,
) -> Result<(), Failure> {
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
    Ok(())
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
            .map(|r| format!("{} ({})", r.id, r.state_name()))
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
            return Err(Failure::new(
                Exit::Failed,
                anyhow::anyhow!("node {id} is no longer draining (uncordoned?); {line}"),
            ));
        }
        if std::time::Instant::now() > deadline {
            return Err(Failure::new(
                Exit::Unavailable,
                anyhow::anyhow!(
                    "node {id} not drained after {}s ({line}); the drain goes on: \
                     a replica stays while its workload would drop below its availability floor \
                     or no other node can take it (see `cloudlessctl events`)",
                    timeout.as_secs()
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn phase_name(n: &pb::Node) -> String {
    shown::<pb::NodePhase>(n.phase, "")
}

/// The node's conditions by name (or as a coordinator of the previous
/// release sent them).
fn conditions(n: &pb::Node) -> Vec<String> {
    if n.conditions.is_empty() {
        return n.legacy_conditions.clone();
    }
    n.conditions
        .iter()
        .map(|c| shown::<pb::NodeCondition>(*c, ""))
        .collect()
}

fn node_json(n: &pb::Node) -> serde_json::Value {
    let res = |r: &Option<pb::Resources>| {
        r.as_ref().map(
            |r| serde_json::json!({ "cpuMillis": r.cpu_millis, "memoryBytes": r.memory_bytes }),
        )
    };
    serde_json::json!({ "id": n.id, "name": n.name, "phase": phase_name(n), "phaseSinceMs": n.phase_since_ms,
        "cordoned": n.cordoned, "draining": n.draining, "labels": n.labels, "zone": n.zone, "region": n.region,
        "arch": n.arch, "capacity": res(&n.capacity), "usage": res(&n.usage), "conditions": conditions(n),
        "reportedLabels": n.reported_labels, "reportedCapacity": res(&n.reported_capacity),
        "capacityUnverified": n.capacity_unverified,
        "powerSource": shown::<pb::PowerSource>(n.power_source, &n.legacy_power_source), "batteryPercent": n.battery_percent, "reliability": n.reliability,
        "downCount": n.down_count, "lastHeartbeatMs": n.last_heartbeat_ms, "overlayAddresses": n.overlay_addresses,
        "enrolledAtMs": n.enrolled_at_ms, "certNotAfterMs": n.cert_not_after_ms, "subnet": n.subnet })
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn get_nodes_wide_adds_the_subnet_column_and_node_get_shows_it() {
        let node = |id: &str, subnet: &str| pb::Node {
            id: id.into(),
            name: id.into(),
            phase: pb::NodePhase::Ready as i32,
            subnet: subnet.into(),
            ..Default::default()
        };
        let nodes = [node("n1", "10.244.0.0/24"), node("old", "")];
        let wide = nodes_table(&nodes, true);
        let lines: Vec<&str> = wide.lines().collect();
        let column = lines[0].find("SUBNET").expect("header");
        assert_eq!(&lines[1][column..column + 13], "10.244.0.0/24", "{wide}");
        assert_eq!(&lines[2][column..column + 2], "- ", "{wide}");
        assert!(!nodes_table(&nodes, false).contains("SUBNET"));
        assert_eq!(node_json(&nodes[0])["subnet"], "10.244.0.0/24");
    }
}
