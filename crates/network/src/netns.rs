//! Named network namespaces that outlive the process that made them: each
//! is a bind mount of a namespace file onto `<dir>/<name>`, as `ip netns
//! add` does (there under `/run/netns`). A replica's namespace lives as
//! long as the replica, across container restarts and agent restarts, so
//! its address does too.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::NetworkError;

/// The directory of this node's replica namespaces.
#[derive(Debug, Clone)]
pub struct NetnsDir {
    dir: PathBuf,
}

impl NetnsDir {
    /// Uses `dir` (made if missing) for namespace files. Like `ip netns`, the
    /// directory is made a shared mount point, so that removing a namespace
    /// also removes the copies of its mount that mount namespaces made
    /// meanwhile hold (else the namespace would live on in them).
    pub fn open(dir: &Path) -> Result<Self, NetworkError> {
        std::fs::create_dir_all(dir).map_err(|e| NetworkError::io(dir, e))?;
        let shared = || {
            mount(
                None::<&str>,
                dir,
                None::<&str>,
                MsFlags::MS_SHARED | MsFlags::MS_REC,
                None::<&str>,
            )
        };
        if shared().is_err() {
            // Not a mount point yet: make it one, then shared.
            mount(
                Some(dir),
                dir,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .and_then(|()| shared())
            .map_err(|e| NetworkError::Namespace {
                name: dir.display().to_string(),
                message: format!("making the directory a shared mount point: {e}"),
            })?;
        }
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// The file of namespace `name`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Whether namespace `name` exists (its file is a namespace, not an
    /// empty file left by a crash or a reboot).
    pub fn exists(&self, name: &str) -> bool {
        nix::sys::statfs::statfs(&self.path(name))
            .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC)
    }

    /// Makes namespace `name` (a fresh one; an existing one is kept).
    pub fn create(&self, name: &str) -> Result<PathBuf, NetworkError> {
        let path = self.path(name);
        if self.exists(name) {
            return Ok(path);
        }
        let err = |message: String| NetworkError::Namespace {
            name: name.to_owned(),
            message,
        };
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| NetworkError::io(&path, e))?;
        let target = path.clone();
        // A thread of its own: unshare moves only the calling thread into
        // the new namespace, and this one ends right after.
        let made = std::thread::spawn(move || -> Result<(), String> {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("unshare: {e}"))?;
            let own = format!("/proc/self/task/{}/ns/net", nix::unistd::gettid());
            mount(
                Some(own.as_str()),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| format!("bind-mounting {own}: {e}"))
        })
        .join()
        .unwrap_or_else(|_| Err("the namespace thread panicked".into()));
        if let Err(e) = made {
            let _ = std::fs::remove_file(&path);
            return Err(err(e));
        }
        Ok(path)
    }

    /// Removes namespace `name` (nothing if it does not exist). Its
    /// interfaces go with it once no process is left in it.
    pub fn remove(&self, name: &str) -> Result<(), NetworkError> {
        let path = self.path(name);
        if !path.exists() {
            return Ok(());
        }
        if self.exists(name) {
            umount2(&path, MntFlags::MNT_DETACH).map_err(|e| NetworkError::Namespace {
                name: name.to_owned(),
                message: format!("unmounting {}: {e}", path.display()),
            })?;
        }
        std::fs::remove_file(&path).map_err(|e| NetworkError::io(&path, e))
    }

    /// Names of the namespaces (and leftover files) in the directory.
    pub fn list(&self) -> Result<Vec<String>, NetworkError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|e| NetworkError::io(&self.dir, e))?;
        Ok(entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .collect())
    }
}

/// Runs `f` on a fresh thread inside the namespace at `path` (sockets it
/// makes stay in that namespace after the thread ends).
pub fn run_in<T, F>(path: &Path, f: F) -> Result<T, NetworkError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, String> + Send + 'static,
{
    let name = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|e| NetworkError::io(path, e))?;
    std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("entering: {e}"))?;
        f()
    })
    .join()
    .unwrap_or_else(|_| Err("the namespace thread panicked".into()))
    .map_err(|message| NetworkError::Namespace { name, message })
}
