//! Manifest parts that shape the container and its life on a device: ports,
//! security context, volumes and the disconnect policy.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::validation::{check_dns_label, ValidationErrors};

/// A port the container listens on, in its own network namespace (or the
/// node's, with `securityContext.hostNetwork`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ContainerPort {
    /// Optional name (DNS label), unique in the workload.
    #[serde(default)]
    pub name: String,
    /// The port.
    pub container_port: u16,
    /// `TCP` (default) or `UDP`.
    #[serde(default)]
    pub protocol: Protocol,
    /// Publishes the port on this port of the replica's node (0, the
    /// default: not published). The scheduler puts no two replicas that
    /// publish the same port and protocol on one node.
    #[serde(default)]
    pub host_port: u16,
    /// The port every ingress node (a node labelled `ingress=true`) listens
    /// on and forwards, in this port's protocol, to this port of a Ready
    /// replica anywhere in the cluster (0, the default: none). Unique
    /// within the workload per protocol (a TCP and a UDP port may share
    /// one), and the cluster refuses a number another workload holds, in
    /// either protocol. Added last: log entries of earlier formats decode
    /// without it.
    #[serde(default)]
    pub ingress_port: u16,
}

/// Another workload's TCP port, reachable from inside this workload's
/// containers at `127.0.0.1:localPort` (like Consul Connect upstreams in
/// Nomad). The agent listens there in the container's network namespace and
/// carries each connection over the overlay to a Ready replica of the target.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Upstream {
    /// The target workload, in the same namespace.
    pub workload: String,
    /// Its `containerPort`.
    pub port: u16,
    /// Where this workload's containers reach it (on 127.0.0.1).
    pub local_port: u16,
}

/// Checks upstreams: names, ports, and local ports that collide with each
/// other or with the workload's own ports.
pub(crate) fn validate_upstreams(
    prefix: &str,
    upstreams: &[Upstream],
    ports: &[ContainerPort],
    errs: &mut ValidationErrors,
) {
    let mut seen = HashSet::new();
    for (i, u) in upstreams.iter().enumerate() {
        let f = format!("{prefix}.upstreams[{i}]");
        check_dns_label(errs, &format!("{f}.workload"), &u.workload);
        if u.port == 0 {
            errs.push(format!("{f}.port"), "must be 1-65535");
        }
        if u.local_port == 0 {
            errs.push(format!("{f}.localPort"), "must be 1-65535");
        } else if !seen.insert(u.local_port) {
            errs.push(
                format!("{f}.localPort"),
                format!("{} is used by another upstream", u.local_port),
            );
        } else if ports
            .iter()
            .any(|p| p.container_port == u.local_port && p.protocol == Protocol::TCP)
        {
            errs.push(
                format!("{f}.localPort"),
                format!("{} is one of this workload's own ports", u.local_port),
            );
        }
    }
}

/// A transport protocol.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Protocol {
    /// TCP.
    #[default]
    TCP,
    /// UDP.
    UDP,
}

/// Which seccomp filter a container runs under.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SeccompType {
    /// A Docker-like allow-list (the default).
    #[default]
    RuntimeDefault,
    /// A minimal allow-list without file system changes, mounts or tracing.
    Strict,
    /// An OCI seccomp profile from the node's seccomp directory.
    Localhost,
    /// No filter (only where the node allows it).
    Unconfined,
}

/// `securityContext.seccompProfile`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SeccompProfileSpec {
    /// The kind of filter.
    #[serde(default, rename = "type")]
    pub kind: SeccompType,
    /// File name in the node's seccomp directory (only with `Localhost`).
    #[serde(default)]
    pub localhost_profile: Option<String>,
}

/// `securityContext.capabilities`: containers start with none.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Capabilities {
    /// Added to the empty set (`NET_BIND_SERVICE` or `CAP_NET_BIND_SERVICE`).
    #[serde(default)]
    pub add: Vec<String>,
    /// Removed from `add` (`ALL` is accepted and is the starting point anyway).
    #[serde(default)]
    pub drop: Vec<String>,
}

impl Capabilities {
    /// What the container gets: `add` minus `drop`.
    pub fn effective(&self) -> Vec<String> {
        let norm = |c: &str| c.trim().to_ascii_uppercase().replace("CAP_", "");
        let dropped: HashSet<String> = self.drop.iter().map(|c| norm(c)).collect();
        self.add
            .iter()
            .filter(|c| !dropped.contains(&norm(c)))
            .cloned()
            .collect()
    }
}

/// The container's security settings (Kubernetes names).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SecurityContextSpec {
    /// Run as this uid instead of the image's user.
    #[serde(default)]
    pub run_as_user: Option<u32>,
    /// Run with this gid.
    #[serde(default)]
    pub run_as_group: Option<u32>,
    /// Refuse to start as uid 0.
    #[serde(default)]
    pub run_as_non_root: bool,
    /// Mount the image read-only.
    #[serde(default)]
    pub read_only_root_filesystem: bool,
    /// Capabilities.
    #[serde(default)]
    pub capabilities: Capabilities,
    /// Seccomp filter.
    #[serde(default)]
    pub seccomp_profile: SeccompProfileSpec,
    /// AppArmor profile (default `cloudless-default` where AppArmor is on).
    #[serde(default)]
    pub app_armor_profile: Option<String>,
    /// SELinux process label.
    #[serde(default)]
    pub se_linux_label: Option<String>,
    /// Share the host's network namespace (only where the node allows it).
    #[serde(default)]
    pub host_network: bool,
}

/// Where an `emptyDir` volume lives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum StorageMedium {
    /// A directory in the agent's data directory.
    #[default]
    Disk,
    /// A tmpfs (counts against memory; gone on restart).
    Memory,
}

/// A scratch directory that lives as long as the replica.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EmptyDir {
    /// `Disk` (default) or `Memory`.
    #[serde(default)]
    pub medium: StorageMedium,
    /// Size of a `Memory` volume in bytes (default 64 MiB).
    #[serde(default)]
    pub size_limit_bytes: u64,
}

/// A directory of the device, where the node allows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HostPath {
    /// Absolute path on the device.
    pub path: String,
}

/// A volume: exactly one of `emptyDir`, `hostPath` or `secret`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Volume {
    /// Name (DNS label) that mounts refer to.
    pub name: String,
    /// Scratch space.
    #[serde(default)]
    pub empty_dir: Option<EmptyDir>,
    /// A device directory.
    #[serde(default)]
    pub host_path: Option<HostPath>,
    /// A secret's values as files (mode 0400) on a tmpfs, refreshed when
    /// the secret changes.
    #[serde(default)]
    pub secret: Option<SecretVolume>,
}

/// `volumes[].secret`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SecretVolume {
    /// The secret, in the workload's namespace.
    pub secret_name: String,
    /// Which values, under which file names; empty: every value under its
    /// own key.
    #[serde(default)]
    pub items: Vec<KeyToPath>,
}

/// One value of a secret volume.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KeyToPath {
    /// The secret's value key.
    pub key: String,
    /// The file name in the volume.
    pub path: String,
}

/// An environment variable from a secret (`secretEnv[]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SecretEnv {
    /// The variable's name.
    pub name: String,
    /// Where its value comes from.
    pub secret_key_ref: SecretKeyRef,
}

/// A value of a secret in the workload's namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// The secret's name.
    pub name: String,
    /// The value's key.
    pub key: String,
}

/// Where a volume appears in the container.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VolumeMount {
    /// The volume's name.
    pub name: String,
    /// Absolute path in the container.
    pub mount_path: String,
    /// Mount read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// Which copy wins when a disconnected node comes back with replicas that
/// were replaced meanwhile.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReconnectPolicy {
    /// The replacements stay; the returning node's copies are stopped.
    #[default]
    KeepReplacement,
    /// The returning node's copies stay; the replacements are stopped.
    KeepOriginal,
    /// Whichever sit on the nodes the scheduler scores best for the workload.
    BestScore,
}

/// What happens when a node stops answering (in the spirit of Nomad's
/// `disconnect` block).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Disconnect {
    /// How long after its node goes Down a replica is given up as Lost
    /// (0, the default: at once). Until then it shows as Unknown and the
    /// node's copy may come back.
    #[serde(default)]
    pub lost_after_seconds: u32,
    /// Place replacements while replicas are Unknown (default true).
    #[serde(default = "yes")]
    pub replace: bool,
    /// The agent stops its copy after this long without any coordinator
    /// (default: the agent's `--max-disconnected`).
    #[serde(default)]
    pub stop_on_client_after_seconds: Option<u32>,
    /// Which copy wins on reconnection.
    #[serde(default)]
    pub reconcile: ReconnectPolicy,
}

fn yes() -> bool {
    true
}

impl Default for Disconnect {
    fn default() -> Self {
        Self {
            lost_after_seconds: 0,
            replace: true,
            stop_on_client_after_seconds: None,
            reconcile: ReconnectPolicy::KeepReplacement,
        }
    }
}

/// Longest `disconnect.lostAfterSeconds` and `stopOnClientAfterSeconds`: 30 days.
pub const MAX_DISCONNECT_SECONDS: u32 = 30 * 24 * 3600;

fn check_path(errs: &mut ValidationErrors, field: &str, path: &str) {
    if !path.starts_with('/') {
        errs.push(field, format!("{path:?} is not an absolute path"));
    } else if path.split('/').any(|p| p == "..") || path.contains('\0') {
        errs.push(field, format!("{path:?} must not contain '..' or NUL"));
    }
}

fn check_capability(errs: &mut ValidationErrors, field: &str, name: &str) {
    let ok = !name.is_empty()
        && name.len() <= 40
        && name
            .bytes()
            .all(|b| b.is_ascii_alphabetic() || b == b'_' || b.is_ascii_digit());
    if !ok {
        errs.push(field, format!("{name:?} is not a capability name"));
    }
}

/// Checks secret environment variables against the plain ones.
pub(crate) fn validate_secret_env(
    prefix: &str,
    secret_env: &[SecretEnv],
    env: &std::collections::BTreeMap<String, String>,
    errs: &mut ValidationErrors,
) {
    let mut seen = HashSet::new();
    for (i, e) in secret_env.iter().enumerate() {
        let f = format!("{prefix}.secretEnv[{i}]");
        let ok = !e.name.is_empty()
            && !e.name.starts_with(|c: char| c.is_ascii_digit())
            && e.name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !ok {
            errs.push(
                format!("{f}.name"),
                format!(
                    "{:?}: letters, digits and '_', not starting with a digit",
                    e.name
                ),
            );
        }
        if env.contains_key(&e.name) || !seen.insert(e.name.as_str()) {
            errs.push(format!("{f}.name"), format!("{} is set twice", e.name));
        }
        check_dns_label(
            errs,
            &format!("{f}.secretKeyRef.name"),
            &e.secret_key_ref.name,
        );
        crate::check_secret_key(
            errs,
            &format!("{f}.secretKeyRef.key"),
            &e.secret_key_ref.key,
        );
    }
}

/// Checks ports, security context, volumes, mounts and the disconnect policy.
pub(crate) fn validate(
    prefix: &str,
    ports: &[ContainerPort],
    sec: &SecurityContextSpec,
    volumes: &[Volume],
    mounts: &[VolumeMount],
    disconnect: &Disconnect,
    errs: &mut ValidationErrors,
) {
    let mut seen_ports = HashSet::new();
    let mut seen_host_ports = HashSet::new();
    let mut seen_ingress_ports = HashSet::new();
    let mut seen_names = HashSet::new();
    for (i, p) in ports.iter().enumerate() {
        let f = format!("{prefix}.ports[{i}]");
        if p.container_port == 0 {
            errs.push(format!("{f}.containerPort"), "must be 1-65535");
        }
        if !seen_ports.insert((p.container_port, p.protocol)) {
            errs.push(
                format!("{f}.containerPort"),
                format!("{} {:?} is listed twice", p.container_port, p.protocol),
            );
        }
        if p.host_port != 0 {
            if !seen_host_ports.insert((p.host_port, p.protocol)) {
                errs.push(
                    format!("{f}.hostPort"),
                    format!("{} {:?} is published twice", p.host_port, p.protocol),
                );
            }
            if sec.host_network && p.host_port != p.container_port {
                errs.push(
                    format!("{f}.hostPort"),
                    format!(
                        "{} differs from containerPort {} while securityContext.hostNetwork is set (the container listens on the node's ports)",
                        p.host_port, p.container_port
                    ),
                );
            }
        }
        if p.ingress_port != 0 && !seen_ingress_ports.insert((p.ingress_port, p.protocol)) {
            errs.push(
                format!("{f}.ingressPort"),
                format!(
                    "{} {:?} is used by another port of this workload",
                    p.ingress_port, p.protocol
                ),
            );
        }
        if !p.name.is_empty() {
            check_dns_label(errs, &format!("{f}.name"), &p.name);
            if !seen_names.insert(p.name.as_str()) {
                errs.push(format!("{f}.name"), format!("{:?} is used twice", p.name));
            }
        }
    }

    let sf = format!("{prefix}.securityContext");
    for (list, name) in [
        (&sec.capabilities.add, "add"),
        (&sec.capabilities.drop, "drop"),
    ] {
        for (i, c) in list.iter().enumerate() {
            check_capability(errs, &format!("{sf}.capabilities.{name}[{i}]"), c);
        }
    }
    match (
        sec.seccomp_profile.kind,
        &sec.seccomp_profile.localhost_profile,
    ) {
        (SeccompType::Localhost, None) => errs.push(
            format!("{sf}.seccompProfile.localhostProfile"),
            "is required with type Localhost",
        ),
        (SeccompType::Localhost, Some(f))
            if f.is_empty() || f.contains('/') || f.starts_with('.') =>
        {
            errs.push(
                format!("{sf}.seccompProfile.localhostProfile"),
                format!("{f:?} must be a file name in the node's seccomp directory"),
            )
        }
        (SeccompType::Localhost, Some(_)) | (_, None) => {}
        (other, Some(_)) => errs.push(
            format!("{sf}.seccompProfile.localhostProfile"),
            format!("is only allowed with type Localhost, not {other:?}"),
        ),
    }
    if sec.run_as_non_root && sec.run_as_user == Some(0) {
        errs.push(
            format!("{sf}.runAsUser"),
            "is 0 (root) while runAsNonRoot is true",
        );
    }

    let mut volume_names = HashSet::new();
    for (i, v) in volumes.iter().enumerate() {
        let f = format!("{prefix}.volumes[{i}]");
        check_dns_label(errs, &format!("{f}.name"), &v.name);
        if !volume_names.insert(v.name.as_str()) {
            errs.push(format!("{f}.name"), format!("{:?} is used twice", v.name));
        }
        match (&v.empty_dir, &v.host_path, &v.secret) {
            (Some(_), None, None) => {}
            (None, Some(h), None) => {
                check_path(errs, &format!("{f}.hostPath.path"), &h.path);
                if h.path == "/" {
                    errs.push(
                        format!("{f}.hostPath.path"),
                        "the device's root cannot be mounted",
                    );
                }
            }
            (None, None, Some(sv)) => {
                check_dns_label(errs, &format!("{f}.secret.secretName"), &sv.secret_name);
                let mut paths = HashSet::new();
                for (j, item) in sv.items.iter().enumerate() {
                    let fi = format!("{f}.secret.items[{j}]");
                    crate::check_secret_key(errs, &format!("{fi}.key"), &item.key);
                    let ok = !item.path.is_empty()
                        && item.path.len() <= 253
                        && !item.path.contains('/')
                        && item.path != "."
                        && item.path != ".."
                        && !item.path.contains('\0');
                    if !ok {
                        errs.push(
                            format!("{fi}.path"),
                            format!("{:?} must be a file name (no '/')", item.path),
                        );
                    }
                    if !paths.insert(item.path.as_str()) {
                        errs.push(
                            format!("{fi}.path"),
                            format!("{:?} is used twice", item.path),
                        );
                    }
                }
            }
            _ => errs.push(f, "needs exactly one of emptyDir, hostPath, secret"),
        }
    }
    let mut mount_paths = HashSet::new();
    for (i, m) in mounts.iter().enumerate() {
        let f = format!("{prefix}.volumeMounts[{i}]");
        if !volume_names.contains(m.name.as_str()) {
            errs.push(
                format!("{f}.name"),
                format!("{:?} is not a volume of this workload", m.name),
            );
        }
        check_path(errs, &format!("{f}.mountPath"), &m.mount_path);
        if m.mount_path == "/" {
            errs.push(format!("{f}.mountPath"), "cannot replace the root");
        }
        if !mount_paths.insert(m.mount_path.trim_end_matches('/')) {
            errs.push(
                format!("{f}.mountPath"),
                format!("{:?} is mounted twice", m.mount_path),
            );
        }
    }

    let df = format!("{prefix}.disconnect");
    if disconnect.lost_after_seconds > MAX_DISCONNECT_SECONDS {
        errs.push(
            format!("{df}.lostAfterSeconds"),
            format!(
                "{} is above the maximum of {MAX_DISCONNECT_SECONDS} (30 days)",
                disconnect.lost_after_seconds
            ),
        );
    }
    if let Some(s) = disconnect.stop_on_client_after_seconds {
        if s == 0 || s > MAX_DISCONNECT_SECONDS {
            errs.push(
                format!("{df}.stopOnClientAfterSeconds"),
                format!("{s} is outside 1..={MAX_DISCONNECT_SECONDS}"),
            );
        }
    }
    if disconnect.reconcile != ReconnectPolicy::KeepReplacement
        && disconnect.lost_after_seconds == 0
    {
        errs.push(
            format!("{df}.reconcile"),
            "needs lostAfterSeconds > 0 (without it a Down node's replicas are gone at once, so there is nothing to reconcile)",
        );
    }
}
