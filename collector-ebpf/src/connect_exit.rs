//! `syscalls:sys_exit_connect`: the moment `connect()` releases the socket. An ICMP error
//! that arrived while `connect()` held it was recorded only as a soft error; a non-blocking
//! caller may read it (`SO_ERROR`, which clears it) and close the socket, so look now.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::tracepoint,
    programs::TracePointContext,
};

use crate::maps::{CONNECTING, IN_FLIGHT, note_error};

#[tracepoint(category = "syscalls", name = "sys_exit_connect")]
pub fn sys_exit_connect(_ctx: TracePointContext) -> u32 {
    let tid = bpf_get_current_pid_tgid() as u32;
    let Some(sock) = (unsafe { CONNECTING.get(&tid) }).copied() else {
        return 0;
    };
    let _ = CONNECTING.remove(&tid);
    if let Some(attempt) = IN_FLIGHT.get_ptr_mut(&sock) {
        note_error(unsafe { &mut *attempt }, sock, unsafe { bpf_ktime_get_ns() });
    }
    0
}
