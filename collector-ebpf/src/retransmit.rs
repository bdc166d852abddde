//! `tcp:tcp_retransmit_skb`: a SYN retransmit. Runs in the timer softirq, so nothing about
//! the current task belongs to the application.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use synspan_shared::{MAX_RETRANSMIT_TIMES, attempt_flags, tcp_state};

use crate::{
    helpers::{now_ns, read_event},
    maps::{in_flight, layout, note_error, remember_tuple},
};

#[tracepoint(category = "tcp", name = "tcp_retransmit_skb")]
pub(crate) fn tcp_retransmit_skb(ctx: TracePointContext) -> u32 {
    let _ = on_retransmit(&ctx);
    0
}

#[inline(always)]
fn on_retransmit(ctx: &TracePointContext) -> Result<(), i32> {
    let fields = layout().retransmit;
    let state: i32 = read_event(ctx, fields.state)?;
    if state != tcp_state::SYN_SENT as i32 {
        return Ok(());
    }
    let sock: u64 = read_event(ctx, fields.skaddr)?;
    let Some(attempt) = in_flight(sock) else {
        return Ok(());
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
    if let Ok(sport) = read_event::<u16>(ctx, fields.sport)
        && sport != attempt.sport
    {
        attempt.sport = sport;
        remember_tuple(attempt, sport);
    }
    Ok(())
}
