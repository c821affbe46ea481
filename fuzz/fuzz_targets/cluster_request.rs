#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vsha_agent::fuzzing::cluster_request(data));
