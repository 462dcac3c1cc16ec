//! `cloudlessctl admin`: named admin certificates, their renewal (also done
//! by every command when two thirds of the certificate's lifetime are gone),
//! issuance to other operators and revocation.

use std::path::{Path, PathBuf};

use clap::Subcommand;
use cloudless_proto::v1::cluster_service_client::ClusterServiceClient;
use cloudless_proto::v1::{self as pb};

use crate::client::{call, Failure, Target};
use crate::cmd::Ctx;
use crate::output::sanitize;
use crate::Exit;

/// `cloudlessctl admin` subcommands.
#[derive(Subcommand, Debug)]
pub(crate) enum AdminCmd {
    /// Renew this config's admin certificate now (same key, new validity).
    Renew,
    /// Issue a certificate to another operator: writes a key, certificate,
    /// the CA and a cloudlessctl.toml to --out (mode 0700).
    Issue {
        /// The operator's name: 1-63 of a-z, 0-9, '-', '.', '_', '@'.
        name: String,
        /// Directory for the new credentials.
        #[arg(long)]
        out: PathBuf,
    },
    /// Refuse every certificate of NAME issued until now.
    Revoke {
        /// The operator's name.
        name: String,
    },
    /// Admins ever issued or revoked, with their validity.
    List,
}

pub(crate) use cloudless_client::CredentialPaths;

fn failure(exit: Exit, message: String) -> Failure {
    Failure::new(exit, anyhow::anyhow!("{message}"))
}

/// Replaces `path` with `contents` (mode `mode`) through a synced temporary
/// file and a rename, then syncs the directory.
fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), Failure> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |e: std::io::Error| failure(Exit::Failed, format!("{}: {e}", path.display()));
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    // A leftover temporary file would keep its old mode: start afresh.
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(contents)
        .and_then(|()| f.sync_all())
        .map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    Ok(())
}

/// Unix seconds now.
fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Renews the certificate at `paths` when two thirds of its lifetime are
/// gone (`force`: now). Keeps the key, so the pair on disk always matches.
/// Returns the new certificate, if it was renewed.
pub(crate) async fn renew_if_due(
    target: &Target,
    paths: &CredentialPaths,
    force: bool,
) -> Result<Option<String>, Failure> {
    let Some(tls) = target.tls() else {
        return Ok(None);
    };
    let info = cloudless_pki::inspect_certificate(&tls.cert_pem)
        .map_err(|e| failure(Exit::Usage, format!("{}: {e}", paths.cert.display())))?;
    let now = now_s();
    if now >= info.not_after {
        return Err(failure(
            Exit::Usage,
            format!(
                "{}: the admin certificate expired at {} (Unix seconds); ask another admin for a new one \
                 (cloudlessctl admin issue NAME --out DIR), or on a coordinator host run \
                 cloudless-coordinator admin-cert --name NAME --out DIR",
                paths.cert.display(),
                info.not_after
            ),
        ));
    }
    // From the issue time: the validity starts BACKDATE_S earlier.
    let issued = info.not_before + cloudless_pki::BACKDATE_S;
    let renew_at = issued + (info.not_after - issued) * 2 / 3;
    if !force && now < renew_at {
        return Ok(None);
    }
    let csr_pem = cloudless_pki::csr_for_key(&tls.key_pem)
        .map_err(|e| failure(Exit::Usage, format!("{}: {e}", paths.key.display())))?;
    let cert = call(target, |ch| {
        let csr_pem = csr_pem.clone();
        async move {
            ClusterServiceClient::new(ch)
                .renew_admin(pb::RenewAdminRequest { csr_pem })
                .await
        }
    })
    .await?;
    write_atomic(&paths.cert, cert.cert_pem.as_bytes(), 0o644)?;
    eprintln!(
        "cloudlessctl: renewed the admin certificate of {:?} in {} (valid until {} Unix seconds)",
        cert.name,
        paths.cert.display(),
        cert.not_after
    );
    Ok(Some(cert.cert_pem))
}

/// Keeps the admin certificate alive before every command (but `admin
/// renew`): renewed with two thirds of its lifetime gone. A renewal that
/// fails for a reason other than bad credentials (exit code 2), e.g. an
/// older coordinator answering `UNIMPLEMENTED`, only warns: the certificate
/// is still valid for a third of its lifetime and the command goes on.
pub(crate) async fn keep_alive(
    target: &mut Target,
    paths: &CredentialPaths,
) -> Result<(), Failure> {
    match renew_if_due(target, paths, false).await {
        Ok(Some(cert)) => {
            if let Some(mut t) = target.tls().cloned() {
                t.cert_pem = cert;
                target.set_tls(Some(t));
            }
        }
        Ok(None) => {}
        // Still valid for a third of its lifetime: the command goes on.
        Err(f) if f.code != Exit::Usage.code() => {
            eprintln!(
                "cloudlessctl: warning: cannot renew the admin certificate now: {:#}",
                f.error
            );
        }
        Err(f) => return Err(f),
    }
    Ok(())
}

/// Runs an `admin` command; `paths` are the `--config` file's credentials.
pub(crate) async fn run(
    cmd: AdminCmd,
    ctx: &Ctx,
    paths: Option<&CredentialPaths>,
) -> Result<(), Failure> {
    let target = &ctx.target;
    match cmd {
        AdminCmd::Renew => {
            let Some(paths) = paths else {
                return Err(Failure::usage(
                    "admin renew needs --config with ca, cert and key",
                ));
            };
            renew_if_due(target, paths, true).await?;
        }
        AdminCmd::Issue { name, out } => {
            let (csr_pem, key_pem) = cloudless_pki::new_anonymous_csr()
                .map_err(|e| failure(Exit::Failed, format!("cannot make a key: {e}")))?;
            let cert = call(target, |ch| {
                let req = pb::IssueAdminRequest {
                    name: name.clone(),
                    csr_pem: csr_pem.clone(),
                };
                async move { ClusterServiceClient::new(ch).issue_admin(req).await }
            })
            .await?;
            {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&out)
                    .map_err(|e| failure(Exit::Failed, format!("{}: {e}", out.display())))?;
            }
            let out = std::fs::canonicalize(&out)
                .map_err(|e| failure(Exit::Failed, format!("{}: {e}", out.display())))?;
            write_atomic(&out.join("ca.crt"), cert.ca_pem.as_bytes(), 0o644)?;
            write_atomic(&out.join("admin.key"), key_pem.as_bytes(), 0o600)?;
            write_atomic(&out.join("admin.crt"), cert.cert_pem.as_bytes(), 0o644)?;
            let servers = target
                .servers()
                .iter()
                .map(|s| format!("{s:?}"))
                .collect::<Vec<_>>()
                .join(", ");
            let ctl = format!(
                "# cloudlessctl configuration for admin {name:?}.\n\
                 # cloudlessctl renews admin.crt when two thirds of its lifetime are gone.\n\
                 servers = [{servers}]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
                out.join("ca.crt").display(),
                out.join("admin.crt").display(),
                out.join("admin.key").display(),
            );
            write_atomic(&out.join("cloudlessctl.toml"), ctl.as_bytes(), 0o600)?;
            println!(
                "admin {:?}: credentials in {} (valid until {} Unix seconds); use: cloudlessctl --config {}",
                cert.name,
                out.display(),
                cert.not_after,
                out.join("cloudlessctl.toml").display()
            );
        }
        AdminCmd::Revoke { name } => {
            let r = call(target, |ch| {
                let req = pb::RevokeAdminRequest { name: name.clone() };
                async move { ClusterServiceClient::new(ch).revoke_admin(req).await }
            })
            .await?;
            let before = r.admin.map_or(0, |a| a.revoked_before);
            println!("admin {name:?} revoked: certificates issued until {before} (Unix seconds) are refused");
        }
        AdminCmd::List => {
            let r = call(target, |ch| async move {
                ClusterServiceClient::new(ch)
                    .list_admins(pb::ListAdminsRequest {})
                    .await
            })
            .await?;
            if ctx.output.is_structured() {
                let rows: Vec<_> = r
                    .admins
                    .iter()
                    .map(|a| {
                        serde_json::json!({
                            "name": a.name, "issuedAt": a.issued_at, "notAfter": a.not_after,
                            "issuedBy": a.issued_by, "revoked": a.revoked, "revokedBefore": a.revoked_before,
                        })
                    })
                    .collect();
                return ctx.output.print(&rows);
            }
            println!(
                "{:<24} {:<12} {:<12} {:<24} REVOKED",
                "NAME", "ISSUED", "NOT-AFTER", "ISSUED-BY"
            );
            for a in r.admins {
                println!(
                    "{:<24} {:<12} {:<12} {:<24} {}",
                    sanitize(&a.name),
                    a.issued_at,
                    a.not_after,
                    sanitize(&a.issued_by),
                    if a.revoked { "yes" } else { "no" }
                );
            }
        }
    }
    Ok(())
}
