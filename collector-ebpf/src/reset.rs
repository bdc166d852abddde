//! `tcp:tcp_receive_reset` and `tcp:tcp_send_reset`. A socket found in the in-flight map is
//! still in SYN_SENT, so neither needs the state. BTF tracepoints where the kernel has BTF,
//! for the reason `retransmit` gives: both run in softirqs.

use aya_ebpf::{
    macros::{btf_tracepoint, tracepoint},
    programs::{BtfTracePointContext, TracePointContext},
};
use synspan_shared::attempt_flags;

use crate::{
    helpers::{now_ns, read_event, read_sock_field},
    maps::{COLLISION_WATCH, WATCH_SINCE, in_flight, layout, local_endpoint},
};

/// `tcp_receive_reset(sk)`.
#[btf_tracepoint(function = "tcp_receive_reset")]
pub(crate) fn tcp_receive_reset(ctx: BtfTracePointContext) -> u32 {
    mark(ctx.arg::<u64>(0), attempt_flags::RST_RECEIVED);
    0
}

/// The client resets in SYN_SENT when its SYN is answered by an ACK for data it never
/// sent: the SYN met an existing connection. `tcp_send_reset(sk, skb, reason)`; `sk` is
/// NULL for a reset sent on no socket's behalf.
#[btf_tracepoint(function = "tcp_send_reset")]
pub(crate) fn tcp_send_reset(ctx: BtfTracePointContext) -> u32 {
    mark(ctx.arg::<u64>(0), attempt_flags::RST_SENT);
    0
}

/// `tcp_receive_reset` for kernels without BTF.
#[tracepoint(category = "tcp", name = "tcp_receive_reset")]
pub(crate) fn tcp_receive_reset_tp(ctx: TracePointContext) -> u32 {
    if let Ok(sock) = read_event::<u64>(&ctx, layout().receive_reset.skaddr) {
        mark(sock, attempt_flags::RST_RECEIVED);
    }
    0
}

/// `tcp_send_reset` for kernels without BTF.
#[tracepoint(category = "tcp", name = "tcp_send_reset")]
pub(crate) fn tcp_send_reset_tp(ctx: TracePointContext) -> u32 {
    if let Ok(sock) = read_event::<u64>(&ctx, layout().send_reset.skaddr) {
        mark(sock, attempt_flags::RST_SENT);
    }
    0
}

#[inline(always)]
fn mark(sock: u64, flag: u8) {
    if sock == 0 {
        return;
    }
    let Some(attempt) = in_flight(sock) else {
        return;
    };
    let now = now_ns();
    // Keep the first time: that is when the attempt's fate turned.
    if attempt.flags & flag == 0 {
        match flag {
            attempt_flags::RST_RECEIVED => attempt.rst_received_ns = now,
            _ => attempt.rst_sent_ns = now,
        }
    }
    attempt.flags |= flag;
    if flag == attempt_flags::RST_SENT {
        // The port is chosen by now (a SYN went out), even if no retransmit has told us yet.
        if attempt.sport == 0 {
            attempt.sport = read_sock_field(sock, layout().sock.skc_num);
        }
        if attempt.sport != 0 {
            let _ = COLLISION_WATCH.insert(&local_endpoint(attempt), &sock, 0);
            let _ = WATCH_SINCE.set(0, &now, 0);
        }
    }
}
