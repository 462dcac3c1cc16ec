//! Raft payloads come from the network and data files from disk: decoding
//! arbitrary bytes must fail cleanly, never panic.

use cloudless_state::{LogStore, TypeConfig};
use openraft::raft::{AppendEntriesRequest, VoteRequest};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, .. ProptestConfig::default() })]

    #[test]
    fn raft_payload_decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = postcard::from_bytes::<AppendEntriesRequest<TypeConfig>>(&bytes);
        let _ = postcard::from_bytes::<VoteRequest<u64>>(&bytes);
        let _ = postcard::from_bytes::<openraft::Entry<TypeConfig>>(&bytes);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, .. ProptestConfig::default() })]

    #[test]
    fn a_random_file_as_the_log_is_an_error_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..20_000)) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("raft-log.redb");
        std::fs::write(&path, &bytes).expect("write");
        // Either a clean error, or (for an empty file) a fresh log.
        if let Err(e) = LogStore::open(&path) {
            prop_assert!(e.to_string().contains("raft-log.redb"), "{e}");
        }
    }
}
