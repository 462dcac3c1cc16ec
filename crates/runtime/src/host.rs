//! What the host kernel offers: AppArmor, SELinux, cgroup version.

use std::path::Path;

/// Kernel security features found on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostSecurity {
    /// AppArmor is enabled (`/sys/module/apparmor/parameters/enabled` says
    /// `Y`) and its securityfs is there (`/sys/kernel/security/apparmor`),
    /// so profiles can be loaded and listed.
    pub apparmor: bool,
    /// SELinux is enabled (selinuxfs is mounted).
    pub selinux: bool,
    /// The unified cgroup v2 hierarchy is mounted at /sys/fs/cgroup.
    pub cgroup_v2: bool,
}

impl HostSecurity {
    /// Probes the running kernel.
    pub fn detect() -> Self {
        Self::detect_at(Path::new("/"))
    }

    /// Probes a file system rooted at `root` (tests use fixtures).
    pub fn detect_at(root: &Path) -> Self {
        let apparmor = std::fs::read_to_string(root.join("sys/module/apparmor/parameters/enabled"))
            .is_ok_and(|s| s.trim() == "Y")
            && root.join("sys/kernel/security/apparmor").is_dir();
        let selinux = root.join("sys/fs/selinux/enforce").exists();
        let cgroup_v2 = root.join("sys/fs/cgroup/cgroup.controllers").exists();
        Self {
            apparmor,
            selinux,
            cgroup_v2,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_kernel_switches() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            HostSecurity::detect_at(dir.path()),
            HostSecurity {
                apparmor: false,
                selinux: false,
                cgroup_v2: false
            }
        );
        let aa = dir.path().join("sys/module/apparmor/parameters");
        std::fs::create_dir_all(&aa).expect("mkdir");
        std::fs::write(aa.join("enabled"), "Y\n").expect("write");
        // Enabled, but without securityfs no profile can be loaded.
        assert!(!HostSecurity::detect_at(dir.path()).apparmor);
        std::fs::create_dir_all(dir.path().join("sys/kernel/security/apparmor")).expect("mkdir");
        std::fs::create_dir_all(dir.path().join("sys/fs/selinux")).expect("mkdir");
        std::fs::write(dir.path().join("sys/fs/selinux/enforce"), "1").expect("write");
        let found = HostSecurity::detect_at(dir.path());
        assert!(found.apparmor && found.selinux);
    }
}
