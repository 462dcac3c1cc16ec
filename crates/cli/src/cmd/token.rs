//! `cloudlessctl token`: join tokens for enrolling devices.

use clap::Subcommand;
use cloudless_proto::v1::node_service_client::NodeServiceClient;
use cloudless_proto::v1::{self as pb};

use crate::client::{call, Failure};
use crate::cmd::{parse_duration, Ctx};
use crate::output::fmt_ms;

/// `cloudlessctl token` subcommands.
#[derive(Subcommand, Debug)]
pub(crate) enum TokenCmd {
    /// Create a join token and print it (shown once; only its id is stored in clear).
    Create {
        /// Lifetime: 90s, 30m, 1h, 7d (max 30d).
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: u64,
        /// Enrollments it allows.
        #[arg(long, default_value_t = 1)]
        max_uses: u32,
        /// Label for nodes enrolled with it: key=value (repeatable).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// List tokens (ids, remaining uses, expiry; never the tokens).
    List,
    /// Revoke a token by id.
    Revoke { token_id: String },
}

/// Parses a `--label` value, `key=value`.
fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

/// Runs a `token` command.
pub(crate) async fn run(cmd: TokenCmd, ctx: &Ctx) -> Result<(), Failure> {
    let servers = &ctx.target;
    match cmd {
        TokenCmd::Create {
            ttl,
            max_uses,
            labels,
        } => {
            let labels: std::collections::HashMap<String, String> = labels.into_iter().collect();
            let r = call(servers, |ch| {
                let req = pb::CreateJoinTokenRequest {
                    write: None,
                    ttl_seconds: ttl,
                    max_uses,
                    labels: labels.clone(),
                };
                async move { NodeServiceClient::new(ch).create_join_token(req).await }
            })
            .await?;
            if ctx.output.is_structured() {
                return ctx.output.print(
                    &serde_json::json!({ "tokenId": r.token_id, "token": r.token, "expiresAtMs": r.expires_at_ms }),
                );
            }
            eprintln!(
                "token {} expires {}, {max_uses} use(s):",
                r.token_id,
                fmt_ms(r.expires_at_ms)
            );
            println!("{}", r.token);
        }
        TokenCmd::List => {
            let read = ctx.read_opts();
            let r = call(servers, |ch| async move {
                NodeServiceClient::new(ch)
                    .list_join_tokens(pb::ListJoinTokensRequest { read })
                    .await
            })
            .await?;
            if ctx.output.is_structured() {
                let v: Vec<_> = r.tokens.iter().map(|t| serde_json::json!({ "tokenId": t.token_id,
                    "remainingUses": t.remaining_uses, "expiresAtMs": t.expires_at_ms, "revoked": t.revoked, "labels": t.labels })).collect();
                return ctx.output.print(&v);
            }
            println!(
                "{:<18} {:>9} {:<14} {:<8} LABELS",
                "ID", "USES-LEFT", "EXPIRES", "REVOKED"
            );
            for t in &r.tokens {
                let mut labels: Vec<String> =
                    t.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                labels.sort();
                println!(
                    "{:<18} {:>9} {:<14} {:<8} {}",
                    t.token_id,
                    t.remaining_uses,
                    fmt_ms(t.expires_at_ms),
                    t.revoked,
                    labels.join(",")
                );
            }
        }
        TokenCmd::Revoke { token_id } => {
            call(servers, |ch| {
                let req = pb::RevokeJoinTokenRequest {
                    write: None,
                    token_id: token_id.clone(),
                };
                async move { NodeServiceClient::new(ch).revoke_join_token(req).await }
            })
            .await?;
            println!("token {token_id} revoked");
        }
    }
    Ok(())
}
