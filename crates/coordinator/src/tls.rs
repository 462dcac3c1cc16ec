//! TLS material of a coordinator and the mTLS configs built from it.
//!
//! Files in `<data_dir>/tls/`: `ca.crt`, `coordinator.crt`, `coordinator.key`
//! (0600) and `identity.json` (the CA certificate with the CA and token keys
//! sealed under the master key). `init` creates them all; a joining
//! coordinator needs `identity.json` copied from an existing one and the
//! shared master key, and issues its own certificate from it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cloudless_pki::{ClusterCa, Identity, MasterKey, Sealed};
use cloudless_types::IdentityMaterial;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, ServerTlsConfig};
use zeroize::Zeroizing;

use crate::config::CoordinatorConfig;
use crate::coordinator::StartError;

/// Coordinator certificates live this long; they are re-issued at every start.
const COORDINATOR_CERT_LIFETIME: u64 = 365 * 24 * 3600;
/// Admin certificate written by `init`.
const ADMIN_CERT_LIFETIME: u64 = 365 * 24 * 3600;

/// A coordinator's mTLS identity.
pub struct TlsMaterial {
    pub(crate) ca_pem: String,
    cert_pem: String,
    key_pem: Zeroizing<String>,
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
    // The rename is durable only once the directory is.
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(dir, e))
}

fn host_of(address: &str) -> &str {
    address.rsplit_once(':').map_or(address, |(h, _)| {
        h.trim_start_matches('[').trim_end_matches(']')
    })
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

fn unseal_ca(material: &IdentityMaterial, master: &MasterKey) -> Result<ClusterCa, StartError> {
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
    std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
    let material = match stored_material(&config.data_dir)? {
        Some(m) => m,
        None if init && !config.data_dir.join(cloudless_state::LOG_FILE).exists() => {
            let now = crate::coordinator::now_ms() / 1000;
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
    let now = crate::coordinator::now_ms() / 1000;
    let mut names = vec![host_of(&config.advertise_addr).to_owned()];
    names.extend(config.tls_sans.iter().cloned());
    let issued = ca
        .issue(
            &Identity::Coordinator(id),
            &names,
            COORDINATOR_CERT_LIFETIME,
            now,
        )
        .map_err(|e| StartError::Tls(e.to_string()))?;
    let key_pem = issued
        .key_pem
        .ok_or_else(|| StartError::Tls("issued certificate without a key".into()))?;
    std::fs::write(dir.join("ca.crt"), ca.cert_pem()).map_err(|e| io_err(&dir, e))?;
    std::fs::write(dir.join("coordinator.crt"), &issued.cert_pem).map_err(|e| io_err(&dir, e))?;
    write_private(&dir.join("coordinator.key"), key_pem.as_bytes())?;
    Ok(Some(Arc::new(TlsMaterial {
        ca_pem: ca.cert_pem().to_owned(),
        cert_pem: issued.cert_pem,
        key_pem,
    })))
}

/// Writes `<data_dir>/admin/`: ca.crt, admin.crt, admin.key (0600) and a
/// cloudlessctl config pointing at them and at this coordinator.
fn write_admin_bundle(
    config: &CoordinatorConfig,
    ca: &ClusterCa,
    now: i64,
) -> Result<(), StartError> {
    let dir = config.data_dir.join("admin");
    std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
    let issued = ca
        .issue(
            &Identity::Admin("admin".into()),
            &[],
            ADMIN_CERT_LIFETIME,
            now,
        )
        .map_err(|e| StartError::Tls(e.to_string()))?;
    let key = issued
        .key_pem
        .ok_or_else(|| StartError::Tls("issued certificate without a key".into()))?;
    std::fs::write(dir.join("ca.crt"), ca.cert_pem()).map_err(|e| io_err(&dir, e))?;
    std::fs::write(dir.join("admin.crt"), &issued.cert_pem).map_err(|e| io_err(&dir, e))?;
    write_private(&dir.join("admin.key"), key.as_bytes())?;
    let ctl = format!(
        "# cloudlessctl configuration written by `cloudless-coordinator init`.\n\
         # Use it with: cloudlessctl --config {path}\n\
         servers = [\"{server}\"]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n",
        path = dir.join("cloudlessctl.toml").display(),
        server = config.advertise_addr,
        ca = dir.join("ca.crt").display(),
        cert = dir.join("admin.crt").display(),
        key = dir.join("admin.key").display(),
    );
    write_private(&dir.join("cloudlessctl.toml"), ctl.as_bytes())?;
    tracing::info!(path = %dir.join("cloudlessctl.toml").display(), "admin credentials and cloudlessctl config written");
    Ok(())
}

impl TlsMaterial {
    /// Server side: present our certificate, verify client certificates against
    /// the cluster CA. Client certificates are optional at the TLS layer so that
    /// `Enroll` (authenticated by a join token) works; every other call checks
    /// the caller's identity.
    /// This coordinator's credentials for the overlay relay.
    pub(crate) fn overlay_tls(&self) -> Result<cloudless_overlay::OverlayTls, String> {
        cloudless_overlay::OverlayTls::new(&self.ca_pem, &self.cert_pem, self.key_pem.clone())
            .map(|(t, _)| t)
            .map_err(|e| e.to_string())
    }

    pub(crate) fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(
                &self.cert_pem,
                self.key_pem.as_bytes(),
            ))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
            .client_auth_optional(true)
    }

    fn client_config(&self, host: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(tonic::transport::Identity::from_pem(
                &self.cert_pem,
                self.key_pem.as_bytes(),
            ))
            .domain_name(host)
    }
}

/// An endpoint to another coordinator: https with our identity when TLS is on.
pub(crate) fn endpoint(address: &str, tls: Option<&TlsMaterial>) -> Result<Endpoint, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let ep = Endpoint::from_shared(format!("{scheme}://{address}"))
        .map_err(|e| format!("address {address:?}: {e}"))?;
    match tls {
        Some(t) => ep
            .tls_config(t.client_config(host_of(address)))
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
