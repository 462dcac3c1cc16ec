//! mTLS client credentials.

use std::fmt;

use tonic::transport::{Certificate, ClientTlsConfig, Identity};
use zeroize::Zeroizing;

use crate::HostPort;

/// Client credentials for mTLS: the cluster CA to trust and the certificate
/// and key to present. `Debug` never shows the key.
#[derive(Clone)]
pub struct ClientTls {
    /// The CA certificate(s), PEM.
    pub ca_pem: String,
    /// The client certificate, PEM.
    pub cert_pem: String,
    /// The client's private key, PEM (wiped from memory when dropped).
    pub key_pem: Zeroizing<String>,
}

impl ClientTls {
    /// Credentials from PEM text.
    pub fn new(ca_pem: String, cert_pem: String, key_pem: Zeroizing<String>) -> Self {
        Self {
            ca_pem,
            cert_pem,
            key_pem,
        }
    }

    /// tonic's TLS settings to reach `address`: trust the CA, present the
    /// certificate, and check the server's certificate against the host.
    pub fn config_for(&self, address: &HostPort) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, self.key_pem.as_bytes()))
            .domain_name(address.host())
    }
}

/// TLS settings that trust `ca_pem` and present no client certificate (for
/// enrollment and rejoining, before a node has a usable certificate).
pub fn server_only_tls(ca_pem: &str, address: &HostPort) -> ClientTlsConfig {
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name(address.host())
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("ca_pem", &format_args!("<{} bytes>", self.ca_pem.len()))
            .field("cert_pem", &format_args!("<{} bytes>", self.cert_pem.len()))
            .field("key_pem", &format_args!("<redacted>"))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_the_key() {
        let t = ClientTls::new(
            "CA".into(),
            "CERT".into(),
            Zeroizing::new("-----BEGIN PRIVATE KEY-----secret".into()),
        );
        let shown = format!("{t:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(!shown.contains("PRIVATE"), "{shown}");
        assert!(shown.contains("redacted"), "{shown}");
    }
}
