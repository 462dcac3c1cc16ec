//! gRPC metadata keys shared by the coordinators and their clients.

/// Metadata key carrying the leader's address (`host:port`) on
/// `Unavailable` answers from a coordinator that is not the leader.
pub const LEADER_HINT_KEY: &str = "x-cloudless-leader";

/// Metadata key marking a call already forwarded by a follower to the
/// leader (it is never forwarded a second time).
pub const FORWARDED_KEY: &str = "x-cloudless-forwarded";

/// The leader's address a coordinator named in `status`, if any.
pub fn leader_hint(status: &tonic::Status) -> Option<&str> {
    status
        .metadata()
        .get(LEADER_HINT_KEY)
        .and_then(|v| v.to_str().ok())
        .filter(|h| !h.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hint_is_read_from_the_leader_key_only() {
        let mut s = tonic::Status::unavailable("not the leader");
        assert_eq!(leader_hint(&s), None);
        s.metadata_mut()
            .insert(LEADER_HINT_KEY, "10.0.0.2:7400".parse().expect("ascii"));
        assert_eq!(leader_hint(&s), Some("10.0.0.2:7400"));
    }
}
