//! The containerd implementation: images imported from OCI archives into the
//! content store and unpacked into the snapshotter, containers created from
//! the spec `spec.rs` builds, tasks started with output to files.
//!
//! Every call carries `containerd-namespace`. Call order follows
//! `docs/ARCHITECTURE.md` ("Agent runtime").

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_client::services::v1 as cd;
use containerd_client::types::{Descriptor, Mount};
use tonic::transport::Channel;
use tonic::{Code, Request};

use crate::image::{chain_ids, OciArchive, Resolved};
use crate::model::{ContainerConfig, ImageProcess, NodePolicy, Notice};
use crate::registry::{ImageName, PullProgress, RegistryClient, RemoteImage};
use crate::RuntimeError;

/// The spec's type URL; containerd's Go clients and `ctr` read only this one.
const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
/// Label on every container this runtime creates.
pub const MANAGED_LABEL: &str = "cloudless.dev/managed";
const NAMESPACE_KEY: &str = "containerd-namespace";
const LEASE_KEY: &str = "containerd-lease";
/// Bytes per `Content.Write` message.
const WRITE_CHUNK: usize = 1 << 20;

/// An image ready to run: its name, the snapshot of its unpacked layers and
/// the process settings from its configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// Image name in containerd.
    pub name: String,
    /// Chain id of the top layer (the snapshot containers are prepared from).
    pub chain_id: String,
    /// Entrypoint, cmd, env, working dir, user.
    pub process: ImageProcess,
}

/// How a task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit status (128 + signal when killed by a signal).
    pub code: u32,
}

/// A started container.
#[derive(Debug, Clone)]
pub struct Started {
    /// Container id.
    pub id: String,
    /// Process id of the container's init process on the host.
    pub pid: u32,
    /// Where stdout and stderr go.
    pub log_path: PathBuf,
    /// What the host could not enforce.
    pub notices: Vec<Notice>,
}

/// Resource usage of a running container, from its cgroups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// CPU time used so far, nanoseconds.
    pub cpu_ns: u64,
    /// Memory in use, bytes.
    pub memory_bytes: u64,
    /// Processes and threads.
    pub pids: u64,
    /// Bytes its network namespace received and sent on every interface but
    /// loopback, `(received, sent)`; `None` when it uses the host's network
    /// (or its namespace cannot be read).
    pub network: Option<(u64, u64)>,
}

/// Bytes received and sent on every interface but loopback, from the text
/// of a `/proc/<pid>/net/dev`: `(received, sent)`.
pub fn network_bytes(net_dev: &str) -> (u64, u64) {
    net_dev
        .lines()
        .skip(2)
        .filter_map(|l| l.split_once(':'))
        .filter(|(name, _)| name.trim() != "lo")
        .filter_map(|(_, counters)| {
            // receive: bytes packets errs drop fifo frame compressed multicast;
            // then transmit: bytes ... (a line that does not parse is left out)
            let f: Vec<u64> = counters
                .split_whitespace()
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?;
            Some((*f.first()?, *f.get(8)?))
        })
        .fold((0, 0), |(r, s), (r2, s2)| {
            (r.saturating_add(r2), s.saturating_add(s2))
        })
}

/// The network bytes of the namespace the first process in cgroup
/// directory `cgroup` runs in, unless that is the host's (this process's).
fn cgroup_network(cgroup: &str) -> Option<(u64, u64)> {
    let procs = std::fs::read_to_string(format!("{cgroup}/cgroup.procs")).ok()?;
    let pid: u32 = procs.lines().next()?.trim().parse().ok()?;
    let theirs = std::fs::read_link(format!("/proc/{pid}/ns/net")).ok()?;
    let ours = std::fs::read_link("/proc/self/ns/net").ok()?;
    if theirs == ours {
        return None;
    }
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).ok()?;
    Some(network_bytes(&text))
}

/// What a task is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    /// Created or running, with its host pid.
    Running(u32),
    /// Exited with this status.
    Stopped(u32),
    /// No task (never started, or deleted).
    Absent,
}

/// A connection to containerd in one namespace.
#[derive(Debug, Clone)]
pub struct Containerd {
    channel: Channel,
    namespace: String,
    snapshotter: String,
    log_dir: PathBuf,
    /// Containers the kernel OOM-killed (from containerd's `/tasks/oom` events).
    ooms: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

/// Where an image's blobs come from.
enum Blobs<'a> {
    Archive(&'a OciArchive),
    Remote {
        client: &'a RegistryClient,
        name: &'a ImageName,
        image: &'a RemoteImage,
        progress: &'a (dyn Fn(PullProgress) + Send + Sync),
    },
}

fn status(what: &str, s: tonic::Status) -> RuntimeError {
    RuntimeError::Containerd {
        what: what.to_owned(),
        code: s.code(),
        message: s.message().to_owned(),
    }
}

/// What a container is created with, besides its rootfs.
struct Prepared<'a> {
    /// The containerd runtime handler.
    handler: &'a str,
    /// The runtime spec, JSON.
    spec_json: Vec<u8>,
    /// Its host paths, open, checked in the created task before it starts.
    host_paths: &'a crate::HeldHostPaths,
}

impl Containerd {
    /// Connects to containerd's socket and checks it answers.
    pub async fn connect(
        socket: &Path,
        namespace: &str,
        log_dir: &Path,
    ) -> Result<Self, RuntimeError> {
        let channel = containerd_client::connect(socket)
            .await
            .map_err(|e| RuntimeError::Unavailable(format!("{}: {e}", socket.display())))?;
        // The shim opens output FIFOs from its own working directory.
        let log_dir = std::path::absolute(log_dir).map_err(|e| RuntimeError::io(log_dir, e))?;
        let this = Self {
            channel,
            namespace: namespace.to_owned(),
            snapshotter: "overlayfs".to_owned(),
            log_dir: log_dir.clone(),
            ooms: std::sync::Arc::default(),
        };
        cd::version_client::VersionClient::new(this.channel.clone())
            .version(())
            .await
            .map_err(|s| {
                RuntimeError::Unavailable(format!("{}: {}", socket.display(), s.message()))
            })?;
        std::fs::create_dir_all(&log_dir).map_err(|e| RuntimeError::io(&log_dir, e))?;
        this.watch_ooms();
        Ok(this)
    }

    fn fifo_path(&self, id: &str) -> PathBuf {
        self.log_dir.join(format!("{id}.fifo"))
    }

    /// Resumes copying the output of an adopted container (after an agent
    /// restart) into its log file.
    pub fn reattach_output(&self, id: &str) -> Result<(), RuntimeError> {
        copy_output(&self.fifo_path(id), &self.log_path(id))
    }

    /// Where the output of container `id` goes (rotated as `<path>.1` ...).
    pub fn log_path(&self, id: &str) -> PathBuf {
        self.log_dir.join(format!("{id}.log"))
    }

    /// The containerd namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Removes runc's state for `id` left by a task create that failed
    /// half-way (it would block the same id: "container with given ID
    /// already exists"). runc keeps it under `/run/containerd/runc/<namespace>`.
    fn clear_runc_state(&self, id: &str) {
        let root = format!("/run/containerd/runc/{}", self.namespace);
        match std::process::Command::new("runc")
            .args(["--root", &root, "delete", "--force", id])
            .output()
        {
            Ok(o) if o.status.success() => {
                tracing::warn!(container = %id, "removed leftover runc state");
            }
            _ => {}
        }
    }

    fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        if let Ok(v) = self.namespace.parse() {
            r.metadata_mut().insert(NAMESPACE_KEY, v);
        }
        r
    }

    /// A request under `lease`: what it creates is safe from garbage
    /// collection until the lease is deleted.
    fn leased<T>(&self, lease: &str, msg: T) -> Request<T> {
        let mut r = self.req(msg);
        if let Ok(v) = lease.parse() {
            r.metadata_mut().insert(LEASE_KEY, v);
        }
        r
    }

    async fn create_lease(&self, purpose: &str) -> Result<String, RuntimeError> {
        let id = format!(
            "cloudless-{purpose}-{}-{}",
            std::process::id(),
            unique_suffix()
        );
        cd::leases_client::LeasesClient::new(self.channel.clone())
            .create(self.req(cd::CreateRequest {
                id: id.clone(),
                labels: HashMap::new(),
            }))
            .await
            .map_err(|s| status("creating a lease", s))?;
        Ok(id)
    }

    async fn delete_lease(&self, id: &str) {
        let _ = cd::leases_client::LeasesClient::new(self.channel.clone())
            .delete(self.req(cd::DeleteRequest {
                id: id.to_owned(),
                // Collect now, before we prepare anything else: containerd
                // 1.6's overlayfs cleanup that follows a collection can
                // remove a snapshot prepared while it runs.
                sync: true,
            }))
            .await;
    }

    /// Writes one blob to the content store (already there: nothing to do).
    async fn write_blob(
        &self,
        lease: &str,
        desc: &Descriptor,
        data: &[u8],
        labels: HashMap<String, String>,
    ) -> Result<(), RuntimeError> {
        let mut content = cd::content_client::ContentClient::new(self.channel.clone());
        let info = content
            .info(self.req(cd::InfoRequest {
                digest: desc.digest.clone(),
            }))
            .await;
        if info.is_ok() {
            return Ok(());
        }
        // A reference of its own: two pulls of one image may write the same
        // blob at once (the second commit then finds it already there).
        let reference = format!("cloudless-import-{}-{}", desc.digest, unique_suffix());
        let total = i64::try_from(data.len()).unwrap_or(i64::MAX);
        let mut messages = Vec::new();
        let mut offset = 0usize;
        for chunk in data.chunks(WRITE_CHUNK) {
            messages.push(cd::WriteContentRequest {
                action: cd::WriteAction::Write as i32,
                r#ref: reference.clone(),
                total,
                expected: desc.digest.clone(),
                offset: i64::try_from(offset).unwrap_or(i64::MAX),
                data: chunk.to_vec(),
                labels: HashMap::new(),
            });
            offset += chunk.len();
        }
        messages.push(cd::WriteContentRequest {
            action: cd::WriteAction::Commit as i32,
            r#ref: reference.clone(),
            total,
            expected: desc.digest.clone(),
            offset: total,
            data: Vec::new(),
            labels,
        });
        let written = async {
            let mut responses = content
                .write(self.leased(lease, tokio_stream_iter(messages)))
                .await?
                .into_inner();
            while responses.message().await?.is_some() {}
            Ok::<(), tonic::Status>(())
        }
        .await;
        match written {
            Ok(()) => Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => {
                // Committed by a concurrent pull; pin it to our lease.
                self.abort_ingest(&reference).await;
                Ok(())
            }
            Err(s) => {
                self.abort_ingest(&reference).await;
                Err(status(&format!("writing blob {}", desc.digest), s))
            }
        }
    }

    /// Imports an OCI image layout archive (tar) and unpacks it. Every blob's
    /// digest is checked before anything is written.
    pub async fn import(&self, archive: &Path, name: &str) -> Result<ImageRef, RuntimeError> {
        let oci = OciArchive::open(archive)?;
        let lease = self.create_lease("import").await?;
        let result = self.import_leased(&oci, name, &lease).await;
        self.delete_lease(&lease).await;
        result
    }

    async fn import_leased(
        &self,
        oci: &OciArchive,
        name: &str,
        lease: &str,
    ) -> Result<ImageRef, RuntimeError> {
        let resolved = oci.resolve(crate::image::host_platform())?;
        self.store(lease, name, &resolved, Blobs::Archive(oci))
            .await
    }

    /// Pulls `reference` from its registry for this node's platform, every
    /// blob checked against its digest, and unpacks it. Blobs already in
    /// the content store are not downloaded again. `progress` hears bytes
    /// done and total as the download proceeds. On failure nothing is left
    /// behind (partial downloads are aborted and collected with the lease).
    pub async fn pull(
        &self,
        client: &RegistryClient,
        reference: &str,
        progress: &(dyn Fn(PullProgress) + Send + Sync),
    ) -> Result<ImageRef, RuntimeError> {
        let name = ImageName::parse(reference)?;
        let remote = client.resolve(&name, crate::image::host_platform()).await?;
        let lease = self.create_lease("pull").await?;
        let result = self
            .store(
                &lease,
                &name.to_string(),
                &remote.resolved,
                Blobs::Remote {
                    client,
                    name: &name,
                    image: &remote,
                    progress,
                },
            )
            .await;
        self.delete_lease(&lease).await;
        result
    }

    async fn content_exists(&self, digest: &str) -> bool {
        cd::content_client::ContentClient::new(self.channel.clone())
            .info(self.req(cd::InfoRequest {
                digest: digest.to_owned(),
            }))
            .await
            .is_ok()
    }

    /// Writes the blobs of `resolved`, the image record, and unpacks it.
    async fn store(
        &self,
        lease: &str,
        name: &str,
        resolved: &Resolved,
        blobs: Blobs<'_>,
    ) -> Result<ImageRef, RuntimeError> {
        let config_labels = HashMap::from([(
            format!("containerd.io/gc.ref.snapshot.{}", self.snapshotter),
            chain_ids(&resolved.diff_ids)
                .last()
                .cloned()
                .unwrap_or_default(),
        )]);
        let total: u64 = resolved
            .layers
            .iter()
            .chain([&resolved.config, &resolved.manifest])
            .map(|d| u64::try_from(d.size).unwrap_or(0))
            .sum();
        let (mut done, mut found) = (0u64, 0u64);
        for layer in &resolved.layers {
            match &blobs {
                Blobs::Archive(oci) => {
                    self.write_blob(lease, layer, oci.blob(&layer.digest)?, HashMap::new())
                        .await?;
                }
                Blobs::Remote {
                    client,
                    name,
                    progress,
                    ..
                } => {
                    if self.content_exists(&layer.digest).await {
                        // Pin it to this lease until the image record holds it.
                        self.write_blob(lease, layer, &[], HashMap::new()).await?;
                        let size = u64::try_from(layer.size).unwrap_or(0);
                        done += size;
                        found += size;
                        progress(PullProgress { done, total, found });
                    } else {
                        let resp = client.blob(name, layer).await?;
                        let so_far = PullProgress { done, total, found };
                        done = self
                            .stream_blob(lease, name, layer, resp, so_far, *progress)
                            .await?;
                    }
                }
            }
        }
        let (config_bytes, manifest_bytes) = match &blobs {
            Blobs::Archive(oci) => (
                oci.blob(&resolved.config.digest)?,
                oci.blob(&resolved.manifest.digest)?,
            ),
            Blobs::Remote { image, .. } => (image.config.as_slice(), image.manifest.as_slice()),
        };
        self.write_blob(lease, &resolved.config, config_bytes, config_labels)
            .await?;
        let mut manifest_labels = HashMap::from([(
            "containerd.io/gc.ref.content.config".to_owned(),
            resolved.config.digest.clone(),
        )]);
        for (i, l) in resolved.layers.iter().enumerate() {
            manifest_labels.insert(
                format!("containerd.io/gc.ref.content.l.{i}"),
                l.digest.clone(),
            );
        }
        self.write_blob(lease, &resolved.manifest, manifest_bytes, manifest_labels)
            .await?;
        if let Blobs::Remote { progress, .. } = &blobs {
            progress(PullProgress {
                done: total,
                total,
                found,
            });
        }
        let image = cd::Image {
            name: name.to_owned(),
            labels: HashMap::new(),
            target: Some(resolved.manifest.clone()),
            created_at: None,
            updated_at: None,
        };
        let mut images = cd::images_client::ImagesClient::new(self.channel.clone());
        let created = images
            .create(self.req(cd::CreateImageRequest {
                image: Some(image.clone()),
                source_date_epoch: None,
            }))
            .await;
        match created {
            Ok(_) => {}
            Err(s) if s.code() == Code::AlreadyExists => {
                images
                    .update(self.req(cd::UpdateImageRequest {
                        image: Some(image),
                        update_mask: None,
                        source_date_epoch: None,
                    }))
                    .await
                    .map_err(|s| status("updating the image record", s))?;
            }
            Err(s) => return Err(status("creating the image record", s)),
        }
        let chain_id = self
            .unpack(lease, &resolved.layers, &resolved.diff_ids)
            .await?;
        Ok(ImageRef {
            name: name.to_owned(),
            chain_id,
            process: resolved.process.clone(),
        })
    }

    /// Streams a downloading blob into the content store, hashing as it
    /// goes; a blob whose content does not match its digest (or size) is
    /// aborted and never committed. Returns the new `done` byte count.
    async fn stream_blob(
        &self,
        lease: &str,
        name: &ImageName,
        desc: &Descriptor,
        mut resp: reqwest::Response,
        so_far: PullProgress,
        progress: &(dyn Fn(PullProgress) + Send + Sync),
    ) -> Result<u64, RuntimeError> {
        let PullProgress {
            mut done,
            total,
            found,
        } = so_far;
        let reference = format!("cloudless-pull-{}-{}", desc.digest, unique_suffix());
        let expected_size = u64::try_from(desc.size).unwrap_or(0);
        let (tx, rx) = tokio::sync::mpsc::channel::<cd::WriteContentRequest>(4);
        let request = self.leased(
            lease,
            tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(rx),
        );
        let mut content = cd::content_client::ContentClient::new(self.channel.clone());
        let writer = tokio::spawn(async move {
            let mut responses = content.write(request).await?.into_inner();
            while responses.message().await?.is_some() {}
            Ok::<(), tonic::Status>(())
        });
        let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
        let mut offset: u64 = 0;
        let bad = |problem: String| RuntimeError::Registry {
            registry: name.registry.clone(),
            reference: name.to_string(),
            problem,
        };
        let outcome: Result<(), RuntimeError> = async {
            loop {
                let chunk = resp.chunk().await.map_err(|e| {
                    bad(format!(
                        "downloading blob {}: {}",
                        desc.digest,
                        crate::registry::error_chain(&e)
                    ))
                })?;
                let Some(chunk) = chunk else { break };
                let len = u64::try_from(chunk.len()).unwrap_or(u64::MAX);
                if offset + len > expected_size {
                    return Err(bad(format!(
                        "blob {} is larger than the {expected_size} bytes its descriptor says",
                        desc.digest
                    )));
                }
                hasher.update(&chunk);
                tx.send(cd::WriteContentRequest {
                    action: cd::WriteAction::Write as i32,
                    r#ref: reference.clone(),
                    total: desc.size,
                    expected: desc.digest.clone(),
                    offset: i64::try_from(offset).unwrap_or(i64::MAX),
                    data: chunk.to_vec(),
                    labels: HashMap::new(),
                })
                .await
                .map_err(|_| bad("the content store stopped accepting the blob".into()))?;
                offset += len;
                done += len;
                progress(PullProgress { done, total, found });
            }
            let hex: String = hasher
                .clone()
                .finish()
                .as_ref()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            let actual = format!("sha256:{hex}");
            if actual != desc.digest || offset != expected_size {
                return Err(bad(format!(
                    "blob {} is corrupt: {offset} bytes hashing to {actual} (expected {expected_size} bytes)",
                    desc.digest
                )));
            }
            tx.send(cd::WriteContentRequest {
                action: cd::WriteAction::Commit as i32,
                r#ref: reference.clone(),
                total: desc.size,
                expected: desc.digest.clone(),
                offset: desc.size,
                data: Vec::new(),
                labels: HashMap::new(),
            })
            .await
            .map_err(|_| bad("the content store stopped accepting the blob".into()))?;
            Ok(())
        }
        .await;
        drop(tx);
        let written = writer.await;
        let failed = match (&outcome, written) {
            (Err(_), _) => true,
            (Ok(()), Ok(Ok(()))) => false,
            (Ok(()), Ok(Err(s))) if s.code() == Code::AlreadyExists => false,
            (Ok(()), Ok(Err(s))) => {
                self.abort_ingest(&reference).await;
                return Err(status(&format!("writing blob {}", desc.digest), s));
            }
            (Ok(()), Err(e)) => {
                self.abort_ingest(&reference).await;
                return Err(RuntimeError::Internal(format!("blob writer: {e}")));
            }
        };
        if failed {
            self.abort_ingest(&reference).await;
        }
        outcome.map(|()| done)
    }

    async fn abort_ingest(&self, reference: &str) {
        let _ = cd::content_client::ContentClient::new(self.channel.clone())
            .abort(self.req(cd::AbortRequest {
                r#ref: reference.to_owned(),
            }))
            .await;
    }

    /// Applies each layer onto its parent snapshot, skipping those already
    /// unpacked; returns the top chain id.
    async fn unpack(
        &self,
        lease: &str,
        layers: &[Descriptor],
        diff_ids: &[String],
    ) -> Result<String, RuntimeError> {
        let chains = chain_ids(diff_ids);
        let mut snapshots =
            cd::snapshots::snapshots_client::SnapshotsClient::new(self.channel.clone());
        let mut diff = cd::diff_client::DiffClient::new(self.channel.clone());
        let mut parent = String::new();
        for (layer, chain) in layers.iter().zip(&chains) {
            let exists = snapshots
                .stat(self.req(cd::snapshots::StatSnapshotRequest {
                    snapshotter: self.snapshotter.clone(),
                    key: chain.clone(),
                }))
                .await
                .is_ok();
            if !exists {
                let key = format!("extract-{}-{chain}", std::process::id());
                let mounts = snapshots
                    .prepare(self.leased(
                        lease,
                        cd::snapshots::PrepareSnapshotRequest {
                            snapshotter: self.snapshotter.clone(),
                            key: key.clone(),
                            parent: parent.clone(),
                            labels: HashMap::new(),
                        },
                    ))
                    .await
                    .map_err(|s| status("preparing a layer snapshot", s))?
                    .into_inner()
                    .mounts;
                let applied = diff
                    .apply(self.leased(
                        lease,
                        cd::ApplyRequest {
                            diff: Some(layer.clone()),
                            mounts,
                            payloads: HashMap::new(),
                            sync_fs: false,
                        },
                    ))
                    .await;
                if let Err(s) = applied {
                    let _ = snapshots
                        .remove(self.req(cd::snapshots::RemoveSnapshotRequest {
                            snapshotter: self.snapshotter.clone(),
                            key,
                        }))
                        .await;
                    return Err(status(&format!("applying layer {}", layer.digest), s));
                }
                snapshots
                    .commit(self.leased(
                        lease,
                        cd::snapshots::CommitSnapshotRequest {
                            snapshotter: self.snapshotter.clone(),
                            name: chain.clone(),
                            key,
                            labels: HashMap::new(),
                        },
                    ))
                    .await
                    .map_err(|s| status("committing a layer snapshot", s))?;
            }
            parent = chain.clone();
        }
        Ok(parent)
    }

    /// Creates and starts `c` from `image`. On any failure everything created
    /// so far is removed again.
    pub async fn start(
        &self,
        c: &ContainerConfig,
        image: &ImageRef,
        node: &NodePolicy,
    ) -> Result<Started, RuntimeError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.start_once(c, image, node).await {
                // containerd 1.6's overlayfs cleanup after a garbage
                // collection can remove a snapshot prepared while it runs;
                // mounting the rootfs, or a mount inside it, then fails with
                // ENOENT. A create that failed half-way (here or before a
                // crash) leaves runc state that blocks the id. Everything
                // is removed, runc's state too: try again.
                Err(RuntimeError::Containerd { what, message, .. })
                    if attempt < 4
                        && what == "creating the task"
                        && (message.contains("no such file or directory")
                            || message.contains("container with given ID already exists")) =>
                {
                    tracing::warn!(container = %c.id, attempt, "rootfs snapshot vanished during create; retrying");
                    self.clear_runc_state(&c.id);
                }
                other => return other,
            }
        }
    }

    async fn start_once(
        &self,
        c: &ContainerConfig,
        image: &ImageRef,
        node: &NodePolicy,
    ) -> Result<Started, RuntimeError> {
        // The cgroup parent is this runtime's containerd namespace.
        let node = NodePolicy {
            namespace: self.namespace.clone(),
            ..node.clone()
        };
        let mut built = crate::spec::build(c, &image.process, &node)?;
        // Host paths are opened beneath their allowed prefix, held open
        // until the task exists, and checked in it before it starts.
        let host_paths = crate::HeldHostPaths::open(&c.mounts, &node.allowed_host_paths)?;
        host_paths.apply(&mut built.spec);
        let spec_json = serde_json::to_vec(&built.spec)
            .map_err(|e| RuntimeError::Internal(format!("encoding the spec: {e}")))?;
        let log_path = self.log_path(&c.id);
        std::fs::File::create(&log_path).map_err(|e| RuntimeError::io(&log_path, e))?;
        let mut snapshots =
            cd::snapshots::snapshots_client::SnapshotsClient::new(self.channel.clone());
        let mounts: Vec<Mount> = snapshots
            .prepare(self.req(cd::snapshots::PrepareSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                key: c.id.clone(),
                parent: image.chain_id.clone(),
                labels: HashMap::new(),
            }))
            .await
            .map_err(|s| status("preparing the container snapshot", s))?
            .into_inner()
            .mounts;
        let result = self
            .create_and_start(
                c,
                image,
                Prepared {
                    handler: &built.runtime_handler,
                    spec_json,
                    host_paths: &host_paths,
                },
                mounts,
                &log_path,
            )
            .await;
        drop(host_paths);
        match result {
            Ok(pid) => Ok(Started {
                id: c.id.clone(),
                pid,
                log_path,
                notices: built.notices,
            }),
            Err(e) => {
                self.remove(&c.id).await;
                Err(e)
            }
        }
    }

    async fn create_and_start(
        &self,
        c: &ContainerConfig,
        image: &ImageRef,
        prepared: Prepared<'_>,
        mounts: Vec<Mount>,
        log_path: &Path,
    ) -> Result<u32, RuntimeError> {
        let Prepared {
            handler,
            spec_json,
            host_paths,
        } = prepared;
        let container = cd::Container {
            id: c.id.clone(),
            labels: HashMap::from([(MANAGED_LABEL.to_owned(), "true".to_owned())]),
            image: image.name.clone(),
            runtime: Some(cd::container::Runtime {
                name: handler.to_owned(),
                options: None,
            }),
            spec: Some(prost_types::Any {
                type_url: SPEC_TYPE_URL.to_owned(),
                value: spec_json,
            }),
            snapshotter: self.snapshotter.clone(),
            snapshot_key: c.id.clone(),
            created_at: None,
            updated_at: None,
            extensions: HashMap::new(),
            sandbox: String::new(),
        };
        cd::containers_client::ContainersClient::new(self.channel.clone())
            .create(self.req(cd::CreateContainerRequest {
                container: Some(container),
            }))
            .await
            .map_err(|s| status("creating the container", s))?;
        // Output goes through a FIFO that we read ourselves (as `ctr` does):
        // the shim's own file:// copying can drop the output of a process
        // that exits at once. Held open read-write so the shim's open does
        // not block; swapped for a read-only handle once the shim has it.
        let fifo = self.fifo_path(&c.id);
        let holder = output_fifo(&fifo)?;
        let fifo_str = fifo.display().to_string();
        let mut tasks = cd::tasks_client::TasksClient::new(self.channel.clone());
        let created = tasks
            .create(self.req(cd::CreateTaskRequest {
                container_id: c.id.clone(),
                rootfs: mounts,
                stdin: String::new(),
                stdout: fifo_str.clone(),
                stderr: fifo_str,
                terminal: false,
                checkpoint: None,
                options: None,
                runtime_path: String::new(),
            }))
            .await
            .map_err(|s| status("creating the task", s))?
            .into_inner();
        // Before any process of the container runs: its host paths are the
        // files checked beneath their prefixes.
        host_paths.verify_in(created.pid)?;
        copy_output(&fifo, log_path)?;
        drop(holder);
        tasks
            .start(self.req(cd::StartRequest {
                container_id: c.id.clone(),
                exec_id: String::new(),
            }))
            .await
            .map_err(|s| status("starting the task", s))?;
        Ok(created.pid)
    }

    /// Waits until the task of `id` exits.
    pub async fn wait(&self, id: &str) -> Result<Exit, RuntimeError> {
        let r = cd::tasks_client::TasksClient::new(self.channel.clone())
            .wait(self.req(cd::WaitRequest {
                container_id: id.to_owned(),
                exec_id: String::new(),
            }))
            .await
            .map_err(|s| status("waiting for the task", s))?
            .into_inner();
        Ok(Exit {
            code: r.exit_status,
        })
    }

    /// Stops `id`: SIGTERM, then SIGKILL after `grace`. Returns how it exited.
    pub async fn stop(&self, id: &str, grace: Duration) -> Result<Exit, RuntimeError> {
        let mut tasks = cd::tasks_client::TasksClient::new(self.channel.clone());
        let kill = |signal: u32| cd::KillRequest {
            container_id: id.to_owned(),
            exec_id: String::new(),
            signal,
            all: true,
        };
        let waiter = self.wait(id);
        tokio::pin!(waiter);
        if let Err(s) = tasks.kill(self.req(kill(15))).await {
            if s.code() != Code::NotFound {
                return Err(status("signalling the task", s));
            }
        }
        tokio::select! {
            r = &mut waiter => return r,
            () = tokio::time::sleep(grace) => {}
        }
        tasks
            .kill(self.req(kill(9)))
            .await
            .map_err(|s| status("killing the task", s))?;
        waiter.await
    }

    /// Removes the task, the container and its snapshot; whatever is missing
    /// is skipped, so this also cleans up after a failed start.
    pub async fn remove(&self, id: &str) {
        let _ = std::fs::remove_file(self.fifo_path(id));
        let _ = cd::tasks_client::TasksClient::new(self.channel.clone())
            .delete(self.req(cd::DeleteTaskRequest {
                container_id: id.to_owned(),
            }))
            .await;
        let _ = cd::containers_client::ContainersClient::new(self.channel.clone())
            .delete(self.req(cd::DeleteContainerRequest { id: id.to_owned() }))
            .await;
        let _ = cd::snapshots::snapshots_client::SnapshotsClient::new(self.channel.clone())
            .remove(self.req(cd::snapshots::RemoveSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                key: id.to_owned(),
            }))
            .await;
    }

    /// The task state of container `id`.
    pub async fn task_state(&self, id: &str) -> Result<TaskState, RuntimeError> {
        let r = cd::tasks_client::TasksClient::new(self.channel.clone())
            .get(self.req(cd::GetRequest {
                container_id: id.to_owned(),
                exec_id: String::new(),
            }))
            .await;
        let process = match r {
            Ok(r) => r.into_inner().process,
            Err(s) if s.code() == Code::NotFound => return Ok(TaskState::Absent),
            Err(s) => return Err(status("reading the task", s)),
        };
        let Some(p) = process else {
            return Ok(TaskState::Absent);
        };
        // containerd.v1.types.Status: 1 created, 2 running, 3 stopped, 4/5 paused.
        Ok(match p.status {
            3 => TaskState::Stopped(p.exit_status),
            0 => TaskState::Absent,
            _ => TaskState::Running(p.pid),
        })
    }

    /// Subscribes to containerd's OOM events for this namespace; the
    /// subscription lives as long as the connection.
    fn watch_ooms(&self) {
        // containerd sends the stream's headers only with the first event,
        // so the subscription is awaited in its own task.
        let mut client = cd::events_client::EventsClient::new(self.channel.clone());
        let request = cd::SubscribeRequest {
            filters: vec![format!(
                "topic==\"/tasks/oom\",namespace==\"{}\"",
                self.namespace
            )],
        };
        let ooms = std::sync::Arc::downgrade(&self.ooms);
        tokio::spawn(async move {
            let mut events = match client.subscribe(request).await {
                Ok(r) => r.into_inner(),
                Err(s) => {
                    tracing::warn!(error = %s.message(), "cannot subscribe to containerd OOM events");
                    return;
                }
            };
            while let Ok(Some(envelope)) = events.message().await {
                let Some(any) = envelope.event else { continue };
                let Ok(oom) = <containerd_client::events::TaskOom as prost::Message>::decode(
                    any.value.as_slice(),
                ) else {
                    continue;
                };
                let Some(set) = ooms.upgrade() else { return };
                set.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(oom.container_id);
            }
        });
    }

    /// Whether the kernel OOM-killed a process of container `id` since the
    /// last call (containerd reports it as an event around the exit, so a
    /// caller that saw exit 137 waits briefly for it).
    pub async fn oom_killed(&self, id: &str, exit_code: u32) -> bool {
        let take = || {
            self.ooms
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(id)
        };
        if take() {
            return true;
        }
        if exit_code != 137 {
            return false;
        }
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if take() {
                return true;
            }
        }
        false
    }

    /// Runs `argv` inside the running container `id` with the container's
    /// user and environment; returns its exit status and output (at most
    /// [`MAX_EXEC_OUTPUT`] bytes). Killed after `timeout`.
    pub async fn exec(
        &self,
        id: &str,
        argv: &[String],
        timeout: Duration,
    ) -> Result<(u32, String), RuntimeError> {
        let (tx, mut rx) = tokio::sync::mpsc::channel(EXEC_CHUNKS_IN_FLIGHT);
        let run = self.exec_streaming(id, argv, timeout, tx);
        tokio::pin!(run);
        let mut output = Vec::new();
        let code = loop {
            tokio::select! {
                r = &mut run => break r,
                Some(chunk) = rx.recv() => output.extend_from_slice(&chunk),
            }
        };
        while let Ok(chunk) = rx.try_recv() {
            output.extend_from_slice(&chunk);
        }
        code.map(|c| (c, String::from_utf8_lossy(&output).into_owned()))
    }

    /// Like [`Containerd::exec`], sending the output (stdout and stderr
    /// together) to `out` in chunks of at most [`EXEC_CHUNK`] bytes as it
    /// comes, straight from the FIFO: it never touches the disk, and at most
    /// [`MAX_EXEC_OUTPUT`] bytes are sent (then a note; the rest is read and
    /// dropped). The receiver must keep reading while this runs.
    pub async fn exec_streaming(
        &self,
        id: &str,
        argv: &[String],
        timeout: Duration,
        out: tokio::sync::mpsc::Sender<Vec<u8>>,
    ) -> Result<u32, RuntimeError> {
        let container = cd::containers_client::ContainersClient::new(self.channel.clone())
            .get(self.req(cd::GetContainerRequest { id: id.to_owned() }))
            .await
            .map_err(|s| status("reading the container", s))?
            .into_inner()
            .container
            .ok_or_else(|| RuntimeError::Internal("container without a record".into()))?;
        let spec: serde_json::Value = container
            .spec
            .map(|a| serde_json::from_slice(&a.value))
            .transpose()
            .map_err(|e| RuntimeError::Internal(format!("stored spec: {e}")))?
            .unwrap_or_default();
        let mut process = spec["process"].clone();
        process["args"] = serde_json::json!(argv);
        process["terminal"] = serde_json::json!(false);
        let exec_id = format!("exec-{}", unique_suffix());
        // Output through a FIFO we read into memory (a FIFO holds no data
        // on disk).
        let fifo = self.log_dir.join(format!("{id}.{exec_id}.fifo"));
        let holder = output_fifo(&fifo)?;
        let out_uri = fifo.display().to_string();
        let mut tasks = cd::tasks_client::TasksClient::new(self.channel.clone());
        tasks
            .exec(
                self.req(cd::ExecProcessRequest {
                    container_id: id.to_owned(),
                    stdin: String::new(),
                    stdout: out_uri.clone(),
                    stderr: out_uri,
                    terminal: false,
                    spec: Some(prost_types::Any {
                        type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process"
                            .into(),
                        value: serde_json::to_vec(&process)
                            .map_err(|e| RuntimeError::Internal(e.to_string()))?,
                    }),
                    exec_id: exec_id.clone(),
                }),
            )
            .await
            .map_err(|s| {
                let _ = std::fs::remove_file(&fifo);
                status("creating the exec process", s)
            })?;
        let copier = pump_output(&fifo, out, MAX_EXEC_OUTPUT)?;
        let wait = tasks.wait(self.req(cd::WaitRequest {
            container_id: id.to_owned(),
            exec_id: exec_id.clone(),
        }));
        let mut starter = cd::tasks_client::TasksClient::new(self.channel.clone());
        let started = starter
            .start(self.req(cd::StartRequest {
                container_id: id.to_owned(),
                exec_id: exec_id.clone(),
            }))
            .await;
        // Only now: the shim opens the FIFO when the process starts. Had
        // our writer end closed earlier, the copier could have seen EOF and
        // removed the FIFO before the shim opened it.
        drop(holder);
        let code = match started {
            Err(s) => Err(status("starting the exec process", s)),
            Ok(_) => match tokio::time::timeout(timeout, wait).await {
                Ok(Ok(r)) => Ok(r.into_inner().exit_status),
                Ok(Err(s)) => Err(status("waiting for the exec process", s)),
                Err(_) => {
                    let _ = starter
                        .kill(self.req(cd::KillRequest {
                            container_id: id.to_owned(),
                            exec_id: exec_id.clone(),
                            signal: 9,
                            all: false,
                        }))
                        .await;
                    Err(RuntimeError::Timeout(format!(
                        "exec in {id} did not finish within {timeout:?}"
                    )))
                }
            },
        };
        let _ = starter
            .delete_process(self.req(cd::DeleteProcessRequest {
                container_id: id.to_owned(),
                exec_id,
            }))
            .await;
        // Deleting the process closed the shim's end: the copier finishes.
        let joined = tokio::task::spawn_blocking(move || copier.join());
        let _ = tokio::time::timeout(Duration::from_secs(2), joined).await;
        code
    }

    /// Resource usage of container `id` (cgroup v1 or v2); `None` when it
    /// has no cgroup (not running).
    pub fn usage(&self, id: &str) -> Option<Usage> {
        let read = |p: String| -> Option<u64> {
            std::fs::read_to_string(p)
                .ok()
                .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        };
        let ns = &self.namespace;
        let v2 = format!("/sys/fs/cgroup/{ns}/{id}");
        if Path::new(&v2).join("cgroup.controllers").exists() {
            let cpu_us = std::fs::read_to_string(format!("{v2}/cpu.stat"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("usage_usec "))
                        .and_then(|v| v.trim().parse::<u64>().ok())
                })
                .unwrap_or(0);
            return Some(Usage {
                cpu_ns: cpu_us * 1000,
                memory_bytes: read(format!("{v2}/memory.current")).unwrap_or(0),
                pids: read(format!("{v2}/pids.current")).unwrap_or(0),
                network: cgroup_network(&v2),
            });
        }
        let memory = read(format!(
            "/sys/fs/cgroup/memory/{ns}/{id}/memory.usage_in_bytes"
        ))?;
        Some(Usage {
            cpu_ns: read(format!("/sys/fs/cgroup/cpuacct/{ns}/{id}/cpuacct.usage")).unwrap_or(0),
            memory_bytes: memory,
            pids: read(format!("/sys/fs/cgroup/pids/{ns}/{id}/pids.current")).unwrap_or(0),
            network: cgroup_network(&format!("/sys/fs/cgroup/memory/{ns}/{id}")),
        })
    }

    /// Deletes every image not named in `keep` and not used by a container
    /// of this namespace; containerd then collects their content and
    /// snapshots. Returns the names removed.
    pub async fn remove_unused_images(&self, keep: &[String]) -> Result<Vec<String>, RuntimeError> {
        let used: Vec<String> = cd::containers_client::ContainersClient::new(self.channel.clone())
            .list(self.req(cd::ListContainersRequest { filters: vec![] }))
            .await
            .map_err(|s| status("listing containers", s))?
            .into_inner()
            .containers
            .into_iter()
            .map(|c| c.image)
            .collect();
        let mut images = cd::images_client::ImagesClient::new(self.channel.clone());
        let all = images
            .list(self.req(cd::ListImagesRequest { filters: vec![] }))
            .await
            .map_err(|s| status("listing images", s))?
            .into_inner()
            .images;
        let mut removed = Vec::new();
        for image in all {
            if keep.contains(&image.name) || used.contains(&image.name) {
                continue;
            }
            images
                .delete(self.req(cd::DeleteImageRequest {
                    name: image.name.clone(),
                    sync: true,
                    target: None,
                }))
                .await
                .map_err(|s| status(&format!("deleting image {}", image.name), s))?;
            tracing::info!(image = %image.name, "removed an unused image");
            removed.push(image.name);
        }
        Ok(removed)
    }

    /// Digests in the content store, and references of unfinished
    /// downloads (ingests), for checks that nothing was left behind.
    pub async fn content(&self) -> Result<(Vec<String>, Vec<String>), RuntimeError> {
        let mut client = cd::content_client::ContentClient::new(self.channel.clone());
        let mut blobs = Vec::new();
        let mut stream = client
            .list(self.req(cd::ListContentRequest { filters: vec![] }))
            .await
            .map_err(|s| status("listing content", s))?
            .into_inner();
        while let Some(page) = stream
            .message()
            .await
            .map_err(|s| status("listing content", s))?
        {
            blobs.extend(page.info.into_iter().map(|i| i.digest));
        }
        let ingests = client
            .list_statuses(self.req(cd::ListStatusesRequest { filters: vec![] }))
            .await
            .map_err(|s| status("listing ingests", s))?
            .into_inner()
            .statuses
            .into_iter()
            .map(|s| s.r#ref)
            .collect();
        Ok((blobs, ingests))
    }

    /// Names of the images in this namespace.
    pub async fn images(&self) -> Result<Vec<String>, RuntimeError> {
        Ok(cd::images_client::ImagesClient::new(self.channel.clone())
            .list(self.req(cd::ListImagesRequest { filters: vec![] }))
            .await
            .map_err(|s| status("listing images", s))?
            .into_inner()
            .images
            .into_iter()
            .map(|i| i.name)
            .collect())
    }

    /// Ids of the containers this runtime manages in its namespace.
    pub async fn managed(&self) -> Result<Vec<String>, RuntimeError> {
        let r = cd::containers_client::ContainersClient::new(self.channel.clone())
            .list(self.req(cd::ListContainersRequest {
                filters: vec![format!("labels.\"{MANAGED_LABEL}\"==true")],
            }))
            .await
            .map_err(|s| status("listing containers", s))?
            .into_inner();
        Ok(r.containers.into_iter().map(|c| c.id).collect())
    }
}

/// A suffix for lease and exec ids: the clock in nanoseconds, in hex.
fn unique_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{nanos:x}")
}

/// A FIFO for a process's stdout and stderr, held open read-write (returned)
/// so that the shim's open does not block until `copy_output` takes over.
fn output_fifo(path: &Path) -> Result<std::fs::File, RuntimeError> {
    let _ = std::fs::remove_file(path);
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .map_err(|e| RuntimeError::io(path, std::io::Error::from(e)))?;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| RuntimeError::io(path, e))
}

/// Most bytes of one exec's output that are kept or sent.
pub const MAX_EXEC_OUTPUT: usize = 16 * 1024 * 1024;
/// Largest chunk of exec output sent at once (well under gRPC's 4 MiB).
pub const EXEC_CHUNK: usize = 32 * 1024;
/// Chunks buffered between the FIFO reader and the receiver.
const EXEC_CHUNKS_IN_FLIGHT: usize = 8;

/// Reads what is written to `fifo` on a thread of its own, until the last
/// writer (the shim) closes it, and sends it to `out` (see [`pump`]);
/// removes the FIFO at the end.
fn pump_output(
    fifo: &Path,
    out: tokio::sync::mpsc::Sender<Vec<u8>>,
    limit: usize,
) -> Result<std::thread::JoinHandle<()>, RuntimeError> {
    let reader = std::fs::File::open(fifo).map_err(|e| RuntimeError::io(fifo, e))?;
    let fifo = fifo.to_owned();
    std::thread::Builder::new()
        .name("exec-output".into())
        .spawn(move || {
            pump(reader, &out, limit);
            let _ = std::fs::remove_file(&fifo);
        })
        .map_err(|e| RuntimeError::Internal(format!("cannot start the output reader: {e}")))
}

/// Sends what `reader` yields to `out` in chunks of at most [`EXEC_CHUNK`]
/// bytes (blocking while `out` is full, which holds the writer back), up to
/// `limit` bytes and then a note; reads the rest to the end and drops it, as
/// it does once `out` is closed, so the writer never blocks for good.
fn pump(mut reader: impl std::io::Read, out: &tokio::sync::mpsc::Sender<Vec<u8>>, limit: usize) {
    let mut buf = vec![0u8; EXEC_CHUNK];
    let mut sent = 0usize;
    let mut open = true;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        if !open || sent >= limit {
            continue;
        }
        let take = n.min(limit - sent);
        sent += take;
        let mut chunk = buf[..take].to_vec();
        if sent >= limit {
            chunk.extend_from_slice(
                format!("\n[cloudless: output cut at {limit} bytes; the rest was dropped]\n")
                    .as_bytes(),
            );
        }
        open = out.blocking_send(chunk).is_ok();
    }
}

/// Copies everything written to `fifo` into `log` (appending), until the
/// last writer (the shim) closes it; removes the FIFO then. The FIFO is read
/// by a task on the runtime and the file written by the node's one log
/// writer thread ([`log_writer`]): a node runs a copier per container, and
/// a thread per container costs its stack (about 20 KiB each), while a
/// slow disk must hold back neither the runtime's workers nor more than
/// this one thread. Call it while a writer holds the FIFO open: it ends
/// when the last writer closes it.
fn copy_output(fifo: &Path, log: &Path) -> Result<(), RuntimeError> {
    let reader = tokio::net::unix::pipe::OpenOptions::new()
        .open_receiver(fifo)
        .map_err(|e| RuntimeError::io(fifo, e))?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| RuntimeError::io(log, e))?;
    let file = std::sync::Arc::new(file);
    let writer = log_writer().clone();
    let fifo = fifo.to_owned();
    tokio::spawn(async move {
        loop {
            if reader.readable().await.is_err() {
                break;
            }
            // The buffer is not held across the await below (not kept in
            // the task between reads).
            let data = {
                let mut buf = [0u8; 8192];
                match reader.try_read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => buf[..n].to_vec(),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            };
            // Waits while the writer is behind: the container's writes
            // then wait in the FIFO, as they did on a thread of its own.
            if writer.send((file.clone(), data)).await.is_err() {
                break;
            }
        }
        let _ = std::fs::remove_file(&fifo);
    });
    Ok(())
}

/// What the log writer appends: a container's log file and its output.
type LogChunk = (std::sync::Arc<std::fs::File>, Vec<u8>);

/// The node's log writer: one thread appending every container's output
/// to its log file, in the order each container wrote it. Started on first
/// use; if it cannot be started, copiers end (their output is lost, the
/// containers run on).
fn log_writer() -> &'static tokio::sync::mpsc::Sender<LogChunk> {
    static WRITER: std::sync::OnceLock<tokio::sync::mpsc::Sender<LogChunk>> =
        std::sync::OnceLock::new();
    WRITER.get_or_init(|| {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<LogChunk>(256);
        let started = std::thread::Builder::new()
            .name("container-logs".into())
            .spawn(move || {
                use std::io::Write as _;
                while let Some((file, data)) = rx.blocking_recv() {
                    let _ = (&*file).write_all(&data);
                }
            });
        if let Err(e) = started {
            tracing::error!(error = %e, "cannot start the container log writer; container output is not kept");
        }
        tx
    })
}

/// A stream over already-built messages.
fn tokio_stream_iter<T: Send + 'static>(
    items: Vec<T>,
) -> impl tonic::codegen::tokio_stream::Stream<Item = T> + Send + 'static {
    tonic::codegen::tokio_stream::iter(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_bytes_add_every_interface_but_loopback() {
        let text = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:  123456     100    0    0    0     0          0         0   123456     100    0    0    0     0       0          0
  eth0:    1000      10    0    0    0     0          0         0     2000      20    0    0    0     0       0          0
  eth1:      30       1    0    0    0     0          0         0       40       1    0    0    0     0       0          0
";
        assert_eq!(network_bytes(text), (1030, 2040));
        assert_eq!(network_bytes(""), (0, 0));
        assert_eq!(network_bytes("a\nb\n  eth0: garbage\n"), (0, 0));
    }

    /// What `pump` sends for `input` with `limit`, chunk by chunk.
    fn pumped(input: Vec<u8>, limit: usize) -> Vec<Vec<u8>> {
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let reader = std::thread::spawn(move || pump(&input[..], &tx, limit));
        let mut chunks = Vec::new();
        while let Some(c) = rx.blocking_recv() {
            chunks.push(c);
        }
        reader.join().expect("pump");
        chunks
    }

    #[test]
    fn exec_output_is_sent_in_bounded_chunks_and_cut_at_the_limit() {
        let input: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let chunks = pumped(input.clone(), usize::MAX);
        assert!(
            chunks.iter().all(|c| c.len() <= EXEC_CHUNK),
            "a chunk is too large"
        );
        assert_eq!(chunks.concat(), input, "output lost or reordered");

        let chunks = pumped(input.clone(), 40_000);
        let all = chunks.concat();
        assert!(all.starts_with(&input[..40_000]));
        let note = String::from_utf8_lossy(&all[40_000..]).into_owned();
        assert!(note.contains("output cut at 40000 bytes"), "{note}");
    }

    #[test]
    fn a_receiver_that_goes_away_does_not_block_the_writer() {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        drop(rx);
        // Returns (reading everything) although nobody listens.
        pump(&vec![7u8; 500_000][..], &tx, usize::MAX);
    }
}
