//! synspan's kernel programs: one module per hook, sharing the maps (`maps`), the safe
//! helper calls (`helpers`) and the reading of who made an attempt (`caller`).
//!
//! An attempt is born when a TCP socket enters SYN_SENT (`attempt::attempt_start`), gathers
//! retransmits, resets and errors while it waits, and is handed to the agent in one
//! ring-buffer record when the socket leaves SYN_SENT.
//!
//! The agent attaches each program by its function's name, as `synspan_shared::names`
//! spells it: aya's program macros take no constant for it. The agent's tests parse the
//! built object and check every name it uses.
#![no_std]
#![no_main]
// For the one atomic add core does not offer on this target (see `maps::count`).
#![feature(asm_experimental_arch)]

mod attempt;
mod caller;
mod connect;
mod drop;
mod error_report;
mod helpers;
mod maps;
mod reset;
mod retransmit;
mod thread_context;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// bpf_probe_read_kernel and the stack helpers are GPL-only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
