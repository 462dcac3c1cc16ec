//! What the runtime runs for an assignment: the container id, the
//! container's process, limits, security context and volumes, and its
//! probes. Pure, but for making the `emptyDir` directories.

use std::path::PathBuf;
use std::time::Duration;

use cloudless_proto::v1 as pb;
use cloudless_runtime::probe::{Probe, ProbeAction};
use cloudless_runtime::{
    ContainerConfig, Limits, Mount, MountSource, SeccompProfile, SecurityContext,
};

/// Longest a container id may be (containerd's limit is 76).
pub(crate) const MAX_CONTAINER_ID: usize = 76;
/// Most processes and threads in a container whose workload sets no
/// `limits.pids`: a fork bomb stops there instead of exhausting the device.
pub const DEFAULT_PIDS_LIMIT: u64 = 4096;

/// The container id for a replica: the replica id, shortened in the middle
/// (its random suffix is kept) when longer than containerd allows.
pub fn container_id(replica_id: &str) -> String {
    if replica_id.len() <= MAX_CONTAINER_ID {
        return replica_id.to_owned();
    }
    // Cut on character boundaries: the id comes over the network.
    let mut tail = replica_id.len() - 9;
    while !replica_id.is_char_boundary(tail) {
        tail += 1;
    }
    let mut head = MAX_CONTAINER_ID - (replica_id.len() - tail);
    while !replica_id.is_char_boundary(head) {
        head -= 1;
    }
    format!("{}{}", &replica_id[..head], &replica_id[tail..])
}

/// The directory of a replica's `emptyDir` volumes.
pub(crate) fn volume_dir(base: &std::path::Path, container: &str) -> PathBuf {
    base.join(container)
}

/// What the runtime runs for an assignment: the manifest's process,
/// limits, security context and volumes.
pub(crate) fn container_config(
    a: &pb::Assignment,
    spec: &cloudless_types::WorkloadSpec,
    volume_base: &std::path::Path,
    secret_base: &std::path::Path,
) -> ContainerConfig {
    use cloudless_types::{SeccompType, StorageMedium};
    let id = container_id(&a.replica_id);
    let mut env = spec.env.clone();
    env.insert("CLOUDLESS_REPLICA".into(), a.replica_id.clone());
    env.insert(
        "CLOUDLESS_WORKLOAD".into(),
        format!("{}/{}", a.namespace, a.workload),
    );
    let sc = &spec.security_context;
    let security = SecurityContext {
        run_as_user: sc.run_as_user,
        run_as_group: sc.run_as_group,
        run_as_non_root: sc.run_as_non_root,
        read_only_root_filesystem: sc.read_only_root_filesystem,
        capabilities_add: sc.capabilities.effective(),
        seccomp: match sc.seccomp_profile.kind {
            SeccompType::RuntimeDefault => SeccompProfile::RuntimeDefault,
            SeccompType::Strict => SeccompProfile::Strict,
            SeccompType::Unconfined => SeccompProfile::Unconfined,
            SeccompType::Localhost => SeccompProfile::Localhost(
                sc.seccomp_profile
                    .localhost_profile
                    .clone()
                    .unwrap_or_default(),
            ),
        },
        apparmor_profile: sc.app_armor_profile.clone(),
        selinux_label: sc.se_linux_label.clone(),
        host_network: sc.host_network,
        ..SecurityContext::default()
    };
    let mounts = spec
        .volume_mounts
        .iter()
        .enumerate()
        .filter_map(|(i, m)| {
            let v = spec.volumes.iter().find(|v| v.name == m.name)?;
            let source = match (&v.empty_dir, &v.host_path, &v.secret) {
                (Some(e), _, _) if e.medium == StorageMedium::Memory => {
                    MountSource::Tmpfs(e.size_limit_bytes)
                }
                (Some(_), _, _) => {
                    MountSource::ReplicaDir(volume_dir(volume_base, &id).join(&v.name))
                }
                (None, Some(h), _) => MountSource::HostPath(PathBuf::from(&h.path)),
                (None, None, Some(_)) => {
                    MountSource::ReplicaDir(crate::secrets::volume_dir(secret_base, &id, &v.name))
                }
                (None, None, None) => return None,
            };
            Some(Mount {
                destination: m.mount_path.clone(),
                source,
                read_only: m.read_only || v.secret.is_some(),
                field: format!("volumeMounts[{i}]"),
                volume: v.name.clone(),
            })
        })
        .collect();
    ContainerConfig {
        id,
        command: spec.command.clone(),
        args: spec.args.clone(),
        env,
        working_dir: None,
        limits: Limits {
            cpu_millis: spec.limits.cpu_millis,
            memory_bytes: spec.limits.memory_bytes,
            pids: i64::try_from(if spec.limits.pids == 0 {
                DEFAULT_PIDS_LIMIT
            } else {
                spec.limits.pids
            })
            .unwrap_or(i64::MAX),
        },
        security,
        mounts,
        ..ContainerConfig::default()
    }
}

/// Makes the replica's `emptyDir` directories, never world-writable: owned
/// by the container's uid and gid with mode 0770 when it runs as a non-root
/// user, else root's with mode 0755 (as root the container needs no
/// capability to write there; other host users cannot).
pub(crate) fn prepare_volumes(
    config: &ContainerConfig,
    volume_base: &std::path::Path,
    uid: u32,
    gid: u32,
) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for m in &config.mounts {
        if let MountSource::ReplicaDir(dir) = &m.source {
            if !dir.starts_with(volume_base) {
                continue;
            }
            std::fs::create_dir_all(dir)?;
            let mode = if uid == 0 {
                std::os::unix::fs::chown(dir, Some(0), Some(0))?;
                0o755
            } else {
                std::os::unix::fs::chown(dir, Some(uid), Some(gid))?;
                0o770
            };
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))?;
        }
    }
    Ok(())
}

/// The runtime's probe for a wire probe (`None` when it names no action).
pub(crate) fn probe(p: &cloudless_types::ProbeSpec) -> Option<Probe> {
    let action = if let Some(argv) = p.exec.clone().filter(|a| !a.is_empty()) {
        ProbeAction::Exec(argv)
    } else if let Some(h) = &p.http_get {
        ProbeAction::Http {
            port: h.port,
            path: h.path.clone(),
        }
    } else {
        ProbeAction::Tcp(p.tcp_socket.as_ref()?.port)
    };
    let secs =
        |v: u32, default: u64| Duration::from_secs(if v == 0 { default } else { u64::from(v) });
    Some(Probe {
        action,
        initial_delay: Duration::from_secs(u64::from(p.initial_delay_seconds)),
        period: secs(p.period_seconds, 10),
        timeout: secs(p.timeout_seconds, 1),
        success_threshold: p.success_threshold.max(1),
        failure_threshold: if p.failure_threshold == 0 {
            3
        } else {
            p.failure_threshold
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ids_fit_containerd_and_keep_the_suffix() {
        assert_eq!(
            container_id("default.web-1-abcdef12"),
            "default.web-1-abcdef12"
        );
        let long = format!("{}.{}-3-abcdef12", "n".repeat(63), "w".repeat(63));
        let id = container_id(&long);
        assert_eq!(id.len(), MAX_CONTAINER_ID);
        assert!(id.ends_with("-abcdef12"), "{id}");
    }

    #[test]
    fn a_long_replica_id_that_is_not_ascii_is_shortened_without_a_panic() {
        // The coordinator sends only DNS labels, but the agent does not
        // panic on what comes over the network.
        for long in [
            format!("{}-abcdef12", "é".repeat(60)),
            format!("{}é-abcdef1", "n".repeat(80)),
            "€".repeat(40),
        ] {
            let id = container_id(&long);
            assert!(
                (MAX_CONTAINER_ID - 3..=MAX_CONTAINER_ID).contains(&id.len()),
                "{id}"
            );
        }
        let id = container_id(&format!("{}-abcdef12", "é".repeat(60)));
        assert!(id.ends_with("-abcdef12"), "{id}");
    }
}

#[cfg(test)]
#[path = "spec_test.rs"]
mod hardening_tests;
