//! What the agent needs from a container runtime. `Containerd` is the
//! implementation; the supervisor and probes work against this trait.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use crate::{
    ContainerConfig, Containerd, Exit, ImageRef, NodePolicy, RuntimeError, Started, TaskState,
};

/// A container runtime on this node.
pub trait ContainerRuntime: Clone + Send + Sync + 'static {
    /// Imports an OCI image archive under `name`.
    fn import(
        &self,
        archive: &Path,
        name: &str,
    ) -> impl Future<Output = Result<ImageRef, RuntimeError>> + Send;
    /// Creates and starts a container; on failure nothing is left behind.
    fn start(
        &self,
        c: &ContainerConfig,
        image: &ImageRef,
        node: &NodePolicy,
    ) -> impl Future<Output = Result<Started, RuntimeError>> + Send;
    /// Waits for the container's process to exit.
    fn wait(&self, id: &str) -> impl Future<Output = Result<Exit, RuntimeError>> + Send;
    /// SIGTERM, then SIGKILL after `grace`.
    fn stop(
        &self,
        id: &str,
        grace: Duration,
    ) -> impl Future<Output = Result<Exit, RuntimeError>> + Send;
    /// Removes the task, container and snapshot (whatever exists).
    fn remove(&self, id: &str) -> impl Future<Output = ()> + Send;
    /// The task's state.
    fn task_state(&self, id: &str) -> impl Future<Output = Result<TaskState, RuntimeError>> + Send;
    /// Whether the last exit of `id` was an OOM kill.
    fn oom_killed(&self, id: &str, exit_code: u32) -> impl Future<Output = bool> + Send;
    /// Runs a command inside a running container: exit status and output.
    fn exec(
        &self,
        id: &str,
        argv: &[String],
        timeout: Duration,
    ) -> impl Future<Output = Result<(u32, String), RuntimeError>> + Send;
    /// Ids of the containers this runtime manages.
    fn managed(&self) -> impl Future<Output = Result<Vec<String>, RuntimeError>> + Send;
    /// Where the output of container `id` goes.
    fn log_path(&self, id: &str) -> std::path::PathBuf;
    /// Resumes collecting the output of an adopted container.
    fn reattach_output(&self, id: &str) -> Result<(), RuntimeError>;
}

impl ContainerRuntime for Containerd {
    fn import(
        &self,
        archive: &Path,
        name: &str,
    ) -> impl Future<Output = Result<ImageRef, RuntimeError>> + Send {
        Containerd::import(self, archive, name)
    }
    fn start(
        &self,
        c: &ContainerConfig,
        image: &ImageRef,
        node: &NodePolicy,
    ) -> impl Future<Output = Result<Started, RuntimeError>> + Send {
        Containerd::start(self, c, image, node)
    }
    fn wait(&self, id: &str) -> impl Future<Output = Result<Exit, RuntimeError>> + Send {
        Containerd::wait(self, id)
    }
    fn stop(
        &self,
        id: &str,
        grace: Duration,
    ) -> impl Future<Output = Result<Exit, RuntimeError>> + Send {
        Containerd::stop(self, id, grace)
    }
    fn remove(&self, id: &str) -> impl Future<Output = ()> + Send {
        Containerd::remove(self, id)
    }
    fn task_state(&self, id: &str) -> impl Future<Output = Result<TaskState, RuntimeError>> + Send {
        Containerd::task_state(self, id)
    }
    fn oom_killed(&self, id: &str, exit_code: u32) -> impl Future<Output = bool> + Send {
        Containerd::oom_killed(self, id, exit_code)
    }
    fn exec(
        &self,
        id: &str,
        argv: &[String],
        timeout: Duration,
    ) -> impl Future<Output = Result<(u32, String), RuntimeError>> + Send {
        Containerd::exec(self, id, argv, timeout)
    }
    fn managed(&self) -> impl Future<Output = Result<Vec<String>, RuntimeError>> + Send {
        Containerd::managed(self)
    }
    fn log_path(&self, id: &str) -> std::path::PathBuf {
        Containerd::log_path(self, id)
    }
    fn reattach_output(&self, id: &str) -> Result<(), RuntimeError> {
        Containerd::reattach_output(self, id)
    }
}
