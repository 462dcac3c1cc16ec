//! What the agent needs from the node's container runtime: the runtime
//! crate's [`ContainerRuntime`] (run, wait, stop, probe), plus pulling
//! images from registries and streaming a command's output. `Containerd` is
//! the implementation; the unit tests have an in-memory one.

use std::future::Future;
use std::time::Duration;

use cloudless_runtime::registry::{PullProgress, RegistryClient};
use cloudless_runtime::{ContainerRuntime, Containerd, ImageRef, RuntimeError};

/// A container runtime the agent can run replicas on.
pub trait AgentRuntime: ContainerRuntime {
    /// Pulls `reference` from its registry through `registry`, telling
    /// `progress` the bytes done as they come (see [`Containerd::pull`]).
    fn pull(
        &self,
        registry: &RegistryClient,
        reference: &str,
        progress: &(dyn Fn(PullProgress) + Send + Sync),
    ) -> impl Future<Output = Result<ImageRef, RuntimeError>> + Send;

    /// Runs `argv` in container `id`, sending its output to `out` in chunks
    /// as it comes; its exit status (see [`Containerd::exec_streaming`]).
    fn exec_streaming(
        &self,
        id: &str,
        argv: &[String],
        timeout: Duration,
        out: tokio::sync::mpsc::Sender<Vec<u8>>,
    ) -> impl Future<Output = Result<u32, RuntimeError>> + Send;

    /// CPU seconds and memory bytes container `id` used, from its cgroup;
    /// `None` when it has none (not running) or the runtime cannot tell.
    fn usage(&self, id: &str) -> Option<(f64, u64)> {
        let _ = id;
        None
    }
}

impl AgentRuntime for Containerd {
    async fn pull(
        &self,
        registry: &RegistryClient,
        reference: &str,
        progress: &(dyn Fn(PullProgress) + Send + Sync),
    ) -> Result<ImageRef, RuntimeError> {
        Containerd::pull(self, registry, reference, progress).await
    }

    fn exec_streaming(
        &self,
        id: &str,
        argv: &[String],
        timeout: Duration,
        out: tokio::sync::mpsc::Sender<Vec<u8>>,
    ) -> impl Future<Output = Result<u32, RuntimeError>> + Send {
        Containerd::exec_streaming(self, id, argv, timeout, out)
    }

    fn usage(&self, id: &str) -> Option<(f64, u64)> {
        Containerd::usage(self, id).map(|u| (u.cpu_ns as f64 / 1e9, u.memory_bytes))
    }
}
