//! The agent's half of workloads: keep a `WatchAssignments` stream open to
//! any coordinator, run what it assigns through containerd (pulling images,
//! supervising containers), stop what it no longer assigns, and report
//! replica states back in batches. Without a coordinator the agent keeps
//! running (and restarting) what it was last assigned.
//!
//! `plan` decides (pure: assignments against what runs), `runner` executes
//! its decisions, one `replica` task per replica (pull, secrets, volumes,
//! supervise), on any [`AgentRuntime`]; `spec` and `status` translate
//! between the manifest, the runtime and the wire. This file is the loop
//! that talks to the coordinators.

mod config;
#[cfg(test)]
pub(crate) mod fake_runtime;
mod network;
mod plan;
mod replica;
mod runner;
mod runtime;
mod spec;
mod status;

use std::sync::Arc;
use std::time::Duration;

use cloudless_proto::v1 as pb;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{AgentError, Coordinators, NodeIdentity};

pub use crate::tunnel::tunnel;
pub use config::{NetworkSettings, RuntimeConfig, SecurityPolicyConfig};
pub(crate) use replica::Statuses as SharedStatuses;
pub use runner::Runner;
pub(crate) use runner::SharedProxy;
pub use runtime::{AgentRuntime, ReplicaUsage};
pub use spec::{container_id, DEFAULT_PIDS_LIMIT};

/// How often changed replica states are sent (one call for all of them).
const REPORT_EVERY: Duration = Duration::from_millis(250);

/// When the agent last heard from a coordinator (a heartbeat answer).
#[derive(Debug, Clone)]
pub struct Contact(Arc<std::sync::Mutex<std::time::Instant>>);

impl Default for Contact {
    fn default() -> Self {
        Self(Arc::new(std::sync::Mutex::new(std::time::Instant::now())))
    }
}

impl Contact {
    /// Records contact now.
    pub fn touch(&self) {
        if let Ok(mut t) = self.0.lock() {
            *t = std::time::Instant::now();
        }
    }

    /// Time since the last contact.
    pub fn elapsed(&self) -> Duration {
        self.0.lock().map_or(Duration::ZERO, |t| t.elapsed())
    }
}

/// Keeps the assignment stream open and the runner in step with it, and
/// reports replica states, until `cancel` or the node's removal.
pub async fn run(
    addresses: Vec<String>,
    mut identity: watch::Receiver<NodeIdentity>,
    mut runner: Runner,
    contact: Contact,
    cancel: CancellationToken,
) -> Result<(), AgentError> {
    runner.set_secrets(Some(Arc::new(crate::secrets::SecretFetcher::new(
        addresses.clone(),
        identity.clone(),
        runner.secret_refresh,
    ))));
    for address in &addresses {
        tokio::spawn(tunnel(
            address.clone(),
            identity.clone(),
            runner.runtime(),
            cancel.child_token(),
        ));
    }
    let mut coordinators = Coordinators::new(addresses, identity.borrow_and_update().clone());
    let mut report = tokio::time::interval(REPORT_EVERY);
    report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if identity.has_changed().unwrap_or(false) {
            coordinators.set_identity(identity.borrow_and_update().clone());
        }
        let opened = tokio::select! {
            r = coordinators.call("watch assignments", |mut c| async move {
                c.watch_assignments(pb::WatchAssignmentsRequest { since_revision: 0 }).await
            }) => r,
            () = cancel.cancelled() => return Ok(()),
        };
        let mut stream = match opened {
            Ok(s) => s,
            Err(AgentError::Removed(m)) => {
                runner.stop_all().await;
                return Err(AgentError::Removed(m));
            }
            Err(e) => {
                tracing::warn!(error = %e, running = runner.len(), "no assignment stream; keeping what runs");
                runner.enforce_disconnect(contact.elapsed()).await;
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    () = cancel.cancelled() => return Ok(()),
                }
            }
        };
        loop {
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                msg = stream.message() => match msg {
                    Ok(Some(set)) => tokio::select! {
                        () = runner.apply(&set) => {}
                        () = cancel.cancelled() => return Ok(()),
                    },
                    Ok(None) => {
                        tracing::info!("assignment stream ended; reopening");
                        break;
                    }
                    Err(s) if crate::client::is_removal(&s) => {
                        runner.stop_all().await;
                        return Err(AgentError::Removed(s.message().to_owned()));
                    }
                    Err(s) => {
                        tracing::warn!(error = %s.message(), "assignment stream failed; reopening");
                        break;
                    }
                },
                _ = report.tick() => {
                    let without = contact.elapsed();
                    runner.enforce_disconnect(without).await;
                    if runner.should_resync(without) {
                        // Back in touch: a fresh full set restarts what is
                        // still assigned here.
                        tracing::info!("coordinators reachable again; resyncing assignments");
                        break;
                    }
                    let changed = runner.changed();
                    let events = runner.events();
                    if changed.is_empty() && events.is_empty() {
                        continue;
                    }
                    let req = pb::ReportStatusRequest { replicas: changed.clone(), events };
                    match coordinators.call("status report", |mut c| {
                        let r = req.clone();
                        async move { c.report_status(r).await }
                    }).await {
                        Ok(_) => runner.reported(changed),
                        Err(AgentError::Removed(m)) => {
                            runner.stop_all().await;
                            return Err(AgentError::Removed(m));
                        }
                        Err(e) => {
                            runner.unreported(req.events);
                            tracing::warn!(error = %e, "status report failed; will resend");
                        }
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
