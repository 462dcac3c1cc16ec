//! Fuzz target: see `cloudless_fuzzing::csr`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cloudless_fuzzing::csr(data));
