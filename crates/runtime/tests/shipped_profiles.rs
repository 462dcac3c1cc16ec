//! The profiles shipped in config/ match what the runtime asks for.

use std::path::Path;

use cloudless_runtime::{apparmor, seccomp, DEFAULT_APPARMOR_PROFILE};

fn config_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../config"))
}

#[test]
fn the_apparmor_profile_defines_the_default_profile_name() {
    let text = std::fs::read_to_string(config_dir().join("apparmor/cloudless-default"))
        .expect("config/apparmor/cloudless-default");
    assert!(
        text.contains(&format!("profile {DEFAULT_APPARMOR_PROFILE} ")),
        "the shipped profile must be named {DEFAULT_APPARMOR_PROFILE}"
    );
    assert!(text.contains("deny mount"), "containers must not mount");
    assert_eq!(
        text,
        apparmor::profile_text(DEFAULT_APPARMOR_PROFILE),
        "config/apparmor/cloudless-default must be the profile the agent generates and loads"
    );
}

#[test]
fn the_selinux_module_declares_the_container_type() {
    let text = std::fs::read_to_string(config_dir().join("selinux/cloudless.te"))
        .expect("config/selinux/cloudless.te");
    assert!(text.contains("module cloudless"));
    assert!(text.contains("type cloudless_container_t;"));
}

#[test]
fn every_shipped_seccomp_profile_is_a_valid_localhost_profile() {
    let dir = config_dir().join("seccomp");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("config/seccomp") {
        let name = entry
            .expect("entry")
            .file_name()
            .to_string_lossy()
            .to_string();
        seccomp::localhost(&dir, &name).unwrap_or_else(|e| panic!("{name}: {e}"));
        n += 1;
    }
    assert!(n > 0, "no profiles shipped");
}
