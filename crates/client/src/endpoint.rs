//! Endpoints and channels to one coordinator.

use std::time::Duration;

use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::HostPort;

/// How channels connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelOptions {
    /// How long a connection attempt may take. Default 2 s.
    pub connect_timeout: Duration,
    /// How long one call may take; `None`: no limit. Default 30 s.
    pub call_timeout: Option<Duration>,
    /// HTTP/2 keep-alive pings on idle connections; `None`: none. Default none.
    pub keep_alive: Option<Duration>,
}

impl Default for ChannelOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            call_timeout: Some(Duration::from_secs(30)),
            keep_alive: None,
        }
    }
}

/// Why an endpoint could not be built.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The address does not make a URI.
    #[error("{address}: not a usable URI")]
    Uri {
        /// The address.
        address: String,
        /// tonic's reason.
        #[source]
        source: tonic::transport::Error,
    },
    /// The TLS settings were refused.
    #[error("TLS configuration for {address}")]
    Tls {
        /// The address.
        address: String,
        /// tonic's reason.
        #[source]
        source: tonic::transport::Error,
    },
}

/// The endpoint of `address`: `https` with `tls`, else `http`; TCP_NODELAY
/// on, with the timeouts and keep-alive of `options`.
pub fn endpoint(
    address: &HostPort,
    tls: Option<ClientTlsConfig>,
    options: &ChannelOptions,
) -> Result<Endpoint, EndpointError> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut ep = Endpoint::from_shared(format!("{scheme}://{address}")).map_err(|source| {
        EndpointError::Uri {
            address: address.to_string(),
            source,
        }
    })?;
    if let Some(tls) = tls {
        ep = ep.tls_config(tls).map_err(|source| EndpointError::Tls {
            address: address.to_string(),
            source,
        })?;
    }
    ep = ep
        .connect_timeout(options.connect_timeout)
        .tcp_nodelay(true);
    if let Some(t) = options.call_timeout {
        ep = ep.timeout(t);
    }
    if let Some(k) = options.keep_alive {
        ep = ep.http2_keep_alive_interval(k);
    }
    Ok(ep)
}

/// A lazily connected channel to `address` (see [`endpoint`]).
pub fn channel(
    address: &HostPort,
    tls: Option<ClientTlsConfig>,
    options: &ChannelOptions,
) -> Result<Channel, EndpointError> {
    endpoint(address, tls, options).map(|ep| ep.connect_lazy())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_uses_http_and_tls_uses_https_with_ipv6_in_brackets() {
        let opts = ChannelOptions::default();
        let a = HostPort::parse("[::1]:7400").expect("valid");
        let ep = endpoint(&a, None, &opts).expect("endpoint");
        assert_eq!(ep.uri().to_string(), "http://[::1]:7400/");
        let tls = crate::server_only_tls("not a pem", &a);
        let ep = endpoint(&a, Some(tls), &opts).expect("endpoint");
        assert_eq!(ep.uri().scheme_str(), Some("https"));
    }
}
