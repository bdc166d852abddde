//! `Attempt`, the domain type: one TCP connect attempt as synspan reports it.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::SystemTime,
};

use std::sync::Arc;

use synspan_shared::{
    AF_INET, AF_INET6, AttemptRecord, DropRecord, MAX_DROPS, MAX_RETRANSMIT_TIMES, MAX_THREAD_CONTEXT_ATTRS,
    ThreadContextRecord, USER_STACK_BYTES, attempt_flags, drop_packet,
};

use crate::{
    clock::WallClock,
    enrich::thread_context,
    outcome::{Outcome, classify},
};

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Attempt {
    pub(crate) start: SystemTime,
    pub(crate) end: SystemTime,
    pub(crate) pid: u32,
    pub(crate) tid: u32,
    pub(crate) comm: String,
    pub(crate) cgroup_id: u64,
    pub(crate) local: SocketAddr,
    pub(crate) peer: SocketAddr,
    pub(crate) outcome: Outcome,
    /// The errno the application saw, 0 for success and for a plain close by the application.
    pub(crate) errno: i32,
    /// An ICMP error recorded as soft while the attempt went on.
    pub(crate) soft_errno: i32,
    pub(crate) syn_retransmits: u32,
    /// Retransmit timeouts at which the last SYN was still queued in this host, so that the
    /// kernel sent nothing.
    pub(crate) syn_retransmits_held: u16,
    pub(crate) events: Vec<AttemptEvent>,
    pub(crate) user_stack_id: Option<u32>,
    /// The registers and top of the user stack at SYN_SENT, for unwinding what the
    /// frame-pointer walk of `user_stack_id` missed.
    pub(crate) user_frame: Option<UserFrame>,
    pub(crate) kernel_stack_id: Option<u32>,
    pub(crate) end_kernel_stack_id: Option<u32>,
    /// The existing connection the SYN met instead of a listener, if it did.
    pub(crate) collision: Option<Collision>,
    /// `connect()` failed before the socket reached SYN_SENT: no SYN was sent, and the
    /// local endpoint is unknown.
    pub(crate) never_started: bool,
    /// Handshake packets the kernel dropped, in order: the first [`MAX_DROPS`], then one that
    /// stands for the rest ([`PacketDrop::count`]).
    pub(crate) drops: Vec<PacketDrop>,
    /// Every handshake packet the kernel dropped.
    pub(crate) drop_count: u32,
    /// The span that was active on the calling thread at SYN_SENT, as it published it.
    pub(crate) thread_context: Option<Box<ThreadContext>>,
}

/// An application's active span on the thread that connected (OTEP 4947 thread context).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ThreadContext {
    pub(crate) trace_id: [u8; 16],
    pub(crate) span_id: [u8; 8],
    /// W3C trace flags; bit 0 is `sampled`.
    pub(crate) trace_flags: u8,
    /// (key index, value) pairs, the key named by the process context's key map.
    pub(crate) attributes: Vec<(u8, String)>,
}

impl ThreadContext {
    /// A record the kernel copied: `None` unless marked valid and holding both ids.
    fn decode(record: &ThreadContextRecord) -> Option<Self> {
        let ids_set = record.trace_id != [0; 16] && record.span_id != [0; 8];
        if record.valid != 1 || !ids_set {
            return None;
        }
        let size = usize::from(record.attrs_size).min(MAX_THREAD_CONTEXT_ATTRS);
        Some(Self {
            trace_id: record.trace_id,
            span_id: record.span_id,
            trace_flags: record.trace_flags,
            attributes: thread_context::attributes(&record.attrs[..size])
                .into_iter()
                .map(|(k, v)| (k, v.to_owned()))
                .collect(),
        })
    }
}

/// The registers and stack bytes the kernel recorded at SYN_SENT.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct UserFrame {
    pub(crate) ip: u64,
    pub(crate) sp: u64,
    pub(crate) bp: u64,
    /// The stack from `sp` up, as copied: at most [`USER_STACK_BYTES`].
    pub(crate) stack: Arc<[u8]>,
}

impl UserFrame {
    /// What the record holds: nothing without the registers, and never more bytes than the
    /// record has room for, whatever its length says.
    fn decode(record: &AttemptRecord) -> Option<Self> {
        let regs = record.user_regs;
        if regs.ip == 0 || regs.sp == 0 {
            return None;
        }
        let len = (record.user_stack_len as usize).min(USER_STACK_BYTES);
        Some(Self {
            ip: regs.ip,
            sp: regs.sp,
            bp: regs.bp,
            stack: record.user_stack[..len].into(),
        })
    }
}

/// A handshake packet of the attempt that the kernel dropped, and why.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct PacketDrop {
    pub(crate) time: SystemTime,
    /// `SYN`, `SYN-ACK`, `ACK`, `RST`.
    pub(crate) packet: &'static str,
    /// `ingress` (it had been received on an interface) or `egress`.
    pub(crate) direction: &'static str,
    /// `enum skb_drop_reason`, as this kernel numbers it.
    pub(crate) reason: u32,
    pub(crate) location: u64,
    /// The drops this one stands for: 1, or for the last, every drop past the ones kept.
    pub(crate) count: u32,
    /// Named by the enrichment worker: `NETFILTER_DROP`, and the function `nf_hook_slow`.
    pub(crate) reason_name: Option<Arc<str>>,
    pub(crate) function: Option<Arc<str>>,
}

impl PacketDrop {
    /// The reason's name, or its number when it has none.
    pub(crate) fn reason_text(&self) -> String {
        match &self.reason_name {
            Some(name) => name.to_string(),
            None => format!("reason {}", self.reason),
        }
    }

    /// The function that dropped it, or its address.
    pub(crate) fn location_text(&self) -> String {
        match &self.function {
            Some(name) => name.to_string(),
            None => format!("{:#x}", self.location),
        }
    }

    fn decode(record: &AttemptRecord, drop: &DropRecord, packet: u8, count: u32, clock: &WallClock) -> Self {
        Self {
            // Saturating: the record comes from the kernel, but a start time near the end of
            // u64 must not make the agent panic.
            time: clock.to_system_time(record.start_ns.saturating_add(u64::from(drop.at_us) * 1000)),
            packet: match packet & drop_packet::KIND {
                drop_packet::SYN => "SYN",
                drop_packet::SYN_ACK => "SYN-ACK",
                drop_packet::ACK => "ACK",
                drop_packet::RST => "RST",
                _ => "unknown",
            },
            direction: if packet & drop_packet::INGRESS != 0 {
                "ingress"
            } else {
                "egress"
            },
            reason: drop.reason,
            location: drop.location,
            count,
            reason_name: None,
            function: None,
        }
    }
}

/// A lingering connection that answered this attempt's SYN, caught as it closed.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Collision {
    pub(crate) time: SystemTime,
    /// The colliding socket's own endpoint, e.g. a sidecar's 127.0.0.1:15001.
    pub(crate) local: SocketAddr,
    /// Its peer: the attempt's local endpoint, as that socket knew it.
    pub(crate) peer: SocketAddr,
    /// Its TCP state, e.g. `FIN_WAIT2`.
    pub(crate) state: &'static str,
}

/// The kernel's name for a TCP state.
pub(crate) fn tcp_state_name(state: u8) -> &'static str {
    use synspan_shared::tcp_state::*;
    match state {
        ESTABLISHED => "ESTABLISHED",
        SYN_SENT => "SYN_SENT",
        SYN_RECV => "SYN_RECV",
        FIN_WAIT1 => "FIN_WAIT1",
        FIN_WAIT2 => "FIN_WAIT2",
        TIME_WAIT => "TIME_WAIT",
        CLOSE => "CLOSE",
        CLOSE_WAIT => "CLOSE_WAIT",
        LAST_ACK => "LAST_ACK",
        LISTEN => "LISTEN",
        CLOSING => "CLOSING",
        _ => "UNKNOWN",
    }
}

/// Something the kernel showed while the attempt waited in SYN_SENT.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct AttemptEvent {
    pub(crate) time: SystemTime,
    pub(crate) kind: EventKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EventKind {
    /// The n-th SYN retransmit, counting from 1.
    SynRetransmit(u32),
    RstReceived,
    /// The client reset its own half-open connection: its SYN met an existing connection.
    RstSent,
    /// A socket error other than a reset or the final timeout, usually from an ICMP message;
    /// timed when synspan first saw it, which may be later than its arrival.
    IcmpError(i32),
    /// The existing connection the SYN met closed (on this attempt's RST).
    Collision,
    /// The kernel dropped a handshake packet: the n-th of [`Attempt::drops`].
    PacketDropped(usize),
}

impl EventKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            EventKind::SynRetransmit(_) => "syn_retransmit",
            EventKind::RstReceived => "rst_received",
            EventKind::RstSent => "rst_sent",
            EventKind::IcmpError(_) => "icmp_error",
            EventKind::Collision => "collision",
            EventKind::PacketDropped(_) => "packet_dropped",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum DecodeError {
    #[error("record of {0} bytes, expected {expected}", expected = size_of::<AttemptRecord>())]
    Size(usize),
    #[error("unknown address family {0}")]
    Family(u16),
}

/// Copies a ring-buffer record out of the kernel's bytes.
pub(crate) fn read_record(bytes: &[u8]) -> Result<AttemptRecord, DecodeError> {
    if bytes.len() < size_of::<AttemptRecord>() {
        return Err(DecodeError::Size(bytes.len()));
    }
    // SAFETY: AttemptRecord is repr(C) plain old data of which every bit pattern is valid,
    // and the length was checked; the ring buffer gives no alignment guarantee past 8.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<AttemptRecord>()) })
}

fn ip(family: u16, bytes: &[u8; 16]) -> Result<IpAddr, DecodeError> {
    match family {
        AF_INET => Ok(IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))),
        AF_INET6 => Ok(IpAddr::V6(Ipv6Addr::from(*bytes))),
        other => Err(DecodeError::Family(other)),
    }
}

/// The drops the record keeps, and the last one for those past them.
fn drops(record: &AttemptRecord, clock: &WallClock) -> Vec<PacketDrop> {
    let kept = (record.drop_count as usize).min(MAX_DROPS);
    let mut drops: Vec<PacketDrop> = record.drops[..kept]
        .iter()
        .zip(record.drop_packets)
        .map(|(drop, packet)| PacketDrop::decode(record, drop, packet, 1, clock))
        .collect();
    let rest = record.drop_count.saturating_sub(MAX_DROPS as u32);
    if rest > 0 {
        drops.push(PacketDrop::decode(
            record,
            &record.last_drop,
            record.last_drop_packet,
            rest,
            clock,
        ));
    }
    drops
}

fn stack_id(id: i32) -> Option<u32> {
    u32::try_from(id).ok()
}

/// The name the kernel keeps for a task: NUL-padded, at most 15 bytes, not always UTF-8.
pub(crate) fn comm(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

impl Attempt {
    pub(crate) fn decode(record: &AttemptRecord, clock: &WallClock) -> Result<Self, DecodeError> {
        let at = |ns| clock.to_system_time(ns);
        // The count can be anything the record says; only MAX_RETRANSMIT_TIMES are timed.
        let timed = (record.retransmits as usize).min(MAX_RETRANSMIT_TIMES);
        // The timed retransmits, and at most one of each other kind.
        let mut events = Vec::with_capacity(timed + 4);
        for (i, &ns) in record.retransmit_ns[..timed].iter().enumerate() {
            events.push(AttemptEvent {
                time: at(ns),
                kind: EventKind::SynRetransmit(i as u32 + 1),
            });
        }
        if record.flags & attempt_flags::RST_RECEIVED != 0 {
            events.push(AttemptEvent {
                time: at(record.rst_received_ns),
                kind: EventKind::RstReceived,
            });
        }
        if record.flags & attempt_flags::RST_SENT != 0 {
            events.push(AttemptEvent {
                time: at(record.rst_sent_ns),
                kind: EventKind::RstSent,
            });
        }
        let icmp = !matches!(record.first_error, 0 | libc::ECONNREFUSED | libc::ETIMEDOUT);
        if record.flags & attempt_flags::ERROR_SEEN != 0 && icmp {
            events.push(AttemptEvent {
                time: at(record.first_error_ns),
                kind: EventKind::IcmpError(record.first_error),
            });
        }
        let collision = if record.flags & attempt_flags::COLLISION != 0 {
            events.push(AttemptEvent {
                time: at(record.collision_ns),
                kind: EventKind::Collision,
            });
            Some(Collision {
                time: at(record.collision_ns),
                local: SocketAddr::new(
                    ip(record.family, &record.collision_local)?,
                    record.collision_local_port,
                ),
                peer: SocketAddr::new(
                    ip(record.family, &record.collision_peer)?,
                    record.collision_peer_port,
                ),
                state: tcp_state_name(record.collision_state),
            })
        } else {
            None
        };
        let drops = drops(record, clock);
        events.extend(drops.iter().enumerate().map(|(i, d)| AttemptEvent {
            time: d.time,
            kind: EventKind::PacketDropped(i),
        }));
        // Stable: a drop and the retransmit it caused can share a microsecond.
        events.sort_by_key(|e| e.time);
        let outcome = classify(record);
        // A soft error the application read and acted on is the errno it saw.
        let errno = if record.error == 0 && Outcome::from_errno(record.first_error) == Some(outcome) {
            record.first_error
        } else {
            record.error
        };
        Ok(Self {
            start: at(record.start_ns),
            end: at(record.end_ns),
            pid: record.pid,
            tid: record.tid,
            comm: comm(&record.comm),
            cgroup_id: record.cgroup_id,
            local: SocketAddr::new(ip(record.family, &record.saddr)?, record.sport),
            peer: SocketAddr::new(ip(record.family, &record.daddr)?, record.dport),
            outcome,
            errno,
            soft_errno: record.soft_error,
            syn_retransmits: u32::from(record.retransmits),
            syn_retransmits_held: record.retransmits_held,
            events,
            user_stack_id: stack_id(record.user_stack_id),
            user_frame: UserFrame::decode(record),
            kernel_stack_id: stack_id(record.kernel_stack_id),
            end_kernel_stack_id: stack_id(record.end_kernel_stack_id),
            collision,
            never_started: record.flags & attempt_flags::NEVER_STARTED != 0,
            drops,
            drop_count: record.drop_count,
            thread_context: ThreadContext::decode(&record.thread_context).map(Box::new),
        })
    }

    pub(crate) fn duration(&self) -> std::time::Duration {
        self.end.duration_since(self.start).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use synspan_shared::tcp_state;

    use super::*;

    fn timed_out_v4() -> AttemptRecord {
        let mut r = AttemptRecord::ZERO;
        r.start_ns = 1_000_000_000;
        r.end_ns = 8_100_000_000;
        r.family = AF_INET;
        r.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        r.daddr[..4].copy_from_slice(&[127, 0, 0, 2]);
        r.sport = 40000;
        r.dport = 80;
        r.pid = 42;
        r.tid = 43;
        r.comm[..2].copy_from_slice(b"nc");
        r.end_state = tcp_state::CLOSE;
        r.error = libc::ETIMEDOUT;
        r.retransmits = 2;
        r.retransmit_ns[0] = 2_000_000_000;
        r.retransmit_ns[1] = 3_000_000_000;
        r.kernel_stack_id = 7;
        r
    }

    /// Ten SYNs dropped on egress, one a second from the start: eight kept with their own
    /// time, the last two summed up in one that stands for both.
    #[test]
    fn drops_past_the_kept_ones_are_summed_up_in_the_last() {
        let mut r = timed_out_v4();
        let drop = |i: u32| DropRecord {
            location: 0xffff_ffff_8100_0000 + u64::from(i),
            reason: 12,
            at_us: i * 1_000_000,
        };
        for i in 0..MAX_DROPS as u32 {
            r.drops[i as usize] = drop(i);
            r.drop_packets[i as usize] = drop_packet::SYN;
        }
        r.drop_packets[1] = drop_packet::SYN_ACK | drop_packet::INGRESS;
        r.last_drop = drop(9);
        r.last_drop_packet = drop_packet::SYN;
        r.drop_count = 10;
        let clock = WallClock::from_offset(0);
        let a = Attempt::decode(&r, &clock).unwrap();
        assert_eq!(a.drop_count, 10);
        assert_eq!(a.drops.len(), MAX_DROPS + 1);
        assert_eq!((a.drops[0].packet, a.drops[0].direction), ("SYN", "egress"));
        assert_eq!((a.drops[1].packet, a.drops[1].direction), ("SYN-ACK", "ingress"));
        assert!(a.drops[..MAX_DROPS].iter().all(|d| d.count == 1));
        let last = a.drops.last().unwrap();
        assert_eq!((last.count, last.location), (2, drop(9).location));
        assert_eq!(last.time, clock.to_system_time(r.start_ns + 9_000_000_000));
        // In time order with the retransmits: drop 0 at the start, then the retransmit and
        // the drop of the same instant, the retransmit first (the sort is stable).
        let kinds: Vec<EventKind> = a.events.iter().take(3).map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [
                EventKind::PacketDropped(0),
                EventKind::SynRetransmit(1),
                EventKind::PacketDropped(1)
            ]
        );
        assert_eq!(a.drops[0].reason_text(), "reason 12");

        r.drop_count = 0;
        assert!(Attempt::decode(&r, &clock).unwrap().drops.is_empty());
    }

    #[test]
    fn decodes_bytes_and_fields() {
        let r = timed_out_v4();
        // SAFETY: the record is repr(C) with no implicit padding (see its Pod impl in shared/),
        // so every byte is initialized; it is borrowed for as long as the slice lives.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&r as *const AttemptRecord).cast::<u8>(),
                size_of::<AttemptRecord>(),
            )
        };
        assert_eq!(read_record(bytes).unwrap(), r);
        assert_eq!(read_record(&bytes[..10]), Err(DecodeError::Size(10)));

        let clock = WallClock::from_offset(1_000_000_000_000_000_000);
        let a = Attempt::decode(&r, &clock).unwrap();
        assert_eq!(a.local, "127.0.0.1:40000".parse().unwrap());
        assert_eq!(a.peer, "127.0.0.2:80".parse().unwrap());
        assert_eq!(a.comm, "nc");
        assert_eq!(a.outcome, Outcome::TimedOut);
        assert_eq!(a.duration(), Duration::from_millis(7100));
        assert_eq!(
            a.start,
            UNIX_EPOCH + Duration::from_nanos(1_000_000_001_000_000_000)
        );
        assert_eq!(a.events.len(), 2);
        assert_eq!(a.events[1].kind, EventKind::SynRetransmit(2));
        assert_eq!(
            a.events[1].time,
            UNIX_EPOCH + Duration::from_nanos(1_000_000_003_000_000_000)
        );
        assert_eq!(a.kernel_stack_id, Some(7));
        assert_eq!(a.user_stack_id, None);
    }

    #[test]
    fn decodes_ipv6_and_rejects_unknown_family() {
        let mut r = timed_out_v4();
        r.family = AF_INET6;
        r.saddr = Ipv6Addr::LOCALHOST.octets();
        r.daddr = Ipv6Addr::LOCALHOST.octets();
        let a = Attempt::decode(&r, &WallClock::from_offset(0)).unwrap();
        assert_eq!(a.peer, "[::1]:80".parse().unwrap());
        r.family = 1;
        assert_eq!(
            Attempt::decode(&r, &WallClock::from_offset(0)),
            Err(DecodeError::Family(1))
        );
    }

    #[test]
    fn events_in_time_order() {
        let mut r = timed_out_v4();
        r.flags = attempt_flags::RST_SENT | attempt_flags::RETRANSMIT_TIMES_TRUNCATED;
        r.rst_sent_ns = 1_500_000_000;
        let a = Attempt::decode(&r, &WallClock::from_offset(0)).unwrap();
        let kinds: Vec<_> = a.events.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [
                EventKind::RstSent,
                EventKind::SynRetransmit(1),
                EventKind::SynRetransmit(2)
            ]
        );
    }

    #[test]
    fn a_retransmit_count_past_the_timed_ones_allocates_only_those() {
        // Found by fuzzing: the count sized the event list, 4 billion events' worth.
        let mut r = timed_out_v4();
        r.retransmits = u16::MAX;
        r.retransmit_ns = [2_000_000_000; MAX_RETRANSMIT_TIMES];
        let a = Attempt::decode(&r, &WallClock::from_offset(0)).unwrap();
        assert_eq!(a.syn_retransmits, u32::from(u16::MAX));
        assert_eq!(a.events.len(), MAX_RETRANSMIT_TIMES);
        assert!(a.events.capacity() <= MAX_RETRANSMIT_TIMES + 4);
    }

    #[test]
    fn a_drop_time_past_the_end_of_the_clock_saturates() {
        // Found by fuzzing: a start time near u64::MAX plus a drop's offset overflowed.
        let mut r = timed_out_v4();
        r.start_ns = u64::MAX - 10;
        r.drop_count = 1;
        r.drops[0] = DropRecord {
            location: 1,
            reason: 2,
            at_us: u32::MAX,
        };
        r.drop_packets[0] = drop_packet::SYN;
        let a = Attempt::decode(&r, &WallClock::from_offset(0)).unwrap();
        assert_eq!(a.drops.len(), 1);
    }

    #[test]
    fn comm_stops_at_nul_and_survives_bad_utf8() {
        assert_eq!(comm(b"curl\0\0\0"), "curl");
        assert_eq!(comm(&[0xff, b'a', 0]), "\u{fffd}a");
        assert_eq!(comm(b"exactly16bytes!!"), "exactly16bytes!!");
    }
}
