//! What the kernel counts for synspan: the programs' own per-CPU counters, and the runs of
//! the programs the kernel left out (recursion misses).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use aya::maps::PerCpuArray;
use synspan_shared::{counter, names::map};

use super::{KernelObject, LoadError};

/// Sums of the kernel's per-CPU counters; see `synspan_shared::counter`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct KernelCounters {
    pub(crate) started: u64,
    pub(crate) finished: u64,
    pub(crate) filtered: u64,
    pub(crate) ringbuf_full: u64,
    pub(crate) replaced: u64,
    pub(crate) untracked_finish: u64,
    pub(crate) track_failed: u64,
    pub(crate) not_allowed: u64,
    pub(crate) never_started: u64,
    /// Handshake packets the kernel dropped that belonged to an attempt, and TCP handshake
    /// packets dropped while attempts were in flight that belonged to none.
    pub(crate) packet_drops_matched: u64,
    pub(crate) packet_drops_unmatched: u64,
    pub(crate) rate_limited: u64,
}

/// `bpf_prog_info::recursion_misses` of one program, from the kernel (5.12 and later; 0 before).
fn program_recursion_misses(fd: BorrowedFd<'_>) -> u64 {
    use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_prog_info};
    // SAFETY: zeroed plain C structs; the kernel fills at most `info_len` bytes of `info`.
    let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.info.bpf_fd = fd.as_raw_fd() as u32;
    attr.info.info_len = size_of::<bpf_prog_info>() as u32;
    attr.info.info = (&mut info as *mut bpf_prog_info) as u64;
    // SAFETY: `attr` is a valid bpf_attr of the size passed, and points at `info`, which
    // outlives the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_OBJ_GET_INFO_BY_FD as libc::c_long,
            &mut attr as *mut bpf_attr,
            size_of::<bpf_attr>(),
        )
    };
    if ret == 0 { info.recursion_misses } else { 0 }
}

impl KernelObject {
    pub(crate) fn counters(&self) -> Result<KernelCounters, LoadError> {
        let array: PerCpuArray<_, u64> = self.map(map::COUNTERS)?;
        let sum = |slot: u32| {
            array
                .get(&slot, 0)
                .map(|values| values.iter().sum::<u64>())
                .unwrap_or(0)
        };
        Ok(KernelCounters {
            started: sum(counter::STARTED),
            finished: sum(counter::FINISHED),
            filtered: sum(counter::FILTERED),
            ringbuf_full: sum(counter::RINGBUF_FULL),
            replaced: sum(counter::REPLACED),
            untracked_finish: sum(counter::UNTRACKED_FINISH),
            track_failed: sum(counter::TRACK_FAILED),
            not_allowed: sum(counter::NOT_ALLOWED),
            never_started: sum(counter::NEVER_STARTED),
            packet_drops_matched: sum(counter::DROPS_MATCHED),
            packet_drops_unmatched: sum(counter::DROPS_UNMATCHED),
            rate_limited: sum(counter::RATE_LIMITED),
        })
    }

    /// Runs of synspan's programs that the kernel skipped because the same program (for
    /// classic tracepoints: any tracing program) was already running on that CPU, an
    /// interrupt in the middle of it. Each may have lost an attempt's start or end: the one
    /// loss synspan cannot count attempt by attempt.
    pub(crate) fn recursion_misses(&self) -> u64 {
        if let Some(misses) = self.recursion_misses_at_detach {
            return misses;
        }
        self.ebpf
            .programs()
            .filter_map(|(_, program)| program.fd().ok())
            .map(|fd| program_recursion_misses(fd.as_fd()))
            .sum()
    }
}
