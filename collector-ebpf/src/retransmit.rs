//! `tcp:tcp_retransmit_skb`: a SYN retransmit. Runs in the timer softirq, so nothing about
//! the current task belongs to the application.
//!
//! A BTF tracepoint where the kernel has BTF, as `attempt` explains: the timer softirq
//! often interrupts another program on its CPU (a `connect()` entry or return on a busy
//! host, any agent's), and the kernel skips a classic tracepoint program whenever any such
//! program is running there, losing the retransmit.

use aya_ebpf::{
    macros::{btf_tracepoint, tracepoint},
    programs::{BtfTracePointContext, TracePointContext},
};
use synspan_shared::{MAX_RETRANSMIT_TIMES, attempt_flags, tcp_state};

use crate::{
    helpers::{now_ns, read_event, read_kernel_at},
    maps::{in_flight, layout, note_error, remember_tuple},
};

/// `tcp_retransmit_skb(sk, skb, err)`: the socket's state and port are read from it.
#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub(crate) fn tcp_retransmit_skb(ctx: BtfTracePointContext) -> u32 {
    let sock = ctx.arg::<u64>(0);
    let f = layout().tuple;
    if let Ok(state) = read_kernel_at::<u8>(sock, f.state) {
        let sport = read_kernel_at::<u16>(sock, f.sport).map(u16::from_be);
        on_retransmit(sock, state, sport.ok());
    }
    0
}

/// `tcp_retransmit_skb` for kernels without BTF: the event carries state and port.
#[tracepoint(category = "tcp", name = "tcp_retransmit_skb")]
pub(crate) fn tcp_retransmit_skb_tp(ctx: TracePointContext) -> u32 {
    let fields = layout().retransmit;
    if let (Ok(sock), Ok(state)) = (
        read_event::<u64>(&ctx, fields.skaddr),
        read_event::<i32>(&ctx, fields.state),
    ) {
        on_retransmit(sock, state as u8, read_event::<u16>(&ctx, fields.sport).ok());
    }
    0
}

#[inline(always)]
fn on_retransmit(sock: u64, state: u8, sport: Option<u16>) {
    if state != tcp_state::SYN_SENT {
        return;
    }
    let Some(attempt) = in_flight(sock) else {
        return;
    };
    let now = now_ns();
    let n = attempt.retransmits as usize;
    if n < MAX_RETRANSMIT_TIMES {
        attempt.retransmit_ns[n] = now;
    } else {
        attempt.flags |= attempt_flags::RETRANSMIT_TIMES_TRUNCATED;
    }
    attempt.retransmits += 1;
    note_error(attempt, sock, now);
    if let Some(sport) = sport
        && sport != attempt.sport
    {
        attempt.sport = sport;
        remember_tuple(attempt, sport);
    }
}
