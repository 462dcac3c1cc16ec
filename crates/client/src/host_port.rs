//! The one `host:port` parser: `name:port`, `1.2.3.4:port`, `[v6]:port`.

use std::fmt;
use std::net::Ipv6Addr;
use std::str::FromStr;

/// A coordinator address: a host (name, IPv4 or IPv6 address) and a port
/// from 1 to 65535.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    /// The host without brackets (`::1`, not `[::1]`).
    host: String,
    port: u16,
}

/// Why a text is not a `host:port` address. Every message quotes the text
/// and names the part (host or port) that is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostPortError {
    /// The text holds whitespace.
    #[error("{address:?} is not a host:port address: it holds whitespace")]
    Whitespace {
        /// The text given.
        address: String,
    },
    /// No `:port` follows the host.
    #[error("{address:?} is not a host:port address: the port is missing")]
    MissingPort {
        /// The text given.
        address: String,
    },
    /// Nothing before `:port`.
    #[error("{address:?} is not a host:port address: the host is empty")]
    EmptyHost {
        /// The text given.
        address: String,
    },
    /// An IPv6 address without brackets (`::1:7400` is ambiguous).
    #[error(
        "{address:?} is not a host:port address: write an IPv6 host in brackets, as [::1]:7400"
    )]
    BareIpv6 {
        /// The text given.
        address: String,
    },
    /// A host holding a character no host name or address has.
    #[error("{address:?} is not a host:port address: the host holds one of '[', ']', '/', '@', '?', '#'")]
    BadHost {
        /// The text given.
        address: String,
    },
    /// Brackets that do not hold exactly one IPv6 address.
    #[error("{address:?} is not a host:port address: the host in brackets is not an IPv6 address")]
    BadIpv6 {
        /// The text given.
        address: String,
    },
    /// The port is not a number from 1 to 65535.
    #[error(
        "{address:?} is not a host:port address: the port {port:?} is not a number from 1 to 65535"
    )]
    BadPort {
        /// The text given.
        address: String,
        /// The port part.
        port: String,
    },
}

impl HostPort {
    /// Parses `host:port` or `[v6]:port`; refuses whitespace, an empty host,
    /// a bare IPv6 host, and a port that is 0 or not a decimal number.
    pub fn parse(address: &str) -> Result<Self, HostPortError> {
        let owned = || address.to_owned();
        if address.contains(char::is_whitespace) {
            return Err(HostPortError::Whitespace { address: owned() });
        }
        let (host, port) = if let Some(rest) = address.strip_prefix('[') {
            let Some((v6, after)) = rest.split_once(']') else {
                return Err(HostPortError::BadIpv6 { address: owned() });
            };
            if v6.parse::<Ipv6Addr>().is_err() {
                return Err(HostPortError::BadIpv6 { address: owned() });
            }
            let Some(port) = after.strip_prefix(':') else {
                return Err(HostPortError::MissingPort { address: owned() });
            };
            (v6, port)
        } else {
            let Some((host, port)) = address.rsplit_once(':') else {
                return Err(HostPortError::MissingPort { address: owned() });
            };
            if host.contains(':') {
                return Err(HostPortError::BareIpv6 { address: owned() });
            }
            if host.is_empty() {
                return Err(HostPortError::EmptyHost { address: owned() });
            }
            if host.contains(['[', ']', '/', '@', '?', '#']) {
                return Err(HostPortError::BadHost { address: owned() });
            }
            (host, port)
        };
        let valid_port = !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit());
        match port.parse::<u16>() {
            Ok(p) if valid_port && p != 0 => Ok(Self {
                host: host.to_owned(),
                port: p,
            }),
            _ => Err(HostPortError::BadPort {
                address: owned(),
                port: port.to_owned(),
            }),
        }
    }

    /// The same host with another port (refused when 0).
    pub fn with_port(&self, port: u16) -> Result<Self, HostPortError> {
        if port == 0 {
            return Err(HostPortError::BadPort {
                address: self.to_string(),
                port: "0".into(),
            });
        }
        Ok(Self {
            host: self.host.clone(),
            port,
        })
    }

    /// The host without brackets: the TLS server name to check.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the host is an IPv6 address (written in brackets).
    pub fn is_ipv6(&self) -> bool {
        self.host.contains(':')
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_ipv6() {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl FromStr for HostPort {
    type Err = HostPortError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> HostPort {
        HostPort::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn names_and_ipv4_addresses_parse_with_their_port() {
        let a = ok("coord-1.example:7400");
        assert_eq!((a.host(), a.port()), ("coord-1.example", 7400));
        let b = ok("127.0.0.1:1");
        assert_eq!((b.host(), b.port()), ("127.0.0.1", 1));
        assert_eq!(ok("localhost:65535").port(), 65535);
        assert_eq!(ok("10.0.0.2:7400").to_string(), "10.0.0.2:7400");
    }

    #[test]
    fn ipv6_hosts_in_brackets_parse_without_the_brackets() {
        let a = ok("[::1]:7400");
        assert_eq!((a.host(), a.port()), ("::1", 7400));
        assert!(a.is_ipv6());
        assert_eq!(a.to_string(), "[::1]:7400");
        assert_eq!(a.with_port(9000).expect("valid").to_string(), "[::1]:9000");
        assert!(a.with_port(0).is_err());
        let b = ok("[fd00:1:2::3]:443");
        assert_eq!(b.host(), "fd00:1:2::3");
        assert_eq!(b.to_string(), "[fd00:1:2::3]:443");
    }

    #[test]
    fn bare_ipv6_is_refused_and_told_to_use_brackets() {
        for s in ["::1:7400", "fd00::3:443"] {
            let e = HostPort::parse(s).expect_err(s);
            assert!(matches!(e, HostPortError::BareIpv6 { .. }), "{s}: {e:?}");
            assert!(e.to_string().contains("[::1]:7400"), "{e}");
        }
    }

    #[test]
    fn malformed_brackets_are_refused_naming_the_host() {
        for s in ["[::1:7400", "[not-v6]:7400", "[127.0.0.1]:7400", "[]:7400"] {
            let e = HostPort::parse(s).expect_err(s);
            assert!(e.to_string().contains("host"), "{s}: {e}");
        }
        for s in ["a]:1", "user@host:1", "host/x:1"] {
            let e = HostPort::parse(s).expect_err(s);
            assert!(matches!(e, HostPortError::BadHost { .. }), "{s}: {e:?}");
        }
        let e = HostPort::parse("[::1]7400").expect_err("no colon");
        assert!(matches!(e, HostPortError::MissingPort { .. }), "{e:?}");
    }

    #[test]
    fn port_zero_missing_or_not_a_number_is_refused_naming_the_port() {
        for s in [
            "host:0",
            "host:",
            "host:65536",
            "host:+80",
            "host:http",
            "[::1]:0",
            "[::1]:",
        ] {
            let e = HostPort::parse(s).expect_err(s);
            assert!(matches!(e, HostPortError::BadPort { .. }), "{s}: {e:?}");
            assert!(e.to_string().contains("the port"), "{e}");
            assert!(e.to_string().contains(&format!("{s:?}")), "{e}");
        }
        for s in ["host", "", "[::1]"] {
            let e = HostPort::parse(s).expect_err(s);
            assert!(matches!(e, HostPortError::MissingPort { .. }), "{s}: {e:?}");
        }
    }

    #[test]
    fn empty_hosts_and_whitespace_are_refused() {
        let e = HostPort::parse(":7400").expect_err("empty host");
        assert!(matches!(e, HostPortError::EmptyHost { .. }), "{e:?}");
        assert!(e.to_string().contains("the host is empty"), "{e}");
        for s in [" host:7400", "host:7400 ", "ho st:7400", "host:\t7400"] {
            let e = HostPort::parse(s).expect_err(s);
            assert!(
                matches!(e, HostPortError::Whitespace { .. }),
                "{s:?}: {e:?}"
            );
        }
    }

    #[test]
    fn every_error_says_it_is_not_a_host_port_address() {
        for s in ["", "x", ":1", "::1:1", "[x]:1", "a:0", "a b:1"] {
            let e = HostPort::parse(s).expect_err(s);
            assert!(
                e.to_string()
                    .starts_with(&format!("{s:?} is not a host:port address")),
                "{e}"
            );
        }
    }
}
