//! `cloudlessctl apply`, `get`, `delete` and `scale`: workloads (and, for
//! `get`, their replicas, the nodes and the services), plus the JSON shapes
//! of a workload and a replica that `describe` shares.

use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use cloudless_proto::v1::workload_service_client::WorkloadServiceClient;
use cloudless_proto::v1::{self as pb, WriteOptions};

use crate::client::{call, Failure};
use crate::cmd::rollout::wait_rollout;
use crate::cmd::{node, service, Ctx};
use crate::output::{human, now_ms, sanitize};
use crate::Exit;

/// `apply`'s arguments.
#[derive(Args, Debug)]
pub(crate) struct ApplyArgs {
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
}

/// `get`'s arguments.
#[derive(Args, Debug)]
pub(crate) struct GetArgs {
    /// What to get.
    #[arg(value_enum)]
    kind: GetKind,
    /// A workload name (a service is named after its workload).
    name: Option<String>,
    /// Namespace (default: all for lists, "default" for one).
    #[arg(long, short = 'n')]
    namespace: Option<String>,
}

/// What `get` lists: every spelling is a value of its own, so the help and
/// the completions list them all, as they always did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum GetKind {
    Workloads,
    Workload,
    Wl,
    Replicas,
    Replica,
    Nodes,
    Node,
    Services,
    Service,
    Svc,
}

/// `delete`'s arguments.
#[derive(Args, Debug)]
pub(crate) struct DeleteArgs {
    #[arg(value_parser = ["workload", "wl"])]
    kind: String,
    name: String,
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,
    /// Idempotency key: a retry with the same key is applied once.
    #[arg(long)]
    idempotency_key: Option<String>,
}

/// `scale`'s arguments.
#[derive(Args, Debug)]
pub(crate) struct ScaleArgs {
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
}

/// `apply`: creates or updates the workload in a manifest; with `--wait`,
/// waits for its rollout.
pub(crate) async fn apply(args: ApplyArgs, ctx: &Ctx) -> Result<(), Failure> {
    let servers = &ctx.target;
    let ApplyArgs {
        file,
        idempotency_key,
        wait,
        timeout,
    } = args;
    let text = if file == "-" {
        std::io::read_to_string(std::io::stdin())
            .context("reading the manifest from standard input")?
    } else {
        std::fs::read_to_string(&file).with_context(|| format!("reading {file}"))?
    };
    let w = cloudless_types::parse_manifest(&text)
        .map_err(|e| Failure::new(Exit::Usage, anyhow::anyhow!("{file}: {e}")))?;
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
    Ok(())
}

/// `get`: workloads (all, or one by name), replicas, nodes, or services.
pub(crate) async fn get(args: GetArgs, ctx: &Ctx) -> Result<(), Failure> {
    match args.kind {
        GetKind::Replicas | GetKind::Replica => get_replicas(args, ctx).await,
        GetKind::Nodes | GetKind::Node => node::list(ctx).await,
        GetKind::Services | GetKind::Service | GetKind::Svc => {
            service::get(ctx, args.name.as_deref(), args.namespace.as_deref()).await
        }
        GetKind::Workloads | GetKind::Workload | GetKind::Wl => get_workloads(args, ctx).await,
    }
}

/// `get replicas [NAME]`.
async fn get_replicas(args: GetArgs, ctx: &Ctx) -> Result<(), Failure> {
    let servers = &ctx.target;
    let GetArgs {
        name, namespace, ..
    } = args;
    let read = ctx.read_opts();
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
    if ctx.output.is_structured() {
        return ctx
            .output
            .print(&r.replicas.iter().map(replica_json).collect::<Vec<_>>());
    }
    print!(
        "{}",
        replicas_table(&r.replicas, ctx.output.is_wide(), now_ms())
    );
    Ok(())
}

/// The `get replicas` table; `wide` adds the ADDRESS column (`-` when the
/// agent has not reported one).
fn replicas_table(replicas: &[pb::Replica], wide: bool, now: i64) -> String {
    let address = |a: &str| {
        if !wide {
            String::new()
        } else if a.is_empty() {
            format!("{:<39} ", "-")
        } else {
            format!("{:<39} ", sanitize(a))
        }
    };
    let mut out = format!(
        "{:<44} {:<10} {:<12} {}{:>8} {:>5} {:<8} MESSAGE\n",
        "REPLICA",
        "STATE",
        "NODE",
        if wide {
            format!("{:<39} ", "ADDRESS")
        } else {
            String::new()
        },
        "RESTARTS",
        "EXIT",
        "AGE"
    );
    for x in replicas {
        out.push_str(&format!(
            "{:<44} {:<10} {:<12} {}{:>8} {:>5} {:<8} {}\n",
            x.id,
            x.state_name(),
            replica_node(x),
            address(&x.address),
            x.restarts,
            x.exit_code.map_or("-".to_owned(), |c| c.to_string()),
            human((now - x.created_at_ms).max(0) / 1000),
            x.message
        ));
    }
    out
}

/// `get workloads`, `get wl [NAME]`, `get workload NAME`.
async fn get_workloads(args: GetArgs, ctx: &Ctx) -> Result<(), Failure> {
    let servers = &ctx.target;
    let GetArgs {
        kind,
        name,
        namespace,
    } = args;
    let read = ctx.read_opts();
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
        None if kind == GetKind::Workload => {
            return Err(Failure::new(
                Exit::Usage,
                anyhow::anyhow!("get workload: a name is required (or use `get workloads`)"),
            ))
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
    if ctx.output.is_structured() {
        return ctx
            .output
            .print(&workloads.iter().map(workload_json).collect::<Vec<_>>());
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
    Ok(())
}

/// `delete workload NAME`.
pub(crate) async fn delete(args: DeleteArgs, ctx: &Ctx) -> Result<(), Failure> {
    let servers = &ctx.target;
    let DeleteArgs {
        name,
        namespace,
        idempotency_key,
        ..
    } = args;
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
    Ok(())
}

/// `scale workload NAME --replicas N`.
pub(crate) async fn scale(args: ScaleArgs, ctx: &Ctx) -> Result<(), Failure> {
    let servers = &ctx.target;
    let ScaleArgs {
        name,
        replicas,
        namespace,
        idempotency_key,
        ..
    } = args;
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
    Ok(())
}

/// A workload as printed with `-o json`/`-o yaml`.
pub(crate) fn workload_json(w: &pb::Workload) -> serde_json::Value {
    let spec = w.spec.clone().unwrap_or_default();
    serde_json::json!({
        "namespace": w.namespace, "name": w.name, "generation": w.generation,
        "template": w.template,
        "status": w.status.map(|st| serde_json::json!({
            "desiredReplicas": st.desired_replicas, "readyReplicas": st.ready_replicas,
            "updatedReplicas": st.updated_replicas, "currentReplicas": st.current_replicas,
        })),
        "createdAtMs": w.created_at_ms, "updatedAtMs": w.updated_at_ms, "vip": w.vip,
        "spec": { "image": spec.image, "replicas": spec.replicas, "command": spec.command,
                  "args": spec.args, "env": spec.env, "labels": spec.labels, "priority": spec.priority }
    })
}

/// A replica as printed with `-o json`/`-o yaml`.
pub(crate) fn replica_json(r: &pb::Replica) -> serde_json::Value {
    serde_json::json!({
        "id": r.id, "namespace": r.namespace, "workload": r.workload, "template": r.template,
        "nodeId": r.node_id, "nodeName": r.node_name, "state": r.state_name(), "exitCode": r.exit_code,
        "restarts": r.restarts, "message": r.message, "image": r.image,
        "createdAtMs": r.created_at_ms, "updatedAtMs": r.updated_at_ms, "address": r.address,
    })
}

/// Where a replica runs, for people: its node's name, else its id.
pub(crate) fn replica_node(x: &pb::Replica) -> &str {
    if x.node_name.is_empty() {
        &x.node_id
    } else {
        &x.node_name
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::{Cli, Cmd};

    #[test]
    fn every_spelling_of_get_still_parses() {
        for (spelling, kind) in [
            ("workloads", GetKind::Workloads),
            ("workload", GetKind::Workload),
            ("wl", GetKind::Wl),
            ("replicas", GetKind::Replicas),
            ("replica", GetKind::Replica),
            ("nodes", GetKind::Nodes),
            ("node", GetKind::Node),
            ("services", GetKind::Services),
            ("service", GetKind::Service),
            ("svc", GetKind::Svc),
        ] {
            let cli = Cli::try_parse_from(["cloudlessctl", "get", spelling, "web", "-n", "prod"])
                .unwrap_or_else(|e| panic!("get {spelling}: {e}"));
            let Cmd::Get(args) = cli.command else {
                panic!("get {spelling} parsed as {:?}", cli.command);
            };
            assert_eq!(args.kind, kind, "{spelling}");
            assert_eq!(args.name.as_deref(), Some("web"));
            assert_eq!(args.namespace.as_deref(), Some("prod"));
        }
        for bad in ["workloadz", "Workloads", "pods", ""] {
            assert!(
                Cli::try_parse_from(["cloudlessctl", "get", bad]).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn get_replicas_wide_adds_the_address_column() {
        let cli = Cli::try_parse_from(["cloudlessctl", "get", "replicas", "-o", "wide"])
            .expect("-o wide parses");
        assert!(cli.output.is_wide() && !cli.output.is_structured());
        let replica = |id: &str, address: &str| pb::Replica {
            id: id.into(),
            node_name: "phone-1".into(),
            state: pb::ReplicaState::Ready as i32,
            created_at_ms: 0,
            address: address.into(),
            ..Default::default()
        };
        let replicas = [
            replica("default.web-1-a", "10.244.0.5"),
            replica("default.web-1-b", ""),
        ];
        let wide = replicas_table(&replicas, true, 90_000);
        let lines: Vec<&str> = wide.lines().collect();
        assert!(lines[0].contains(" ADDRESS "), "{wide}");
        let column = lines[0].find("ADDRESS").expect("header");
        assert_eq!(&lines[1][column..column + 10], "10.244.0.5", "{wide}");
        assert_eq!(&lines[2][column..column + 2], "- ", "{wide}");
        let narrow = replicas_table(&replicas, false, 90_000);
        assert!(
            !narrow.contains("ADDRESS") && !narrow.contains("10.244.0.5"),
            "{narrow}"
        );
    }
}
