//! Secrets for this node's replicas: fetched with single-use access tokens
//! minted for the replica's workload (its audience), kept in memory only
//! (for at most min(token, secret) lifetime and a refresh interval), and
//! handed to containers as environment variables or as 0400 files on a
//! tmpfs that never touches the disk.

use std::collections::HashMap;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cloudless_proto::v1 as pb;
use cloudless_types::WorkloadSpec;
use pb::secret_service_client::SecretServiceClient;
use tokio::sync::{watch, Mutex};
use zeroize::Zeroizing;

use crate::{AgentError, Coordinators, NodeIdentity};

/// A secret's values, wiped on drop.
pub type Values = HashMap<String, Zeroizing<Vec<u8>>>;

/// How long an access token the agent mints lives.
const TOKEN_TTL_SECONDS: u64 = 600;
/// Size of each secret volume's tmpfs.
const SECRET_TMPFS_BYTES: u64 = 1 << 20;

struct Cached {
    values: Arc<Values>,
    version: u64,
    fetched: Instant,
    valid_until_ms: i64,
}

/// Fetches and caches secrets for replicas.
pub struct SecretFetcher {
    coordinators: Mutex<Coordinators>,
    identity: Mutex<watch::Receiver<NodeIdentity>>,
    cache: std::sync::Mutex<HashMap<(String, String, String), Cached>>,
    /// Values older than this are fetched again (secret volumes follow updates).
    pub refresh: Duration,
}

impl std::fmt::Debug for SecretFetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretFetcher")
            .field("refresh", &self.refresh)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl SecretFetcher {
    /// A fetcher calling `addresses` as this node.
    pub fn new(
        addresses: Vec<String>,
        mut identity: watch::Receiver<NodeIdentity>,
        refresh: Duration,
    ) -> Self {
        let id = identity.borrow_and_update().clone();
        Self {
            coordinators: Mutex::new(Coordinators::new(addresses, id)),
            identity: Mutex::new(identity),
            cache: std::sync::Mutex::new(HashMap::new()),
            refresh,
        }
    }

    /// The values and version of secret `namespace/name`, read as
    /// `audience` (the workload): from memory while fresh; once stale, still
    /// from memory if a version check (no token, no Raft write) finds the
    /// secret unchanged; else with a new single-use token.
    pub async fn get(
        &self,
        namespace: &str,
        name: &str,
        audience: &str,
    ) -> Result<(Arc<Values>, u64), AgentError> {
        let key = (namespace.to_owned(), name.to_owned(), audience.to_owned());
        let mut stale = None;
        if let Ok(cache) = self.cache.lock() {
            if let Some(c) = cache.get(&key) {
                if c.fetched.elapsed() < self.refresh && now_ms() < c.valid_until_ms {
                    return Ok((c.values.clone(), c.version));
                }
                stale = Some((c.values.clone(), c.version));
            }
        }
        let mut coordinators = self.coordinators.lock().await;
        {
            let mut identity = self.identity.lock().await;
            if identity.has_changed().unwrap_or(false) {
                coordinators.set_identity(identity.borrow_and_update().clone());
            }
        }
        if let Some((values, version)) = stale {
            let req = pb::CheckVersionRequest {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                audience: audience.to_owned(),
            };
            let checked = coordinators
                .call_on("secret version", |ch| {
                    let r = req.clone();
                    async move { SecretServiceClient::new(ch).check_version(r).await }
                })
                .await;
            match checked {
                Ok(answer) => {
                    if let Some(valid_until_ms) = still_current(version, now_ms(), &answer) {
                        if let Ok(mut cache) = self.cache.lock() {
                            if let Some(c) = cache.get_mut(&key) {
                                c.fetched = Instant::now();
                                c.valid_until_ms = valid_until_ms;
                            }
                        }
                        return Ok((values, version));
                    }
                }
                // A coordinator without the call: fetch as before.
                Err(AgentError::Refused { status, .. })
                    if status.code() == tonic::Code::Unimplemented => {}
                Err(e) => return Err(e),
            }
        }
        let req = pb::IssueTokenRequest {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            audience: audience.to_owned(),
            ttl_seconds: TOKEN_TTL_SECONDS,
            max_uses: 1,
        };
        let token = Zeroizing::new(
            coordinators
                .call_on("secret token", |ch| {
                    let r = req.clone();
                    async move { SecretServiceClient::new(ch).issue_token(r).await }
                })
                .await?
                .token,
        );
        let answer = coordinators
            .call_on("secret", |ch| {
                let r = pb::RevealSecretRequest {
                    token: token.to_string(),
                };
                async move { SecretServiceClient::new(ch).reveal(r).await }
            })
            .await?;
        drop(coordinators);
        let version = answer.version;
        let valid_until_ms = answer.valid_until_ms;
        let values: Arc<Values> = Arc::new(
            answer
                .data
                .into_iter()
                .map(|(k, v)| (k, Zeroizing::new(v)))
                .collect(),
        );
        if let Ok(mut cache) = self.cache.lock() {
            cache.insert(
                key,
                Cached {
                    values: values.clone(),
                    version,
                    fetched: Instant::now(),
                    valid_until_ms,
                },
            );
        }
        Ok((values, version))
    }
}

/// A secret read: its values and version, or why it could not be.
pub type SecretFuture<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<(Arc<Values>, u64), AgentError>> + Send + 'a>,
>;

/// Where replicas' secrets are read: the coordinators ([`SecretFetcher`]),
/// or a table in the unit tests.
pub trait SecretSource: Send + Sync {
    /// The values and version of secret `namespace/name`, read as
    /// `audience` (the workload).
    fn get<'a>(&'a self, namespace: &'a str, name: &'a str, audience: &'a str) -> SecretFuture<'a>;

    /// How often secrets in use are read again (secret volumes follow
    /// updates).
    fn refresh(&self) -> Duration;
}

impl SecretSource for SecretFetcher {
    fn get<'a>(&'a self, namespace: &'a str, name: &'a str, audience: &'a str) -> SecretFuture<'a> {
        Box::pin(SecretFetcher::get(self, namespace, name, audience))
    }

    fn refresh(&self) -> Duration {
        self.refresh
    }
}

/// When a version check finds the cached `version` still current at
/// `now_ms`: until when the cached values may be used (the check proved the
/// caller may still read the secret, as a new token would). `None`: fetch.
fn still_current(version: u64, now_ms: i64, answer: &pb::CheckVersionResponse) -> Option<i64> {
    if answer.version != version {
        return None;
    }
    let token_life = now_ms.saturating_add(TOKEN_TTL_SECONDS as i64 * 1000);
    let until = if answer.expires_at_ms == 0 {
        token_life
    } else {
        token_life.min(answer.expires_at_ms)
    };
    (until > now_ms).then_some(until)
}

/// What a replica gets from its secrets.
#[derive(Default)]
pub struct Resolved {
    /// Environment variables (`secretEnv`).
    pub env: Vec<(String, String)>,
    /// Versions read, by secret name.
    pub versions: HashMap<String, u64>,
    /// Values by secret name (for the volumes).
    pub values: HashMap<String, Arc<Values>>,
}

impl std::fmt::Debug for Resolved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolved")
            .field("env", &self.env.iter().map(|(k, _)| k).collect::<Vec<_>>())
            .field("versions", &self.versions)
            .finish_non_exhaustive()
    }
}

/// Reads every secret `spec` refers to for workload `workload` in `namespace`.
pub async fn resolve(
    fetcher: &dyn SecretSource,
    namespace: &str,
    workload: &str,
    spec: &WorkloadSpec,
) -> Result<Resolved, String> {
    let mut out = Resolved::default();
    for name in spec.secret_names() {
        let (values, version) = fetcher
            .get(namespace, &name, workload)
            .await
            .map_err(|e| format!("secret {namespace}/{name}: {e}"))?;
        out.versions.insert(name.clone(), version);
        out.values.insert(name, values);
    }
    for (i, e) in spec.secret_env.iter().enumerate() {
        let r = &e.secret_key_ref;
        let v = out
            .values
            .get(&r.name)
            .and_then(|vals| vals.get(&r.key))
            .ok_or_else(|| {
                format!(
                    "secretEnv[{i}]: secret {namespace}/{} has no key {:?}",
                    r.name, r.key
                )
            })?;
        let s = std::str::from_utf8(v).map_err(|_| {
            format!(
                "secretEnv[{i}]: the value of {}/{} is not UTF-8 text; use a secret volume",
                r.name, r.key
            )
        })?;
        out.env.push((e.name.clone(), s.to_owned()));
    }
    Ok(out)
}

/// The directory of a replica's secret volume.
pub fn volume_dir(base: &Path, container: &str, volume: &str) -> PathBuf {
    base.join(container).join(volume)
}

fn is_mountpoint(dir: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = dir.display().to_string();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| m == want)
}

fn run(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Mounts a private tmpfs at `dir` (unless one is there from before an
/// agent restart); the files written into it live in memory only.
/// The `secrets/` tree and each replica's directory in it are 0700.
pub fn mount_tmpfs(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    // Made by an older agent with the umask's mode: private from now on.
    for d in dir.ancestors().skip(1).take(2) {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("{}: {e}", d.display()))?;
    }
    if is_mountpoint(dir) {
        return Ok(());
    }
    let opts = format!("size={SECRET_TMPFS_BYTES},mode=0755,nosuid,nodev,noexec");
    let path = dir.display().to_string();
    run(
        "mount",
        &["-t", "tmpfs", "-o", &opts, "cloudless-secret", &path],
    )
}

/// Unmounts and removes a secret volume directory.
pub fn unmount(dir: &Path) {
    if is_mountpoint(dir) {
        if let Err(e) = run("umount", &[&dir.display().to_string()]) {
            tracing::warn!(error = %e, "cannot unmount a secret volume");
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Writes a secret volume's files (mode 0400, owned by `uid:gid`), each
/// through a temporary file renamed into place, and removes files no
/// longer listed.
pub fn write_files(
    dir: &Path,
    volume: &cloudless_types::SecretVolume,
    values: &Values,
    uid: u32,
    gid: u32,
) -> Result<(), String> {
    let items: Vec<(String, String)> = if volume.items.is_empty() {
        let mut keys: Vec<&String> = values.keys().collect();
        keys.sort();
        keys.into_iter().map(|k| (k.clone(), k.clone())).collect()
    } else {
        volume
            .items
            .iter()
            .map(|i| (i.key.clone(), i.path.clone()))
            .collect()
    };
    let mut keep = Vec::new();
    for (key, file) in items {
        let value = values.get(&key).ok_or_else(|| {
            format!(
                "secret {} has no key {key:?} (volume item {file:?})",
                volume.secret_name
            )
        })?;
        let tmp = dir.join(format!(".{file}.tmp"));
        let target = dir.join(&file);
        // Created 0400 from the start: never readable by others, not even
        // for a moment.
        let _ = std::fs::remove_file(&tmp);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .open(&tmp)
            .and_then(|mut f| f.write_all(value.as_slice()))
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::os::unix::fs::chown(&tmp, Some(uid), Some(gid))
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, &target).map_err(|e| format!("{}: {e}", target.display()))?;
        keep.push(file);
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if !keep.contains(&name) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_0400_follow_items_and_drop_what_is_gone() {
        let dir = tempfile::tempdir().expect("dir");
        let mut values = Values::new();
        values.insert("PASSWORD".into(), Zeroizing::new(b"p1".to_vec()));
        values.insert("USER".into(), Zeroizing::new(b"app".to_vec()));
        let all = cloudless_types::SecretVolume {
            secret_name: "db".into(),
            items: Vec::new(),
        };
        let uid = nix_uid();
        write_files(dir.path(), &all, &values, uid, uid).expect("write");
        let mode = std::fs::metadata(dir.path().join("PASSWORD"))
            .expect("file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o400);
        assert_eq!(
            std::fs::read(dir.path().join("USER")).expect("read"),
            b"app"
        );
        let one = cloudless_types::SecretVolume {
            secret_name: "db".into(),
            items: vec![cloudless_types::KeyToPath {
                key: "PASSWORD".into(),
                path: "password".into(),
            }],
        };
        write_files(dir.path(), &one, &values, uid, uid).expect("rewrite");
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .expect("dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect();
        assert_eq!(names, ["password"]);
        let missing = cloudless_types::SecretVolume {
            secret_name: "db".into(),
            items: vec![cloudless_types::KeyToPath {
                key: "TOKEN".into(),
                path: "t".into(),
            }],
        };
        let err = write_files(dir.path(), &missing, &values, uid, uid).expect_err("missing key");
        assert!(err.contains("no key \"TOKEN\""), "{err}");
    }

    #[test]
    fn an_unchanged_version_keeps_the_cached_values_no_longer_than_a_token_or_the_secret() {
        let answer = |version, expires_at_ms| pb::CheckVersionResponse {
            version,
            expires_at_ms,
        };
        let now = 1_000_000;
        let token_life = now + TOKEN_TTL_SECONDS as i64 * 1000;
        assert_eq!(still_current(3, now, &answer(3, 0)), Some(token_life));
        assert_eq!(
            still_current(3, now, &answer(3, now + 5)),
            Some(now + 5),
            "not past the secret's expiry"
        );
        assert_eq!(still_current(3, now, &answer(4, 0)), None, "changed: fetch");
        assert_eq!(
            still_current(3, now, &answer(3, now)),
            None,
            "expired: fetch"
        );
    }

    fn nix_uid() -> u32 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/self").map_or(0, |m| m.uid())
    }
}
