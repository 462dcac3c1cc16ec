//! For tests and benchmarks: a containerd of their own, and a small OCI
//! image built locally from the host's static busybox (Debian's
//! `busybox-static`) for machines that cannot pull.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::Containerd;

use serde_json::json;

use crate::image::sha256_digest;
use crate::RuntimeError;

/// Where Debian's busybox-static installs its binary.
pub const BUSYBOX: &str = "/bin/busybox";
/// Applets linked in `/bin`.
const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "sleep", "mkdir", "id", "touch", "ls", "true", "false", "grep", "head",
    "wc", "yes", "dd", "rm", "env", "httpd", "nc", "od", "wget", "nslookup", "ip", "hostname",
    "awk", "tail", "cut", "sed", "tr",
];

fn tar_bytes(
    build: impl FnOnce(&mut tar::Builder<Vec<u8>>) -> std::io::Result<()>,
) -> std::io::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    build(&mut b)?;
    b.into_inner()
}

fn file_header(size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    h
}

/// Writes an OCI image layout archive named `name` (e.g. `busybox:test`) to
/// `out`: one uncompressed layer with busybox, its applets, `/tmp` and
/// `/etc/passwd`. `corrupt` flips a byte of the layer after hashing it (for
/// digest-mismatch tests).
pub fn write_busybox_archive(out: &Path, name: &str, corrupt: bool) -> Result<(), RuntimeError> {
    write_busybox_archive_with(out, name, corrupt, &[])
}

/// [`write_busybox_archive`] with `extra` executables in the layer (path in
/// the image, content).
pub fn write_busybox_archive_with(
    out: &Path,
    name: &str,
    corrupt: bool,
    extra: &[(&str, &[u8])],
) -> Result<(), RuntimeError> {
    let io = |e: std::io::Error| RuntimeError::io(out, e);
    let busybox = std::fs::read(BUSYBOX).map_err(|e| RuntimeError::io(Path::new(BUSYBOX), e))?;
    let mut layer = tar_bytes(|b| {
        for dir in ["bin", "tmp", "etc"] {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(if dir == "tmp" { 0o1777 } else { 0o755 });
            h.set_size(0);
            h.set_mtime(0);
            b.append_data(&mut h, format!("{dir}/"), std::io::empty())?;
        }
        let mut h = file_header(busybox.len() as u64, 0o755);
        b.append_data(&mut h, "bin/busybox", busybox.as_slice())?;
        for (path, data) in extra {
            let mut h = file_header(data.len() as u64, 0o755);
            b.append_data(&mut h, path, *data)?;
        }
        for applet in APPLETS {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            h.set_mode(0o777);
            h.set_mtime(0);
            b.append_link(&mut h, format!("bin/{applet}"), "busybox")?;
        }
        let passwd = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n";
        let mut h = file_header(passwd.len() as u64, 0o644);
        b.append_data(&mut h, "etc/passwd", &passwd[..])
    })
    .map_err(io)?;
    let layer_digest = sha256_digest(&layer);
    if corrupt {
        if let Some(byte) = layer.get_mut(4096) {
            *byte ^= 0xff;
        }
    }
    let (os, arch) = crate::image::host_platform();
    let config = serde_json::to_vec(&json!({
        "architecture": arch, "os": os,
        "config": { "Cmd": ["/bin/sh"], "Env": ["PATH=/bin"], "WorkingDir": "/" },
        "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
    }))
    .map_err(|e| RuntimeError::Internal(e.to_string()))?;
    let config_digest = sha256_digest(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": config_digest, "size": config.len() },
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar",
                     "digest": layer_digest, "size": layer.len() }],
    }))
    .map_err(|e| RuntimeError::Internal(e.to_string()))?;
    let manifest_digest = sha256_digest(&manifest);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [{ "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": manifest_digest, "size": manifest.len(),
                        "annotations": { "org.opencontainers.image.ref.name": name } }],
    }))
    .map_err(|e| RuntimeError::Internal(e.to_string()))?;
    let archive = tar_bytes(|b| {
        let layout = br#"{"imageLayoutVersion":"1.0.0"}"#;
        for (path, data) in [
            ("oci-layout".to_owned(), &layout[..]),
            ("index.json".to_owned(), index.as_slice()),
            (blob_path(&manifest_digest), manifest.as_slice()),
            (blob_path(&config_digest), config.as_slice()),
            (blob_path(&layer_digest), layer.as_slice()),
        ] {
            let mut h = file_header(data.len() as u64, 0o644);
            b.append_data(&mut h, path, data)?;
        }
        Ok(())
    })
    .map_err(io)?;
    std::fs::write(out, archive).map_err(io)
}

fn blob_path(digest: &str) -> String {
    format!(
        "blobs/sha256/{}",
        digest.strip_prefix("sha256:").unwrap_or(digest)
    )
}

/// A containerd of its own (socket, root and state in a temporary
/// directory), killed with its shims when dropped.
#[derive(Debug)]
pub struct Daemon {
    /// Holds the socket, root, state and logs.
    pub dir: tempfile::TempDir,
    child: Child,
    namespace: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Leftover runc shims of this instance.
        let _ = Command::new("pkill")
            .args(["-f", &self.dir.path().display().to_string()])
            .status();
        // runc's state directory for this namespace (shared by every containerd).
        let _ = std::fs::remove_dir_all(format!("/run/containerd/runc/{}", self.namespace));
    }
}

/// A TCP port on 127.0.0.1 that nothing listens on, for a test to hand to a
/// server it starts. See [`free_port_on`].
pub fn free_port() -> u16 {
    free_port_on("127.0.0.1")
}

/// A TCP port on `ip` that nothing listens on now, chosen below the kernel's
/// ephemeral range (`net.ipv4.ip_local_port_range`) so that no outgoing
/// connection can take it between this call and the server's bind (the
/// flake of binding port 0 and releasing it), and never the same twice in
/// one process. Each process starts at its own place in the range.
pub fn free_port_on(ip: &str) -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 10_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    if ephemeral_low > LOW + 1_000 {
        let span = ephemeral_low - LOW;
        let start = std::process::id().wrapping_mul(7_919) % span;
        for _ in 0..span {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let Ok(port) = u16::try_from(LOW + (start + n) % span) else {
                continue;
            };
            if std::net::TcpListener::bind((ip, port)).is_ok() {
                return port;
            }
        }
    }
    // No room below the ephemeral range: the kernel's choice.
    std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a port")
}

/// Reports a test that cannot run here: under CI (`CI` set) that is a
/// failure; elsewhere it is printed and listed in `$CLOUDLESS_SKIP_LOG`, so
/// the summary counts it as skipped, not passed.
pub fn skip_test(message: String) {
    assert!(
        std::env::var_os("CI").is_none(),
        "cannot run in CI: {message}"
    );
    eprintln!("\n!!!!!!!! SKIPPED {message} !!!!!!!!\n");
    if let Some(path) = std::env::var_os("CLOUDLESS_SKIP_LOG") {
        use std::io::Write as _;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{message}");
        }
    }
}

/// Why containerd tests cannot run here, if they cannot.
pub fn missing_prerequisite() -> Option<String> {
    if !Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"))
    {
        return Some("not root".into());
    }
    for tool in ["containerd", "runc", "containerd-shim-runc-v2"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!("{tool} is not installed"));
        }
    }
    if !Path::new(BUSYBOX).exists() {
        return Some(format!(
            "{BUSYBOX} is missing (apt-get install busybox-static)"
        ));
    }
    None
}

impl Daemon {
    /// Starts containerd and connects to it in containerd namespace `namespace`.
    pub async fn start(namespace: &str) -> Result<(Daemon, Containerd), RuntimeError> {
        let dir = tempfile::tempdir().map_err(|e| RuntimeError::io(Path::new("/tmp"), e))?;
        let d = dir.path().to_owned();
        let io = |e: std::io::Error| RuntimeError::io(&d, e);
        let config = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{ttrpc}\"\n",
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = d.join("c.sock").display(),
            ttrpc = d.join("t.sock").display(),
        );
        std::fs::write(d.join("config.toml"), config).map_err(io)?;
        let log = std::fs::File::create(d.join("containerd.log")).map_err(io)?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(d.join("config.toml"))
            .stdout(log.try_clone().map_err(io)?)
            .stderr(log)
            .spawn()
            .map_err(|e| RuntimeError::Unavailable(format!("cannot start containerd: {e}")))?;
        let daemon = Daemon {
            dir,
            child,
            namespace: namespace.to_owned(),
        };
        let sock = d.join("c.sock");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if sock.exists() {
                match Containerd::connect(&sock, namespace, &d.join("logs")).await {
                    Ok(c) => return Ok((daemon, c)),
                    Err(e) if Instant::now() > deadline => return Err(e),
                    Err(_) => {}
                }
            }
            if Instant::now() > deadline {
                return Err(RuntimeError::Unavailable(format!(
                    "containerd did not create {} within 20 s",
                    sock.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// containerd's socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("c.sock")
    }
}

/// Debian's `docker-registry` (the CNCF distribution registry).
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// A `docker-registry` process on a free loopback port, killed when dropped.
#[derive(Debug)]
pub struct LocalRegistry {
    child: Child,
    /// `<ip>:<port>`.
    pub host: String,
    /// Its log file.
    pub log: PathBuf,
}

impl Drop for LocalRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl LocalRegistry {
    /// Starts a registry storing under `storage`, its config and log in
    /// `work`, with `extra` YAML (e.g. an `auth:` section) and optional TLS
    /// (certificate, key files).
    pub fn start(
        work: &Path,
        storage: &Path,
        extra: &str,
        tls: Option<(&Path, &Path)>,
    ) -> Result<Self, RuntimeError> {
        Self::start_at(work, storage, extra, tls, "127.0.0.1")
    }

    /// Like `start`, listening on `ip` (an address of this host).
    pub fn start_at(
        work: &Path,
        storage: &Path,
        extra: &str,
        tls: Option<(&Path, &Path)>,
        ip: &str,
    ) -> Result<Self, RuntimeError> {
        // A port the registry failed to bind (taken meanwhile) is retried
        // with another.
        let mut last = String::new();
        for _ in 0..5 {
            match Self::start_on(work, storage, extra, tls, ip, free_port_on(ip))? {
                Ok(started) => return Ok(started),
                Err(log) => last = log,
            }
        }
        Err(RuntimeError::Unavailable(format!(
            "docker-registry could not bind a port: {last}"
        )))
    }

    /// Starts a registry on `ip`:`port`; `Ok(Err(log))` when it could not
    /// bind that port.
    fn start_on(
        work: &Path,
        storage: &Path,
        extra: &str,
        tls: Option<(&Path, &Path)>,
        ip: &str,
        port: u16,
    ) -> Result<Result<Self, String>, RuntimeError> {
        let tag = format!("registry-{port}");
        let tls_yaml = tls.map_or(String::new(), |(c, k)| {
            format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                c.display(),
                k.display()
            )
        });
        let config = format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: {ip}:{port}\n{tls_yaml}{extra}",
            storage.display()
        );
        let config_path = work.join(format!("{tag}.yml"));
        std::fs::write(&config_path, config).map_err(|e| RuntimeError::io(&config_path, e))?;
        let log = work.join(format!("{tag}.log"));
        let out = std::fs::File::create(&log).map_err(|e| RuntimeError::io(&log, e))?;
        let err = out.try_clone().map_err(|e| RuntimeError::io(&log, e))?;
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config_path)
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| RuntimeError::Unavailable(format!("cannot start {REGISTRY_BIN}: {e}")))?;
        let mut this = Self {
            child,
            host: format!("{ip}:{port}"),
            log,
        };
        // Ready when the registry itself says it listens and a connection
        // is accepted (a connection alone could reach someone else).
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let text = std::fs::read_to_string(&this.log).unwrap_or_default();
            if let Ok(Some(status)) = this.child.try_wait() {
                if text.contains("address already in use") {
                    return Ok(Err(text));
                }
                return Err(RuntimeError::Unavailable(format!(
                    "docker-registry exited ({status}): {text}"
                )));
            }
            if text.contains("listening on") && std::net::TcpStream::connect((ip, port)).is_ok() {
                return Ok(Ok(this));
            }
            if Instant::now() > deadline {
                return Err(RuntimeError::Unavailable(format!(
                    "docker-registry did not listen: {text}"
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Waits up to `timeout` for a supervised replica's status to satisfy `f`;
/// panics naming `what` (and the last status) otherwise. For tests.
pub async fn wait_for_status(
    rx: &mut tokio::sync::watch::Receiver<crate::ReplicaStatus>,
    what: &str,
    timeout: Duration,
    f: impl Fn(&crate::ReplicaStatus) -> bool,
) -> crate::ReplicaStatus {
    let got = tokio::time::timeout(timeout, rx.wait_for(|s| f(s)))
        .await
        .map(|r| r.map(|s| s.clone()));
    match got {
        Ok(Ok(s)) => s,
        Ok(Err(_)) => panic!("supervisor gone while waiting for {what}"),
        Err(_) => panic!("timed out waiting for {what}: {:?}", *rx.borrow()),
    }
}
