//! `cloudlessctl`: the Cloudless command-line client.
//!
//! Exit codes: 0 success; 1 the server refused or failed the request; 2 bad
//! usage or input (including manifest validation); 3 no coordinator reachable.
//! See [`Exit`].
//!
//! This file holds the command line and the dispatch; [`client`] connects
//! and maps failures to exit codes, [`output`] prints, and [`cmd`] has one
//! module per command family.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod client;
mod cmd;
mod output;

use client::Failure;
use cmd::{admin, cluster, describe, events, exec, logs, node, rollout, secrets, token, workload};
use output::Output;

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

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Coordinator membership and status.
    #[command(subcommand)]
    Cluster(cluster::ClusterCmd),
    /// Admin certificates: renew yours, issue to others, revoke, list.
    #[command(subcommand)]
    Admin(admin::AdminCmd),
    /// Create or update the workload in a manifest (YAML or JSON).
    Apply(workload::ApplyArgs),
    /// List workloads (or show one), nodes, replicas, or services.
    Get(workload::GetArgs),
    /// Delete a workload.
    Delete(workload::DeleteArgs),
    /// Join tokens for enrolling devices.
    #[command(subcommand)]
    Token(token::TokenCmd),
    /// Secrets, their access tokens, the master key and the audit log.
    #[command(subcommand)]
    Secrets(secrets::SecretsCmd),
    /// Enrolled nodes.
    #[command(subcommand)]
    Node(node::NodeCmd),
    /// A workload's spec, status and replicas (with node and state), or a
    /// service's address, name, policy and endpoints.
    Describe(describe::DescribeArgs),
    /// Rollout progress of a workload.
    #[command(subcommand)]
    Rollout(rollout::RolloutCmd),
    /// Container output of a workload's replicas (through the coordinators
    /// and the agents' tunnels).
    Logs(logs::LogsArgs),
    /// Events: placements, losses, rollbacks, node phase changes.
    Events(events::EventsArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completion { shell: clap_complete::Shell },
    /// Run a command in a replica's container (through the coordinators and
    /// the agent's tunnel); prints its output and exits with its exit code.
    Exec(exec::ExecArgs),
    /// Change a workload's replica count.
    Scale(workload::ScaleArgs),
}

/// `cloudlessctl`'s exit codes (clap's own usage errors exit 2 too). `exec`
/// exits with its command's code instead (1-255).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Exit {
    /// 0: done.
    Success = 0,
    /// 1: the server refused or failed the request (or a local step failed:
    /// the async runtime, writing YAML or a credentials file).
    Failed = 1,
    /// 2: bad usage or input, including manifest validation, bad `--server`
    /// or `--config`, and expired admin credentials.
    Usage = 2,
    /// 3: no coordinator reachable (`Unavailable`); also a rollout or drain
    /// not done when its wait ends.
    Unavailable = 3,
}

impl Exit {
    /// The process exit code.
    fn code(self) -> u8 {
        self as u8
    }
}

/// Connects (keeping the admin certificate alive) and runs the command.
async fn run(cli: Cli) -> Result<(), Failure> {
    let (mut target, paths) = client::connect(cli.server.as_deref(), cli.config.as_deref())?;
    if let Some(p) = &paths {
        if !matches!(cli.command, Cmd::Admin(admin::AdminCmd::Renew)) {
            admin::keep_alive(&mut target, p).await?;
        }
    }
    let ctx = cmd::Ctx {
        target,
        output: cli.output,
        stale: cli.stale,
    };
    match cli.command {
        Cmd::Cluster(c) => cluster::run(c, &ctx).await,
        Cmd::Admin(c) => admin::run(c, &ctx, paths.as_ref()).await,
        Cmd::Apply(a) => workload::apply(a, &ctx).await,
        Cmd::Get(a) => workload::get(a, &ctx).await,
        Cmd::Delete(a) => workload::delete(a, &ctx).await,
        Cmd::Token(c) => token::run(c, &ctx).await,
        Cmd::Secrets(c) => secrets::run(c, &ctx).await,
        Cmd::Node(c) => node::run(c, &ctx).await,
        Cmd::Describe(a) => describe::run(a, &ctx).await,
        Cmd::Rollout(c) => rollout::run(c, &ctx).await,
        Cmd::Logs(a) => logs::run(a, &ctx).await,
        Cmd::Events(a) => events::run(a, &ctx).await,
        Cmd::Completion { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "cloudlessctl", &mut std::io::stdout());
            Ok(())
        }
        Cmd::Exec(a) => exec::run(a, &ctx).await,
        Cmd::Scale(a) => workload::scale(a, &ctx).await,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cloudlessctl: cannot start the async runtime: {e}");
            return ExitCode::from(Exit::Failed.code());
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::from(Exit::Success.code()),
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
    fn the_command_line_model_is_consistent() {
        <Cli as clap::CommandFactory>::command().debug_assert();
    }

    #[test]
    fn exit_codes_keep_their_numbers() {
        let codes = [Exit::Success, Exit::Failed, Exit::Usage, Exit::Unavailable].map(Exit::code);
        assert_eq!(codes, [0, 1, 2, 3]);
    }
}
