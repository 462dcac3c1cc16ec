//! `hostPath` volumes opened beneath the node's allowed prefixes.
//!
//! The spec builder checks a host path by its text (absolute, no `..`,
//! under an allowed prefix), but the kernel resolves symbolic links when it
//! mounts: a link planted under an allowed prefix (`ln -s / <prefix>/root`)
//! would make `<prefix>/root/etc` the host's `/etc`. So, right before a
//! container is created:
//!
//! 1. each host path is opened with `openat2(RESOLVE_BENEATH |
//!    RESOLVE_NO_MAGICLINKS)` relative to its opened prefix (a link may not
//!    lead out of the prefix; an absolute link is refused), and held open;
//! 2. the spec names the open file's canonical path (from
//!    `/proc/self/fd/<n>`, checked to be under the canonical prefix): a path
//!    without symbolic links. (Mounting through `/proc/<pid>/fd/<n>` itself
//!    does not work: runc mounts from the container's new mount namespace,
//!    and the kernel refuses to bind a mount of another namespace.)
//! 3. once the task is created and before it starts, what is mounted at the
//!    destination inside the container (resolved as in the container's
//!    root) must be the very file held open (same device and inode); if a
//!    component was swapped for a link in between, the container is refused
//!    and removed before any of its processes runs.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{open, openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstat, Mode};
use oci_spec::runtime::Spec;

use crate::model::{Mount, MountSource};
use crate::SpecError;

/// The host paths of one container, open; dropping it closes them (after
/// the container is created).
#[derive(Debug, Default)]
pub struct HeldHostPaths {
    held: Vec<Held>,
}

/// One host path, open.
#[derive(Debug)]
struct Held {
    /// Where it is mounted in the container.
    destination: String,
    /// The open file (`O_PATH`).
    fd: OwnedFd,
    /// Its canonical path, under the canonical prefix.
    canonical: PathBuf,
    /// The mount, for errors.
    mount: Mount,
}

fn refused(m: &Mount, problem: String) -> SpecError {
    SpecError::Invalid {
        field: format!("{}.hostPath", m.field),
        problem: if m.volume.is_empty() {
            problem
        } else {
            format!("volume {:?}: {problem}", m.volume)
        },
    }
}

impl HeldHostPaths {
    /// Opens every `hostPath` source of `mounts` beneath the allowed prefix
    /// it is under (the longest, when several are). Refuses, naming the
    /// volume, a path outside every prefix, one whose resolution leaves its
    /// prefix (a symbolic link, absolute or with `..`), and one that does not
    /// exist.
    pub fn open(mounts: &[Mount], allowed: &[PathBuf]) -> Result<Self, SpecError> {
        let mut held = Vec::new();
        for m in mounts {
            let MountSource::HostPath(path) = &m.source else {
                continue;
            };
            let (fd, canonical) = open_beneath(m, path, allowed)?;
            held.push(Held {
                destination: m.destination.clone(),
                fd,
                canonical,
                mount: m.clone(),
            });
        }
        Ok(Self { held })
    }

    /// No host paths.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Points each host-path bind mount of `spec` at the canonical path of
    /// its open file.
    pub fn apply(&self, spec: &mut Spec) {
        if self.held.is_empty() {
            return;
        }
        let Some(mut mounts) = spec.mounts().clone() else {
            return;
        };
        for m in &mut mounts {
            let dest = m.destination().display().to_string();
            if let Some(h) = self.held.iter().find(|h| h.destination == dest) {
                m.set_source(Some(h.canonical.clone()));
            }
        }
        spec.set_mounts(Some(mounts));
    }

    /// Checks, in the created (not yet started) container whose init has
    /// host pid `pid`, that each destination holds the file opened beneath
    /// the prefix: same device and inode.
    pub fn verify_in(&self, pid: u32) -> Result<(), SpecError> {
        if self.held.is_empty() {
            return Ok(());
        }
        let root_path = format!("/proc/{pid}/root");
        let root = open(
            root_path.as_str(),
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| SpecError::Internal(format!("{root_path}: {e}")))?;
        for h in &self.held {
            let how = OpenHow::new()
                .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
                .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
            let inside = h.destination.trim_start_matches('/');
            let same = openat2(&root, inside, how)
                .and_then(|mounted| Ok((fstat(mounted.as_fd())?, fstat(h.fd.as_fd())?)))
                .is_ok_and(|(a, b)| a.st_dev == b.st_dev && a.st_ino == b.st_ino);
            if !same {
                return Err(refused(
                    &h.mount,
                    format!(
                        "what was mounted at {} is not {} as checked (it changed while the container was created); refused",
                        h.destination,
                        h.canonical.display()
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Opens `path` (`O_PATH`) beneath the allowed prefix it is under; returns
/// it with its canonical path.
fn open_beneath(
    m: &Mount,
    path: &Path,
    allowed: &[PathBuf],
) -> Result<(OwnedFd, PathBuf), SpecError> {
    let textual = path.is_absolute()
        && !path
            .components()
            .any(|c| c == std::path::Component::ParentDir);
    let prefix = allowed
        .iter()
        .filter(|p| textual && path.starts_with(p))
        .max_by_key(|p| p.as_os_str().len())
        .ok_or_else(|| {
            refused(
                m,
                format!(
                    "{} is not under a directory this node allows workloads to mount (agent --allow-host-path)",
                    path.display()
                ),
            )
        })?;
    let rest = path.strip_prefix(prefix).map_err(|_| {
        refused(
            m,
            format!("{} is not under {}", path.display(), prefix.display()),
        )
    })?;
    let rest = if rest.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rest
    };
    // The prefix is the device owner's choice and may itself contain links.
    let dir = open(
        prefix.as_path(),
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| {
        refused(
            m,
            format!(
                "the allowed directory {} cannot be opened: {e}",
                prefix.display()
            ),
        )
    })?;
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let fd = match openat2(&dir, rest, how) {
        Ok(fd) => fd,
        Err(Errno::EXDEV) => {
            return Err(refused(
                m,
                format!(
                    "{} leads outside the allowed directory {} (through a symbolic link); refused",
                    path.display(),
                    prefix.display()
                ),
            ))
        }
        Err(Errno::ELOOP) => {
            return Err(refused(
                m,
                format!(
                    "{} goes through a /proc magic link or too many symbolic links; refused",
                    path.display()
                ),
            ))
        }
        // Without openat2 (Linux before 5.6), the path is opened as it is;
        // the check of where the open file really is, below, still holds.
        Err(Errno::ENOSYS) => open(path, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(|e| refused(m, format!("{}: {e}", path.display())))?,
        Err(e) => return Err(refused(m, format!("{}: {e}", path.display()))),
    };
    let canonical = canonical_beneath(m, path, &fd, prefix)?;
    Ok((fd, canonical))
}

/// Where the open file `fd` really is, which must be under the canonical
/// `prefix`.
fn canonical_beneath(
    m: &Mount,
    path: &Path,
    fd: &OwnedFd,
    prefix: &Path,
) -> Result<PathBuf, SpecError> {
    let real = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|e| refused(m, format!("{}: {e}", path.display())))?;
    let canonical = std::fs::canonicalize(prefix)
        .map_err(|e| refused(m, format!("{}: {e}", prefix.display())))?;
    let gone = real.to_string_lossy().ends_with(" (deleted)");
    if real.starts_with(&canonical) && !gone {
        Ok(real)
    } else {
        Err(refused(
            m,
            format!(
                "{} resolves to {}, outside the allowed directory {}; refused",
                path.display(),
                real.display(),
                canonical.display()
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(path: &Path) -> Mount {
        Mount {
            destination: "/data".into(),
            source: MountSource::HostPath(path.to_path_buf()),
            read_only: false,
            field: "volumeMounts[0]".into(),
            volume: "shared".into(),
        }
    }

    #[test]
    fn a_symlink_planted_under_an_allowed_prefix_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let prefix = dir.path().join("shared");
        std::fs::create_dir_all(prefix.join("real/etc")).expect("mkdir");
        std::os::unix::fs::symlink("/", prefix.join("root")).expect("symlink");
        std::os::unix::fs::symlink("../..", prefix.join("up")).expect("symlink");
        std::os::unix::fs::symlink("real", prefix.join("inside")).expect("symlink");
        let allowed = vec![prefix.clone()];

        for escape in ["root/etc", "root", "up/etc", "up"] {
            let err = HeldHostPaths::open(&[host(&prefix.join(escape))], &allowed)
                .expect_err(escape)
                .to_string();
            assert!(
                err.starts_with("volumeMounts[0].hostPath: volume \"shared\":")
                    && err.contains("outside the allowed directory"),
                "{escape}: {err}"
            );
        }
        // A link that stays inside the prefix, the prefix itself and a
        // plain directory are fine; the mount goes through the open file.
        for fine in ["inside/etc", "real/etc", ""] {
            let p = if fine.is_empty() {
                prefix.clone()
            } else {
                prefix.join(fine)
            };
            let held = HeldHostPaths::open(&[host(&p)], &allowed).expect(fine);
            assert!(!held.is_empty());
            let h = &held.held[0];
            let real = std::fs::read_link(format!("/proc/self/fd/{}", h.fd.as_raw_fd()))
                .expect("readlink");
            assert!(real.starts_with(&prefix), "{}", real.display());
            assert_eq!(h.canonical, real);
        }
        let err = HeldHostPaths::open(&[host(&prefix.join("missing"))], &allowed)
            .expect_err("missing")
            .to_string();
        assert!(err.contains("missing"), "{err}");
        let err = HeldHostPaths::open(&[host(Path::new("/etc"))], &allowed)
            .expect_err("not allowed")
            .to_string();
        assert!(err.contains("--allow-host-path"), "{err}");
    }

    #[test]
    fn the_spec_names_the_canonical_path_and_the_mount_is_checked_by_inode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let prefix = std::fs::canonicalize(dir.path()).expect("canonical");
        std::fs::create_dir_all(prefix.join("real")).expect("mkdir");
        std::fs::create_dir_all(prefix.join("other")).expect("mkdir");
        std::os::unix::fs::symlink("real", prefix.join("link")).expect("symlink");
        let mut m = host(&prefix.join("link"));
        // Seen from this process's root, the "container destination" is the
        // directory itself.
        m.destination = prefix.join("real").display().to_string();
        let held = HeldHostPaths::open(std::slice::from_ref(&m), std::slice::from_ref(&prefix))
            .expect("open");
        let mut spec: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "mounts": [
                { "destination": m.destination, "type": "bind", "source": prefix.join("link"), "options": ["rbind"] },
                { "destination": "/proc", "type": "proc", "source": "proc" },
            ],
        }))
        .expect("spec");
        held.apply(&mut spec);
        let mounts = spec.mounts().clone().expect("mounts");
        assert_eq!(mounts[0].source().clone(), Some(prefix.join("real")));
        assert_eq!(mounts[1].source().clone(), Some(PathBuf::from("proc")));
        held.verify_in(std::process::id()).expect("same inode");

        // Something else at the destination: refused.
        let mut wrong = m.clone();
        wrong.destination = prefix.join("other").display().to_string();
        let held = HeldHostPaths::open(&[m], std::slice::from_ref(&prefix)).expect("open");
        let moved = HeldHostPaths {
            held: held
                .held
                .into_iter()
                .map(|h| Held {
                    destination: wrong.destination.clone(),
                    ..h
                })
                .collect(),
        };
        let err = moved
            .verify_in(std::process::id())
            .expect_err("another directory")
            .to_string();
        assert!(
            err.contains("changed while the container was created"),
            "{err}"
        );
    }
}
