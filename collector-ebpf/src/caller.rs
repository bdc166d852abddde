//! Who makes an attempt: the task that moved the socket to SYN_SENT, or whose `connect()`
//! failed before it. Only that task's own context has its identity: never read it in a
//! timer or a softirq.

use core::mem::offset_of;

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_REUSE_STACKID, BPF_F_USER_BUILD_ID, BPF_F_USER_STACK, pt_regs},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_task, bpf_get_current_task_btf,
        bpf_get_stack, bpf_probe_read_kernel_str_bytes, bpf_task_pt_regs,
    },
    programs::tracing::StackIdContext,
};
use synspan_shared::{
    AttemptRecord, BuildIdFrame, TASK_COMM_LEN, USER_STACK_BYTES, UserRegs, VanishingProcess,
};

use crate::{
    helpers::{read_kernel_at, read_user_into},
    maps::{STACKS, layout, policy},
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

/// Fills `vanishing` with the executable's file name and, with `with_stack`, the user stack
/// again with each frame's file as a build id and offset (the kernel looks the build id up in
/// the page cache of each frame's file), so that a process gone before the agent read its
/// `/proc/<pid>/maps` still has every frame named by what the agent has indexed. Both are
/// taken only when the process is noted, never in steady state: measured with bpf_stats, a
/// noted attempt's start then costs about 5 µs more than with `--no-stacks` (README, "User
/// stacks"), against about 0.7 µs for the plain walk every attempt pays.
///
/// `bpf_get_stack` rather than a second stack trace map with `BPF_F_STACK_BUILD_ID`: the
/// frames travel in the note the agent reads anyway, with no map to look up, and aya's stack
/// trace maps hold 8-byte frames only (the kernel wants a multiple of 32 for build ids).
#[inline(always)]
pub(crate) fn describe_vanishing<C: EbpfContext>(
    ctx: &C,
    vanishing: &mut VanishingProcess,
    with_stack: bool,
) {
    vanishing.exe_name[0] = 0;
    let f = layout().exe;
    if f.task_mm != 0 && f.mm_exe_file != 0 && f.dentry_name != 0 {
        // SAFETY: takes no arguments; the task's address is only ever probe-read.
        let task = unsafe { bpf_get_current_task() };
        let name = read_kernel_at::<u64>(task, f.task_mm)
            .and_then(|mm| read_kernel_at::<u64>(mm, f.mm_exe_file))
            .and_then(|file| read_kernel_at::<u64>(file, f.file_dentry))
            .and_then(|dentry| read_kernel_at::<u64>(dentry, f.dentry_name));
        if let Ok(name) = name {
            // SAFETY: a probe read of at most EXE_NAME_LEN bytes, NUL-terminated, into the
            // name's own array; a bad address fails the read.
            if unsafe { bpf_probe_read_kernel_str_bytes(name as *const u8, &mut vanishing.exe_name) }.is_err()
            {
                vanishing.exe_name[0] = 0;
            }
        }
    }
    vanishing.frame_count = 0;
    if !with_stack {
        return;
    }
    let size = core::mem::size_of_val(&vanishing.frames) as u32;
    // SAFETY: the helper writes at most `size` bytes into the frames array, zeroing what it
    // does not fill, and returns the bytes written or a negative error.
    let written = unsafe {
        bpf_get_stack(
            ctx.as_ptr(),
            vanishing.frames.as_mut_ptr().cast(),
            size,
            (BPF_F_USER_STACK | BPF_F_USER_BUILD_ID) as u64,
        )
    };
    if written > 0 {
        vanishing.frame_count = (written as u32) / core::mem::size_of::<BuildIdFrame>() as u32;
    }
}
