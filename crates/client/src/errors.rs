//! Why a coordinator refused a call, as a typed detail on the status
//! (`google.rpc.ErrorInfo` in the rich error model), so that no client ever
//! branches on the text of a message.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

/// The `ErrorInfo.domain` of Cloudless's reasons.
pub const ERROR_DOMAIN: &str = "cloudless.dev";

/// `ErrorInfo.metadata` key: the leader's Raft id on [`Reason::NotLeader`].
pub const LEADER_ID: &str = "leader_id";
/// `ErrorInfo.metadata` key: the leader's `host:port` on [`Reason::NotLeader`].
pub const LEADER_ADDRESS: &str = "leader_address";
/// `ErrorInfo.metadata` key: the node on [`Reason::NodeRemoved`].
pub const NODE_ID: &str = "node_id";

/// A refusal a client acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// This coordinator is not the leader (UNAVAILABLE); the leader, when
    /// known, is in the metadata.
    NotLeader,
    /// The calling node was removed from the cluster (PERMISSION_DENIED):
    /// it must stop its replicas and enroll again.
    NodeRemoved,
    /// The caller is over one of its rates (RESOURCE_EXHAUSTED): retry later.
    RateLimited,
}

impl Reason {
    /// Its `ErrorInfo.reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NotLeader => "NOT_LEADER",
            Reason::NodeRemoved => "NODE_REMOVED",
            Reason::RateLimited => "RATE_LIMITED",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [Reason::NotLeader, Reason::NodeRemoved, Reason::RateLimited]
            .into_iter()
            .find(|r| r.as_str() == s)
    }
}

/// A status with `code`, `message` and `reason` as its typed detail.
pub fn refusal<'a>(
    code: Code,
    message: impl Into<String>,
    reason: Reason,
    metadata: impl IntoIterator<Item = (&'a str, String)>,
) -> Status {
    let metadata: std::collections::HashMap<String, String> = metadata
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    Status::with_error_details(
        code,
        message,
        ErrorDetails::with_error_info(reason.as_str(), ERROR_DOMAIN, metadata),
    )
}

/// An INVALID_ARGUMENT status whose `google.rpc.BadRequest` detail lists
/// each `(field, problem)`.
pub fn invalid_fields<'a>(
    message: impl Into<String>,
    violations: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Status {
    let mut details = ErrorDetails::new();
    for (field, problem) in violations {
        details.add_bad_request_violation(field, problem);
    }
    Status::with_error_details(Code::InvalidArgument, message, details)
}

/// The `(field, problem)` pairs of a status's `google.rpc.BadRequest` detail.
pub fn field_violations(status: &Status) -> Vec<(String, String)> {
    status
        .get_error_details()
        .bad_request()
        .map(|b| {
            b.field_violations
                .iter()
                .map(|v| (v.field.clone(), v.description.clone()))
                .collect()
        })
        .unwrap_or_default()
}

/// The Cloudless reason `status` carries, if any (a detail of another domain
/// or an unknown reason is none).
pub fn reason(status: &Status) -> Option<Reason> {
    let info = status.get_error_details().error_info()?.clone();
    (info.domain == ERROR_DOMAIN)
        .then(|| Reason::parse(&info.reason))
        .flatten()
}

/// A value of the reason's metadata in `status` (e.g. [`LEADER_ADDRESS`]).
pub fn reason_metadata(status: &Status, key: &str) -> Option<String> {
    let info = status.get_error_details().error_info()?.clone();
    (info.domain == ERROR_DOMAIN)
        .then(|| info.metadata.get(key).cloned())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reason_survives_the_wire_encoding_and_text_does_not_count() {
        let s = refusal(
            Code::Unavailable,
            "not the leader",
            Reason::NotLeader,
            [(LEADER_ADDRESS, "10.0.0.2:7400".to_owned())],
        );
        // What a client receives: the status rebuilt from its trailers.
        let response = s.into_http::<()>();
        let back = Status::from_header_map(response.headers()).expect("status");
        assert_eq!(reason(&back), Some(Reason::NotLeader));
        assert_eq!(
            reason_metadata(&back, LEADER_ADDRESS).as_deref(),
            Some("10.0.0.2:7400")
        );
        // The word alone is not a reason.
        let text = Status::permission_denied("node n1 has been removed from the cluster");
        assert_eq!(reason(&text), None);
        // Another domain's reason is not ours.
        let foreign = Status::with_error_details(
            Code::PermissionDenied,
            "x",
            ErrorDetails::with_error_info(
                "NODE_REMOVED",
                "example.com",
                std::collections::HashMap::new(),
            ),
        );
        assert_eq!(reason(&foreign), None);
    }

    #[test]
    fn field_violations_survive_the_wire_encoding() {
        let s = invalid_fields(
            "spec.replicas: must be at most 10000",
            [
                ("spec.replicas", "must be at most 10000"),
                ("spec.image", "is required"),
            ],
        );
        let back = Status::from_header_map(s.into_http::<()>().headers()).expect("status");
        assert_eq!(back.code(), Code::InvalidArgument);
        assert_eq!(
            field_violations(&back),
            [
                (
                    "spec.replicas".to_owned(),
                    "must be at most 10000".to_owned()
                ),
                ("spec.image".to_owned(), "is required".to_owned())
            ]
        );
        assert!(field_violations(&Status::invalid_argument("x")).is_empty());
    }
}
