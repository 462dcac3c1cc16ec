//! Fuzz target: see `cloudless_fuzzing::token`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cloudless_fuzzing::token(data));
