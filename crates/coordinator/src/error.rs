//! Coordinator errors and their one mapping to gRPC status codes, and why a
//! coordinator could not start.

use std::net::SocketAddr;

use cloudless_pki::{PkiError, RejoinError, TokenError};
use cloudless_state::{Rejection, StateError};
use cloudless_types::ValidationErrors;
use tonic::{Code, Status};

/// The metadata keys, declared once in the client crate.
pub use cloudless_client::{FORWARDED_KEY, LEADER_HINT_KEY};

/// Why a coordinator call failed.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The request is malformed; the message is `field: problem` (the field
    /// travels as a `google.rpc.BadRequest` violation too).
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    /// An answer already decided (and audited) as a gRPC status.
    #[error("{}", .0.message())]
    Status(Status),
    /// The request is well formed but the current state does not allow it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// What the request names does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The caller may not do this.
    #[error("{0}")]
    Denied(String),
    /// The caller's credentials are refused.
    #[error("{0}")]
    Unauthenticated(String),
    /// This coordinator cannot serve the call now (shutting down, no path
    /// to the node); another may.
    #[error("{0}")]
    Unavailable(String),
    /// A fault of this coordinator (storage, encoding), not of the request.
    #[error("{0}")]
    Internal(String),
    /// The request's fields failed validation.
    #[error("invalid request: {0}")]
    Invalid(#[from] ValidationErrors),
    /// This coordinator is not the leader; the leader is given when known.
    #[error("not the leader{}", .leader.as_ref().map(|(id, a)| format!("; the leader is node {id} at {a}")).unwrap_or_else(|| "; no leader is known yet".into()))]
    NotLeader {
        /// The leader's id and address.
        leader: Option<(u64, String)>,
    },
    /// The state rejected the command.
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// A membership change could not be made.
    #[error("membership change refused: {0}")]
    Membership(String),
    /// The cluster has not been initialised.
    #[error("this coordinator is not part of an initialised cluster yet")]
    NotInitialized,
    /// Raft has stopped or its storage failed: this component is dead.
    #[error("raft is not running: {0}")]
    Fatal(String),
    /// The join token was refused (malformed, forged, expired, ...).
    #[error(transparent)]
    Token(#[from] TokenError),
    /// A certificate or CSR problem.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// A rejoin's proof was refused (the message names the field).
    #[error(transparent)]
    Rejoin(#[from] RejoinError),
    /// A rejoin with a sound proof that the cluster refuses.
    #[error(transparent)]
    RejoinRefused(#[from] RejoinRefusal),
    /// Identity features are unavailable on this coordinator.
    #[error("{0}")]
    NoIdentity(String),
    /// Reading the local state failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// The request would make a Raft entry larger than one may be.
    #[error("{what} is {bytes} bytes encoded; a Raft entry holds at most {limit} bytes (raft.max_entry_bytes)")]
    TooLarge {
        /// What was measured.
        what: &'static str,
        /// Its encoded size.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// The leader sheds load it cannot queue.
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// A caller exceeded its rate of writes.
    #[error(
        "{who} exceeded its rate of {rate_per_s} {what} per second (burst {burst}); retry later"
    )]
    RateLimited {
        /// The caller (`node:<id>`, `address:<ip>`).
        who: String,
        /// What is limited.
        what: &'static str,
        /// Sustained rate.
        rate_per_s: u32,
        /// Burst.
        burst: u32,
    },
}

/// Why the cluster refuses a rejoin whose proof holds.
#[derive(Debug, thiserror::Error)]
pub enum RejoinRefusal {
    /// The cluster's `node_rejoin_grace_s` is 0.
    #[error("rejoining is turned off in this cluster (node_rejoin_grace_s is 0); enroll the device again with a new join token")]
    Disabled,
    /// The node's record is gone: an operator removed it.
    #[error("node {node_id} was removed from the cluster; enroll the device again with a new join token")]
    Removed {
        /// The node.
        node_id: String,
    },
    /// The certificate is older than the node's latest: only the newest one
    /// may rejoin, so a copy of an old key and certificate is useless.
    #[error("cert_pem: node {node_id} holds a newer certificate (valid until {latest_ms} ms) than this one (until {presented_ms} ms); only the latest may rejoin, so enroll the device again with a new join token")]
    Superseded {
        /// The node.
        node_id: String,
        /// End of validity of the presented certificate, Unix ms.
        presented_ms: i64,
        /// End of validity of the latest certificate issued, Unix ms.
        latest_ms: i64,
    },
}

/// The `(field, problem)` of an `InvalidArgument` message written as
/// `field: problem`, when its head is a field path (`replicas[3].state`).
fn field_of(message: &str) -> Option<(&str, &str)> {
    let (field, problem) = message.split_once(": ")?;
    let path = !field.is_empty()
        && field
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '[' | ']'));
    path.then_some((field, problem))
}

impl From<cloudless_types::FieldError> for CoordinatorError {
    fn from(e: cloudless_types::FieldError) -> Self {
        CoordinatorError::Invalid(ValidationErrors(vec![e]))
    }
}

impl From<CoordinatorError> for Status {
    fn from(e: CoordinatorError) -> Status {
        if let CoordinatorError::Status(s) = e {
            return s;
        }
        let msg = e.to_string();
        let code = match &e {
            CoordinatorError::Status(s) => s.code(),
            CoordinatorError::InvalidArgument(_) | CoordinatorError::Invalid(_) => {
                Code::InvalidArgument
            }
            CoordinatorError::FailedPrecondition(_) => Code::FailedPrecondition,
            CoordinatorError::NotFound(_) => Code::NotFound,
            CoordinatorError::Denied(_) => Code::PermissionDenied,
            CoordinatorError::Unauthenticated(_) => Code::Unauthenticated,
            CoordinatorError::Unavailable(_) => Code::Unavailable,
            CoordinatorError::Internal(_) => Code::Internal,
            CoordinatorError::NotLeader { .. } | CoordinatorError::NotInitialized => {
                Code::Unavailable
            }
            CoordinatorError::Rejected(r) => match r {
                Rejection::WorkloadNotFound { .. } => Code::NotFound,
                Rejection::AlreadyInitialized { .. } => Code::AlreadyExists,
                Rejection::RevisionMismatch { .. } => Code::Aborted,
                Rejection::NotInitialized => Code::FailedPrecondition,
                Rejection::IdempotencyKeyReused { .. } => Code::InvalidArgument,
                Rejection::IdentityAlreadyInitialized | Rejection::NodeNameTaken { .. } => {
                    Code::AlreadyExists
                }
                Rejection::JoinToken { problem, .. } if problem == "already exists" => {
                    Code::AlreadyExists
                }
                Rejection::JoinToken { .. } => Code::Unauthenticated,
                Rejection::NodeNotFound { .. } => Code::NotFound,
                Rejection::SecretNotFound { .. } | Rejection::TokenNotFound { .. } => {
                    Code::NotFound
                }
                Rejection::SecretExists { .. } => Code::AlreadyExists,
                Rejection::SecretImmutable { .. } | Rejection::Keyring(_) => {
                    Code::FailedPrecondition
                }
                Rejection::SecretConflict(_) => Code::Aborted,
                Rejection::AdminRevoked { .. } => Code::PermissionDenied,
                Rejection::SubnetsExhausted { .. } | Rejection::VipsExhausted { .. } => {
                    Code::ResourceExhausted
                }
                Rejection::SubnetInUse { .. } | Rejection::VipInUse { .. } => {
                    Code::FailedPrecondition
                }
                // A field of the request conflicts with the state: invalid,
                // with the field as a violation (below).
                Rejection::IngressPortTaken { .. } => Code::InvalidArgument,
            },
            CoordinatorError::Token(_) => Code::Unauthenticated,
            CoordinatorError::Pki(p) => match p {
                PkiError::CsrSignature
                | PkiError::CsrIdentityMismatch { .. }
                | PkiError::CsrWantsCa
                | PkiError::Parse { .. } => Code::InvalidArgument,
                _ => Code::Internal,
            },
            CoordinatorError::Rejoin(r) => match r {
                RejoinError::TooLarge { .. } | RejoinError::Parse { .. } => Code::InvalidArgument,
                RejoinError::UnknownIssuer
                | RejoinError::NotANode { .. }
                | RejoinError::Stale { .. }
                | RejoinError::UnsupportedKey { .. }
                | RejoinError::BadProof => Code::Unauthenticated,
                RejoinError::PastGrace { .. } => Code::FailedPrecondition,
                RejoinError::Sign(_) => Code::Internal,
            },
            // Removed carries Reason::NodeRemoved: agents stop and exit.
            CoordinatorError::RejoinRefused(r) => match r {
                RejoinRefusal::Disabled => Code::FailedPrecondition,
                RejoinRefusal::Removed { .. } | RejoinRefusal::Superseded { .. } => {
                    Code::PermissionDenied
                }
            },
            CoordinatorError::NoIdentity(_) => Code::FailedPrecondition,
            CoordinatorError::Membership(_) => Code::FailedPrecondition,
            CoordinatorError::Fatal(_) | CoordinatorError::State(_) => Code::Internal,
            CoordinatorError::TooLarge { .. } => Code::InvalidArgument,
            CoordinatorError::Overloaded(_) | CoordinatorError::RateLimited { .. } => {
                Code::ResourceExhausted
            }
        };
        use cloudless_client::errors::{refusal, Reason, LEADER_ADDRESS, LEADER_ID, NODE_ID};
        let mut status = match &e {
            CoordinatorError::NotLeader { leader } => refusal(
                code,
                msg,
                Reason::NotLeader,
                leader.iter().flat_map(|(id, addr)| {
                    [(LEADER_ID, id.to_string()), (LEADER_ADDRESS, addr.clone())]
                }),
            ),
            CoordinatorError::RateLimited { .. } | CoordinatorError::Overloaded(_) => {
                refusal(code, msg, Reason::RateLimited, [])
            }
            CoordinatorError::RejoinRefused(RejoinRefusal::Removed { node_id }) => {
                refusal(code, msg, Reason::NodeRemoved, [(NODE_ID, node_id.clone())])
            }
            CoordinatorError::InvalidArgument(m) => {
                cloudless_client::errors::invalid_fields(msg.clone(), field_of(m))
            }
            CoordinatorError::Invalid(errs) => cloudless_client::errors::invalid_fields(
                msg,
                errs.0
                    .iter()
                    .map(|f| (f.field.as_str(), f.problem.as_str())),
            ),
            CoordinatorError::Rejected(Rejection::IngressPortTaken { field, .. }) => {
                let problem = msg
                    .strip_prefix(&format!("{field}: "))
                    .unwrap_or(&msg)
                    .to_owned();
                cloudless_client::errors::invalid_fields(
                    msg.clone(),
                    [(field.as_str(), problem.as_str())],
                )
            }
            _ => Status::new(code, msg),
        };
        if let CoordinatorError::NotLeader {
            leader: Some((_, addr)),
        } = &e
        {
            // Also as plain metadata, for clients of earlier releases.
            if let Ok(v) = addr.parse() {
                status.metadata_mut().insert(LEADER_HINT_KEY, v);
            }
        }
        status
    }
}

/// Why a coordinator could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data directory could not be used.
    #[error(transparent)]
    State(#[from] cloudless_state::StateError),
    /// TLS material is missing or unusable.
    #[error("TLS: {0}")]
    Tls(String),
    /// The master key file is unusable.
    #[error(transparent)]
    MasterKey(#[from] cloudless_pki::PkiError),
    /// The `node_id` file is unreadable or does not match the configuration.
    #[error("{0}")]
    NodeId(String),
    /// A listener could not be bound.
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// Raft refused the configuration or failed to start.
    #[error("raft: {0}")]
    Raft(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudless_client::errors::field_violations;

    /// Each error kind has its one code, and field problems travel as typed
    /// violations a client reads without parsing the message.
    #[test]
    fn errors_map_to_one_code_each_and_fields_travel_as_violations() {
        let cases = [
            (
                CoordinatorError::NotFound("no replica r1".into()),
                Code::NotFound,
            ),
            (
                CoordinatorError::Denied("x may not".into()),
                Code::PermissionDenied,
            ),
            (
                CoordinatorError::Unauthenticated("bad cert".into()),
                Code::Unauthenticated,
            ),
            (
                CoordinatorError::Unavailable("shutting down".into()),
                Code::Unavailable,
            ),
            (CoordinatorError::Internal("disk".into()), Code::Internal),
            (
                CoordinatorError::FailedPrecondition("busy".into()),
                Code::FailedPrecondition,
            ),
            (
                CoordinatorError::Rejected(Rejection::SubnetsExhausted {
                    name: "phone-9".into(),
                    cluster_cidr: "10.244.0.0/16".into(),
                    prefix_len: 24,
                }),
                Code::ResourceExhausted,
            ),
            (
                CoordinatorError::Rejected(Rejection::SubnetInUse {
                    node: "n1".into(),
                    subnet: "10.244.0.0/24".into(),
                    cluster_cidr: "10.245.0.0/16".into(),
                    prefix_len: 24,
                }),
                Code::FailedPrecondition,
            ),
        ];
        let cases = cases.into_iter().chain([
            (
                CoordinatorError::Rejected(Rejection::VipsExhausted {
                    namespace: "default".into(),
                    name: "web".into(),
                    service_cidr: "10.96.0.0/30".into(),
                }),
                Code::ResourceExhausted,
            ),
            (
                CoordinatorError::Rejected(Rejection::VipInUse {
                    workload: "default/web".into(),
                    vip: "10.96.0.2".into(),
                    service_cidr: "10.97.0.0/16".into(),
                }),
                Code::FailedPrecondition,
            ),
        ]);
        for (e, code) in cases {
            let s = Status::from(e);
            assert_eq!(s.code(), code, "{}", s.message());
            assert!(field_violations(&s).is_empty());
        }
        // A taken ingress port is the request's field.
        let s = Status::from(CoordinatorError::Rejected(Rejection::IngressPortTaken {
            field: "spec.ports[0].ingressPort".into(),
            port: 80,
            holder: "default/web".into(),
        }));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(
            s.message(),
            "spec.ports[0].ingressPort: 80 is taken by default/web"
        );
        assert_eq!(
            field_violations(&s),
            [(
                "spec.ports[0].ingressPort".to_owned(),
                "80 is taken by default/web".to_owned()
            )]
        );
        let s = Status::from(CoordinatorError::InvalidArgument(
            "replicas[3].replica_id: must be 1 to 256 characters".into(),
        ));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(
            field_violations(&s),
            [(
                "replicas[3].replica_id".to_owned(),
                "must be 1 to 256 characters".to_owned()
            )]
        );
        let s = Status::from(CoordinatorError::from(cloudless_types::FieldError {
            field: "power_source".into(),
            problem: "17 is not a value of this release".into(),
        }));
        assert_eq!(
            field_violations(&s),
            [(
                "power_source".to_owned(),
                "17 is not a value of this release".to_owned()
            )]
        );
        // A message without a field path carries no violation.
        let s = Status::from(CoordinatorError::InvalidArgument(
            "malformed append_entries payload: eof".into(),
        ));
        assert!(field_violations(&s).is_empty());
    }
}
