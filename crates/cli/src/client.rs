//! Talking to the coordinators: which servers (`--server`, the config file,
//! the default), mTLS from the `--config` file, the [`call`] helper that
//! follows the leader, and how a failed call maps to an exit code.
//!
//! Channels, `host:port` parsing and leader hints are `cloudless-client`'s
//! ([`Cluster`]); this module only chooses its settings for `cloudlessctl`.

use std::path::Path;
use std::time::Duration;

use cloudless_client::{
    BackoffPolicy, CallError, ChannelOptions, ClientConfig, Cluster, ClusterOptions,
    CredentialPaths, RetryPolicy,
};
use tonic::transport::Channel;
use tonic::Code;

use crate::Exit;

/// Where and how to connect: the coordinators, with mTLS when configured.
pub(crate) type Target = Cluster;

/// The coordinator tried when neither `--server` nor the config file names one.
const DEFAULT_SERVER: &str = "127.0.0.1:7400";

/// A failure with its exit code.
#[derive(Debug)]
pub(crate) struct Failure {
    /// The process exit code: an [`Exit`], or the code of `exec`'s command.
    pub(crate) code: u8,
    /// What is printed after `cloudlessctl: `.
    pub(crate) error: anyhow::Error,
}

impl Failure {
    /// A failure exiting with `exit`.
    pub(crate) fn new(exit: Exit, error: anyhow::Error) -> Self {
        Failure {
            code: exit.code(),
            error,
        }
    }

    /// Bad usage or input (exit code 2).
    pub(crate) fn usage(message: &str) -> Self {
        Failure::new(Exit::Usage, anyhow::anyhow!("{message}"))
    }
}

/// Local errors (reading files, parsing, writing JSON) are bad usage or
/// input: exit code 2.
impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure::new(Exit::Usage, e.into())
    }
}

/// The coordinators and the credentials to renew, from `--server` and the
/// `--config` file: `--server` (comma-separated) wins, then the file's
/// `servers`, then [`DEFAULT_SERVER`].
pub(crate) fn connect(
    server: Option<&str>,
    config: Option<&Path>,
) -> Result<(Target, Option<CredentialPaths>), Failure> {
    let (file_servers, tls, paths) = match config {
        Some(p) => {
            let c = ClientConfig::load(p)?;
            (c.servers, c.tls, c.credential_paths)
        }
        None => (Vec::new(), None, None),
    };
    let servers = servers(server, file_servers);
    Ok((Target::new(servers, tls, cluster_options()), paths))
}

/// The server list: `--server` split at commas (empty items dropped), else
/// the config file's, else [`DEFAULT_SERVER`].
fn servers(flag: Option<&str>, file_servers: Vec<String>) -> Vec<String> {
    match flag {
        Some(s) => s
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect(),
        None if !file_servers.is_empty() => file_servers,
        None => vec![DEFAULT_SERVER.to_owned()],
    }
}

/// How `cloudlessctl` connects: 2 s to connect, 30 s per call; a call that
/// finds no leader is retried (every server, twice, then once more) with
/// pauses of at most 0.5 s.
fn cluster_options() -> ClusterOptions {
    ClusterOptions {
        channel: ChannelOptions::default(),
        retry: RetryPolicy {
            backoff: BackoffPolicy {
                base: Duration::from_millis(100),
                cap: Duration::from_millis(500),
            },
            ..RetryPolicy::default()
        },
    }
}

/// Calls `f` on the leader: each server in turn, following leader hints and
/// retrying `Unavailable` answers (see [`cluster_options`]).
pub(crate) async fn call<T, F, Fut>(target: &Target, f: F) -> Result<T, Failure>
where
    F: FnMut(Channel) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    target
        .call(f)
        .await
        .map_err(|e| call_failure(e, target.tls().is_none()))
}

/// The failure of an answer (or a stream message) that is an error:
/// `Unavailable` exits 3, any other code 1.
pub(crate) fn status_failure(s: tonic::Status) -> Failure {
    let exit = if s.code() == Code::Unavailable {
        Exit::Unavailable
    } else {
        Exit::Failed
    };
    Failure::new(
        exit,
        anyhow::anyhow!("{}: {}", code_name(s.code()), s.message()),
    )
}

/// The words printed for a gRPC status code.
fn code_name(c: Code) -> &'static str {
    match c {
        Code::InvalidArgument => "invalid argument",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::FailedPrecondition => "failed precondition",
        Code::Aborted => "conflict",
        Code::Unavailable => "unavailable",
        Code::Unimplemented => "not implemented",
        Code::DeadlineExceeded => "timed out",
        _ => "error",
    }
}

/// The failure (and exit code) of a call that found no answer.
fn call_failure(e: CallError, plaintext: bool) -> Failure {
    match e {
        CallError::Exhausted { status, .. } => status_failure(status),
        CallError::Refused { status, .. } => {
            let mut f = status_failure(status);
            if plaintext && f.error.to_string().contains("h2 protocol error") {
                f.error = f.error.context(
                    "the coordinator speaks mTLS: pass --config <data_dir>/admin/cloudlessctl.toml (written by `cloudless-coordinator init`)",
                );
            }
            f
        }
        CallError::NoServers => Failure::usage("--server: no coordinator address given"),
        CallError::Address(e) => Failure::new(Exit::Usage, anyhow::anyhow!("--server: {e}")),
        CallError::Endpoint(e) => Failure::new(Exit::Usage, anyhow::Error::new(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_errors_keep_their_exit_codes() {
        let exhausted = call_failure(
            CallError::Exhausted {
                address: "a:1".into(),
                attempts: 4,
                status: tonic::Status::unavailable("no leader"),
            },
            false,
        );
        assert_eq!(exhausted.code, 3);
        assert_eq!(exhausted.error.to_string(), "unavailable: no leader");
        let refused = call_failure(
            CallError::Refused {
                address: "a:1".into(),
                status: tonic::Status::not_found("no workload web"),
            },
            false,
        );
        assert_eq!(refused.code, 1);
        assert_eq!(refused.error.to_string(), "not found: no workload web");
        assert_eq!(call_failure(CallError::NoServers, false).code, 2);
        let bad = call_failure(
            CallError::Address(cloudless_client::HostPort::parse("::1:7400").expect_err("v6")),
            false,
        );
        assert_eq!(bad.code, 2);
        assert!(
            bad.error.to_string().starts_with("--server: \"::1:7400\""),
            "{:#}",
            bad.error
        );
    }

    #[test]
    fn the_server_flag_wins_over_the_config_file_and_the_default_comes_last() {
        let file = vec!["f:1".to_owned()];
        assert_eq!(servers(Some(" a:1, ,b:2 "), file.clone()), ["a:1", "b:2"]);
        assert!(servers(Some(","), file.clone()).is_empty());
        assert_eq!(servers(None, file), ["f:1"]);
        assert_eq!(servers(None, Vec::new()), [DEFAULT_SERVER]);
    }
}
