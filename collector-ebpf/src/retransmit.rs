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

/// `-EBUSY` as `__tcp_retransmit_skb` returns it for a packet still in the host's queue.
const EBUSY: i32 = 16;

/// `tcp_retransmit_skb(sk, skb, err)`: the socket's state and port are read from it.
#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub(crate) fn tcp_retransmit_skb(ctx: BtfTracePointContext) -> u32 {
    let err = ctx.arg::<i64>(2) as i32;
    from_btf(ctx.arg::<u64>(0), err);
    0
}

/// `tcp_retransmit_skb(sk, skb)` on kernels that report only the retransmits they sent.
#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub(crate) fn tcp_retransmit_skb_without_err(ctx: BtfTracePointContext) -> u32 {
    from_btf(ctx.arg::<u64>(0), 0);
    0
}

#[inline(always)]
fn from_btf(sock: u64, err: i32) {
    let f = layout().tuple;
    if let Ok(state) = read_kernel_at::<u8>(sock, f.state) {
        let sport = read_kernel_at::<u16>(sock, f.sport).map(u16::from_be);
        on_retransmit(sock, state, sport.ok(), err);
    }
}

/// `tcp_retransmit_skb` for kernels without BTF: the event carries state and port, and on
/// recent kernels the result.
#[tracepoint(category = "tcp", name = "tcp_retransmit_skb")]
pub(crate) fn tcp_retransmit_skb_tp(ctx: TracePointContext) -> u32 {
    let fields = layout().retransmit;
    if let (Ok(sock), Ok(state)) = (
        read_event::<u64>(&ctx, fields.skaddr),
        read_event::<i32>(&ctx, fields.state),
    ) {
        let err = match fields.err {
            0 => 0,
            at => read_event::<i32>(&ctx, at).unwrap_or(0),
        };
        on_retransmit(sock, state as u8, read_event::<u16>(&ctx, fields.sport).ok(), err);
    }
    0
}

#[inline(always)]
fn on_retransmit(sock: u64, state: u8, sport: Option<u16>, err: i32) {
    if state != tcp_state::SYN_SENT {
        return;
    }
    let Some(attempt) = in_flight(sock) else {
        return;
    };
    // The timer fired while the last SYN was still queued in this host: the kernel sent
    // nothing and tries again at the next timeout. Any other failure was a SYN built and
    // handed on (netfilter dropping it says so as a drop), and counts.
    if err == -EBUSY {
        attempt.retransmits_held = attempt.retransmits_held.saturating_add(1);
        return;
    }
    let now = now_ns();
    let n = attempt.retransmits as usize;
    if n < MAX_RETRANSMIT_TIMES {
        attempt.retransmit_ns[n] = now;
    } else {
        attempt.flags |= attempt_flags::RETRANSMIT_TIMES_TRUNCATED;
    }
    attempt.retransmits = attempt.retransmits.saturating_add(1);
    note_error(attempt, sock, now);
    if let Some(sport) = sport
        && sport != attempt.sport
    {
        attempt.sport = sport;
        remember_tuple(attempt, sport);
    }
}
