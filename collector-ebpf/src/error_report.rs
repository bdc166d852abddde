//! `inet_sk_error_report` as a BTF tracepoint: its classic twin carries the errno but not the
//! socket address, and the socket address is what finds the attempt.

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::btf_tracepoint, programs::BtfTracePointContext};
use synspan_shared::attempt_flags;

use crate::maps::{IN_FLIGHT, layout, sock_int};

#[btf_tracepoint(function = "inet_sk_error_report")]
pub fn inet_sk_error_report(ctx: BtfTracePointContext) -> u32 {
    let sock: u64 = ctx.arg::<*const u8>(0) as u64;
    let Some(attempt) = IN_FLIGHT.get_ptr_mut(&sock) else {
        return 0;
    };
    let error = sock_int(sock, layout().sock.sk_err);
    // error 0 comes from soft ICMP errors and the disconnect path: nothing to report.
    if error == 0 {
        return 0;
    }
    let attempt = unsafe { &mut *attempt };
    attempt.reported_error = error;
    attempt.error_report_ns = unsafe { bpf_ktime_get_ns() };
    attempt.flags |= attempt_flags::ERROR_REPORTED;
    0
}
