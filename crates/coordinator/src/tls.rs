//! TLS material of a coordinator and the mTLS configs built from it.
//!
//! Files in `<data_dir>/tls/`: `ca.crt`, `coordinator.crt`, `coordinator.key`
//! (0600) and `identity.json` (the CA certificate with the CA and token keys
//! sealed under the master key). `init` creates them all; a joining
//! coordinator needs `identity.json` copied from an existing one and the
//! shared master key, and issues its own certificate from it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use cloudless_client::HostPort;
use cloudless_pki::{ClusterCa, Identity, MasterKey, Sealed};
use cloudless_types::IdentityMaterial;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use zeroize::Zeroizing;

use crate::config::CoordinatorConfig;
use crate::error::StartError;

/// Admin certificate written by `init` (and by `admin-cert`): as short as
/// the cluster's admin certificates, which `cloudlessctl` renews.
pub(crate) const ADMIN_CERT_LIFETIME: u64 =
    cloudless_types::ClusterConfig::DEFAULT_ADMIN_CERT_LIFETIME_S;

/// This coordinator's current certificate and key.
struct Leaf {
    cert_pem: String,
    key_pem: Zeroizing<String>,
    not_before: i64,
    not_after: i64,
    certified: Arc<rustls::sign::CertifiedKey>,
}

/// A coordinator's mTLS identity: the cluster CA and its own certificate,
/// which [`TlsMaterial::renew`] replaces while the coordinator serves.
pub struct TlsMaterial {
    pub(crate) ca_pem: String,
    ca: ClusterCa,
    id: u64,
    names: Vec<String>,
    lifetime: u64,
    dir: PathBuf,
    leaf: RwLock<Arc<Leaf>>,
    generation: AtomicU64,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsMaterial(<redacted>)")
    }
}

fn tls_dir(config: &CoordinatorConfig) -> PathBuf {
    config.data_dir.join("tls")
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> StartError {
    StartError::Tls(format!("{}: {e}", path.display()))
}

fn write_private(path: &Path, contents: &[u8]) -> Result<(), StartError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("tmp");
    // A leftover temporary file would keep its mode: start afresh, 0600.
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| io_err(&tmp, e))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .and_then(|()| f.write_all(contents))
        .and_then(|()| f.sync_all())
        .map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))?;
    sync_dir(path)
}

fn write_public(path: &Path, contents: &[u8]) -> Result<(), StartError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents)
        .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
        .map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))?;
    sync_dir(path)
}

/// Makes a rename in `path`'s directory durable.
fn sync_dir(path: &Path) -> Result<(), StartError> {
    match path.parent() {
        Some(dir) => std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err(dir, e)),
        None => Ok(()),
    }
}

fn private_dir(dir: &Path) -> Result<(), StartError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io_err(dir, e))
}

/// The stored identity material of this cluster, if `identity.json` exists.
pub(crate) fn stored_material(data_dir: &Path) -> Result<Option<IdentityMaterial>, StartError> {
    let path = data_dir.join("tls").join("identity.json");
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| io_err(&path, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(&path, e)),
    }
}

pub(crate) fn unseal_ca(
    material: &IdentityMaterial,
    master: &MasterKey,
) -> Result<ClusterCa, StartError> {
    let sealed = Sealed {
        nonce: material.ca_key.nonce.clone(),
        ciphertext: material.ca_key.ciphertext.clone(),
    };
    ClusterCa::from_sealed(&material.ca_cert_pem, &sealed, master).map_err(|e| {
        StartError::Tls(format!(
            "cannot open the cluster CA with this master key: {e}"
        ))
    })
}

/// Loads or creates this coordinator's TLS material. Without a master key the
/// coordinator serves plaintext gRPC (logged loudly).
pub(crate) fn prepare(
    config: &CoordinatorConfig,
    id: u64,
    master: Option<&MasterKey>,
    init: bool,
) -> Result<Option<Arc<TlsMaterial>>, StartError> {
    let dir = tls_dir(config);
    let Some(master) = master else {
        tracing::warn!("no master_key_file: gRPC is PLAINTEXT and unauthenticated; use only on a trusted network");
        return Ok(None);
    };
    private_dir(&dir)?;
    let material = match stored_material(&config.data_dir)? {
        Some(m) => m,
        None if init && !config.data_dir.join(cloudless_state::LOG_FILE).exists() => {
            let now = crate::clock::now_ms() / 1000;
            let m = crate::identity::new_material(master, &config.cluster_name, now)
                .map_err(|e| StartError::Tls(e.to_string()))?;
            let json = serde_json::to_vec_pretty(&m).map_err(|e| StartError::Tls(e.to_string()))?;
            write_private(&dir.join("identity.json"), &json)?;
            let ca = unseal_ca(&m, master)?;
            write_admin_bundle(config, &ca, now)?;
            m
        }
        None => {
            return Err(StartError::Tls(format!(
                "{} is missing: copy tls/identity.json from an existing coordinator of this cluster (it is sealed; \
                 this coordinator opens it with the shared master key)",
                dir.join("identity.json").display()
            )))
        }
    };
    let ca = unseal_ca(&material, master)?;
    let advertised = HostPort::parse(&config.advertise_addr)
        .map_err(|e| StartError::Tls(format!("advertise_addr: {e}")))?;
    let mut names = vec![advertised.host().to_owned()];
    names.extend(config.tls_sans.iter().cloned());
    let tls = TlsMaterial {
        ca_pem: ca.cert_pem().to_owned(),
        ca,
        id,
        names,
        lifetime: config.coordinator_cert_lifetime.as_secs().max(10),
        dir: dir.clone(),
        leaf: RwLock::new(Arc::new(placeholder_leaf()?)),
        generation: AtomicU64::new(0),
    };
    write_public(&dir.join("ca.crt"), tls.ca_pem.as_bytes())?;
    tls.renew().map_err(StartError::Tls)?;
    Ok(Some(Arc::new(tls)))
}

/// A leaf that is replaced before anything uses it (the resolver needs one).
fn placeholder_leaf() -> Result<Leaf, StartError> {
    let now = crate::clock::now_ms() / 1000;
    let ca = ClusterCa::generate("placeholder", now).map_err(|e| StartError::Tls(e.to_string()))?;
    let issued = ca
        .issue(&Identity::Coordinator(0), &[], 60, now)
        .map_err(|e| StartError::Tls(e.to_string()))?;
    let key_pem = issued
        .key_pem
        .ok_or_else(|| StartError::Tls("issued certificate without a key".into()))?;
    leaf(issued.cert_pem, key_pem).map_err(StartError::Tls)
}

fn leaf(cert_pem: String, key_pem: Zeroizing<String>) -> Result<Leaf, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let info = cloudless_pki::inspect_certificate(&cert_pem).map_err(|e| e.to_string())?;
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificate: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| format!("key: {e}"))?;
    let signing = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("key: {e}"))?;
    Ok(Leaf {
        certified: Arc::new(rustls::sign::CertifiedKey::new(chain, signing)),
        cert_pem,
        key_pem,
        not_before: info.not_before,
        not_after: info.not_after,
    })
}

/// Writes `<data_dir>/admin/`: ca.crt, admin.crt, admin.key (0600) and a
/// cloudlessctl config pointing at them and at this coordinator.
fn write_admin_bundle(
    config: &CoordinatorConfig,
    ca: &ClusterCa,
    now: i64,
) -> Result<(), StartError> {
    let dir = config.data_dir.join("admin");
    write_admin_credentials(
        ca,
        "admin",
        &dir,
        &config.advertise_addr,
        ADMIN_CERT_LIFETIME,
        now,
    )
}

/// Issues admin `name` a key and certificate and writes them to `dir` with
/// the CA certificate and a `cloudlessctl.toml` naming `server`.
pub(crate) fn write_admin_credentials(
    ca: &ClusterCa,
    name: &str,
    dir: &Path,
    server: &str,
    lifetime: u64,
    now: i64,
) -> Result<(), StartError> {
    private_dir(dir)?;
    let issued = ca
        .issue(&Identity::Admin(name.to_owned()), &[], lifetime, now)
        .map_err(|e| StartError::Tls(e.to_string()))?;
    let key = issued
        .key_pem
        .ok_or_else(|| StartError::Tls("issued certificate without a key".into()))?;
    write_public(&dir.join("ca.crt"), ca.cert_pem().as_bytes())?;
    // The key first: a crash between the two leaves a pair cloudlessctl
    // reports as mismatched, never a half-written file.
    write_private(&dir.join("admin.key"), key.as_bytes())?;
    write_public(&dir.join("admin.crt"), issued.cert_pem.as_bytes())?;
    let ctl = format!(
        "# cloudlessctl configuration for admin {name:?}.\n\
         # Use it with: cloudlessctl --config {path}\n\
         # cloudlessctl renews admin.crt when two thirds of its lifetime are gone.\n\
         servers = [\"{server}\"]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n",
        path = dir.join("cloudlessctl.toml").display(),
        ca = dir.join("ca.crt").display(),
        cert = dir.join("admin.crt").display(),
        key = dir.join("admin.key").display(),
    );
    write_private(&dir.join("cloudlessctl.toml"), ctl.as_bytes())?;
    tracing::info!(admin = %name, path = %dir.join("cloudlessctl.toml").display(), not_after = issued.not_after, "admin credentials and cloudlessctl config written");
    Ok(())
}

impl TlsMaterial {
    fn current(&self) -> Arc<Leaf> {
        self.leaf
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Bumped at every renewal: channels built before it present the old
    /// certificate and are rebuilt.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// When the current certificate should be renewed: two thirds into its
    /// lifetime, Unix seconds.
    pub(crate) fn renew_at(&self) -> i64 {
        let l = self.current();
        // From the issue time: the validity starts BACKDATE_S earlier.
        let issued = l.not_before + cloudless_pki::BACKDATE_S;
        issued + (l.not_after - issued) * 2 / 3
    }

    /// Validity end of the current certificate, Unix seconds.
    pub(crate) fn not_after(&self) -> i64 {
        self.current().not_after
    }

    /// Issues this coordinator a new certificate from the cluster CA and
    /// serves it from now on (new connections; `tls/coordinator.{crt,key}`
    /// are rewritten for operators and tools).
    pub(crate) fn renew(&self) -> Result<(), String> {
        let now = crate::clock::now_ms() / 1000;
        let issued = self
            .ca
            .issue(
                &Identity::Coordinator(self.id),
                &self.names,
                self.lifetime,
                now,
            )
            .map_err(|e| e.to_string())?;
        let key_pem = issued
            .key_pem
            .ok_or_else(|| "issued certificate without a key".to_owned())?;
        let next = leaf(issued.cert_pem, key_pem)?;
        // The key first: a reader of the pair sees the old certificate with
        // the new key only between the renames, and the coordinator never
        // reads these files back.
        write_private(&self.dir.join("coordinator.key"), next.key_pem.as_bytes())
            .and_then(|()| {
                write_public(&self.dir.join("coordinator.crt"), next.cert_pem.as_bytes())
            })
            .map_err(|e| e.to_string())?;
        let not_after = next.not_after;
        *self
            .leaf
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(next);
        self.generation.fetch_add(1, Ordering::AcqRel);
        tracing::info!(
            node_id = self.id,
            not_after,
            "coordinator certificate issued"
        );
        Ok(())
    }

    /// This coordinator's credentials for the overlay relay.
    pub(crate) fn overlay_tls(&self) -> Result<cloudless_overlay::OverlayTls, String> {
        let l = self.current();
        cloudless_overlay::OverlayTls::new(&self.ca_pem, &l.cert_pem, l.key_pem.clone())
            .map(|(t, _)| t)
            .map_err(|e| e.to_string())
    }

    /// Server side: present the current certificate (looked up at every
    /// handshake, so a renewal needs no restart) and verify client
    /// certificates against the cluster CA. Client certificates are optional
    /// at the TLS layer so that `Enroll` (authenticated by a join token)
    /// works; every other call checks the caller's identity.
    pub(crate) fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, String> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::CertificateDer;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for der in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots
                .add(der.map_err(|e| format!("CA certificate: {e}"))?)
                .map_err(|e| format!("CA certificate: {e}"))?;
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .allow_unauthenticated()
        .build()
        .map_err(|e| e.to_string())?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(CurrentCert(self.clone())));
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    fn client_config(&self, host: &str) -> ClientTlsConfig {
        let l = self.current();
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(tonic::transport::Identity::from_pem(
                &l.cert_pem,
                l.key_pem.as_bytes(),
            ))
            .domain_name(host)
    }
}

/// Hands rustls the certificate current at each handshake.
struct CurrentCert(Arc<TlsMaterial>);

impl std::fmt::Debug for CurrentCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CurrentCert")
    }
}

impl rustls::server::ResolvesServerCert for CurrentCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.current().certified.clone())
    }
}

/// An endpoint to another coordinator: https with our identity when TLS is on.
pub(crate) fn endpoint(address: &str, tls: Option<&TlsMaterial>) -> Result<Endpoint, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let host = HostPort::parse(address).map_err(|e| e.to_string())?;
    let ep = Endpoint::from_shared(format!("{scheme}://{host}"))
        .map_err(|e| format!("address {address:?}: {e}"))?;
    match tls {
        Some(t) => ep
            .tls_config(t.client_config(host.host()))
            .map_err(|e| e.to_string()),
        None => Ok(ep),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).expect("stat").permissions().mode() & 0o777
    }

    /// Every write leaves a private file 0600, even over a wider file or a
    /// leftover temporary file of another mode.
    #[test]
    fn private_files_are_0600_after_every_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("coordinator.key");
        write_private(&key, b"one").expect("write");
        assert_eq!(mode(&key), 0o600);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        std::fs::write(key.with_extension("tmp"), b"stale").expect("write");
        std::fs::set_permissions(
            key.with_extension("tmp"),
            std::fs::Permissions::from_mode(0o666),
        )
        .expect("chmod");
        write_private(&key, b"two").expect("rewrite");
        assert_eq!(mode(&key), 0o600);
        assert_eq!(std::fs::read(&key).expect("read"), b"two");
        assert!(!key.with_extension("tmp").exists());
    }
}
