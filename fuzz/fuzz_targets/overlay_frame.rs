//! Fuzz target: see `cloudless_fuzzing::overlay_frame`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cloudless_fuzzing::overlay_frame(data));
