//! Admin certificates: one named identity per operator, short-lived,
//! renewed by `cloudlessctl`, issued by another admin and revocable.
//!
//! A revocation is a time: every certificate of that name issued at or
//! before it is refused (`authz::still_trusted`); a certificate issued for
//! the name afterwards is accepted again.

use cloudless_pki::Identity;
use cloudless_proto::v1::{AdminCertificate, AdminInfo};
use cloudless_state::{Command, Response as SmResponse};
use cloudless_types::AdminRecord;
use tonic::{Request, Status};

use crate::authz::Allow;
use crate::coordinator::{now_ms, CoordinatorHandle};
use crate::error::CoordinatorError;

/// Carries the admin a follower forwards a call for; believed only from a
/// coordinator's certificate.
pub(crate) const ACTOR_KEY: &str = "x-cloudless-actor";
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

/// Who is calling: the admin named in the certificate, or, for a call a
/// follower forwarded, the admin it names in [`ACTOR_KEY`].
pub(crate) fn caller<T>(handle: &CoordinatorHandle, req: &Request<T>) -> Result<String, Status> {
    match crate::authz::require(handle, req, Allow::Admin)? {
        Identity::Admin(name) => Ok(name),
        Identity::Coordinator(id) => req
            .metadata()
            .get(ACTOR_KEY)
            .and_then(|v| v.to_str().ok())
            .and_then(|a| a.strip_prefix("admin:"))
            .map(str::to_owned)
            .ok_or_else(|| {
                Status::permission_denied(format!(
                    "coordinator {id} did not say which admin it acts for; only admins manage admin certificates"
                ))
            }),
        other => Err(Status::permission_denied(format!(
            "{other} may not manage admin certificates"
        ))),
    }
}

/// Adds the acting admin to a request a follower forwards.
pub(crate) fn forward_as<T>(admin: &str, mut r: Request<T>) -> Request<T> {
    if let Ok(v) = format!("admin:{admin}").parse() {
        r.metadata_mut().insert(ACTOR_KEY, v);
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
) -> Result<AdminRecord, CoordinatorError> {
    let (resp, _) = handle.write(None, Command::PutAdmin { record }).await?;
    match resp {
        SmResponse::Admin(r) => Ok(r),
        other => Err(CoordinatorError::Fatal(format!(
            "unexpected state machine answer {other:?}"
        ))),
    }
}

/// Signs `csr_pem` for admin `name` (on the leader) and records it.
pub(crate) async fn issue(
    handle: &CoordinatorHandle,
    name: &str,
    csr_pem: &str,
    issued_by: &str,
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
    // Strictly after any revocation of the name, so the new certificate is
    // not refused with the old ones.
    let now = now_ms() / 1000;
    let at = previous
        .as_ref()
        .map_or(now, |r| now.max(r.revoked_before_s + 1));
    let issued = keys
        .ca
        .sign_csr(csr_pem, &Identity::Admin(name.to_owned()), lifetime, at)?;
    let record = put(
        handle,
        AdminRecord {
            name: name.to_owned(),
            issued_at_s: at,
            not_after_s: issued.not_after,
            issued_by: issued_by.to_owned(),
            revoked_before_s: previous.map_or(0, |r| r.revoked_before_s),
            revoked: false,
        },
    )
    .await?;
    tracing::info!(admin = %name, %issued_by, not_after = issued.not_after, "admin certificate issued");
    Ok(AdminCertificate {
        name: record.name,
        cert_pem: issued.cert_pem,
        ca_pem: keys.ca.cert_pem().to_owned(),
        not_after: issued.not_after,
    })
}

/// Refuses every certificate of admin `name` issued until now.
pub(crate) async fn revoke(
    handle: &CoordinatorHandle,
    name: &str,
    revoked_by: &str,
) -> Result<AdminInfo, CoordinatorError> {
    check_name("name", name)?;
    handle.ensure_leader()?;
    let now = now_ms() / 1000;
    let record = match handle.reader().admin(name)? {
        Some(r) => AdminRecord {
            revoked_before_s: now,
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
    let record = put(handle, record).await?;
    tracing::warn!(admin = %name, %revoked_by, "admin revoked");
    Ok(info(record))
}

/// Every admin record.
pub(crate) fn list(handle: &CoordinatorHandle) -> Result<Vec<AdminInfo>, CoordinatorError> {
    Ok(handle.reader().admins()?.into_iter().map(info).collect())
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
