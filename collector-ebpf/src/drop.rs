//! `skb:kfree_skb` as a BTF tracepoint: the kernel dropped a packet, and says why
//! (`enum skb_drop_reason`) and where (the caller of `kfree_skb_reason`). When the packet is
//! part of an attempt's handshake, the drop goes on the attempt.
//!
//! It runs for every packet dropped on the host, so it leaves at its first test when no
//! attempt is in flight, and at its second when the packet is not TCP. Then:
//!
//! - A packet the attempt's own socket sends (its SYN) still has the socket in `skb->sk`:
//!   one lookup in the in-flight map.
//! - Any other (the SYN at a local listener, the SYN-ACK on its way back, a RST) is found by
//!   its headers' tuple in `ATTEMPT_TUPLES`, in either direction. Until the kernel's
//!   choice of local port is known to synspan, the entry without a port stands in, and the
//!   socket's own port must equal the packet's.
//!
//! Headers are read from the linear part of the packet only, and only inside it (`tail`),
//! through probe reads, which cannot fault.

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use synspan_shared::{
    AF_INET, AF_INET6, AttemptRecord, AttemptTuple, DropRecord, IPPROTO_TCP, MAX_DROPS, counter, drop_packet,
};

use crate::{
    helpers::{now_ns, read_kernel, read_kernel_at, read_sock_field},
    maps::{ATTEMPT_TUPLES, any_live, count, in_flight, layout, policy, remember_tuple},
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
/// The network header's offset when none was set (`(u16)~0U`).
const NO_HEADER: u16 = 0xffff;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

#[btf_tracepoint(function = "kfree_skb")]
pub(crate) fn kfree_skb(ctx: BtfTracePointContext) -> u32 {
    if any_live() {
        let _ = on_drop(&ctx);
    }
    0
}

/// A dropped TCP packet's tuple, as its headers give it, and which handshake packet it is.
struct Packet {
    family: u16,
    src: [u8; 16],
    dst: [u8; 16],
    sport: u16,
    dport: u16,
    kind: u8,
}

#[inline(always)]
fn on_drop(ctx: &BtfTracePointContext) -> Result<(), i32> {
    let f = layout().skb;
    if f.known == 0 {
        return Ok(());
    }
    let skb: u64 = ctx.arg(0);
    let location: u64 = ctx.arg(1);
    let reason = ctx.arg::<u64>(2) as u32;
    let Some(packet) = headers(skb)? else {
        return Ok(());
    };
    if policy()
        .answered_reasons
        .iter()
        .any(|&answered| answered != 0 && answered == reason)
    {
        return Ok(());
    }
    let sk: u64 = read_kernel_at(skb, f.sk)?;
    let Some((sock, attempt)) = owner(sk, &packet) else {
        count(counter::DROPS_UNMATCHED);
        return Ok(());
    };
    count(counter::DROPS_MATCHED);
    let iif: i32 = read_kernel_at(skb, f.skb_iif)?;
    let mut kind = packet.kind;
    if iif != 0 {
        kind |= drop_packet::INGRESS;
    }
    let now = now_ns();
    let drop = DropRecord {
        location,
        reason,
        at_us: (now.saturating_sub(attempt.start_ns) / 1000) as u32,
    };
    let n = attempt.drop_count as usize;
    if n < MAX_DROPS {
        attempt.drops[n] = drop;
        attempt.drop_packets[n] = kind;
    }
    attempt.last_drop = drop;
    attempt.last_drop_packet = kind;
    attempt.drop_count += 1;
    if attempt.sport == 0 {
        // A packet went out, so the kernel has picked the port: remember the full tuple.
        let port: u16 = read_sock_field(sock, layout().sock.skc_num);
        if port != 0 {
            attempt.sport = port;
            remember_tuple(attempt, port);
        }
    }
    Ok(())
}

/// The attempt a packet belongs to, and its socket: the one that sent it, else the one its
/// tuple names, as seen from either end.
#[inline(always)]
fn owner<'run>(sk: u64, packet: &Packet) -> Option<(u64, &'run mut AttemptRecord)> {
    if sk != 0
        && let Some(attempt) = in_flight(sk)
    {
        return Some((sk, attempt));
    }
    by_tuple(packet, &packet.src, packet.sport, &packet.dst, packet.dport)
        .or_else(|| by_tuple(packet, &packet.dst, packet.dport, &packet.src, packet.sport))
}

#[inline(always)]
fn by_tuple<'run>(
    packet: &Packet,
    local: &[u8; 16],
    local_port: u16,
    peer: &[u8; 16],
    peer_port: u16,
) -> Option<(u64, &'run mut AttemptRecord)> {
    let mut key = AttemptTuple {
        local: *local,
        peer: *peer,
        local_port,
        peer_port,
        family: packet.family,
        _pad: 0,
    };
    // SAFETY: the value is copied at once; the attempt it names is looked up again.
    if let Some(&sock) = unsafe { ATTEMPT_TUPLES.get(&key) } {
        return in_flight(sock).map(|a| (sock, a));
    }
    key.local_port = 0;
    // SAFETY: as above.
    let sock = unsafe { ATTEMPT_TUPLES.get(&key) }.copied()?;
    // The entry without a port names the latest attempt from this address to this peer: the
    // packet is its own only if the socket holds the packet's port.
    let port: u16 = read_sock_field(sock, layout().sock.skc_num);
    if port != local_port {
        return None;
    }
    in_flight(sock).map(|a| (sock, a))
}

/// The packet's IPv4 or IPv6 and TCP headers, if it is a TCP handshake packet whose headers
/// lie in its linear part. IPv6 extension headers are not walked: a handshake has none.
#[inline(always)]
fn headers(skb: u64) -> Result<Option<Packet>, i32> {
    let f = layout().skb;
    let protocol = u16::from_be(read_kernel_at(skb, f.protocol)?);
    if protocol != ETH_P_IP && protocol != ETH_P_IPV6 {
        return Ok(None);
    }
    let network: u16 = read_kernel_at(skb, f.network_header)?;
    let tail: u32 = read_kernel_at(skb, f.tail)?;
    let head: u64 = read_kernel_at(skb, f.head)?;
    if network == NO_HEADER || head == 0 {
        return Ok(None);
    }
    let ip = head + u64::from(network);
    let mut packet = Packet {
        family: 0,
        src: [0; 16],
        dst: [0; 16],
        sport: 0,
        dport: 0,
        kind: 0,
    };
    // Each header in one read, once it is known to lie inside the packet.
    let network = u32::from(network);
    let transport = if protocol == ETH_P_IP {
        if network + 20 > tail {
            return Ok(None);
        }
        let h: [u8; 20] = read_kernel(ip)?;
        if h[0] >> 4 != 4 || u16::from(h[9]) != IPPROTO_TCP {
            return Ok(None);
        }
        packet.src[..4].copy_from_slice(&h[12..16]);
        packet.dst[..4].copy_from_slice(&h[16..20]);
        packet.family = AF_INET;
        network + u32::from(h[0] & 0x0f) * 4
    } else {
        if network + 40 > tail {
            return Ok(None);
        }
        let h: [u8; 40] = read_kernel(ip)?;
        if h[0] >> 4 != 6 || u16::from(h[6]) != IPPROTO_TCP {
            return Ok(None);
        }
        packet.src.copy_from_slice(&h[8..24]);
        packet.dst.copy_from_slice(&h[24..40]);
        packet.family = AF_INET6;
        network + 40
    };
    // The TCP header's ports and flags: its first 14 bytes.
    if transport + 14 > tail {
        return Ok(None);
    }
    let tcp: [u8; 14] = read_kernel(head + u64::from(transport))?;
    packet.sport = u16::from_be_bytes([tcp[0], tcp[1]]);
    packet.dport = u16::from_be_bytes([tcp[2], tcp[3]]);
    let flags = tcp[13];
    packet.kind = match flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) {
        TCP_SYN => drop_packet::SYN,
        f if f == TCP_SYN | TCP_ACK => drop_packet::SYN_ACK,
        f if f & TCP_RST != 0 => drop_packet::RST,
        TCP_ACK => drop_packet::ACK,
        _ => return Ok(None),
    };
    Ok(Some(packet))
}
