//! Where and how the agent runs containers, and what workloads may ask of
//! this device: the settings the agent's flags fill in.

use std::path::PathBuf;
use std::time::Duration;

/// Where and how the agent runs containers.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// containerd's socket.
    pub containerd_socket: PathBuf,
    /// containerd namespace for this agent's containers and images.
    pub namespace: String,
    /// Container logs.
    pub log_dir: PathBuf,
    /// Registries spoken to over plain HTTP (`host:port`).
    pub insecure_registries: Vec<String>,
    /// Extra CA certificates (PEM files) trusted for registries.
    pub registry_ca_files: Vec<PathBuf>,
    /// Where replicas' `emptyDir` volumes live.
    pub volume_dir: PathBuf,
    /// Where replicas' secret volumes are mounted (tmpfs each).
    pub secret_dir: PathBuf,
    /// How often secrets in use are read again (secret volumes follow updates).
    pub secret_refresh: Duration,
    /// Device directories workloads may mount as `hostPath` (prefixes).
    pub allowed_host_paths: Vec<PathBuf>,
    /// Seccomp profiles for `Localhost`.
    pub seccomp_dir: Option<PathBuf>,
    /// What workloads' `securityContext` may ask of this device beyond the
    /// defaults.
    pub security: SecurityPolicyConfig,
    /// Where the agent writes its AppArmor profile before loading it.
    pub apparmor_dir: PathBuf,
    /// How long replicas keep running without any coordinator before they
    /// are stopped (unless their workload's
    /// `disconnect.stopOnClientAfterSeconds` says otherwise); `None`: forever.
    pub max_disconnected: Option<Duration>,
    /// How replicas get their network; `None`: each has only loopback
    /// (`--no-container-network`).
    pub network: Option<NetworkSettings>,
}

/// Where and how the node's container network is made (the subnet comes
/// from the coordinators).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSettings {
    /// The CNI plugins (`--cni-bin-dir`, default `/usr/lib/cni`).
    pub cni_bin_dir: PathBuf,
    /// Add results and address leases (`<data dir>/network`).
    pub state_dir: PathBuf,
    /// Replicas' namespace files (`--netns-dir`, default
    /// `/run/cloudless/netns`).
    pub netns_dir: PathBuf,
    /// The node's bridge (`--bridge`, default `cld0`).
    pub bridge: String,
    /// Prefix of the node's iptables chains (`--firewall-chain-prefix`,
    /// default `CLOUDLESS`).
    pub chain_prefix: String,
    /// The service proxy's port on the bridge's address (`--proxy-port`,
    /// default 7681).
    pub proxy_port: u16,
}

/// What workloads may ask of this device beyond the defaults (all off by
/// default): the node policy's settings, from agent flags or environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecurityPolicyConfig {
    /// Capabilities allowed beyond Docker's default set (`NET_ADMIN`;
    /// `ALL`): `--allow-capability`, `CLOUDLESS_AGENT_ALLOW_CAPABILITIES`.
    pub allowed_capabilities: Vec<String>,
    /// `seccompProfile: Unconfined`, or a `Localhost` profile that allows by
    /// default: `--allow-unconfined-seccomp`.
    pub allow_unconfined_seccomp: bool,
    /// `appArmorProfile` other than `runtime/default` (`unconfined`, or a
    /// loaded profile): `--allow-apparmor-override`.
    pub allow_apparmor_override: bool,
    /// `seLinuxLabel` with a type other than `container_t`:
    /// `--allow-selinux-override`.
    pub allow_selinux_override: bool,
    /// `hostNetwork` (and other host namespaces): `--allow-host-namespaces`.
    pub allow_host_namespaces: bool,
}
