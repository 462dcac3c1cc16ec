//! One replica's life on this node: pull its image, read its secrets, make
//! its volumes, then supervise its container (and keep its secret volumes
//! and upstream listeners current) until it is stopped.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cloudless_proto::v1 as pb;
use cloudless_runtime::registry::RegistryClient;
use cloudless_runtime::{Backoff, Containerd, ImageRef, ReplicaSpec, Supervisor};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::spec::{container_config, container_id, prepare_volumes, probe, volume_dir};
use super::status::{status, wire_status};

/// Where a replica's volumes go.
pub(crate) struct Paths {
    pub(crate) volumes: PathBuf,
    pub(crate) secrets: PathBuf,
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn replica_task(
    rt: Containerd,
    supervisor: Supervisor<Containerd>,
    registry: Arc<RegistryClient>,
    images: Arc<Mutex<HashMap<String, ImageRef>>>,
    a: pb::Assignment,
    spec: cloudless_types::WorkloadSpec,
    cancel: CancellationToken,
    statuses: Arc<std::sync::Mutex<HashMap<String, pb::ReplicaStatus>>>,
    paths: Paths,
    secrets: Option<Arc<crate::secrets::SecretFetcher>>,
    mesh: Option<Arc<crate::mesh::Mesh>>,
) {
    let volume_base = paths.volumes;
    let id = a.replica_id.clone();
    let set = |s: pb::ReplicaStatus| {
        if let Ok(mut m) = statuses.lock() {
            m.insert(s.replica_id.clone(), s);
        }
    };
    set(status(&id, "Pending", None, 0, "pulling the image".into()));
    let mut delay = Duration::from_secs(1);
    let image = loop {
        let cached = images.lock().await.get(&spec.image).cloned();
        if let Some(i) = cached {
            break i;
        }
        let pulled = tokio::select! {
            r = rt.pull(&registry, &spec.image, &|_| {}) => r,
            () = cancel.cancelled() => return,
        };
        match pulled {
            Ok(i) => {
                images.lock().await.insert(spec.image.clone(), i.clone());
                break i;
            }
            Err(e) => {
                tracing::warn!(replica = %id, image = %spec.image, error = %e, "image pull failed; retrying");
                set(status(
                    &id,
                    "Pending",
                    None,
                    0,
                    format!("image pull failed (retrying in {}s): {e}", delay.as_secs()),
                ));
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = cancel.cancelled() => return,
                }
                delay = (delay * 2).min(Duration::from_secs(60));
            }
        }
    };
    // Secrets: read with a token for this workload, retried until they
    // can be (a secret created after the workload, a coordinator away).
    let mut resolved = crate::secrets::Resolved::default();
    if !spec.secret_names().is_empty() {
        let Some(fetcher) = secrets.clone() else {
            set(status(
                &id,
                "Failed",
                None,
                0,
                "this agent cannot read secrets".into(),
            ));
            return;
        };
        let mut delay = Duration::from_secs(1);
        loop {
            match crate::secrets::resolve(&fetcher, &a.namespace, &a.workload, &spec).await {
                Ok(r) => {
                    resolved = r;
                    break;
                }
                Err(e) => {
                    tracing::warn!(replica = %id, error = %e, "cannot read its secrets; retrying");
                    set(status(
                        &id,
                        "Pending",
                        None,
                        0,
                        format!(
                            "waiting for secrets (retrying in {}s): {e}",
                            delay.as_secs()
                        ),
                    ));
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = cancel.cancelled() => return,
                    }
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
    let mut container = container_config(&a, &spec, &volume_base, &paths.secrets);
    for (k, v) in std::mem::take(&mut resolved.env) {
        container.env.insert(k, v);
    }
    // Who the process runs as (runAsUser, else the image's numeric user):
    // its secret files and emptyDir directories are made for it.
    let (uid, gid) = cloudless_runtime::process_ids(&container, &image.process);
    let secret_volumes: Vec<(PathBuf, cloudless_types::SecretVolume)> = spec
        .volumes
        .iter()
        .filter_map(|v| {
            v.secret.clone().map(|sv| {
                (
                    crate::secrets::volume_dir(&paths.secrets, &container.id, &v.name),
                    sv,
                )
            })
        })
        .collect();
    let unmount_all = |vols: &[(PathBuf, cloudless_types::SecretVolume)]| {
        for (d, _) in vols {
            crate::secrets::unmount(d);
        }
        let _ = std::fs::remove_dir(paths.secrets.join(container_id(&id)));
    };
    for (d, sv) in &secret_volumes {
        let written = crate::secrets::mount_tmpfs(d).and_then(|()| {
            let values = resolved
                .values
                .get(&sv.secret_name)
                .ok_or_else(|| format!("secret {} was not read", sv.secret_name))?;
            crate::secrets::write_files(d, sv, values, uid, gid)
        });
        if let Err(e) = written {
            set(status(
                &id,
                "Failed",
                None,
                0,
                format!("secret volume: {e}"),
            ));
            unmount_all(&secret_volumes);
            return;
        }
    }
    let refresher = (!secret_volumes.is_empty())
        .then(|| secrets.clone())
        .flatten()
        .map(|fetcher| {
            let vols = secret_volumes.clone();
            let versions = resolved.versions.clone();
            let (ns, workload, cancel) = (a.namespace.clone(), a.workload.clone(), cancel.clone());
            let rid = id.clone();
            tokio::spawn(refresh_secret_volumes(
                fetcher, vols, versions, ns, workload, uid, gid, rid, cancel,
            ))
        });
    let dir = volume_dir(&volume_base, &container.id);
    if let Err(e) = prepare_volumes(&container, &volume_base, uid, gid) {
        set(status(
            &id,
            "Failed",
            None,
            0,
            format!("cannot make its volumes in {}: {e}", dir.display()),
        ));
        return;
    }
    let replica = ReplicaSpec {
        container,
        image,
        restart: spec.restart_policy,
        liveness: spec.liveness_probe.as_ref().and_then(probe),
        readiness: spec.readiness_probe.as_ref().and_then(probe),
        stop_grace: Duration::from_secs(10),
    };
    let (mut rx, task) = supervisor.run(replica, Backoff::default(), cancel.clone());
    // Upstream listeners live in the current container process's network
    // namespace: made again when it restarts, dropped when it stops.
    let mut pid = None;
    let mut listeners: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    loop {
        let now = rx.borrow_and_update().clone();
        set(wire_status(&id, &now));
        if now.pid != pid {
            pid = now.pid;
            listeners.drain(..).for_each(|l| l.abort());
            if let Some(m) = &mesh {
                m.set_pid(&id, pid);
                if let Some(p) = pid {
                    listeners = m
                        .listen_upstreams(&id, &a.namespace, &spec.upstreams, p)
                        .await;
                }
            }
        }
        if rx.changed().await.is_err() {
            break;
        }
    }
    listeners.drain(..).for_each(|l| l.abort());
    if let Some(m) = &mesh {
        m.set_pid(&id, None);
    }
    let _ = task.await;
    if let Some(r) = refresher {
        r.abort();
    }
    unmount_all(&secret_volumes);
    // The container is gone: so is its scratch space.
    if dir.exists() {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(replica = %id, error = %e, "cannot remove its volumes");
        }
    }
}

/// Rewrites a replica's secret volumes when their secrets change.
#[allow(clippy::too_many_arguments)]
async fn refresh_secret_volumes(
    fetcher: Arc<crate::secrets::SecretFetcher>,
    vols: Vec<(PathBuf, cloudless_types::SecretVolume)>,
    mut versions: HashMap<String, u64>,
    namespace: String,
    workload: String,
    uid: u32,
    gid: u32,
    replica: String,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(fetcher.refresh) => {}
            () = cancel.cancelled() => return,
        }
        for (dir, sv) in &vols {
            match fetcher.get(&namespace, &sv.secret_name, &workload).await {
                Ok((values, version)) if versions.get(&sv.secret_name) != Some(&version) => {
                    match crate::secrets::write_files(dir, sv, &values, uid, gid) {
                        Ok(()) => {
                            tracing::info!(replica = %replica, secret = %sv.secret_name, version, "secret volume updated");
                            versions.insert(sv.secret_name.clone(), version);
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
