//! What the agent needs from the node's container runtime: the runtime
//! crate's [`ContainerRuntime`] (run, wait, stop, probe), plus pulling
//! images from registries and streaming a command's output. `Containerd` is
//! the implementation; the unit tests have an in-memory one.

use std::future::Future;
use std::time::Duration;

use cloudless_runtime::registry::{PullProgress, RegistryClient};
use cloudless_runtime::{ContainerRuntime, Containerd, ImageRef, RuntimeError};

/// What a running replica uses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReplicaUsage {
    /// CPU time so far, seconds.
    pub cpu_seconds: f64,
    /// Memory in use, bytes.
    pub memory_bytes: u64,
    /// Bytes received and sent by its network namespace (not loopback);
    /// `None` on the host's network.
    pub network: Option<(u64, u64)>,
}

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

    /// What container `id` uses, from its cgroup and network namespace;
    /// `None` when it has none (not running) or the runtime cannot tell.
    fn usage(&self, id: &str) -> Option<ReplicaUsage> {
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

    fn usage(&self, id: &str) -> Option<ReplicaUsage> {
        Containerd::usage(self, id).map(|u| ReplicaUsage {
            cpu_seconds: u.cpu_ns as f64 / 1e9,
            memory_bytes: u.memory_bytes,
            network: u.network,
        })
    }
}
