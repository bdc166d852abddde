//! `inet_sk_error_report` as a BTF tracepoint: its classic twin carries the errno but not the
//! socket address, and the socket address is what finds the attempt.

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::btf_tracepoint, programs::BtfTracePointContext};

use crate::maps::{IN_FLIGHT, note_error};

#[btf_tracepoint(function = "inet_sk_error_report")]
pub fn inet_sk_error_report(ctx: BtfTracePointContext) -> u32 {
    let sock: u64 = ctx.arg::<*const u8>(0) as u64;
    if let Some(attempt) = IN_FLIGHT.get_ptr_mut(&sock) {
        note_error(unsafe { &mut *attempt }, sock, unsafe { bpf_ktime_get_ns() });
    }
    0
}
