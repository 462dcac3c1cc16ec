//! Fuzz target: see `cloudless_fuzzing::manifest`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cloudless_fuzzing::manifest(data));
