//! Who may read a secret: the audiences it names, and whether the caller
//! holds one (runs a replica of that workload, or is an admin).

use cloudless_proto::v1::{CheckVersionRequest, CheckVersionResponse};
use cloudless_types::SecretRecord;
use tonic::Status;

use super::caller::Caller;
use super::{namespace_or_default, SecretApi};
use crate::error::CoordinatorError;

impl SecretApi {
    /// Whether `caller` may hold `audience` for a secret in `ns`.
    pub(super) fn holds(
        &self,
        caller: &Caller,
        ns: &str,
        audience: &str,
    ) -> Result<bool, CoordinatorError> {
        if caller.admin {
            return Ok(true);
        }
        let Some(node) = &caller.node else {
            return Ok(false);
        };
        Ok(self
            .handle
            .reader()
            .node_replicas(node)?
            .iter()
            .any(|r| r.namespace == ns && r.workload == audience))
    }

    /// The secret `ns/name` if `caller` may read it as `audience` (what
    /// minting a token needs), else the refusal to record and answer.
    pub(super) fn readable(
        &self,
        caller: &Caller,
        ns: &str,
        name: &str,
        audience: &str,
    ) -> Result<Result<SecretRecord, Status>, Status> {
        let secret = self
            .handle
            .reader()
            .secret(ns, name)
            .map_err(CoordinatorError::from)?;
        let Some(secret) = secret else {
            return Ok(Err(Status::from(CoordinatorError::NotFound(format!(
                "secret {ns}/{name} not found"
            )))));
        };
        if !secret.audiences.iter().any(|a| a == audience) {
            return Ok(Err(Status::from(CoordinatorError::Denied(format!(
                "audience {audience:?} may not read {ns}/{name} (its audiences: {})",
                secret.audiences.join(", ")
            )))));
        }
        if !self.holds(caller, ns, audience)? {
            return Ok(Err(Status::from(CoordinatorError::Denied(format!(
                "{} runs no replica of workload {ns}/{audience}, so it does not hold that audience",
                caller.actor
            )))));
        }
        Ok(Ok(secret))
    }

    /// The current version of a secret the caller may read: no token, and
    /// nothing written unless refused (then audited like a mint refusal).
    pub(super) async fn check_version(
        &self,
        caller: &Caller,
        r: CheckVersionRequest,
    ) -> Result<CheckVersionResponse, Status> {
        let ns = namespace_or_default(r.namespace);
        match self.readable(caller, &ns, &r.name, &r.audience)? {
            Ok(secret) => Ok(CheckVersionResponse {
                version: secret.current().map_or(0, |v| v.version),
                expires_at_ms: secret.expires_at_ms,
            }),
            Err(status) => {
                let mut audit = Self::audit(caller, "version-check", &ns, &r.name);
                audit.detail = format!("audience {}", r.audience);
                Err(self.refuse(audit, status).await)
            }
        }
    }
}
