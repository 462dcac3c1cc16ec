//! Keeps one replica's container running the way its workload asks:
//! restart policy with exponential back-off, OOM kills reported, liveness
//! probes that restart the container, readiness probes that gate traffic,
//! and adoption of a container that already runs (after an agent restart).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::probe::{check, Probe};
use crate::{ContainerConfig, ContainerRuntime, ImageRef, NodePolicy, RuntimeError, TaskState};

/// When an exited container is started again: the workload's own type.
/// `Always` restarts also after a clean exit, `OnFailure` after a non-zero
/// exit or a liveness failure, `Never` never.
pub use cloudless_types::RestartPolicy;

/// Restart delays: doubling from `initial` up to `max`; back to `initial`
/// once a container has run for `reset_after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// First delay.
    pub initial: Duration,
    /// Largest delay.
    pub max: Duration,
    /// A run this long resets the delay.
    pub reset_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(300),
            reset_after: Duration::from_secs(600),
        }
    }
}

/// One replica to keep running.
#[derive(Debug, Clone)]
pub struct ReplicaSpec {
    /// The container.
    pub container: ContainerConfig,
    /// Its image (imported or pulled).
    pub image: ImageRef,
    /// Restart policy.
    pub restart: RestartPolicy,
    /// Restarts the container after `failure_threshold` failures.
    pub liveness: Option<Probe>,
    /// Decides `ready`.
    pub readiness: Option<Probe>,
    /// SIGTERM-to-SIGKILL grace when stopping.
    pub stop_grace: Duration,
}

/// Where a replica is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaPhase {
    /// Being created.
    Starting,
    /// Its process runs.
    Running,
    /// Exited; waiting before the next start.
    BackOff,
    /// Exited and will not be restarted.
    Exited,
    /// Cannot be started (the message says why).
    Failed,
}

/// How the last run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LastExit {
    /// Exit status.
    pub code: u32,
    /// Killed by the kernel's OOM killer.
    pub oom_killed: bool,
    /// Restarted because its liveness probe failed.
    pub liveness_failed: bool,
}

/// What the supervisor reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaStatus {
    /// Phase.
    pub phase: ReplicaPhase,
    /// Readiness (always true without a readiness probe while running).
    pub ready: bool,
    /// Restarts so far.
    pub restarts: u32,
    /// Host pid of the running container's init process.
    pub pid: Option<u32>,
    /// The last exit.
    pub last_exit: Option<LastExit>,
    /// Container processes that ended so far (a stop the supervisor was
    /// asked for is not counted).
    pub exits: u32,
    /// Human-readable detail.
    pub message: String,
}

/// Probe results of every replica a supervisor runs, counted as they come.
#[derive(Debug, Default)]
pub struct ProbeCounts {
    /// Liveness probes that passed.
    pub liveness_success: std::sync::atomic::AtomicU64,
    /// Liveness probes that failed (the container restarts after its
    /// probe's failure threshold).
    pub liveness_failure: std::sync::atomic::AtomicU64,
    /// Readiness probes that passed.
    pub readiness_success: std::sync::atomic::AtomicU64,
    /// Readiness probes that failed.
    pub readiness_failure: std::sync::atomic::AtomicU64,
}

impl ProbeCounts {
    fn count(counter: &std::sync::atomic::AtomicU64) {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Runs replicas on one container runtime.
#[derive(Debug, Clone)]
pub struct Supervisor<R> {
    rt: R,
    node: NodePolicy,
    rotation: crate::logs::Rotation,
    probes: Arc<ProbeCounts>,
}

enum Ended {
    Exited(u32),
    LivenessFailed(String),
    Cancelled,
}

impl<R: ContainerRuntime> Supervisor<R> {
    /// A supervisor for containers on `rt` under `node`'s policy.
    pub fn new(rt: R, node: NodePolicy) -> Self {
        Self {
            rt,
            node,
            rotation: crate::logs::Rotation::default(),
            probes: Arc::default(),
        }
    }

    /// The probe results of every replica this supervisor (and its clones)
    /// runs.
    pub fn probe_counts(&self) -> Arc<ProbeCounts> {
        self.probes.clone()
    }

    /// Rotates container logs with `r` instead of the default (10 MiB, 3 kept).
    pub fn with_log_rotation(mut self, r: crate::logs::Rotation) -> Self {
        self.rotation = r;
        self
    }

    /// After an agent restart: removes managed containers that are not in
    /// `desired` and returns the desired ones that still run (their
    /// supervisors adopt them instead of starting new ones).
    pub async fn adopt(&self, desired: &[String]) -> Result<Vec<String>, RuntimeError> {
        let mut adopted = Vec::new();
        for id in self.rt.managed().await? {
            let running = matches!(self.rt.task_state(&id).await?, TaskState::Running(_));
            if desired.contains(&id) && running {
                adopted.push(id);
            } else if !desired.contains(&id) {
                tracing::info!(container = %id, "removing a container this node no longer runs");
                if running {
                    let _ = self.rt.stop(&id, Duration::from_secs(10)).await;
                }
                self.rt.remove(&id).await;
            } else {
                // Desired but exited while we were away: start afresh.
                self.rt.remove(&id).await;
            }
        }
        Ok(adopted)
    }

    /// Keeps `spec` running until `cancel` fires (then stops and removes it).
    pub fn run(
        &self,
        spec: ReplicaSpec,
        backoff: Backoff,
        cancel: CancellationToken,
    ) -> (watch::Receiver<ReplicaStatus>, JoinHandle<()>) {
        let (tx, rx) = watch::channel(ReplicaStatus {
            phase: ReplicaPhase::Starting,
            ready: false,
            restarts: 0,
            pid: None,
            last_exit: None,
            exits: 0,
            message: String::new(),
        });
        let this = self.clone();
        let task = tokio::spawn(async move { this.supervise(spec, backoff, cancel, tx).await });
        (rx, task)
    }

    async fn supervise(
        &self,
        spec: ReplicaSpec,
        backoff: Backoff,
        cancel: CancellationToken,
        tx: watch::Sender<ReplicaStatus>,
    ) {
        let id = spec.container.id.clone();
        let mut delay = backoff.initial;
        loop {
            let pid = match self.rt.task_state(&id).await {
                Ok(TaskState::Running(pid)) => {
                    tracing::info!(container = %id, pid, "adopted a running container");
                    if let Err(e) = self.rt.reattach_output(&id) {
                        tracing::warn!(container = %id, error = %e, "cannot collect the adopted container's output");
                    }
                    pid
                }
                _ => match self
                    .rt
                    .start(&spec.container, &spec.image, &self.node)
                    .await
                {
                    Ok(started) => started.pid,
                    Err(e @ RuntimeError::Spec(_)) => {
                        tx.send_modify(|s| {
                            s.phase = ReplicaPhase::Failed;
                            s.message = e.to_string();
                        });
                        return;
                    }
                    Err(e) => {
                        tx.send_modify(|s| {
                            s.phase = ReplicaPhase::BackOff;
                            s.message = format!("start failed: {e}");
                        });
                        tokio::select! {
                            () = cancel.cancelled() => return,
                            () = tokio::time::sleep(delay) => {}
                        }
                        delay = (delay * 2).min(backoff.max);
                        continue;
                    }
                },
            };
            let started_at = Instant::now();
            tx.send_modify(|s| {
                s.phase = ReplicaPhase::Running;
                s.pid = Some(pid);
                s.ready = spec.readiness.is_none();
                s.message.clear();
            });
            let rotation = {
                let (path, r) = (self.rt.log_path(&id), self.rotation);
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        if let Err(e) = crate::logs::rotate_if_needed(&path, r) {
                            tracing::warn!(error = %e, "log rotation failed");
                        }
                    }
                })
            };
            let readiness = spec.readiness.clone().map(|p| {
                let (rt, id, tx) = (self.rt.clone(), id.clone(), tx.clone());
                let counts = self.probes.clone();
                tokio::spawn(async move { readiness_loop(&rt, &id, pid, &p, &tx, &counts).await })
            });
            let ended = tokio::select! {
                r = self.rt.wait(&id) => Ended::Exited(r.map_or(255, |e| e.code)),
                m = liveness_loop(&self.rt, &id, pid, spec.liveness.as_ref(), &self.probes) => Ended::LivenessFailed(m),
                () = cancel.cancelled() => Ended::Cancelled,
            };
            if let Some(r) = readiness {
                r.abort();
            }
            rotation.abort();
            let (code, liveness_failed) = match ended {
                Ended::Cancelled => {
                    let _ = self.rt.stop(&id, spec.stop_grace).await;
                    self.rt.remove(&id).await;
                    tx.send_modify(|s| {
                        s.phase = ReplicaPhase::Exited;
                        s.ready = false;
                        s.pid = None;
                    });
                    return;
                }
                Ended::Exited(code) => (code, false),
                Ended::LivenessFailed(why) => {
                    tracing::warn!(container = %id, %why, "liveness probe failed; restarting");
                    let code = self
                        .rt
                        .stop(&id, spec.stop_grace)
                        .await
                        .map_or(255, |e| e.code);
                    (code, true)
                }
            };
            let oom_killed = self.rt.oom_killed(&id, code).await;
            self.rt.remove(&id).await;
            let exit = LastExit {
                code,
                oom_killed,
                liveness_failed,
            };
            let again = match spec.restart {
                RestartPolicy::Always => true,
                RestartPolicy::OnFailure => code != 0 || liveness_failed,
                RestartPolicy::Never => false,
            };
            let message = if oom_killed {
                format!("exited {code}: OOM-killed (memory limit)")
            } else if liveness_failed {
                format!("restarted: liveness probe failed (exit {code})")
            } else {
                format!("exited {code}")
            };
            tracing::info!(container = %id, code, oom_killed, liveness_failed, restart = again, "container ended");
            if !again {
                tx.send_modify(|s| {
                    s.phase = ReplicaPhase::Exited;
                    s.ready = false;
                    s.pid = None;
                    s.last_exit = Some(exit);
                    s.exits += 1;
                    s.message = message;
                });
                return;
            }
            if started_at.elapsed() >= backoff.reset_after {
                delay = backoff.initial;
            }
            tx.send_modify(|s| {
                s.phase = ReplicaPhase::BackOff;
                s.ready = false;
                s.pid = None;
                s.last_exit = Some(exit);
                s.exits += 1;
                s.restarts += 1;
                s.message = format!("{message}; restarting in {delay:?}");
            });
            tokio::select! {
                () = cancel.cancelled() => {
                    tx.send_modify(|s| s.phase = ReplicaPhase::Exited);
                    return;
                }
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(backoff.max);
        }
    }
}

/// Resolves when the liveness probe has failed `failure_threshold` times in a row.
async fn liveness_loop<R: ContainerRuntime>(
    rt: &R,
    id: &str,
    pid: u32,
    probe: Option<&Probe>,
    counts: &ProbeCounts,
) -> String {
    let Some(p) = probe else {
        return std::future::pending().await;
    };
    tokio::time::sleep(p.initial_delay).await;
    let mut failures = 0;
    loop {
        match check(rt, id, pid, &p.action, p.timeout).await {
            Ok(()) => {
                ProbeCounts::count(&counts.liveness_success);
                failures = 0;
            }
            Err(why) => {
                ProbeCounts::count(&counts.liveness_failure);
                failures += 1;
                if failures >= p.failure_threshold.max(1) {
                    return why;
                }
            }
        }
        tokio::time::sleep(p.period).await;
    }
}

/// Updates `ready` from the readiness probe until aborted.
async fn readiness_loop<R: ContainerRuntime>(
    rt: &R,
    id: &str,
    pid: u32,
    p: &Probe,
    tx: &watch::Sender<ReplicaStatus>,
    counts: &ProbeCounts,
) {
    tokio::time::sleep(p.initial_delay).await;
    let (mut ok, mut bad) = (0u32, 0u32);
    loop {
        match check(rt, id, pid, &p.action, p.timeout).await {
            Ok(()) => {
                ProbeCounts::count(&counts.readiness_success);
                ok += 1;
                bad = 0;
                if ok >= p.success_threshold.max(1) {
                    tx.send_if_modified(|s| {
                        let was = std::mem::replace(&mut s.ready, true);
                        let had_message = s.message.starts_with("readiness probe failed");
                        if had_message {
                            s.message.clear();
                        }
                        !was || had_message
                    });
                }
            }
            Err(e) => {
                ProbeCounts::count(&counts.readiness_failure);
                bad += 1;
                ok = 0;
                tracing::debug!(container = %id, error = %e, "readiness probe failed");
                if bad >= p.failure_threshold.max(1) {
                    let message = format!("readiness probe failed: {e}");
                    tx.send_if_modified(|s| {
                        let was = std::mem::replace(&mut s.ready, false);
                        let changed = s.message != message;
                        s.message.clone_from(&message);
                        was || changed
                    });
                }
            }
        }
        tokio::time::sleep(p.period).await;
    }
}
