use super::*;
use crate::ca::{new_anonymous_csr, ClusterCa};

const NOW: i64 = 1_800_000_000;
const DAY: i64 = 24 * 3600;
const GRACE: u64 = 30 * 24 * 3600;

/// A node certificate issued `ago` seconds before `NOW` for an hour, its key,
/// and the CA that issued it.
struct Device {
    ca: ClusterCa,
    cert_pem: String,
    key_pem: String,
}

fn device(ago: i64) -> Device {
    let ca = ClusterCa::generate("t", NOW - 60 * DAY).expect("ca");
    let (csr, key) = new_anonymous_csr().expect("csr");
    let cert = ca
        .sign_csr(&csr, &Identity::Node("n1".into()), 3600, NOW - ago)
        .expect("sign");
    Device {
        ca,
        cert_pem: cert.cert_pem,
        key_pem: key.to_string(),
    }
}

fn new_csr() -> String {
    new_anonymous_csr().expect("csr").0
}

fn sign(d: &Device, key_pem: &str, csr: &str, signed_at: i64) -> Vec<u8> {
    sign_rejoin_proof(d.ca.cert_pem(), &d.cert_pem, key_pem, csr, signed_at).expect("sign")
}

fn verify(
    d: &Device,
    cert_pem: &str,
    csr: &str,
    signed_at: i64,
    sig: &[u8],
) -> Result<RejoinGrant, RejoinError> {
    verify_rejoin_proof(
        d.ca.cert_pem(),
        &RejoinProof {
            cert_pem,
            csr_pem: csr,
            signed_at,
            signature: sig,
        },
        NOW,
        GRACE,
    )
}

#[test]
fn an_expired_certificate_within_the_grace_rejoins_with_its_own_key() {
    let d = device(7 * DAY);
    let csr = new_csr();
    let sig = sign(&d, &d.key_pem, &csr, NOW - 10);
    let grant = verify(&d, &d.cert_pem, &csr, NOW - 10, &sig).expect("rejoin");
    assert_eq!(grant.node_id, "n1");
    assert_eq!(grant.not_after, NOW - 7 * DAY + 3600);
}

#[test]
fn a_proof_by_another_key_is_refused() {
    let d = device(DAY);
    let csr = new_csr();
    let (_, other_key) = new_anonymous_csr().expect("key");
    let sig = sign(&d, &other_key, &csr, NOW);
    let err = verify(&d, &d.cert_pem, &csr, NOW, &sig).expect_err("forged proof");
    assert!(matches!(err, RejoinError::BadProof), "{err}");
    assert!(err.to_string().starts_with("proof:"), "{err}");
    let err = verify(&d, &d.cert_pem, &csr, NOW, b"junk").expect_err("junk proof");
    assert!(matches!(err, RejoinError::BadProof), "{err}");
}

#[test]
fn a_certificate_from_another_ca_is_refused() {
    let d = device(DAY);
    let rogue = device(DAY);
    let csr = new_csr();
    // The rogue device signs correctly for its own CA; this cluster's CA did
    // not issue its certificate.
    let sig = sign(&rogue, &rogue.key_pem, &csr, NOW);
    let err = verify(&d, &rogue.cert_pem, &csr, NOW, &sig).expect_err("foreign CA");
    assert!(matches!(err, RejoinError::UnknownIssuer), "{err}");
    assert!(err.to_string().starts_with("cert_pem:"), "{err}");
}

#[test]
fn a_proof_made_for_another_cluster_is_refused() {
    let d = device(DAY);
    let other = ClusterCa::generate("other", NOW - DAY).expect("ca");
    let csr = new_csr();
    let sig =
        sign_rejoin_proof(other.cert_pem(), &d.cert_pem, &d.key_pem, &csr, NOW).expect("sign");
    let err = verify(&d, &d.cert_pem, &csr, NOW, &sig).expect_err("other cluster");
    assert!(matches!(err, RejoinError::BadProof), "{err}");
}

#[test]
fn a_csr_other_than_the_signed_one_is_refused() {
    let d = device(DAY);
    let csr = new_csr();
    let sig = sign(&d, &d.key_pem, &csr, NOW);
    let err = verify(&d, &d.cert_pem, &new_csr(), NOW, &sig).expect_err("swapped CSR");
    assert!(matches!(err, RejoinError::BadProof), "{err}");
    let mut tampered = csr.clone();
    tampered.push('\n');
    let err = verify(&d, &d.cert_pem, &tampered, NOW, &sig).expect_err("tampered CSR");
    assert!(matches!(err, RejoinError::BadProof), "{err}");
}

#[test]
fn a_stale_or_future_signing_time_is_refused() {
    let d = device(DAY);
    let csr = new_csr();
    for at in [
        NOW - REJOIN_CLOCK_SKEW_S - 1,
        NOW + REJOIN_CLOCK_SKEW_S + 1,
        i64::MIN,
        i64::MAX,
    ] {
        let sig = sign(&d, &d.key_pem, &csr, at);
        let err = verify(&d, &d.cert_pem, &csr, at, &sig).expect_err("stale proof");
        assert!(matches!(err, RejoinError::Stale { .. }), "{err}");
        assert!(err.to_string().starts_with("signed_at_s:"), "{err}");
    }
    // The signing time is part of the statement: it cannot be moved.
    let sig = sign(&d, &d.key_pem, &csr, NOW - 1000);
    let err = verify(&d, &d.cert_pem, &csr, NOW, &sig).expect_err("moved time");
    assert!(matches!(err, RejoinError::BadProof), "{err}");
}

#[test]
fn a_certificate_past_the_grace_is_refused_and_zero_grace_refuses_any_expired_one() {
    let d = device(40 * DAY);
    let csr = new_csr();
    let sig = sign(&d, &d.key_pem, &csr, NOW);
    let err = verify(&d, &d.cert_pem, &csr, NOW, &sig).expect_err("past grace");
    assert!(matches!(err, RejoinError::PastGrace { .. }), "{err}");
    assert!(err.to_string().contains("new join token"), "{err}");

    let d = device(2 * 3600);
    let sig = sign(&d, &d.key_pem, &csr, NOW);
    let proof = RejoinProof {
        cert_pem: &d.cert_pem,
        csr_pem: &csr,
        signed_at: NOW,
        signature: &sig,
    };
    let err = verify_rejoin_proof(d.ca.cert_pem(), &proof, NOW, 0).expect_err("no grace");
    assert!(matches!(err, RejoinError::PastGrace { .. }), "{err}");
    verify_rejoin_proof(d.ca.cert_pem(), &proof, NOW, 3600).expect("an hour of grace");
    verify_rejoin_proof(d.ca.cert_pem(), &proof, NOW, u64::MAX).expect("huge grace");
}

#[test]
fn only_node_certificates_rejoin() {
    let d = device(DAY);
    let admin =
        d.ca.issue(&Identity::Admin("root".into()), &[], 3600, NOW - DAY)
            .expect("admin");
    let key = admin.key_pem.as_ref().expect("key").to_string();
    let csr = new_csr();
    let err = sign_rejoin_proof(d.ca.cert_pem(), &admin.cert_pem, &key, &csr, NOW)
        .expect_err("an admin signs");
    assert!(matches!(err, RejoinError::NotANode { .. }), "{err}");
    let err = verify(&d, &admin.cert_pem, &csr, NOW, b"x").expect_err("an admin rejoins");
    assert!(matches!(err, RejoinError::NotANode { .. }), "{err}");
}

#[test]
fn oversized_and_malformed_fields_are_refused_by_name() {
    let d = device(DAY);
    let csr = new_csr();
    let big = "x".repeat(REJOIN_MAX_PEM_BYTES + 1);
    let err = verify(&d, &big, &csr, NOW, b"x").expect_err("huge cert");
    assert!(
        matches!(
            err,
            RejoinError::TooLarge {
                field: "cert_pem",
                ..
            }
        ),
        "{err}"
    );
    let err = verify(&d, &d.cert_pem, &big, NOW, b"x").expect_err("huge csr");
    assert!(
        matches!(
            err,
            RejoinError::TooLarge {
                field: "csr_pem",
                ..
            }
        ),
        "{err}"
    );
    let err = verify(&d, &d.cert_pem, &csr, NOW, &[0; REJOIN_MAX_PROOF_BYTES + 1])
        .expect_err("huge proof");
    assert!(
        matches!(err, RejoinError::TooLarge { field: "proof", .. }),
        "{err}"
    );
    for junk in [
        "",
        "not a certificate",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    ] {
        let err = verify(&d, junk, &csr, NOW, b"x").expect_err("junk cert");
        assert!(
            matches!(
                err,
                RejoinError::Parse {
                    field: "cert_pem",
                    ..
                }
            ),
            "{err}"
        );
    }
}
