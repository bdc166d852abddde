#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| synspan::fuzzing::process_note(data));
