//! `syscalls:sys_enter_connect` and `sys_exit_connect`: what happens to a TCP `connect()`
//! outside SYN_SENT.
//!
//! - A `connect()` that fails before its socket reaches SYN_SENT (no route: ENETUNREACH)
//!   never shows in the socket's state changes; it becomes an attempt of its own here, with
//!   the calling thread's trace context, as an attempt that starts.
//! - An ICMP error that arrived while `connect()` held the socket was recorded only as a soft
//!   error; a non-blocking caller may read it (`SO_ERROR`, which clears it) and close the
//!   socket, so it is looked at when `connect()` returns.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_get_current_task},
    macros::tracepoint,
    programs::TracePointContext,
};
use synspan_shared::{
    AF_INET, AF_INET6, AttemptRecord, ConnectCall, IPPROTO_TCP, attempt_flags, counter, handoff,
};

use crate::{
    attempt::{allowed, note_process},
    caller,
    helpers::{now_ns, read_event, read_kernel, read_kernel_at, read_user_at},
    maps::{
        CONNECT_CALLS, IN_FLIGHT, count, count_series, handoff_clear, in_flight, layout, note_error, policy,
        scratch_attempt, send, series_key, track_live, within_span_rate,
    },
    thread_context,
};

const SOCK_STREAM: u16 = 1;

#[tracepoint(category = "syscalls", name = "sys_enter_connect")]
pub(crate) fn sys_enter_connect(ctx: TracePointContext) -> u32 {
    let _ = on_enter(&ctx);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_connect")]
pub(crate) fn sys_exit_connect(ctx: TracePointContext) -> u32 {
    let _ = on_exit(&ctx);
    0
}

/// Whether `fd` of the current task is a TCP socket, by walking the task's file table.
#[inline(always)]
fn is_tcp(fd: u64) -> Result<bool, i32> {
    let f = layout().fd_path;
    if f.sock_protocol == 0 {
        return Ok(false);
    }
    // SAFETY: takes no arguments; the task's address is only ever probe-read.
    let task = unsafe { bpf_get_current_task() };
    let files: u64 = read_kernel_at(task, f.task_files)?;
    let fdt: u64 = read_kernel_at(files, f.files_fdt)?;
    let fds: u64 = read_kernel_at(fdt, f.fdtable_fd)?;
    let file: u64 = read_kernel(fds + fd * 8)?;
    let socket: u64 = read_kernel_at(file, f.file_private_data)?;
    let sk: u64 = read_kernel_at(socket, f.socket_sk)?;
    let protocol: u16 = read_kernel_at(sk, f.sock_protocol)?;
    let kind: u16 = read_kernel_at(sk, f.sock_type)?;
    Ok(protocol == IPPROTO_TCP && kind == SOCK_STREAM)
}

#[inline(always)]
fn on_enter(ctx: &TracePointContext) -> Result<(), i32> {
    let fields = layout().connect;
    if fields.uservaddr == 0 {
        return Ok(());
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    if caller::is_agent(pid_tgid) {
        return Ok(());
    }
    let call = ConnectCall {
        start_ns: now_ns(),
        uservaddr: read_event(ctx, fields.uservaddr)?,
        fd: read_event(ctx, fields.fd)?,
        sock: 0,
    };
    CONNECT_CALLS.insert(&(pid_tgid as u32), &call, 0)
}

/// The destination of a failed call, if it was a TCP `connect()` to an IPv4 or IPv6 address.
#[inline(always)]
fn tcp_destination(call: &ConnectCall, attempt: &mut AttemptRecord) -> Result<bool, i32> {
    let addr = call.uservaddr;
    let family: u16 = read_user_at(addr, 0)?;
    if (family != AF_INET && family != AF_INET6) || !is_tcp(call.fd)? {
        return Ok(false);
    }
    let port: u16 = read_user_at(addr, 2)?;
    attempt.family = family;
    attempt.dport = u16::from_be(port);
    // sockaddr_in keeps the address at 4, sockaddr_in6 at 8 (after the flow label).
    if family == AF_INET {
        let v4: [u8; 4] = read_user_at(addr, 4)?;
        attempt.daddr[..4].copy_from_slice(&v4);
    } else {
        attempt.daddr = read_user_at(addr, 8)?;
    }
    Ok(true)
}

/// The user stack of an attempt that started inside this call: the thread's registers and
/// stack are what they were at SYN_SENT, since it has not left the call. An attempt that
/// ended and was kept meanwhile waits for this (`PARKED`), and is sent from here.
#[inline(always)]
fn take_stacks(ctx: &TracePointContext, attempt: &mut AttemptRecord, sock: u64) {
    caller::record_stacks(ctx, attempt, true);
    note_process(ctx, attempt, true);
    if handoff_clear(attempt, handoff::STACKS_PENDING) & handoff::PARKED != 0 {
        send(attempt);
        if IN_FLIGHT.remove(&sock).is_ok() {
            track_live(false);
        }
    }
}

/// Errors that mean the call was not an attempt, or not a failed one.
#[inline(always)]
fn is_attempt_failure(errno: i32) -> bool {
    const EINTR: i32 = 4;
    const EBADF: i32 = 9;
    const EFAULT: i32 = 14;
    const ENOTSOCK: i32 = 88;
    const EISCONN: i32 = 106;
    const EALREADY: i32 = 114;
    const EINPROGRESS: i32 = 115;
    !matches!(
        errno,
        EINTR | EBADF | EFAULT | ENOTSOCK | EISCONN | EALREADY | EINPROGRESS
    )
}

#[inline(always)]
fn on_exit(ctx: &TracePointContext) -> Result<(), i32> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    // SAFETY: the value is copied at once; only this thread writes its entry (see
    // `attempt::start`).
    let Some(call) = (unsafe { CONNECT_CALLS.get(&tid) }).copied() else {
        return Ok(());
    };
    let _ = CONNECT_CALLS.remove(&tid);
    if call.sock != 0 {
        if let Some(attempt) = in_flight(call.sock) {
            note_error(attempt, call.sock, now_ns());
            if attempt.handoff & handoff::STACKS_PENDING != 0 {
                take_stacks(ctx, attempt, call.sock);
            }
        }
        return Ok(());
    }
    // The socket never reached SYN_SENT.
    let ret: i64 = read_event(ctx, layout().connect.ret)?;
    let errno = (-ret) as i32;
    if ret >= 0 || !is_attempt_failure(errno) {
        return Ok(());
    }
    let attempt = scratch_attempt().ok_or(0)?;
    attempt.start_ns = call.start_ns;
    attempt.end_ns = now_ns();
    caller::identify(attempt, pid_tgid);
    if !tcp_destination(&call, attempt)? {
        return Ok(());
    }
    attempt.error = errno;
    attempt.flags = attempt_flags::NEVER_STARTED;
    let policy = policy();
    if policy.filters != 0 && !allowed(attempt, policy.filters) {
        count(counter::NOT_ALLOWED);
        return Ok(());
    }
    // Still in the calling thread, inside its `connect()`: its active span is at hand here
    // as at SYN_SENT, and a failure before SYN_SENT belongs to that span all the same.
    thread_context::read(attempt);
    count(counter::STARTED);
    count(counter::FINISHED);
    count(counter::NEVER_STARTED);
    let series = series_key(attempt);
    count_series(&series, attempt);
    if within_span_rate(&series, attempt.end_ns) {
        send(attempt);
    } else {
        count(counter::RATE_LIMITED);
    }
    Ok(())
}
