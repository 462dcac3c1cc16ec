//! Access tokens: minted for an audience the caller holds, then used to
//! reveal the secret's values.

use std::sync::Arc;

use cloudless_proto::v1::{
    IssueTokenRequest, IssueTokenResponse, RevealSecretRequest, RevealSecretResponse,
};
use cloudless_secrets::{AccessClaims, AccessTokenKey};
use cloudless_state::{Command, Response as SmResponse, SecretCommand};
use cloudless_types::{
    AccessTokenRecord, DEFAULT_TOKEN_TTL_SECONDS, MAX_TOKEN_TTL_SECONDS, MAX_TOKEN_USES,
};
use tonic::Status;

use super::caller::Caller;
use super::ledger::STRICT_USES;
use super::{namespace_or_default, SecretApi};
use crate::clock::now_ms;
use crate::error::CoordinatorError;

impl SecretApi {
    pub(super) async fn issue(
        &self,
        caller: &Caller,
        r: IssueTokenRequest,
    ) -> Result<IssueTokenResponse, Status> {
        let ns = namespace_or_default(r.namespace);
        let mut audit = Self::audit(caller, "token-mint", &ns, &r.name);
        audit.detail = format!("audience {}", r.audience);
        let ttl = if r.ttl_seconds == 0 {
            DEFAULT_TOKEN_TTL_SECONDS
        } else {
            r.ttl_seconds
        };
        let uses = if r.max_uses == 0 { 1 } else { r.max_uses };
        if ttl > MAX_TOKEN_TTL_SECONDS {
            return Err(Status::from(CoordinatorError::InvalidArgument(format!(
                "ttlSeconds: {ttl} is above the maximum of {MAX_TOKEN_TTL_SECONDS} (24 h)"
            ))));
        }
        if uses > MAX_TOKEN_USES {
            return Err(Status::from(CoordinatorError::InvalidArgument(format!(
                "maxUses: {uses} is above the maximum of {MAX_TOKEN_USES}"
            ))));
        }
        if let Err(status) = self.readable(caller, &ns, &r.name, &r.audience)? {
            return Err(self.refuse(audit, status).await);
        }
        let now = now_ms();
        let id = uuid::Uuid::new_v4().simple().to_string();
        let expires = now + i64::try_from(ttl).unwrap_or(86_400) * 1000;
        let token = self
            .access_key()?
            .sign(AccessClaims {
                jti: id.clone(),
                ns: ns.clone(),
                secret: r.name.clone(),
                aud: r.audience.clone(),
                sub: caller.actor.clone(),
                iat: now,
                exp: expires,
                typ: String::new(),
            })
            .map_err(|e| Status::from(CoordinatorError::Internal(e.to_string())))?;
        audit.token_id.clone_from(&id);
        let record = AccessTokenRecord {
            id: id.clone(),
            namespace: ns,
            secret: r.name,
            audience: r.audience,
            issued_to: caller.actor.clone(),
            issued_at_ms: now,
            expires_at_ms: expires,
            max_uses: uses,
            uses: 0,
            revoked: false,
        };
        self.write_by(
            &caller.actor,
            Command::Secret(SecretCommand::MintToken {
                token: record,
                audit,
            }),
        )
        .await?;
        Ok(IssueTokenResponse {
            token,
            token_id: id,
            expires_at_ms: expires,
            max_uses: uses,
        })
    }

    pub(super) async fn reveal(
        &self,
        caller: &Caller,
        r: RevealSecretRequest,
    ) -> Result<RevealSecretResponse, Status> {
        let now = now_ms();
        let mut audit = Self::audit(caller, "read", "", "");
        let cached_claims = self.verified.get(&r.token).filter(|c| now < c.exp);
        let verified = match cached_claims {
            Some(c) => Ok(c),
            None => self.access_key()?.verify(&r.token, now).map(|c| {
                let c = Arc::new(c);
                self.verified.insert(r.token.clone(), c.clone());
                c
            }),
        };
        let claims = match verified {
            Ok(c) => c,
            Err(e) => {
                if let Some(c) = AccessTokenKey::peek(&r.token) {
                    // As the token claims (unverified), so the refusal is
                    // found under the secret it names.
                    audit.namespace = c.ns;
                    audit.secret = c.secret;
                    audit.token_id = c.jti;
                }
                return Err(self
                    .refuse(
                        audit,
                        Status::from(CoordinatorError::Unauthenticated(e.to_string())),
                    )
                    .await);
            }
        };
        audit.namespace.clone_from(&claims.ns);
        audit.secret.clone_from(&claims.secret);
        audit.token_id.clone_from(&claims.jti);
        // Local state (the hot records, the ledger) answers only while this
        // leader holds a lease: a leader cut off from its quorum may have been
        // replaced, and the new one may have revoked the token.
        self.lease
            .ensure(&self.handle)
            .await
            .map_err(Status::from)?;
        let reader = self.handle.reader();
        let generation = reader.secret_generation();
        let hot = self
            .hot
            .get(&claims.jti)
            .filter(|(g, _, _)| *g == generation)
            .map(|(_, t, s)| (t, s));
        let (token, secret) = match hot {
            Some((t, s)) => (Some(t), s),
            None => {
                let (t, s) = reader
                    .token_and_secret(&claims.jti)
                    .map_err(CoordinatorError::from)?;
                let (t, s) = (t.map(Arc::new), s.map(Arc::new));
                if let Some(tok) = t.as_ref().filter(|t| t.max_uses > STRICT_USES) {
                    self.hot
                        .insert(claims.jti.clone(), (generation, tok.clone(), s.clone()));
                }
                (t, s)
            }
        };
        let record = if let Some(tok) = token.as_ref().filter(|t| t.max_uses > STRICT_USES) {
            // Many-use token: counted here, committed by the ledger.
            self.count_use(caller, &claims, tok, secret, audit, now)?
        } else {
            let (resp, _) = self
                .write_by(
                    &caller.actor,
                    Command::Secret(SecretCommand::UseToken {
                        id: claims.jti.clone(),
                        actor: caller.actor.clone(),
                        audit,
                    }),
                )
                .await?;
            match resp {
                SmResponse::SecretAccess(Ok(rec)) => Arc::new(rec),
                SmResponse::SecretAccess(Err(why)) => {
                    return Err(Status::from(CoordinatorError::Denied(why)))
                }
                other => {
                    return Err(Status::from(CoordinatorError::Internal(format!(
                        "unexpected state machine answer {other:?}"
                    ))))
                }
            }
        };
        let Some(current) = record.current() else {
            return Err(Status::from(CoordinatorError::NotFound(String::from(
                "the secret has no version",
            ))));
        };
        let values = self.decrypted(&record, current)?;
        let valid_until = match (claims.exp, record.expires_at_ms) {
            (t, 0) => t,
            (t, s) => t.min(s),
        };
        Ok(RevealSecretResponse {
            data: values
                .iter()
                .map(|(k, v)| (k.clone(), v.to_vec()))
                .collect::<std::collections::HashMap<_, _>>(),
            version: current.version,
            valid_until_ms: valid_until,
        })
    }
}
