//! QUIC's TLS 1.3 configs from a node's cluster certificate.
//!
//! Both sides present a certificate issued by the cluster CA and check the
//! other's chain against that CA alone (no system roots). Node certificates
//! carry their identity in a URI SAN, not a host name, so the server check
//! verifies the chain and key usage and leaves the name to the caller, which
//! compares the peer's identity with the node it meant to reach.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use cloudless_pki::Identity;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use zeroize::Zeroizing;

use crate::OverlayError;

/// ALPN of the overlay protocol; a peer speaking anything else is refused.
pub const ALPN: &[u8] = b"cloudless-overlay/1";

/// ALPN of the overlay protocol with UDP flows' datagrams in QUIC DATAGRAM
/// frames ([`crate::datagram`]) between two nodes joined directly; a node
/// of the release before (which offers only [`ALPN`]) gets [`ALPN`].
pub const ALPN_DATAGRAMS: &[u8] = b"cloudless-overlay/2";

/// ALPN of the overlay protocol whose relays forward the QUIC datagrams of
/// the UDP flows they carry, as the flows' two ends agree when opening them
/// (`datagrams` in the requests and the reply, [`crate::wire`]). Offered
/// first: two nodes of this release speak it, a node of the release before
/// gets [`ALPN_DATAGRAMS`] and one older still [`ALPN`].
pub const ALPN_RELAYED_DATAGRAMS: &[u8] = b"cloudless-overlay/3";

/// Which overlay protocols a node offers and accepts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Protocols {
    /// UDP flows' datagrams as QUIC datagrams between nodes joined directly.
    pub(crate) datagrams: bool,
    /// And through relays.
    pub(crate) relayed_datagrams: bool,
}

impl Protocols {
    /// In the node's order of preference.
    fn alpn(self) -> Vec<Vec<u8>> {
        let mut offered = Vec::new();
        if self.datagrams && self.relayed_datagrams {
            offered.push(ALPN_RELAYED_DATAGRAMS.to_vec());
        }
        if self.datagrams {
            offered.push(ALPN_DATAGRAMS.to_vec());
        }
        offered.push(ALPN.to_vec());
        offered
    }
}

/// The protocol `conn` agreed on.
fn agreed(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol)
}

/// Whether `conn` agreed on [`ALPN_DATAGRAMS`] or a later protocol.
pub(crate) fn speaks_datagrams(conn: &quinn::Connection) -> bool {
    agreed(conn).is_some_and(|p| p == ALPN_DATAGRAMS || p == ALPN_RELAYED_DATAGRAMS)
}

/// Whether `conn` agreed on [`ALPN_RELAYED_DATAGRAMS`].
pub(crate) fn relays_datagrams(conn: &quinn::Connection) -> bool {
    agreed(conn).is_some_and(|p| p == ALPN_RELAYED_DATAGRAMS)
}

/// A node's credentials for the overlay: the cluster CA certificate, its own
/// certificate and private key (PEM).
pub struct OverlayTls {
    pub(crate) ca_pem: String,
    pub(crate) cert_pem: String,
    pub(crate) key_pem: Zeroizing<String>,
}

impl fmt::Debug for OverlayTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OverlayTls(<redacted>)")
    }
}

fn tls_err(what: &str, e: impl fmt::Display) -> OverlayError {
    OverlayError::Tls(format!("{what}: {e}"))
}

impl OverlayTls {
    /// Checks that the certificate chains to the CA and names an identity.
    pub fn new(
        ca_pem: &str,
        cert_pem: &str,
        key_pem: Zeroizing<String>,
    ) -> Result<(Self, Identity), OverlayError> {
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| tls_err("certificate", e))?;
        let identity = cloudless_pki::verify_with_ca_cert(ca_pem, &der, now_secs())
            .map_err(|e| tls_err("certificate", e))?;
        PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| tls_err("key", e))?;
        Ok((
            OverlayTls {
                ca_pem: ca_pem.to_owned(),
                cert_pem: cert_pem.to_owned(),
                key_pem,
            },
            identity,
        ))
    }

    /// The CA certificate (PEM).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    fn chain_and_key(
        &self,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), OverlayError> {
        let chain = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| tls_err("certificate", e))?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| tls_err("key", e))?;
        Ok((chain, key))
    }

    fn roots(&self) -> Result<RootCertStore, OverlayError> {
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots
                .add(c.map_err(|e| tls_err("CA certificate", e))?)
                .map_err(|e| tls_err("CA certificate", e))?;
        }
        Ok(roots)
    }

    /// The QUIC server config: client certificates from the cluster CA required.
    pub(crate) fn server_config(
        &self,
        idle: Duration,
        protocols: Protocols,
    ) -> Result<quinn::ServerConfig, OverlayError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(self.roots()?), provider.clone())
                .build()
                .map_err(|e| tls_err("client verifier", e))?;
        let (chain, key) = self.chain_and_key()?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls_err("server config", e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| tls_err("server config", e))?;
        tls.alpn_protocols = protocols.alpn();
        tls.max_early_data_size = 0;
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| tls_err("QUIC server config", e))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(transport(idle));
        Ok(config)
    }

    /// The QUIC client config: our certificate, the peer's checked against the CA.
    pub(crate) fn client_config(
        &self,
        idle: Duration,
        protocols: Protocols,
    ) -> Result<quinn::ClientConfig, OverlayError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = Arc::new(ClusterServerVerifier {
            roots: self.roots()?,
            algorithms: provider.signature_verification_algorithms,
        });
        let (chain, key) = self.chain_and_key()?;
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls_err("client config", e))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(chain, key)
            .map_err(|e| tls_err("client config", e))?;
        tls.alpn_protocols = protocols.alpn();
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| tls_err("QUIC client config", e))?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(transport(idle));
        Ok(config)
    }

    /// The identity in a peer's end-entity certificate (its chain to the CA
    /// was verified in the handshake).
    pub(crate) fn identity_of(&self, conn: &quinn::Connection) -> Result<Identity, OverlayError> {
        let certs = conn
            .peer_identity()
            .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
            .ok_or_else(|| OverlayError::Tls("the peer presented no certificate".into()))?;
        let first = certs
            .first()
            .ok_or_else(|| OverlayError::Tls("the peer presented no certificate".into()))?;
        cloudless_pki::inspect_certificate_der(first)
            .map(|info| info.identity)
            .map_err(|e| tls_err("peer certificate", e))
    }
}

fn transport(idle: Duration) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    // Keep-alives hold NAT mappings open and notice dead peers.
    t.keep_alive_interval(Some(idle / 3));
    t.max_idle_timeout(quinn::IdleTimeout::try_from(idle).ok());
    t.max_concurrent_bidi_streams(1024u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    // UDP flows' QUIC datagrams wait here for room in the congestion
    // window; flows stop at `QUEUE_LIMIT`, half of it (`crate::datagram`),
    // so quinn never drops a queued one for a newer.
    t.datagram_send_buffer_size(crate::datagram::SEND_BUFFER);
    Arc::new(t)
}

pub(crate) fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Verifies a server certificate's chain to the cluster CA (and its server
/// key usage), not its name: the caller checks the identity it carries.
struct ClusterServerVerifier {
    roots: RootCertStore,
    algorithms: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for ClusterServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterServerVerifier")
    }
}

impl ServerCertVerifier for ClusterServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
