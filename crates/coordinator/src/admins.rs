//! Admin certificates: one named identity per operator, short-lived,
//! renewed by `cloudlessctl`, issued by another admin and revocable.
//!
//! A revocation is a time: every certificate of that name issued at or
//! before it is refused (`authz::still_trusted`); a certificate issued for
//! the name afterwards is accepted again.

use std::path::Path;

use cloudless_pki::Identity;
use cloudless_proto::v1::{AdminCertificate, AdminInfo};
use cloudless_state::{Command, Response as SmResponse};
use cloudless_types::AdminRecord;
use tonic::{Request, Status};

use crate::authz::Allow;
use crate::clock::now_ms;
use crate::config::CoordinatorConfig;
use crate::error::{CoordinatorError, StartError};
use crate::handle::CoordinatorHandle;

/// Carries the admin a follower forwards a call for; believed only from a
/// coordinator's certificate.
pub(crate) const ACTOR_KEY: &str = "x-cloudless-actor";
/// When the forwarded admin's certificate was issued (Unix seconds).
pub(crate) const ACTOR_ISSUED_KEY: &str = "x-cloudless-actor-issued-at";
/// Longest CSR accepted.
const MAX_CSR_BYTES: usize = 16 * 1024;

/// Checks an admin name: 1-63 of `a-z 0-9 - . _ @`, starting with a letter
/// or digit.
pub(crate) fn check_name(field: &str, name: &str) -> Result<(), CoordinatorError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'_' | b'@')
        });
    if ok {
        Ok(())
    } else {
        Err(CoordinatorError::InvalidArgument(format!(
            "{field}: {name:?} must be 1-63 characters of a-z, 0-9, '-', '.', '_' and '@', starting with a letter or digit"
        )))
    }
}

/// The admin acting: its name and when its certificate was issued.
#[derive(Debug, Clone)]
pub(crate) struct Actor {
    pub(crate) name: String,
    pub(crate) issued_at_s: i64,
}

/// Who is calling: the admin named in the certificate, or, for a call a
/// follower forwarded, the admin it names in [`ACTOR_KEY`] and
/// [`ACTOR_ISSUED_KEY`], checked again against this coordinator's records
/// (a follower that has not applied a revocation yet is not the last word).
pub(crate) fn caller<T>(handle: &CoordinatorHandle, req: &Request<T>) -> Result<Actor, Status> {
    let header = |k: &str| req.metadata().get(k).and_then(|v| v.to_str().ok());
    match crate::authz::require_issued(handle, req, Allow::Admin)? {
        (Identity::Admin(name), issued_at_s) => Ok(Actor { name, issued_at_s }),
        (Identity::Coordinator(id), _) => {
            let name = header(ACTOR_KEY).and_then(|a| a.strip_prefix("admin:"));
            let issued = header(ACTOR_ISSUED_KEY).and_then(|v| v.parse::<i64>().ok());
            let (Some(name), Some(issued_at_s)) = (name, issued) else {
                return Err(Status::from(CoordinatorError::Denied(format!(
                    "coordinator {id} did not say which admin it acts for; only admins manage admin certificates"
                ))));
            };
            crate::authz::still_trusted(handle, &Identity::Admin(name.to_owned()), issued_at_s)?;
            Ok(Actor {
                name: name.to_owned(),
                issued_at_s,
            })
        }
        (other, _) => Err(Status::from(CoordinatorError::Denied(format!(
            "{other} may not manage admin certificates"
        )))),
    }
}

/// Adds the acting admin to a request a follower forwards.
pub(crate) fn forward_as<T>(actor: &Actor, mut r: Request<T>) -> Request<T> {
    if let Ok(v) = format!("admin:{}", actor.name).parse() {
        r.metadata_mut().insert(ACTOR_KEY, v);
    }
    if let Ok(v) = actor.issued_at_s.to_string().parse() {
        r.metadata_mut().insert(ACTOR_ISSUED_KEY, v);
    }
    r
}

fn info(r: AdminRecord) -> AdminInfo {
    AdminInfo {
        name: r.name,
        issued_at: r.issued_at_s,
        not_after: r.not_after_s,
        issued_by: r.issued_by,
        revoked: r.revoked,
        revoked_before: r.revoked_before_s,
    }
}

async fn put(
    handle: &CoordinatorHandle,
    record: AdminRecord,
    actor: &Actor,
) -> Result<AdminRecord, CoordinatorError> {
    let command = Command::PutAdmin {
        record,
        actor: Some((actor.name.clone(), actor.issued_at_s)),
    };
    let (resp, _) = handle.write(None, command).await?;
    match resp {
        SmResponse::Admin(r) => Ok(r),
        SmResponse::Rejected(r) => Err(CoordinatorError::Rejected(r)),
        other => Err(CoordinatorError::Fatal(format!(
            "unexpected state machine answer {other:?}"
        ))),
    }
}

/// Signs `csr_pem` for admin `name` (on the leader) and records it. A
/// renewal (`name` is the actor's own) keeps the name's revocation; an
/// issue by another admin is dated after it, so the new certificate is
/// accepted while the revoked ones stay refused.
pub(crate) async fn issue(
    handle: &CoordinatorHandle,
    name: &str,
    csr_pem: &str,
    actor: &Actor,
    renewal: bool,
) -> Result<AdminCertificate, CoordinatorError> {
    check_name("name", name)?;
    if csr_pem.len() > MAX_CSR_BYTES {
        return Err(CoordinatorError::InvalidArgument(format!(
            "csr_pem: {} bytes is over the {MAX_CSR_BYTES}-byte limit",
            csr_pem.len()
        )));
    }
    handle.ensure_leader()?;
    let keys = handle.identity_keys()?;
    let lifetime = handle.cluster()?.config.admin_cert_lifetime_s;
    let previous = handle.reader().admin(name)?;
    let now = now_ms() / 1000;
    let revoked_before = previous.as_ref().map_or(0, |r| r.revoked_before_s);
    let at = if renewal {
        now
    } else {
        now.max(revoked_before + 1)
    };
    let issued = keys
        .ca
        .sign_csr(csr_pem, &Identity::Admin(name.to_owned()), lifetime, at)?;
    // The first issuer is kept across renewals.
    let issued_by = match (&previous, renewal) {
        (Some(p), true) if !p.issued_by.is_empty() => p.issued_by.clone(),
        _ => actor.name.clone(),
    };
    // The state machine refuses it if a revocation committed meanwhile.
    let record = put(
        handle,
        AdminRecord {
            name: name.to_owned(),
            issued_at_s: at,
            not_after_s: issued.not_after,
            issued_by,
            revoked_before_s: revoked_before,
            revoked: false,
        },
        actor,
    )
    .await?;
    tracing::info!(admin = %name, by = %actor.name, renewal, not_after = issued.not_after, "admin certificate issued");
    Ok(AdminCertificate {
        name: record.name,
        cert_pem: issued.cert_pem,
        ca_pem: keys.ca.cert_pem().to_owned(),
        not_after: issued.not_after,
    })
}

/// Refuses every certificate of admin `name` issued until now (or until its
/// newest one, if the leader that issued it had a clock ahead of ours).
pub(crate) async fn revoke(
    handle: &CoordinatorHandle,
    name: &str,
    actor: &Actor,
) -> Result<AdminInfo, CoordinatorError> {
    check_name("name", name)?;
    handle.ensure_leader()?;
    let now = now_ms() / 1000;
    let record = match handle.reader().admin(name)? {
        Some(r) => AdminRecord {
            revoked_before_s: now.max(r.issued_at_s),
            revoked: true,
            ..r
        },
        None => AdminRecord {
            name: name.to_owned(),
            issued_at_s: 0,
            not_after_s: 0,
            issued_by: String::new(),
            revoked_before_s: now,
            revoked: true,
        },
    };
    let record = put(handle, record, actor).await?;
    tracing::warn!(admin = %name, by = %actor.name, "admin revoked");
    Ok(info(record))
}

/// Every admin record.
pub(crate) fn list(handle: &CoordinatorHandle) -> Result<Vec<AdminInfo>, CoordinatorError> {
    Ok(handle.reader().admins()?.into_iter().map(info).collect())
}

/// Break-glass: issues admin `name` a certificate from this coordinator's
/// data dir and master key, without the cluster (for when every admin
/// certificate has expired). Writes the bundle to `out`.
pub fn issue_admin_offline(
    config: &CoordinatorConfig,
    name: &str,
    out: &Path,
) -> Result<(), StartError> {
    check_name("--name", name).map_err(|e| StartError::Tls(e.to_string()))?;
    let (master, _) = crate::identity::resolve_master_key(config, false)?;
    let master = master.ok_or_else(|| {
        StartError::Tls("a coordinator without a master key has no CA to issue from".into())
    })?;
    let material = crate::tls::stored_material(&config.data_dir)?.ok_or_else(|| {
        StartError::Tls(format!(
            "{} holds no cluster identity (tls/identity.json)",
            config.data_dir.display()
        ))
    })?;
    let ca = crate::tls::unseal_ca(&material, &master)?;
    let now = now_ms() / 1000;
    crate::tls::write_admin_credentials(
        &ca,
        name,
        out,
        &config.advertise_addr,
        crate::tls::ADMIN_CERT_LIFETIME,
        now,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_names_are_checked() {
        for ok in ["alice", "ops-1", "a.b_c@example.org", "0"] {
            check_name("name", ok).expect(ok);
        }
        for bad in ["", "Alice", "-x", "a b", "a/b", &"x".repeat(64)] {
            let e = check_name("name", bad).expect_err(bad).to_string();
            assert!(e.contains("name:"), "{e}");
        }
    }
}
