//! `tcp:tcp_retransmit_skb`: a SYN retransmit. Runs in the timer softirq, so nothing about
//! the current task belongs to the application.

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::tracepoint, programs::TracePointContext};
use synspan_shared::{MAX_RETRANSMIT_TIMES, attempt_flags, tcp_state};

use crate::maps::{IN_FLIGHT, layout, note_error};

#[tracepoint(category = "tcp", name = "tcp_retransmit_skb")]
pub fn tcp_retransmit_skb(ctx: TracePointContext) -> u32 {
    let _ = on_retransmit(&ctx);
    0
}

#[inline(always)]
fn on_retransmit(ctx: &TracePointContext) -> Result<(), i32> {
    let fields = layout().retransmit;
    let state: i32 = unsafe { ctx.read_at(fields.state as usize)? };
    if state != tcp_state::SYN_SENT as i32 {
        return Ok(());
    }
    let sock: u64 = unsafe { ctx.read_at(fields.skaddr as usize)? };
    let Some(attempt) = IN_FLIGHT.get_ptr_mut(&sock) else {
        return Ok(());
    };
    let attempt = unsafe { &mut *attempt };
    let now = unsafe { bpf_ktime_get_ns() };
    let n = attempt.retransmits as usize;
    if n < MAX_RETRANSMIT_TIMES {
        attempt.retransmit_ns[n] = now;
    } else {
        attempt.flags |= attempt_flags::RETRANSMIT_TIMES_TRUNCATED;
    }
    attempt.retransmits += 1;
    note_error(attempt, sock, now);
    if let Ok(sport) = unsafe { ctx.read_at::<u16>(fields.sport as usize) } {
        attempt.sport = sport;
    }
    Ok(())
}
