//! The cluster certificate authority.

use std::fmt;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
use zeroize::Zeroizing;

use crate::envelope::{MasterKey, Sealed};
use crate::error::PkiError;
use crate::identity::Identity;

/// Default lifetime of node certificates: 24 hours.
pub const DEFAULT_NODE_CERT_LIFETIME: u64 = 24 * 60 * 60;
/// Lifetime of the CA certificate: 10 years.
const CA_LIFETIME: i64 = 10 * 365 * 24 * 60 * 60;
/// Certificates start a minute in the past to tolerate clock skew.
const BACKDATE: i64 = BACKDATE_S;
/// How far before its issue time a certificate's validity starts (clock
/// skew between the issuer and the checker).
pub const BACKDATE_S: i64 = 60;
/// Associated data binding the sealed CA key to its purpose.
const CA_KEY_CONTEXT: &str = "cloudless/ca-key/v1";

/// A certificate issued by the CA, with its private key when the CA made the key.
pub struct IssuedCertificate {
    /// PEM certificate.
    pub cert_pem: String,
    /// PEM private key; `None` when issued from a CSR (the key never left its owner).
    pub key_pem: Option<Zeroizing<String>>,
    /// End of validity, Unix seconds.
    pub not_after: i64,
}

impl fmt::Debug for IssuedCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCertificate")
            .field("not_after", &self.not_after)
            .field("key_pem", &self.key_pem.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

/// The cluster CA: its certificate and signing key.
pub struct ClusterCa {
    cert_pem: String,
    key: KeyPair,
}

impl fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterCa")
            .field("key", &"<redacted>")
            .finish_non_exhaustive()
    }
}

fn gen_err(e: impl fmt::Display) -> PkiError {
    PkiError::Generate(e.to_string())
}

fn at(unix: i64) -> Result<OffsetDateTime, PkiError> {
    OffsetDateTime::from_unix_timestamp(unix).map_err(gen_err)
}

fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| PkiError::Generate("system random source failed".into()))?;
    bytes[0] &= 0x7f; // positive
    Ok(SerialNumber::from_slice(&bytes))
}

/// RFC 1123 host name: dot-separated labels of 1-63 letters, digits or '-',
/// not starting or ending with '-', at most 253 characters.
fn is_dns_name(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn leaf_params(
    identity: &Identity,
    server_names: &[String],
    now: i64,
    lifetime: u64,
) -> Result<CertificateParams, PkiError> {
    let mut p = CertificateParams::default();
    let mut sans = vec![SanType::URI(identity.uri().try_into().map_err(gen_err)?)];
    for name in server_names {
        sans.push(match name.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) if is_dns_name(name) => {
                SanType::DnsName(name.clone().try_into().map_err(gen_err)?)
            }
            Err(_) => {
                return Err(PkiError::Parse {
                    what: "server name",
                    detail: format!("{name:?} is neither an IP address nor a DNS name"),
                })
            }
        });
    }
    p.subject_alt_names = sans;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, identity.uri());
    p.distinguished_name = dn;
    p.not_before = at(now - BACKDATE)?;
    p.not_after = at(now.saturating_add(i64::try_from(lifetime).unwrap_or(i64::MAX / 2)))?;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.serial_number = Some(random_serial()?);
    p.use_authority_key_identifier_extension = true;
    Ok(p)
}

impl ClusterCa {
    /// Creates a new CA (ECDSA P-256, 10 years).
    pub fn generate(cluster_name: &str, now: i64) -> Result<Self, PkiError> {
        let key = KeyPair::generate().map_err(gen_err)?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            format!("Cloudless cluster CA ({cluster_name})"),
        );
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p.not_before = at(now - BACKDATE)?;
        p.not_after = at(now + CA_LIFETIME)?;
        p.serial_number = Some(random_serial()?);
        let cert = p.self_signed(&key).map_err(gen_err)?;
        Ok(Self {
            cert_pem: cert.pem(),
            key,
        })
    }

    /// Loads a CA from its PEM certificate and PEM key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::Parse {
            what: "CA private key",
            detail: e.to_string(),
        })?;
        Issuer::from_ca_cert_pem(cert_pem, &key).map_err(|e| PkiError::Parse {
            what: "CA certificate",
            detail: e.to_string(),
        })?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            key,
        })
    }

    /// Loads a CA whose key was sealed with [`ClusterCa::seal_key`].
    pub fn from_sealed(
        cert_pem: &str,
        sealed_key: &Sealed,
        master: &MasterKey,
    ) -> Result<Self, PkiError> {
        let key_pem = master.open(sealed_key, CA_KEY_CONTEXT)?;
        let key_pem = std::str::from_utf8(&key_pem).map_err(|_| PkiError::Unseal)?;
        Self::from_pem(cert_pem, key_pem)
    }

    /// The CA key encrypted under the master key, for the replicated state.
    pub fn seal_key(&self, master: &MasterKey) -> Result<Sealed, PkiError> {
        let pem = Zeroizing::new(self.key.serialize_pem());
        master.seal(pem.as_bytes(), CA_KEY_CONTEXT)
    }

    /// The CA certificate (public).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    fn issuer(&self) -> Result<Issuer<'_, &KeyPair>, PkiError> {
        Issuer::from_ca_cert_pem(&self.cert_pem, &self.key).map_err(gen_err)
    }

    /// Issues a certificate and a fresh key pair for `identity` (used by `init`
    /// for the admin and the first coordinator, whose keys are created locally).
    pub fn issue(
        &self,
        identity: &Identity,
        server_names: &[String],
        lifetime: u64,
        now: i64,
    ) -> Result<IssuedCertificate, PkiError> {
        let key = KeyPair::generate().map_err(gen_err)?;
        let params = leaf_params(identity, server_names, now, lifetime)?;
        let cert = params.signed_by(&key, &self.issuer()?).map_err(gen_err)?;
        Ok(IssuedCertificate {
            cert_pem: cert.pem(),
            key_pem: Some(Zeroizing::new(key.serialize_pem())),
            not_after: params.not_after.unix_timestamp(),
        })
    }

    /// Signs a CSR for `identity`. Only the CSR's public key is used (its
    /// signature proves possession); a CSR that names any other identity, or
    /// asks to be a CA, is refused.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        identity: &Identity,
        lifetime: u64,
        now: i64,
    ) -> Result<IssuedCertificate, PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| match e {
            rcgen::Error::InvalidCertificationRequestSignature => PkiError::CsrSignature,
            other => PkiError::Parse {
                what: "certificate signing request",
                detail: other.to_string(),
            },
        })?;
        if matches!(csr.params.is_ca, IsCa::Ca(_)) {
            return Err(PkiError::CsrWantsCa);
        }
        let wanted = identity.uri();
        for san in &csr.params.subject_alt_names {
            let ok = matches!(san, SanType::URI(u) if u.as_str() == wanted);
            if !ok {
                return Err(PkiError::CsrIdentityMismatch {
                    requested: format!("{san:?}"),
                    assigned: identity.clone(),
                });
            }
        }
        for (ty, value) in csr.params.distinguished_name.iter() {
            if *ty == DnType::CommonName {
                let cn = match value {
                    rcgen::DnValue::Utf8String(s) => s.as_str(),
                    rcgen::DnValue::PrintableString(s) => s.as_str(),
                    rcgen::DnValue::Ia5String(s) => s.as_str(),
                    rcgen::DnValue::TeletexString(s) => s.as_str(),
                    _ => "<non-UTF-8 name>",
                };
                // A common name is optional; if present it must be the assigned identity.
                if cn != wanted {
                    return Err(PkiError::CsrIdentityMismatch {
                        requested: format!("common name {cn}"),
                        assigned: identity.clone(),
                    });
                }
            }
        }
        let params = leaf_params(identity, &[], now, lifetime)?;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer()?)
            .map_err(gen_err)?;
        Ok(IssuedCertificate {
            cert_pem: cert.pem(),
            key_pem: None,
            not_after: params.not_after.unix_timestamp(),
        })
    }

    /// Checks that `cert_der` was signed by this CA and is valid at `now`, and
    /// returns the identity it carries.
    pub fn verify(&self, cert_der: &[u8], now: i64) -> Result<Identity, PkiError> {
        verify_with_ca_cert(&self.cert_pem, cert_der, now)
    }
}

/// Checks `cert_der` against a CA certificate alone (no key needed): signed by
/// it, valid at `now`; returns the identity it carries.
pub fn verify_with_ca_cert(
    ca_cert_pem: &str,
    cert_der: &[u8],
    now: i64,
) -> Result<Identity, PkiError> {
    let ca_der = pem_to_der(ca_cert_pem, "CA certificate")?;
    let (_, cert) = X509Certificate::from_der(cert_der).map_err(|e| PkiError::Parse {
        what: "certificate",
        detail: e.to_string(),
    })?;
    check_issued_by(&ca_der, &cert)?;
    let (nb, na) = (
        cert.validity().not_before.timestamp(),
        cert.validity().not_after.timestamp(),
    );
    if now < nb || now > na {
        return Err(PkiError::NotValidNow {
            not_before: nb,
            not_after: na,
        });
    }
    identity_of(&cert)
}

/// Checks that `cert` was signed by the CA certificate `ca_der`, whatever
/// its validity period.
pub(crate) fn check_issued_by(ca_der: &[u8], cert: &X509Certificate<'_>) -> Result<(), PkiError> {
    let (_, ca) = X509Certificate::from_der(ca_der).map_err(|e| PkiError::Parse {
        what: "CA certificate",
        detail: e.to_string(),
    })?;
    if cert.issuer() != ca.subject() || cert.verify_signature(Some(ca.public_key())).is_err() {
        return Err(PkiError::UnknownIssuer);
    }
    Ok(())
}

/// What a certificate says, read without verifying it (for a holder
/// inspecting its own certificate, e.g. to plan renewal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateInfo {
    /// The `cloudless://` identity.
    pub identity: Identity,
    /// Start of validity, Unix seconds.
    pub not_before: i64,
    /// End of validity, Unix seconds.
    pub not_after: i64,
}

/// Reads identity and validity from a PEM certificate.
pub fn inspect_certificate(cert_pem: &str) -> Result<CertificateInfo, PkiError> {
    inspect_certificate_der(&pem_to_der(cert_pem, "certificate")?)
}

/// Reads identity and validity from a DER certificate, without checking who
/// signed it (for a chain TLS has already verified).
pub fn inspect_certificate_der(der: &[u8]) -> Result<CertificateInfo, PkiError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| PkiError::Parse {
        what: "certificate",
        detail: e.to_string(),
    })?;
    Ok(CertificateInfo {
        identity: identity_of(&cert)?,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// The identity in a parsed certificate: exactly one `cloudless://` URI SAN.
pub(crate) fn identity_of(cert: &X509Certificate<'_>) -> Result<Identity, PkiError> {
    let sans = cert
        .subject_alternative_name()
        .map_err(|e| PkiError::Identity(format!("a malformed subject alternative name ({e})")))?;
    let mut found = Vec::new();
    if let Some(sans) = sans {
        for name in &sans.value.general_names {
            if let GeneralName::URI(uri) = name {
                if uri.starts_with(crate::identity::SCHEME) {
                    found.push(Identity::from_uri(uri).ok_or_else(|| {
                        PkiError::Identity(format!("an unknown identity {uri:?}"))
                    })?);
                }
            }
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(PkiError::Identity("no cloudless:// identity".into())),
        n => Err(PkiError::Identity(format!("{n} cloudless:// identities"))),
    }
}

/// Whether `key_pem` is the private key of the certificate `cert_pem` (a
/// key and certificate written apart can be torn by a crash mid-renewal).
pub fn key_matches_certificate(cert_pem: &str, key_pem: &str) -> Result<bool, PkiError> {
    use rcgen::PublicKeyData as _;
    let der = pem_to_der(cert_pem, "certificate")?;
    let (_, cert) = X509Certificate::from_der(&der).map_err(|e| PkiError::Parse {
        what: "certificate",
        detail: e.to_string(),
    })?;
    let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::Parse {
        what: "private key",
        detail: e.to_string(),
    })?;
    Ok(key.der_bytes() == cert.public_key().subject_public_key.data.as_ref())
}

/// Decodes the first PEM block.
pub(crate) fn pem_to_der(pem: &str, what: &'static str) -> Result<Vec<u8>, PkiError> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| PkiError::Parse {
        what,
        detail: e.to_string(),
    })?;
    Ok(p.contents)
}

/// Makes a key pair and a CSR for `identity` on the device that will own the key.
pub fn new_csr(identity: &Identity) -> Result<(String, Zeroizing<String>), PkiError> {
    csr_with(vec![SanType::URI(
        identity.uri().try_into().map_err(gen_err)?,
    )])
}

/// Makes a key pair and a CSR that names no identity: what an agent sends when
/// enrolling, since the coordinator assigns its node id.
pub fn new_anonymous_csr() -> Result<(String, Zeroizing<String>), PkiError> {
    csr_with(Vec::new())
}

/// A CSR naming no identity for the key in `key_pem` (renewing a
/// certificate without changing its key, so key and certificate files can
/// never disagree).
pub fn csr_for_key(key_pem: &str) -> Result<String, PkiError> {
    let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::Parse {
        what: "private key",
        detail: e.to_string(),
    })?;
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    let csr = p.serialize_request(&key).map_err(gen_err)?;
    csr.pem().map_err(gen_err)
}

fn csr_with(sans: Vec<SanType>) -> Result<(String, Zeroizing<String>), PkiError> {
    let key = KeyPair::generate().map_err(gen_err)?;
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = sans;
    let csr = p.serialize_request(&key).map_err(gen_err)?;
    Ok((
        csr.pem().map_err(gen_err)?,
        Zeroizing::new(key.serialize_pem()),
    ))
}
