//! Tokens, CSRs and certificates arrive from the network: nothing may panic.

use cloudless_pki::{verify_with_ca_cert, ClusterCa, Identity, TokenKey};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, .. ProptestConfig::default() })]

    #[test]
    fn token_verification_never_panics(token in "[A-Za-z0-9_.=+/-]{0,300}") {
        let k = TokenKey::from_bytes(&[7u8; 32]).expect("key");
        prop_assert!(k.verify(&token, 0).is_err());
    }

    #[test]
    fn csr_signing_never_panics_on_junk(body in proptest::collection::vec(any::<u8>(), 0..400)) {
        use base64::Engine as _;
        let ca = ClusterCa::generate("fuzz", 1_800_000_000).expect("ca");
        let pem = format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
            base64::engine::general_purpose::STANDARD.encode(&body)
        );
        prop_assert!(ca.sign_csr(&pem, &Identity::Node("n".into()), 60, 1_800_000_000).is_err());
    }

    #[test]
    fn certificate_verification_never_panics(der in proptest::collection::vec(any::<u8>(), 0..600)) {
        let ca = ClusterCa::generate("fuzz", 1_800_000_000).expect("ca");
        prop_assert!(verify_with_ca_cert(ca.cert_pem(), &der, 1_800_000_000).is_err());
    }
}
