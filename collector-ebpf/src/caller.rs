//! Who makes an attempt: the task that moved the socket to SYN_SENT, or whose `connect()`
//! failed before it. Only that task's own context has its identity: never read it in a
//! timer or a softirq.

use aya_ebpf::{
    bindings::{BPF_F_REUSE_STACKID, BPF_F_USER_STACK},
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_comm},
    programs::tracing::StackIdContext,
};
use synspan_shared::{AttemptRecord, TASK_COMM_LEN};

use crate::maps::{STACKS, policy};

/// The agent's own connections (to its collector) are not traced: each would be one more
/// span to export, and the agent reports their failures itself.
#[inline(always)]
pub(crate) fn is_agent(pid_tgid: u64) -> bool {
    let agent = policy().agent_tgid;
    agent != 0 && (pid_tgid >> 32) as u32 == agent
}

/// Records the caller's pid, thread, command and cgroup on `attempt`. `pid_tgid` is
/// `bpf_get_current_pid_tgid()`, which the caller has read already.
#[inline(always)]
pub(crate) fn identify(attempt: &mut AttemptRecord, pid_tgid: u64) {
    attempt.pid = (pid_tgid >> 32) as u32;
    attempt.tid = pid_tgid as u32;
    attempt.comm = bpf_get_current_comm().unwrap_or([0; TASK_COMM_LEN]);
    // SAFETY: takes no arguments and only reads the current task's cgroup.
    attempt.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
}

/// Records the caller's stacks on `attempt`: the user stack, and the kernel stack unless the
/// attempt starts inside `connect(2)`. A step of its own, after [`identify`]: the
/// allow-lists need the identity, and only attempts they keep are worth the stack walks.
#[inline(always)]
pub(crate) fn record_stacks<C: StackIdContext>(ctx: &C, attempt: &mut AttemptRecord, in_connect: bool) {
    let flags = BPF_F_REUSE_STACKID as u64;
    // Inside connect(2) the kernel stack is always the syscall's path down to
    // tcp_v4_connect or tcp_v6_connect, and walking it costs more than the rest of the
    // attempt's tracing; it is taken where it tells something: sockets the kernel connects
    // itself, io_uring.
    if !in_connect {
        attempt.kernel_stack_id = ctx.get_stackid(&STACKS, flags).map_or(-1, |id| id as i32);
    }
    attempt.user_stack_id = ctx
        .get_stackid(&STACKS, flags | BPF_F_USER_STACK as u64)
        .map_or(-1, |id| id as i32);
}
