//! What can go wrong when a replica's network is made or taken down.

use std::path::PathBuf;

/// A failure of the node's container networking.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A CNI plugin refused or failed.
    #[error("CNI plugin {plugin} ({command}) for {container}: {message}")]
    Plugin {
        /// The plugin's type (`bridge`, `portmap`, ...).
        plugin: String,
        /// `ADD`, `CHECK` or `DEL`.
        command: &'static str,
        /// The container the call was for.
        container: String,
        /// The plugin's own error (its `msg` and `details`), or how it ended.
        message: String,
    },
    /// An `iptables` call failed.
    #[error("iptables {args}: {message}")]
    Firewall {
        /// The arguments.
        args: String,
        /// What iptables said.
        message: String,
    },
    /// A network namespace could not be made, entered or removed.
    #[error("network namespace {name}: {message}")]
    Namespace {
        /// The namespace's name (the container id).
        name: String,
        /// Why.
        message: String,
    },
    /// The node's network settings cannot work here.
    #[error("{field}: {message}")]
    Config {
        /// The setting.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
}

impl NetworkError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
