//! Creating and updating a secret: each new version sealed under the
//! active master key version and written through Raft.

use cloudless_proto::v1::{PutSecretRequest, PutSecretResponse};
use cloudless_secrets::SecretValues;
use cloudless_state::{Command, Rejection, Response as SmResponse, SecretCommand};
use cloudless_types::{SecretVersion, ValidationErrors};
use tonic::Status;
use zeroize::Zeroizing;

use super::caller::Caller;
use super::{meta, namespace_or_default, SecretApi};
use crate::clock::now_ms;
use crate::error::CoordinatorError;
use crate::forward::idempotency_key;

/// Attempts of one secret write that conflicts with concurrent writes of the
/// same secret (each round, one of them wins).
const PUT_ATTEMPTS: u32 = 10;

impl SecretApi {
    pub(super) async fn put(
        &self,
        caller: &Caller,
        r: PutSecretRequest,
        create: bool,
    ) -> Result<PutSecretResponse, CoordinatorError> {
        let key = idempotency_key(r.write.as_ref())?;
        let ns = namespace_or_default(r.namespace);
        let action = if create { "create" } else { "update" };
        let mut errs = ValidationErrors::default();
        cloudless_types::check_secret_names(&mut errs, &ns, &r.name, &r.audiences);
        if r.data.is_empty() {
            errs.push("data", "needs at least one KEY=VALUE");
        }
        for k in r.data.keys() {
            cloudless_types::check_secret_key(&mut errs, &format!("data.{k}"), k);
        }
        if create && r.audiences.is_empty() {
            errs.push("audiences", "needs at least one workload that may read it");
        }
        let limit = self.handle.cluster()?.config.secret_max_bytes as usize;
        let size: usize = r.data.values().map(Vec::len).sum();
        if size > limit {
            errs.push(
                "data",
                format!(
                    "{size} bytes is above the limit of {limit} (cluster setting secret_max_bytes)"
                ),
            );
        }
        if r.ttl_seconds > 100 * 365 * 86_400 {
            errs.push("ttlSeconds", format!("{} is too long", r.ttl_seconds));
        }
        if !errs.0.is_empty() {
            let audit = Self::audit(caller, action, &ns, &r.name);
            let status = Status::from(CoordinatorError::Invalid(errs));
            return Err(CoordinatorError::Status(self.refuse(audit, status).await));
        }
        let values: SecretValues = r
            .data
            .into_iter()
            .map(|(k, v)| (k, Zeroizing::new(v)))
            .collect();
        let plain = cloudless_secrets::encode_values(&values)
            .map_err(|e| CoordinatorError::Fatal(e.to_string()))?;
        let keys: Vec<String> = values.keys().cloned().collect();
        let expires = (r.ttl_seconds > 0)
            .then(|| now_ms() + i64::try_from(r.ttl_seconds).unwrap_or(i64::MAX / 2) * 1000);
        // Concurrent updates of one secret each seal the next version; the
        // state machine takes one per version and rejects the rest as a
        // conflict, which are sealed again on the new current version.
        for attempt in 0..PUT_ATTEMPTS {
            if attempt > 0 {
                let jitter = u64::from(uuid::Uuid::new_v4().as_bytes()[0]) % 20;
                tokio::time::sleep(std::time::Duration::from_millis(
                    5 * u64::from(attempt) + jitter,
                ))
                .await;
            }
            let ring = self.active_keyring().await?;
            let current = self
                .handle
                .reader()
                .secret(&ns, &r.name)?
                .and_then(|s| s.current().map(|v| v.version))
                .unwrap_or(0);
            let version = if create { 1 } else { current + 1 };
            let ciphertext = ring
                .seal(&ns, &r.name, version, &plain)
                .map_err(|e| CoordinatorError::Fatal(e.to_string()))?;
            let cmd = Command::Secret(SecretCommand::Put {
                namespace: ns.clone(),
                name: r.name.clone(),
                version: SecretVersion {
                    version,
                    ciphertext,
                    keys: keys.clone(),
                    size: u32::try_from(size).unwrap_or(u32::MAX),
                    created_at_ms: now_ms(),
                },
                create,
                audiences: (!r.audiences.is_empty()).then(|| r.audiences.clone()),
                immutable: r.immutable,
                expires_at_ms: if create {
                    Some(expires.unwrap_or(0))
                } else {
                    expires
                },
                audit: Self::audit(caller, action, &ns, &r.name),
            });
            // The proposer turns a rejection into an error.
            match self.handle.write(key.clone(), cmd).await {
                Ok((SmResponse::SecretStored(rec), commit)) => {
                    return Ok(PutSecretResponse {
                        meta: Some(meta(&rec)),
                        commit: Some(commit),
                    })
                }
                Err(CoordinatorError::Rejected(Rejection::SecretConflict(why))) => {
                    tracing::debug!(namespace = %ns, name = %r.name, attempt, %why, "secret write conflicted; sealing again");
                }
                Err(e) => return Err(e),
                Ok((other, _)) => {
                    return Err(CoordinatorError::Fatal(format!(
                        "unexpected state machine answer {other:?}"
                    )))
                }
            }
        }
        Err(Rejection::SecretConflict(format!(
            "{ns}/{}: still conflicting with concurrent updates after {PUT_ATTEMPTS} attempts; retry",
            r.name
        ))
        .into())
    }
}
