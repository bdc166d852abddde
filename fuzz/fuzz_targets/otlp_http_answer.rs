#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| synspan::fuzzing::otlp_http_answer(data));
