//! `cloudless-agent`: enrolls this device once with a join token, then keeps
//! its identity fresh and heartbeats to the coordinators until SIGINT or SIGTERM.
//!
//! Exit codes: 0 clean shutdown; 2 invalid flags or configuration; 4 the
//! node was removed from the cluster; 5 the certificate expired and the
//! cluster refuses to let the node rejoin (past the grace: enroll again with a
//! new join token); 1 any other failure.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use cloudless_agent::{AgentConfig, AgentError};
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

// The system allocator, on purpose: with mimalloc the agent's resident
// memory was 40.5-46 MiB (its per-thread segments), with glibc's about 14.5 MiB
// for the same work (docs/benchmarks.md). Devices care about memory more
// than the agent's allocation speed.

#[derive(Parser, Debug)]
#[command(name = "cloudless-agent", version, about = "Cloudless agent")]
struct Cli {
    /// Where the node identity lives (node.key, node.crt, ca.crt).
    #[arg(
        long,
        env = "CLOUDLESS_AGENT_DATA_DIR",
        default_value = "/var/lib/cloudless/agent"
    )]
    data_dir: PathBuf,
    /// Coordinator gRPC address host:port (repeat, or comma-separate, for several).
    #[arg(
        long = "coordinator",
        env = "CLOUDLESS_COORDINATORS",
        value_delimiter = ',',
        required = true
    )]
    coordinators: Vec<String>,
    /// Node name (unique in the cluster; defaults to the host name).
    #[arg(long)]
    name: Option<String>,
    /// File holding a join token (first start only). Prefer this to the variable.
    #[arg(long)]
    join_token_file: Option<PathBuf>,
    /// The cluster CA certificate to trust when enrolling.
    #[arg(long)]
    ca_cert: Option<PathBuf>,
    /// Label reported with heartbeats, key=value (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Log filter in RUST_LOG syntax.
    #[arg(long, default_value = "info")]
    log_filter: String,
    /// Log lines as `text` or `json` (one object per line, as coordinators
    /// with `log_format = "json"`).
    #[arg(long, default_value = "text", value_parser = parse_log_format)]
    log_format: cloudless_telemetry::LogFormat,
    /// containerd's socket.
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    containerd_socket: PathBuf,
    /// containerd namespace for this agent's containers and images.
    #[arg(long, default_value = "cloudless")]
    containerd_namespace: String,
    /// Registry host:port spoken to over plain HTTP (repeatable).
    #[arg(long = "insecure-registry")]
    insecure_registries: Vec<String>,
    /// Extra CA certificate (PEM file) trusted for registries (repeatable).
    #[arg(long = "registry-ca")]
    registry_ca_files: Vec<PathBuf>,
    /// Do not run workloads (membership and heartbeats only).
    #[arg(long)]
    no_workloads: bool,
    /// Run replicas without a network of their own (loopback only: no
    /// address, egress, published ports or service names).
    #[arg(long)]
    no_container_network: bool,
    /// Where the CNI plugins are.
    #[arg(long, default_value = "/usr/lib/cni")]
    cni_bin_dir: PathBuf,
    /// Where replicas' network namespace files are.
    #[arg(long, default_value = "/run/cloudless/netns")]
    netns_dir: PathBuf,
    /// The node's bridge for replicas (one per agent on a host).
    #[arg(long, default_value = "cld0")]
    bridge: String,
    /// Prefix of the node's iptables chains (one per agent on a host; at
    /// most 12 characters).
    #[arg(long, default_value = "CLOUDLESS")]
    firewall_chain_prefix: String,
    /// The node's bandwidth in bits per second, for placing workloads that
    /// request bandwidth (default: the default route's link speed, where
    /// the kernel knows it; virtual links mostly do not).
    #[arg(long)]
    bandwidth: Option<u64>,
    /// The service proxy's port on the bridge's address.
    #[arg(long, default_value_t = 7681)]
    proxy_port: u16,
    /// Device directory workloads may mount as a hostPath volume, with
    /// everything under it (repeatable; none by default).
    #[arg(long = "allow-host-path")]
    allowed_host_paths: Vec<PathBuf>,
    /// Directory of seccomp profiles for `seccompProfile.type: Localhost`.
    #[arg(long, default_value = "/etc/cloudless/seccomp")]
    seccomp_dir: PathBuf,
    /// Capability workloads may add beyond Docker's default set
    /// (repeatable or comma-separated; `ALL` allows any; none by default).
    #[arg(
        long = "allow-capability",
        env = "CLOUDLESS_AGENT_ALLOW_CAPABILITIES",
        value_delimiter = ','
    )]
    allowed_capabilities: Vec<String>,
    /// Workloads may run without a seccomp filter, or with a `Localhost`
    /// profile that allows by default.
    #[arg(long, env = "CLOUDLESS_AGENT_ALLOW_UNCONFINED_SECCOMP")]
    allow_unconfined_seccomp: bool,
    /// Workloads may name their own AppArmor profile (`unconfined`, or one
    /// loaded on this host) instead of the agent's.
    #[arg(long, env = "CLOUDLESS_AGENT_ALLOW_APPARMOR_OVERRIDE")]
    allow_apparmor_override: bool,
    /// Workloads may set an SELinux label whose type is not `container_t`.
    #[arg(long, env = "CLOUDLESS_AGENT_ALLOW_SELINUX_OVERRIDE")]
    allow_selinux_override: bool,
    /// Workloads may share the host's network namespace (`hostNetwork`).
    #[arg(long, env = "CLOUDLESS_AGENT_ALLOW_HOST_NAMESPACES")]
    allow_host_namespaces: bool,
    /// How long replicas keep running (and restarting) without any
    /// coordinator before they are stopped, unless their workload sets
    /// disconnect.stopOnClientAfterSeconds: 90s, 30m, 1h, 7d; 0 = forever.
    #[arg(long, default_value = "1h", value_parser = cloudless_types::parse_duration_secs)]
    max_disconnected: u64,
    /// How often secrets in use are read again; secret volumes follow
    /// updates at this pace (90s, 5m).
    #[arg(long, default_value = "60s", value_parser = cloudless_types::parse_duration_secs)]
    secret_refresh: u64,
    /// UDP address of the overlay endpoint that carries service traffic
    /// between workloads on different nodes (QUIC, mutual TLS); `off` runs
    /// none.
    #[arg(long, default_value = "0.0.0.0:7600", value_parser = parse_listen)]
    overlay_listen: ListenAddr,
    /// Address other nodes reach the overlay at (repeatable); default: the
    /// listen address, or this host's address on the route to the first
    /// coordinator.
    #[arg(long = "overlay-advertise")]
    overlay_advertise: Vec<std::net::SocketAddr>,
    /// Before relaying a stream to a node that cannot be dialed, ask a
    /// relay to introduce the two nodes and dial each other at once (NAT
    /// hole punching): true or false.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    overlay_hole_punching: bool,
    /// Where to serve /metrics (Prometheus), /healthz and /readyz (HTTP);
    /// `off` serves none.
    #[arg(long, default_value = "127.0.0.1:9464", value_parser = parse_listen)]
    metrics_addr: ListenAddr,
}

/// An address to listen on, or `off`.
#[derive(Debug, Clone, Copy)]
struct ListenAddr(Option<std::net::SocketAddr>);

fn parse_listen(s: &str) -> Result<ListenAddr, String> {
    if s == "off" {
        return Ok(ListenAddr(None));
    }
    s.parse()
        .map(|a| ListenAddr(Some(a)))
        .map_err(|e| format!("{s:?} is neither ip:port nor off: {e}"))
}

fn parse_log_format(s: &str) -> Result<cloudless_telemetry::LogFormat, String> {
    match s {
        "text" => Ok(cloudless_telemetry::LogFormat::Text),
        "json" => Ok(cloudless_telemetry::LogFormat::Json),
        _ => Err(format!("{s:?}: expected text or json")),
    }
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("--label {s:?}: expected key=value"))
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_lowercase())
        .unwrap_or_else(|_| "node".into())
}

/// Raises the soft limit of open files to the hard one (at most 2^20): the
/// service proxy carries up to 16,384 connections per pool, up to six
/// descriptors each, far past the usual soft limit of 1,024. The proxy
/// sizes its pools to the limit it finds (warned about when low). The
/// programs the agent runs (CNI plugins, iptables, nft) inherit it.
fn raise_open_files_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            let want = hard.min(1 << 20);
            if soft < want {
                if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, want, hard) {
                    tracing::warn!(soft, hard, error = %e, "cannot raise the limit of open files");
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot read the limit of open files"),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Checked before anything starts (the runner checks again).
    for c in &cli.allowed_capabilities {
        if !c.trim().eq_ignore_ascii_case("ALL")
            && cloudless_runtime::policy::capability_name(c).is_none()
        {
            eprintln!(
                "--allow-capability {c:?}: not a Linux capability (NET_ADMIN, CAP_SYS_PTRACE, ALL)"
            );
            return ExitCode::from(2);
        }
    }
    let join_token = match (&cli.join_token_file, std::env::var("CLOUDLESS_JOIN_TOKEN")) {
        (Some(p), _) => match std::fs::read_to_string(p) {
            Ok(t) => Some(Zeroizing::new(t.trim().to_owned())),
            Err(e) => {
                eprintln!("--join-token-file {}: {e}", p.display());
                return ExitCode::from(2);
            }
        },
        (None, Ok(t)) if !t.is_empty() => Some(Zeroizing::new(t)),
        _ => None,
    };
    // containerd's shim opens the output FIFOs under the data dir from its
    // own working directory: the path must be absolute.
    let data_dir = match std::path::absolute(&cli.data_dir) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("--data-dir {}: {e}", cli.data_dir.display());
            return ExitCode::from(2);
        }
    };
    let config = AgentConfig {
        overlay_listen: cli.overlay_listen.0,
        overlay_advertise: cli.overlay_advertise,
        overlay_hole_punching: cli.overlay_hole_punching,
        bandwidth_bps: cli.bandwidth.filter(|b| *b > 0),
        metrics_listen: cli.metrics_addr.0,
        coordinators: cli.coordinators,
        name: cli.name.unwrap_or_else(host_name),
        join_token,
        ca_cert: cli.ca_cert,
        labels: cli.labels.into_iter().collect::<BTreeMap<_, _>>(),
        runtime: (!cli.no_workloads).then(|| cloudless_agent::RuntimeConfig {
            log_dir: data_dir.join("logs"),
            containerd_socket: cli.containerd_socket,
            namespace: cli.containerd_namespace,
            insecure_registries: cli.insecure_registries,
            registry_ca_files: cli.registry_ca_files,
            volume_dir: data_dir.join("volumes"),
            secret_dir: data_dir.join("secrets"),
            secret_refresh: std::time::Duration::from_secs(cli.secret_refresh.max(1)),
            allowed_host_paths: cli.allowed_host_paths,
            seccomp_dir: Some(cli.seccomp_dir),
            security: cloudless_agent::SecurityPolicyConfig {
                allowed_capabilities: cli.allowed_capabilities,
                allow_unconfined_seccomp: cli.allow_unconfined_seccomp,
                allow_apparmor_override: cli.allow_apparmor_override,
                allow_selinux_override: cli.allow_selinux_override,
                allow_host_namespaces: cli.allow_host_namespaces,
            },
            apparmor_dir: data_dir.join("apparmor"),
            max_disconnected: (cli.max_disconnected > 0)
                .then(|| std::time::Duration::from_secs(cli.max_disconnected)),
            network: (!cli.no_container_network).then(|| cloudless_agent::NetworkSettings {
                cni_bin_dir: cli.cni_bin_dir,
                state_dir: data_dir.join("network"),
                netns_dir: cli.netns_dir,
                bridge: cli.bridge,
                chain_prefix: cli.firewall_chain_prefix,
                proxy_port: cli.proxy_port,
            }),
        }),
        data_dir,
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Logs, and traces over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set
    // (the exporter's connection runs on this runtime).
    let telemetry = {
        let _runtime = rt.enter();
        cloudless_telemetry::init(Some("cloudless-agent"), cli.log_format, &cli.log_filter)
    };
    raise_open_files_limit();
    let code = rt.block_on(async move {
        let cancel = CancellationToken::new();
        let stop = cancel.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("stopping");
            stop.cancel();
        });
        match cloudless_agent::run(config, cancel).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e @ AgentError::Config(_)) => {
                tracing::error!(error = %e, "cannot start");
                ExitCode::from(2)
            }
            Err(e @ AgentError::Removed(_)) => {
                tracing::error!(error = %e, "stopping");
                ExitCode::from(4)
            }
            Err(e @ AgentError::RejoinRefused { .. }) => {
                tracing::error!(error = %e, "stopping");
                ExitCode::from(5)
            }
            Err(e) => {
                tracing::error!(error = %e, "agent failed");
                ExitCode::FAILURE
            }
        }
    });
    {
        let _runtime = rt.enter();
        telemetry.shutdown();
    }
    code
}

async fn wait_for_signal() {
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
