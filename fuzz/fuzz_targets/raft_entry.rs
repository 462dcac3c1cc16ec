//! Fuzz target: see `cloudless_fuzzing::raft_entry`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cloudless_fuzzing::raft_entry(data));
