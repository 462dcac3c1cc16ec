//! The agent's container runtime: OCI runtime specs with limits and
//! sandboxing (seccomp allow-lists, capabilities, AppArmor and SELinux where
//! the host has them), built from what the workload asks and what the node
//! allows.

mod host;
mod model;
pub mod seccomp;
mod spec;

pub use host::HostSecurity;
pub use model::{
    ContainerConfig, ImageProcess, Limits, NodePolicy, Notice, SeccompProfile, SecurityContext,
};
pub use spec::{build as build_spec, BuiltSpec, DEFAULT_APPARMOR_PROFILE};

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
