//! `sock:inet_sock_set_state`: where an attempt starts and ends.

use aya_ebpf::{
    bindings::{BPF_F_REUSE_STACKID, BPF_F_USER_STACK},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_prandom_u32,
        bpf_ktime_get_ns,
    },
    macros::tracepoint,
    maps::lpm_trie::Key,
    programs::{TracePointContext, tracing::StackIdContext},
};
use synspan_shared::{
    AF_INET, AttemptRecord, Endpoint, IPPROTO_TCP, ProcessNote, SetStateFields, attempt_flags, counter,
    filter, tcp_state,
};

use crate::maps::{
    ALLOW_CGROUPS, ALLOW_DESTS, ALLOW_PIDS, ALLOW_PORTS, ATTEMPTS, COLLISION_WATCH, CONNECT_CALLS, IN_FLIGHT,
    NOTED, PROCESS_NOTES, SCRATCH, STACKS, WATCH_SINCE, WATCH_WINDOW_NS, count, layout, local_endpoint,
    policy, record_error, sock_int, wakeup_flags,
};

// Two programs on one tracepoint, not one: the kernel will not run a program on a CPU where
// it is already running. An attempt's SYN-ACK or RST is often processed in a softirq that
// interrupts another attempt's start (and its stack walks) on the same CPU; were both one
// program, that end would be skipped and its attempt would never finish.

/// A socket enters SYN_SENT.
#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn attempt_start(ctx: TracePointContext) -> u32 {
    let _ = on_start(&ctx);
    0
}

/// A socket leaves SYN_SENT, or a lingering connection closes.
#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn attempt_end(ctx: TracePointContext) -> u32 {
    let _ = on_end(&ctx);
    0
}

#[inline(always)]
fn read<T>(ctx: &TracePointContext, offset: u16) -> Result<T, i32> {
    unsafe { ctx.read_at::<T>(offset as usize) }
}

#[inline(always)]
fn on_start(ctx: &TracePointContext) -> Result<(), i32> {
    let fields = layout().set_state;
    // Every TCP state change on the host lands here: leave as early as possible.
    if read::<i32>(ctx, fields.newstate)? != tcp_state::SYN_SENT as i32
        || read::<u16>(ctx, fields.protocol)? != IPPROTO_TCP
    {
        return Ok(());
    }
    start(ctx, &fields, read(ctx, fields.skaddr)?)
}

#[inline(always)]
fn on_end(ctx: &TracePointContext) -> Result<(), i32> {
    let fields = layout().set_state;
    let oldstate: i32 = read(ctx, fields.oldstate)?;
    if oldstate != tcp_state::SYN_SENT as i32 {
        if lingering(oldstate) && read::<i32>(ctx, fields.newstate)? == tcp_state::CLOSE as i32 {
            return on_lingering_close(ctx, &fields, oldstate as u8);
        }
        return Ok(());
    }
    if read::<u16>(ctx, fields.protocol)? != IPPROTO_TCP {
        return Ok(());
    }
    let newstate: i32 = read(ctx, fields.newstate)?;
    finish(ctx, &fields, read(ctx, fields.skaddr)?, newstate as u8)
}

/// States in which a connection outlives its use and can still answer a SYN for its tuple.
#[inline(always)]
fn lingering(state: i32) -> bool {
    const LINGERING: [u8; 5] = [
        tcp_state::FIN_WAIT1,
        tcp_state::FIN_WAIT2,
        tcp_state::CLOSE_WAIT,
        tcp_state::LAST_ACK,
        tcp_state::CLOSING,
    ];
    LINGERING.iter().any(|&s| s as i32 == state)
}

/// A lingering connection closes. If its peer is the local endpoint of an attempt that just
/// reset a connection it met in SYN_SENT, this is that connection: record it on the attempt.
/// The evidence exists only now; a moment later the socket is gone.
#[inline(always)]
fn on_lingering_close(ctx: &TracePointContext, fields: &SetStateFields, state: u8) -> Result<(), i32> {
    let watching_since = WATCH_SINCE.get(0).copied().unwrap_or(0);
    if watching_since == 0 || unsafe { bpf_ktime_get_ns() } - watching_since > WATCH_WINDOW_NS {
        return Ok(());
    }
    if read::<u16>(ctx, fields.protocol)? != IPPROTO_TCP {
        return Ok(());
    }
    let scratch = SCRATCH.get_ptr_mut(0).ok_or(0)?;
    let closing = unsafe { &mut *scratch };
    read_tuple(ctx, fields, closing)?;
    let peer = Endpoint {
        addr: closing.daddr,
        port: closing.dport,
        family: closing.family,
    };
    let Some(sock) = (unsafe { COLLISION_WATCH.get(&peer) }).copied() else {
        return Ok(());
    };
    let _ = COLLISION_WATCH.remove(&peer);
    let Some(attempt) = IN_FLIGHT.get_ptr_mut(&sock) else {
        return Ok(());
    };
    let attempt = unsafe { &mut *attempt };
    attempt.collision_ns = unsafe { bpf_ktime_get_ns() };
    attempt.collision_local = closing.saddr;
    attempt.collision_local_port = closing.sport;
    attempt.collision_peer = closing.daddr;
    attempt.collision_peer_port = closing.dport;
    attempt.collision_state = state;
    attempt.flags |= attempt_flags::COLLISION;
    Ok(())
}

/// Runs inside the application's own `connect()`: the only moment its identity is at hand.
#[inline(always)]
fn start(ctx: &TracePointContext, fields: &SetStateFields, sock: u64) -> Result<(), i32> {
    let attempt = SCRATCH.get_ptr_mut(0).ok_or(0)?;
    let attempt = unsafe { &mut *attempt };
    *attempt = AttemptRecord::ZERO;
    attempt.sock = sock;
    attempt.start_ns = unsafe { bpf_ktime_get_ns() };
    let pid_tgid = bpf_get_current_pid_tgid();
    let policy = policy();
    // The agent's own connections (to its collector) are not traced: each would be one
    // more span to export, and the agent reports their failures itself.
    if (pid_tgid >> 32) as u32 == policy.agent_tgid {
        return Ok(());
    }
    attempt.pid = (pid_tgid >> 32) as u32;
    attempt.tid = pid_tgid as u32;
    attempt.comm = bpf_get_current_comm().unwrap_or([0; 16]);
    attempt.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    read_tuple(ctx, fields, attempt)?;
    // Claimed before the policy can drop the attempt: the call has reached SYN_SENT, so it
    // must not look like one that never did when it returns.
    let call = CONNECT_CALLS.get_ptr_mut(&attempt.tid);
    if let Some(call) = call {
        unsafe { (*call).sock = sock };
    }
    if policy.filters != 0 && !allowed(attempt, policy.filters) {
        count(counter::SKIPPED);
        return Ok(());
    }
    if policy.stacks != 0 {
        let flags = BPF_F_REUSE_STACKID as u64;
        // Inside connect(2) the kernel stack is always the syscall's path down to
        // tcp_v4_connect or tcp_v6_connect, and walking it costs more than the rest of the
        // attempt's tracing; it is taken where it tells something: sockets the kernel
        // connects itself, io_uring.
        if call.is_none() {
            attempt.kernel_stack_id = ctx.get_stackid(&STACKS, flags).map_or(-1, |id| id as i32);
        }
        attempt.user_stack_id = ctx
            .get_stackid(&STACKS, flags | BPF_F_USER_STACK as u64)
            .map_or(-1, |id| id as i32);
    }
    // BPF_NOEXIST first: an entry already there means the kernel reused the socket address
    // before we saw the old attempt end. That attempt is lost; the new one must not merge
    // into it.
    if IN_FLIGHT
        .insert(&sock, attempt, aya_ebpf::bindings::BPF_NOEXIST as u64)
        .is_err()
    {
        count(counter::REPLACED);
        if IN_FLIGHT.insert(&sock, attempt, 0).is_err() {
            count(counter::TRACK_FAILED);
            return Ok(());
        }
    }
    count(counter::STARTED);
    note_process(attempt);
    Ok(())
}

/// Tells the agent about a process (and user stack) it has not heard of, while the process
/// is alive for sure. A lost note only costs enrichment, so its loss is not counted.
#[inline(always)]
fn note_process(attempt: &AttemptRecord) {
    let key = (u64::from(attempt.pid) << 32) | u64::from(attempt.user_stack_id as u32);
    if unsafe { NOTED.get(&key) }.is_some() {
        return;
    }
    let note = ProcessNote {
        pid: attempt.pid,
        user_stack_id: attempt.user_stack_id,
    };
    if PROCESS_NOTES.output(&note, 0).is_ok() {
        let _ = NOTED.insert(&key, &1, 0);
    }
}

/// Every allow-list the policy names must contain the attempt.
#[inline(always)]
pub fn allowed(attempt: &AttemptRecord, filters: u8) -> bool {
    unsafe {
        if filters & filter::PID != 0 && ALLOW_PIDS.get(&attempt.pid).is_none() {
            return false;
        }
        if filters & filter::CGROUP != 0 && ALLOW_CGROUPS.get(&attempt.cgroup_id).is_none() {
            return false;
        }
        if filters & filter::PORT != 0 && ALLOW_PORTS.get(&attempt.dport).is_none() {
            return false;
        }
    }
    if filters & filter::DEST != 0 {
        let mut addr = attempt.daddr;
        if attempt.family == AF_INET {
            addr = [
                0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, addr[0], addr[1], addr[2], addr[3],
            ];
        }
        if ALLOW_DESTS.get(&Key::new(128, addr)).is_none() {
            return false;
        }
    }
    true
}

#[inline(always)]
fn read_tuple(
    ctx: &TracePointContext,
    fields: &SetStateFields,
    attempt: &mut AttemptRecord,
) -> Result<(), i32> {
    attempt.family = read(ctx, fields.family)?;
    attempt.sport = read(ctx, fields.sport)?;
    attempt.dport = read(ctx, fields.dport)?;
    if attempt.family == AF_INET {
        let s: [u8; 4] = read(ctx, fields.saddr)?;
        let d: [u8; 4] = read(ctx, fields.daddr)?;
        attempt.saddr[..4].copy_from_slice(&s);
        attempt.daddr[..4].copy_from_slice(&d);
    } else {
        attempt.saddr = read(ctx, fields.saddr_v6)?;
        attempt.daddr = read(ctx, fields.daddr_v6)?;
    }
    Ok(())
}

#[inline(always)]
fn finish(ctx: &TracePointContext, fields: &SetStateFields, sock: u64, end_state: u8) -> Result<(), i32> {
    let Some(attempt) = IN_FLIGHT.get_ptr_mut(&sock) else {
        count(counter::UNTRACKED_FINISH);
        return Ok(());
    };
    let attempt = unsafe { &mut *attempt };
    count(counter::FINISHED);
    attempt.end_ns = unsafe { bpf_ktime_get_ns() };
    attempt.end_state = end_state;
    // The source port is only known now: the kernel sets SYN_SENT before it picks the
    // ephemeral port. The addresses were set before SYN_SENT and read then.
    attempt.sport = read(ctx, fields.sport)?;
    let sock_fields = layout().sock;
    attempt.error = sock_int(sock, sock_fields.sk_err);
    attempt.soft_error = sock_int(sock, sock_fields.sk_err_soft);
    record_error(attempt, attempt.error, attempt.soft_error, attempt.end_ns);

    let policy = policy();
    if keep(attempt, &policy) {
        // A success always ends on the same path (the SYN-ACK arriving); the stack is worth
        // its cost only for attempts that ended some other way.
        if policy.stacks != 0 && end_state != tcp_state::ESTABLISHED {
            attempt.end_kernel_stack_id = ctx
                .get_stackid(&STACKS, BPF_F_REUSE_STACKID as u64)
                .map_or(-1, |id| id as i32);
        }
        match ATTEMPTS.reserve::<AttemptRecord>(0) {
            Some(mut entry) => {
                entry.write(*attempt);
                entry.submit(wakeup_flags(&ATTEMPTS));
            }
            None => count(counter::RINGBUF_FULL),
        }
    } else {
        count(counter::FILTERED);
    }
    if attempt.flags & attempt_flags::RST_SENT != 0 {
        let _ = COLLISION_WATCH.remove(&local_endpoint(attempt));
    }
    let _ = IN_FLIGHT.remove(&sock);
    Ok(())
}

/// The in-kernel policy: failures always leave; successes only when they are interesting
/// or sampled.
#[inline(always)]
fn keep(attempt: &AttemptRecord, policy: &synspan_shared::Policy) -> bool {
    if attempt.end_state != tcp_state::ESTABLISHED {
        return true;
    }
    if policy.sample_all != 0 {
        return true;
    }
    if policy.keep_retried != 0 && attempt.retransmits > 0 {
        return true;
    }
    if policy.slow_ns != 0 && attempt.end_ns.saturating_sub(attempt.start_ns) >= policy.slow_ns {
        return true;
    }
    unsafe { bpf_get_prandom_u32() < policy.sample_below }
}
