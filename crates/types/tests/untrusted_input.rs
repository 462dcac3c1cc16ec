//! Manifests come from users' files: no input may panic the parser.

use proptest::prelude::*;

const GOOD: &str = "apiVersion: cloudless.dev/v1\nkind: Workload\nmetadata:\n  name: web\nspec:\n  image: busybox\n  replicas: 2\n";

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics(text in ".{0,400}") {
        let _ = cloudless_types::parse_manifest(&text);
    }

    #[test]
    fn mutated_manifests_never_panic(pos in 0usize..GOOD.len(), insert in "[ -~\\n\\t]{0,12}", cut in 0usize..8) {
        let mut text = GOOD.to_owned();
        let end = (pos + cut).min(text.len());
        text.replace_range(pos..end, &insert);
        if let Ok(w) = cloudless_types::parse_manifest(&text) {
            prop_assert!(w.validate().is_ok(), "parse_manifest returned an invalid workload");
        }
    }
}
