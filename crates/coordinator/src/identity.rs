//! The cluster CA and token key as this coordinator uses them: created at
//! `init`, stored sealed in Raft, unsealed on demand with the master key.

use std::sync::{Arc, Mutex};

use cloudless_pki::{ClusterCa, MasterKey, Sealed, TokenKey};
use cloudless_state::StateReader;
use cloudless_types::{IdentityMaterial, SealedSecret};

use crate::error::{CoordinatorError, StartError};

/// Associated data binding the sealed token key to its purpose.
const TOKEN_KEY_CONTEXT: &str = "cloudless/token-key/v1";

/// Unsealed identity keys.
pub(crate) struct IdentityKeys {
    pub(crate) ca: ClusterCa,
    pub(crate) tokens: TokenKey,
}

fn to_stored(s: Sealed) -> SealedSecret {
    SealedSecret {
        nonce: s.nonce,
        ciphertext: s.ciphertext,
    }
}

fn from_stored(s: &SealedSecret) -> Sealed {
    Sealed {
        nonce: s.nonce.clone(),
        ciphertext: s.ciphertext.clone(),
    }
}

/// A new CA and token key, sealed for the replicated state.
pub(crate) fn new_material(
    master: &MasterKey,
    cluster_name: &str,
    now_s: i64,
) -> Result<IdentityMaterial, CoordinatorError> {
    let ca = ClusterCa::generate(cluster_name, now_s)?;
    let tokens = TokenKey::generate()?;
    Ok(IdentityMaterial {
        ca_cert_pem: ca.cert_pem().to_owned(),
        ca_key: to_stored(ca.seal_key(master)?),
        token_key: to_stored(master.seal(tokens.as_bytes(), TOKEN_KEY_CONTEXT)?),
    })
}

/// The identity keys once unsealed; held by the handle
/// ([`crate::handle::CoordinatorHandle::identity_keys`]).
#[derive(Default)]
pub(crate) struct IdentityCache(Mutex<Option<Arc<IdentityKeys>>>);

impl IdentityCache {
    /// The unsealed CA and token key (cached after the first use), opened
    /// with `master` from the material in the applied state.
    pub(crate) fn keys(
        &self,
        master: Option<&MasterKey>,
        reader: &StateReader,
    ) -> Result<Arc<IdentityKeys>, CoordinatorError> {
        let mut cached = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(k) = cached.as_ref() {
            return Ok(k.clone());
        }
        let master = master.ok_or_else(|| {
            CoordinatorError::NoIdentity(
                "this coordinator has no master key; set master_key_file to the cluster's master key".into(),
            )
        })?;
        let material = reader.identity()?.ok_or_else(|| {
            CoordinatorError::NoIdentity(
                "the cluster has no CA yet; it is created by `init` with a master key".into(),
            )
        })?;
        let unseal_err = |e: cloudless_pki::PkiError| {
            CoordinatorError::NoIdentity(format!(
                "the master key does not open the cluster's keys ({e}); is it this cluster's key?"
            ))
        };
        let ca = ClusterCa::from_sealed(
            &material.ca_cert_pem,
            &from_stored(&material.ca_key),
            master,
        )
        .map_err(unseal_err)?;
        let token_bytes = master
            .open(&from_stored(&material.token_key), TOKEN_KEY_CONTEXT)
            .map_err(unseal_err)?;
        let tokens = TokenKey::from_bytes(&token_bytes)?;
        let keys = Arc::new(IdentityKeys { ca, tokens });
        *cached = Some(keys.clone());
        Ok(keys)
    }
}

/// The master key's file in the data dir when `master_key_file` is not set.
pub const DEFAULT_MASTER_KEY_FILE: &str = "master.key";

/// The master key this coordinator starts with: the configured file, else
/// `CLOUDLESS_MASTER_KEY`, else `<data_dir>/master.key`, which `init` of a
/// new cluster creates (0600). Without one a coordinator refuses to start,
/// unless it was told to serve insecure plaintext.
pub(crate) fn resolve_master_key(
    config: &crate::config::CoordinatorConfig,
    init: bool,
) -> Result<(Option<Arc<MasterKey>>, String), StartError> {
    let (key, source) = load_master_key(config.master_key_file.as_deref())?;
    if key.is_some() {
        return Ok((key, source));
    }
    if config.insecure_plaintext {
        tracing::warn!(
            listen = %config.listen_addr,
            "insecure_plaintext: gRPC is PLAINTEXT and every caller is an administrator; agents cannot enroll"
        );
        return Ok((None, "none (insecure_plaintext)".into()));
    }
    let path = config.data_dir.join(DEFAULT_MASTER_KEY_FILE);
    if path.exists() {
        return Ok(load_master_key(Some(&path))?);
    }
    let fresh = init && !config.data_dir.join(cloudless_state::LOG_FILE).exists();
    if !fresh {
        return Err(StartError::Tls(format!(
            "no master key: {} does not exist and neither master_key_file nor CLOUDLESS_MASTER_KEY is set. \
             Copy the cluster's master key there (with tls/identity.json, from a coordinator of this cluster), \
             or start with --insecure-plaintext on a loopback address",
            path.display()
        )));
    }
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&config.data_dir)
    }
    .map_err(|e| StartError::Tls(format!("{}: {e}", config.data_dir.display())))?;
    let key = MasterKey::generate()?;
    let mut text = key.to_base64();
    text.push('\n');
    write_new_private(&path, text.as_bytes())
        .map_err(|e| StartError::Tls(format!("cannot create {}: {e}", path.display())))?;
    tracing::info!(
        path = %path.display(),
        "created the cluster's master key (0600): every coordinator that joins needs a copy, with tls/identity.json; keep a backup off this host"
    );
    Ok((Some(Arc::new(key)), format!("file {}", path.display())))
}

/// Creates `path` (never overwriting) with mode 0600 and `contents`, synced
/// with its directory.
fn write_new_private(path: &std::path::Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents)?;
    f.sync_all()?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Loads the master key named by the configuration (`master_key_file`),
/// else from `CLOUDLESS_MASTER_KEY` (base64) if set; with where it came from.
pub(crate) fn load_master_key(
    path: Option<&std::path::Path>,
) -> Result<(Option<Arc<MasterKey>>, String), cloudless_pki::PkiError> {
    use cloudless_secrets::KeyProvider;
    let to_pki = |e: cloudless_secrets::SecretsError| cloudless_pki::PkiError::MasterKey {
        source_name: "master key".into(),
        problem: e.to_string(),
    };
    if let Some(p) = path {
        let provider = cloudless_secrets::FileKeyProvider(p.to_owned());
        return Ok((
            Some(Arc::new(provider.root_key().map_err(to_pki)?)),
            provider.describe(),
        ));
    }
    let env = cloudless_secrets::EnvKeyProvider::default();
    if std::env::var_os(&env.0).is_some() {
        return Ok((
            Some(Arc::new(env.root_key().map_err(to_pki)?)),
            env.describe(),
        ));
    }
    Ok((None, "none".into()))
}
