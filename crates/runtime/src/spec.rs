//! The OCI runtime spec for a container: process, limits, capabilities and
//! sandboxing. Built as JSON and checked by decoding into `oci_spec`'s typed
//! `Spec`, so anything handed to containerd is a valid runtime spec.

use std::collections::BTreeMap;

use oci_spec::runtime::Spec;
use serde_json::{json, Value};

use crate::model::{ContainerConfig, ImageProcess, NodePolicy, Notice};
use crate::{seccomp, SpecError};

/// AppArmor profile applied when the workload names none (where AppArmor is
/// enabled and the agent loaded it).
pub const DEFAULT_APPARMOR_PROFILE: &str = crate::apparmor::PROFILE_NAME;
/// CFS period in microseconds.
const CPU_PERIOD_US: u64 = 100_000;
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Paths hidden from the container (as Docker and Kubernetes do).
const MASKED: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];
/// Paths made read-only.
const READONLY: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// A built spec and what could not be applied.
#[derive(Debug, Clone)]
pub struct BuiltSpec {
    /// The spec.
    pub spec: Spec,
    /// The containerd runtime handler for the runtime class.
    pub runtime_handler: String,
    /// Warnings (also to be reported as events).
    pub notices: Vec<Notice>,
}

fn invalid(field: &str, problem: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        field: field.into(),
        problem: problem.into(),
    }
}

/// `NET_ADMIN` or `CAP_NET_ADMIN` as the spec spells it, checked against
/// the known capabilities and the node's policy.
fn capability(name: &str, i: usize, node: &NodePolicy) -> Result<String, SpecError> {
    let field = format!("securityContext.capabilities.add[{i}]");
    let full = crate::policy::capability_name(name)
        .ok_or_else(|| invalid(&field, format!("{name:?} is not a Linux capability")))?;
    crate::policy::check_capability(&full, &field, node)?;
    Ok(full)
}

/// Default size of a memory-backed volume: 64 MiB.
const DEFAULT_TMPFS_BYTES: u64 = 64 << 20;

/// The OCI mount for a volume; refuses host paths the node does not allow.
fn volume_mount(m: &crate::model::Mount, node: &NodePolicy) -> Result<Value, SpecError> {
    use crate::model::MountSource;
    let dest = &m.destination;
    if !dest.starts_with('/') || dest == "/" || dest.split('/').any(|p| p == "..") {
        return Err(invalid(
            &format!("{}.mountPath", m.field),
            format!("{dest:?} must be an absolute path other than / without '..'"),
        ));
    }
    let rw = if m.read_only { "ro" } else { "rw" };
    Ok(match &m.source {
        MountSource::Tmpfs(size) => {
            let size = if *size == 0 {
                DEFAULT_TMPFS_BYTES
            } else {
                *size
            };
            json!({ "destination": dest, "type": "tmpfs", "source": "tmpfs",
                    "options": ["nosuid", "nodev", "mode=1777", format!("size={size}"), rw] })
        }
        MountSource::ReplicaDir(dir) => {
            json!({ "destination": dest, "type": "bind", "source": dir,
                    "options": ["rbind", "rprivate", "nosuid", "nodev", rw] })
        }
        MountSource::HostPath(path) => {
            let allowed = path.is_absolute()
                && !path
                    .components()
                    .any(|c| c == std::path::Component::ParentDir)
                && node.allowed_host_paths.iter().any(|p| path.starts_with(p));
            if !allowed {
                return Err(invalid(
                    &format!("{}.hostPath", m.field),
                    format!(
                        "{} is not under a directory this node allows workloads to mount (agent --allow-host-path: {})",
                        path.display(),
                        if node.allowed_host_paths.is_empty() {
                            "none".to_owned()
                        } else {
                            node.allowed_host_paths
                                .iter()
                                .map(|p| p.display().to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        }
                    ),
                ));
            }
            json!({ "destination": dest, "type": "bind", "source": path,
                    "options": ["rbind", "rprivate", "nosuid", "nodev", rw] })
        }
    })
}

/// uid and gid from an image's `User` field, when numeric.
fn image_user(user: &str) -> Result<(Option<u32>, Option<u32>), String> {
    if user.is_empty() {
        return Ok((Some(0), Some(0)));
    }
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let uid = u.parse::<u32>().ok();
    let gid = match g {
        Some(g) => Some(g.parse::<u32>().map_err(|_| g.to_owned())?),
        None => None,
    };
    match uid {
        Some(uid) => Ok((Some(uid), gid.or(Some(0)))),
        None => Err(u.to_owned()),
    }
}

/// The uid and gid the container's process runs as: `runAsUser` and
/// `runAsGroup` over the image's numeric user, else root. (A named image
/// user without `runAsUser` is refused by [`build`]; here it counts as root.)
pub fn process_ids(c: &ContainerConfig, image: &ImageProcess) -> (u32, u32) {
    let (img_uid, img_gid) = image_user(&image.user).unwrap_or((None, None));
    (
        c.security.run_as_user.or(img_uid).unwrap_or(0),
        c.security.run_as_group.or(img_gid).unwrap_or(0),
    )
}

/// Builds the runtime spec for `c` running `image` on a node with `node`'s
/// policy. Refuses, naming the field, what the node does not allow or what
/// cannot run; reports in `notices` what the host cannot enforce.
pub fn build(
    c: &ContainerConfig,
    image: &ImageProcess,
    node: &NodePolicy,
) -> Result<BuiltSpec, SpecError> {
    let sec = &c.security;
    let mut notices = Vec::new();

    // Process: Kubernetes semantics for command/args over entrypoint/cmd.
    let mut argv: Vec<String> = if c.command.is_empty() {
        image.entrypoint.clone()
    } else {
        c.command.clone()
    };
    if !c.args.is_empty() {
        argv.extend(c.args.iter().cloned());
    } else if c.command.is_empty() {
        argv.extend(image.cmd.iter().cloned());
    }
    if argv.is_empty() {
        return Err(invalid(
            "command",
            "the image has no entrypoint or cmd and the workload gives none",
        ));
    }

    let mut env: BTreeMap<String, String> = BTreeMap::new();
    env.insert("PATH".into(), DEFAULT_PATH.into());
    for e in &image.env {
        if let Some((k, v)) = e.split_once('=') {
            env.insert(k.to_owned(), v.to_owned());
        }
    }
    for (k, v) in &c.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(invalid(&format!("env.{k}"), "is not a valid variable name"));
        }
        env.insert(k.clone(), v.clone());
    }
    env.entry("HOSTNAME".into()).or_insert_with(|| c.id.clone());

    let (img_uid, img_gid) = match image_user(&image.user) {
        Ok(ids) => ids,
        // A named image user does not matter when runAsUser replaces it.
        Err(_) if sec.run_as_user.is_some() => (None, None),
        Err(name) => {
            return Err(invalid(
                "securityContext.runAsUser",
                format!("the image runs as user {name:?}, which is not numeric; set runAsUser"),
            ))
        }
    };
    let uid = sec.run_as_user.or(img_uid).unwrap_or(0);
    let gid = sec.run_as_group.or(img_gid).unwrap_or(0);
    if sec.run_as_non_root && uid == 0 {
        return Err(invalid(
            "securityContext.runAsNonRoot",
            "the container would run as root (uid 0); set securityContext.runAsUser to a non-zero uid or use an image with a non-root USER",
        ));
    }
    let cwd = c
        .working_dir
        .clone()
        .filter(|w| !w.is_empty())
        .or_else(|| Some(image.working_dir.clone()).filter(|w| !w.is_empty()))
        .unwrap_or_else(|| "/".into());
    if !cwd.starts_with('/') {
        return Err(invalid(
            "workingDir",
            format!("{cwd:?} is not an absolute path"),
        ));
    }

    let caps = c
        .security
        .capabilities_add
        .iter()
        .enumerate()
        .map(|(i, n)| capability(n, i, node))
        .collect::<Result<Vec<_>, _>>()?;

    // Namespaces: private unless asked for and allowed.
    let mut namespaces = vec![
        json!({"type": "mount"}),
        json!({"type": "uts"}),
        json!({"type": "cgroup"}),
    ];
    for (wanted, ns, field) in [
        (sec.host_network, "network", "securityContext.hostNetwork"),
        (sec.host_pid, "pid", "securityContext.hostPID"),
        (sec.host_ipc, "ipc", "securityContext.hostIPC"),
    ] {
        if wanted {
            if !node.allow_host_namespaces {
                return Err(invalid(
                    field,
                    "host namespaces are not allowed on this node (node policy allow_host_namespaces: agent --allow-host-namespaces, or CLOUDLESS_AGENT_ALLOW_HOST_NAMESPACES=true)",
                ));
            }
        } else if let (Some(path), "network") = (&c.network_namespace, ns) {
            namespaces.push(json!({ "type": ns, "path": path }));
        } else {
            namespaces.push(json!({ "type": ns }));
        }
    }

    let mut resources = serde_json::Map::new();
    resources.insert(
        "devices".into(),
        json!([{ "allow": false, "access": "rwm" }]),
    );
    if c.limits.cpu_millis > 0 {
        resources.insert(
            "cpu".into(),
            json!({
                "shares": (c.limits.cpu_millis * 1024 / 1000).max(2),
                "quota": c.limits.cpu_millis * CPU_PERIOD_US / 1000,
                "period": CPU_PERIOD_US,
            }),
        );
    }
    if c.limits.memory_bytes > 0 {
        resources.insert(
            "memory".into(),
            json!({ "limit": c.limits.memory_bytes, "swap": c.limits.memory_bytes }),
        );
    }
    if c.limits.pids > 0 {
        resources.insert("pids".into(), json!({ "limit": c.limits.pids }));
    }

    let mut process = json!({
        "terminal": false,
        "user": { "uid": uid, "gid": gid },
        "args": argv,
        "env": env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        "cwd": cwd,
        "capabilities": {
            "bounding": caps, "effective": caps, "permitted": caps,
            "inheritable": [], "ambient": [],
        },
        "noNewPrivileges": true,
    });

    // Never a profile the kernel has not loaded: runc refuses those.
    let (profile, notice) = crate::policy::apparmor_profile(sec.apparmor_profile.as_deref(), node)?;
    if let Some(p) = profile {
        process["apparmorProfile"] = json!(p);
    }
    notices.extend(notice);
    if let Some(label) = &sec.selinux_label {
        crate::policy::check_selinux(label, node)?;
        if node.selinux_enabled {
            process["selinuxLabel"] = json!(label);
        } else {
            notices.push(Notice {
                reason: "SELinuxUnavailable",
                message: format!(
                    "SELinux is not enabled in this kernel; label {label:?} was not applied"
                ),
            });
        }
    }

    let mut linux = json!({
        "namespaces": namespaces,
        "resources": resources,
        "cgroupsPath": format!("/{}/{}", node.namespace, c.id),
        "maskedPaths": MASKED,
        "readonlyPaths": READONLY,
    });
    if let Some(filter) = seccomp::for_profile(&sec.seccomp, node)? {
        linux["seccomp"] = filter;
    }

    let mut mounts = json!([
        { "destination": "/proc", "type": "proc", "source": "proc",
          "options": ["nosuid", "noexec", "nodev"] },
        { "destination": "/dev", "type": "tmpfs", "source": "tmpfs",
          "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] },
        { "destination": "/dev/pts", "type": "devpts", "source": "devpts",
          "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"] },
        { "destination": "/dev/shm", "type": "tmpfs", "source": "shm",
          "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"] },
        { "destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
          "options": ["nosuid", "noexec", "nodev"] },
        { "destination": "/sys", "type": "sysfs", "source": "sysfs",
          "options": ["nosuid", "noexec", "nodev", "ro"] },
        { "destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
          "options": ["nosuid", "noexec", "nodev", "relatime", "ro"] },
    ]);

    if let Some(list) = mounts.as_array_mut() {
        for m in &c.mounts {
            list.push(volume_mount(m, node)?);
        }
    }

    let value = json!({
        "ociVersion": "1.0.2",
        "process": process,
        "root": { "path": "rootfs", "readonly": sec.read_only_root_filesystem },
        "hostname": c.id.chars().take(63).collect::<String>(),
        "mounts": mounts,
        "linux": linux,
    });
    let spec: Spec = serde_json::from_value(value)
        .map_err(|e| SpecError::Internal(format!("generated spec does not decode: {e}")))?;

    let class = c
        .runtime_class
        .as_deref()
        .filter(|s| !s.is_empty())
        .unwrap_or("runc");
    let runtime_handler = node.runtime_handlers.get(class).cloned().ok_or_else(|| {
        invalid(
            "runtimeClassName",
            format!(
                "{class:?} is not offered by this node (it offers {})",
                node.runtime_handlers
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    })?;
    for n in &notices {
        tracing::warn!(container = %c.id, reason = n.reason, "{}", n.message);
    }
    Ok(BuiltSpec {
        spec,
        runtime_handler,
        notices,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Limits, SeccompProfile, SecurityContext};

    fn image() -> ImageProcess {
        ImageProcess {
            entrypoint: vec!["/bin/sh".into()],
            cmd: vec!["-c".into(), "echo hi".into()],
            env: vec!["PATH=/bin".into(), "LANG=C".into()],
            working_dir: "/srv".into(),
            user: String::new(),
        }
    }

    fn container() -> ContainerConfig {
        ContainerConfig {
            id: "web-1".into(),
            ..ContainerConfig::default()
        }
    }

    fn decode(b: &BuiltSpec) -> Value {
        serde_json::to_value(&b.spec).expect("encode")
    }

    #[test]
    fn command_args_env_and_user_follow_kubernetes_rules() {
        let node = NodePolicy::default();
        let b = build(&container(), &image(), &node).expect("spec");
        let v = decode(&b);
        assert_eq!(v["process"]["args"], json!(["/bin/sh", "-c", "echo hi"]));
        assert_eq!(v["process"]["cwd"], json!("/srv"));
        assert_eq!(v["process"]["user"]["uid"], json!(0));

        let mut c = container();
        c.args = vec!["-c".into(), "exit 3".into()];
        c.env.insert("LANG".into(), "fr_FR".into());
        c.security.run_as_user = Some(1000);
        c.security.run_as_group = Some(2000);
        c.working_dir = Some("/tmp".into());
        let v = decode(&build(&c, &image(), &node).expect("spec"));
        assert_eq!(v["process"]["args"], json!(["/bin/sh", "-c", "exit 3"]));
        let env: Vec<String> = serde_json::from_value(v["process"]["env"].clone()).expect("env");
        assert!(env.contains(&"LANG=fr_FR".to_owned()), "{env:?}");
        assert!(env.contains(&"PATH=/bin".to_owned()), "{env:?}");
        assert_eq!(v["process"]["user"], json!({"uid": 1000, "gid": 2000}));
        assert_eq!(v["process"]["cwd"], json!("/tmp"));

        c.command = vec!["/bin/true".into()];
        c.args.clear();
        let v = decode(&build(&c, &image(), &node).expect("spec"));
        assert_eq!(v["process"]["args"], json!(["/bin/true"]));
    }

    #[test]
    fn limits_capabilities_and_sandbox_are_in_the_spec() {
        let mut c = container();
        c.limits = Limits {
            cpu_millis: 500,
            memory_bytes: 64 << 20,
            pids: 32,
        };
        c.security.capabilities_add = vec!["net_bind_service".into(), "CAP_CHOWN".into()];
        c.security.read_only_root_filesystem = true;
        let v = decode(&build(&c, &image(), &NodePolicy::default()).expect("spec"));
        let r = &v["linux"]["resources"];
        assert_eq!(r["cpu"]["quota"], json!(50_000));
        assert_eq!(r["cpu"]["period"], json!(100_000));
        assert_eq!(r["cpu"]["shares"], json!(512));
        assert_eq!(r["memory"]["limit"], json!(64 << 20));
        assert_eq!(r["pids"]["limit"], json!(32));
        let mut eff: Vec<String> =
            serde_json::from_value(v["process"]["capabilities"]["effective"].clone())
                .expect("caps");
        eff.sort();
        assert_eq!(eff, ["CAP_CHOWN", "CAP_NET_BIND_SERVICE"]);
        assert_eq!(v["process"]["capabilities"]["ambient"], json!([]));
        assert_eq!(v["process"]["noNewPrivileges"], json!(true));
        assert_eq!(v["root"]["readonly"], json!(true));
        assert_eq!(v["linux"]["cgroupsPath"], json!("/cloudless/web-1"));
        assert_eq!(
            v["linux"]["seccomp"]["defaultAction"],
            json!("SCMP_ACT_ERRNO")
        );
        let ns: Vec<String> = v["linux"]["namespaces"]
            .as_array()
            .expect("namespaces")
            .iter()
            .map(|n| n["type"].as_str().unwrap_or_default().to_owned())
            .collect();
        for want in ["pid", "network", "ipc", "mount", "uts"] {
            assert!(ns.contains(&want.to_owned()), "{ns:?}");
        }
        // No capabilities asked for: none at all.
        let v = decode(&build(&container(), &image(), &NodePolicy::default()).expect("spec"));
        assert_eq!(v["process"]["capabilities"]["bounding"], json!([]));
    }

    #[test]
    fn a_replica_joins_the_network_namespace_its_node_made_for_it() {
        let network = |c: &ContainerConfig, node: &NodePolicy| {
            let v = decode(&build(c, &image(), node).expect("spec"));
            v["linux"]["namespaces"]
                .as_array()
                .expect("namespaces")
                .iter()
                .find(|n| n["type"] == "network")
                .cloned()
        };
        let mut c = container();
        let node = NodePolicy::default();
        assert_eq!(network(&c, &node), Some(json!({ "type": "network" })));
        c.network_namespace = Some("/run/cloudless/netns/web-1".into());
        assert_eq!(
            network(&c, &node),
            Some(json!({ "type": "network", "path": "/run/cloudless/netns/web-1" }))
        );
        // hostNetwork (where allowed) wins: no namespace of its own.
        c.security.host_network = true;
        let allowed = NodePolicy {
            allow_host_namespaces: true,
            ..NodePolicy::default()
        };
        assert_eq!(network(&c, &allowed), None);
    }

    #[test]
    fn volumes_become_mounts_and_host_paths_need_the_nodes_permission() {
        use crate::model::{Mount, MountSource};
        let mut c = container();
        let mount = |dest: &str, source: MountSource, read_only: bool, i: usize| Mount {
            destination: dest.into(),
            source,
            read_only,
            field: format!("volumeMounts[{i}]"),
            volume: format!("v{i}"),
        };
        c.mounts = vec![
            mount("/scratch", MountSource::Tmpfs(1 << 20), false, 0),
            mount(
                "/cache",
                MountSource::ReplicaDir("/var/lib/a/volumes/web-1/cache".into()),
                false,
                1,
            ),
            mount(
                "/logs",
                MountSource::HostPath("/var/log/web".into()),
                true,
                2,
            ),
        ];
        let err = build(&c, &image(), &NodePolicy::default()).expect_err("host path allowed");
        assert!(
            matches!(&err, SpecError::Invalid { field, problem }
                if field == "volumeMounts[2].hostPath" && problem.contains("--allow-host-path")),
            "{err:?}"
        );
        let node = NodePolicy {
            allowed_host_paths: vec!["/var/log".into()],
            ..NodePolicy::default()
        };
        let v = decode(&build(&c, &image(), &node).expect("spec"));
        let mounts = v["mounts"].as_array().expect("mounts");
        let find = |d: &str| {
            mounts
                .iter()
                .find(|m| m["destination"] == d)
                .unwrap_or_else(|| panic!("no mount at {d}: {mounts:?}"))
        };
        assert_eq!(find("/scratch")["type"], "tmpfs");
        assert!(find("/scratch")["options"]
            .as_array()
            .is_some_and(|o| o.contains(&json!("size=1048576"))));
        assert_eq!(find("/cache")["source"], "/var/lib/a/volumes/web-1/cache");
        let logs = find("/logs");
        assert_eq!(
            (logs["type"].as_str(), logs["source"].as_str()),
            (Some("bind"), Some("/var/log/web"))
        );
        assert!(logs["options"]
            .as_array()
            .is_some_and(|o| o.contains(&json!("ro"))));
        // A path that escapes the allowed prefix with .. is refused.
        c.mounts = vec![mount(
            "/x",
            MountSource::HostPath("/var/log/../../etc".into()),
            false,
            0,
        )];
        assert!(build(&c, &image(), &node).is_err());
        c.mounts = vec![mount("relative", MountSource::Tmpfs(0), false, 0)];
        let err = build(&c, &image(), &node).expect_err("relative mount path");
        assert!(
            matches!(&err, SpecError::Invalid { field, .. } if field == "volumeMounts[0].mountPath"),
            "{err:?}"
        );
    }

    #[test]
    fn refusals_name_the_field() {
        let node = NodePolicy::default();
        type Change = Box<dyn Fn(&mut ContainerConfig, &mut ImageProcess)>;
        let cases: Vec<(Change, &str)> = vec![
            (
                Box::new(|c, _| c.security.run_as_non_root = true),
                "securityContext.runAsNonRoot",
            ),
            (
                Box::new(|c, _| c.security.capabilities_add = vec!["FLY".into()]),
                "securityContext.capabilities.add[0]",
            ),
            (
                Box::new(|c, _| c.security.host_network = true),
                "securityContext.hostNetwork",
            ),
            (
                Box::new(|c, _| {
                    c.security.capabilities_add =
                        vec!["NET_BIND_SERVICE".into(), "SYS_ADMIN".into()]
                }),
                "securityContext.capabilities.add[1]",
            ),
            (
                Box::new(|c, _| c.security.apparmor_profile = Some("unconfined".into())),
                "securityContext.appArmorProfile",
            ),
            (
                Box::new(|c, _| {
                    c.security.selinux_label = Some("system_u:system_r:spc_t:s0".into())
                }),
                "securityContext.seLinuxLabel",
            ),
            (
                Box::new(|c, _| c.security.seccomp = SeccompProfile::Unconfined),
                "securityContext.seccompProfile.type",
            ),
            (
                Box::new(|c, _| c.runtime_class = Some("kata".into())),
                "runtimeClassName",
            ),
            (
                Box::new(|_, i| {
                    i.entrypoint.clear();
                    i.cmd.clear();
                }),
                "command",
            ),
            (
                Box::new(|_, i| i.user = "nginx".into()),
                "securityContext.runAsUser",
            ),
            (
                Box::new(|c, _| c.working_dir = Some("relative".into())),
                "workingDir",
            ),
        ];
        for (change, field) in cases {
            let (mut c, mut i) = (container(), image());
            change(&mut c, &mut i);
            let err = build(&c, &i, &node).expect_err(field).to_string();
            assert!(err.starts_with(field), "{err} should name {field}");
        }
        // A named image user is fine when runAsUser replaces it; and a
        // non-root image satisfies runAsNonRoot.
        let mut i = image();
        i.user = "nginx".into();
        let mut c = container();
        c.security.run_as_user = Some(101);
        c.security.run_as_non_root = true;
        assert!(build(&c, &i, &node).is_ok());
        let mut i = image();
        i.user = "1000:1000".into();
        let mut c = container();
        c.security.run_as_non_root = true;
        assert!(build(&c, &i, &node).is_ok());
    }

    #[test]
    fn apparmor_and_selinux_apply_where_enabled_and_are_reported_where_not() {
        let mut c = container();
        c.security = SecurityContext {
            selinux_label: Some("system_u:system_r:container_t:s0".into()),
            ..SecurityContext::default()
        };
        let off = build(&c, &image(), &NodePolicy::default()).expect("spec");
        let reasons: Vec<&str> = off.notices.iter().map(|n| n.reason).collect();
        assert_eq!(reasons, ["AppArmorUnavailable", "SELinuxUnavailable"]);
        assert!(decode(&off)["process"].get("apparmorProfile").is_none());
        // AppArmor on, but the agent could not load its profile: no profile
        // is named (runc would refuse the container), and that is reported.
        let unloaded = NodePolicy {
            apparmor_enabled: true,
            selinux_enabled: true,
            ..NodePolicy::default()
        };
        let b = build(&c, &image(), &unloaded).expect("spec");
        assert!(decode(&b)["process"].get("apparmorProfile").is_none());
        let reasons: Vec<&str> = b.notices.iter().map(|n| n.reason).collect();
        assert_eq!(reasons, ["AppArmorProfileNotLoaded"]);
        let on = NodePolicy {
            apparmor_profile: Some(DEFAULT_APPARMOR_PROFILE.into()),
            ..unloaded
        };
        let b = build(&c, &image(), &on).expect("spec");
        assert!(b.notices.is_empty());
        let v = decode(&b);
        assert_eq!(
            v["process"]["apparmorProfile"],
            json!(DEFAULT_APPARMOR_PROFILE)
        );
        assert_eq!(
            v["process"]["selinuxLabel"],
            json!("system_u:system_r:container_t:s0")
        );
    }
}
