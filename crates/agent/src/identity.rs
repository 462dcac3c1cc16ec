//! The node's identity: a key made on this device (never sent anywhere), the
//! certificate the cluster CA signed for it, and the CA certificate. Kept in
//! `<data dir>/identity/` as `node.key` (mode 0600), `node.crt` and
//! `ca.crt`; `<data dir>/node.key` etc. are links into it.
//!
//! A renewal writes all three into a new directory (each file and the
//! directory fsynced) and swaps it with the old one in one rename
//! (`renameat2(RENAME_EXCHANGE)`), then fsyncs the data dir: after a crash
//! the node has either the old pair or the new one, never a new key with
//! the old certificate. Loading checks that key and certificate match.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use cloudless_pki::{inspect_certificate, Identity};
use zeroize::Zeroizing;

use crate::AgentError;

const KEY_FILE: &str = "node.key";
const CERT_FILE: &str = "node.crt";
const CA_FILE: &str = "ca.crt";
/// The directory holding the three files.
const IDENTITY_DIR: &str = "identity";
/// Where the next identity is written before it is swapped in.
const NEW_DIR: &str = ".identity.new";

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
    /// A key file readable by group or others is refused, and so is a key
    /// that is not the certificate's.
    pub fn load(dir: &Path) -> Result<Option<Self>, AgentError> {
        // Before the identity directory, the files lived in `dir` itself.
        let files = if dir.join(IDENTITY_DIR).is_dir() {
            dir.join(IDENTITY_DIR)
        } else {
            dir.to_path_buf()
        };
        let key_path = files.join(KEY_FILE);
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
            let p = files.join(name);
            std::fs::read_to_string(&p).map_err(|e| AgentError::io(&p, e))
        };
        let key_pem = Zeroizing::new(read(KEY_FILE)?);
        let cert_pem = read(CERT_FILE)?;
        let matches = cloudless_pki::key_matches_certificate(&cert_pem, &key_pem)
            .map_err(|e| AgentError::Identity(format!("{}: {e}", files.display())))?;
        if !matches {
            return Err(AgentError::Identity(format!(
                "{} does not hold the key of {} (a torn write?); remove {} and enroll again with a join token",
                key_path.display(),
                files.join(CERT_FILE).display(),
                files.display()
            )));
        }
        let id = Self::new(cert_pem, key_pem, read(CA_FILE)?)?;
        Ok(Some(id))
    }

    /// Writes the identity to `dir` as one atomic change: the three files
    /// into a new directory (the key created 0600), fsynced, swapped with
    /// the current one in one rename, the data dir fsynced.
    pub fn save(&self, dir: &Path) -> Result<(), AgentError> {
        std::fs::create_dir_all(dir).map_err(|e| AgentError::io(dir, e))?;
        let new = dir.join(NEW_DIR);
        // Left by a crash before the swap: incomplete, never used.
        if new.exists() {
            std::fs::remove_dir_all(&new).map_err(|e| AgentError::io(&new, e))?;
        }
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&new)
            .map_err(|e| AgentError::io(&new, e))?;
        write_new(&new, CA_FILE, self.ca_pem.as_bytes(), 0o644)?;
        write_new(&new, KEY_FILE, self.key_pem.as_bytes(), 0o600)?;
        write_new(&new, CERT_FILE, self.cert_pem.as_bytes(), 0o644)?;
        sync_dir(&new)?;
        let current = dir.join(IDENTITY_DIR);
        if current.is_dir() {
            nix::fcntl::renameat2(
                nix::fcntl::AT_FDCWD,
                &new,
                nix::fcntl::AT_FDCWD,
                &current,
                nix::fcntl::RenameFlags::RENAME_EXCHANGE,
            )
            .map_err(|e| AgentError::io(&current, e.into()))?;
            sync_dir(dir)?;
            // `new` now holds the previous identity.
            std::fs::remove_dir_all(&new).map_err(|e| AgentError::io(&new, e))?;
        } else {
            std::fs::rename(&new, &current).map_err(|e| AgentError::io(&current, e))?;
            sync_dir(dir)?;
        }
        // Stable links at the old places (for tools that read them there);
        // they replace the files an older agent wrote.
        for name in [KEY_FILE, CERT_FILE, CA_FILE] {
            let link = dir.join(name);
            let target = Path::new(IDENTITY_DIR).join(name);
            if std::fs::read_link(&link).is_ok_and(|t| t == target) {
                continue;
            }
            let tmp = dir.join(format!(".{name}.link"));
            let _ = std::fs::remove_file(&tmp);
            std::os::unix::fs::symlink(&target, &tmp).map_err(|e| AgentError::io(&tmp, e))?;
            std::fs::rename(&tmp, &link).map_err(|e| AgentError::io(&link, e))?;
        }
        sync_dir(dir)
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

    /// mTLS client credentials presenting this identity and trusting the
    /// cluster CA.
    pub fn client_tls(&self) -> cloudless_client::ClientTls {
        cloudless_client::ClientTls::new(
            self.ca_pem.clone(),
            self.cert_pem.clone(),
            self.key_pem.clone(),
        )
    }
}

/// Creates `dir/name` with `mode` from the start and fsyncs it.
fn write_new(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> Result<(), AgentError> {
    let path: PathBuf = dir.join(name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&path)
        .map_err(|e| AgentError::io(&path, e))?;
    // The umask may have taken bits away; never add any.
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .and_then(|()| f.write_all(bytes))
        .and_then(|()| f.sync_all())
        .map_err(|e| AgentError::io(&path, e))
}

fn sync_dir(dir: &Path) -> Result<(), AgentError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| AgentError::io(dir, e))
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

    fn key_mode(path: &Path) -> u32 {
        std::fs::metadata(path).expect("key").permissions().mode() & 0o777
    }

    /// Renewal replaces key and certificate together; the key is 0600
    /// after every write, the old place keeps working, and a torn pair (a
    /// key that is not the certificate's) is refused at load.
    #[test]
    fn renewals_replace_the_pair_at_once_and_a_torn_pair_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = ClusterCa::generate("t", 1_700_000_000).expect("ca");
        // An identity written by an older agent, straight into the data dir.
        let first = issued(&ca, 1_700_000_000);
        std::fs::write(dir.path().join(CA_FILE), &first.ca_pem).expect("write");
        std::fs::write(dir.path().join(CERT_FILE), &first.cert_pem).expect("write");
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(dir.path().join(KEY_FILE))
            .and_then(|mut f| f.write_all(first.key_pem.as_bytes()))
            .expect("write");
        let loaded = NodeIdentity::load(dir.path())
            .expect("legacy")
            .expect("some");
        assert_eq!(loaded.cert_pem, first.cert_pem);

        for round in 0..3 {
            let renewed = issued(&ca, 1_700_000_100 + round);
            renewed.save(dir.path()).expect("save");
            for key in [
                dir.path().join(KEY_FILE),
                dir.path().join(IDENTITY_DIR).join(KEY_FILE),
            ] {
                assert_eq!(key_mode(&key), 0o600, "{}", key.display());
            }
            assert!(!dir.path().join(NEW_DIR).exists());
            let back = NodeIdentity::load(dir.path()).expect("load").expect("some");
            assert_eq!(back.cert_pem, renewed.cert_pem);
            assert_eq!(*back.key_pem, *renewed.key_pem);
            // Read through the old place too.
            assert_eq!(
                std::fs::read_to_string(dir.path().join(CERT_FILE)).expect("read"),
                renewed.cert_pem
            );
        }

        // A crash that left a half-written next identity changes nothing.
        std::fs::create_dir_all(dir.path().join(NEW_DIR)).expect("mkdir");
        std::fs::write(dir.path().join(NEW_DIR).join(KEY_FILE), "half").expect("write");
        assert!(NodeIdentity::load(dir.path()).expect("load").is_some());

        // A torn pair: another key with this certificate.
        let other = issued(&ca, 1_700_000_000);
        let key = dir.path().join(IDENTITY_DIR).join(KEY_FILE);
        std::fs::write(&key, other.key_pem.as_bytes()).expect("write");
        let err = NodeIdentity::load(dir.path())
            .expect_err("torn pair")
            .to_string();
        assert!(err.contains("does not hold the key"), "{err}");
    }

    #[test]
    fn refuses_a_readable_key_and_reports_no_identity_when_absent() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(NodeIdentity::load(dir.path()).expect("load").is_none());
        let ca = ClusterCa::generate("t", 1_700_000_000).expect("ca");
        issued(&ca, 1_700_000_000).save(dir.path()).expect("save");
        std::fs::set_permissions(
            dir.path().join(IDENTITY_DIR).join(KEY_FILE),
            std::fs::Permissions::from_mode(0o644),
        )
        .expect("chmod");
        let err = NodeIdentity::load(dir.path()).expect_err("readable key accepted");
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }
}
