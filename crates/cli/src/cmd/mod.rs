//! The commands, one module per family, each with a `run` taking its
//! arguments and the [`Ctx`] every command shares.

use cloudless_proto::v1::{ReadConsistency, ReadOptions};

use crate::client::Target;
use crate::output::Output;

pub(crate) mod admin;
pub(crate) mod cluster;
pub(crate) mod describe;
pub(crate) mod events;
pub(crate) mod exec;
pub(crate) mod logs;
pub(crate) mod node;
pub(crate) mod rollout;
pub(crate) mod secrets;
pub(crate) mod service;
pub(crate) mod token;
pub(crate) mod workload;

/// What every command needs: where to connect and how to print.
#[derive(Debug)]
pub(crate) struct Ctx {
    /// The coordinators, with mTLS when configured.
    pub(crate) target: Target,
    /// The format chosen with `-o`.
    pub(crate) output: Output,
    /// `--stale`: reads are served from the answering coordinator's local
    /// state.
    pub(crate) stale: bool,
}

impl Ctx {
    /// The read options of a request: linearizable, or `--stale`.
    pub(crate) fn read_opts(&self) -> Option<ReadOptions> {
        Some(ReadOptions {
            consistency: if self.stale {
                ReadConsistency::Stale
            } else {
                ReadConsistency::Linearizable
            } as i32,
        })
    }
}

/// Parses 90, 90s, 30m, 1h, 7d into seconds (positive).
pub(crate) fn parse_duration(s: &str) -> Result<u64, String> {
    match cloudless_types::parse_duration_secs(s)? {
        0 => Err(format!("{s:?} must be a positive duration")),
        n => Ok(n),
    }
}
