//! The calling thread's OpenTelemetry thread context (OTEP 4947), read at SYN_SENT in the
//! thread's own context: its `otel_thread_ctx_v1` TLS pointer and the record it points to.
//!
//! Where the pointer is depends on how the process links the variable; the agent works that
//! out per process and leaves it in `THREAD_CONTEXT_TLS`. A process not there costs one map
//! lookup. Every user read goes through `bpf_probe_read_user`, which cannot fault a page in:
//! memory not resident, a NULL pointer, a TLS block not allocated yet, all read as no context.

use aya_ebpf::helpers::{bpf_get_current_task, bpf_probe_read_user_buf};
use synspan_shared::{AttemptRecord, MAX_THREAD_CONTEXT_ATTRS, THREAD_CONTEXT_FIXED, task_flags, tls_kind};

use crate::{
    helpers::{read_kernel, read_user_at},
    maps::{THREAD_CONTEXT_TLS, layout},
};

/// glibc's DTV entries: `union dtv { size_t counter; struct { void *val; void *to_free; } }`.
const DTV_ENTRY: u64 = 16;
/// musl's DTV entries: `uintptr_t`, the block's address (`DTP_OFFSET` is 0 on x86-64).
const MUSL_DTV_ENTRY: u64 = 8;
/// glibc's `tcbhead_t.dtv`, after `tcbhead_t.tcb`; musl's `struct pthread.dtv`, after
/// `self`: the same place.
const TCB_DTV: u16 = 8;
/// What glibc leaves in a DTV slot whose block the thread has not allocated.
const DTV_UNALLOCATED: u64 = u64::MAX;
/// Module ids are small; a larger one is not a DTV index.
const MAX_MODULE: u64 = 1 << 16;

/// Fills `attempt.thread_context` if the caller's process publishes one and it is valid.
#[inline(always)]
pub(crate) fn read(attempt: &mut AttemptRecord) {
    // SAFETY: the value is copied at once; the agent writes whole entries.
    let Some(tls) = (unsafe { THREAD_CONTEXT_TLS.get(&attempt.pid) }).copied() else {
        return;
    };
    let _ = read_with(attempt, tls.kind, tls.module, tls.offset);
}

#[inline(always)]
fn read_with(attempt: &mut AttemptRecord, kind: u32, module: u64, offset: i64) -> Result<(), i32> {
    let fields = layout().task;
    if fields.fsbase == 0 || fields.flags == 0 {
        return Ok(());
    }
    // SAFETY: takes no arguments and returns the current task's address.
    let task = unsafe { bpf_get_current_task() };
    let flags: u32 = read_kernel(task + u64::from(fields.flags))?;
    if flags & (task_flags::PF_KTHREAD | task_flags::PF_IO_WORKER) != 0 {
        return Ok(());
    }
    let tp: u64 = read_kernel(task + u64::from(fields.fsbase))?;
    if tp == 0 {
        return Ok(());
    }
    let variable = match kind {
        tls_kind::STATIC => tp.wrapping_add(offset as u64),
        tls_kind::DTV => {
            if module == 0 || module >= MAX_MODULE {
                return Ok(());
            }
            let dtv: u64 = read_user_at(tp, TCB_DTV)?;
            // The slot count sits one entry before the pointer; a DTV not grown to this
            // module yet holds no block for it.
            let slots: u64 = read_user_at(dtv.wrapping_sub(DTV_ENTRY), 0)?;
            if module > slots {
                return Ok(());
            }
            let block: u64 = read_user_at(dtv.wrapping_add(module * DTV_ENTRY), 0)?;
            if block == 0 || block == DTV_UNALLOCATED {
                return Ok(());
            }
            block.wrapping_add(offset as u64)
        }
        tls_kind::MUSL_DTV => {
            if module == 0 || module >= MAX_MODULE {
                return Ok(());
            }
            let dtv: u64 = read_user_at(tp, TCB_DTV)?;
            let slots: u64 = read_user_at(dtv, 0)?;
            if module > slots {
                return Ok(());
            }
            let block: u64 = read_user_at(dtv.wrapping_add(module * MUSL_DTV_ENTRY), 0)?;
            if block == 0 {
                return Ok(());
            }
            block.wrapping_add(offset as u64)
        }
        _ => return Ok(()),
    };
    let record: u64 = read_user_at(variable, 0)?;
    if record == 0 {
        return Ok(());
    }
    let fixed: [u8; THREAD_CONTEXT_FIXED] = read_user_at(record, 0)?;
    if fixed[24] != 1 {
        return Ok(());
    }
    let ctx = &mut attempt.thread_context;
    ctx.trace_id.copy_from_slice(&fixed[..16]);
    ctx.span_id.copy_from_slice(&fixed[16..24]);
    ctx.valid = 1;
    ctx.trace_flags = fixed[25];
    let size = usize::from(u16::from_ne_bytes([fixed[26], fixed[27]]));
    let size = size.min(MAX_THREAD_CONTEXT_ATTRS);
    if size == 0 {
        return Ok(());
    }
    let attrs = record.wrapping_add(THREAD_CONTEXT_FIXED as u64);
    // SAFETY: a probe read into the record's own buffer, of at most its length (bounded
    // just above); a bad address fails the read.
    if unsafe { bpf_probe_read_user_buf(attrs as *const u8, &mut ctx.attrs[..size]) }.is_ok() {
        ctx.attrs_size = size as u16;
    }
    Ok(())
}
