//! `cloudlessctl logs`: container output of a workload's replicas, through
//! the coordinators and the agents' tunnels.

use clap::Args;
use cloudless_proto::v1::workload_service_client::WorkloadServiceClient;
use cloudless_proto::v1::{self as pb};

use crate::client::{call, status_failure, Failure};
use crate::cmd::Ctx;

/// `logs`' arguments.
#[derive(Args, Debug)]
pub(crate) struct LogsArgs {
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
}

/// Streams the output, one line at a time, prefixed with the replica's id
/// unless `--replica` chose one.
pub(crate) async fn run(args: LogsArgs, ctx: &Ctx) -> Result<(), Failure> {
    let servers = &ctx.target;
    let LogsArgs {
        name,
        namespace,
        replica,
        follow,
        tail,
    } = args;
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
        if chunk.stream() == pb::LogStream::Error || chunk.legacy_stream == "error" {
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
    Ok(())
}
