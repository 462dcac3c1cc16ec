//! What the agent asks the runtime for, and what the node allows.

use std::collections::BTreeMap;
use std::path::PathBuf;

/// Which seccomp filter a container runs under.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SeccompProfile {
    /// An allow-list in the spirit of Docker's default (the default).
    #[default]
    RuntimeDefault,
    /// A minimal allow-list: processes, memory, time, signals, I/O on open
    /// files and sockets; no file system changes (mkdir, unlink, rename,
    /// chmod, chown, links, mknod), mounts, tracing, modules, keyrings or bpf.
    Strict,
    /// An OCI seccomp JSON profile from the node's seccomp directory, by file name.
    Localhost(String),
    /// No filter; only where the node allows it.
    Unconfined,
}

/// The security settings of one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecurityContext {
    /// Run as this uid instead of the image's user.
    pub run_as_user: Option<u32>,
    /// Run with this gid instead of the image's group.
    pub run_as_group: Option<u32>,
    /// Refuse to start if the process would run as uid 0.
    pub run_as_non_root: bool,
    /// Mount the root file system read-only.
    pub read_only_root_filesystem: bool,
    /// Capabilities added to the empty set (`NET_BIND_SERVICE` or `CAP_NET_BIND_SERVICE`).
    pub capabilities_add: Vec<String>,
    /// The seccomp filter.
    pub seccomp: SeccompProfile,
    /// AppArmor profile name; `None` or `runtime/default`: the node's own
    /// profile (`cloudless-default`, where AppArmor is enabled and the agent
    /// loaded it).
    pub apparmor_profile: Option<String>,
    /// SELinux process label (where SELinux is enabled).
    pub selinux_label: Option<String>,
    /// Share the host's network namespace (only where the node allows it).
    pub host_network: bool,
    /// Share the host's PID namespace (only where the node allows it).
    pub host_pid: bool,
    /// Share the host's IPC namespace (only where the node allows it).
    pub host_ipc: bool,
}

impl Default for SecurityContext {
    fn default() -> Self {
        Self {
            run_as_user: None,
            run_as_group: None,
            run_as_non_root: false,
            read_only_root_filesystem: false,
            capabilities_add: Vec::new(),
            seccomp: SeccompProfile::RuntimeDefault,
            apparmor_profile: None,
            selinux_label: None,
            host_network: false,
            host_pid: false,
            host_ipc: false,
        }
    }
}

/// Resource limits; 0 means unlimited (the agent always sets pids).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    /// CPU limit in millicores (CFS quota); also sets the shares.
    pub cpu_millis: u64,
    /// Memory limit in bytes; a process over it is OOM-killed.
    pub memory_bytes: u64,
    /// Most processes and threads.
    pub pids: i64,
}

/// One container to create.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ContainerConfig {
    /// Container id (also its cgroup and snapshot key).
    pub id: String,
    /// Replaces the image's entrypoint when non-empty.
    pub command: Vec<String>,
    /// Replaces the image's cmd when non-empty.
    pub args: Vec<String>,
    /// Environment, over the image's.
    pub env: BTreeMap<String, String>,
    /// Working directory, else the image's, else `/`.
    pub working_dir: Option<String>,
    /// Limits.
    pub limits: Limits,
    /// Security settings.
    pub security: SecurityContext,
    /// Runtime class (`runc` when empty).
    pub runtime_class: Option<String>,
    /// Extra mounts (volumes).
    pub mounts: Vec<Mount>,
    /// The network namespace to join (the replica's, made by the node's
    /// container network); `None`: a fresh one with only loopback.
    /// Ignored with `securityContext.hostNetwork`.
    pub network_namespace: Option<std::path::PathBuf>,
}

/// A volume mounted into the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Absolute path in the container.
    pub destination: String,
    /// What is mounted.
    pub source: MountSource,
    /// Read-only.
    pub read_only: bool,
    /// The field to name in errors (e.g. `volumeMounts[0]`).
    pub field: String,
    /// The volume's name, for errors (may be empty).
    pub volume: String,
}

/// Where a mount comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountSource {
    /// A directory the agent made for the replica (an `emptyDir`).
    ReplicaDir(PathBuf),
    /// A tmpfs of this many bytes.
    Tmpfs(u64),
    /// A directory of the device; only under the node's allowed prefixes.
    HostPath(PathBuf),
}

/// The parts of an OCI image configuration that shape the process.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ImageProcess {
    /// Entrypoint.
    pub entrypoint: Vec<String>,
    /// Default arguments.
    pub cmd: Vec<String>,
    /// `KEY=value` entries.
    pub env: Vec<String>,
    /// Working directory.
    pub working_dir: String,
    /// `uid`, `uid:gid`, or a name.
    pub user: String,
}

/// What this node offers and allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePolicy {
    /// Containers may share host namespaces.
    pub allow_host_namespaces: bool,
    /// Containers may run without a seccomp filter, or with a `Localhost`
    /// profile whose default action allows (which filters next to nothing).
    pub allow_unconfined_seccomp: bool,
    /// Capabilities containers may add beyond Docker's default set
    /// (`NET_ADMIN` or `CAP_NET_ADMIN`; `ALL` allows any).
    pub allowed_capabilities: Vec<String>,
    /// Containers may name their own AppArmor profile (`unconfined`, or a
    /// profile loaded in the kernel) instead of the node's.
    pub allow_apparmor_override: bool,
    /// Containers may set an SELinux label whose type is not `container_t`.
    pub allow_selinux_override: bool,
    /// Where `Localhost` seccomp profiles live.
    pub seccomp_dir: PathBuf,
    /// AppArmor is enabled in this kernel.
    pub apparmor_enabled: bool,
    /// The AppArmor profile containers get by default: set only once the
    /// agent has loaded it and seen it listed by the kernel; `None` names no
    /// profile (the runtime's default).
    pub apparmor_profile: Option<String>,
    /// The kernel's list of loaded AppArmor profiles.
    pub apparmor_profiles_file: PathBuf,
    /// SELinux is enabled in this kernel.
    pub selinux_enabled: bool,
    /// Runtime classes this node advertises, with their containerd runtime
    /// handlers (`runc` is always there).
    pub runtime_handlers: BTreeMap<String, String>,
    /// containerd namespace; also the cgroup parent.
    pub namespace: String,
    /// Device directories workloads may mount (`hostPath`), by prefix;
    /// empty allows none.
    pub allowed_host_paths: Vec<PathBuf>,
}

impl Default for NodePolicy {
    fn default() -> Self {
        Self {
            allow_host_namespaces: false,
            allow_unconfined_seccomp: false,
            allowed_capabilities: Vec::new(),
            allow_apparmor_override: false,
            allow_selinux_override: false,
            seccomp_dir: PathBuf::from("/etc/cloudless/seccomp"),
            apparmor_enabled: false,
            apparmor_profile: None,
            apparmor_profiles_file: PathBuf::from(crate::apparmor::PROFILES_FILE),
            selinux_enabled: false,
            runtime_handlers: BTreeMap::from([(
                "runc".to_owned(),
                "io.containerd.runc.v2".to_owned(),
            )]),
            namespace: "cloudless".to_owned(),
            allowed_host_paths: Vec::new(),
        }
    }
}

/// Something the runtime could not apply and said so (also sent as an event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// Short machine-readable reason, e.g. `AppArmorUnavailable`.
    pub reason: &'static str,
    /// What was not applied and why.
    pub message: String,
}
