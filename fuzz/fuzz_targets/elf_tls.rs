#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| synspan::fuzzing::elf_tls(data));
