//! The cluster CA end to end: issue, sign CSRs, verify peers, seal the key.

use base64::Engine as _;
use cloudless_pki::{
    new_csr, ClusterCa, Identity, MasterKey, PkiError, DEFAULT_NODE_CERT_LIFETIME,
};

const NOW: i64 = 1_800_000_000;

fn der(pem: &str) -> Vec<u8> {
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .expect("PEM body")
}

fn pem(label: &str, der: &[u8]) -> String {
    let b = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).expect("ascii"))
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

#[test]
fn node_enrolls_with_a_csr_and_keeps_its_key() {
    let ca = ClusterCa::generate("test", NOW).expect("ca");
    let node = Identity::Node("n-01".into());
    let (csr, key) = new_csr(&node).expect("csr");
    assert!(key.contains("PRIVATE KEY"));
    let issued = ca
        .sign_csr(&csr, &node, DEFAULT_NODE_CERT_LIFETIME, NOW)
        .expect("signed");
    assert!(
        issued.key_pem.is_none(),
        "the CA never holds the node's key"
    );
    assert_eq!(issued.not_after, NOW + DEFAULT_NODE_CERT_LIFETIME as i64);
    assert_eq!(
        ca.verify(&der(&issued.cert_pem), NOW + 10)
            .expect("verifies"),
        node
    );
    assert!(!format!("{issued:?}").contains("PRIVATE"));
}

#[test]
fn csr_for_another_identity_is_refused() {
    let ca = ClusterCa::generate("test", NOW).expect("ca");
    let (csr, _) = new_csr(&Identity::Admin("mallory".into())).expect("csr");
    let err = ca
        .sign_csr(&csr, &Identity::Node("n-01".into()), 3600, NOW)
        .expect_err("identity swap accepted");
    assert!(matches!(err, PkiError::CsrIdentityMismatch { .. }), "{err}");
    assert!(err.to_string().contains("cloudless://node/n-01"), "{err}");
}

#[test]
fn csr_with_a_broken_signature_is_refused() {
    let ca = ClusterCa::generate("test", NOW).expect("ca");
    let node = Identity::Node("n-01".into());
    let (csr, _) = new_csr(&node).expect("csr");
    let mut bytes = der(&csr);
    let last = bytes.len() - 3;
    bytes[last] ^= 0x55;
    let err = ca
        .sign_csr(&pem("CERTIFICATE REQUEST", &bytes), &node, 3600, NOW)
        .expect_err("forged CSR accepted");
    assert!(
        matches!(err, PkiError::CsrSignature | PkiError::Parse { .. }),
        "{err}"
    );
    let err = ca
        .sign_csr("not a csr", &node, 3600, NOW)
        .expect_err("junk accepted");
    assert!(matches!(err, PkiError::Parse { .. }), "{err}");
}

#[test]
fn certificates_from_another_ca_or_out_of_date_are_refused() {
    let ca = ClusterCa::generate("ours", NOW).expect("ca");
    let rogue = ClusterCa::generate("theirs", NOW).expect("ca");
    let admin = Identity::Admin("eve".into());
    let foreign = rogue.issue(&admin, &[], 3600, NOW).expect("issue");
    assert!(matches!(
        ca.verify(&der(&foreign.cert_pem), NOW),
        Err(PkiError::UnknownIssuer)
    ));
    let short = ca.issue(&admin, &[], 600, NOW).expect("issue");
    assert_eq!(
        ca.verify(&der(&short.cert_pem), NOW + 10).expect("valid"),
        admin
    );
    assert!(matches!(
        ca.verify(&der(&short.cert_pem), NOW + 601),
        Err(PkiError::NotValidNow { .. })
    ));
    assert!(matches!(
        ca.verify(b"garbage", NOW),
        Err(PkiError::Parse { .. })
    ));
}

#[test]
fn coordinator_certificates_carry_server_names() {
    let ca = ClusterCa::generate("test", NOW).expect("ca");
    let id = Identity::Coordinator(7);
    let issued = ca
        .issue(
            &id,
            &["127.0.0.1".into(), "coord-1.example".into()],
            3600,
            NOW,
        )
        .expect("issue");
    let d = der(&issued.cert_pem);
    assert_eq!(ca.verify(&d, NOW).expect("valid"), id);
    let text = String::from_utf8_lossy(&d);
    assert!(text.contains("coord-1.example"));
    let err = ca
        .issue(&id, &["bad name!".into()], 3600, NOW)
        .expect_err("bad server name");
    assert!(err.to_string().contains("bad name!"), "{err}");
}

#[test]
fn sealed_ca_key_round_trips_only_with_the_master_key() {
    let ca = ClusterCa::generate("test", NOW).expect("ca");
    let master = MasterKey::generate().expect("master");
    let sealed = ca.seal_key(&master).expect("seal");
    assert!(!sealed.ciphertext.contains("PRIVATE"));
    let restored = ClusterCa::from_sealed(ca.cert_pem(), &sealed, &master).expect("unseal");
    let node = Identity::Node("n-02".into());
    let (csr, _) = new_csr(&node).expect("csr");
    let issued = restored
        .sign_csr(&csr, &node, 3600, NOW)
        .expect("restored CA signs");
    assert_eq!(
        ca.verify(&der(&issued.cert_pem), NOW)
            .expect("original CA accepts"),
        node
    );
    let wrong = MasterKey::generate().expect("master");
    assert!(matches!(
        ClusterCa::from_sealed(ca.cert_pem(), &sealed, &wrong),
        Err(PkiError::Unseal)
    ));
}
