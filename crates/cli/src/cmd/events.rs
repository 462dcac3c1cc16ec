//! `cloudlessctl events`: placements, losses, rollbacks, node phase
//! changes.

use clap::Args;
use cloudless_proto::enums::shown;
use cloudless_proto::v1::workload_service_client::WorkloadServiceClient;
use cloudless_proto::v1::{self as pb};

use crate::client::{call, status_failure, Failure};
use crate::cmd::Ctx;
use crate::output::{human, now_ms};

/// `events`' arguments.
#[derive(Args, Debug)]
pub(crate) struct EventsArgs {
    /// Only this workload's.
    name: Option<String>,
    /// Only this namespace's (default: everything, nodes included).
    #[arg(long, short = 'n')]
    namespace: Option<String>,
    /// Keep streaming new events.
    #[arg(long, short = 'w')]
    watch: bool,
}

/// Prints the events (and with `--watch`, new ones as they come).
pub(crate) async fn run(args: EventsArgs, ctx: &Ctx) -> Result<(), Failure> {
    let servers = &ctx.target;
    let EventsArgs {
        name,
        namespace,
        watch,
    } = args;
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
    let structured = ctx.output.is_structured();
    if !structured {
        println!(
            "{:<8} {:<9} {:<24} {:<18} MESSAGE",
            "AGE", "KIND", "OBJECT", "REASON"
        );
    }
    while let Some(e) = stream.message().await.map_err(status_failure)? {
        if structured {
            ctx.output.print(&serde_json::json!({
                "atMs": e.at_ms, "kind": shown::<pb::ObjectKind>(e.kind, &e.legacy_kind), "object": e.object,
                "reason": e.reason, "message": e.message,
            }))?;
        } else {
            println!(
                "{:<8} {:<9} {:<24} {:<18} {}",
                human((now_ms() - e.at_ms).max(0) / 1000),
                shown::<pb::ObjectKind>(e.kind, &e.legacy_kind),
                e.object,
                e.reason,
                e.message
            );
        }
    }
    Ok(())
}
