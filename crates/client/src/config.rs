//! The `cloudlessctl` configuration file: servers and mTLS credentials.
//!
//! ```toml
//! servers = ["10.0.0.1:7400", "[fd00::2]:7400"]
//! ca = "/var/lib/cloudless/admin/ca.crt"
//! cert = "/var/lib/cloudless/admin/admin.crt"
//! key = "/var/lib/cloudless/admin/admin.key"   # mode 0600
//! ```

use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::{ClientTls, HostPort, HostPortError};

/// What the file holds.
#[derive(serde::Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    servers: Vec<String>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

/// A loaded client configuration.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Coordinator addresses (`host:port`), tried in order. No default: an
    /// empty list leaves the choice to the caller.
    pub servers: Vec<String>,
    /// The mTLS credentials, when the file names `ca`, `cert` and `key`
    /// (all three or none). Default: none (plaintext).
    pub tls: Option<ClientTls>,
    /// Where the certificate and key were read, to renew them in place.
    pub credential_paths: Option<CredentialPaths>,
}

/// Where a configuration's certificate and key live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialPaths {
    /// The client certificate.
    pub cert: PathBuf,
    /// The private key.
    pub key: PathBuf,
}

/// Why a client configuration could not be loaded. Every message names the
/// file (and the field, where one is at fault).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file could not be read.
    #[error("reading {}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The key file's mode could not be read.
    #[error("{}", .path.display())]
    Stat {
        /// The key file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape.
    #[error("{}", .path.display())]
    Parse {
        /// The configuration file.
        path: PathBuf,
        /// The cause (names the field).
        #[source]
        source: toml::de::Error,
    },
    /// A `servers` entry is not a `host:port` address.
    #[error("{}: servers[{index}]", .path.display())]
    Server {
        /// The configuration file.
        path: PathBuf,
        /// The entry's position.
        index: usize,
        /// What is wrong with it.
        #[source]
        source: HostPortError,
    },
    /// The private key may be read by group or others.
    #[error("{}: private key is readable by group or others (mode {mode:o}); run chmod 600 on it", .path.display())]
    KeyReadable {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Only some of `ca`, `cert` and `key` are given.
    #[error("{}: ca, cert and key go together", .path.display())]
    PartialTls {
        /// The configuration file.
        path: PathBuf,
    },
}

impl ClientConfig {
    /// Loads `path`. Refuses a key file that group or others may read, a
    /// partial set of credentials and a `servers` entry that is not
    /// `host:port`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.to_owned(),
                source,
            })
        };
        let text = read(path)?;
        let file: ConfigFile = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        for (index, s) in file.servers.iter().enumerate() {
            HostPort::parse(s).map_err(|source| ConfigError::Server {
                path: path.to_owned(),
                index,
                source,
            })?;
        }
        let (tls, credential_paths) = match (file.ca, file.cert, file.key) {
            (Some(ca), Some(cert), Some(key)) => {
                check_key_mode(&key)?;
                let tls = ClientTls::new(read(&ca)?, read(&cert)?, Zeroizing::new(read(&key)?));
                (Some(tls), Some(CredentialPaths { cert, key }))
            }
            (None, None, None) => (None, None),
            _ => {
                return Err(ConfigError::PartialTls {
                    path: path.to_owned(),
                })
            }
        };
        Ok(Self {
            servers: file.servers,
            tls,
            credential_paths,
        })
    }
}

/// Refuses a private key file that group or others may read.
pub fn check_key_mode(key: &Path) -> Result<(), ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(key)
        .map_err(|source| ConfigError::Stat {
            path: key.to_owned(),
            source,
        })?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(ConfigError::KeyReadable {
            path: key.to_owned(),
            mode: mode & 0o777,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// The error and its causes, as `cloudlessctl` prints them.
    fn chain(e: &ConfigError) -> String {
        let mut s = e.to_string();
        let mut cur: Option<&dyn std::error::Error> = std::error::Error::source(e);
        while let Some(c) = cur {
            s.push_str(&format!(": {c}"));
            cur = c.source();
        }
        s
    }

    struct Files {
        dir: tempfile::TempDir,
    }

    impl Files {
        fn new() -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            for (name, text, mode) in [
                ("ca.crt", "CA PEM", 0o644),
                ("admin.crt", "CERT PEM", 0o644),
                ("admin.key", "KEY PEM", 0o600),
            ] {
                let p = dir.path().join(name);
                std::fs::write(&p, text).expect("write");
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
            }
            Self { dir }
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        fn config(&self, text: &str) -> PathBuf {
            let p = self.path("cloudlessctl.toml");
            std::fs::write(&p, text).expect("write");
            p
        }

        fn full(&self) -> PathBuf {
            self.config(&format!(
                "servers = [\"127.0.0.1:7400\", \"[::1]:7401\"]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
                self.path("ca.crt"),
                self.path("admin.crt"),
                self.path("admin.key"),
            ))
        }
    }

    #[test]
    fn a_full_config_loads_servers_credentials_and_their_paths() {
        let f = Files::new();
        let c = ClientConfig::load(&f.full()).expect("loads");
        assert_eq!(c.servers, vec!["127.0.0.1:7400", "[::1]:7401"]);
        let tls = c.tls.expect("tls");
        assert_eq!(tls.ca_pem, "CA PEM");
        assert_eq!(tls.cert_pem, "CERT PEM");
        assert_eq!(tls.key_pem.as_str(), "KEY PEM");
        let paths = c.credential_paths.expect("paths");
        assert_eq!(paths.key, f.path("admin.key"));
        assert_eq!(paths.cert, f.path("admin.crt"));
    }

    #[test]
    fn servers_alone_mean_plaintext() {
        let f = Files::new();
        let c = ClientConfig::load(&f.config("servers = [\"a:1\"]\n")).expect("loads");
        assert!(c.tls.is_none() && c.credential_paths.is_none());
    }

    #[test]
    fn a_key_readable_by_group_or_others_is_refused_naming_the_key() {
        let f = Files::new();
        let key = f.path("admin.key");
        for mode in [0o644, 0o640, 0o604] {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).expect("chmod");
            let e = ClientConfig::load(&f.full()).expect_err("readable key");
            assert!(matches!(e, ConfigError::KeyReadable { .. }), "{e:?}");
            let msg = e.to_string();
            assert!(msg.contains(&key.display().to_string()), "{msg}");
            assert!(msg.contains(&format!("mode {mode:o}")), "{msg}");
            assert!(msg.contains("chmod 600"), "{msg}");
        }
    }

    #[test]
    fn partial_credentials_are_refused_naming_the_file() {
        let f = Files::new();
        let p = f.config(&format!(
            "servers = []\nca = {:?}\n",
            f.path("ca.crt").display().to_string()
        ));
        let e = ClientConfig::load(&p).expect_err("partial");
        assert_eq!(
            e.to_string(),
            format!("{}: ca, cert and key go together", p.display())
        );
    }

    #[test]
    fn unknown_fields_and_bad_servers_are_refused_naming_file_and_field() {
        let f = Files::new();
        let p = f.config("servers = []\nserver = \"x\"\n");
        let e = chain(&ClientConfig::load(&p).expect_err("unknown field"));
        assert!(e.starts_with(&p.display().to_string()), "{e}");
        assert!(e.contains("server"), "{e}");

        let p = f.config("servers = [\"a:1\", \"::1:7400\"]\n");
        let e = chain(&ClientConfig::load(&p).expect_err("bare v6"));
        assert!(
            e.starts_with(&format!("{}: servers[1]", p.display())),
            "{e}"
        );
        assert!(e.contains("brackets"), "{e}");
    }

    #[test]
    fn missing_files_are_named() {
        let f = Files::new();
        let e = chain(&ClientConfig::load(&f.path("nope.toml")).expect_err("missing"));
        assert!(
            e.starts_with(&format!("reading {}", f.path("nope.toml").display())),
            "{e}"
        );
        std::fs::remove_file(f.path("ca.crt")).expect("rm");
        let e = chain(&ClientConfig::load(&f.full()).expect_err("missing ca"));
        assert!(
            e.starts_with(&format!("reading {}", f.path("ca.crt").display())),
            "{e}"
        );
        std::fs::remove_file(f.path("admin.key")).expect("rm");
        let e = chain(&ClientConfig::load(&f.full()).expect_err("missing key"));
        assert!(
            e.starts_with(&f.path("admin.key").display().to_string()),
            "{e}"
        );
    }
}
