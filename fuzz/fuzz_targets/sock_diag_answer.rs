#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| synspan::fuzzing::sock_diag_answer(data));
