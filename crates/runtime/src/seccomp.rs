//! Seccomp filters. Allow-lists: anything not listed fails with EPERM.
//! Names unknown to an architecture are ignored by runc, so one list serves
//! amd64 and arm64.

use std::path::Path;

use oci_spec::runtime::LinuxSeccomp;
use serde_json::{json, Value};

use crate::model::{NodePolicy, SeccompProfile};
use crate::SpecError;

/// EPERM.
const EPERM: u32 = 1;
/// Largest profile file read.
const MAX_PROFILE_BYTES: u64 = 1024 * 1024;

/// What a process needs to start, run, use memory, time, signals, files it
/// opens and sockets: the base of both allow-lists.
const BASE: &[&str] = &[
    "accept",
    "accept4",
    "access",
    "alarm",
    "arch_prctl",
    "bind",
    "brk",
    "capget",
    "chdir",
    "clock_getres",
    "clock_getres_time64",
    "clock_gettime",
    "clock_gettime64",
    "clock_nanosleep",
    "clock_nanosleep_time64",
    "close",
    "close_range",
    "connect",
    "copy_file_range",
    "dup",
    "dup2",
    "dup3",
    "epoll_create",
    "epoll_create1",
    "epoll_ctl",
    "epoll_pwait",
    "epoll_pwait2",
    "epoll_wait",
    "eventfd",
    "eventfd2",
    "execve",
    "execveat",
    "exit",
    "exit_group",
    "faccessat",
    "faccessat2",
    "fadvise64",
    "fchdir",
    "fcntl",
    "fcntl64",
    "fdatasync",
    "flock",
    "fork",
    "fstat",
    "fstat64",
    "fstatfs",
    "fstatfs64",
    "fsync",
    "ftruncate",
    "ftruncate64",
    "futex",
    "futex_time64",
    "futex_waitv",
    "get_robust_list",
    "getcpu",
    "getcwd",
    "getdents",
    "getdents64",
    "getegid",
    "getegid32",
    "geteuid",
    "geteuid32",
    "getgid",
    "getgid32",
    "getgroups",
    "getgroups32",
    "getitimer",
    "getpeername",
    "getpgid",
    "getpgrp",
    "getpid",
    "getppid",
    "getpriority",
    "getrandom",
    "getresgid",
    "getresgid32",
    "getresuid",
    "getresuid32",
    "getrlimit",
    "getrusage",
    "getsid",
    "getsockname",
    "getsockopt",
    "gettid",
    "gettimeofday",
    "getuid",
    "getuid32",
    "ioctl",
    "kill",
    "listen",
    "lseek",
    "lstat",
    "lstat64",
    "madvise",
    "membarrier",
    "mincore",
    "mlock",
    "mlock2",
    "mlockall",
    "mmap",
    "mmap2",
    "mprotect",
    "mremap",
    "msync",
    "munlock",
    "munlockall",
    "munmap",
    "nanosleep",
    "newfstatat",
    "open",
    "openat",
    "openat2",
    "pause",
    "pipe",
    "pipe2",
    "poll",
    "ppoll",
    "ppoll_time64",
    "prctl",
    "pread64",
    "preadv",
    "preadv2",
    "prlimit64",
    "pselect6",
    "pselect6_time64",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "read",
    "readahead",
    "readlink",
    "readlinkat",
    "readv",
    "recv",
    "recvfrom",
    "recvmmsg",
    "recvmmsg_time64",
    "recvmsg",
    "restart_syscall",
    "rseq",
    "rt_sigaction",
    "rt_sigpending",
    "rt_sigprocmask",
    "rt_sigqueueinfo",
    "rt_sigreturn",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "rt_sigtimedwait_time64",
    "rt_tgsigqueueinfo",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_getaffinity",
    "sched_getattr",
    "sched_getparam",
    "sched_getscheduler",
    "sched_yield",
    "select",
    "send",
    "sendfile",
    "sendfile64",
    "sendmmsg",
    "sendmsg",
    "sendto",
    "set_robust_list",
    "set_thread_area",
    "set_tid_address",
    "setitimer",
    "setsockopt",
    "shutdown",
    "sigaltstack",
    "signalfd",
    "signalfd4",
    "socket",
    "socketcall",
    "socketpair",
    "splice",
    "stat",
    "stat64",
    "statfs",
    "statfs64",
    "statx",
    "sync_file_range",
    "sysinfo",
    "tee",
    "tgkill",
    "time",
    "timer_create",
    "timer_delete",
    "timer_getoverrun",
    "timer_gettime",
    "timer_gettime64",
    "timer_settime",
    "timer_settime64",
    "timerfd_create",
    "timerfd_gettime",
    "timerfd_gettime64",
    "timerfd_settime",
    "timerfd_settime64",
    "times",
    "tkill",
    "ugetrlimit",
    "umask",
    "uname",
    "vfork",
    "wait4",
    "waitid",
    "write",
    "writev",
];

/// What the runtime default adds: file system changes, identity changes
/// within the container, extended attributes, inotify, IPC and the rest of
/// Docker's default allow-list that needs no capability beyond the defaults.
const DEFAULT_EXTRA: &[&str] = &[
    "chmod",
    "chown",
    "chown32",
    "creat",
    "epoll_ctl_old",
    "epoll_wait_old",
    "fallocate",
    "fanotify_mark",
    "fchmod",
    "fchmodat",
    "fchmodat2",
    "fchown",
    "fchown32",
    "fchownat",
    "fgetxattr",
    "flistxattr",
    "fremovexattr",
    "fsetxattr",
    "getxattr",
    "inotify_add_watch",
    "inotify_init",
    "inotify_init1",
    "inotify_rm_watch",
    "io_cancel",
    "io_destroy",
    "io_getevents",
    "io_pgetevents",
    "io_pgetevents_time64",
    "io_setup",
    "io_submit",
    "ipc",
    "lchown",
    "lchown32",
    "lgetxattr",
    "link",
    "linkat",
    "listxattr",
    "llistxattr",
    "lremovexattr",
    "lsetxattr",
    "memfd_create",
    "mkdir",
    "mkdirat",
    "mknod",
    "mknodat",
    "mq_getsetattr",
    "mq_notify",
    "mq_open",
    "mq_timedreceive",
    "mq_timedreceive_time64",
    "mq_timedsend",
    "mq_timedsend_time64",
    "mq_unlink",
    "msgctl",
    "msgget",
    "msgrcv",
    "msgsnd",
    "name_to_handle_at",
    "personality",
    "pidfd_open",
    "pidfd_send_signal",
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "process_mrelease",
    "remap_file_pages",
    "removexattr",
    "rename",
    "renameat",
    "renameat2",
    "rmdir",
    "sched_setaffinity",
    "sched_setattr",
    "sched_setparam",
    "sched_setscheduler",
    "semctl",
    "semget",
    "semop",
    "semtimedop",
    "semtimedop_time64",
    "setfsgid",
    "setfsgid32",
    "setfsuid",
    "setfsuid32",
    "setgid",
    "setgid32",
    "setgroups",
    "setgroups32",
    "setpgid",
    "setpriority",
    "setregid",
    "setregid32",
    "setresgid",
    "setresgid32",
    "setresuid",
    "setresuid32",
    "setreuid",
    "setreuid32",
    "setrlimit",
    "setsid",
    "setuid",
    "setuid32",
    "setxattr",
    "shmat",
    "shmctl",
    "shmdt",
    "shmget",
    "symlink",
    "symlinkat",
    "sync",
    "syncfs",
    "truncate",
    "truncate64",
    "unlink",
    "unlinkat",
    "utime",
    "utimensat",
    "utimensat_time64",
    "utimes",
    "vmsplice",
];

/// ENOSYS: what `clone3` answers, so that libc falls back to `clone`, whose
/// flags a filter can inspect.
const ENOSYS: u32 = 38;
/// CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET.
const CLONE_NAMESPACE_FLAGS: u64 = 0x7E02_0000;

fn allow_list(names: impl IntoIterator<Item = &'static str>) -> Value {
    let mut names: Vec<&str> = names.into_iter().collect();
    names.sort_unstable();
    names.dedup();
    json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": EPERM,
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32",
                          "SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
        "syscalls": [
            { "names": names, "action": "SCMP_ACT_ALLOW" },
            // Threads and processes, but no new namespaces.
            { "names": ["clone"], "action": "SCMP_ACT_ALLOW",
              "args": [{ "index": 0, "value": CLONE_NAMESPACE_FLAGS, "valueTwo": 0,
                         "op": "SCMP_CMP_MASKED_EQ" }] },
            { "names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS },
        ],
    })
}

/// The allow-list of `RuntimeDefault`.
pub fn runtime_default() -> Value {
    allow_list(BASE.iter().chain(DEFAULT_EXTRA).copied())
}

/// The allow-list of `Strict`.
pub fn strict() -> Value {
    allow_list(BASE.iter().copied())
}

/// Reads a `Localhost` profile: an OCI runtime-spec seccomp object in JSON,
/// from a plain file name inside `dir`.
pub fn localhost(dir: &Path, name: &str) -> Result<Value, SpecError> {
    const FIELD: &str = "securityContext.seccompProfile.localhostProfile";
    let bad = |problem: String| SpecError::Invalid {
        field: FIELD.into(),
        problem,
    };
    let plain = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0');
    if !plain {
        return Err(bad(format!(
            "{name:?} must be a file name inside the node's seccomp directory"
        )));
    }
    let path = dir.join(name);
    let meta = std::fs::metadata(&path).map_err(|e| bad(format!("{}: {e}", path.display())))?;
    if meta.len() > MAX_PROFILE_BYTES {
        return Err(bad(format!(
            "{} is {} bytes; profiles are limited to {MAX_PROFILE_BYTES}",
            path.display(),
            meta.len()
        )));
    }
    let text =
        std::fs::read_to_string(&path).map_err(|e| bad(format!("{}: {e}", path.display())))?;
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| bad(format!("{} is not JSON: {e}", path.display())))?;
    // Typed check: actions, architectures and operators must be ones the
    // runtime spec knows.
    let typed: LinuxSeccomp = serde_json::from_value(value.clone()).map_err(|e| {
        bad(format!(
            "{} is not an OCI seccomp profile: {e}",
            path.display()
        ))
    })?;
    for (i, rule) in typed.syscalls().iter().flatten().enumerate() {
        if rule.names().is_empty() {
            return Err(bad(format!(
                "{}: syscalls[{i}].names is empty",
                path.display()
            )));
        }
    }
    Ok(value)
}

/// Whether a profile lets through every system call it does not list:
/// default action allow, log (allow and log) or trace (up to whatever
/// tracer attaches).
fn allows_by_default(profile: &Value) -> bool {
    matches!(
        profile["defaultAction"].as_str(),
        Some("SCMP_ACT_ALLOW" | "SCMP_ACT_LOG" | "SCMP_ACT_TRACE")
    )
}

/// The `linux.seccomp` value for `profile`, or `None` for no filter. A
/// `Localhost` profile that allows by default needs the same permission as
/// `Unconfined`.
pub fn for_profile(
    profile: &SeccompProfile,
    node: &NodePolicy,
) -> Result<Option<Value>, SpecError> {
    match profile {
        SeccompProfile::RuntimeDefault => Ok(Some(runtime_default())),
        SeccompProfile::Strict => Ok(Some(strict())),
        SeccompProfile::Localhost(name) => {
            let profile = localhost(&node.seccomp_dir, name)?;
            // A default-allow profile filters next to nothing: the same
            // permission as no filter at all.
            if allows_by_default(&profile) && !node.allow_unconfined_seccomp {
                return Err(SpecError::Invalid {
                    field: "securityContext.seccompProfile.localhostProfile".into(),
                    problem: format!(
                        "{name:?} allows every system call it does not list (defaultAction {}), \
                         which counts as Unconfined, and this node does not allow unconfined seccomp \
                         (node policy allow_unconfined_seccomp: agent --allow-unconfined-seccomp, \
                         or CLOUDLESS_AGENT_ALLOW_UNCONFINED_SECCOMP=true)",
                        profile["defaultAction"].as_str().unwrap_or("?")
                    ),
                });
            }
            Ok(Some(profile))
        }
        SeccompProfile::Unconfined if node.allow_unconfined_seccomp => Ok(None),
        SeccompProfile::Unconfined => Err(SpecError::Invalid {
            field: "securityContext.seccompProfile.type".into(),
            problem: "Unconfined is not allowed on this node (node policy allow_unconfined_seccomp: \
                      agent --allow-unconfined-seccomp, or CLOUDLESS_AGENT_ALLOW_UNCONFINED_SECCOMP=true)"
                .into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The unconditionally allowed names.
    fn names(v: &Value) -> Vec<String> {
        serde_json::from_value::<LinuxSeccomp>(v.clone())
            .expect("typed")
            .syscalls()
            .iter()
            .flatten()
            .filter(|s| {
                s.action() == oci_spec::runtime::LinuxSeccompAction::ScmpActAllow
                    && s.args().is_none()
            })
            .flat_map(|s| s.names().clone())
            .collect()
    }

    #[test]
    fn builtin_profiles_are_valid_oci_and_strict_is_a_subset() {
        let default = names(&runtime_default());
        let strict = names(&strict());
        assert!(strict.iter().all(|n| default.contains(n)));
        for blocked in [
            "mkdir", "unlink", "chmod", "mount", "ptrace", "bpf", "keyctl",
        ] {
            assert!(
                !strict.contains(&blocked.to_owned()),
                "strict allows {blocked}"
            );
        }
        for dangerous in [
            "io_uring_setup",
            "io_uring_enter",
            "io_uring_register",
            "mount",
            "ptrace",
            "bpf",
            "kexec_load",
            "init_module",
            "unshare",
            "clone",
            "clone3",
        ] {
            assert!(
                !default.contains(&dangerous.to_owned()),
                "default allows {dangerous}"
            );
        }
        assert!(default.contains(&"mkdir".to_owned()));
    }

    #[test]
    fn localhost_profiles_are_checked_and_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("ok.json"),
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mkdir"],"action":"SCMP_ACT_ERRNO"}]}"#,
        )
        .expect("write");
        std::fs::write(dir.path().join("junk.json"), "{not json").expect("write");
        std::fs::write(
            dir.path().join("badaction.json"),
            r#"{"defaultAction":"SCMP_ACT_EXPLODE"}"#,
        )
        .expect("write");
        assert!(localhost(dir.path(), "ok.json").is_ok());
        for (name, expect) in [
            ("junk.json", "not JSON"),
            ("badaction.json", "not an OCI seccomp profile"),
            ("missing.json", "missing.json"),
            ("../etc/passwd", "file name"),
        ] {
            let err = localhost(dir.path(), name).expect_err(name).to_string();
            assert!(err.contains("localhostProfile"), "{err}");
            assert!(err.contains(expect), "{err}");
        }
    }

    #[test]
    fn a_default_allow_localhost_profile_counts_as_unconfined() {
        let dir = tempfile::tempdir().expect("tempdir");
        // The shipped sample is one of them.
        let shipped = std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../config/seccomp/deny-mkdir.json"
        ));
        std::fs::copy(shipped, dir.path().join("deny-mkdir.json")).expect("copy");
        std::fs::write(
            dir.path().join("log.json"),
            r#"{"defaultAction":"SCMP_ACT_LOG"}"#,
        )
        .expect("write");
        std::fs::write(
            dir.path().join("allowlist.json"),
            r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[{"names":["read","write","exit_group"],"action":"SCMP_ACT_ALLOW"}]}"#,
        )
        .expect("write");
        let node = NodePolicy {
            seccomp_dir: dir.path().to_path_buf(),
            ..NodePolicy::default()
        };
        for name in ["deny-mkdir.json", "log.json"] {
            let err = for_profile(&SeccompProfile::Localhost(name.into()), &node)
                .expect_err(name)
                .to_string();
            assert!(
                err.starts_with("securityContext.seccompProfile.localhostProfile: ")
                    && err.contains("counts as Unconfined")
                    && err.contains("--allow-unconfined-seccomp"),
                "{err}"
            );
        }
        assert!(
            for_profile(&SeccompProfile::Localhost("allowlist.json".into()), &node)
                .expect("an allow-list")
                .is_some()
        );
        let open = NodePolicy {
            allow_unconfined_seccomp: true,
            ..node
        };
        assert!(
            for_profile(&SeccompProfile::Localhost("deny-mkdir.json".into()), &open)
                .expect("allowed")
                .is_some()
        );
    }

    #[test]
    fn unconfined_needs_the_node_to_allow_it() {
        let node = NodePolicy::default();
        assert!(for_profile(&SeccompProfile::Unconfined, &node).is_err());
        let open = NodePolicy {
            allow_unconfined_seccomp: true,
            ..NodePolicy::default()
        };
        assert_eq!(
            for_profile(&SeccompProfile::Unconfined, &open).expect("allowed"),
            None
        );
    }
}
