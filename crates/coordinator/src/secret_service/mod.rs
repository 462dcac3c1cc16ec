//! `SecretService`: secrets encrypted with envelope encryption and stored
//! in Raft as ciphertext; values released only for access tokens minted for
//! an audience the caller holds; every call audited in Raft.
//!
//! Writes and token uses run on the leader (followers forward, passing the
//! caller's identity in `x-cloudless-actor`, which the leader believes only
//! from a coordinator). Plaintext exists only in memory, in `Zeroizing`
//! buffers, and in the gRPC answer over mTLS; it is never logged.
//!
//! This file is the RPC glue: who may call each method, forwarding to the
//! leader, and the answers. The rest: [`caller`] (who is calling), [`access`]
//! (who may read a secret), [`tokens`] (minting and revealing), [`put`]
//! (creating and updating), [`keys`] (the keyring, rotation, decryption),
//! [`ledger`] (counted uses and refusals) and [`cache`].

use std::sync::{Arc, Mutex};

use cloudless_proto::v1::secret_service_client::SecretServiceClient;
use cloudless_proto::v1::secret_service_server::SecretService;
use cloudless_proto::v1::{
    AuditEntry, AuditRequest, AuditResponse, CheckVersionRequest, CheckVersionResponse,
    DeleteSecretRequest, DeleteSecretResponse, GetSecretRequest, IssueTokenRequest,
    IssueTokenResponse, KeyInfoRequest, KeyInfoResponse, ListSecretsRequest, ListSecretsResponse,
    PutSecretRequest, PutSecretResponse, RetireMasterKeyRequest, RevealSecretRequest,
    RevealSecretResponse, RevokeTokenRequest, RevokeTokenResponse, RotateMasterKeyRequest,
    RotateMasterKeyResponse, SecretMeta,
};
use cloudless_secrets::{AccessClaims, AccessTokenKey};
use cloudless_state::{Command, Response as SmResponse, SecretCommand};
use cloudless_types::{SecretRecord, DEFAULT_NAMESPACE};
use tonic::{Request, Response, Status};

use crate::authz::Allow;
use crate::error::CoordinatorError;
use crate::forward::{idempotency_key, leader_or_forward};
use crate::handle::CoordinatorHandle;

mod access;
mod cache;
mod caller;
mod keys;
mod ledger;
mod put;
mod tokens;

use cache::{BoundedMap, HotRecord, PlainValues, HOT_LIMIT, PLAIN_LIMIT};
use keys::RingCache;
use ledger::Ledger;

/// The `SecretService` implementation.
#[derive(Clone)]
pub struct SecretApi {
    handle: CoordinatorHandle,
    ring: Arc<RingCache>,
    tokens: Arc<Mutex<Option<Arc<AccessTokenKey>>>>,
    ledger: Arc<Mutex<Ledger>>,
    /// Records of many-use tokens, by token id.
    hot: Arc<BoundedMap<String, HotRecord>>,
    /// Tokens whose signature verified (by exact text), with their claims.
    verified: Arc<BoundedMap<String, Arc<AccessClaims>>>,
    /// Decrypted values by (secret, version, master key version); memory only.
    plain: Arc<BoundedMap<(String, u64, u32), PlainValues>>,
    /// Reads are answered from local state only inside it.
    lease: crate::leader_lease::LeaderLease,
}

impl std::fmt::Debug for SecretApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretApi").finish_non_exhaustive()
    }
}

fn namespace_or_default(ns: String) -> String {
    if ns.is_empty() {
        DEFAULT_NAMESPACE.to_owned()
    } else {
        ns
    }
}

fn meta(r: &SecretRecord) -> SecretMeta {
    let current = r.current();
    SecretMeta {
        namespace: r.namespace.clone(),
        name: r.name.clone(),
        version: current.map_or(0, |v| v.version),
        created_at_ms: r.created_at_ms,
        audiences: r.audiences.clone(),
        updated_at_ms: r.updated_at_ms,
        immutable: r.immutable,
        expires_at_ms: r.expires_at_ms,
        keys: current.map(|v| v.keys.clone()).unwrap_or_default(),
        size_bytes: current.map_or(0, |v| v.size),
        key_version: current.map_or(0, |v| v.ciphertext.key_version),
    }
}

impl SecretApi {
    /// Serves `handle`.
    pub fn new(handle: CoordinatorHandle) -> Self {
        let election_timeout_min =
            std::time::Duration::from_millis(handle.raft().config().election_timeout_min);
        Self {
            lease: crate::leader_lease::LeaderLease::new(election_timeout_min),
            handle,
            ring: Arc::default(),
            tokens: Arc::default(),
            ledger: Arc::default(),
            hot: Arc::new(BoundedMap::new(HOT_LIMIT)),
            verified: Arc::new(BoundedMap::new(HOT_LIMIT)),
            plain: Arc::new(BoundedMap::new(PLAIN_LIMIT)),
        }
    }

    /// Writes `cmd` for `actor`: in the node lane when a node caused it.
    async fn write_by(
        &self,
        actor: &str,
        cmd: Command,
    ) -> Result<(SmResponse, cloudless_proto::v1::CommitInfo), CoordinatorError> {
        if actor.starts_with("node:") {
            self.handle.write_for_node(cmd).await
        } else {
            self.handle.write(None, cmd).await
        }
    }
}

#[tonic::async_trait]
impl SecretService for SecretApi {
    async fn create(
        &self,
        req: Request<PutSecretRequest>,
    ) -> Result<Response<PutSecretResponse>, Status> {
        let caller = self.caller(&req, Allow::Admin)?;
        let (this, c) = (self.clone(), caller.clone());
        leader_or_forward(
            &self.handle,
            req,
            |r| async move { this.put(&c, r, true).await },
            |ch, r| async move {
                SecretServiceClient::new(ch)
                    .create(Self::forward(&caller, r))
                    .await
            },
        )
        .await
    }

    async fn update(
        &self,
        req: Request<PutSecretRequest>,
    ) -> Result<Response<PutSecretResponse>, Status> {
        let caller = self.caller(&req, Allow::Admin)?;
        let (this, c) = (self.clone(), caller.clone());
        leader_or_forward(
            &self.handle,
            req,
            |r| async move { this.put(&c, r, false).await },
            |ch, r| async move {
                SecretServiceClient::new(ch)
                    .update(Self::forward(&caller, r))
                    .await
            },
        )
        .await
    }

    async fn get(&self, req: Request<GetSecretRequest>) -> Result<Response<SecretMeta>, Status> {
        self.caller(&req, Allow::Admin)?;
        let r = req.into_inner();
        self.handle.read_barrier(r.read.as_ref()).await?;
        let ns = namespace_or_default(r.namespace);
        match self
            .handle
            .reader()
            .secret(&ns, &r.name)
            .map_err(CoordinatorError::from)?
        {
            Some(s) => Ok(Response::new(meta(&s))),
            None => Err(Status::from(CoordinatorError::NotFound(format!(
                "secret {ns}/{} not found",
                r.name
            )))),
        }
    }

    async fn list(
        &self,
        req: Request<ListSecretsRequest>,
    ) -> Result<Response<ListSecretsResponse>, Status> {
        self.caller(&req, Allow::Admin)?;
        let r = req.into_inner();
        self.handle.read_barrier(r.read.as_ref()).await?;
        let ns = (!r.namespace.is_empty()).then_some(r.namespace.as_str());
        let secrets = self
            .handle
            .reader()
            .secrets(ns)
            .map_err(CoordinatorError::from)?
            .iter()
            .map(meta)
            .collect();
        Ok(Response::new(ListSecretsResponse { secrets }))
    }

    async fn delete(
        &self,
        req: Request<DeleteSecretRequest>,
    ) -> Result<Response<DeleteSecretResponse>, Status> {
        let caller = self.caller(&req, Allow::Admin)?;
        let (h, c) = (self.handle.clone(), caller.clone());
        leader_or_forward(
            &self.handle,
            req,
            |r: DeleteSecretRequest| async move {
                let key = idempotency_key(r.write.as_ref())?;
                let ns = namespace_or_default(r.namespace);
                let audit = Self::audit(&c, "delete", &ns, &r.name);
                let cmd = Command::Secret(SecretCommand::Delete {
                    namespace: ns,
                    name: r.name,
                    audit,
                });
                let (resp, commit) = h.write(key, cmd).await?;
                match resp {
                    SmResponse::Rejected(r) => Err(r.into()),
                    _ => Ok(DeleteSecretResponse {
                        commit: Some(commit),
                    }),
                }
            },
            |ch, r| async move {
                SecretServiceClient::new(ch)
                    .delete(Self::forward(&caller, r))
                    .await
            },
        )
        .await
    }

    async fn issue_token(
        &self,
        req: Request<IssueTokenRequest>,
    ) -> Result<Response<IssueTokenResponse>, Status> {
        let caller = self.caller(&req, Allow::AdminOrNode)?;
        let (this, c) = (self.clone(), caller.clone());
        leader_or_forward(
            &self.handle,
            req,
            |r| async move {
                this.handle.ensure_leader()?;
                let issued = this.issue(&c, r).await;
                if issued.is_ok() {
                    this.handle.api_metrics().secret_mints.inc();
                }
                issued.map_err(CoordinatorError::Status)
            },
            |ch, r| async move {
                SecretServiceClient::new(ch)
                    .issue_token(Self::forward(&caller, r))
                    .await
            },
        )
        .await
    }

    async fn check_version(
        &self,
        req: Request<CheckVersionRequest>,
    ) -> Result<Response<CheckVersionResponse>, Status> {
        let caller = self.caller(&req, Allow::AdminOrNode)?;
        let (this, c) = (self.clone(), caller.clone());
        leader_or_forward(
            &self.handle,
            req,
            |r| async move {
                this.handle.ensure_leader()?;
                this.check_version(&c, r)
                    .await
                    .map_err(CoordinatorError::Status)
            },
            |ch, r| async move {
                SecretServiceClient::new(ch)
                    .check_version(Self::forward(&caller, r))
                    .await
            },
        )
        .await
    }

    async fn revoke_token(
        &self,
        req: Request<RevokeTokenRequest>,
    ) -> Result<Response<RevokeTokenResponse>, Status> {
        let caller = self.caller(&req, Allow::AdminOrNode)?;
        let (this, c) = (self.clone(), caller.clone());
        leader_or_forward(
            &self.handle,
            req,
            |r: RevokeTokenRequest| async move {
                let token = this.handle.reader().access_token(&r.token_id)?;
                let mut audit = Self::audit(&c, "token-revoke", "", "");
                audit.token_id.clone_from(&r.token_id);
                if let Some(t) = &token {
                    audit.namespace.clone_from(&t.namespace);
                    audit.secret.clone_from(&t.secret);
                    if !c.admin && t.issued_to != c.actor {
                        let s = this
                            .refuse(
                                audit,
                                Status::from(CoordinatorError::Denied(String::from(
                                    "only an admin or the token's holder may revoke it",
                                ))),
                            )
                            .await;
                        return Err(CoordinatorError::Status(s));
                    }
                }
                let (resp, _) = this
                    .write_by(
                        &c.actor,
                        Command::Secret(SecretCommand::RevokeToken {
                            id: r.token_id,
                            audit,
                        }),
                    )
                    .await?;
                match resp {
                    SmResponse::Rejected(r) => Err(r.into()),
                    _ => Ok(RevokeTokenResponse {}),
                }
            },
            |ch, r| async move {
                SecretServiceClient::new(ch)
                    .revoke_token(Self::forward(&caller, r))
                    .await
            },
        )
        .await
    }

    async fn reveal(
        &self,
        req: Request<RevealSecretRequest>,
    ) -> Result<Response<RevealSecretResponse>, Status> {
        let caller = self.caller(&req, Allow::AdminOrNode)?;
        let (this, c) = (self.clone(), caller.clone());
        leader_or_forward(
            &self.handle,
            req,
            |r| async move {
                this.handle.ensure_leader()?;
                let revealed = this.reveal(&c, r).await;
                if revealed.is_ok() {
                    this.handle.api_metrics().secret_reads.inc();
                }
                revealed.map_err(CoordinatorError::Status)
            },
            |ch, r| async move {
                SecretServiceClient::new(ch)
                    .reveal(Self::forward(&caller, r))
                    .await
            },
        )
        .await
    }

    async fn rotate_master_key(
        &self,
        req: Request<RotateMasterKeyRequest>,
    ) -> Result<Response<RotateMasterKeyResponse>, Status> {
        let caller = self.caller(&req, Allow::Admin)?;
        let (this, c) = (self.clone(), caller.clone());
        leader_or_forward(
            &self.handle,
            req,
            |_r| async move {
                this.handle.ensure_leader()?;
                this.rotate(&c).await
            },
            |ch, r| async move {
                SecretServiceClient::new(ch)
                    .rotate_master_key(Self::forward(&caller, r))
                    .await
            },
        )
        .await
    }

    async fn retire_master_key(
        &self,
        req: Request<RetireMasterKeyRequest>,
    ) -> Result<Response<KeyInfoResponse>, Status> {
        let caller = self.caller(&req, Allow::Admin)?;
        let (this, c) = (self.clone(), caller.clone());
        leader_or_forward(
            &self.handle,
            req,
            |r: RetireMasterKeyRequest| async move {
                let mut audit = Self::audit(&c, "retire", "", "");
                audit.detail = format!("master key v{}", r.key_version);
                let (resp, _) = this
                    .handle
                    .write(
                        None,
                        Command::Secret(SecretCommand::Retire {
                            version: r.key_version,
                            audit,
                        }),
                    )
                    .await?;
                match resp {
                    SmResponse::Rejected(r) => Err(r.into()),
                    _ => this.key_info(),
                }
            },
            |ch, r| async move {
                SecretServiceClient::new(ch)
                    .retire_master_key(Self::forward(&caller, r))
                    .await
            },
        )
        .await
    }

    async fn key_info(
        &self,
        req: Request<KeyInfoRequest>,
    ) -> Result<Response<KeyInfoResponse>, Status> {
        self.caller(&req, Allow::Admin)?;
        Ok(Response::new(self.key_info()?))
    }

    async fn audit(&self, req: Request<AuditRequest>) -> Result<Response<AuditResponse>, Status> {
        self.caller(&req, Allow::Admin)?;
        let r = req.into_inner();
        let limit = if r.limit == 0 {
            100
        } else {
            r.limit.min(10_000)
        } as usize;
        let records = self
            .handle
            .reader()
            .audit(
                |a| {
                    (r.namespace.is_empty() || a.namespace == r.namespace)
                        && (r.name.is_empty() || a.secret == r.name)
                        && (r.actor.is_empty() || a.actor.contains(&r.actor))
                        && (r.action.is_empty() || a.action == r.action)
                        && (!r.refused_only || !a.allowed)
                },
                limit,
            )
            .map_err(CoordinatorError::from)?;
        Ok(Response::new(AuditResponse {
            entries: records
                .into_iter()
                .map(|e| AuditEntry {
                    at_ms: e.record.at_ms,
                    actor: e.record.actor,
                    source: e.record.source,
                    action: e.record.action,
                    namespace: e.record.namespace,
                    name: e.record.secret,
                    token_id: e.record.token_id,
                    allowed: e.record.allowed,
                    detail: e.record.detail,
                    count: e.count,
                    last_at_ms: e.last_at_ms,
                })
                .collect(),
        }))
    }
}
