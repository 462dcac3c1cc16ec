//! The agent's container runtime: OCI runtime specs with limits and
//! sandboxing (seccomp allow-lists, capabilities, AppArmor and SELinux where
//! the host has them), built from what the workload asks and what the node
//! allows.

pub mod apparmor;
mod containerd;
mod host;
mod host_path;
pub mod image;
pub mod logs;
mod model;
pub mod policy;
pub mod probe;
pub mod registry;
mod runtime_trait;
pub mod seccomp;
mod spec;
mod supervisor;
pub mod test_support;

use std::path::Path;

pub use apparmor::AppArmorError;
pub use containerd::{
    network_bytes, Containerd, Exit, ImageRef, Started, TaskState, Usage, MANAGED_LABEL,
};
pub use host::HostSecurity;
pub use host_path::HeldHostPaths;
pub use model::{
    ContainerConfig, ImageProcess, Limits, Mount, MountSource, NodePolicy, Notice, SeccompProfile,
    SecurityContext,
};
pub use runtime_trait::ContainerRuntime;
pub use spec::{build as build_spec, process_ids, BuiltSpec, DEFAULT_APPARMOR_PROFILE};
pub use supervisor::{
    Backoff, LastExit, ProbeCounts, ReplicaPhase, ReplicaSpec, ReplicaStatus, RestartPolicy,
    Supervisor,
};

/// Why a container cannot be specified.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The request or the node policy forbids it; names the field.
    #[error("{field}: {problem}")]
    Invalid {
        /// Field path, e.g. `securityContext.runAsNonRoot`.
        field: String,
        /// What is wrong.
        problem: String,
    },
    /// A bug: the generated spec does not decode.
    #[error("internal: {0}")]
    Internal(String),
}

/// Why a runtime operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The container cannot be specified (names the field).
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// containerd is not reachable.
    #[error("containerd is not reachable: {0}")]
    Unavailable(String),
    /// containerd refused a call.
    #[error("containerd: {what}: {message} ({code:?})")]
    Containerd {
        /// The step.
        what: String,
        /// gRPC code.
        code: tonic::Code,
        /// containerd's message.
        message: String,
    },
    /// An image archive or registry answer is unusable.
    #[error("image {source_name}: {problem}")]
    BadImage {
        /// Archive path or reference.
        source_name: String,
        /// What is wrong.
        problem: String,
    },
    /// The registry has no such image (or tag).
    #[error("image {reference} not found in its registry")]
    ImageNotFound {
        /// The reference as normalised.
        reference: String,
    },
    /// A registry refused, failed or sent something unusable.
    #[error("registry {registry} ({reference}): {problem}")]
    Registry {
        /// Host.
        registry: String,
        /// The image reference.
        reference: String,
        /// What went wrong.
        problem: String,
    },
    /// A local file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// An operation ran out of time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// A bug.
    #[error("internal: {0}")]
    Internal(String),
}

impl RuntimeError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.display().to_string(),
            source,
        }
    }
}
