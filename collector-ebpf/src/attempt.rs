//! `inet_sock_set_state`: where an attempt starts and ends.
//!
//! Two programs, one for each end of an attempt, attached as BTF tracepoints where the
//! kernel has BTF, else as classic tracepoints. The difference matters under load: the kernel
//! runs classic tracepoint and kprobe programs only when no other such program is running on
//! the CPU, and an attempt's SYN-ACK or RST is often processed in a softirq that interrupts
//! another attempt's start (and its stack walk) there. A skipped start loses the attempt; a
//! skipped end leaves it in flight for good. BTF tracepoint programs are only kept from
//! running inside themselves, and the start and the end are two programs.

use aya_ebpf::{
    EbpfContext,
    bindings::BPF_F_REUSE_STACKID,
    helpers::{bpf_get_current_pid_tgid, bpf_get_prandom_u32},
    macros::{btf_tracepoint, tracepoint},
    maps::lpm_trie::Key,
    programs::{BtfTracePointContext, TracePointContext, tracing::StackIdContext},
};
use synspan_shared::{
    AF_INET, AttemptRecord, Endpoint, IPPROTO_TCP, ProcessNote, attempt_flags, counter, filter, handoff,
    tcp_state,
};

use crate::{
    caller,
    helpers::{now_ns, read_event, read_kernel_at, read_sock_field},
    maps::{
        ALLOW_CGROUPS, ALLOW_DESTS, ALLOW_PIDS, ALLOW_PORTS, COLLISION_WATCH, CONNECT_CALLS, IN_FLIGHT,
        NOTED, PROCESS_NOTES, STACKS, WATCH_SINCE, WATCH_WINDOW_NS, count, count_series, forget_tuples,
        handoff_set, in_flight, layout, local_endpoint, policy, record_error, remember_tuple,
        scratch_attempt, send, series_key, track_live, within_span_rate,
    },
    thread_context,
};

/// A socket enters SYN_SENT.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub(crate) fn attempt_start(ctx: BtfTracePointContext) -> u32 {
    let _ = on_start(&ctx);
    0
}

/// A socket leaves SYN_SENT, or a lingering connection closes.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub(crate) fn attempt_end(ctx: BtfTracePointContext) -> u32 {
    let _ = on_end(&ctx);
    0
}

/// `attempt_start` for kernels without BTF.
#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub(crate) fn attempt_start_tp(ctx: TracePointContext) -> u32 {
    let _ = on_start(&ctx);
    0
}

/// `attempt_end` for kernels without BTF.
#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub(crate) fn attempt_end_tp(ctx: TracePointContext) -> u32 {
    let _ = on_end(&ctx);
    0
}

/// One `inet_sock_set_state(sk, oldstate, newstate)`, as either kind of program sees it.
trait StateChange: StackIdContext {
    fn sock(&self) -> Result<u64, i32>;
    fn oldstate(&self) -> Result<i32, i32>;
    fn newstate(&self) -> Result<i32, i32>;
    fn protocol(&self) -> Result<u16, i32>;
    /// The local port, host order. 0 at SYN_SENT: the kernel picks it just after.
    fn sport(&self) -> Result<u16, i32>;
    /// Family, ports and addresses.
    fn tuple(&self) -> Result<Tuple, i32>;
}

/// A connection's endpoints as the state change shows them. Built on the stack: the
/// lingering-close path runs in a softirq that may interrupt an attempt's start on the same
/// CPU, and must not touch the per-CPU scratch record that start is filling in.
#[derive(Clone, Copy, Default)]
struct Tuple {
    family: u16,
    sport: u16,
    dport: u16,
    saddr: [u8; 16],
    daddr: [u8; 16],
}

/// The BTF tracepoint gets the call's arguments; the rest comes from the socket.
impl StateChange for BtfTracePointContext {
    #[inline(always)]
    fn sock(&self) -> Result<u64, i32> {
        Ok(self.arg::<u64>(0))
    }

    #[inline(always)]
    fn oldstate(&self) -> Result<i32, i32> {
        Ok(self.arg::<i32>(1))
    }

    #[inline(always)]
    fn newstate(&self) -> Result<i32, i32> {
        Ok(self.arg::<i32>(2))
    }

    #[inline(always)]
    fn protocol(&self) -> Result<u16, i32> {
        read_kernel_at(self.sock()?, layout().tuple.protocol)
    }

    #[inline(always)]
    fn sport(&self) -> Result<u16, i32> {
        Ok(u16::from_be(read_kernel_at(self.sock()?, layout().tuple.sport)?))
    }

    #[inline(always)]
    fn tuple(&self) -> Result<Tuple, i32> {
        let sock = self.sock()?;
        let f = layout().tuple;
        let mut t = Tuple {
            family: read_kernel_at(sock, f.family)?,
            sport: u16::from_be(read_kernel_at(sock, f.sport)?),
            dport: u16::from_be(read_kernel_at(sock, f.dport)?),
            ..Tuple::default()
        };
        if t.family == AF_INET {
            let s: [u8; 4] = read_kernel_at(sock, f.rcv_saddr)?;
            let d: [u8; 4] = read_kernel_at(sock, f.daddr)?;
            t.saddr[..4].copy_from_slice(&s);
            t.daddr[..4].copy_from_slice(&d);
        } else {
            t.saddr = read_kernel_at(sock, f.v6_rcv_saddr)?;
            t.daddr = read_kernel_at(sock, f.v6_daddr)?;
        }
        Ok(t)
    }
}

/// The classic tracepoint reads its event, at the offsets tracefs gave.
impl StateChange for TracePointContext {
    #[inline(always)]
    fn sock(&self) -> Result<u64, i32> {
        read_event(self, layout().set_state.skaddr)
    }

    #[inline(always)]
    fn oldstate(&self) -> Result<i32, i32> {
        read_event(self, layout().set_state.oldstate)
    }

    #[inline(always)]
    fn newstate(&self) -> Result<i32, i32> {
        read_event(self, layout().set_state.newstate)
    }

    #[inline(always)]
    fn protocol(&self) -> Result<u16, i32> {
        read_event(self, layout().set_state.protocol)
    }

    #[inline(always)]
    fn sport(&self) -> Result<u16, i32> {
        read_event(self, layout().set_state.sport)
    }

    #[inline(always)]
    fn tuple(&self) -> Result<Tuple, i32> {
        let f = layout().set_state;
        let mut t = Tuple {
            family: read_event(self, f.family)?,
            sport: read_event(self, f.sport)?,
            dport: read_event(self, f.dport)?,
            ..Tuple::default()
        };
        if t.family == AF_INET {
            let s: [u8; 4] = read_event(self, f.saddr)?;
            let d: [u8; 4] = read_event(self, f.daddr)?;
            t.saddr[..4].copy_from_slice(&s);
            t.daddr[..4].copy_from_slice(&d);
        } else {
            t.saddr = read_event(self, f.saddr_v6)?;
            t.daddr = read_event(self, f.daddr_v6)?;
        }
        Ok(t)
    }
}

#[inline(always)]
fn on_start<C: StateChange>(ctx: &C) -> Result<(), i32> {
    // Every TCP state change on the host lands here: leave as early as possible.
    if ctx.newstate()? != tcp_state::SYN_SENT as i32 || ctx.protocol()? != IPPROTO_TCP {
        return Ok(());
    }
    start(ctx, ctx.sock()?)
}

#[inline(always)]
fn on_end<C: StateChange>(ctx: &C) -> Result<(), i32> {
    let oldstate = ctx.oldstate()?;
    if oldstate != tcp_state::SYN_SENT as i32 {
        if lingering(oldstate) && ctx.newstate()? == tcp_state::CLOSE as i32 {
            return on_lingering_close(ctx, oldstate as u8);
        }
        return Ok(());
    }
    if ctx.protocol()? != IPPROTO_TCP {
        return Ok(());
    }
    finish(ctx, ctx.sock()?, ctx.newstate()? as u8)
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
fn on_lingering_close<C: StateChange>(ctx: &C, state: u8) -> Result<(), i32> {
    let watching_since = WATCH_SINCE.get(0).copied().unwrap_or(0);
    if watching_since == 0 || now_ns() - watching_since > WATCH_WINDOW_NS {
        return Ok(());
    }
    if ctx.protocol()? != IPPROTO_TCP {
        return Ok(());
    }
    let closing = ctx.tuple()?;
    let peer = Endpoint {
        addr: closing.daddr,
        port: closing.dport,
        family: closing.family,
    };
    // SAFETY: the value is copied at once. An entry evicted and reused meanwhile gives
    // another watched socket, whose attempt then gets a collision it did not have: it takes
    // 4096 attempts resetting connections at once.
    let Some(sock) = (unsafe { COLLISION_WATCH.get(&peer) }).copied() else {
        return Ok(());
    };
    let _ = COLLISION_WATCH.remove(&peer);
    let Some(attempt) = in_flight(sock) else {
        return Ok(());
    };
    attempt.collision_ns = now_ns();
    attempt.collision_local = closing.saddr;
    attempt.collision_local_port = closing.sport;
    attempt.collision_peer = closing.daddr;
    attempt.collision_peer_port = closing.dport;
    attempt.collision_state = state;
    attempt.flags |= attempt_flags::COLLISION;
    Ok(())
}

/// Runs in the context of whoever moved the socket to SYN_SENT, usually the application
/// inside `connect()`: the only moment its identity is at hand.
#[inline(always)]
fn start<C: StateChange>(ctx: &C, sock: u64) -> Result<(), i32> {
    let attempt = scratch_attempt().ok_or(0)?;
    attempt.sock = sock;
    attempt.start_ns = now_ns();
    let pid_tgid = bpf_get_current_pid_tgid();
    if caller::is_agent(pid_tgid) {
        return Ok(());
    }
    caller::identify(attempt, pid_tgid);
    let tuple = ctx.tuple()?;
    attempt.family = tuple.family;
    attempt.sport = tuple.sport;
    attempt.dport = tuple.dport;
    attempt.saddr = tuple.saddr;
    attempt.daddr = tuple.daddr;
    // Claimed before the policy can drop the attempt: the call has reached SYN_SENT, so it
    // must not look like one that never did when it returns.
    let call = CONNECT_CALLS.get_ptr_mut(&attempt.tid);
    if let Some(call) = call {
        // SAFETY: this thread's own call: only its own syscall path (entry, this state
        // change, return) writes it, one step after the other. An entry evicted and reused
        // meanwhile is another thread's, which then looks as if it reached SYN_SENT.
        unsafe { (*call).sock = sock };
    }
    let policy = policy();
    if policy.filters != 0 && !allowed(attempt, policy.filters) {
        count(counter::NOT_ALLOWED);
        return Ok(());
    }
    thread_context::read(attempt);
    if policy.stacks != 0 {
        if call.is_some() {
            // Walked when the call returns, if the attempt is still worth it then: see
            // `handoff`. Fast successes dropped by the policy never pay for it.
            attempt.user_stack_id = -1;
            attempt.handoff = handoff::STACKS_PENDING;
        } else {
            caller::record_stacks(ctx, attempt, false);
        }
    }
    // The port is 0 here unless the socket was bound: the drop program then finds the
    // attempt's packets by this entry and the socket's port (see `drop.rs`).
    remember_tuple(attempt, attempt.sport);
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
    } else {
        track_live(true);
    }
    count(counter::STARTED);
    // With the stack still to come, the note is the process's alone: its identity, read
    // while it is surely alive. The code path follows when the stack is taken.
    note_process(ctx, attempt, policy.stacks != 0);
    Ok(())
}

/// Tells the agent about a process (and user stack) it has not heard of, while the process
/// is alive for sure. A lost note only costs enrichment, so its loss is not counted. The note
/// also carries what names the process and its frames without `/proc`, for a process that
/// exits before the agent reads it: only a process's first attempts from each stack pay for
/// that, since steady state sends no notes.
#[inline(always)]
pub(crate) fn note_process<C: EbpfContext>(ctx: &C, attempt: &AttemptRecord, with_stack: bool) {
    let key = (u64::from(attempt.pid) << 32) | u64::from(attempt.user_stack_id as u32);
    // SAFETY: only whether the entry exists is looked at, not the value.
    if unsafe { NOTED.get(&key) }.is_some() {
        return;
    }
    let Some(mut entry) = PROCESS_NOTES.reserve::<ProcessNote>(0) else {
        return;
    };
    let note = entry.as_mut_ptr();
    // SAFETY: `note` points at the reserved entry, as large as a ProcessNote and ours until
    // submitted; the fields are written through it, never read before they are.
    unsafe {
        (*note).pid = attempt.pid;
        (*note).user_stack_id = attempt.user_stack_id;
        caller::describe_vanishing(
            ctx,
            &mut (*note).vanishing,
            with_stack && attempt.user_stack_id >= 0,
        );
    }
    entry.submit(0);
    let _ = NOTED.insert(&key, &1, 0);
}

/// Every allow-list the policy names must contain the attempt.
#[inline(always)]
pub(crate) fn allowed(attempt: &AttemptRecord, filters: u8) -> bool {
    // SAFETY: only whether the entries exist is looked at. The agent fills the allow-lists
    // before it attaches the programs and never writes them again.
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
fn finish<C: StateChange>(ctx: &C, sock: u64, end_state: u8) -> Result<(), i32> {
    let Some(attempt) = in_flight(sock) else {
        count(counter::UNTRACKED_FINISH);
        return Ok(());
    };
    count(counter::FINISHED);
    attempt.end_ns = now_ns();
    attempt.end_state = end_state;
    // The source port is only known now: the kernel sets SYN_SENT before it picks the
    // ephemeral port. The addresses were set before SYN_SENT and read then.
    if let Ok(port) = ctx.sport() {
        attempt.sport = port;
    }
    let sock_fields = layout().sock;
    attempt.error = read_sock_field(sock, sock_fields.sk_err);
    attempt.soft_error = read_sock_field(sock, sock_fields.sk_err_soft);
    record_error(attempt, attempt.error, attempt.soft_error, attempt.end_ns);
    let series = series_key(attempt);
    count_series(&series, attempt);

    let policy = policy();
    let mut parked = false;
    if !keep(attempt, &policy) {
        count(counter::FILTERED);
    } else if !within_span_rate(&series, attempt.end_ns) {
        count(counter::RATE_LIMITED);
    } else {
        // A success always ends on the same path (the SYN-ACK arriving), and so does a
        // refusal (the RST arriving); the stack is worth its cost only for attempts that
        // ended some other way: a timer, the application, an ICMP error.
        if policy.stacks != 0
            && end_state != tcp_state::ESTABLISHED
            && attempt.flags & attempt_flags::RST_RECEIVED == 0
        {
            attempt.end_kernel_stack_id = ctx
                .get_stackid(&STACKS, BPF_F_REUSE_STACKID as u64)
                .map_or(-1, |id| id as i32);
        }
        // Still inside its `connect()`, which takes the user stack on its way out: the
        // return sends the attempt. Unless it has just done so on another CPU.
        parked = attempt.handoff & handoff::STACKS_PENDING != 0
            && handoff_set(attempt, handoff::PARKED) & handoff::STACKS_PENDING != 0;
        if !parked {
            send(attempt);
        }
    }
    if attempt.flags & attempt_flags::RST_SENT != 0 {
        let _ = COLLISION_WATCH.remove(&local_endpoint(attempt));
    }
    forget_tuples(attempt);
    if !parked && IN_FLIGHT.remove(&sock).is_ok() {
        track_live(false);
    }
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
    // SAFETY: takes no arguments and only draws from the kernel's generator.
    unsafe { bpf_get_prandom_u32() < policy.sample_below }
}
