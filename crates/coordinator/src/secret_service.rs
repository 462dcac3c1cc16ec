//! `SecretService`: secrets encrypted with envelope encryption and stored
//! in Raft as ciphertext; values released only for access tokens minted for
//! an audience the caller holds; every call audited in Raft.
//!
//! Writes and token uses run on the leader (followers forward, passing the
//! caller's identity in `x-cloudless-actor`, which the leader believes only
//! from a coordinator). Plaintext exists only in memory, in `Zeroizing`
//! buffers, and in the gRPC answer over mTLS; it is never logged.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use cloudless_pki::Identity;
use cloudless_proto::v1::secret_service_client::SecretServiceClient;
use cloudless_proto::v1::secret_service_server::SecretService;
use cloudless_proto::v1::{
    AuditEntry, AuditRequest, AuditResponse, CheckVersionRequest, CheckVersionResponse,
    DeleteSecretRequest, DeleteSecretResponse, GetSecretRequest, IssueTokenRequest,
    IssueTokenResponse, KeyInfoRequest, KeyInfoResponse, KeyVersionInfo, ListSecretsRequest,
    ListSecretsResponse, PutSecretRequest, PutSecretResponse, RetireMasterKeyRequest,
    RevealSecretRequest, RevealSecretResponse, RevokeTokenRequest, RevokeTokenResponse,
    RotateMasterKeyRequest, RotateMasterKeyResponse, SecretMeta,
};
use cloudless_secrets::{AccessClaims, AccessTokenKey, KeyRing, SecretValues};
use cloudless_state::{Command, Rejection, Response as SmResponse, SecretCommand};
use cloudless_types::{
    AccessTokenRecord, AuditRecord, SecretKeyring, SecretRecord, SecretVersion, ValidationErrors,
    DEFAULT_NAMESPACE, DEFAULT_TOKEN_TTL_SECONDS, MAX_TOKEN_TTL_SECONDS, MAX_TOKEN_USES,
};
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use crate::authz::Allow;
use crate::clock::now_ms;
use crate::error::CoordinatorError;
use crate::forward::{idempotency_key, leader_or_forward};
use crate::handle::CoordinatorHandle;
use crate::refusals::{Counted, Refusals, REFUSAL_FLUSH};

/// Attempts of one secret write that conflicts with concurrent writes of the
/// same secret (each round, one of them wins).
const PUT_ATTEMPTS: u32 = 10;

/// Metadata key carrying the caller's identity on a forwarded call.
const ACTOR_KEY: &str = "x-cloudless-actor";
/// Metadata key carrying the caller's address on a forwarded call.
const SOURCE_KEY: &str = "x-cloudless-source";

/// The replicated keyring last unsealed, with its unsealed form.
type RingCache = Mutex<Option<(SecretKeyring, Arc<KeyRing>)>>;

/// Tokens allowing at most this many uses are counted synchronously: each
/// use is committed through Raft, with its audit record, before the answer
/// (exact across leader changes). Tokens allowing more go through the
/// [`Ledger`].
pub(crate) const STRICT_USES: u32 = 16;
/// How often the ledger commits what it counted.
const LEDGER_FLUSH: std::time::Duration = std::time::Duration::from_millis(10);

/// Uses of many-use tokens counted by the leader at once and committed in
/// batches (`RecordUses`) with their audit records, every [`LEDGER_FLUSH`].
/// A leader that dies loses at most that window of counts and records; a
/// token then allows at most that many extra uses.
#[derive(Debug, Default)]
struct Ledger {
    /// The Raft term these counts belong to (a new term starts afresh from
    /// the committed state).
    term: u64,
    /// Per token: (uses committed when this leader first saw it, uses it
    /// counted since, of which not yet sent to Raft).
    counts: std::collections::HashMap<String, (u32, u32, u32)>,
    /// Allowed reads per token in this window: one audit record each,
    /// with the count and the window.
    reads: std::collections::HashMap<String, (AuditRecord, u32, i64)>,
    /// Refusals, of any call, counted in memory and committed aggregated
    /// at most every [`REFUSAL_FLUSH`].
    refusals: Refusals,
    /// When refusals were last committed.
    refusals_flushed: Option<std::time::Instant>,
    flusher: bool,
}

/// Token and secret records of many-use tokens as read at a secret
/// generation (valid while the generation is unchanged; use counts are the
/// ledger's business).
type HotRecords =
    std::collections::HashMap<String, (u64, Arc<AccessTokenRecord>, Option<Arc<SecretRecord>>)>;
/// Most entries kept in the hot cache; it is cleared when full.
const HOT_LIMIT: usize = 65_536;

/// The `SecretService` implementation.
#[derive(Clone)]
pub struct SecretApi {
    handle: CoordinatorHandle,
    ring: Arc<RingCache>,
    tokens: Arc<Mutex<Option<Arc<AccessTokenKey>>>>,
    ledger: Arc<Mutex<Ledger>>,
    hot: Arc<Mutex<HotRecords>>,
    /// Tokens whose signature verified (by exact text), with their claims.
    verified: Arc<Mutex<std::collections::HashMap<String, Arc<AccessClaims>>>>,
    /// Decrypted values by (secret, version, master key version); memory only.
    plain: Arc<Mutex<PlainCache>>,
    /// Reads are answered from local state only inside it.
    lease: crate::leader_lease::LeaderLease,
}

/// Decrypted values of recently read secret versions (wiped on drop).
type PlainCache =
    std::collections::HashMap<(String, u64, u32), Arc<Vec<(String, Zeroizing<Vec<u8>>)>>>;
/// Most decrypted versions kept.
const PLAIN_LIMIT: usize = 4096;

impl std::fmt::Debug for SecretApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretApi").finish_non_exhaustive()
    }
}

/// Who is calling, from where.
#[derive(Debug, Clone)]
struct Caller {
    actor: String,
    source: String,
    admin: bool,
    node: Option<String>,
}

fn actor_of(identity: &Identity) -> String {
    match identity {
        Identity::Admin(name) => format!("admin:{name}"),
        Identity::Node(id) => format!("node:{id}"),
        Identity::Coordinator(id) => format!("coordinator:{id}"),
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
            hot: Arc::default(),
            verified: Arc::default(),
            plain: Arc::default(),
        }
    }

    /// Authorizes the caller; a forwarding coordinator speaks for the
    /// caller it authorized.
    fn caller<T>(&self, req: &Request<T>, allow: Allow) -> Result<Caller, Status> {
        let identity = crate::authz::require(&self.handle, req, allow)?;
        let header = |k: &str| {
            req.metadata()
                .get(k)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let source = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        if let (Identity::Coordinator(_), Some(actor)) = (&identity, header(ACTOR_KEY)) {
            let node = actor.strip_prefix("node:").map(str::to_owned);
            if let Some(n) = &node {
                self.handle.admit_node_write(n)?;
            }
            return Ok(Caller {
                admin: actor.starts_with("admin:") || actor.starts_with("coordinator:"),
                node,
                actor,
                source: header(SOURCE_KEY).unwrap_or(source),
            });
        }
        if let Identity::Node(n) = &identity {
            // Every secret call a node may make ends in a Raft write.
            self.handle.admit_node_write(n)?;
        }
        Ok(Caller {
            actor: actor_of(&identity),
            source,
            admin: matches!(identity, Identity::Admin(_) | Identity::Coordinator(_)),
            node: match &identity {
                Identity::Node(id) => Some(id.clone()),
                _ => None,
            },
        })
    }

    /// A forwarded request carrying the caller.
    fn forward<T>(caller: &Caller, mut r: Request<T>) -> Request<T> {
        for (k, v) in [(ACTOR_KEY, &caller.actor), (SOURCE_KEY, &caller.source)] {
            if let Ok(v) = v.parse() {
                r.metadata_mut().insert(k, v);
            }
        }
        r
    }

    fn root(&self) -> Result<&cloudless_pki::MasterKey, CoordinatorError> {
        self.handle.master_key().ok_or_else(|| {
            CoordinatorError::FailedPrecondition(
                "secrets need a master key (master_key_file or CLOUDLESS_MASTER_KEY) on every coordinator".into(),
            )
        })
    }

    /// The unsealed keyring matching the replicated one (cached).
    fn keyring(&self) -> Result<Arc<KeyRing>, CoordinatorError> {
        let stored = self.handle.reader().secret_keyring()?;
        let mut cache = self
            .ring
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((s, ring)) = cache.as_ref() {
            if *s == stored {
                return Ok(ring.clone());
            }
        }
        let ring = Arc::new(KeyRing::unseal(self.root()?, &stored).map_err(|e| {
            CoordinatorError::FailedPrecondition(format!(
                "cannot open the secret keyring: {e}; is this coordinator's master key the cluster's?"
            ))
        })?);
        *cache = Some((stored, ring.clone()));
        Ok(ring)
    }

    /// The last unsealed keyring without looking at the state (the hot
    /// read path; a newer key version than it holds makes the caller use
    /// [`SecretApi::keyring`]).
    fn cached_keyring(&self) -> Result<Arc<KeyRing>, CoordinatorError> {
        if let Some((_, ring)) = self
            .ring
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
        {
            return Ok(ring.clone());
        }
        self.keyring()
    }

    /// The keyring, creating the first master key version if there is none.
    async fn active_keyring(&self) -> Result<Arc<KeyRing>, CoordinatorError> {
        let ring = self.keyring()?;
        if ring.active() != 0 {
            return Ok(ring);
        }
        let stored = self.handle.reader().secret_keyring()?;
        let key = KeyRing::new_version(self.root()?, &stored, now_ms())
            .map_err(|e| CoordinatorError::Fatal(e.to_string()))?;
        self.handle
            .write(None, Command::Secret(SecretCommand::InitKeyring { key }))
            .await?;
        self.keyring()
    }

    fn access_key(&self) -> Result<Arc<AccessTokenKey>, CoordinatorError> {
        let mut cache = self
            .tokens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(k) = cache.as_ref() {
            return Ok(k.clone());
        }
        let keys = self.handle.identity_keys()?;
        let k = Arc::new(AccessTokenKey::from_cluster_key(&keys.tokens));
        *cache = Some(k.clone());
        Ok(k)
    }

    fn audit(caller: &Caller, action: &str, ns: &str, name: &str) -> AuditRecord {
        AuditRecord {
            at_ms: 0,
            actor: caller.actor.clone(),
            source: caller.source.clone(),
            action: action.to_owned(),
            namespace: ns.to_owned(),
            secret: name.to_owned(),
            token_id: String::new(),
            allowed: true,
            detail: String::new(),
        }
    }

    /// Records a refusal decided before any command could carry it: counted
    /// in memory and committed aggregated (see [`crate::refusals`]), so a
    /// caller cannot turn refusals into a Raft write each.
    async fn refuse(&self, mut audit: AuditRecord, status: Status) -> Status {
        audit.allowed = false;
        audit.detail = status.message().to_owned();
        audit.at_ms = now_ms();
        let mut ledger = self
            .ledger
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        ledger.refusals.add(audit);
        self.start_flusher(&mut ledger);
        status
    }

    /// Starts the ledger's flusher unless it runs.
    fn start_flusher(&self, ledger: &mut Ledger) {
        if !ledger.flusher {
            ledger.flusher = true;
            tokio::spawn(flush_ledger(self.handle.clone(), self.ledger.clone()));
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

    async fn put(
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
            let status = Status::invalid_argument(format!("invalid request: {errs}"));
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

    /// Whether `caller` may hold `audience` for a secret in `ns`.
    fn holds(&self, caller: &Caller, ns: &str, audience: &str) -> Result<bool, CoordinatorError> {
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
    fn readable(
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
            return Ok(Err(Status::not_found(format!(
                "secret {ns}/{name} not found"
            ))));
        };
        if !secret.audiences.iter().any(|a| a == audience) {
            return Ok(Err(Status::permission_denied(format!(
                "audience {audience:?} may not read {ns}/{name} (its audiences: {})",
                secret.audiences.join(", ")
            ))));
        }
        if !self.holds(caller, ns, audience)? {
            return Ok(Err(Status::permission_denied(format!(
                "{} runs no replica of workload {ns}/{audience}, so it does not hold that audience",
                caller.actor
            ))));
        }
        Ok(Ok(secret))
    }

    /// The current version of a secret the caller may read: no token, and
    /// nothing written unless refused (then audited like a mint refusal).
    async fn check_version(
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

    async fn issue(
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
            return Err(Status::invalid_argument(format!(
                "ttlSeconds: {ttl} is above the maximum of {MAX_TOKEN_TTL_SECONDS} (24 h)"
            )));
        }
        if uses > MAX_TOKEN_USES {
            return Err(Status::invalid_argument(format!(
                "maxUses: {uses} is above the maximum of {MAX_TOKEN_USES}"
            )));
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
            .map_err(|e| Status::internal(e.to_string()))?;
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

    async fn reveal(
        &self,
        caller: &Caller,
        r: RevealSecretRequest,
    ) -> Result<RevealSecretResponse, Status> {
        let now = now_ms();
        let mut audit = Self::audit(caller, "read", "", "");
        let cached_claims = self
            .verified
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&r.token)
            .filter(|c| now < c.exp)
            .cloned();
        let verified = match cached_claims {
            Some(c) => Ok(c),
            None => self.access_key()?.verify(&r.token, now).map(|c| {
                let c = Arc::new(c);
                let mut v = self
                    .verified
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if v.len() >= HOT_LIMIT {
                    v.clear();
                }
                v.insert(r.token.clone(), c.clone());
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
                    .refuse(audit, Status::unauthenticated(e.to_string()))
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
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&claims.jti)
            .filter(|(g, _, _)| *g == generation)
            .map(|(_, t, s)| (t.clone(), s.clone()));
        let (token, secret) = match hot {
            Some((t, s)) => (Some(t), s),
            None => {
                let (t, s) = reader
                    .token_and_secret(&claims.jti)
                    .map_err(CoordinatorError::from)?;
                let (t, s) = (t.map(Arc::new), s.map(Arc::new));
                if let Some(tok) = t.as_ref().filter(|t| t.max_uses > STRICT_USES) {
                    let mut hot = self
                        .hot
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if hot.len() >= HOT_LIMIT {
                        hot.clear();
                    }
                    hot.insert(claims.jti.clone(), (generation, tok.clone(), s.clone()));
                }
                (t, s)
            }
        };
        let record = if let Some(tok) = token.as_ref().filter(|t| t.max_uses > STRICT_USES) {
            // Many-use token: counted here, committed by the ledger.
            let term = self.handle.raft().metrics().borrow().current_term;
            let mut ledger = self
                .ledger
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if ledger.term != term {
                ledger.term = term;
                ledger.counts.clear();
            }
            if !ledger.counts.contains_key(&claims.jti) {
                // First use in this term: the committed count, read fresh.
                let committed = reader
                    .access_token(&claims.jti)
                    .map_err(CoordinatorError::from)?
                    .map_or(tok.uses, |t| t.uses);
                ledger.counts.insert(claims.jti.clone(), (committed, 0, 0));
            }
            let (base, counted, _) = ledger.counts.get(&claims.jti).copied().unwrap_or_default();
            let mut at_base = AccessTokenRecord::clone(tok);
            at_base.uses = base;
            let verdict = cloudless_state::check_token_use(
                Some(&at_base),
                secret.as_deref(),
                &caller.actor,
                now,
                counted,
            );
            audit.at_ms = now;
            audit.allowed = verdict.is_ok();
            if let Err(why) = &verdict {
                audit.detail.clone_from(why);
                ledger.refusals.add(audit);
            } else {
                if let Some(c) = ledger.counts.get_mut(&claims.jti) {
                    c.1 += 1;
                    c.2 += 1;
                }
                let e = ledger
                    .reads
                    .entry(claims.jti.clone())
                    .or_insert_with(|| (audit, 0, now));
                e.1 += 1;
                e.0.at_ms = now;
            }
            self.start_flusher(&mut ledger);
            drop(ledger);
            match (verdict, secret) {
                (Ok(()), Some(s)) => s,
                (Err(why), _) => return Err(Status::permission_denied(why)),
                (Ok(()), None) => return Err(Status::not_found("the secret is gone")),
            }
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
                SmResponse::SecretAccess(Err(why)) => return Err(Status::permission_denied(why)),
                other => {
                    return Err(Status::internal(format!(
                        "unexpected state machine answer {other:?}"
                    )))
                }
            }
        };
        let Some(current) = record.current() else {
            return Err(Status::not_found("the secret has no version"));
        };
        let key = (
            format!("{}/{}", record.namespace, record.name),
            current.version,
            current.ciphertext.key_version,
        );
        let cached = self
            .plain
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&key)
            .cloned();
        let values = match cached {
            Some(v) => v,
            None => {
                let open = |ring: &KeyRing| {
                    ring.open(
                        &record.namespace,
                        &record.name,
                        current.version,
                        &current.ciphertext,
                    )
                };
                let plain = match open(self.cached_keyring()?.as_ref()) {
                    Err(cloudless_secrets::SecretsError::UnknownKeyVersion(_)) => {
                        open(self.keyring()?.as_ref())
                    }
                    other => other,
                }
                .map_err(|e| Status::data_loss(e.to_string()))?;
                let values: Arc<Vec<(String, Zeroizing<Vec<u8>>)>> = Arc::new(
                    cloudless_secrets::decode_values(&plain)
                        .map_err(|e| Status::data_loss(e.to_string()))?
                        .into_iter()
                        .collect(),
                );
                let mut cache = self
                    .plain
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if cache.len() >= PLAIN_LIMIT {
                    cache.clear();
                }
                cache.insert(key, values.clone());
                values
            }
        };
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

    async fn rotate(&self, caller: &Caller) -> Result<RotateMasterKeyResponse, CoordinatorError> {
        let old = self.active_keyring().await?;
        let stored = self.handle.reader().secret_keyring()?;
        let key = KeyRing::new_version(self.root()?, &stored, now_ms())
            .map_err(|e| CoordinatorError::Fatal(e.to_string()))?;
        let new_version = key.version;
        let mut next = stored.clone();
        next.keys.push(key.clone());
        next.active = new_version;
        let ring = KeyRing::unseal(self.root()?, &next)
            .map_err(|e| CoordinatorError::Fatal(e.to_string()))?;
        // Every data key not yet under the new version: those of the active
        // one, and any an interrupted rotation left under an older one.
        let mut rewrapped: BTreeMap<u32, Vec<cloudless_state::RewrappedKey>> = BTreeMap::new();
        for s in self.handle.reader().secrets(None)? {
            for v in &s.versions {
                let from = v.ciphertext.key_version;
                let c = ring
                    .rewrap(&s.namespace, &s.name, v.version, &v.ciphertext)
                    .map_err(|e| {
                        CoordinatorError::Fatal(format!("{}/{}: {e}", s.namespace, s.name))
                    })?;
                rewrapped
                    .entry(from)
                    .or_default()
                    .push(cloudless_state::RewrappedKey {
                        namespace: s.namespace.clone(),
                        name: s.name.clone(),
                        version: v.version,
                        old_dek_nonce: v.ciphertext.dek_nonce.clone(),
                        dek_nonce: c.dek_nonce,
                        dek: c.dek,
                    });
            }
        }
        let count: usize = rewrapped.values().map(Vec::len).sum();
        let mut audit = Self::audit(caller, "rotate", "", "");
        audit.detail = format!(
            "master key v{} -> v{new_version}; {count} data keys rewrapped",
            old.active()
        );
        // The new version first (old versions still decrypt), then the
        // rewrapped keys in parts small enough for one Raft entry each.
        let (resp, _) = self
            .handle
            .write(
                None,
                Command::Secret(SecretCommand::Rotate {
                    key,
                    expected_active: stored.active,
                    rewrapped: Vec::new(),
                    audit,
                }),
            )
            .await?;
        let keyring = match resp {
            SmResponse::Keyring(k) => k,
            SmResponse::Rejected(r) => return Err(r.into()),
            other => {
                return Err(CoordinatorError::Fatal(format!(
                    "unexpected answer {other:?}"
                )))
            }
        };
        for (from_version, keys) in rewrapped {
            for part in crate::proposer::split_by_size(keys, usize::MAX, self.handle.part_bytes()) {
                let (resp, _) = self
                    .handle
                    .write(
                        None,
                        Command::Secret(SecretCommand::RewrapKeys {
                            from_version,
                            to_version: new_version,
                            keys: part,
                        }),
                    )
                    .await?;
                if let SmResponse::Rejected(r) = resp {
                    return Err(r.into());
                }
            }
        }
        debug_assert_eq!(keyring.active, new_version);
        Ok(RotateMasterKeyResponse {
            key_version: new_version,
            rewrapped: u32::try_from(count).unwrap_or(u32::MAX),
        })
    }

    fn key_info(&self) -> Result<KeyInfoResponse, CoordinatorError> {
        let stored = self.handle.reader().secret_keyring()?;
        let mut counts: BTreeMap<u32, u32> = BTreeMap::new();
        for s in self.handle.reader().secrets(None)? {
            for v in &s.versions {
                *counts.entry(v.ciphertext.key_version).or_default() += 1;
            }
        }
        Ok(KeyInfoResponse {
            keys: stored
                .keys
                .iter()
                .map(|k| KeyVersionInfo {
                    version: k.version,
                    created_at_ms: k.created_at_ms,
                    active: k.version == stored.active,
                    data_keys: counts.get(&k.version).copied().unwrap_or(0),
                })
                .collect(),
            root_key_source: self.handle.master_key_source(),
        })
    }
}

/// Commits the ledger's counts and audit records every [`LEDGER_FLUSH`]
/// (refusals at most every [`REFUSAL_FLUSH`]) while there are any; stops
/// when idle (the next use or refusal starts it again).
async fn flush_ledger(handle: CoordinatorHandle, ledger: Arc<Mutex<Ledger>>) {
    loop {
        tokio::time::sleep(LEDGER_FLUSH).await;
        let (uses, audits) = {
            let mut l = ledger
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let unsent = l.counts.values().any(|c| c.2 > 0);
            if !unsent && l.reads.is_empty() && l.refusals.is_empty() {
                l.flusher = false;
                return;
            }
            let refusals_due = !l.refusals.is_empty()
                && l.refusals_flushed
                    .is_none_or(|t| t.elapsed() >= REFUSAL_FLUSH);
            if !unsent && l.reads.is_empty() && !refusals_due {
                continue;
            }
            let mut uses = Vec::new();
            for (id, c) in &mut l.counts {
                if c.2 > 0 {
                    uses.push((id.clone(), c.2));
                    c.2 = 0;
                }
            }
            let mut audits: Vec<Counted> = Vec::new();
            if refusals_due {
                l.refusals_flushed = Some(std::time::Instant::now());
                audits = l.refusals.take();
            }
            for (_, (mut a, n, first)) in l.reads.drain() {
                let last = a.at_ms;
                a.at_ms = first;
                a.detail = "many-use token".to_owned();
                audits.push((a, n, last));
            }
            audits.sort_by_key(|a| a.0.at_ms);
            (uses, audits)
        };
        let (count, records) = (uses.iter().map(|u| u.1).sum::<u32>(), audits.len());
        // In parts that each fit a Raft entry, however many tokens and
        // actors the window saw.
        let written = async {
            handle
                .write_in_parts(uses, |uses| {
                    Command::Secret(SecretCommand::RecordCounted {
                        uses,
                        audits: Vec::new(),
                    })
                })
                .await?;
            handle
                .write_in_parts(audits, |audits| {
                    Command::Secret(SecretCommand::RecordCounted {
                        uses: Vec::new(),
                        audits,
                    })
                })
                .await
        };
        if let Err(e) = written.await {
            tracing::warn!(
                error = %e,
                uses = count,
                audit_records = records,
                "token uses and audit records were not committed (leadership lost?)"
            );
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
            None => Err(Status::not_found(format!(
                "secret {ns}/{} not found",
                r.name
            ))),
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
                this.issue(&c, r).await.map_err(CoordinatorError::Status)
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
                                Status::permission_denied(
                                    "only an admin or the token's holder may revoke it",
                                ),
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
                this.reveal(&c, r).await.map_err(CoordinatorError::Status)
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
