//! Maps and load-time constants shared by every program.
//!
//! The agent finds maps and globals by name, from `synspan_shared::names`. aya's `#[map]`
//! macro takes a string literal only, so here each name is the static's own identifier; the
//! agent's tests parse the built object and check every name it uses against it.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf, StackTrace, lpm_trie::LpmTrie},
};
use synspan_shared::{
    AttemptRecord, AttemptTuple, ConnectCall, Endpoint, KernelLayout, MAX_FILTER_ENTRIES, Policy, SeriesKey,
    SeriesValue, SpanBudget, ThreadContextTls, attempt_flags, counter, duration_bucket, outcome,
};

use crate::helpers::read_sock_field;

/// Attempts in flight, keyed by socket address. The agent sizes it at load time.
#[map]
pub(crate) static IN_FLIGHT: LruHashMap<u64, AttemptRecord> = LruHashMap::with_max_entries(16384, 0);

/// Attempts in flight by their tuple, for finding the attempt a packet without its socket
/// belongs to (see `drop.rs`): two entries per attempt, one without the local port (made at
/// SYN_SENT, when the kernel has not picked it yet) and one with it (made once it is known).
/// Only kept with drop reasons on. LRU: an entry left behind by a lost end is pushed out.
#[map]
pub(crate) static ATTEMPT_TUPLES: LruHashMap<AttemptTuple, u64> = LruHashMap::with_max_entries(32768, 0);

/// Attempts in the in-flight map, as far as inserts and removes tell: an attempt evicted from
/// it is never taken off, so this can only be too high, never too low. The drop program
/// leaves at once when it is 0.
#[map]
pub(crate) static LIVE: Array<u64> = Array::with_max_entries(1, 0);

/// One finished attempt per record. The agent sizes it at load time.
#[map]
pub(crate) static ATTEMPTS: RingBuf = RingBuf::with_byte_size(4 * 1024 * 1024, 0);

/// Process notes; see `synspan_shared::ProcessNote`.
#[map]
pub(crate) static PROCESS_NOTES: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// (tgid, user stack id) pairs already noted.
#[map]
pub(crate) static NOTED: LruHashMap<u64, u8> = LruHashMap::with_max_entries(16384, 0);

#[map]
pub(crate) static STACKS: StackTrace = StackTrace::with_max_entries(16384, 0);

/// Thread id to its `connect()` call, from entry to return.
#[map]
pub(crate) static CONNECT_CALLS: LruHashMap<u32, ConnectCall> = LruHashMap::with_max_entries(16384, 0);

/// Local endpoints of attempts that sent a RST in SYN_SENT, to their socket: the connection
/// their SYN met will close on that RST, and names this endpoint as its peer when it does.
#[map]
pub(crate) static COLLISION_WATCH: LruHashMap<Endpoint, u64> = LruHashMap::with_max_entries(4096, 0);

/// When an attempt last started watching for a collision. Lingering closes are common and
/// collisions rare: with no watch in the last seconds, a close need not be looked up.
#[map]
pub(crate) static WATCH_SINCE: Array<u64> = Array::with_max_entries(1, 0);

/// How long after the last watch began lingering closes are checked. The close comes a
/// round trip after the RST that started the watch.
pub(crate) const WATCH_WINDOW_NS: u64 = 5_000_000_000;

/// Allow-lists, filled by the agent before attach; see `synspan_shared::filter`.
#[map]
pub(crate) static ALLOW_PIDS: HashMap<u32, u8> = HashMap::with_max_entries(MAX_FILTER_ENTRIES, 0);
#[map]
pub(crate) static ALLOW_CGROUPS: HashMap<u64, u8> = HashMap::with_max_entries(MAX_FILTER_ENTRIES, 0);
#[map]
pub(crate) static ALLOW_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(MAX_FILTER_ENTRIES, 0);
#[map]
pub(crate) static ALLOW_DESTS: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(MAX_FILTER_ENTRIES, 0);

/// Where each process's threads keep their OpenTelemetry thread-context pointer, by tgid;
/// filled by the agent for processes that publish one (see `thread_context.rs`).
#[map]
pub(crate) static THREAD_CONTEXT_TLS: HashMap<u32, ThreadContextTls> = HashMap::with_max_entries(8192, 0);

#[map]
pub(crate) static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::LEN, 0);

/// Every finished attempt, counted by who connected where and how it ended; the agent sizes
/// it (`--metrics-max-series`) and deletes series that went quiet. Not LRU: a full map must
/// refuse a new series, which then goes to [`OVERFLOW_SERIES`], rather than evict one and
/// lose its counts. Per CPU: a connect storm on every core would otherwise fight over the
/// cache line of its one series.
#[map]
pub(crate) static CONNECT_SERIES: PerCpuHashMap<SeriesKey, SeriesValue> =
    PerCpuHashMap::with_max_entries(4096, 0);

/// Attempts whose series did not fit in [`CONNECT_SERIES`], by outcome.
#[map]
pub(crate) static OVERFLOW_SERIES: PerCpuArray<SeriesValue> = PerCpuArray::with_max_entries(outcome::LEN, 0);

/// What a new series starts from: the map copies it in.
static EMPTY_SERIES: SeriesValue = SeriesValue::ZERO;

/// What each series sent to the agent this second, for the span rate limit. LRU: a series
/// that went quiet is pushed out, and starts a fresh second when it comes back. Shared by
/// every CPU: a per-CPU budget would let through the limit times the number of CPUs.
#[map]
pub(crate) static SPAN_BUDGETS: LruHashMap<SeriesKey, SpanBudget> = LruHashMap::with_max_entries(16384, 0);

const SECOND_NS: u64 = 1_000_000_000;

/// A record is larger than the 512-byte BPF stack allows comfortably, so new attempts are
/// built here before they are copied into the in-flight map.
#[map]
pub(crate) static SCRATCH: PerCpuArray<AttemptRecord> = PerCpuArray::with_max_entries(1, 0);

/// Set by the agent before load: where this kernel keeps the fields we read.
#[unsafe(no_mangle)]
static LAYOUT: KernelLayout = KernelLayout::UNKNOWN;

/// Set by the agent before load: which finished attempts leave the kernel.
#[unsafe(no_mangle)]
static POLICY: Policy = Policy::ALL;

#[inline(always)]
pub(crate) fn layout() -> KernelLayout {
    // Volatile so that the compiler does not fold the zeros above into the code: the loader
    // rewrites them.
    // SAFETY: an aligned static of plain integers. The loader writes it before the programs
    // are loaded; it is read-only from then on.
    unsafe { core::ptr::read_volatile(&LAYOUT) }
}

#[inline(always)]
pub(crate) fn policy() -> Policy {
    // SAFETY: as for `layout`.
    unsafe { core::ptr::read_volatile(&POLICY) }
}

#[inline(always)]
pub(crate) fn count(slot: u32) {
    // Per-CPU slot, so no other CPU writes it; but a program here may be interrupted by
    // another of ours (a softirq's state change inside a connect() hook) that counts too.
    if let Some(value) = COUNTERS.get_ptr_mut(slot) {
        atomic_add(value, 1);
    }
}

/// Adds `delta` (wrapping: `u64::MAX` subtracts one) to the map value at `value`, atomically.
/// core has no atomic read-modify-write for the bpf target: BPF_ATOMIC_ADD by hand.
#[inline(always)]
fn atomic_add(value: *mut u64, delta: u64) {
    // SAFETY: callers pass an aligned 8-byte slot from a successful map lookup, in a map
    // that outlives the program run; the instruction adds to it atomically and touches
    // nothing else.
    unsafe {
        core::arch::asm!("lock *(u64 *)({p} + 0) += {v}", p = in(reg) value, v = in(reg) delta);
    }
}

/// The series an attempt is counted and rate-limited under.
#[inline(always)]
pub(crate) fn series_key(attempt: &AttemptRecord) -> SeriesKey {
    SeriesKey {
        daddr: attempt.daddr,
        pid: attempt.pid,
        dport: attempt.dport,
        family: attempt.family,
        outcome: outcome::classify(attempt),
        _pad: [0; 7],
    }
}

/// Sets `bits` in the attempt's [`handoff`](synspan_shared::handoff) word, atomically;
/// returns the bits that were set before.
#[inline(always)]
pub(crate) fn handoff_set(attempt: &mut AttemptRecord, bits: u64) -> u64 {
    let word = &raw mut attempt.handoff;
    let mut old = bits;
    // SAFETY: an aligned u64 of a record that outlives the run (see `in_flight`); while the
    // attempt is in the in-flight map every access to it is one of these two instructions.
    // BPF has atomic read-modify-write only as instructions, not as core::sync::atomic.
    unsafe {
        core::arch::asm!("{v} = atomic_fetch_or((u64 *)({p} + 0), {v})", p = in(reg) word, v = inout(reg) old);
    }
    old
}

/// Clears `bits` in the attempt's handoff word, atomically; returns the bits set before.
#[inline(always)]
pub(crate) fn handoff_clear(attempt: &mut AttemptRecord, bits: u64) -> u64 {
    let word = &raw mut attempt.handoff;
    let mut old = !bits;
    // SAFETY: as for `handoff_set`.
    unsafe {
        core::arch::asm!("{v} = atomic_fetch_and((u64 *)({p} + 0), {v})", p = in(reg) word, v = inout(reg) old);
    }
    old
}

/// Counts a finished attempt in its series, or in the overflow series of its outcome when
/// the map is full. Called once per attempt, where the policy decides its fate, so that the
/// series add up to the attempts the accounting saw finish.
#[inline(always)]
pub(crate) fn count_series(key: &SeriesKey, attempt: &AttemptRecord) {
    if policy().count_series == 0 {
        return;
    }
    let mut value = CONNECT_SERIES.get_ptr_mut(key);
    if value.is_none() {
        // Another CPU may make the same series first: then the insert fails and the lookup
        // finds that one.
        let _ = CONNECT_SERIES.insert(key, &EMPTY_SERIES, aya_ebpf::bindings::BPF_NOEXIST as u64);
        value = CONNECT_SERIES.get_ptr_mut(key);
    }
    let Some(value) = value.or_else(|| OVERFLOW_SERIES.get_ptr_mut(u32::from(key.outcome))) else {
        return;
    };
    let duration = attempt.end_ns.saturating_sub(attempt.start_ns);
    let bucket = duration_bucket(duration);
    // SAFETY: a value of a preallocated per-CPU map, valid for the run and written only from
    // this CPU; the fields are aligned u64s, added to atomically because another of our
    // programs (an attempt ending in a softirq) can interrupt this one on the same CPU.
    unsafe {
        atomic_add(&raw mut (*value).attempts, 1);
        atomic_add(&raw mut (*value).syn_retransmits, u64::from(attempt.retransmits));
        atomic_add(&raw mut (*value).duration_ns, duration);
        if let Some(slot) = (*value).buckets.get_mut(bucket) {
            atomic_add(slot, 1);
        }
    }
}

/// Whether a kept attempt of this series may still be sent this second; counts it if so.
/// A storm of identical attempts (a client hammering a closed port) then costs the ring
/// buffer and the agent the limit, not the storm's rate.
#[inline(always)]
pub(crate) fn within_span_rate(key: &SeriesKey, now_ns: u64) -> bool {
    let limit = u64::from(policy().span_rate_limit);
    if limit == 0 {
        return true;
    }
    let Some(budget) = SPAN_BUDGETS.get_ptr_mut(key) else {
        // A lost insert (the map busy on another CPU) only lets this one through unbudgeted.
        let _ = SPAN_BUDGETS.insert(
            key,
            &SpanBudget {
                since_ns: now_ns,
                sent: 1,
            },
            0,
        );
        return true;
    };
    // SAFETY: an element of a preallocated LRU map, valid for the run. Other CPUs update the
    // same series at once: `sent` is added to atomically, and the unlocked check before it
    // lets at most one attempt per CPU past the limit. Two CPUs that both see the second
    // over both restart it, which costs nothing but a few attempts' worth of budget. An
    // element evicted and reused meanwhile is another series' budget, which then counts one
    // attempt too many or starts its second late.
    unsafe {
        if now_ns.wrapping_sub((*budget).since_ns) >= SECOND_NS {
            (*budget).since_ns = now_ns;
            (*budget).sent = 1;
            return true;
        }
        if (*budget).sent >= limit {
            return false;
        }
        atomic_add(&raw mut (*budget).sent, 1);
    }
    true
}

/// One more (`true`) or one fewer attempt in the in-flight map; see [`LIVE`].
#[inline(always)]
pub(crate) fn track_live(added: bool) {
    if let Some(value) = LIVE.get_ptr_mut(0) {
        atomic_add(value, if added { 1 } else { u64::MAX });
    }
}

/// Whether any attempt may be in flight.
#[inline(always)]
pub(crate) fn any_live() -> bool {
    LIVE.get(0).is_some_and(|&n| n != 0)
}

/// An attempt's tuple for [`ATTEMPT_TUPLES`], with the local port it has (0 until known).
#[inline(always)]
pub(crate) fn attempt_tuple(attempt: &AttemptRecord, local_port: u16) -> AttemptTuple {
    AttemptTuple {
        local: attempt.saddr,
        peer: attempt.daddr,
        local_port,
        peer_port: attempt.dport,
        family: attempt.family,
        _pad: 0,
    }
}

/// Remembers an attempt by its tuple, when drop reasons are on.
#[inline(always)]
pub(crate) fn remember_tuple(attempt: &mut AttemptRecord, local_port: u16) {
    if policy().drop_reasons != 0
        && ATTEMPT_TUPLES
            .insert(&attempt_tuple(attempt, local_port), &attempt.sock, 0)
            .is_ok()
        && local_port != 0
    {
        attempt.flags |= attempt_flags::TUPLE_KNOWN;
    }
}

/// Forgets a finished attempt's tuples. The entry without the port may already name a newer
/// attempt to the same peer from the same address: that one is left.
#[inline(always)]
pub(crate) fn forget_tuples(attempt: &AttemptRecord) {
    if policy().drop_reasons == 0 {
        return;
    }
    if attempt.flags & attempt_flags::TUPLE_KNOWN != 0 {
        let _ = ATTEMPT_TUPLES.remove(&attempt_tuple(attempt, attempt.sport));
    }
    let unported = attempt_tuple(attempt, 0);
    // SAFETY: the value is copied at once.
    if unsafe { ATTEMPT_TUPLES.get(&unported) }.copied() == Some(attempt.sock) {
        let _ = ATTEMPT_TUPLES.remove(&unported);
    }
}

/// The attempt in flight on `sock`, to update in place for the rest of this program's run.
///
/// Every program that updates an attempt goes through here. What makes the reference sound:
///
/// - The memory: LRU hash maps preallocate their elements, and a map is not freed while a
///   program that uses it runs, so the pointer stays valid for the whole run.
/// - Two CPUs: nearly every hook that updates an attempt runs under its socket's lock (the
///   owner's `lock_sock`, or `bh_lock_sock` in softirq): the state changes, the retransmit
///   timer, a RST received or sent, an error report. For one socket they run one at a time.
///   Two writers do not hold that lock: the return of `connect()` (the call has released
///   the socket by then) and a lingering close (it holds the lock of the connection that
///   closes, not the attempt's). Either can meet a locked writer on another CPU: then one
///   update of one field may be lost, such as a bit of `flags` set at the same instant, or
///   of two near-simultaneous first errors the later is kept. Every field is an integer, so
///   that costs one span's accuracy, never its validity.
/// - Eviction: when the map is full, an insert on another CPU may evict this entry and hand
///   its element to a new attempt while this program still holds the pointer. The writes
///   then land in the new attempt's record: the memory is still a record, but that one
///   carries the evicted attempt's update (from `finish`, it is even sent with it, and again
///   when it ends itself). It takes a full map and a race within one program run; the
///   accounting counts the evicted attempt, and `--max-in-flight` sizes the map.
#[inline(always)]
pub(crate) fn in_flight<'run>(sock: u64) -> Option<&'run mut AttemptRecord> {
    let attempt = IN_FLIGHT.get_ptr_mut(&sock)?;
    // SAFETY: see above.
    Some(unsafe { &mut *attempt })
}

/// This CPU's scratch record, zeroed, to build a new attempt in.
#[inline(always)]
pub(crate) fn scratch_attempt<'run>() -> Option<&'run mut AttemptRecord> {
    let attempt = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: per-CPU, preallocated memory, valid for the run. Its two users, the start of
    // an attempt and the return of a `connect()` that failed before SYN_SENT, both run in
    // a task's context (SYN_SENT is only entered from one: `connect()`, a kernel socket's
    // connect, an io_uring worker) and tracepoint programs run with preemption off: neither
    // can interrupt the other on its CPU. Programs that run in softirq, which can, build
    // what they need on the stack instead.
    let attempt = unsafe { &mut *attempt };
    zero(attempt);
    Some(attempt)
}

/// Zeroes a record eight bytes at a time. `*record = AttemptRecord::ZERO` compiles to a call
/// of the compiler's `memcpy`, which on BPF copies one byte per iteration: 1408 iterations,
/// about 8 500 instructions on every attempt's start.
#[inline(always)]
fn zero(record: &mut AttemptRecord) {
    const WORDS: usize = size_of::<AttemptRecord>() / 8;
    const _: () = assert!(size_of::<AttemptRecord>() % 8 == 0);
    const _: () = assert!(align_of::<AttemptRecord>() == 8);
    let words = core::ptr::from_mut(record).cast::<u64>();
    for i in 0..WORDS {
        // SAFETY: within the record, which is 8-aligned and a whole number of words, and of
        // plain integers for which zero is valid. Volatile, so that the compiler cannot fold
        // the stores back into that `memcpy`.
        unsafe { words.add(i).write_volatile(0) };
    }
}

/// Records the socket's pending error, if any and if none was recorded yet. Soft errors
/// (an ICMP message while the socket was busy) are not reported by any tracepoint, so every
/// hook that visits an attempt looks.
#[inline(always)]
pub(crate) fn note_error(attempt: &mut AttemptRecord, sock: u64, now_ns: u64) {
    if attempt.flags & attempt_flags::ERROR_SEEN != 0 {
        return;
    }
    let fields = layout().sock;
    let error: i32 = read_sock_field(sock, fields.sk_err);
    let soft = if error == 0 {
        read_sock_field(sock, fields.sk_err_soft)
    } else {
        0
    };
    record_error(attempt, error, soft, now_ns);
}

/// Keeps the first error seen, hard before soft.
#[inline(always)]
pub(crate) fn record_error(attempt: &mut AttemptRecord, error: i32, soft: i32, now_ns: u64) {
    let error = if error != 0 { error } else { soft };
    if error != 0 && attempt.flags & attempt_flags::ERROR_SEEN == 0 {
        attempt.first_error = error;
        attempt.first_error_ns = now_ns;
        attempt.flags |= attempt_flags::ERROR_SEEN;
    }
}

/// The local endpoint of an attempt, as the peer it connects to sees it.
#[inline(always)]
pub(crate) fn local_endpoint(attempt: &AttemptRecord) -> Endpoint {
    Endpoint {
        addr: attempt.saddr,
        port: attempt.sport,
        family: attempt.family,
    }
}

/// Hands a finished attempt to the agent, or counts it lost. One helper call: the kernel
/// copies the record, rather than the program filling in a reservation.
#[inline(always)]
pub(crate) fn send(attempt: &AttemptRecord) {
    let flags = wakeup_flags(&ATTEMPTS, size_of::<AttemptRecord>() as u64);
    if ATTEMPTS.output(attempt, flags).is_err() {
        count(counter::RINGBUF_FULL);
    }
}

/// The agent is woken each time this many more bytes wait (or a quarter of a smaller ring).
/// In between, records wait for its next poll (every `READ_INTERVAL` in the agent): one
/// wake-up per record would cost the traced application more than the record itself. About 90
/// records of 1416 bytes (with its header) a wake-up, as 32 KiB held of the 336-byte records
/// this was first set for: at 32 KiB the agent was woken every 23 records.
const WAKEUP_BYTES: u64 = 128 * 1024;
/// What the ring buffer adds to each record: an 8-byte header, and padding to 8 bytes.
const RECORD_HEADER: u64 = 8;

/// Submit flags for a record of `size` bytes in `ring`: wake the agent when this record
/// takes the bytes waiting across a multiple of the wake-up step. Only then: until the agent
/// has been scheduled and drained, every later record would otherwise wake it again, and
/// under load that cost more than everything else the programs do for an attempt. Any
/// multiple, not only the first, so that a crossing missed in a race between two CPUs costs
/// one step of records, not a wait for the agent's next poll.
#[inline(always)]
fn wakeup_flags(ring: &RingBuf, size: u64) -> u64 {
    let ring_size = ring.query(aya_ebpf::bindings::BPF_RB_RING_SIZE as u64);
    let every = if ring_size / 4 < WAKEUP_BYTES {
        ring_size / 4
    } else {
        WAKEUP_BYTES
    };
    let step = (size + RECORD_HEADER + 7) & !7;
    let waiting = ring.query(aya_ebpf::bindings::BPF_RB_AVAIL_DATA as u64);
    if every == 0 || waiting / every != (waiting + step) / every {
        aya_ebpf::bindings::BPF_RB_FORCE_WAKEUP as u64
    } else {
        aya_ebpf::bindings::BPF_RB_NO_WAKEUP as u64
    }
}
