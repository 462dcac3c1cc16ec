//! `cloudlessctl secrets ...`: create, read and manage secrets, their
//! access tokens, the master key and the audit log.

use std::collections::HashMap;

use clap::Subcommand;
use cloudless_proto::v1::secret_service_client::SecretServiceClient;
use cloudless_proto::v1::{self as pb, WriteOptions};
use zeroize::Zeroizing;

use crate::client::{call, Failure, Target};
use crate::cmd::{parse_duration, Ctx};
use crate::output::{fmt_ms, human, now_ms, Output};

/// `cloudlessctl secrets` subcommands.
#[derive(Subcommand, Debug)]
pub(crate) enum SecretsCmd {
    /// Create a secret: `secrets create production/postgres-creds --data
    /// DB_PASSWORD=... --audience backend-api --ttl 90d`.
    Create {
        /// NAMESPACE/NAME, or NAME in the default namespace.
        name: String,
        #[command(flatten)]
        values: Values,
        /// A workload (in the secret's namespace) that may read it (repeatable).
        #[arg(long = "audience", required = true)]
        audiences: Vec<String>,
        /// Unreadable after this long: 90s, 30m, 12h, 90d.
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<u64>,
        /// Refuse every later update.
        #[arg(long)]
        immutable: bool,
        /// Idempotency key.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Add a version with new values (refused for immutable secrets).
    Update {
        name: String,
        #[command(flatten)]
        values: Values,
        /// Replace the audiences (repeatable).
        #[arg(long = "audience")]
        audiences: Vec<String>,
        /// New expiry from now.
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<u64>,
        /// Idempotency key.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Metadata; with --show, the values too (an admin token for one
    /// audience, used once and audited).
    Get {
        name: String,
        /// Print the values.
        #[arg(long)]
        show: bool,
        /// The audience to read as (default: the secret's first).
        #[arg(long)]
        audience: Option<String>,
    },
    /// Secrets' metadata.
    List {
        /// Only this namespace.
        #[arg(long, short = 'n')]
        namespace: Option<String>,
    },
    /// Delete a secret.
    Delete {
        name: String,
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Mint an access token for one audience of a secret (printed once).
    Token {
        name: String,
        #[arg(long)]
        audience: String,
        /// Lifetime (default 1h, at most 24h).
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: u64,
        /// Uses allowed.
        #[arg(long, default_value_t = 1)]
        uses: u32,
    },
    /// Revoke an access token by id (every coordinator refuses it at once).
    Revoke { token_id: String },
    /// Print a secret's values for an access token (as an agent would).
    Reveal {
        /// The token, or - to read it from standard input.
        token: String,
    },
    /// Make a new master key active and rewrap every data key under it.
    RotateMasterKey,
    /// Remove a master key version no data key uses any more.
    RetireMasterKey { version: u32 },
    /// Master key versions and how many data keys each wraps.
    KeyInfo,
    /// The audit log (newest last).
    Audit {
        /// Only this secret (NAMESPACE/NAME or NAME).
        #[arg(long)]
        secret: Option<String>,
        /// Actor contains this (e.g. node:abc, admin).
        #[arg(long)]
        actor: Option<String>,
        /// create, read, update, delete, token-mint, token-revoke, rotate, retire.
        #[arg(long)]
        action: Option<String>,
        /// Only refusals.
        #[arg(long)]
        refused: bool,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

/// A secret's values from the command line.
#[derive(clap::Args, Debug)]
pub(crate) struct Values {
    /// KEY=VALUE (repeatable). Prefer --from-file: the shell history keeps this.
    #[arg(long = "data")]
    data: Vec<String>,
    /// KEY=PATH: the value is the file's content (repeatable).
    #[arg(long = "from-file")]
    files: Vec<String>,
}

impl Values {
    fn collect(self) -> Result<HashMap<String, Vec<u8>>, Failure> {
        let mut out = HashMap::new();
        for d in self.data {
            let (k, v) = d
                .split_once('=')
                .ok_or_else(|| Failure::usage("--data: expected KEY=VALUE"))?;
            out.insert(k.to_owned(), v.as_bytes().to_vec());
        }
        for f in self.files {
            let (k, p) = f
                .split_once('=')
                .ok_or_else(|| Failure::usage("--from-file: expected KEY=PATH"))?;
            let bytes =
                std::fs::read(p).map_err(|e| Failure::usage(&format!("--from-file {p}: {e}")))?;
            out.insert(k.to_owned(), bytes);
        }
        Ok(out)
    }
}

fn split(name: &str) -> (String, String) {
    match name.split_once('/') {
        Some((ns, n)) => (ns.to_owned(), n.to_owned()),
        None => ("default".to_owned(), name.to_owned()),
    }
}

fn write(key: Option<String>) -> Option<WriteOptions> {
    Some(WriteOptions {
        idempotency_key: key.unwrap_or_default(),
    })
}

fn meta_json(m: &pb::SecretMeta) -> serde_json::Value {
    serde_json::json!({
        "namespace": m.namespace, "name": m.name, "version": m.version,
        "audiences": m.audiences, "keys": m.keys, "sizeBytes": m.size_bytes,
        "immutable": m.immutable, "expiresAtMs": m.expires_at_ms,
        "keyVersion": m.key_version, "createdAtMs": m.created_at_ms, "updatedAtMs": m.updated_at_ms,
    })
}

fn print_values(data: &HashMap<String, Vec<u8>>, output: Output) -> Result<(), Failure> {
    let mut keys: Vec<&String> = data.keys().collect();
    keys.sort();
    if output.is_structured() {
        let map: serde_json::Map<String, serde_json::Value> = keys
            .iter()
            .map(|k| {
                (
                    (*k).clone(),
                    serde_json::Value::String(String::from_utf8_lossy(&data[*k]).into_owned()),
                )
            })
            .collect();
        return output.print(&serde_json::Value::Object(map));
    }
    for k in keys {
        let v = Zeroizing::new(String::from_utf8_lossy(&data[k]).into_owned());
        println!("{k}={}", v.as_str());
    }
    Ok(())
}

async fn reveal(servers: &Target, token: String) -> Result<pb::RevealSecretResponse, Failure> {
    let token = Zeroizing::new(token);
    call(servers, |ch| {
        let req = pb::RevealSecretRequest {
            token: token.to_string(),
        };
        async move { SecretServiceClient::new(ch).reveal(req).await }
    })
    .await
}

/// Runs a `secrets` command.
pub(crate) async fn run(cmd: SecretsCmd, ctx: &Ctx) -> Result<(), Failure> {
    let servers = &ctx.target;
    let output = ctx.output;
    let structured = output.is_structured();
    match cmd {
        SecretsCmd::Create {
            name,
            values,
            audiences,
            ttl,
            immutable,
            idempotency_key,
        } => {
            put(
                servers,
                &name,
                values,
                audiences,
                ttl,
                immutable,
                idempotency_key,
                true,
                output,
            )
            .await
        }
        SecretsCmd::Update {
            name,
            values,
            audiences,
            ttl,
            idempotency_key,
        } => {
            put(
                servers,
                &name,
                values,
                audiences,
                ttl,
                false,
                idempotency_key,
                false,
                output,
            )
            .await
        }
        SecretsCmd::Get {
            name,
            show,
            audience,
        } => {
            let (ns, n) = split(&name);
            let read = ctx.read_opts();
            let m = call(servers, |ch| {
                let req = pb::GetSecretRequest {
                    read,
                    namespace: ns.clone(),
                    name: n.clone(),
                };
                async move { SecretServiceClient::new(ch).get(req).await }
            })
            .await?;
            if !show {
                if structured {
                    return output.print(&meta_json(&m));
                }
                println!("Name:        {}/{}", m.namespace, m.name);
                println!("Version:     {} (master key v{})", m.version, m.key_version);
                println!(
                    "Keys:        {} ({} bytes)",
                    m.keys.join(", "),
                    m.size_bytes
                );
                println!("Audiences:   {}", m.audiences.join(", "));
                println!("Immutable:   {}", m.immutable);
                println!(
                    "Expires:     {}",
                    if m.expires_at_ms == 0 {
                        "never".to_owned()
                    } else {
                        fmt_ms(m.expires_at_ms)
                    }
                );
                println!("Updated:     {}", fmt_ms(m.updated_at_ms));
                return Ok(());
            }
            let aud = audience
                .or_else(|| m.audiences.first().cloned())
                .ok_or_else(|| Failure::usage("the secret has no audience; give --audience"))?;
            let t = call(servers, |ch| {
                let req = pb::IssueTokenRequest {
                    namespace: ns.clone(),
                    name: n.clone(),
                    audience: aud.clone(),
                    ttl_seconds: 60,
                    max_uses: 1,
                };
                async move { SecretServiceClient::new(ch).issue_token(req).await }
            })
            .await?;
            let r = reveal(servers, t.token).await?;
            print_values(&r.data, output)
        }
        SecretsCmd::List { namespace } => {
            let read = ctx.read_opts();
            let r = call(servers, |ch| {
                let req = pb::ListSecretsRequest {
                    read,
                    namespace: namespace.clone().unwrap_or_default(),
                };
                async move { SecretServiceClient::new(ch).list(req).await }
            })
            .await?;
            if structured {
                return output.print(&serde_json::Value::Array(
                    r.secrets.iter().map(meta_json).collect(),
                ));
            }
            println!(
                "{:<14} {:<24} {:<8} {:<24} {:<9} AGE",
                "NAMESPACE", "NAME", "VERSION", "AUDIENCES", "KEYS"
            );
            for m in r.secrets {
                println!(
                    "{:<14} {:<24} {:<8} {:<24} {:<9} {}",
                    m.namespace,
                    m.name,
                    m.version,
                    m.audiences.join(","),
                    m.keys.len(),
                    human((now_ms() - m.created_at_ms).max(0) / 1000)
                );
            }
            Ok(())
        }
        SecretsCmd::Delete {
            name,
            idempotency_key,
        } => {
            let (ns, n) = split(&name);
            let w = write(idempotency_key);
            call(servers, |ch| {
                let req = pb::DeleteSecretRequest {
                    write: w.clone(),
                    namespace: ns.clone(),
                    name: n.clone(),
                };
                async move { SecretServiceClient::new(ch).delete(req).await }
            })
            .await?;
            println!("secret {ns}/{n} deleted");
            Ok(())
        }
        SecretsCmd::Token {
            name,
            audience,
            ttl,
            uses,
        } => {
            let (ns, n) = split(&name);
            let r = call(servers, |ch| {
                let req = pb::IssueTokenRequest {
                    namespace: ns.clone(),
                    name: n.clone(),
                    audience: audience.clone(),
                    ttl_seconds: ttl,
                    max_uses: uses,
                };
                async move { SecretServiceClient::new(ch).issue_token(req).await }
            })
            .await?;
            if structured {
                return output.print(&serde_json::json!({
                    "tokenId": r.token_id, "token": r.token, "expiresAtMs": r.expires_at_ms, "maxUses": r.max_uses,
                }));
            }
            eprintln!(
                "token {} for {ns}/{n} as {audience}: expires {}, {} use(s)",
                r.token_id,
                fmt_ms(r.expires_at_ms),
                r.max_uses
            );
            println!("{}", r.token);
            Ok(())
        }
        SecretsCmd::Revoke { token_id } => {
            call(servers, |ch| {
                let req = pb::RevokeTokenRequest {
                    token_id: token_id.clone(),
                };
                async move { SecretServiceClient::new(ch).revoke_token(req).await }
            })
            .await?;
            println!("token {token_id} revoked");
            Ok(())
        }
        SecretsCmd::Reveal { token } => {
            let token = if token == "-" {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                    .map_err(|e| Failure::usage(&format!("reading the token: {e}")))?;
                s.trim().to_owned()
            } else {
                token
            };
            let r = reveal(servers, token).await?;
            print_values(&r.data, output)
        }
        SecretsCmd::RotateMasterKey => {
            let r = call(servers, |ch| {
                let req = pb::RotateMasterKeyRequest { write: None };
                async move { SecretServiceClient::new(ch).rotate_master_key(req).await }
            })
            .await?;
            println!(
                "master key v{} active; {} data keys rewrapped",
                r.key_version, r.rewrapped
            );
            Ok(())
        }
        SecretsCmd::RetireMasterKey { version } => {
            let r = call(servers, |ch| {
                let req = pb::RetireMasterKeyRequest {
                    key_version: version,
                };
                async move { SecretServiceClient::new(ch).retire_master_key(req).await }
            })
            .await?;
            print_keys(&r, output)
        }
        SecretsCmd::KeyInfo => {
            let r = call(servers, |ch| async move {
                SecretServiceClient::new(ch)
                    .key_info(pb::KeyInfoRequest {})
                    .await
            })
            .await?;
            print_keys(&r, output)
        }
        SecretsCmd::Audit {
            secret,
            actor,
            action,
            refused,
            limit,
        } => {
            let (ns, n) = secret.as_deref().map(split).unwrap_or_default();
            let r = call(servers, |ch| {
                let req = pb::AuditRequest {
                    namespace: ns.clone(),
                    name: n.clone(),
                    actor: actor.clone().unwrap_or_default(),
                    action: action.clone().unwrap_or_default(),
                    refused_only: refused,
                    limit,
                };
                async move { SecretServiceClient::new(ch).audit(req).await }
            })
            .await?;
            if structured {
                let v: Vec<_> = r
                    .entries
                    .iter()
                    .map(|e| serde_json::json!({
                        "atMs": e.at_ms, "actor": e.actor, "source": e.source, "action": e.action,
                        "namespace": e.namespace, "name": e.name, "tokenId": e.token_id,
                        "allowed": e.allowed, "detail": e.detail,
                        "count": e.count.max(1), "lastAtMs": e.last_at_ms.max(e.at_ms),
                    }))
                    .collect();
                return output.print(&serde_json::Value::Array(v));
            }
            println!(
                "{:<20} {:<22} {:<13} {:<28} {:<8} DETAIL",
                "TIME", "ACTOR", "ACTION", "SECRET", "RESULT"
            );
            for e in r.entries {
                println!(
                    "{:<20} {:<22} {:<13} {:<28} {:<8} {}",
                    fmt_ms(e.at_ms),
                    e.actor,
                    e.action,
                    if e.name.is_empty() {
                        "-".to_owned()
                    } else {
                        format!("{}/{}", e.namespace, e.name)
                    },
                    if e.allowed { "allowed" } else { "REFUSED" },
                    if e.count > 1 {
                        format!("{} (x{} until {})", e.detail, e.count, fmt_ms(e.last_at_ms))
                    } else {
                        e.detail
                    }
                );
            }
            Ok(())
        }
    }
}

fn print_keys(r: &pb::KeyInfoResponse, output: Output) -> Result<(), Failure> {
    if output.is_structured() {
        let v: Vec<_> = r
            .keys
            .iter()
            .map(|k| serde_json::json!({"version": k.version, "active": k.active, "dataKeys": k.data_keys, "createdAtMs": k.created_at_ms}))
            .collect();
        return output.print(&serde_json::json!({"rootKey": r.root_key_source, "keys": v}));
    }
    println!("root key: {}", r.root_key_source);
    println!(
        "{:<8} {:<7} {:<10} CREATED",
        "VERSION", "ACTIVE", "DATA KEYS"
    );
    for k in &r.keys {
        println!(
            "{:<8} {:<7} {:<10} {}",
            k.version,
            if k.active { "*" } else { "" },
            k.data_keys,
            fmt_ms(k.created_at_ms)
        );
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn put(
    servers: &Target,
    name: &str,
    values: Values,
    audiences: Vec<String>,
    ttl: Option<u64>,
    immutable: bool,
    idempotency_key: Option<String>,
    create: bool,
    output: Output,
) -> Result<(), Failure> {
    let (ns, n) = split(name);
    let data = values.collect()?;
    let w = write(idempotency_key);
    let r = call(servers, |ch| {
        let req = pb::PutSecretRequest {
            write: w.clone(),
            namespace: ns.clone(),
            name: n.clone(),
            data: data.clone(),
            audiences: audiences.clone(),
            immutable,
            ttl_seconds: ttl.unwrap_or(0),
        };
        async move {
            let mut c = SecretServiceClient::new(ch);
            if create {
                c.create(req).await
            } else {
                c.update(req).await
            }
        }
    })
    .await?;
    let m = r.meta.unwrap_or_default();
    if output.is_structured() {
        return output.print(&meta_json(&m));
    }
    println!(
        "secret {}/{} {} (version {}, {} keys)",
        m.namespace,
        m.name,
        if create { "created" } else { "updated" },
        m.version,
        m.keys.len()
    );
    Ok(())
}
