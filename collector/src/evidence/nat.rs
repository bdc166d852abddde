//! Where an attempt really went: the conntrack entry of its tuple, read over ctnetlink in the
//! attempt's own network namespace.
//!
//! A connect to a service address is often rewritten on the way out (kube-proxy DNAT, a
//! sidecar's REDIRECT, masquerading). The socket, and so the attempt, only shows the address
//! the application asked for; the reply tuple of the conntrack entry shows where the SYN was
//! sent and from which source.
//!
//! Conntrack tables are per network namespace and a netlink socket answers for the namespace
//! it was created in, so the socket is made on a short-lived thread that entered the
//! attempt's namespace ([`in_netns`](super::netns::in_netns)). The alternative, a cache of sockets by namespace,
//! would keep every cached namespace alive after its container is gone.

use std::{
    io,
    net::{IpAddr, SocketAddr},
};

use netlink_packet_core::{
    DecodeError, NLM_F_ACK, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
    conntrack::{
        ConntrackAttribute, ConntrackMessage, IPTuple, ProtoInfo, ProtoInfoTCP, ProtoTuple, Protocol,
        Tuple as CtTuple,
    },
};
use netlink_sys::{Socket, protocols::NETLINK_NETFILTER};

use super::netlink::{self, NotReceived, RECV_TIMEOUT};
#[cfg(test)]
use super::netns::NetnsError;

/// Conntrack status bits (`enum ip_conntrack_status` in the kernel's uapi).
pub(crate) mod status {
    #[cfg(test)]
    pub(crate) const SEEN_REPLY: u32 = 1 << 1;
    #[cfg(test)]
    pub(crate) const CONFIRMED: u32 = 1 << 3;
    pub(crate) const SRC_NAT: u32 = 1 << 4;
    pub(crate) const DST_NAT: u32 = 1 << 5;
}

/// A TCP connection's addresses as the client sent them (conntrack's original direction).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Tuple {
    pub(crate) src: SocketAddr,
    pub(crate) dst: SocketAddr,
}

/// What conntrack did to a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Translation {
    /// Where the original destination really went: the DNAT or REDIRECT target, or the
    /// destination itself when nothing rewrote it.
    pub(crate) reply_src: SocketAddr,
    /// What the source became: the SNAT or masquerade address and port, or the source itself.
    pub(crate) reply_dst: SocketAddr,
    pub(crate) dnat: bool,
    pub(crate) snat: bool,
    /// Conntrack's TCP state, e.g. `SYN_SENT`, `ESTABLISHED`, `CLOSE`.
    pub(crate) tcp_state: Option<String>,
    /// The entry's status bits, see [`status`].
    pub(crate) status: u32,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum NatError {
    /// Only where the tests' `lookup` enters a namespace itself; the evidence thread enters
    /// it once for all its lookups.
    #[cfg(test)]
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("tuple {src} -> {dst} mixes address families")]
    MixedFamilies { src: SocketAddr, dst: SocketAddr },
    #[error(
        "the kernel has no conntrack netlink interface (CONFIG_NF_CT_NETLINK, module \
         nf_conntrack_netlink): {0}"
    )]
    Unsupported(#[source] io::Error),
    #[error("reading conntrack needs CAP_NET_ADMIN in the namespace: {0}")]
    PermissionDenied(#[source] io::Error),
    #[error("conntrack netlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("conntrack did not answer within {RECV_TIMEOUT:?}")]
    Timeout,
    #[error("conntrack lookup failed: {0}")]
    Kernel(#[source] io::Error),
    #[error("undecodable conntrack answer: {0}")]
    Decode(#[from] DecodeError),
}

impl From<NotReceived> for NatError {
    fn from(not: NotReceived) -> Self {
        match not {
            NotReceived::Timeout => Self::Timeout,
            NotReceived::Failed(e) => Self::Socket(e),
            NotReceived::Truncated(e) => Self::Decode(e),
        }
    }
}

/// The conntrack entry of `tuple` in the calling thread's network namespace (the evidence
/// thread enters the attempt's: [`in_netns`](super::netns::in_netns)); `None` when conntrack
/// has none, which is also the answer where nothing in the namespace enabled conntrack.
///
/// An IPv4-mapped IPv6 tuple (an IPv6 socket connecting to an IPv4 address) is looked up as
/// the IPv4 tuple the packets carried. Needs CAP_NET_ADMIN in the namespace. Blocks for up to
/// [`RECV_TIMEOUT`] per answer.
pub(super) fn lookup_here(tuple: &Tuple) -> Result<Option<Translation>, NatError> {
    query(&canonical(tuple)?)
}

fn canonical(tuple: &Tuple) -> Result<Tuple, NatError> {
    let src = SocketAddr::new(tuple.src.ip().to_canonical(), tuple.src.port());
    let dst = SocketAddr::new(tuple.dst.ip().to_canonical(), tuple.dst.port());
    if src.is_ipv4() != dst.is_ipv4() {
        return Err(NatError::MixedFamilies {
            src: tuple.src,
            dst: tuple.dst,
        });
    }
    Ok(Tuple { src, dst })
}

const SEQUENCE: u32 = 1;
/// An entry with every attribute is well under 1 KiB; the rest is headroom.
const RECV_BUFFER: usize = 16 * 1024;
/// Answers are the entry and the acknowledgement; more than this and something is off.
const MAX_DATAGRAMS: usize = 8;

fn query(tuple: &Tuple) -> Result<Option<Translation>, NatError> {
    let socket = open_socket()?;
    socket.send(&get_request(tuple), 0).map_err(NatError::Socket)?;
    let mut buf = Vec::with_capacity(RECV_BUFFER);
    let mut found = None;
    for _ in 0..MAX_DATAGRAMS {
        netlink::receive(&socket, &mut buf)?;
        for message in netlink::messages::<NetfilterMessage>(&buf)? {
            if message.header.sequence_number != SEQUENCE {
                continue;
            }
            match message.payload {
                NetlinkPayload::InnerMessage(NetfilterMessage {
                    inner: NetfilterMessageInner::Conntrack(ConntrackMessage::New(attributes)),
                    ..
                }) => found = translation(tuple, &attributes),
                // The acknowledgement: it comes after the entry, if there is one.
                NetlinkPayload::Error(ack) if ack.code.is_none() => return Ok(found),
                NetlinkPayload::Error(error) => return answer_error(error.to_io()),
                NetlinkPayload::Done(_) => return Ok(found),
                _ => {}
            }
        }
    }
    Err(DecodeError::from("no acknowledgement from conntrack").into())
}

fn answer_error(error: io::Error) -> Result<Option<Translation>, NatError> {
    match error.raw_os_error() {
        Some(libc::ENOENT) => Ok(None),
        Some(libc::EPERM) => Err(NatError::PermissionDenied(error)),
        Some(libc::EOPNOTSUPP) => Err(NatError::Unsupported(error)),
        _ => Err(NatError::Kernel(error)),
    }
}

fn open_socket() -> Result<Socket, NatError> {
    netlink::open(NETLINK_NETFILTER).map_err(|e| match e.raw_os_error() {
        Some(libc::EPROTONOSUPPORT) => NatError::Unsupported(e),
        _ => NatError::Socket(e),
    })
}

/// IPCTNL_MSG_CT_GET for one original-direction tuple: the kernel hashes it and answers with
/// that entry alone, where a dump would walk the whole table.
fn get_request(tuple: &Tuple) -> Vec<u8> {
    let family = if tuple.src.is_ipv4() {
        NetfilterProtoFamily::IPv4
    } else {
        NetfilterProtoFamily::IPv6
    };
    let orig = ConntrackAttribute::CtaTupleOrig(vec![
        CtTuple::Ip(vec![
            IPTuple::SourceAddress(tuple.src.ip()),
            IPTuple::DestinationAddress(tuple.dst.ip()),
        ]),
        CtTuple::Proto(vec![
            ProtoTuple::Protocol(Protocol::Tcp),
            ProtoTuple::SourcePort(tuple.src.port()),
            ProtoTuple::DestinationPort(tuple.dst.port()),
        ]),
    ]);
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK;
    header.sequence_number = SEQUENCE;
    let mut message = NetlinkMessage::new(
        header,
        NetlinkPayload::from(NetfilterMessage::new(
            NetfilterHeader::new(family, 0, 0),
            ConntrackMessage::Get(vec![orig]),
        )),
    );
    message.finalize();
    let mut buf = vec![0; message.buffer_len()];
    message.serialize(&mut buf);
    buf
}

/// The source and destination of a conntrack tuple, if it is a complete TCP one.
fn endpoints(tuple: &[CtTuple]) -> Option<(SocketAddr, SocketAddr)> {
    let (mut src, mut dst, mut sport, mut dport, mut tcp) = (None, None, None, None, false);
    for part in tuple {
        match part {
            CtTuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(a) => src = Some(*a),
                        IPTuple::DestinationAddress(a) => dst = Some(*a),
                        _ => {}
                    }
                }
            }
            CtTuple::Proto(protos) => {
                for proto in protos {
                    match proto {
                        ProtoTuple::Protocol(p) => tcp = matches!(p, Protocol::Tcp),
                        ProtoTuple::SourcePort(p) => sport = Some(*p),
                        ProtoTuple::DestinationPort(p) => dport = Some(*p),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    let (src, dst): (IpAddr, IpAddr) = (src?, dst?);
    tcp.then_some((SocketAddr::new(src, sport?), SocketAddr::new(dst, dport?)))
}

/// `enum tcp_conntrack` in the kernel, as the `conntrack` tool names the states.
fn tcp_state_name(state: u8) -> String {
    const NAMES: [&str; 10] = [
        "NONE",
        "SYN_SENT",
        "SYN_RECV",
        "ESTABLISHED",
        "FIN_WAIT",
        "CLOSE_WAIT",
        "LAST_ACK",
        "TIME_WAIT",
        "CLOSE",
        "SYN_SENT2",
    ];
    NAMES
        .get(usize::from(state))
        .map_or_else(|| format!("UNKNOWN_{state}"), |name| (*name).to_owned())
}

/// The translation an entry's attributes describe for `requested`.
fn translation(requested: &Tuple, attributes: &[ConntrackAttribute]) -> Option<Translation> {
    let (mut orig, mut reply, mut status, mut tcp_state) = (None, None, 0, None);
    for attribute in attributes {
        match attribute {
            ConntrackAttribute::CtaTupleOrig(t) => orig = endpoints(t),
            ConntrackAttribute::CtaTupleReply(t) => reply = endpoints(t),
            ConntrackAttribute::CtaStatus(s) => status = s.bits(),
            ConntrackAttribute::CtaProtoInfo(infos) => {
                tcp_state = infos.iter().find_map(|info| match info {
                    ProtoInfo::TCP(tcp) => tcp.iter().find_map(|t| match t {
                        ProtoInfoTCP::State(s) => Some(tcp_state_name(*s)),
                        _ => None,
                    }),
                    _ => None,
                })
            }
            _ => {}
        }
    }
    let (reply_src, reply_dst) = reply?;
    // The kernel finds an entry by either of its tuples: a hit on the reply tuple is another
    // connection whose answers look like this attempt, and says nothing about the attempt.
    if orig != Some((requested.src, requested.dst)) {
        tracing::debug!(
            "conntrack matched {} -> {} as the reply of {orig:?}",
            requested.src,
            requested.dst
        );
        return None;
    }
    Some(Translation {
        reply_src,
        reply_dst,
        dnat: reply_src != requested.dst || status & status::DST_NAT != 0,
        snat: reply_dst != requested.src || status & status::SRC_NAT != 0,
        tcp_state,
        status,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use netlink_packet_netfilter::conntrack::Status;

    use super::{super::netns::in_netns, *};

    /// [`lookup_here`] in the namespace file `netns`, entered for this lookup alone.
    fn lookup(netns: &Path, tuple: &Tuple) -> Result<Option<Translation>, NatError> {
        in_netns(netns, || lookup_here(tuple))?
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn ct_tuple(src: SocketAddr, dst: SocketAddr) -> Vec<CtTuple> {
        vec![
            CtTuple::Ip(vec![
                IPTuple::SourceAddress(src.ip()),
                IPTuple::DestinationAddress(dst.ip()),
            ]),
            CtTuple::Proto(vec![
                ProtoTuple::Protocol(Protocol::Tcp),
                ProtoTuple::SourcePort(src.port()),
                ProtoTuple::DestinationPort(dst.port()),
            ]),
        ]
    }

    fn entry(orig: (&str, &str), reply: (&str, &str), status: u32, state: u8) -> Vec<ConntrackAttribute> {
        vec![
            ConntrackAttribute::CtaTupleOrig(ct_tuple(addr(orig.0), addr(orig.1))),
            ConntrackAttribute::CtaTupleReply(ct_tuple(addr(reply.0), addr(reply.1))),
            ConntrackAttribute::CtaStatus(Status::from_bits_retain(status)),
            ConntrackAttribute::CtaProtoInfo(vec![ProtoInfo::TCP(vec![ProtoInfoTCP::State(state)])]),
        ]
    }

    #[test]
    fn reads_a_redirect_from_the_reply_tuple() {
        let tuple = Tuple {
            src: addr("198.18.0.1:40000"),
            dst: addr("198.18.0.100:7777"),
        };
        let attrs = entry(
            ("198.18.0.1:40000", "198.18.0.100:7777"),
            ("127.0.0.1:15001", "198.18.0.1:40000"),
            status::DST_NAT | status::CONFIRMED,
            3,
        );
        let t = translation(&tuple, &attrs).unwrap();
        assert_eq!(t.reply_src, addr("127.0.0.1:15001"));
        assert_eq!(t.reply_dst, tuple.src);
        assert!(t.dnat && !t.snat);
        assert_eq!(t.tcp_state.as_deref(), Some("ESTABLISHED"));
    }

    #[test]
    fn reads_masquerading_and_plain_entries() {
        let tuple = Tuple {
            src: addr("[2001:db8::1]:40000"),
            dst: addr("[2001:db8::2]:443"),
        };
        let masq = entry(
            ("[2001:db8::1]:40000", "[2001:db8::2]:443"),
            ("[2001:db8::2]:443", "[2001:db8::9]:61000"),
            status::SRC_NAT,
            1,
        );
        let t = translation(&tuple, &masq).unwrap();
        assert!(t.snat && !t.dnat);
        assert_eq!(t.reply_dst, addr("[2001:db8::9]:61000"));
        assert_eq!(t.tcp_state.as_deref(), Some("SYN_SENT"));

        let plain = entry(
            ("[2001:db8::1]:40000", "[2001:db8::2]:443"),
            ("[2001:db8::2]:443", "[2001:db8::1]:40000"),
            0,
            8,
        );
        let t = translation(&tuple, &plain).unwrap();
        assert!(!t.snat && !t.dnat);
        assert_eq!(t.tcp_state.as_deref(), Some("CLOSE"));
    }

    #[test]
    fn a_hit_on_the_reply_tuple_is_not_the_attempt() {
        let tuple = Tuple {
            src: addr("10.0.0.1:80"),
            dst: addr("10.0.0.2:5000"),
        };
        let other = entry(
            ("10.0.0.2:5000", "10.0.0.9:80"),
            ("10.0.0.1:80", "10.0.0.2:5000"),
            0,
            3,
        );
        assert_eq!(translation(&tuple, &other), None);
    }

    #[test]
    fn mapped_ipv4_is_looked_up_as_ipv4() {
        let t = canonical(&Tuple {
            src: addr("[::ffff:10.0.0.1]:40000"),
            dst: addr("[::ffff:10.0.0.2]:80"),
        })
        .unwrap();
        assert_eq!(t.src, addr("10.0.0.1:40000"));
        assert_eq!(t.dst, addr("10.0.0.2:80"));
        assert!(matches!(
            canonical(&Tuple {
                src: addr("10.0.0.1:1"),
                dst: addr("[2001:db8::1]:2"),
            }),
            Err(NatError::MixedFamilies { .. })
        ));
    }

    #[test]
    fn request_round_trips() {
        let tuple = Tuple {
            src: addr("198.18.0.1:40000"),
            dst: addr("198.18.0.100:7777"),
        };
        let bytes = get_request(&tuple);
        let parsed = netlink::messages::<NetfilterMessage>(&bytes).unwrap();
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].header.flags, NLM_F_REQUEST | NLM_F_ACK);
        // ctnetlink subsystem (1) << 8 | IPCTNL_MSG_CT_GET (1)
        assert_eq!(parsed[0].header.message_type, 0x0101);
        let NetlinkPayload::InnerMessage(NetfilterMessage {
            inner: NetfilterMessageInner::Conntrack(ConntrackMessage::Get(attrs)),
            header,
            ..
        }) = &parsed[0].payload
        else {
            panic!("not a conntrack get: {:?}", parsed[0].payload);
        };
        assert_eq!(header.family, NetfilterProtoFamily::IPv4);
        let [ConntrackAttribute::CtaTupleOrig(orig)] = attrs.as_slice() else {
            panic!("attributes {attrs:?}");
        };
        assert_eq!(endpoints(orig), Some((tuple.src, tuple.dst)));
    }

    #[test]
    fn names_tcp_states() {
        assert_eq!(tcp_state_name(3), "ESTABLISHED");
        assert_eq!(tcp_state_name(9), "SYN_SENT2");
        assert_eq!(tcp_state_name(42), "UNKNOWN_42");
    }

    /// Real namespaces, iptables and connections: needs root, like the end-to-end tests.
    mod netns {
        use std::{
            os::unix::fs::MetadataExt,
            path::PathBuf,
            process::{Child, Stdio},
        };

        use synspan_testbed::netns::Netns;

        use super::*;

        /// Fails, never skips, where the kernel cannot track connections.
        fn require_conntrack() {
            let present = || Path::new("/proc/sys/net/netfilter/nf_conntrack_max").exists();
            if !present() {
                let _ = std::process::Command::new("modprobe")
                    .args(["-q", "nf_conntrack"])
                    .status();
            }
            assert!(
                present(),
                "this kernel has no connection tracking (nf_conntrack is neither built in nor \
                 loadable): the NAT tests cannot run"
            );
        }

        /// Connections made by one python process in namespace `a`: one to `VIP:7777`, which
        /// an OUTPUT rule redirects to the process's own listener on port 15001, one straight
        /// to that listener, and one left waiting for an answer from `b` (across a veth pair,
        /// it also makes `VIP` routable), which drops its SYNs.
        struct Scene {
            process: Child,
            pid: u32,
            redirected: Tuple,
            plain: Tuple,
            pending: Tuple,
            _a: Netns,
            _b: Netns,
        }

        const SCRIPT: &str = r#"
import json, os, socket, sys, time
family = socket.AF_INET6 if sys.argv[1] == "6" else socket.AF_INET
vip, loopback, peer = sys.argv[2], sys.argv[3], sys.argv[4]
listener = socket.socket(family)
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 15001))
listener.listen(8)
redirected = socket.create_connection((vip, 7777), timeout=5)
plain = socket.create_connection((loopback, 15001), timeout=5)
accepted = [listener.accept(), listener.accept()]
pending = socket.socket(family)
pending.setblocking(False)
try:
    pending.connect((peer, 9))
except BlockingIOError:
    pass
def ends(s, peer=None):
    return [list(s.getsockname()[:2]), list(peer or s.getpeername()[:2])]
print(json.dumps({"pid": os.getpid(), "redirected": ends(redirected), "plain": ends(plain),
                  "pending": ends(pending, [peer, 9])}), flush=True)
time.sleep(3600)
"#;

        fn sock(v: &serde_json::Value) -> SocketAddr {
            SocketAddr::new(
                v[0].as_str().unwrap().parse().unwrap(),
                v[1].as_u64().unwrap() as u16,
            )
        }

        impl Scene {
            fn new(v6: bool) -> Self {
                require_conntrack();
                let (a_addr, b_addr, vip, loopback) = if v6 {
                    ("2001:db8::1/64", "2001:db8::2/64", "2001:db8::100", "::1")
                } else {
                    ("198.18.0.1/24", "198.18.0.2/24", "198.18.0.100", "127.0.0.1")
                };
                let peer = b_addr.split_once('/').unwrap().0;
                let a = Netns::new("nat").expect("netns (needs root)");
                let b = Netns::new("natpeer").expect("netns");
                a.link(&b, a_addr, b_addr).expect("veth");
                a.redirect(v6, vip, 7777, 15001).expect("iptables REDIRECT rule");
                b.iptables(v6, &["-A", "INPUT", "-p", "tcp", "--dport", "9", "-j", "DROP"])
                    .expect("iptables DROP rule");
                let mut process = a
                    .command(Path::new("python3"))
                    .args(["-c", SCRIPT, if v6 { "6" } else { "4" }, vip, loopback, peer])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::inherit())
                    .spawn()
                    .expect("python3");
                let report = synspan_testbed::first_json_line(&mut process);
                let tuple = |key: &str| Tuple {
                    src: sock(&report[key][0]),
                    dst: sock(&report[key][1]),
                };
                Self {
                    pid: report["pid"].as_u64().unwrap() as u32,
                    redirected: tuple("redirected"),
                    plain: tuple("plain"),
                    pending: tuple("pending"),
                    process,
                    _a: a,
                    _b: b,
                }
            }

            fn netns(&self) -> PathBuf {
                PathBuf::from(format!("/proc/{}/ns/net", self.pid))
            }
        }

        impl Drop for Scene {
            fn drop(&mut self) {
                let _ = self.process.kill();
                let _ = self.process.wait();
            }
        }

        fn own_netns() -> u64 {
            std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino()
        }

        fn check_redirect(v6: bool, target: &str) {
            let scene = Scene::new(v6);
            let before = own_netns();
            let t = lookup(&scene.netns(), &scene.redirected)
                .expect("lookup")
                .expect("an entry for the redirected connection");
            assert_eq!(own_netns(), before, "the calling thread changed namespace");
            assert_eq!(t.reply_src, addr(target));
            assert_eq!(t.reply_dst, scene.redirected.src);
            assert!(t.dnat, "{t:?}");
            assert!(!t.snat, "{t:?}");
            assert_ne!(t.status & status::DST_NAT, 0, "{t:?}");
            assert_eq!(t.tcp_state.as_deref(), Some("ESTABLISHED"));
        }

        #[test]
        fn redirect_shows_where_the_connection_went() {
            check_redirect(false, "127.0.0.1:15001");
        }

        #[test]
        fn redirect_shows_where_the_connection_went_v6() {
            check_redirect(true, "[::1]:15001");
        }

        #[test]
        fn plain_connection_has_no_translation() {
            let scene = Scene::new(false);
            let t = lookup(&scene.netns(), &scene.plain)
                .expect("lookup")
                .expect("an entry for the plain connection");
            assert_eq!(t.reply_src, scene.plain.dst);
            assert_eq!(t.reply_dst, scene.plain.src);
            assert!(!t.dnat && !t.snat, "{t:?}");
            assert_eq!(t.tcp_state.as_deref(), Some("ESTABLISHED"));
        }

        #[test]
        fn unanswered_attempt_is_syn_sent() {
            let scene = Scene::new(false);
            let t = lookup(&scene.netns(), &scene.pending)
                .expect("lookup")
                .expect("an entry for the unanswered attempt");
            assert_eq!(t.reply_src, scene.pending.dst);
            assert!(!t.dnat && !t.snat, "{t:?}");
            assert_eq!(t.status & status::SEEN_REPLY, 0, "{t:?}");
            assert_eq!(t.tcp_state.as_deref(), Some("SYN_SENT"));
        }

        #[test]
        fn names_the_missing_capabilities() {
            use caps::{CapSet, Capability};
            let scene = Scene::new(false);
            // Capabilities belong to a thread, and the namespace thread inherits them.
            std::thread::scope(|s| {
                s.spawn(|| {
                    caps::drop(None, CapSet::Effective, Capability::CAP_SYS_ADMIN).unwrap();
                    let err = lookup(&scene.netns(), &scene.plain).unwrap_err();
                    assert!(
                        matches!(&err, NatError::Netns(NetnsError::Enter { source, .. })
                            if source.raw_os_error() == Some(libc::EPERM)),
                        "{err}"
                    );
                    caps::drop(None, CapSet::Effective, Capability::CAP_NET_ADMIN).unwrap();
                    let own = Path::new("/proc/thread-self/ns/net");
                    let err = lookup(own, &scene.plain).unwrap_err();
                    assert!(matches!(err, NatError::PermissionDenied(_)), "{err}");
                });
            });
        }

        #[test]
        fn unknown_tuple_is_not_found() {
            let scene = Scene::new(false);
            let mut unknown = scene.redirected;
            unknown.src.set_port(1);
            assert_eq!(lookup(&scene.netns(), &unknown).expect("lookup"), None);
            // The namespace matters: the host does not know the scene's connection.
            assert_eq!(
                lookup(Path::new("/proc/self/ns/net"), &scene.redirected).expect("lookup"),
                None
            );
        }
    }
}
