//! `tcp:tcp_receive_reset` and `tcp:tcp_send_reset`. A socket found in the in-flight map is
//! still in SYN_SENT, so neither needs the state.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use synspan_shared::attempt_flags;

use crate::{
    helpers::{now_ns, read_event, read_sock_field},
    maps::{COLLISION_WATCH, WATCH_SINCE, in_flight, layout, local_endpoint},
};

#[tracepoint(category = "tcp", name = "tcp_receive_reset")]
pub(crate) fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    mark(&ctx, layout().receive_reset.skaddr, attempt_flags::RST_RECEIVED);
    0
}

/// The client resets in SYN_SENT when its SYN is answered by an ACK for data it never
/// sent: the SYN met an existing connection.
#[tracepoint(category = "tcp", name = "tcp_send_reset")]
pub(crate) fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    mark(&ctx, layout().send_reset.skaddr, attempt_flags::RST_SENT);
    0
}

#[inline(always)]
fn mark(ctx: &TracePointContext, skaddr_offset: u16, flag: u8) {
    let Ok(sock) = read_event::<u64>(ctx, skaddr_offset) else {
        return;
    };
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
