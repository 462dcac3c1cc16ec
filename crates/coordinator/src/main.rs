//! `cloudless-coordinator`: parses flags, loads configuration, starts telemetry
//! and runs one coordinator until SIGINT or SIGTERM.
//!
//! Exit codes: 0 clean shutdown; 2 invalid configuration; 3 could not start
//! (data directory, listeners, Raft); 1 any other failure.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// mimalloc on the coordinator (its write path allocates per request); its
/// gain is not yet measured apart from other changes (docs/adr/0005-allocators.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use cloudless_coordinator::{ConfigSources, Coordinator, CoordinatorConfig, StartMode};

#[derive(Parser, Debug)]
#[command(
    name = "cloudless-coordinator",
    version,
    about = "Cloudless coordinator (Raft-replicated control plane)"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Bootstrap a new cluster with this coordinator as its first member, then serve.
    /// On a data dir that already holds cluster state this just resumes.
    Init(Common),
    /// Serve from the data dir; with --join, ask an existing coordinator to add this one.
    Run {
        #[command(flatten)]
        common: Common,
        /// host:port of any coordinator of the cluster to join.
        #[arg(long, env = "CLOUDLESS_JOIN")]
        join: Option<String>,
    },
    /// Check the configuration and print it, without starting anything.
    CheckConfig(Common),
    /// Break-glass: issue an admin certificate from this coordinator's data
    /// dir and master key, without the cluster (when every admin
    /// certificate has expired). Normally use `cloudlessctl admin issue`.
    AdminCert {
        #[command(flatten)]
        common: Common,
        /// The admin's name (its certificate is `cloudless://admin/<name>`).
        #[arg(long, default_value = "admin")]
        name: String,
        /// Directory for ca.crt, admin.crt, admin.key and cloudlessctl.toml.
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a new random master key to PATH (mode 0600; never overwrites).
    GenMasterKey {
        /// Where to write it.
        path: PathBuf,
    },
}

#[derive(Args, Debug)]
struct Common {
    /// TOML configuration file (see config/coordinator.toml).
    #[arg(long, short = 'c', env = "CLOUDLESS_CONFIG")]
    config: Option<PathBuf>,
    /// Overrides `data_dir`.
    #[arg(long)]
    data_dir: Option<String>,
    /// Overrides `listen_addr`.
    #[arg(long)]
    listen: Option<String>,
    /// Overrides `advertise_addr`.
    #[arg(long)]
    advertise: Option<String>,
    /// Overrides `http_addr`.
    #[arg(long)]
    http: Option<String>,
    /// Overrides `node_id`.
    #[arg(long)]
    node_id: Option<String>,
    /// Serve plaintext gRPC with no master key, where every caller is an
    /// administrator and agents cannot enroll. Refused on a non-loopback
    /// listen address unless --insecure-plaintext-anywhere.
    #[arg(long)]
    insecure_plaintext: bool,
    /// With --insecure-plaintext: allow a non-loopback listen address
    /// (anyone who reaches it can rewrite the cluster).
    #[arg(long)]
    insecure_plaintext_anywhere: bool,
    /// Overrides any key: --set raft.heartbeat_interval_ms=50 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

impl Common {
    fn sources(&self) -> Result<ConfigSources, String> {
        let mut flags = Vec::new();
        for (key, v) in [
            ("data_dir", &self.data_dir),
            ("listen_addr", &self.listen),
            ("advertise_addr", &self.advertise),
            ("http_addr", &self.http),
            ("node_id", &self.node_id),
        ] {
            if let Some(v) = v {
                flags.push((key.to_owned(), v.clone()));
            }
        }
        for (key, on) in [
            ("insecure_plaintext", self.insecure_plaintext),
            (
                "insecure_plaintext_anywhere",
                self.insecure_plaintext_anywhere,
            ),
        ] {
            if on {
                flags.push((key.to_owned(), "true".to_owned()));
            }
        }
        for kv in &self.set {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("--set {kv:?}: expected KEY=VALUE"))?;
            flags.push((k.trim().to_owned(), v.to_owned()));
        }
        Ok(ConfigSources {
            file: self.config.clone(),
            env: std::env::vars()
                .filter(|(k, _)| k.starts_with("CLOUDLESS_"))
                .collect(),
            flags,
        })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (common, mode) = match cli.command {
        Cmd::GenMasterKey { path } => return gen_master_key(&path),
        Cmd::Init(c) => (c, Some(StartMode::Init)),
        Cmd::Run { common, join } => (common, Some(StartMode::Run { join })),
        Cmd::CheckConfig(c) => (c, None),
        Cmd::AdminCert { common, name, out } => return admin_cert(&common, &name, &out),
    };
    let config = match common
        .sources()
        .map_err(|e| e.to_string())
        .and_then(|s| CoordinatorConfig::load(&s).map_err(|e| e.to_string()))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cloudless-coordinator: {e}");
            return ExitCode::from(2);
        }
    };
    let Some(mode) = mode else {
        println!("{config:#?}");
        return ExitCode::SUCCESS;
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cloudless-coordinator: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    // Logs, and traces over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set
    // (the exporter's connection runs on this runtime).
    let telemetry = {
        let _runtime = rt.enter();
        cloudless_telemetry::init(
            Some("cloudless-coordinator"),
            config.log_format,
            &config.log_filter,
        )
    };
    let code = rt.block_on(async move {
        let coordinator = match Coordinator::start(config, mode).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("cloudless-coordinator: cannot start: {e}");
                return ExitCode::from(3);
            }
        };
        wait_for_signal().await;
        tracing::info!("shutting down");
        coordinator.shutdown(Duration::from_secs(10)).await;
        ExitCode::SUCCESS
    });
    {
        let _runtime = rt.enter();
        telemetry.shutdown();
    }
    code
}

fn admin_cert(common: &Common, name: &str, out: &std::path::Path) -> ExitCode {
    let config = match common
        .sources()
        .and_then(|s| CoordinatorConfig::load(&s).map_err(|e| e.to_string()))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cloudless-coordinator: {e}");
            return ExitCode::from(2);
        }
    };
    match cloudless_coordinator::issue_admin_offline(&config, name, out) {
        Ok(()) => {
            println!(
                "wrote admin {name:?} credentials to {}; use: cloudlessctl --config {}",
                out.display(),
                out.join("cloudlessctl.toml").display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cloudless-coordinator: {e}");
            ExitCode::from(1)
        }
    }
}

fn gen_master_key(path: &std::path::Path) -> ExitCode {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let key = match cloudless_pki::MasterKey::generate() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("cloudless-coordinator: {e}");
            return ExitCode::from(1);
        }
    };
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| {
            f.write_all(key.to_base64().as_bytes())?;
            f.write_all(b"\n")?;
            f.sync_all()
        });
    match written {
        Ok(()) => {
            println!(
                "wrote a new master key to {} (mode 0600); give every coordinator the same file",
                path.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cloudless-coordinator: cannot create {}: {e} (an existing key is never overwritten)", path.display());
            ExitCode::from(2)
        }
    }
}

async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the coordinator");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
