//! Who a peer is, as written into its certificate's URI SAN.

use std::fmt;

/// URI scheme of Cloudless identities.
pub const SCHEME: &str = "cloudless://";

/// A peer identity. It comes from the certificate, never from a request field.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// An operator (cloudlessctl) with a name.
    Admin(String),
    /// An agent's node, by node id.
    Node(String),
    /// A coordinator, by Raft node id.
    Coordinator(u64),
}

impl Identity {
    /// The URI written into the certificate.
    pub fn uri(&self) -> String {
        match self {
            Identity::Admin(name) => format!("{SCHEME}admin/{name}"),
            Identity::Node(id) => format!("{SCHEME}node/{id}"),
            Identity::Coordinator(id) => format!("{SCHEME}coordinator/{id}"),
        }
    }

    /// Parses a `cloudless://kind/name` URI.
    pub fn from_uri(uri: &str) -> Option<Identity> {
        let rest = uri.strip_prefix(SCHEME)?;
        let (kind, name) = rest.split_once('/')?;
        let name_ok = !name.is_empty()
            && name.len() <= 128
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !name_ok {
            return None;
        }
        match kind {
            "admin" => Some(Identity::Admin(name.to_owned())),
            "node" => Some(Identity::Node(name.to_owned())),
            "coordinator" => name.parse().ok().map(Identity::Coordinator),
            _ => None,
        }
    }

    /// Whether this identity may call administrative APIs.
    pub fn is_admin(&self) -> bool {
        matches!(self, Identity::Admin(_))
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_round_trip_and_junk_is_refused() {
        for id in [
            Identity::Admin("alice".into()),
            Identity::Node("n-01".into()),
            Identity::Coordinator(42),
        ] {
            assert_eq!(Identity::from_uri(&id.uri()), Some(id));
        }
        for bad in [
            "https://node/x",
            "cloudless://node/",
            "cloudless://node/a/b",
            "cloudless://coordinator/abc",
            "cloudless://root/x",
            "cloudless://node/with space",
        ] {
            assert_eq!(Identity::from_uri(bad), None, "{bad}");
        }
    }
}
