//! Safe forms of the BPF helpers the programs call, so that each one's safety argument is
//! made once: the probe-read family, and the clock.
//!
//! A probe read copies through the kernel's fault-tolerant path: an address that is not
//! mapped, or not readable, makes the read fail with an error; it cannot fault. So any
//! address may be read, and what is read is only ever [`Plain`] data.

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user, bpf_probe_read_user_buf},
    programs::TracePointContext,
};

/// Types for which every bit pattern is a value: what a probe read may fill in.
pub(crate) trait Plain: Copy {}
impl Plain for u8 {}
impl Plain for u16 {}
impl Plain for u32 {}
impl Plain for i32 {}
impl Plain for i64 {}
impl Plain for u64 {}
impl<const N: usize> Plain for [u8; N] {}

/// `T` at `addr` in kernel memory.
#[inline(always)]
pub(crate) fn read_kernel<T: Plain>(addr: u64) -> Result<T, i32> {
    // SAFETY: a probe read of size_of::<T>() bytes into a `T` that any bytes make valid; a
    // bad address fails the read (see the module's comment).
    unsafe { bpf_probe_read_kernel(addr as *const T) }
}

/// `T` at `offset` bytes into the kernel object at `base`.
#[inline(always)]
pub(crate) fn read_kernel_at<T: Plain>(base: u64, offset: u16) -> Result<T, i32> {
    read_kernel(base.wrapping_add(u64::from(offset)))
}

/// `T` at `offset` bytes into `base` in the current task's user memory.
#[inline(always)]
pub(crate) fn read_user_at<T: Plain>(base: u64, offset: u16) -> Result<T, i32> {
    let addr = base.wrapping_add(u64::from(offset));
    // SAFETY: as for `read_kernel`, in the current task's address space.
    unsafe { bpf_probe_read_user(addr as *const T) }
}

/// Fills `dst` from `addr` in the current task's user memory, all or nothing.
#[inline(always)]
pub(crate) fn read_user_into(addr: u64, dst: &mut [u8]) -> Result<(), i32> {
    // SAFETY: as for `read_kernel`, in the current task's address space, into bytes.
    unsafe { bpf_probe_read_user_buf(addr as *const u8, dst) }
}

/// The field at `offset` of a classic tracepoint's record, as tracefs gave it.
#[inline(always)]
pub(crate) fn read_event<T: Plain>(ctx: &TracePointContext, offset: u16) -> Result<T, i32> {
    // SAFETY: `read_at` probe-reads the record at `offset`: as for `read_kernel`.
    unsafe { ctx.read_at::<T>(usize::from(offset)) }
}

/// A field of `struct sock` at an offset resolved from BTF, where 0 means unknown (for
/// members that cannot sit at 0); the default when unknown or unreadable.
#[inline(always)]
pub(crate) fn read_sock_field<T: Plain + Default>(sock: u64, offset: u16) -> T {
    if offset == 0 {
        return T::default();
    }
    read_kernel_at(sock, offset).unwrap_or_default()
}

/// `CLOCK_MONOTONIC` in nanoseconds.
#[inline(always)]
pub(crate) fn now_ns() -> u64 {
    // SAFETY: takes no arguments and only reads the clock.
    unsafe { bpf_ktime_get_ns() }
}
