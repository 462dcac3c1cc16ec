//! `cloudlessctl rollout`: a workload's rollout progress, its template
//! history and going back to an earlier template; and the wait for a
//! rollout that `apply --wait` shares.

use std::time::Duration;

use clap::Subcommand;
use cloudless_proto::v1::workload_service_client::WorkloadServiceClient;
use cloudless_proto::v1::{self as pb, WriteOptions};

use crate::client::{call, Failure, Target};
use crate::cmd::Ctx;
use crate::output::{human, now_ms};
use crate::Exit;

/// `cloudlessctl rollout` subcommands.
#[derive(Subcommand, Debug)]
pub(crate) enum RolloutCmd {
    /// Show progress (exit 0 when complete, 3 when not); --wait blocks until complete.
    Status {
        name: String,
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// The templates a workload ran (newest last) and why each was made.
    History {
        name: String,
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        /// Show this revision's spec in full.
        #[arg(long)]
        revision: Option<u64>,
    },
    /// Go back to an earlier template (the previous one by default); it
    /// rolls out as a new revision under the workload's rollout strategy.
    Undo {
        name: String,
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        /// The revision to restore.
        #[arg(long)]
        to_revision: Option<u64>,
        /// Idempotency key: a retry with the same key is applied once.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Wait until the restored template is rolled out.
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
}

/// Runs a `rollout` command.
pub(crate) async fn run(cmd: RolloutCmd, ctx: &Ctx) -> Result<(), Failure> {
    let servers = &ctx.target;
    match cmd {
        RolloutCmd::Status {
            name,
            namespace,
            wait,
            timeout,
        } => {
            let secs = if wait { timeout } else { 0 };
            wait_rollout(servers, &namespace, &name, Duration::from_secs(secs)).await?;
        }
        RolloutCmd::History {
            name,
            namespace,
            revision,
        } => {
            let read = ctx.read_opts();
            let h = call(servers, |ch| {
                let req = pb::RolloutHistoryRequest {
                    read,
                    namespace: namespace.clone(),
                    name: name.clone(),
                };
                async move { WorkloadServiceClient::new(ch).rollout_history(req).await }
            })
            .await?;
            if let Some(n) = revision {
                let Some(r) = h.revisions.iter().find(|r| r.revision == n) else {
                    let known: Vec<String> =
                        h.revisions.iter().map(|r| r.revision.to_string()).collect();
                    return Err(Failure::new(
                        Exit::Failed,
                        anyhow::anyhow!(
                            "--revision: {n} is not in the history of {namespace}/{name} (it holds {})",
                            known.join(", ")
                        ),
                    ));
                };
                let spec = cloudless_types::WorkloadSpec::from(r.spec.clone().unwrap_or_default());
                return ctx.output.print(&serde_json::json!({
                    "revision": r.revision, "appliedAtMs": r.applied_at_ms,
                    "cause": r.cause, "spec": spec,
                }));
            }
            if ctx.output.is_structured() {
                let v: Vec<_> = h
                    .revisions
                    .iter()
                    .map(|r| {
                        serde_json::json!({
                            "revision": r.revision, "appliedAtMs": r.applied_at_ms,
                            "cause": r.cause, "current": r.revision == h.current,
                            "image": r.spec.as_ref().map(|s| s.image.clone()).unwrap_or_default(),
                        })
                    })
                    .collect();
                return ctx.output.print(&serde_json::Value::Array(v));
            }
            println!(
                "{:<9} {:<8} {:<14} {:<34} CURRENT",
                "REVISION", "AGE", "CAUSE", "IMAGE"
            );
            for r in &h.revisions {
                println!(
                    "{:<9} {:<8} {:<14} {:<34} {}",
                    r.revision,
                    human((now_ms() - r.applied_at_ms).max(0) / 1000),
                    r.cause,
                    r.spec.as_ref().map(|s| s.image.as_str()).unwrap_or(""),
                    if r.revision == h.current { "*" } else { "" }
                );
            }
        }
        RolloutCmd::Undo {
            name,
            namespace,
            to_revision,
            idempotency_key,
            wait,
            timeout,
        } => {
            let write = Some(WriteOptions {
                idempotency_key: idempotency_key.unwrap_or_default(),
            });
            let r = call(servers, |ch| {
                let req = pb::RolloutUndoRequest {
                    write: write.clone(),
                    namespace: namespace.clone(),
                    name: name.clone(),
                    to_revision: to_revision.unwrap_or(0),
                };
                async move { WorkloadServiceClient::new(ch).rollout_undo(req).await }
            })
            .await?;
            let w = r.workload.unwrap_or_default();
            println!(
                "workload {}/{} rolled back to revision {} (now revision {})",
                w.namespace, w.name, r.restored, w.template
            );
            if wait {
                wait_rollout(servers, &namespace, &name, Duration::from_secs(timeout)).await?;
            }
        }
    }
    Ok(())
}

/// Polls until every replica of the workload's current template is Ready
/// and no older one remains; prints progress when it changes.
pub(crate) async fn wait_rollout(
    servers: &Target,
    namespace: &str,
    name: &str,
    timeout: Duration,
) -> Result<(), Failure> {
    let deadline = std::time::Instant::now() + timeout;
    let mut last = String::new();
    loop {
        let w = call(servers, |ch| {
            let req = pb::GetWorkloadRequest {
                read: None,
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            };
            async move { WorkloadServiceClient::new(ch).get(req).await }
        })
        .await?
        .workload
        .unwrap_or_default();
        let st = w.status.unwrap_or_default();
        let desired = w.spec.as_ref().map_or(0, |s| s.replicas);
        let line = format!(
            "{}/{} ready, {} up to date, {} assigned (want {desired})",
            st.ready_replicas, desired, st.updated_replicas, st.current_replicas
        );
        if line != last {
            println!("  {line}");
            last = line;
        }
        if st.ready_replicas >= desired
            && st.updated_replicas == desired
            && st.current_replicas == desired
        {
            println!("rollout of {namespace}/{name} complete");
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(Failure::new(
                Exit::Unavailable,
                anyhow::anyhow!(
                    "{namespace}/{name}: rollout not complete after {}s ({last})",
                    timeout.as_secs()
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
