//! `inet_sk_error_report` as a BTF tracepoint: its classic twin carries the errno but not the
//! socket address, and the socket address is what finds the attempt.

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};

use crate::{
    helpers::now_ns,
    maps::{in_flight, note_error},
};

#[btf_tracepoint(function = "inet_sk_error_report")]
pub(crate) fn inet_sk_error_report(ctx: BtfTracePointContext) -> u32 {
    let sock: u64 = ctx.arg::<*const u8>(0) as u64;
    if let Some(attempt) = in_flight(sock) {
        note_error(attempt, sock, now_ns());
    }
    0
}
