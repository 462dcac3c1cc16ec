//! `cloudlessctl exec`: a command in a replica's container, through the
//! coordinators and the agent's tunnel.

use clap::Args;
use cloudless_proto::v1::workload_service_client::WorkloadServiceClient;
use cloudless_proto::v1::{self as pb};

use crate::client::{call, status_failure, Failure};
use crate::cmd::Ctx;
use crate::Exit;

/// `exec`'s arguments.
#[derive(Args, Debug)]
pub(crate) struct ExecArgs {
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
}

/// Prints the command's output and fails with its exit code (1-255) when
/// it is not 0.
pub(crate) async fn run(args: ExecArgs, ctx: &Ctx) -> Result<(), Failure> {
    let servers = &ctx.target;
    let ExecArgs {
        name,
        namespace,
        replica,
        timeout,
        command,
    } = args;
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
            return Err(Failure::new(
                Exit::Failed,
                anyhow::anyhow!("the command's exit code never arrived"),
            ))
        }
    }
    Ok(())
}
