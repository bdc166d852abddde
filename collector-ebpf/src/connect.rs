//! `syscalls:sys_enter_connect` and `sys_exit_connect`: what happens to a TCP `connect()`
//! outside SYN_SENT.
//!
//! - A `connect()` that fails before its socket reaches SYN_SENT (no route: ENETUNREACH)
//!   never shows in the socket's state changes; it becomes an attempt of its own here.
//! - An ICMP error that arrived while `connect()` held the socket was recorded only as a soft
//!   error; a non-blocking caller may read it (`SO_ERROR`, which clears it) and close the
//!   socket, so it is looked at when `connect()` returns.

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task, bpf_ktime_get_ns,
        bpf_probe_read_kernel, bpf_probe_read_user,
    },
    macros::tracepoint,
    programs::TracePointContext,
};
use synspan_shared::{AF_INET, AF_INET6, AttemptRecord, ConnectCall, IPPROTO_TCP, attempt_flags, counter};

use crate::{
    attempt::allowed,
    maps::{CONNECT_CALLS, IN_FLIGHT, SCRATCH, count, layout, note_error, policy, send},
};

const SOCK_STREAM: u16 = 1;

#[tracepoint(category = "syscalls", name = "sys_enter_connect")]
pub fn sys_enter_connect(ctx: TracePointContext) -> u32 {
    let _ = on_enter(&ctx);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_connect")]
pub fn sys_exit_connect(ctx: TracePointContext) -> u32 {
    let _ = on_exit(&ctx);
    0
}

#[inline(always)]
fn read_kernel<T>(addr: u64) -> Result<T, i32> {
    unsafe { bpf_probe_read_kernel(addr as *const T).map_err(|e| e as i32) }
}

/// Whether `fd` of the current task is a TCP socket, by walking the task's file table.
#[inline(always)]
fn is_tcp(fd: u64) -> Result<bool, i32> {
    let f = layout().fd_path;
    if f.sock_protocol == 0 {
        return Ok(false);
    }
    let task = unsafe { bpf_get_current_task() };
    let files: u64 = read_kernel(task + u64::from(f.task_files))?;
    let fdt: u64 = read_kernel(files + u64::from(f.files_fdt))?;
    let fds: u64 = read_kernel(fdt + u64::from(f.fdtable_fd))?;
    let file: u64 = read_kernel(fds + fd * 8)?;
    let socket: u64 = read_kernel(file + u64::from(f.file_private_data))?;
    let sk: u64 = read_kernel(socket + u64::from(f.socket_sk))?;
    let protocol: u16 = read_kernel(sk + u64::from(f.sock_protocol))?;
    let kind: u16 = read_kernel(sk + u64::from(f.sock_type))?;
    Ok(protocol == IPPROTO_TCP && kind == SOCK_STREAM)
}

#[inline(always)]
fn on_enter(ctx: &TracePointContext) -> Result<(), i32> {
    let fields = layout().connect;
    if fields.uservaddr == 0 {
        return Ok(());
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    // The agent's own connections are not traced (see `attempt::start`).
    let agent = policy().agent_tgid;
    if agent != 0 && (pid_tgid >> 32) as u32 == agent {
        return Ok(());
    }
    let call = ConnectCall {
        start_ns: unsafe { bpf_ktime_get_ns() },
        uservaddr: unsafe { ctx.read_at(fields.uservaddr as usize)? },
        fd: unsafe { ctx.read_at(fields.fd as usize)? },
        sock: 0,
    };
    CONNECT_CALLS.insert(&(pid_tgid as u32), &call, 0)
}

/// The destination of a failed call, if it was a TCP `connect()` to an IPv4 or IPv6 address.
#[inline(always)]
fn tcp_destination(call: &ConnectCall, attempt: &mut AttemptRecord) -> Result<bool, i32> {
    let addr = call.uservaddr;
    let family: u16 = unsafe { bpf_probe_read_user(addr as *const u16).map_err(|e| e as i32)? };
    if (family != AF_INET && family != AF_INET6) || !is_tcp(call.fd)? {
        return Ok(false);
    }
    let port: u16 = unsafe { bpf_probe_read_user((addr + 2) as *const u16).map_err(|e| e as i32)? };
    attempt.family = family;
    attempt.dport = u16::from_be(port);
    // sockaddr_in keeps the address at 4, sockaddr_in6 at 8 (after the flow label).
    if family == AF_INET {
        let v4: [u8; 4] = unsafe { bpf_probe_read_user((addr + 4) as *const [u8; 4]).map_err(|e| e as i32)? };
        attempt.daddr[..4].copy_from_slice(&v4);
    } else {
        attempt.daddr = unsafe { bpf_probe_read_user((addr + 8) as *const [u8; 16]).map_err(|e| e as i32)? };
    }
    Ok(true)
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
    let Some(call) = (unsafe { CONNECT_CALLS.get(&tid) }).copied() else {
        return Ok(());
    };
    let _ = CONNECT_CALLS.remove(&tid);
    if call.sock != 0 {
        if let Some(attempt) = IN_FLIGHT.get_ptr_mut(&call.sock) {
            note_error(unsafe { &mut *attempt }, call.sock, unsafe { bpf_ktime_get_ns() });
        }
        return Ok(());
    }
    // The socket never reached SYN_SENT.
    let ret: i64 = unsafe { ctx.read_at(layout().connect.ret as usize)? };
    let errno = (-ret) as i32;
    if ret >= 0 || !is_attempt_failure(errno) {
        return Ok(());
    }
    let attempt = SCRATCH.get_ptr_mut(0).ok_or(0)?;
    let attempt = unsafe { &mut *attempt };
    *attempt = AttemptRecord::ZERO;
    attempt.start_ns = call.start_ns;
    attempt.end_ns = unsafe { bpf_ktime_get_ns() };
    attempt.pid = (pid_tgid >> 32) as u32;
    attempt.tid = tid;
    attempt.comm = bpf_get_current_comm().unwrap_or([0; 16]);
    attempt.cgroup_id = unsafe { aya_ebpf::helpers::bpf_get_current_cgroup_id() };
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
    count(counter::STARTED);
    count(counter::FINISHED);
    count(counter::NEVER_STARTED);
    send(attempt);
    Ok(())
}
