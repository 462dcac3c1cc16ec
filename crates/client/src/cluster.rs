//! A client of a coordinator cluster: tries the coordinators in turn,
//! follows leader hints, retries with jittered backoff and keeps one channel
//! per address.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Mutex, PoisonError};

use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::{
    channel, Backoff, BackoffPolicy, ChannelOptions, ClientTls, EndpointError, HostPort,
    HostPortError, LeaderFollower,
};

/// When to try again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per call. `None` (the default): twice the number of
    /// configured addresses plus two, so each is tried and a leader hint
    /// can be followed.
    pub max_attempts: Option<usize>,
    /// The pauses between attempts that do not follow a leader hint.
    /// Default: [`BackoffPolicy::default`].
    pub backoff: BackoffPolicy,
    /// The answers after which another attempt is made. Default: `Unavailable`.
    pub retry_on: Vec<Code>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: None,
            backoff: BackoffPolicy::default(),
            retry_on: vec![Code::Unavailable],
        }
    }
}

/// How a [`Cluster`] connects and retries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterOptions {
    /// Channel settings. Default: [`ChannelOptions::default`].
    pub channel: ChannelOptions,
    /// Retry settings. Default: [`RetryPolicy::default`].
    pub retry: RetryPolicy,
}

/// Why a call through a [`Cluster`] failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No coordinator address is configured.
    #[error("no coordinator address given")]
    NoServers,
    /// An address (configured or from a leader hint) is not `host:port`.
    #[error(transparent)]
    Address(#[from] HostPortError),
    /// A channel could not be set up.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// A coordinator answered with a status that is not retried.
    #[error("{address}: {}", .status.message())]
    Refused {
        /// The coordinator that answered.
        address: String,
        /// Its answer.
        status: Status,
    },
    /// Every attempt ended in a retried status.
    #[error("no coordinator could serve the call in {attempts} attempts; the last, {address}: {}", .status.message())]
    Exhausted {
        /// The coordinator of the last attempt.
        address: String,
        /// The attempts made.
        attempts: usize,
        /// The last answer.
        status: Status,
    },
}

impl CallError {
    /// The coordinator's answer, if one came.
    pub fn status(&self) -> Option<&Status> {
        match self {
            Self::Refused { status, .. } | Self::Exhausted { status, .. } => Some(status),
            _ => None,
        }
    }
}

#[derive(Debug)]
struct State {
    follower: LeaderFollower,
    channels: HashMap<String, Channel>,
}

/// A client of the coordinators at a list of addresses.
#[derive(Debug)]
pub struct Cluster {
    options: ClusterOptions,
    tls: Option<ClientTls>,
    state: Mutex<State>,
}

impl Cluster {
    /// A client of the coordinators at `servers` (`host:port`, tried in
    /// order): mTLS with `tls`, plaintext without.
    pub fn new(servers: Vec<String>, tls: Option<ClientTls>, options: ClusterOptions) -> Self {
        Self {
            options,
            tls,
            state: Mutex::new(State {
                follower: LeaderFollower::new(servers),
                channels: HashMap::new(),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is consistent after every statement: a panic elsewhere
        // cannot leave it half-changed.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The configured addresses.
    pub fn servers(&self) -> Vec<String> {
        self.state().follower.addresses().to_vec()
    }

    /// The credentials in use, if TLS is on.
    pub fn tls(&self) -> Option<&ClientTls> {
        self.tls.as_ref()
    }

    /// Switches credentials; later calls open new connections with them.
    pub fn set_tls(&mut self, tls: Option<ClientTls>) {
        self.tls = tls;
        self.state().channels.clear();
    }

    /// The last known leader.
    pub fn preferred(&self) -> Option<String> {
        self.state().follower.preferred().map(str::to_owned)
    }

    /// The (cached, lazily connected) channel to `address`.
    pub fn channel(&self, address: &str) -> Result<Channel, CallError> {
        if let Some(c) = self.state().channels.get(address) {
            return Ok(c.clone());
        }
        let hp = HostPort::parse(address)?;
        let tls = self.tls.as_ref().map(|t| t.config_for(&hp));
        let ch = channel(&hp, tls, &self.options.channel)?;
        self.state().channels.insert(address.to_owned(), ch.clone());
        Ok(ch)
    }

    /// After `address` could not serve a call: drop its channel, follow the
    /// leader hint in `status` or move on to the next configured address.
    /// Returns whether a hint is being followed.
    pub fn failed(&self, address: &str, status: &Status) -> bool {
        let mut state = self.state();
        state.channels.remove(address);
        state.follower.failed(address, status)
    }

    /// Calls `f` with a channel to the leader: the last known one, else each
    /// address in turn, following leader hints. Answers listed in
    /// [`RetryPolicy::retry_on`] lead to another attempt, after a jittered
    /// pause unless a hint is followed; any other error is returned at once.
    pub async fn call<T, F, Fut>(&self, mut f: F) -> Result<T, CallError>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let configured = self.state().follower.addresses().len();
        if configured == 0 {
            return Err(CallError::NoServers);
        }
        let retry = &self.options.retry;
        let attempts = retry.max_attempts.unwrap_or(configured * 2 + 2).max(1);
        let mut backoff = Backoff::new(retry.backoff);
        let mut last = None;
        for attempt in 1..=attempts {
            let address = self
                .state()
                .follower
                .current()
                .map(str::to_owned)
                .ok_or(CallError::NoServers)?;
            let ch = self.channel(&address)?;
            match f(ch).await {
                Ok(r) => {
                    self.state().follower.succeeded(&address);
                    return Ok(r.into_inner());
                }
                Err(status) if retry.retry_on.contains(&status.code()) => {
                    let following = self.failed(&address, &status);
                    last = Some((address, status));
                    if !following && attempt < attempts {
                        backoff.wait().await;
                    }
                }
                Err(status) => return Err(CallError::Refused { address, status }),
            }
        }
        let (address, status) = last.expect("at least one attempt was made and retried");
        Err(CallError::Exhausted {
            address,
            attempts,
            status,
        })
    }
}

#[cfg(test)]
#[path = "cluster_test.rs"]
mod tests;
