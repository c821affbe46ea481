#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vsha_agent::fuzzing::config_text(data));
