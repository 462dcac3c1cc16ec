//! The node's identity: a key made on this device (never sent anywhere), the
//! certificate the cluster CA signed for it, and the CA certificate. Kept in
//! the data dir as `node.key` (mode 0600), `node.crt` and `ca.crt`.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use cloudless_pki::{inspect_certificate, Identity};
use zeroize::Zeroizing;

use crate::AgentError;

const KEY_FILE: &str = "node.key";
const CERT_FILE: &str = "node.crt";
const CA_FILE: &str = "ca.crt";

/// A node's credentials.
#[derive(Clone)]
pub struct NodeIdentity {
    /// Node id from the certificate's `cloudless://node/<id>` SAN.
    pub node_id: String,
    /// The node certificate (PEM).
    pub cert_pem: String,
    /// The private key (PEM). Never logged, never sent.
    key_pem: Zeroizing<String>,
    /// The cluster CA certificate (PEM).
    pub ca_pem: String,
    /// Validity start, Unix seconds.
    pub not_before: i64,
    /// Validity end, Unix seconds.
    pub not_after: i64,
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("node_id", &self.node_id)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl NodeIdentity {
    /// Assembles an identity from a freshly issued certificate and the key
    /// that made its CSR. The certificate must name a node.
    pub fn new(
        cert_pem: String,
        key_pem: Zeroizing<String>,
        ca_pem: String,
    ) -> Result<Self, AgentError> {
        let info = inspect_certificate(&cert_pem)
            .map_err(|e| AgentError::Identity(format!("the node certificate: {e}")))?;
        let Identity::Node(node_id) = info.identity else {
            return Err(AgentError::Identity(format!(
                "the certificate names {}, not a node",
                info.identity
            )));
        };
        Ok(Self {
            node_id,
            cert_pem,
            key_pem,
            ca_pem,
            not_before: info.not_before,
            not_after: info.not_after,
        })
    }

    /// Loads the identity from `dir`, or `None` when the node has not enrolled.
    /// A key file readable by group or others is refused.
    pub fn load(dir: &Path) -> Result<Option<Self>, AgentError> {
        let key_path = dir.join(KEY_FILE);
        let meta = match std::fs::metadata(&key_path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(AgentError::io(&key_path, e)),
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(AgentError::Identity(format!(
                "{} has mode {mode:o}; a node key must be readable by its owner only (chmod 600)",
                key_path.display()
            )));
        }
        let read = |name: &str| -> Result<String, AgentError> {
            let p = dir.join(name);
            std::fs::read_to_string(&p).map_err(|e| AgentError::io(&p, e))
        };
        let key_pem = Zeroizing::new(read(KEY_FILE)?);
        let id = Self::new(read(CERT_FILE)?, key_pem, read(CA_FILE)?)?;
        Ok(Some(id))
    }

    /// Writes the identity to `dir` atomically (each file via a temporary file
    /// and rename; the key is created 0600).
    pub fn save(&self, dir: &Path) -> Result<(), AgentError> {
        std::fs::create_dir_all(dir).map_err(|e| AgentError::io(dir, e))?;
        write_atomic(dir, CA_FILE, self.ca_pem.as_bytes(), 0o644)?;
        write_atomic(dir, KEY_FILE, self.key_pem.as_bytes(), 0o600)?;
        write_atomic(dir, CERT_FILE, self.cert_pem.as_bytes(), 0o644)?;
        Ok(())
    }

    /// Whether the certificate has expired at `now` (Unix seconds).
    pub fn expired_at(&self, now: i64) -> bool {
        now >= self.not_after
    }

    /// The proof for `NodeService.Rejoin`: this certificate's key signs the
    /// cluster, this node, `signed_at` and the new CSR.
    pub fn rejoin_proof(&self, csr_pem: &str, signed_at: i64) -> Result<Vec<u8>, AgentError> {
        cloudless_pki::sign_rejoin_proof(
            &self.ca_pem,
            &self.cert_pem,
            &self.key_pem,
            csr_pem,
            signed_at,
        )
        .map_err(|e| AgentError::Identity(e.to_string()))
    }

    /// When to renew: two thirds into the certificate's lifetime, Unix seconds.
    pub fn renew_at(&self) -> i64 {
        self.not_before + (self.not_after - self.not_before) * 2 / 3
    }

    /// The overlay's credentials: this certificate and key, the cluster CA.
    pub fn overlay_tls(&self) -> Result<cloudless_overlay::OverlayTls, AgentError> {
        cloudless_overlay::OverlayTls::new(&self.ca_pem, &self.cert_pem, self.key_pem.clone())
            .map(|(tls, _)| tls)
            .map_err(|e| AgentError::Identity(e.to_string()))
    }

    /// TLS client settings presenting this identity and trusting the cluster CA.
    pub fn client_tls(&self, host: &str) -> tonic::transport::ClientTlsConfig {
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca_pem))
            .identity(tonic::transport::Identity::from_pem(
                &self.cert_pem,
                self.key_pem.as_bytes(),
            ))
            .domain_name(host)
    }
}

fn write_atomic(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> Result<(), AgentError> {
    let path = dir.join(name);
    let tmp: PathBuf = dir.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| AgentError::io(&tmp, e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| AgentError::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| AgentError::io(&path, e))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudless_pki::{new_anonymous_csr, ClusterCa};

    fn issued(ca: &ClusterCa, now: i64) -> NodeIdentity {
        let (csr, key) = new_anonymous_csr().expect("csr");
        let cert = ca
            .sign_csr(&csr, &Identity::Node("n1".into()), 3000, now)
            .expect("sign");
        NodeIdentity::new(cert.cert_pem, key, ca.cert_pem().to_owned()).expect("identity")
    }

    #[test]
    fn saves_with_a_private_key_and_loads_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = ClusterCa::generate("t", 1_700_000_000).expect("ca");
        let id = issued(&ca, 1_700_000_000);
        assert_eq!(id.node_id, "n1");
        let lifetime = id.not_after - id.not_before;
        assert!(lifetime >= 3000, "{lifetime}");
        assert_eq!(id.renew_at(), id.not_before + lifetime * 2 / 3);
        id.save(dir.path()).expect("save");
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let back = NodeIdentity::load(dir.path()).expect("load").expect("some");
        assert_eq!(back.node_id, "n1");
        assert_eq!(back.cert_pem, id.cert_pem);
        assert!(!format!("{back:?}").contains("PRIVATE"));
    }

    #[test]
    fn refuses_a_readable_key_and_reports_no_identity_when_absent() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(NodeIdentity::load(dir.path()).expect("load").is_none());
        let ca = ClusterCa::generate("t", 1_700_000_000).expect("ca");
        issued(&ca, 1_700_000_000).save(dir.path()).expect("save");
        std::fs::set_permissions(
            dir.path().join(KEY_FILE),
            std::fs::Permissions::from_mode(0o644),
        )
        .expect("chmod");
        let err = NodeIdentity::load(dir.path()).expect_err("readable key accepted");
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }
}
