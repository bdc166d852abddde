//! synspan's kernel programs: one module per hook, all sharing the in-flight map.
//!
//! An attempt is born when a TCP socket enters SYN_SENT (`attempt::attempt_start`), gathers
//! retransmits, resets and errors while it waits, and is handed to the agent in one
//! ring-buffer record when the socket leaves SYN_SENT.
#![no_std]
#![no_main]
// For the one atomic add core does not offer on this target (see `maps::count`).
#![feature(asm_experimental_arch)]

mod attempt;
mod caller;
mod connect;
mod error_report;
mod helpers;
mod maps;
mod reset;
mod retransmit;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// bpf_probe_read_kernel and the stack helpers are GPL-only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
