//! Who calls the secret service: the caller a request authenticates, or
//! the one a forwarding coordinator speaks for, and the audit record of
//! its call.

use cloudless_pki::Identity;
use cloudless_types::AuditRecord;
use tonic::{Request, Status};

use super::SecretApi;
use crate::authz::Allow;

/// Metadata key carrying the caller's identity on a forwarded call.
const ACTOR_KEY: &str = "x-cloudless-actor";
/// Metadata key carrying the caller's address on a forwarded call.
const SOURCE_KEY: &str = "x-cloudless-source";

/// Who is calling, from where.
#[derive(Debug, Clone)]
pub(super) struct Caller {
    pub(super) actor: String,
    pub(super) source: String,
    pub(super) admin: bool,
    pub(super) node: Option<String>,
}

fn actor_of(identity: &Identity) -> String {
    match identity {
        Identity::Admin(name) => format!("admin:{name}"),
        Identity::Node(id) => format!("node:{id}"),
        Identity::Coordinator(id) => format!("coordinator:{id}"),
    }
}

impl SecretApi {
    /// Authorizes the caller; a forwarding coordinator speaks for the
    /// caller it authorized.
    pub(super) fn caller<T>(&self, req: &Request<T>, allow: Allow) -> Result<Caller, Status> {
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
    pub(super) fn forward<T>(caller: &Caller, mut r: Request<T>) -> Request<T> {
        for (k, v) in [(ACTOR_KEY, &caller.actor), (SOURCE_KEY, &caller.source)] {
            if let Ok(v) = v.parse() {
                r.metadata_mut().insert(k, v);
            }
        }
        r
    }

    pub(super) fn audit(caller: &Caller, action: &str, ns: &str, name: &str) -> AuditRecord {
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
}
