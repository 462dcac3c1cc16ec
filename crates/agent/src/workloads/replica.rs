//! One replica's life on this node: pull its image, read its secrets, make
//! its volumes, then supervise its container (and keep its secret volumes
//! and upstream listeners current) until it is stopped.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cloudless_proto::v1 as pb;
use cloudless_runtime::registry::{PullProgress, RegistryClient};
use cloudless_runtime::{Backoff, ImageRef, ReplicaSpec, Supervisor, TaskState};
use cloudless_types::ReplicaState;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::runtime::AgentRuntime;
use super::spec::{container_config, prepare_volumes, probe, volume_dir};
use super::status::{status, wire_status};
use crate::secrets::SecretSource;

/// The latest state of each replica, by replica id (what the report sends).
pub(crate) type Statuses = Arc<std::sync::Mutex<HashMap<String, pb::ReplicaStatus>>>;

/// Events of the node's replicas not reported yet, oldest first.
#[derive(Debug, Clone, Default)]
pub(crate) struct Events(Arc<std::sync::Mutex<std::collections::VecDeque<pb::ReplicaEvent>>>);

impl Events {
    /// Most events kept waiting for a report (the oldest go first).
    const KEPT: usize = 256;
    /// Most events one report carries (the coordinator's limit).
    pub(crate) const PER_REPORT: usize = 16;
    /// Longest message the coordinator records.
    const MESSAGE: usize = 512;

    /// Queues an event of `replica` for the next report, its message cut
    /// to what the coordinator records.
    pub(crate) fn push(&self, replica: &str, reason: &str, mut message: String) {
        if message.len() > Self::MESSAGE {
            let mut at = Self::MESSAGE;
            while !message.is_char_boundary(at) {
                at -= 1;
            }
            message.truncate(at);
        }
        if let Ok(mut q) = self.0.lock() {
            if q.len() >= Self::KEPT {
                q.pop_front();
            }
            q.push_back(pb::ReplicaEvent {
                replica_id: replica.to_owned(),
                reason: reason.to_owned(),
                message,
            });
        }
    }

    /// The oldest events, for a report (taken off the queue).
    pub(crate) fn take(&self) -> Vec<pb::ReplicaEvent> {
        self.0.lock().map_or_else(
            |_| Vec::new(),
            |mut q| {
                let n = q.len().min(Self::PER_REPORT);
                q.drain(..n).collect()
            },
        )
    }

    /// Puts back the events of a report that failed, ahead of newer ones.
    pub(crate) fn put_back(&self, events: Vec<pb::ReplicaEvent>) {
        if let Ok(mut q) = self.0.lock() {
            for e in events.into_iter().rev() {
                if q.len() >= Self::KEPT {
                    break;
                }
                q.push_front(e);
            }
        }
    }
}

/// Where a replica's volumes go.
#[derive(Debug, Clone)]
pub(crate) struct Paths {
    /// Its `emptyDir` volumes: `<volumes>/<container>/<volume>`.
    pub(crate) volumes: PathBuf,
    /// Its secret volumes: `<secrets>/<container>/<volume>`.
    pub(crate) secrets: PathBuf,
}

/// What every replica task shares with the runner that starts it.
pub(crate) struct ReplicaCtx<R> {
    /// The container runtime.
    pub(crate) rt: R,
    /// Runs containers on `rt` under the node's policy.
    pub(crate) supervisor: Supervisor<R>,
    /// Pulls images.
    pub(crate) registry: Arc<RegistryClient>,
    /// Images pulled so far, by reference.
    pub(crate) images: Arc<Mutex<HashMap<String, ImageRef>>>,
    /// Where each replica reports its state.
    pub(crate) statuses: Statuses,
    /// Where replicas' events wait for the next report.
    pub(crate) events: Events,
    /// Where volumes go.
    pub(crate) paths: Paths,
    /// Where secrets are read (`None`: replicas that need one fail).
    pub(crate) secrets: Option<Arc<dyn SecretSource>>,
    /// Service traffic between workloads (upstreams), when the overlay runs.
    pub(crate) mesh: Option<Arc<crate::mesh::Mesh>>,
    /// The node's container network (`None`: replicas have only loopback).
    pub(crate) network: Option<Arc<cloudless_network::NodeNetwork>>,
    /// The cluster's egress policy for workloads that set none.
    pub(crate) default_egress: Option<Arc<cloudless_types::EgressPolicy>>,
    /// The node's resolver and service proxy (with the network).
    pub(crate) services: Option<Arc<crate::services::ServicePlane>>,
    /// Counts starts, exits and pulls.
    pub(crate) metrics: crate::metrics::AgentMetrics,
}

impl<R: Clone> Clone for ReplicaCtx<R> {
    fn clone(&self) -> Self {
        Self {
            rt: self.rt.clone(),
            supervisor: self.supervisor.clone(),
            registry: self.registry.clone(),
            images: self.images.clone(),
            statuses: self.statuses.clone(),
            events: self.events.clone(),
            paths: self.paths.clone(),
            secrets: self.secrets.clone(),
            mesh: self.mesh.clone(),
            network: self.network.clone(),
            default_egress: self.default_egress.clone(),
            services: self.services.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

/// One replica being run: what it was assigned and how to report it.
struct Replica<R> {
    ctx: ReplicaCtx<R>,
    a: pb::Assignment,
    spec: cloudless_types::WorkloadSpec,
    cancel: CancellationToken,
    /// Its address on the node's bridge, once it has one.
    address: Option<std::net::Ipv4Addr>,
    /// The span of its start (`cloudless.agent/Assignment`, in the trace of
    /// the coordinator span that placed it), from the assignment until the
    /// replica is first Ready or stopped.
    starting: std::sync::Mutex<Option<tracing::Span>>,
}

impl<R> Replica<R> {
    fn id(&self) -> &str {
        &self.a.replica_id
    }

    /// A span for one step of its start, under its assignment span (a root
    /// span once the start is over).
    fn step(&self, name: &'static str) -> tracing::Span {
        let starting = self.starting.lock().ok().and_then(|s| s.clone());
        let span = tracing::info_span!(
            parent: starting.as_ref().and_then(tracing::Span::id),
            "step",
            otel.name = name,
            replica = %self.a.replica_id,
        );
        if starting.is_none() {
            cloudless_telemetry::set_traceparent(&span, &self.a.trace_parent);
        }
        span
    }

    /// Ends its assignment span: the replica is Ready (or stopped first).
    fn started(&self) {
        if let Ok(mut s) = self.starting.lock() {
            s.take();
        }
    }

    /// Records the replica's state for the next report, unless it is being
    /// stopped: the runner then forgets it or records why itself (checked
    /// under the lock, which the runner takes only after cancelling).
    fn set(&self, mut s: pb::ReplicaStatus) {
        if let Some(a) = self.address {
            s.address = a.to_string();
        }
        if let Ok(mut m) = self.ctx.statuses.lock() {
            if !self.cancel.is_cancelled() {
                m.insert(s.replica_id.clone(), s);
            }
        }
    }

    /// Records that the replica is waiting (`Pending`) and why.
    fn pending(&self, message: String) {
        self.set(status(self.id(), ReplicaState::Pending, None, 0, message));
    }

    /// Records that the replica cannot run (`Failed`) and why.
    fn failed(&self, message: String) {
        self.set(status(self.id(), ReplicaState::Failed, None, 0, message));
    }
}

/// Runs one replica until `cancel`: pull, secrets, volumes, supervise.
pub(crate) async fn replica_task<R: AgentRuntime>(
    ctx: ReplicaCtx<R>,
    a: pb::Assignment,
    spec: cloudless_types::WorkloadSpec,
    cancel: CancellationToken,
) {
    // Its start joins the trace of the coordinator span that placed it.
    let starting = tracing::info_span!(
        parent: None,
        "assignment",
        otel.name = "cloudless.agent/Assignment",
        replica = %a.replica_id,
        workload = %format!("{}/{}", a.namespace, a.workload),
        image = %spec.image,
    );
    cloudless_telemetry::set_traceparent(&starting, &a.trace_parent);
    let mut r = Replica {
        ctx,
        a,
        spec,
        cancel,
        address: None,
        starting: std::sync::Mutex::new(Some(starting)),
    };
    r.pending("pulling the image".into());
    let Some(image) = pull(&r).await else {
        return;
    };
    // Secrets: read with a token for this workload, retried until they
    // can be (a secret created after the workload, a coordinator away).
    let Some(mut resolved) = read_secrets(&r)
        .instrument(r.step("cloudless.agent/Secrets"))
        .await
    else {
        return;
    };
    let paths = &r.ctx.paths;
    let mut container = container_config(&r.a, &r.spec, &paths.volumes, &paths.secrets);
    for (k, v) in std::mem::take(&mut resolved.env) {
        container.env.insert(k, v);
    }
    // Who the process runs as (runAsUser, else the image's numeric user):
    // its secret files and emptyDir directories are made for it.
    let (uid, gid) = cloudless_runtime::process_ids(&container, &image.process);
    let secret_volumes = SecretVolumes::of(&r.spec, &paths.secrets, &container.id);
    if let Err(e) = secret_volumes.mount(&resolved, uid, gid) {
        r.failed(format!("secret volume: {e}"));
        secret_volumes.unmount_all();
        return;
    }
    let dir = volume_dir(&paths.volumes, &container.id);
    if let Err(e) = prepare_volumes(&container, &paths.volumes, uid, gid) {
        r.failed(format!("cannot make its volumes in {}: {e}", dir.display()));
        // Its secrets do not stay on the node without it.
        secret_volumes.unmount_all();
        return;
    }
    let refresher = (!secret_volumes.vols.is_empty())
        .then(|| r.ctx.secrets.clone())
        .flatten()
        .map(|source| {
            let refresh = SecretRefresh {
                source,
                vols: secret_volumes.vols.clone(),
                versions: resolved.versions.clone(),
                namespace: r.a.namespace.clone(),
                workload: r.a.workload.clone(),
                uid,
                gid,
                replica: r.id().to_owned(),
            };
            tokio::spawn(refresh.run(r.cancel.clone()))
        });
    // Its network: a namespace of its own on the node's bridge, kept
    // across container restarts (and agent restarts).
    let network = match attach(&r, &container.id)
        .instrument(r.step("cloudless.agent/Network"))
        .await
    {
        Attached::Yes(att) => {
            if !att.kept {
                restart_into_new_network(&r, &container.id).await;
            }
            r.address = Some(att.address);
            container.network_namespace = Some(att.netns);
            if let Some(plane) = &r.ctx.services {
                // Names through the node's resolver; its connections to
                // service addresses are this workload's.
                match plane.register(
                    r.id(),
                    &container.id,
                    att.address,
                    &r.a.namespace,
                    &r.a.workload,
                ) {
                    Ok(resolv) => container.mounts.push(cloudless_runtime::Mount {
                        destination: "/etc/resolv.conf".into(),
                        source: cloudless_runtime::MountSource::ReplicaDir(resolv),
                        read_only: true,
                        field: "resolv.conf".into(),
                        volume: String::new(),
                    }),
                    Err(e) => {
                        tracing::warn!(replica = %r.id(), error = %e, "cannot write its resolv.conf; it resolves no service names")
                    }
                }
            }
            true
        }
        Attached::NoNetwork => false,
        Attached::Cancelled | Attached::Refused => {
            if let Some(task) = refresher {
                task.abort();
            }
            secret_volumes.unmount_all();
            return;
        }
    };
    let container_id = container.id.clone();
    let replica = ReplicaSpec {
        container,
        image,
        restart: r.spec.restart_policy,
        liveness: r.spec.liveness_probe.as_ref().and_then(probe),
        readiness: r.spec.readiness_probe.as_ref().and_then(probe),
        stop_grace: Duration::from_secs(10),
    };
    // Ends (dropped) when the clean-up below is done.
    let _stopping = supervise(&r, replica).await;
    if let Some(task) = refresher {
        task.abort();
    }
    secret_volumes.unmount_all();
    // The container is gone: so is its network (address, ports, rules).
    if let (Some(plane), Some(a)) = (&r.ctx.services, r.address) {
        plane.unregister(r.id(), &container_id, a);
    }
    if let (true, Some(net)) = (network, &r.ctx.network) {
        if let Err(e) = net.detach(&container_id).await {
            tracing::warn!(replica = %r.id(), error = %e, "cannot remove its network");
        }
    }
    // The container is gone: so is its scratch space.
    if dir.exists() {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(replica = %r.id(), error = %e, "cannot remove its volumes");
        }
    }
}

/// Stops and removes the replica's container if it still runs from this
/// agent's earlier life: its network was made anew (the old one was
/// broken, e.g. its veth deleted while the agent was down), and the
/// container sits in the old namespace. The supervisor then starts it in
/// the new one instead of adopting it.
async fn restart_into_new_network<R: AgentRuntime>(r: &Replica<R>, id: &str) {
    let mut delay = Duration::from_secs(1);
    while matches!(r.ctx.rt.task_state(id).await, Ok(TaskState::Running(_))) {
        tracing::warn!(replica = %r.id(), "its network was broken and is made anew; starting its container again in it");
        if let Err(e) = r.ctx.rt.stop(id, Duration::from_secs(10)).await {
            tracing::warn!(replica = %r.id(), error = %e, "cannot stop its container");
        }
        r.ctx.rt.remove(id).await;
        if !matches!(r.ctx.rt.task_state(id).await, Ok(TaskState::Running(_))) {
            return;
        }
        // Adopting it would leave it in the broken namespace: try again.
        r.pending(format!(
            "cannot stop its container to move it into its new network (retrying in {}s)",
            delay.as_secs()
        ));
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = r.cancel.cancelled() => return,
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

/// What became of a replica's network.
enum Attached {
    /// It has one.
    Yes(cloudless_network::Attachment),
    /// The node has none to give (or the replica uses the host's).
    NoNetwork,
    /// Cancelled while trying.
    Cancelled,
    /// It cannot have one here (the reason is reported).
    Refused,
}

/// Attaches the replica to the node's network (retried with back-off
/// until it can be).
async fn attach<R>(r: &Replica<R>, container_id: &str) -> Attached {
    let Some(net) = r.ctx.network.clone() else {
        return Attached::NoNetwork;
    };
    if r.spec.security_context.host_network {
        return Attached::NoNetwork;
    }
    let req =
        super::network::attach_request(container_id, &r.spec, r.ctx.default_egress.as_deref());
    if let Some(why) = super::network::host_ports_refused(&req.host_ports, net.config()) {
        r.failed(why);
        return Attached::Refused;
    }
    let mut delay = Duration::from_secs(1);
    loop {
        match net.attach(&req).await {
            Ok(att) => return Attached::Yes(att),
            Err(e) => {
                tracing::warn!(replica = %r.id(), error = %e, "cannot make its network; retrying");
                r.pending(format!(
                    "cannot make its network (retrying in {}s): {e}",
                    delay.as_secs()
                ));
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = r.cancel.cancelled() => return Attached::Cancelled,
                }
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// The replica's image: from the node's cache, else pulled (retried with
/// back-off until it can be), its progress in the replica's message and
/// events (`Pulling`, `Pulled`, `PullFailed`). `None`: cancelled.
async fn pull<R: AgentRuntime>(r: &Replica<R>) -> Option<ImageRef> {
    let (ctx, image) = (&r.ctx, &r.spec.image);
    let mut delay = Duration::from_secs(1);
    // Events for the first attempt and for each new error, not every retry.
    let mut last_error: Option<String> = None;
    let mut first = true;
    loop {
        let cached = ctx.images.lock().await.get(image).cloned();
        if let Some(i) = cached {
            return Some(i);
        }
        let started = std::time::Instant::now();
        let span = r.step("cloudless.agent/Pull");
        if std::mem::take(&mut first) {
            ctx.events
                .push(r.id(), "Pulling", format!("pulling image {image}"));
        }
        let progress = PullShown::default();
        let show = |p: PullProgress| progress.show(r, &ctx.metrics, p);
        let pulled = tokio::select! {
            p = ctx.rt.pull(&ctx.registry, image, &show).instrument(span) => p,
            () = r.cancel.cancelled() => return None,
        };
        let seconds = started.elapsed().as_secs_f64();
        ctx.metrics.pulled(pulled.is_ok(), seconds);
        match pulled {
            Ok(i) => {
                let last = progress.last();
                ctx.events.push(
                    r.id(),
                    "Pulled",
                    format!(
                        "pulled image {image}: {} in {seconds:.1} s ({} downloaded)",
                        size(last.total),
                        size(last.done.saturating_sub(last.found)),
                    ),
                );
                ctx.images.lock().await.insert(image.clone(), i.clone());
                return Some(i);
            }
            Err(e) => {
                tracing::warn!(replica = %r.id(), image = %image, error = %e, "image pull failed; retrying");
                let error = e.to_string();
                if last_error.as_ref() != Some(&error) {
                    ctx.events.push(
                        r.id(),
                        "PullFailed",
                        format!("image {image}: {error} (retrying with back-off)"),
                    );
                    last_error = Some(error);
                }
                r.pending(format!(
                    "image pull failed (retrying in {}s): {e}",
                    delay.as_secs()
                ));
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = r.cancel.cancelled() => return None,
                }
                delay = (delay * 2).min(Duration::from_secs(60));
            }
        }
    }
}

/// An image pull's progress as the replica shows it: its message (`pulling
/// image X: 12.0 MB of 48.2 MB (24%)`) at each tenth of the pull or every 10
/// s, whichever comes first (each change is a status report and a Raft
/// write), and the downloaded bytes counted as they come.
#[derive(Default)]
struct PullShown(std::sync::Mutex<(Option<(std::time::Instant, u64)>, PullProgress)>);

impl PullShown {
    fn show<R>(&self, r: &Replica<R>, metrics: &crate::metrics::AgentMetrics, p: PullProgress) {
        let Ok(mut state) = self.0.lock() else {
            return;
        };
        let (shown, last) = &mut *state;
        let fetched = p.done.saturating_sub(p.found);
        metrics.pull_bytes(fetched.saturating_sub(last.done.saturating_sub(last.found)));
        *last = p;
        let percent = (p.done.saturating_mul(100))
            .checked_div(p.total)
            .unwrap_or(0)
            .min(100);
        let due = shown.is_none_or(|(at, tenth)| {
            percent / 10 > tenth || at.elapsed() >= Duration::from_secs(10)
        });
        if !due {
            return;
        }
        *shown = Some((std::time::Instant::now(), percent / 10));
        r.pending(format!(
            "pulling image {}: {} of {} ({percent}%)",
            r.spec.image,
            size(p.done),
            size(p.total)
        ));
    }

    fn last(&self) -> PullProgress {
        self.0.lock().map(|s| s.1).unwrap_or_default()
    }
}

/// Bytes for people: `512 B`, `12.3 kB`, `48.2 MB`, `1.5 GB`.
fn size(bytes: u64) -> String {
    let b = bytes as f64;
    if bytes < 1_000 {
        format!("{bytes} B")
    } else if bytes < 1_000_000 {
        format!("{:.1} kB", b / 1e3)
    } else if bytes < 1_000_000_000 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.1} GB", b / 1e9)
    }
}

/// Every secret the replica refers to, read as its workload (retried with
/// back-off until they can be). `None`: cancelled, or this agent cannot
/// read secrets (then the replica is `Failed`).
async fn read_secrets<R>(r: &Replica<R>) -> Option<crate::secrets::Resolved> {
    if r.spec.secret_names().is_empty() {
        return Some(crate::secrets::Resolved::default());
    }
    let Some(source) = r.ctx.secrets.clone() else {
        r.failed("this agent cannot read secrets".into());
        return None;
    };
    let mut delay = Duration::from_secs(1);
    loop {
        match crate::secrets::resolve(&*source, &r.a.namespace, &r.a.workload, &r.spec).await {
            Ok(resolved) => return Some(resolved),
            Err(e) => {
                tracing::warn!(replica = %r.id(), error = %e, "cannot read its secrets; retrying");
                r.pending(format!(
                    "waiting for secrets (retrying in {}s): {e}",
                    delay.as_secs()
                ));
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = r.cancel.cancelled() => return None,
                }
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// A replica's secret volumes: each a tmpfs directory holding the secret's
/// files.
struct SecretVolumes {
    /// The replica's directory under the secrets base.
    replica_dir: PathBuf,
    /// Each volume's directory and what it holds.
    vols: Vec<(PathBuf, cloudless_types::SecretVolume)>,
}

impl SecretVolumes {
    fn of(spec: &cloudless_types::WorkloadSpec, base: &std::path::Path, container: &str) -> Self {
        let vols = spec
            .volumes
            .iter()
            .filter_map(|v| {
                v.secret
                    .clone()
                    .map(|sv| (crate::secrets::volume_dir(base, container, &v.name), sv))
            })
            .collect();
        Self {
            replica_dir: base.join(container),
            vols,
        }
    }

    /// Mounts each volume's tmpfs and writes the secret's files, owned by
    /// `uid:gid`.
    fn mount(&self, resolved: &crate::secrets::Resolved, uid: u32, gid: u32) -> Result<(), String> {
        for (d, sv) in &self.vols {
            crate::secrets::mount_tmpfs(d)?;
            let values = resolved
                .values
                .get(&sv.secret_name)
                .ok_or_else(|| format!("secret {} was not read", sv.secret_name))?;
            crate::secrets::write_files(d, sv, values, uid, gid)?;
        }
        Ok(())
    }

    /// Unmounts every volume and removes the replica's directory.
    fn unmount_all(&self) {
        for (d, _) in &self.vols {
            crate::secrets::unmount(d);
        }
        let _ = std::fs::remove_dir(&self.replica_dir);
    }
}

/// Runs the replica's container until `cancel`, reporting each state the
/// supervisor sees and keeping its upstream listeners in the current
/// container process's network namespace (made again when it restarts,
/// dropped when it stops). Its start is traced (`Start` until its process
/// runs, `Readiness` until it is first Ready); the span of its stop
/// (`cloudless.agent/Stop`, from the cancel on) is returned, for the
/// caller's clean-up to end.
async fn supervise<R: AgentRuntime>(r: &Replica<R>, replica: ReplicaSpec) -> tracing::Span {
    let (mut rx, task) = r
        .ctx
        .supervisor
        .run(replica, Backoff::default(), r.cancel.clone());
    let mesh = &r.ctx.mesh;
    let id = r.id();
    let mut pid = None;
    let mut listeners: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    let mut counted = Counted::default();
    let mut step = Some(r.step("cloudless.agent/Start"));
    let mut stopping = None;
    loop {
        let now = rx.borrow_and_update().clone();
        counted.count(&now, &r.ctx.metrics);
        r.set(wire_status(id, &now));
        if now.ready || now.exits > 0 {
            // Ready; or its process ended before that (a crash loop would
            // keep the start open for as long as it lasts).
            step = None;
            r.started();
        } else if now.pid.is_some() && step.is_some() && pid.is_none() {
            step = Some(r.step("cloudless.agent/Readiness"));
        }
        if now.pid != pid {
            pid = now.pid;
            listeners.drain(..).for_each(|l| l.abort());
            if let Some(m) = mesh {
                m.set_pid(id, pid);
                if let Some(p) = pid {
                    listeners = m
                        .listen_upstreams(id, &r.a.namespace, &r.spec.upstreams, p)
                        .await;
                }
            }
        }
        let changed = tokio::select! {
            c = rx.changed() => c,
            () = r.cancel.cancelled(), if stopping.is_none() => {
                step = None;
                r.started();
                stopping = Some(stop_span(r));
                continue;
            }
        };
        if changed.is_err() {
            break;
        }
    }
    listeners.drain(..).for_each(|l| l.abort());
    if let Some(m) = mesh {
        m.set_pid(id, None);
    }
    let _ = task.await;
    drop(step);
    r.started();
    stopping.unwrap_or_else(|| stop_span(r))
}

/// The span of a replica's stop, in the trace that placed it.
fn stop_span<R>(r: &Replica<R>) -> tracing::Span {
    let span = tracing::info_span!(
        parent: None,
        "stop",
        otel.name = "cloudless.agent/Stop",
        replica = %r.a.replica_id,
    );
    cloudless_telemetry::set_traceparent(&span, &r.a.trace_parent);
    span
}

/// What a replica's metrics have counted of its supervisor's reports: a
/// report may stand for several changes (the watch keeps the latest), so
/// starts are counted by process seen, restarts and exits by their counts.
#[derive(Default)]
struct Counted {
    pid: Option<u32>,
    restarts: u32,
    exits: u32,
}

impl Counted {
    fn count(&mut self, now: &cloudless_runtime::ReplicaStatus, m: &crate::metrics::AgentMetrics) {
        if now.pid.is_some() && now.pid != self.pid {
            m.started();
        }
        self.pid = now.pid;
        let restarts = now.restarts.saturating_sub(self.restarts);
        if restarts > 0 {
            m.restarted(u64::from(restarts));
        }
        self.restarts = self.restarts.max(now.restarts);
        let exits = now.exits.saturating_sub(self.exits);
        self.exits = self.exits.max(now.exits);
        // Merged exits are counted with the reason of the latest.
        if let (Some(e), true) = (&now.last_exit, exits > 0) {
            m.exited(e, u64::from(exits));
        }
    }
}

/// Keeps a replica's secret volumes current.
struct SecretRefresh {
    /// Where the secrets are read.
    source: Arc<dyn SecretSource>,
    /// Each volume's directory and what it holds.
    vols: Vec<(PathBuf, cloudless_types::SecretVolume)>,
    /// The version of each secret its files hold, by secret name.
    versions: HashMap<String, u64>,
    /// The replica's namespace.
    namespace: String,
    /// The replica's workload (the audience secrets are read as).
    workload: String,
    /// The files' owner.
    uid: u32,
    /// The files' group.
    gid: u32,
    /// The replica (for the log).
    replica: String,
}

impl SecretRefresh {
    /// Rewrites the volumes' files when their secrets change (read again
    /// every `source.refresh()`), until `cancel`.
    async fn run(mut self, cancel: CancellationToken) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(self.source.refresh()) => {}
                () = cancel.cancelled() => return,
            }
            for (dir, sv) in &self.vols {
                let replica = &self.replica;
                match self
                    .source
                    .get(&self.namespace, &sv.secret_name, &self.workload)
                    .await
                {
                    Ok((values, version))
                        if self.versions.get(&sv.secret_name) != Some(&version) =>
                    {
                        match crate::secrets::write_files(dir, sv, &values, self.uid, self.gid) {
                            Ok(()) => {
                                tracing::info!(replica = %replica, secret = %sv.secret_name, version, "secret volume updated");
                                self.versions.insert(sv.secret_name.clone(), version);
                            }
                            Err(e) => {
                                tracing::warn!(replica = %replica, error = %e, "cannot update a secret volume")
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(replica = %replica, error = %e, "cannot refresh a secret")
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod counted_tests {
    use super::Counted;
    use cloudless_runtime::{LastExit, ReplicaPhase, ReplicaStatus};

    fn status(
        phase: ReplicaPhase,
        pid: Option<u32>,
        restarts: u32,
        exits: u32,
        exit: Option<LastExit>,
    ) -> ReplicaStatus {
        ReplicaStatus {
            phase,
            ready: false,
            restarts,
            pid,
            last_exit: exit,
            exits,
            message: String::new(),
        }
    }

    fn scrape(r: &prometheus_client::registry::Registry) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, r).expect("encoded");
        s
    }

    #[test]
    fn starts_restarts_and_exits_are_counted_once_each_even_when_reports_merge() {
        let mut registry = prometheus_client::registry::Registry::default();
        let m = crate::metrics::AgentMetrics::register(&mut registry);
        let mut c = Counted::default();
        let oom = LastExit {
            code: 137,
            oom_killed: true,
            liveness_failed: false,
        };
        let done = LastExit {
            code: 0,
            oom_killed: false,
            liveness_failed: false,
        };
        c.count(&status(ReplicaPhase::Starting, None, 0, 0, None), &m);
        c.count(&status(ReplicaPhase::Running, Some(10), 0, 0, None), &m);
        // The same report again: nothing new.
        c.count(&status(ReplicaPhase::Running, Some(10), 0, 0, None), &m);
        // Two OOM kills and restarts seen in one report (the watch keeps
        // the latest: the process between was never seen running), then
        // the third run completes for good.
        c.count(
            &status(ReplicaPhase::Running, Some(30), 2, 2, Some(oom)),
            &m,
        );
        c.count(&status(ReplicaPhase::Exited, None, 2, 3, Some(done)), &m);
        c.count(&status(ReplicaPhase::Exited, None, 2, 3, Some(done)), &m);
        // Another replica is OOM-killed once, then stopped during its
        // back-off: the stop keeps the last exit but is no exit of its own.
        let mut other = Counted::default();
        other.count(&status(ReplicaPhase::Running, Some(40), 0, 0, None), &m);
        other.count(&status(ReplicaPhase::BackOff, None, 1, 1, Some(oom)), &m);
        other.count(&status(ReplicaPhase::Exited, None, 1, 1, Some(oom)), &m);
        let text = scrape(&registry);
        for line in [
            "cloudless_agent_container_starts_total 3",
            "cloudless_agent_container_restarts_total 3",
            "cloudless_agent_container_exits_total{reason=\"oom_killed\"} 3",
            "cloudless_agent_container_exits_total{reason=\"completed\"} 1",
            "cloudless_agent_container_exits_total{reason=\"error\"} 0",
            "cloudless_agent_oom_kills_total 3",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in:\n{text}");
        }
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(super::size(512), "512 B");
        assert_eq!(super::size(12_345), "12.3 kB");
        assert_eq!(super::size(48_200_000), "48.2 MB");
        assert_eq!(super::size(1_500_000_000), "1.5 GB");
    }

    #[test]
    fn events_wait_in_order_are_reported_sixteen_at_a_time_and_come_back_first_after_a_failure() {
        let q = super::Events::default();
        for i in 0..20 {
            q.push(&format!("r-{i}"), "Pulled", String::new());
        }
        let first = q.take();
        assert_eq!(first.len(), super::Events::PER_REPORT);
        assert_eq!(first[0].replica_id, "r-0");
        q.put_back(first);
        let again = q.take();
        assert_eq!(
            again[0].replica_id, "r-0",
            "a failed report's events go first"
        );
        assert_eq!(q.take().len(), 4);
        assert!(q.take().is_empty());
        // A queue no report empties keeps the newest.
        for i in 0..1000 {
            q.push(&format!("r-{i}"), "Pulling", String::new());
        }
        assert_eq!(q.take()[0].replica_id, "r-744");
        // Messages are cut to what the coordinator records, at a character.
        let q = super::Events::default();
        q.push("r", "PullFailed", "é".repeat(400));
        let m = &q.take()[0].message;
        assert_eq!(m.len(), 512);
        assert!(m.chars().all(|c| c == 'é'));
    }
}
