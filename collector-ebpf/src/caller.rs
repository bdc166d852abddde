//! Who makes an attempt: the task that moved the socket to SYN_SENT, or whose `connect()`
//! failed before it. Only that task's own context has its identity: never read it in a
//! timer or a softirq.

use core::mem::offset_of;

use aya_ebpf::{
    bindings::{BPF_F_REUSE_STACKID, BPF_F_USER_STACK, pt_regs},
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_task_btf, bpf_task_pt_regs},
    programs::tracing::StackIdContext,
};
use synspan_shared::{AttemptRecord, TASK_COMM_LEN, USER_STACK_BYTES, UserRegs};

use crate::{
    helpers::{read_kernel_at, read_user_into},
    maps::{STACKS, policy},
};

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
    record_user_frame(attempt);
}

/// Records the registers the task entered the kernel with, and the top of its user stack:
/// the frame-pointer walk above cannot see through code built without frame pointers
/// (glibc's `connect()`), and the agent unwinds those frames from these with each file's
/// call frame information. A kernel thread has no user registers: nothing is recorded.
#[inline(always)]
fn record_user_frame(attempt: &mut AttemptRecord) {
    // SAFETY: takes no arguments; returns the current task, valid for the whole run.
    let task = unsafe { bpf_get_current_task_btf() };
    // SAFETY: `task` is the current task as the helper above returned it, which is what this
    // helper requires; it returns the address of the task's saved user registers.
    let regs = unsafe { bpf_task_pt_regs(task) } as u64;
    if regs == 0 {
        return;
    }
    let read = |offset: usize| read_kernel_at::<u64>(regs, offset as u16).unwrap_or(0);
    let user = UserRegs {
        ip: read(offset_of!(pt_regs, rip)),
        sp: read(offset_of!(pt_regs, rsp)),
        bp: read(offset_of!(pt_regs, rbp)),
    };
    if user.ip == 0 || user.sp == 0 {
        return;
    }
    attempt.user_regs = user;
    // The read fails as a whole when the range runs past the stack's mapping, which only a
    // stack pointer within USER_STACK_BYTES of the top of its thread's stack does: then the
    // agent unwinds from the registers alone.
    if read_user_into(user.sp, &mut attempt.user_stack).is_ok() {
        attempt.user_stack_len = USER_STACK_BYTES as u16;
    }
}
