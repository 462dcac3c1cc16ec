//! Where the root key comes from. The root key seals the master key
//! versions kept in Raft; every coordinator needs the same one.

use std::path::PathBuf;

use cloudless_pki::MasterKey;

use crate::SecretsError;

/// The environment variable [`EnvKeyProvider`] reads (base64, 32 bytes).
pub const ROOT_KEY_ENV: &str = "CLOUDLESS_MASTER_KEY";

/// A source of the root key (a file, the environment, or e.g. a KMS or TPM
/// behind this trait).
pub trait KeyProvider: Send + Sync {
    /// Loads the key.
    fn root_key(&self) -> Result<MasterKey, SecretsError>;
    /// Where it comes from, for messages (never the key).
    fn describe(&self) -> String;
}

/// A file holding the key in base64 (mode 0600 or stricter).
#[derive(Debug, Clone)]
pub struct FileKeyProvider(pub PathBuf);

impl KeyProvider for FileKeyProvider {
    fn root_key(&self) -> Result<MasterKey, SecretsError> {
        MasterKey::from_file(&self.0).map_err(|e| SecretsError::RootKey {
            source_name: self.describe(),
            problem: e.to_string(),
        })
    }

    fn describe(&self) -> String {
        format!("file {}", self.0.display())
    }
}

/// An environment variable holding the key in base64.
#[derive(Debug, Clone)]
pub struct EnvKeyProvider(pub String);

impl Default for EnvKeyProvider {
    fn default() -> Self {
        Self(ROOT_KEY_ENV.to_owned())
    }
}

impl KeyProvider for EnvKeyProvider {
    fn root_key(&self) -> Result<MasterKey, SecretsError> {
        let text =
            zeroize::Zeroizing::new(std::env::var(&self.0).map_err(|_| SecretsError::RootKey {
                source_name: self.describe(),
                problem: "is not set".into(),
            })?);
        MasterKey::from_base64(&text, &self.describe()).map_err(|e| SecretsError::RootKey {
            source_name: self.describe(),
            problem: e.to_string(),
        })
    }

    fn describe(&self) -> String {
        format!("environment variable {}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_must_be_private_and_hold_32_bytes() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("root.key");
        let key = MasterKey::generate().expect("key");
        std::fs::write(&path, key.to_base64().as_bytes()).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let p = FileKeyProvider(path.clone());
        let err = p.root_key().expect_err("world-readable key accepted");
        assert!(err.to_string().contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(
            p.root_key().expect("key").expose_bytes(),
            key.expose_bytes()
        );
        std::fs::write(&path, "c2hvcnQ=").expect("write");
        let err = p.root_key().expect_err("short key accepted");
        assert!(err.to_string().contains("32 bytes"), "{err}");
        let env = EnvKeyProvider("CLOUDLESS_TEST_ROOT_KEY_UNSET".into());
        assert!(env
            .root_key()
            .expect_err("unset")
            .to_string()
            .contains("is not set"));
    }
}
