//! Evidence for a retried or timed-out attempt to a listener in its own network namespace (a
//! sidecar, a local proxy, a database on the same host): how full its accept queue was.
//!
//! A SYN that meets a full accept queue, with SYN cookies off, is not dropped with a reason:
//! `tcp_conn_request` counts it in `ListenOverflows` and the packet is consumed, so
//! `skb:kfree_skb` never sees it. The queue itself is the evidence: `sock_diag` reports, for a
//! listening socket, the connections waiting to be accepted (`sk_ack_backlog`) and the
//! backlog `listen()` gave (`sk_max_ack_backlog`), as `ss -lnt` shows them. The kernel admits
//! one connection more than the backlog, so a queue holding more than its backlog is full.

use std::{
    io,
    net::{IpAddr, SocketAddr},
};

use netlink_packet_core::{
    DecodeError, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, InetResponseHeader, SocketId, StateFlags},
};
use netlink_sys::protocols::NETLINK_SOCK_DIAG;

use super::netlink::{self, NotReceived, RECV_TIMEOUT};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ListenerQueue {
    /// Connections waiting to be accepted.
    pub(crate) queued: u32,
    /// The backlog `listen()` gave.
    pub(crate) backlog: u32,
    /// `TcpExt: ListenOverflows` of the namespace: connections refused because an accept queue
    /// was full, since the namespace was made.
    pub(crate) overflows: Option<u64>,
}

impl ListenerQueue {
    pub(crate) fn is_full(&self) -> bool {
        self.queued > self.backlog
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ListenerError {
    #[error("sock_diag netlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("sock_diag did not answer within {RECV_TIMEOUT:?}")]
    Timeout,
    #[error("sock_diag lookup failed: {0}")]
    Kernel(#[source] io::Error),
    #[error("undecodable sock_diag answer: {0}")]
    Decode(#[from] DecodeError),
}

impl From<NotReceived> for ListenerError {
    fn from(not: NotReceived) -> Self {
        match not {
            NotReceived::Timeout => Self::Timeout,
            NotReceived::Failed(e) => Self::Socket(e),
            NotReceived::Truncated(e) => Self::Decode(e),
        }
    }
}

/// The listener `dst` reaches in the calling thread's network namespace (the evidence thread
/// enters the attempt's), if one listens there: the one bound to `dst`'s address or to every
/// address, the fullest of a `SO_REUSEPORT` group. An IPv4 destination is also served by a
/// dual-stack IPv6 listener. Blocks for up to [`RECV_TIMEOUT`] per answer.
pub(crate) fn lookup(dst: SocketAddr) -> Result<Option<ListenerQueue>, ListenerError> {
    let ip = dst.ip().to_canonical();
    let families: &[u8] = if ip.is_ipv4() {
        &[AF_INET, AF_INET6]
    } else {
        &[AF_INET6]
    };
    let mut found = None;
    for &family in families {
        found = query(family, dst.port())?
            .iter()
            .filter(|l| serves(&l.socket_id.source_address, ip))
            .map(|l| (l.recv_queue, l.send_queue))
            .max();
        if found.is_some() {
            break;
        }
    }
    Ok(found.map(|(queued, backlog)| ListenerQueue {
        queued,
        backlog,
        overflows: listen_overflows(),
    }))
}

/// Whether a listener bound to `bound` accepts connections to `ip`.
fn serves(bound: &IpAddr, ip: IpAddr) -> bool {
    bound.is_unspecified() || bound.to_canonical() == ip
}

const SEQUENCE: u32 = 1;
/// A listener's answer is under 100 bytes; the kernel fills a datagram up to about 16 KiB.
const RECV_BUFFER: usize = 32 * 1024;
/// Listeners on one port: a `SO_REUSEPORT` group has one per worker. More than this many
/// datagrams of them and something is off.
const MAX_DATAGRAMS: usize = 16;

/// Every listening TCP socket of `family` on `port`: the kernel filters a dump of listeners by
/// source port.
fn query(family: u8, port: u16) -> Result<Vec<InetResponseHeader>, ListenerError> {
    let socket = netlink::open(NETLINK_SOCK_DIAG).map_err(ListenerError::Socket)?;
    socket
        .send(&dump_request(family, port), 0)
        .map_err(ListenerError::Socket)?;
    let mut buf = Vec::with_capacity(RECV_BUFFER);
    let mut listeners = Vec::new();
    for _ in 0..MAX_DATAGRAMS {
        netlink::receive(&socket, &mut buf)?;
        if answer(&buf, port, &mut listeners)? {
            return Ok(listeners);
        }
    }
    Err(DecodeError::from("sock_diag's answer did not end").into())
}

/// Adds the listeners on `port` one datagram holds; `true` once the dump is done.
pub(crate) fn answer(
    datagram: &[u8],
    port: u16,
    listeners: &mut Vec<InetResponseHeader>,
) -> Result<bool, ListenerError> {
    for message in netlink::messages::<SockDiagMessage>(datagram)? {
        if message.header.sequence_number != SEQUENCE {
            continue;
        }
        match message.payload {
            NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response))
                if response.header.socket_id.source_port == port =>
            {
                listeners.push(response.header);
            }
            NetlinkPayload::Done(_) => return Ok(true),
            NetlinkPayload::Error(error) if error.code.is_some() => {
                return Err(ListenerError::Kernel(error.to_io()));
            }
            _ => {}
        }
    }
    Ok(false)
}

fn dump_request(family: u8, port: u16) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = SEQUENCE;
    let socket_id = SocketId {
        source_port: port,
        ..if family == AF_INET {
            SocketId::new_v4()
        } else {
            SocketId::new_v6()
        }
    };
    let mut message = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::LISTEN,
            socket_id,
        })
        .into(),
    );
    message.finalize();
    let mut buf = vec![0; message.buffer_len()];
    message.serialize(&mut buf);
    buf
}

/// `/proc/net/netstat` is a few KiB; what is longer is not read.
const MAX_NETSTAT: u64 = 64 * 1024;

/// `TcpExt: ListenOverflows` of the calling thread's network namespace.
fn listen_overflows() -> Option<u64> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open("/proc/thread-self/net/netstat")
        .ok()?
        .take(MAX_NETSTAT)
        .read_to_string(&mut text)
        .ok()?;
    netstat_counter(&text, "TcpExt:", "ListenOverflows")
}

/// A counter of `/proc/net/netstat`, whose sections are a line of names and a line of values
/// with the same prefix.
pub(crate) fn netstat_counter(text: &str, section: &str, name: &str) -> Option<u64> {
    let mut lines = text.lines().filter_map(|l| l.strip_prefix(section));
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if let Some((_, value)) = names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == name)
        {
            return value.parse().ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    #[test]
    fn reads_listen_overflows() {
        let text = "TcpExt: SyncookiesSent SyncookiesRecv ListenOverflows ListenDrops\n\
                    TcpExt: 0 0 7 9\n\
                    IpExt: InNoRoutes\n\
                    IpExt: 3\n";
        assert_eq!(netstat_counter(text, "TcpExt:", "ListenOverflows"), Some(7));
        assert_eq!(netstat_counter(text, "IpExt:", "InNoRoutes"), Some(3));
        assert_eq!(netstat_counter(text, "TcpExt:", "Missing"), None);
        assert_eq!(
            netstat_counter("TcpExt: ListenOverflows\n", "TcpExt:", "ListenOverflows"),
            None
        );
        assert_eq!(
            netstat_counter(
                "TcpExt: ListenOverflows\nTcpExt: x\n",
                "TcpExt:",
                "ListenOverflows"
            ),
            None
        );
    }

    #[test]
    fn finds_a_listener_in_our_own_namespace() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let found = lookup(addr).unwrap().unwrap();
        // std listens with a backlog of 128 (capped by net.core.somaxconn).
        assert!(found.backlog > 0 && found.backlog <= 4096, "{found:?}");
        assert_eq!(found.queued, 0);
        assert!(!found.is_full());
        assert!(found.overflows.is_some());
        let other = SocketAddr::new("127.0.0.2".parse().unwrap(), addr.port());
        assert_eq!(lookup(other).unwrap(), None, "bound to 127.0.0.1 only");
        // A socket holding its port without listening is no listener. (Looking the dropped
        // listener's port up again is no test: other tests of this binary bind ports of
        // 127.0.0.1 at the same time, and one took it once.)
        let bound = tokio::net::TcpSocket::new_v4().unwrap();
        bound.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        assert_eq!(lookup(bound.local_addr().unwrap()).unwrap(), None);
    }

    #[test]
    fn a_dual_stack_listener_serves_ipv4() {
        let Ok(listener) = TcpListener::bind("[::]:0") else {
            return;
        };
        let port = listener.local_addr().unwrap().port();
        let v4 = SocketAddr::new("127.0.0.1".parse().unwrap(), port);
        assert!(lookup(v4).unwrap().is_some());
    }

    #[test]
    fn undecodable_answers_are_errors() {
        let mut listeners = Vec::new();
        assert!(answer(&[0xff; 7], 80, &mut listeners).is_err());
        assert!(answer(&[], 80, &mut listeners).is_ok_and(|done| !done));
    }
}
