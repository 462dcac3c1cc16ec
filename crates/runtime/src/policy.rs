//! The device's say over a workload's `securityContext`: capabilities beyond
//! a default set, AppArmor profiles other than the node's own, and SELinux
//! types other than `container_t` need the node's permission. A refusal
//! names the field, the value, and the agent setting that would allow it.

use std::path::Path;

use crate::model::{NodePolicy, Notice};
use crate::SpecError;

/// Capabilities any workload may add (Docker's default set). Anything else
/// needs the node's `--allow-capability`.
pub const DEFAULT_CAPABILITIES: &[&str] = &[
    "CAP_AUDIT_WRITE",
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_MKNOD",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_RAW",
    "CAP_SETFCAP",
    "CAP_SETGID",
    "CAP_SETPCAP",
    "CAP_SETUID",
    "CAP_SYS_CHROOT",
];

/// The manifest's spelling of "whatever the node applies by default".
pub const APPARMOR_RUNTIME_DEFAULT: &str = "runtime/default";
/// The AppArmor profile name that confines nothing.
pub const APPARMOR_UNCONFINED: &str = "unconfined";
/// The SELinux types containers may run as unless the node allows others:
/// the distributions' `container_t` and the shipped module's
/// `cloudless_container_t` (config/selinux/cloudless.te).
pub const SELINUX_CONTAINER_TYPES: &[&str] = &["container_t", "cloudless_container_t"];

/// `NET_ADMIN`, `cap_net_admin` or `CAP_NET_ADMIN` as the runtime spec
/// spells it (`CAP_NET_ADMIN`), if it is a Linux capability.
pub fn capability_name(name: &str) -> Option<String> {
    let upper = name.trim().to_ascii_uppercase();
    let full = if upper.starts_with("CAP_") {
        upper
    } else {
        format!("CAP_{upper}")
    };
    serde_json::from_value::<oci_spec::runtime::Capability>(serde_json::Value::String(full.clone()))
        .ok()
        .map(|_| full)
}

fn invalid(field: &str, problem: String) -> SpecError {
    SpecError::Invalid {
        field: field.into(),
        problem,
    }
}

/// `CAP_X` (already normalised) at `field` is allowed on this node.
pub fn check_capability(full: &str, field: &str, node: &NodePolicy) -> Result<(), SpecError> {
    let short = full.trim_start_matches("CAP_");
    let allowed = DEFAULT_CAPABILITIES.contains(&full)
        || node.allowed_capabilities.iter().any(|a| {
            let a = a.trim().to_ascii_uppercase();
            a == "ALL" || a == full || a == short
        });
    if allowed {
        return Ok(());
    }
    Err(invalid(
        field,
        format!(
            "{full} is not in the default capability set and this node does not allow it \
             (node policy allowed_capabilities: agent --allow-capability {short}, \
             or CLOUDLESS_AGENT_ALLOW_CAPABILITIES)"
        ),
    ))
}

/// What AppArmor profile to name in the spec (`None`: name none) and what
/// to report, for the profile the workload asks for. Never names a profile
/// that is not loaded: a named profile must be listed in the kernel's
/// profiles file; the node's own default is named only if the agent proved
/// it loaded.
pub fn apparmor_profile(
    requested: Option<&str>,
    node: &NodePolicy,
) -> Result<(Option<String>, Option<Notice>), SpecError> {
    const FIELD: &str = "securityContext.appArmorProfile";
    let requested = requested
        .map(str::trim)
        .filter(|r| !r.is_empty() && *r != APPARMOR_RUNTIME_DEFAULT);
    let Some(name) = requested else {
        return Ok(match (&node.apparmor_enabled, &node.apparmor_profile) {
            (true, Some(p)) => (Some(p.clone()), None),
            (true, None) => (
                None,
                Some(Notice {
                    reason: "AppArmorProfileNotLoaded",
                    message: "the agent's AppArmor profile is not loaded; the container runs with the runtime's default (no profile)".into(),
                }),
            ),
            (false, _) => (
                None,
                Some(Notice {
                    reason: "AppArmorUnavailable",
                    message: "AppArmor is not enabled in this kernel; no profile was applied".into(),
                }),
            ),
        });
    };
    let plain = name.len() <= 255
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:/".contains(c));
    if !plain {
        return Err(invalid(
            FIELD,
            format!("{name:?} is not an AppArmor profile name (letters, digits, - _ . : /)"),
        ));
    }
    if !node.allow_apparmor_override {
        return Err(invalid(
            FIELD,
            format!(
                "{name:?} overrides the node's AppArmor profile and this node does not allow it \
                 (node policy allow_apparmor_override: agent --allow-apparmor-override, \
                 or CLOUDLESS_AGENT_ALLOW_APPARMOR_OVERRIDE=true)"
            ),
        ));
    }
    if !node.apparmor_enabled {
        return Ok((
            None,
            Some(Notice {
                reason: "AppArmorUnavailable",
                message: format!(
                    "AppArmor is not enabled in this kernel; profile {name:?} was not applied"
                ),
            }),
        ));
    }
    if name != APPARMOR_UNCONFINED && !is_loaded(&node.apparmor_profiles_file, name) {
        return Err(invalid(
            FIELD,
            format!(
                "profile {name:?} is not loaded on this node (not listed in {})",
                node.apparmor_profiles_file.display()
            ),
        ));
    }
    Ok((Some(name.to_owned()), None))
}

/// Whether the kernel's profiles file (`name (mode)` per line) lists `name`.
pub fn is_loaded(profiles_file: &Path, name: &str) -> bool {
    std::fs::read_to_string(profiles_file).is_ok_and(|text| {
        text.lines()
            .any(|l| l.rsplit_once(" (").map_or(l.trim(), |(n, _)| n) == name)
    })
}

/// An SELinux label `user:role:type[:level]` is allowed: its type is a
/// container type unless the node allows others.
pub fn check_selinux(label: &str, node: &NodePolicy) -> Result<(), SpecError> {
    const FIELD: &str = "securityContext.seLinuxLabel";
    let parts: Vec<&str> = label.splitn(4, ':').collect();
    let well_formed = parts.len() >= 3
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.,-:".contains(c))
        });
    if !well_formed {
        return Err(invalid(
            FIELD,
            format!("{label:?} is not an SELinux label (user:role:type[:level])"),
        ));
    }
    let kind = parts[2];
    if !SELINUX_CONTAINER_TYPES.contains(&kind) && !node.allow_selinux_override {
        return Err(invalid(
            FIELD,
            format!(
                "type {kind:?} is not a container type ({}) and this node does not allow other types \
                 (node policy allow_selinux_override: agent --allow-selinux-override, \
                 or CLOUDLESS_AGENT_ALLOW_SELINUX_OVERRIDE=true)",
                SELINUX_CONTAINER_TYPES.join(", ")
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_beyond_the_default_set_need_the_node() {
        let node = NodePolicy::default();
        for ok in ["CAP_NET_BIND_SERVICE", "CAP_CHOWN", "CAP_KILL"] {
            check_capability(ok, "f", &node).expect(ok);
        }
        for refused in [
            "CAP_SYS_ADMIN",
            "CAP_SYS_MODULE",
            "CAP_SYS_PTRACE",
            "CAP_NET_ADMIN",
        ] {
            let err = check_capability(refused, "caps.add[0]", &node)
                .expect_err(refused)
                .to_string();
            assert!(
                err.starts_with("caps.add[0]: ")
                    && err.contains(refused)
                    && err.contains("--allow-capability")
                    && err.contains("allowed_capabilities"),
                "{err}"
            );
        }
        let node = NodePolicy {
            allowed_capabilities: vec!["net_admin".into(), "CAP_SYS_PTRACE".into()],
            ..NodePolicy::default()
        };
        check_capability("CAP_NET_ADMIN", "f", &node).expect("allowed by short name");
        check_capability("CAP_SYS_PTRACE", "f", &node).expect("allowed by full name");
        assert!(check_capability("CAP_SYS_ADMIN", "f", &node).is_err());
        let all = NodePolicy {
            allowed_capabilities: vec!["ALL".into()],
            ..NodePolicy::default()
        };
        check_capability("CAP_SYS_ADMIN", "f", &all).expect("ALL");
    }

    #[test]
    fn apparmor_names_only_loaded_profiles_and_overrides_need_the_node() {
        let dir = tempfile::tempdir().expect("tempdir");
        let profiles = dir.path().join("profiles");
        std::fs::write(
            &profiles,
            "cloudless-default (enforce)\nnginx-strict (enforce)\n/usr/bin/man (complain)\n",
        )
        .expect("write");
        let on = NodePolicy {
            apparmor_enabled: true,
            apparmor_profile: Some("cloudless-default".into()),
            apparmor_profiles_file: profiles.clone(),
            ..NodePolicy::default()
        };
        // Default and runtime/default: the node's own, proven loaded.
        for req in [None, Some("runtime/default"), Some("")] {
            let (p, n) = apparmor_profile(req, &on).expect("default");
            assert_eq!((p.as_deref(), n), (Some("cloudless-default"), None));
        }
        // The node's profile could not be loaded: nothing is named.
        let unloaded = NodePolicy {
            apparmor_profile: None,
            ..on.clone()
        };
        let (p, n) = apparmor_profile(None, &unloaded).expect("default");
        assert_eq!(p, None);
        assert_eq!(n.map(|n| n.reason), Some("AppArmorProfileNotLoaded"));
        // Overrides are refused unless allowed, naming the setting.
        for req in ["unconfined", "nginx-strict"] {
            let err = apparmor_profile(Some(req), &on).expect_err(req).to_string();
            assert!(
                err.starts_with("securityContext.appArmorProfile: ")
                    && err.contains(req)
                    && err.contains("--allow-apparmor-override"),
                "{err}"
            );
        }
        let open = NodePolicy {
            allow_apparmor_override: true,
            ..on.clone()
        };
        let (p, _) = apparmor_profile(Some("unconfined"), &open).expect("unconfined");
        assert_eq!(p.as_deref(), Some("unconfined"));
        let (p, _) = apparmor_profile(Some("nginx-strict"), &open).expect("loaded");
        assert_eq!(p.as_deref(), Some("nginx-strict"));
        let (p, _) = apparmor_profile(Some("/usr/bin/man"), &open).expect("loaded path name");
        assert_eq!(p.as_deref(), Some("/usr/bin/man"));
        let err = apparmor_profile(Some("not-loaded"), &open)
            .expect_err("not loaded")
            .to_string();
        assert!(err.contains("not loaded"), "{err}");
        assert!(apparmor_profile(Some("a b"), &open).is_err());
    }

    #[test]
    fn selinux_types_other_than_container_t_need_the_node() {
        let node = NodePolicy::default();
        check_selinux("system_u:system_r:container_t:s0:c1,c2", &node).expect("container_t");
        check_selinux("system_u:system_r:cloudless_container_t:s0", &node).expect("ours");
        let err = check_selinux("system_u:system_r:spc_t:s0", &node)
            .expect_err("spc_t")
            .to_string();
        assert!(
            err.starts_with("securityContext.seLinuxLabel: ")
                && err.contains("spc_t")
                && err.contains("--allow-selinux-override"),
            "{err}"
        );
        assert!(check_selinux("spc_t", &node).is_err());
        let open = NodePolicy {
            allow_selinux_override: true,
            ..NodePolicy::default()
        };
        check_selinux("system_u:system_r:spc_t:s0", &open).expect("allowed");
    }
}
