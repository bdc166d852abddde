//! The records and constants that synspan's kernel programs and its agent share.
//!
//! This crate is the only place where the layout of a record lives. Everything here is
//! `#[repr(C)]` and plain old data, so the kernel can write it into a ring buffer and the
//! agent can read it back byte for byte.
#![no_std]

/// The names under which the kernel object exports what the agent asks for: its programs,
/// its maps and its load-time globals. The agent uses these constants; in `collector-ebpf`
/// the names are the items' own identifiers, because aya's `#[map]` and `#[tracepoint]`
/// macros take string literals only. A test of the agent parses the built object and checks
/// every name here against it.
pub mod names {
    /// Programs, by the function names the kernel crate gives them.
    pub mod program {
        /// `inet_sock_set_state` into SYN_SENT, as a BTF tracepoint.
        pub const ATTEMPT_START: &str = "attempt_start";
        /// `inet_sock_set_state` out of SYN_SENT, as a BTF tracepoint.
        pub const ATTEMPT_END: &str = "attempt_end";
        /// The same two as classic tracepoints, for kernels without BTF.
        pub const ATTEMPT_START_CLASSIC: &str = "attempt_start_tp";
        pub const ATTEMPT_END_CLASSIC: &str = "attempt_end_tp";
        /// The tcp tracepoints that run in softirqs, as BTF tracepoints named after them,
        /// and as classic ones (`_tp`) for kernels without BTF.
        pub const TCP_RETRANSMIT_SKB: &str = "tcp_retransmit_skb";
        pub const TCP_RECEIVE_RESET: &str = "tcp_receive_reset";
        pub const TCP_SEND_RESET: &str = "tcp_send_reset";
        /// `tcp_retransmit_skb` on kernels whose tracepoint has no `err` argument yet (it
        /// fired only for retransmits that were sent): a program that read the argument would
        /// not load there.
        pub const TCP_RETRANSMIT_SKB_WITHOUT_ERR: &str = "tcp_retransmit_skb_without_err";
        pub const TCP_RETRANSMIT_SKB_CLASSIC: &str = "tcp_retransmit_skb_tp";
        pub const TCP_RECEIVE_RESET_CLASSIC: &str = "tcp_receive_reset_tp";
        pub const TCP_SEND_RESET_CLASSIC: &str = "tcp_send_reset_tp";
        /// Classic tracepoints, named after them: they run in the calling thread.
        pub const SYS_ENTER_CONNECT: &str = "sys_enter_connect";
        pub const SYS_EXIT_CONNECT: &str = "sys_exit_connect";
        /// A BTF tracepoint, named after its tracepoint too.
        pub const INET_SK_ERROR_REPORT: &str = "inet_sk_error_report";
        /// `skb:kfree_skb` as a BTF tracepoint.
        pub const KFREE_SKB: &str = "kfree_skb";
    }

    /// Maps the agent sizes, fills or reads.
    pub mod map {
        pub const IN_FLIGHT: &str = "IN_FLIGHT";
        pub const ATTEMPTS: &str = "ATTEMPTS";
        pub const PROCESS_NOTES: &str = "PROCESS_NOTES";
        pub const STACKS: &str = "STACKS";
        pub const COUNTERS: &str = "COUNTERS";
        pub const ATTEMPT_TUPLES: &str = "ATTEMPT_TUPLES";
        pub const ALLOW_PIDS: &str = "ALLOW_PIDS";
        pub const ALLOW_CGROUPS: &str = "ALLOW_CGROUPS";
        pub const ALLOW_PORTS: &str = "ALLOW_PORTS";
        pub const ALLOW_DESTS: &str = "ALLOW_DESTS";
        pub const CONNECT_SERIES: &str = "CONNECT_SERIES";
        pub const OVERFLOW_SERIES: &str = "OVERFLOW_SERIES";
        pub const THREAD_CONTEXT_TLS: &str = "THREAD_CONTEXT_TLS";
    }

    /// Read-only globals the agent sets before load.
    pub mod global {
        /// A [`crate::KernelLayout`].
        pub const LAYOUT: &str = "LAYOUT";
        /// A [`crate::Policy`].
        pub const POLICY: &str = "POLICY";
    }
}

/// Bits of [`AttemptRecord::handoff`]. An attempt that starts inside `connect()` has the
/// same user stack when the call returns, in the same thread, and most attempts (fast
/// successes under `--failures-only`) are dropped by then: the stack is walked only for an
/// attempt still in flight or kept when the call returns. Set and cleared atomically: with a
/// non-blocking `connect()`, the attempt can end on another CPU while the call returns.
pub mod handoff {
    /// The user stack is to be taken when the `connect()` call returns.
    pub const STACKS_PENDING: u64 = 1 << 0;
    /// The attempt ended, was kept, and waits in the in-flight map for its stack: whichever
    /// of the end and the call's return comes second sends it.
    pub const PARKED: u64 = 1 << 1;
}

/// Length of `task_struct::comm`, NUL included.
pub const TASK_COMM_LEN: usize = 16;

/// Retransmit timestamps kept per attempt. The count goes on past this; only the times of
/// later retransmits are lost. The kernel's default `tcp_syn_retries` is 6.
pub const MAX_RETRANSMIT_TIMES: usize = 16;

/// `AF_INET` and `AF_INET6` as the tracepoints report them.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;

/// Dropped packets kept per attempt with their own time, reason and place. The count goes
/// on past this, and the last drop is always kept.
pub const MAX_DROPS: usize = 8;

/// Bits of a dropped packet's byte in [`AttemptRecord::drop_packets`]: the low bits say
/// which handshake packet it was, the top bit where the kernel dropped it.
pub mod drop_packet {
    pub const SYN: u8 = 1;
    pub const SYN_ACK: u8 = 2;
    pub const ACK: u8 = 3;
    pub const RST: u8 = 4;
    /// Which packet: one of the values above.
    pub const KIND: u8 = 0x0f;
    /// Dropped on its way in (it had been received on an interface), else on its way out.
    pub const INGRESS: u8 = 1 << 7;
}

/// One packet of an attempt's handshake the kernel dropped (`skb:kfree_skb`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropRecord {
    /// The kernel code that dropped it (`nf_hook_slow+0x44`).
    pub location: u64,
    /// `enum skb_drop_reason`, as this kernel numbers it.
    pub reason: u32,
    /// Microseconds after the attempt started.
    pub at_us: u32,
}

impl DropRecord {
    pub const ZERO: Self = Self {
        location: 0,
        reason: 0,
        at_us: 0,
    };
}

/// TCP states as the kernel numbers them (`include/net/tcp_states.h`).
pub mod tcp_state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;
}

/// Bits of [`AttemptRecord::flags`].
pub mod attempt_flags {
    /// A RST arrived while the socket was in SYN_SENT.
    pub const RST_RECEIVED: u8 = 1 << 0;
    /// The socket itself sent a RST while in SYN_SENT: its SYN met a live connection.
    pub const RST_SENT: u8 = 1 << 1;
    /// A socket error (hard or soft, usually from ICMP) was seen before the socket closed.
    pub const ERROR_SEEN: u8 = 1 << 2;
    /// The retransmit timestamps ran out; `retransmits` still counts every one.
    pub const RETRANSMIT_TIMES_TRUNCATED: u8 = 1 << 3;
    /// The SYN met an existing connection; the `collision_*` fields describe its socket.
    pub const COLLISION: u8 = 1 << 4;
    /// `connect()` failed before the socket reached SYN_SENT (no route, say): no SYN was
    /// sent, `error` is the errno and `end_state` is 0.
    pub const NEVER_STARTED: u8 = 1 << 5;
    /// The attempt's full tuple, local port included, is in `ATTEMPT_TUPLES`.
    pub const TUPLE_KNOWN: u8 = 1 << 6;
}

/// One connect attempt, from SYN_SENT to the moment the socket left it.
///
/// The kernel keeps one of these per socket in flight, keyed by the socket's address, and
/// sends it to the agent once the attempt is over. Identity (pid, tid, comm, cgroup, user
/// stack) is captured at SYN_SENT in the application's own context; later events, which may
/// run in a timer or softirq, only add to it.
///
/// Times are `CLOCK_MONOTONIC` nanoseconds (`bpf_ktime_get_ns`). Ports are in host byte
/// order, addresses in network byte order (IPv4 in the first four bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttemptRecord {
    /// Kernel address of the socket. Identifies the attempt only while it is in flight.
    pub sock: u64,
    pub start_ns: u64,
    pub end_ns: u64,
    pub cgroup_id: u64,
    pub retransmit_ns: [u64; MAX_RETRANSMIT_TIMES],
    pub rst_received_ns: u64,
    pub rst_sent_ns: u64,
    pub first_error_ns: u64,
    /// When the colliding socket was seen to close.
    pub collision_ns: u64,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub comm: [u8; TASK_COMM_LEN],
    /// The socket the SYN met instead of a listener: its own local and peer endpoints (the
    /// peer is this attempt's local endpoint, as the colliding socket knew it).
    pub collision_local: [u8; 16],
    pub collision_peer: [u8; 16],
    /// The first [`MAX_DROPS`] handshake packets the kernel dropped, and their
    /// [`drop_packet`] bytes.
    pub drops: [DropRecord; MAX_DROPS],
    pub last_drop: DropRecord,
    pub drop_packets: [u8; MAX_DROPS],
    /// Thread group id (the "pid" users know) and thread id of the caller of `connect()`.
    pub pid: u32,
    pub tid: u32,
    /// SYN retransmits the kernel sent (`tcp_syn_retries` allows at most 127): 16 bits, so
    /// that the count below shares their four bytes and the record keeps its size.
    pub retransmits: u16,
    /// Retransmit timeouts at which the previous SYN had not left this host yet (still in a
    /// qdisc or the driver: the kernel's `-EBUSY`), so nothing was sent. Not in
    /// `retransmits`. Kernels whose `tcp_retransmit_skb` has no `err` leave it at 0 (and do
    /// not report these at all).
    pub retransmits_held: u16,
    /// `sk_err` when the socket left SYN_SENT: the errno `connect()` reports.
    pub error: i32,
    /// `sk_err_soft` at the same moment: an ICMP error that did not kill the attempt by itself.
    pub soft_error: i32,
    /// The first socket error seen while in SYN_SENT: at the exit of `connect()`, at a
    /// retransmit, or reported by the kernel. An ICMP error that arrives while `connect()`
    /// holds the socket is only a soft error, and the application may consume it
    /// (`SO_ERROR`) before it closes the socket; this keeps it.
    pub first_error: i32,
    /// Ids in the stack trace map; negative when not captured.
    pub user_stack_id: i32,
    pub kernel_stack_id: i32,
    pub end_kernel_stack_id: i32,
    /// Handshake packets the kernel dropped, all of them.
    pub drop_count: u32,
    pub family: u16,
    pub sport: u16,
    pub dport: u16,
    pub collision_local_port: u16,
    pub collision_peer_port: u16,
    /// The state the socket moved to when it left SYN_SENT.
    pub end_state: u8,
    pub flags: u8,
    /// The colliding socket's TCP state when it closed (FIN_WAIT2, CLOSE_WAIT, ...).
    pub collision_state: u8,
    pub last_drop_packet: u8,
    /// How many bytes of `user_stack` hold the stack: [`USER_STACK_BYTES`], or 0.
    pub user_stack_len: u16,
    /// The caller's user registers as `connect()` entered the kernel, and the top of its user
    /// stack from `user_sp`: what the agent unwinds the innermost frames from with the call
    /// frame information of their files, where frame pointers cannot (see
    /// [`USER_STACK_BYTES`]). All zero when not captured.
    pub user_regs: UserRegs,
    /// Bits of [`handoff`]: an attempt started inside `connect()` whose user stack is taken
    /// when the call returns. Kernel-side only; the agent ignores it. 64 bits: the only
    /// width BPF's atomic operations have on every kernel.
    pub handoff: u64,
    pub user_stack: [u8; USER_STACK_BYTES],
    /// The calling thread's OpenTelemetry thread context at SYN_SENT (OTEP 4947), when its
    /// process publishes one and the agent found where; zeros otherwise.
    pub thread_context: ThreadContextRecord,
}

/// Bytes of the user stack copied from the stack pointer at SYN_SENT. The frame that matters
/// most is the caller of libc's `connect()` wrapper, which makes the syscall without a frame
/// pointer of its own: its return address sits at `[sp]` (single-threaded) or `[sp+0x18]`
/// (multi-threaded), so 32 bytes find it. The rest lets the unwinder go on through the
/// caller's own frame (its locals, a `sockaddr` of 16 to 128 bytes, and saved registers) to
/// its caller, where a frame-pointer walk usually takes over. Every byte is copied on every
/// traced attempt and carried in its record, so no more than that.
pub const USER_STACK_BYTES: usize = 256;

/// User registers an unwinder starts from (x86-64: `rip`, `rsp`, `rbp`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UserRegs {
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
}

impl UserRegs {
    pub const ZERO: Self = Self { ip: 0, sp: 0, bp: 0 };
}

/// The fixed part of an OTEP 4947 thread-context record: `trace_id[16] span_id[8] valid:u8
/// trace_flags:u8 attrs_size:u16`.
pub const THREAD_CONTEXT_FIXED: usize = 28;
/// Attribute bytes read after it: the specification recommends records of at most 640 bytes.
pub const MAX_THREAD_CONTEXT_ATTRS: usize = 640 - THREAD_CONTEXT_FIXED;

/// A thread-context record as read from the application, byte for byte in its layout, with
/// `attrs_size` cut to the bytes actually read.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThreadContextRecord {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// 1 when the record is complete; anything else means "no context".
    pub valid: u8,
    pub trace_flags: u8,
    pub attrs_size: u16,
    /// `[key_index:u8][len:u8][len bytes of UTF-8]`, repeated.
    pub attrs: [u8; MAX_THREAD_CONTEXT_ATTRS],
}

impl ThreadContextRecord {
    pub const ZERO: Self = Self {
        trace_id: [0; 16],
        span_id: [0; 8],
        valid: 0,
        trace_flags: 0,
        attrs_size: 0,
        attrs: [0; MAX_THREAD_CONTEXT_ATTRS],
    };
}

/// How a process's threads find their `otel_thread_ctx_v1` pointer, from the thread pointer
/// (`fsbase` on x86-64): the agent resolves it per process and keeps it in
/// `THREAD_CONTEXT_TLS`, keyed by tgid.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadContextTls {
    /// One of [`tls_kind`].
    pub kind: u32,
    pub _pad: u32,
    /// [`tls_kind::DTV`], [`tls_kind::MUSL_DTV`]: the module id, the index into the
    /// thread's DTV.
    pub module: u64,
    /// [`tls_kind::STATIC`]: the variable is at `tp + offset`. The DTV kinds: at `offset`
    /// into the module's TLS block.
    pub offset: i64,
}

/// Values of [`ThreadContextTls::kind`].
pub mod tls_kind {
    /// Static TLS (initial-exec, local-exec, or a TLSDESC resolved to static TLS).
    pub const STATIC: u32 = 1;
    /// Dynamic TLS through glibc's DTV: `tcbhead_t.dtv` at `tp + 8`, 16-byte entries, the
    /// slot count one entry before the pointer, an unallocated block reads as `-1`.
    pub const DTV: u32 = 2;
    /// Dynamic TLS through musl's DTV: `struct pthread.dtv` at `tp + 8` as well, but 8-byte
    /// entries (block addresses), the slot count in entry 0. musl's `dlopen` gives every
    /// thread its block at once: no slot of a module it counts is unallocated.
    pub const MUSL_DTV: u32 = 3;
}

/// Offsets inside `struct task_struct`, from BTF; 0 means unknown.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskFields {
    pub flags: u16,
    /// `thread.fsbase`: the user thread pointer on x86-64.
    pub fsbase: u16,
}

/// The path from a task to its executable's file name, from BTF; all zero if any step is
/// missing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExeFields {
    /// `task_struct.mm`.
    pub task_mm: u16,
    /// `mm_struct.exe_file`.
    pub mm_exe_file: u16,
    /// `file.f_path.dentry`.
    pub file_dentry: u16,
    /// `dentry.d_name.name`.
    pub dentry_name: u16,
}

/// `task_struct.flags` bits of tasks whose thread pointer means nothing to an application
/// (`include/linux/sched.h`).
pub mod task_flags {
    pub const PF_IO_WORKER: u32 = 0x0000_0010;
    pub const PF_KTHREAD: u32 = 0x0020_0000;
}

impl AttemptRecord {
    pub const ZERO: Self = Self {
        sock: 0,
        start_ns: 0,
        end_ns: 0,
        cgroup_id: 0,
        retransmit_ns: [0; MAX_RETRANSMIT_TIMES],
        rst_received_ns: 0,
        rst_sent_ns: 0,
        first_error_ns: 0,
        collision_ns: 0,
        saddr: [0; 16],
        daddr: [0; 16],
        comm: [0; TASK_COMM_LEN],
        collision_local: [0; 16],
        collision_peer: [0; 16],
        drops: [DropRecord::ZERO; MAX_DROPS],
        last_drop: DropRecord::ZERO,
        drop_packets: [0; MAX_DROPS],
        pid: 0,
        tid: 0,
        retransmits: 0,
        error: 0,
        soft_error: 0,
        first_error: 0,
        user_stack_id: -1,
        kernel_stack_id: -1,
        end_kernel_stack_id: -1,
        drop_count: 0,
        family: 0,
        sport: 0,
        dport: 0,
        collision_local_port: 0,
        collision_peer_port: 0,
        end_state: 0,
        flags: 0,
        collision_state: 0,
        last_drop_packet: 0,
        user_stack_len: 0,
        retransmits_held: 0,
        user_regs: UserRegs::ZERO,
        handoff: 0,
        user_stack: [0; USER_STACK_BYTES],
        thread_context: ThreadContextRecord::ZERO,
    };
}

/// A `connect()` call in progress, by thread id: its arguments, looked at when the call fails
/// before SYN_SENT (which is rare), and the socket it put in SYN_SENT, if it did.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectCall {
    pub start_ns: u64,
    /// The user's `struct sockaddr *`, still valid when the call returns.
    pub uservaddr: u64,
    pub fd: u64,
    /// The socket the call put in SYN_SENT; 0 until it does (the call failed before SYN_SENT
    /// if it returns with 0 here).
    pub sock: u64,
}

/// Sent when a process starts an attempt from a user stack the kernel has not reported for
/// it before: the agent then reads what it needs of the process (identity, memory maps) while
/// the process is certainly alive, inside `connect()`. Steady state sends none.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessNote {
    pub pid: u32,
    /// The user stack at `connect()`, or -1.
    pub user_stack_id: i32,
    /// What still names the process and its frames if it exits before the agent reads
    /// `/proc/<pid>`: a client refused on loopback often does, within a millisecond.
    pub vanishing: VanishingProcess,
}

/// Bytes kept of the executable's file name (`task->mm->exe_file`'s dentry name, at most
/// `NAME_MAX` bytes in the kernel), with its terminating NUL.
pub const EXE_NAME_LEN: usize = 64;

/// Frames of the user stack taken with their file's build id: as many as a span shows.
pub const MAX_BUILD_ID_FRAMES: usize = 32;

/// One frame as `bpf_get_stack(BPF_F_USER_BUILD_ID)` writes it (`struct bpf_stack_build_id`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BuildIdFrame {
    /// [`build_id_status`].
    pub status: i32,
    pub build_id: [u8; 20],
    /// The offset in the file when `status` is `VALID`, else the address.
    pub offset_or_ip: u64,
}

/// `enum bpf_stack_build_id_status`.
pub mod build_id_status {
    pub const EMPTY: i32 = 0;
    pub const VALID: i32 = 1;
    pub const IP: i32 = 2;
}

/// Identity and stack of a process that needs no `/proc/<pid>`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VanishingProcess {
    /// NUL-terminated, all zero when unread.
    pub exe_name: [u8; EXE_NAME_LEN],
    /// How many of `frames` the kernel wrote: the user stack's first frames, the same walk as
    /// the note's stack id.
    pub frame_count: u32,
    pub _pad: u32,
    pub frames: [BuildIdFrame; MAX_BUILD_ID_FRAMES],
}

impl VanishingProcess {
    pub const EMPTY: Self = Self {
        exe_name: [0; EXE_NAME_LEN],
        frame_count: 0,
        _pad: 0,
        frames: [BuildIdFrame {
            status: build_id_status::EMPTY,
            build_id: [0; 20],
            offset_or_ip: 0,
        }; MAX_BUILD_ID_FRAMES],
    };
}

/// Byte offsets of the tracepoint fields the programs read.
///
/// Tracepoint formats are stable in spirit but do grow fields between kernels, so the agent
/// reads each offset from tracefs at start-up rather than trusting one kernel's layout.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SetStateFields {
    pub skaddr: u16,
    pub oldstate: u16,
    pub newstate: u16,
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    pub protocol: u16,
    pub saddr: u16,
    pub daddr: u16,
    pub saddr_v6: u16,
    pub daddr_v6: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetransmitFields {
    pub skaddr: u16,
    pub state: u16,
    pub sport: u16,
    /// The retransmit's result (kernels since it fires for failed ones too); 0: no such field.
    pub err: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResetFields {
    pub skaddr: u16,
}

/// Offsets inside `struct sock`, resolved from the kernel's BTF. Zero means unknown.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockFields {
    pub sk_err: u16,
    pub sk_err_soft: u16,
    /// `sock_common::skc_num`, the local port in host order. It sits past offset 0, so 0
    /// still means unknown.
    pub skc_num: u16,
}

/// Where `struct sock` keeps a connection's tuple, from BTF: what `inet_sock_set_state`
/// reads into its event, read straight from the socket by the BTF tracepoint programs.
/// Offsets can be 0 here (`skc_daddr` opens `struct sock`), so `known` says whether they
/// were found.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockTupleFields {
    pub known: u16,
    pub family: u16,
    pub protocol: u16,
    /// The local port in network order (`inet_sock::inet_sport`). Not `skc_num`: that is
    /// zeroed when the port is released, before the socket's last state change.
    pub sport: u16,
    /// The peer's port in network order (`skc_dport`).
    pub dport: u16,
    pub rcv_saddr: u16,
    pub daddr: u16,
    pub v6_rcv_saddr: u16,
    pub v6_daddr: u16,
    /// `skc_state`, one byte: what the classic tcp tracepoints put in their events, for the
    /// BTF ones that get only the socket.
    pub state: u16,
}

/// An attempt's tuple as a map key, oriented from the attempt: its local endpoint and its
/// peer. `local_port` is 0 in the entry made at SYN_SENT, before the kernel picks the port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AttemptTuple {
    pub local: [u8; 16],
    pub peer: [u8; 16],
    pub local_port: u16,
    pub peer_port: u16,
    pub family: u16,
    pub _pad: u16,
}

/// A TCP endpoint as a map key: the local endpoint of an attempt whose SYN met an existing
/// connection, which that connection knows as its peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: [u8; 16],
    pub port: u16,
    pub family: u16,
}

/// `syscalls:sys_enter_connect` and `sys_exit_connect` fields.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectFields {
    pub fd: u16,
    pub uservaddr: u16,
    pub ret: u16,
}

/// The path from the current task to the socket behind a file descriptor, from BTF:
/// `task_struct.files->fdt->fd[n]->private_data (struct socket)->sk->sk_protocol`. It tells a
/// TCP `connect()` from a UDP one before the socket has a state to show. Zero: unknown.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FdPathFields {
    pub task_files: u16,
    pub files_fdt: u16,
    pub fdtable_fd: u16,
    pub file_private_data: u16,
    pub socket_sk: u16,
    pub sock_protocol: u16,
    pub sock_type: u16,
}

/// Offsets inside `struct sk_buff`, from BTF, for reading a dropped packet's headers.
/// `known` says whether all were found.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SkbFields {
    pub known: u16,
    pub sk: u16,
    pub head: u16,
    /// `tail`, an offset from `head` where the kernel keeps offsets (64-bit kernels).
    pub tail: u16,
    pub network_header: u16,
    pub protocol: u16,
    pub skb_iif: u16,
}

/// Everything the programs need to know about this kernel's layouts.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelLayout {
    pub set_state: SetStateFields,
    pub retransmit: RetransmitFields,
    pub receive_reset: ResetFields,
    pub send_reset: ResetFields,
    pub sock: SockFields,
    pub tuple: SockTupleFields,
    pub connect: ConnectFields,
    pub fd_path: FdPathFields,
    pub skb: SkbFields,
    pub task: TaskFields,
    pub exe: ExeFields,
}

impl KernelLayout {
    /// All offsets unknown: what the object carries until the agent fills it in at load.
    pub const UNKNOWN: Self = Self {
        set_state: SetStateFields {
            skaddr: 0,
            oldstate: 0,
            newstate: 0,
            sport: 0,
            dport: 0,
            family: 0,
            protocol: 0,
            saddr: 0,
            daddr: 0,
            saddr_v6: 0,
            daddr_v6: 0,
        },
        retransmit: RetransmitFields {
            skaddr: 0,
            state: 0,
            sport: 0,
            err: 0,
        },
        receive_reset: ResetFields { skaddr: 0 },
        send_reset: ResetFields { skaddr: 0 },
        sock: SockFields {
            sk_err: 0,
            sk_err_soft: 0,
            skc_num: 0,
        },
        tuple: SockTupleFields {
            known: 0,
            family: 0,
            protocol: 0,
            sport: 0,
            dport: 0,
            rcv_saddr: 0,
            daddr: 0,
            v6_rcv_saddr: 0,
            v6_daddr: 0,
            state: 0,
        },
        connect: ConnectFields {
            fd: 0,
            uservaddr: 0,
            ret: 0,
        },
        fd_path: FdPathFields {
            task_files: 0,
            files_fdt: 0,
            fdtable_fd: 0,
            file_private_data: 0,
            socket_sk: 0,
            sock_protocol: 0,
            sock_type: 0,
        },
        skb: SkbFields {
            known: 0,
            sk: 0,
            head: 0,
            tail: 0,
            network_header: 0,
            protocol: 0,
            skb_iif: 0,
        },
        task: TaskFields { flags: 0, fsbase: 0 },
        exe: ExeFields {
            task_mm: 0,
            mm_exe_file: 0,
            file_dentry: 0,
            dentry_name: 0,
        },
    };
}

/// Which finished attempts the kernel sends to the agent. The rest are counted and dropped
/// in the kernel, at the cost of one map update.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Successes that took at least this long are kept. 0 disables the rule.
    pub slow_ns: u64,
    /// Other successes are kept when `bpf_get_prandom_u32() < sample_below`;
    /// `u32::MAX` with `sample_all` set keeps all of them.
    pub sample_below: u32,
    pub sample_all: u8,
    /// Keep successes that needed at least one SYN retransmit.
    pub keep_retried: u8,
    /// Capture kernel and user stacks.
    pub stacks: u8,
    /// Bits of [`filter`]: which allow-lists an attempt must match to be traced at all.
    pub filters: u8,
    /// The agent's process (tgid in the initial pid namespace): its own attempts are not
    /// traced. 0 (unknown: the agent runs in another pid namespace) excludes nothing.
    pub agent_tgid: u32,
    /// Attribute dropped handshake packets to attempts: keep each attempt's tuple in
    /// `ATTEMPT_TUPLES` while it is in flight.
    pub drop_reasons: u8,
    /// Keeps the struct free of implicit padding.
    pub reserved: [u8; 3],
    /// Drop reasons that are the kernel's ordinary answer to a packet, not a loss: a SYN to
    /// a closed port is "dropped" with NO_SOCKET after the RST that refuses it went out.
    /// Numbered as this kernel numbers them, 0 for none.
    pub answered_reasons: [u32; MAX_ANSWERED_REASONS],
    /// Count every finished attempt in `CONNECT_SERIES` (see [`SeriesKey`]).
    pub count_series: u8,
    /// Keeps the struct free of implicit padding.
    pub reserved_end: [u8; 3],
    /// Kept attempts sent to the agent per series ([`SeriesKey`]: process, destination,
    /// outcome) and second; the rest are counted as [`counter::RATE_LIMITED`] and dropped in
    /// the kernel. 0: no limit.
    pub span_rate_limit: u32,
}

/// Entries of [`Policy::answered_reasons`].
pub const MAX_ANSWERED_REASONS: usize = 2;

/// Bits of [`Policy::filters`]. Each set bit names an allow-list map the attempt must hit;
/// an attempt that misses is counted as filtered at SYN_SENT and never tracked.
pub mod filter {
    /// `ALLOW_PIDS`, keyed by tgid.
    pub const PID: u8 = 1 << 0;
    /// `ALLOW_CGROUPS`, keyed by cgroup v2 id.
    pub const CGROUP: u8 = 1 << 1;
    /// `ALLOW_PORTS`, keyed by destination port.
    pub const PORT: u8 = 1 << 2;
    /// `ALLOW_DESTS`, an LPM trie of destination prefixes over IPv6 addresses, with IPv4
    /// as `::ffff:a.b.c.d`.
    pub const DEST: u8 = 1 << 3;
}

/// Maximum entries of each allow-list map.
pub const MAX_FILTER_ENTRIES: u32 = 1024;

impl Policy {
    /// Every attempt is sent: the default.
    pub const ALL: Self = Self {
        slow_ns: 0,
        sample_below: u32::MAX,
        sample_all: 1,
        keep_retried: 0,
        stacks: 1,
        filters: 0,
        agent_tgid: 0,
        drop_reasons: 0,
        reserved: [0; 3],
        answered_reasons: [0; MAX_ANSWERED_REASONS],
        count_series: 0,
        reserved_end: [0; 3],
        span_rate_limit: 0,
    };
}

impl Default for Policy {
    fn default() -> Self {
        Self::ALL
    }
}

/// Slots of the per-CPU `COUNTERS` array.
pub mod counter {
    /// Attempts that entered SYN_SENT and were tracked.
    pub const STARTED: u32 = 0;
    /// Tracked attempts that left SYN_SENT.
    pub const FINISHED: u32 = 1;
    /// Finished attempts the policy dropped in the kernel.
    pub const FILTERED: u32 = 2;
    /// Finished attempts lost because the ring buffer was full.
    pub const RINGBUF_FULL: u32 = 3;
    /// An attempt started on a socket address whose previous attempt was never seen to
    /// finish: the old one is lost.
    pub const REPLACED: u32 = 4;
    /// Sockets that left SYN_SENT without a tracked attempt: they started before synspan
    /// did, or their entry was evicted from the in-flight map.
    pub const UNTRACKED_FINISH: u32 = 5;
    /// The in-flight map refused an insert.
    pub const TRACK_FAILED: u32 = 6;
    /// Attempts that missed an allow-list at SYN_SENT and were never tracked.
    pub const NOT_ALLOWED: u32 = 7;
    /// `connect()` calls that failed before SYN_SENT (also counted in STARTED and FINISHED).
    pub const NEVER_STARTED: u32 = 8;
    /// Handshake packets the kernel dropped that belonged to an attempt in flight.
    pub const DROPS_MATCHED: u32 = 9;
    /// TCP handshake packets dropped while attempts were in flight that belonged to none.
    pub const DROPS_UNMATCHED: u32 = 10;
    /// Kept attempts over their series' span rate limit ([`crate::Policy::span_rate_limit`]),
    /// dropped before the ring buffer. Their series still count them.
    pub const RATE_LIMITED: u32 = 11;
    pub const LEN: u32 = 12;
}

/// How an attempt ended, as the kernel counts it in [`SeriesKey::outcome`] and the agent
/// names it (`synspan.outcome`). Decided once, here, for both.
pub mod outcome {
    use crate::{AttemptRecord, attempt_flags, tcp_state};

    pub const ESTABLISHED: u8 = 0;
    pub const CONNECTION_REFUSED: u8 = 1;
    pub const TIMED_OUT: u8 = 2;
    pub const HOST_UNREACHABLE: u8 = 3;
    pub const NETWORK_UNREACHABLE: u8 = 4;
    /// The application closed the socket while it was still in SYN_SENT.
    pub const ABORTED: u8 = 5;
    /// No free ephemeral port: the kernel gave up before sending a SYN.
    pub const ADDRESS_NOT_AVAILABLE: u8 = 6;
    pub const OTHER: u8 = 7;
    /// Outcomes in all: the slots of `OVERFLOW_SERIES`.
    pub const LEN: u32 = 8;

    const ECONNREFUSED: i32 = 111;
    const ETIMEDOUT: i32 = 110;
    const EHOSTUNREACH: i32 = 113;
    const ENETUNREACH: i32 = 101;
    const EADDRNOTAVAIL: i32 = 99;

    /// The outcome a `connect()` errno stands for, if it names one.
    #[inline(always)]
    pub fn from_errno(errno: i32) -> Option<u8> {
        match errno {
            ECONNREFUSED => Some(CONNECTION_REFUSED),
            ETIMEDOUT => Some(TIMED_OUT),
            EHOSTUNREACH => Some(HOST_UNREACHABLE),
            ENETUNREACH => Some(NETWORK_UNREACHABLE),
            EADDRNOTAVAIL => Some(ADDRESS_NOT_AVAILABLE),
            _ => None,
        }
    }

    /// Classifies a finished attempt.
    ///
    /// `sk_err` at the moment the socket left SYN_SENT is the errno `connect()` reports, so
    /// it decides first. It is 0 in two cases the kernel does not flag otherwise: the
    /// application closed a pending connect, and `inet_hash_connect` found no free port
    /// (then no port was ever chosen, and the socket never sent a SYN).
    #[inline(always)]
    pub fn classify(record: &AttemptRecord) -> u8 {
        if record.flags & attempt_flags::NEVER_STARTED != 0 {
            return from_errno(record.error).unwrap_or(OTHER);
        }
        match record.end_state {
            tcp_state::ESTABLISHED => return ESTABLISHED,
            tcp_state::CLOSE => {}
            _ => return OTHER,
        }
        if record.error != 0 {
            return from_errno(record.error).unwrap_or(OTHER);
        }
        if record.flags & attempt_flags::RST_RECEIVED != 0 {
            return CONNECTION_REFUSED;
        }
        if record.sport == 0 && record.retransmits == 0 {
            return ADDRESS_NOT_AVAILABLE;
        }
        // The application closed the socket. If the kernel had told it why first (a soft
        // ICMP error, which reading SO_ERROR clears), that is why the attempt ended.
        if record.flags & attempt_flags::ERROR_SEEN != 0
            && let Some(outcome) = from_errno(record.first_error)
        {
            return outcome;
        }
        ABORTED
    }
}

/// Upper bounds (inclusive) of the connect-duration histogram's buckets, in nanoseconds;
/// one more bucket holds what is slower than the last. Decades of 1-2.5-5 from 100 µs to
/// 1 s resolve loopback and LAN connects; powers of two from 1 s to 128 s put a kernel
/// timeout after `tcp_syn_retries` = n (1 s, 3 s, 7 s, 15 s, 31 s, 63 s, 127 s: 2^(n+1) − 1,
/// a little more with the round trip) alone in the bucket that ends at 2^(n+1) s, and a
/// success after one retransmit (1 s and a round trip) in the one that ends at 2 s.
pub const DURATION_BOUNDS_NS: [u64; 20] = [
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_000_000_000,
    4_000_000_000,
    8_000_000_000,
    16_000_000_000,
    32_000_000_000,
    64_000_000_000,
    128_000_000_000,
];

/// Buckets of the connect-duration histogram.
pub const DURATION_BUCKETS: usize = DURATION_BOUNDS_NS.len() + 1;

/// One series of the connect metrics: who connected where, and how it ended. The kernel
/// counts every finished attempt under its key in `CONNECT_SERIES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeriesKey {
    /// The destination, in network byte order (IPv4 in the first four bytes).
    pub daddr: [u8; 16],
    /// The traced process (tgid).
    pub pid: u32,
    pub dport: u16,
    pub family: u16,
    /// One of [`outcome`].
    pub outcome: u8,
    pub _pad: [u8; 7],
}

/// What a series has sent to the agent in its current second (`SPAN_BUDGETS`); see
/// [`Policy::span_rate_limit`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpanBudget {
    /// When the second began.
    pub since_ns: u64,
    /// Attempts sent since then.
    pub sent: u64,
}

/// What the kernel counts per [`SeriesKey`], per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeriesValue {
    pub attempts: u64,
    pub syn_retransmits: u64,
    /// Sum of the attempts' durations.
    pub duration_ns: u64,
    /// Attempts per bucket of [`DURATION_BOUNDS_NS`].
    pub buckets: [u64; DURATION_BUCKETS],
}

impl SeriesValue {
    pub const ZERO: Self = Self {
        attempts: 0,
        syn_retransmits: 0,
        duration_ns: 0,
        buckets: [0; DURATION_BUCKETS],
    };
}

impl Default for SeriesValue {
    fn default() -> Self {
        Self::ZERO
    }
}

/// The bucket of [`DURATION_BOUNDS_NS`] a duration falls in.
#[inline(always)]
pub fn duration_bucket(ns: u64) -> usize {
    let mut i = 0;
    while i < DURATION_BOUNDS_NS.len() {
        if ns <= DURATION_BOUNDS_NS[i] {
            return i;
        }
        i += 1;
    }
    DURATION_BOUNDS_NS.len()
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: as below.
    unsafe impl aya::Pod for super::SeriesKey {}
    // SAFETY: as below.
    unsafe impl aya::Pod for super::SeriesValue {}
    // SAFETY: all of these are repr(C), hold only integers and arrays of integers, and have
    // no padding that the kernel would leave uninitialised.
    unsafe impl aya::Pod for super::AttemptRecord {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::KernelLayout {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Policy {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Endpoint {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ProcessNote {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnectCall {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ThreadContextTls {}
}
