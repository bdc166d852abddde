//! Evidence for `address_not_available`: how much of the ephemeral port range of the
//! attempt's network namespace was taken, in all and toward the attempt's destination.
//!
//! What stops connect() from picking a port (`__inet_hash_connect`): a port that some socket
//! bound explicitly (a listener, a bind() before connect) is off limits for every
//! destination, but a port that connect() picked is shared by connections to different
//! destinations, since only the 4-tuple has to be unique. So the range runs out toward one
//! destination: `in_use_to_destination` reaching `range_size` is exhaustion, while
//! `in_use_total` only shows the overall pressure.
//!
//! Counted are all sockets `/proc/<pid>/net/tcp{,6}` lists, TIME_WAIT included (it keeps its
//! 4-tuple unless `tcp_tw_reuse` applies, by default to loopback only) and LISTEN included
//! (a listener's port in the range is lost to connect()). Not seen, and so not counted:
//! sockets bound but neither listening nor connected, ports in `ip_local_reserved_ports`,
//! and per-socket ranges (`IP_LOCAL_PORT_RANGE`).

use std::{
    collections::HashSet,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
};

use super::netns::{NetnsError, in_netns};

const PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PortUsage {
    /// `net.ipv4.ip_local_port_range` of the namespace (IPv6 uses it too), both ends included.
    pub(crate) range: (u16, u16),
    /// Ports in `range`. One connect() scans an even number of them, so where the size is odd
    /// it can fail with one port still free, when that port is the one it skipped.
    pub(crate) range_size: u32,
    /// Distinct local ports within the range used by any TCP socket.
    pub(crate) in_use_total: u32,
    /// Distinct local ports within the range used by TCP sockets connected to the destination.
    pub(crate) in_use_to_destination: u32,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum PortUsageError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: unexpected content {content:?}")]
    Parse { path: PathBuf, content: String },
}

/// A socket as `/proc/net/tcp` and `/proc/net/tcp6` list it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TcpEntry {
    pub(crate) local: SocketAddr,
    pub(crate) remote: SocketAddr,
    /// The kernel's TCP state number (`TCP_ESTABLISHED` = 1 ... `TCP_LISTEN` = 10).
    pub(crate) state: u8,
}

/// Ephemeral port usage in the network namespace at `netns` (`/proc/<pid>/ns/net`, or a
/// descriptor kept open for it), toward `destination`.
///
/// Both the range (a sysctl under `/proc/sys/net` answers for the reader's namespace) and the
/// socket tables (`/proc/thread-self/net/`) are read from a thread inside the namespace, which
/// needs CAP_SYS_ADMIN unless it is the caller's own. Reading the tables walks every TCP
/// socket of the host, not just the namespace's.
pub(crate) fn port_usage(netns: &Path, destination: SocketAddr) -> Result<PortUsage, PortUsageError> {
    let (range_text, tables) = in_netns(netns, || {
        let range = std::fs::read_to_string(PORT_RANGE);
        let tables: Vec<(PathBuf, io::Result<String>)> = ["tcp", "tcp6"]
            .into_iter()
            .map(|table| {
                let path = PathBuf::from(format!("/proc/thread-self/net/{table}"));
                let text = std::fs::read_to_string(&path);
                (path, text)
            })
            .collect();
        (range, tables)
    })?;
    let text = range_text.map_err(|source| PortUsageError::Read {
        path: PORT_RANGE.into(),
        source,
    })?;
    let range = parse_port_range(&text).ok_or_else(|| PortUsageError::Parse {
        path: PORT_RANGE.into(),
        content: text.clone(),
    })?;
    let mut entries = Vec::new();
    for (path, text) in tables {
        let text = match text {
            Ok(text) => text,
            // No tcp6 where IPv6 is disabled at boot.
            Err(e) if path.ends_with("tcp6") && e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => return Err(PortUsageError::Read { path, source }),
        };
        entries
            .extend(parse_proc_net_tcp(&text).map_err(|line| PortUsageError::Parse { path, content: line })?);
    }
    Ok(summarize(range, &entries, destination))
}

/// `ip_local_port_range`: two numbers separated by whitespace.
pub(crate) fn parse_port_range(text: &str) -> Option<(u16, u16)> {
    let mut fields = text.split_whitespace().map(str::parse::<u16>);
    match (fields.next(), fields.next(), fields.next()) {
        (Some(Ok(low)), Some(Ok(high)), None) if low <= high => Some((low, high)),
        _ => None,
    }
}

/// The sockets of a `/proc/net/tcp` or `/proc/net/tcp6` table; the line that does not parse
/// is the error.
pub(crate) fn parse_proc_net_tcp(text: &str) -> Result<Vec<TcpEntry>, String> {
    text.lines()
        .skip(1)
        .filter(|line| !line.trim().is_empty())
        .map(|line| parse_line(line).ok_or_else(|| line.to_owned()))
        .collect()
}

fn parse_line(line: &str) -> Option<TcpEntry> {
    // `sl local_address rem_address st ...`
    let mut fields = line.split_whitespace().skip(1);
    let local = parse_endpoint(fields.next()?)?;
    let remote = parse_endpoint(fields.next()?)?;
    let state = u8::from_str_radix(fields.next()?, 16).ok()?;
    Some(TcpEntry { local, remote, state })
}

/// `ADDR:PORT` in hex. The kernel prints the address as 32-bit words in host byte order,
/// each holding four bytes of the address in network order; the port is a plain number.
fn parse_endpoint(field: &str) -> Option<SocketAddr> {
    let (addr, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut bytes = [0u8; 16];
    let words = addr.len() / 8;
    if !(words == 1 || words == 4) || addr.len() % 8 != 0 {
        return None;
    }
    for i in 0..words {
        let word = u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok()?;
        bytes[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    let ip = if words == 1 {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(bytes))
    };
    Some(SocketAddr::new(ip, port))
}

/// IPv4-mapped IPv6 (an IPv6 socket talking IPv4) as the IPv4 address it stands for.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Usage of `range` by `entries`, in all and toward `destination`.
pub(crate) fn summarize(range: (u16, u16), entries: &[TcpEntry], destination: SocketAddr) -> PortUsage {
    let destination = canonical(destination);
    let in_range = |e: &&TcpEntry| (range.0..=range.1).contains(&e.local.port());
    let total: HashSet<u16> = entries.iter().filter(in_range).map(|e| e.local.port()).collect();
    let to_destination: HashSet<u16> = entries
        .iter()
        .filter(in_range)
        .filter(|e| canonical(e.remote) == destination)
        .map(|e| e.local.port())
        .collect();
    PortUsage {
        range,
        range_size: u32::from(range.1) - u32::from(range.0) + 1,
        in_use_total: total.len() as u32,
        in_use_to_destination: to_destination.len() as u32,
    }
}

#[cfg(test)]
mod tests {
    fn ns_of(pid: u32) -> std::path::PathBuf {
        std::path::PathBuf::from(format!("/proc/{pid}/ns/net"))
    }

    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    // Captured on x86_64: the addresses are in little-endian words.
    const TCP: &str = "\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:2328 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 41710 1 0000000000000000 100 0 0 10 0
   1: 0100007F:9C42 0100007F:2328 01 00000000:00000000 00:00000000 00000000     0        0 41713 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:2328 0100007F:9C42 01 00000000:00000000 00:00000000 00000000     0        0 41714 1 0000000000000000 20 4 31 10 -1
   3: 0100007F:9C40 0100007F:2328 06 00000000:00000000 03:00001770 00000000     0        0 0 3 0000000000000000
   4: 0164A8C0:9C40 0264A8C0:01BB 02 00000001:00000000 01:00000064 00000002     0        0 41720 1 0000000000000000 200 0 0 10 -1
";

    const TCP6: &str = "\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 51234 1 0000000000000000 100 0 0 10 0
   1: 0000000000000000FFFF00000100007F:9C41 0000000000000000FFFF00000100007F:2328 01 00000000:00000000 00:00000000 00000000  1000        0 51240 1 0000000000000000 20 4 30 10 -1
   2: B80D0120000000000000000001000000:9C43 B80D0120000000000000000002000000:0050 01 00000000:00000000 00:00000000 00000000     0        0 51250 1 0000000000000000 20 4 30 10 -1
";

    #[test]
    #[cfg(target_endian = "little")]
    fn parses_tcp_tables() {
        let v4 = parse_proc_net_tcp(TCP).unwrap();
        assert_eq!(v4.len(), 5);
        assert_eq!(
            v4[0],
            TcpEntry {
                local: addr("127.0.0.1:9000"),
                remote: addr("0.0.0.0:0"),
                state: 10
            }
        );
        assert_eq!(v4[1].local, addr("127.0.0.1:40002"));
        assert_eq!(v4[1].remote, addr("127.0.0.1:9000"));
        assert_eq!(v4[3].state, 6);
        assert_eq!(v4[4].local, addr("192.168.100.1:40000"));
        assert_eq!(v4[4].remote, addr("192.168.100.2:443"));

        let v6 = parse_proc_net_tcp(TCP6).unwrap();
        assert_eq!(v6[0].local, addr("[::]:8080"));
        assert_eq!(v6[1].local, addr("[::ffff:127.0.0.1]:40001"));
        assert_eq!(v6[2].local, addr("[2001:db8::1]:40003"));
        assert_eq!(v6[2].remote, addr("[2001:db8::2]:80"));
    }

    #[test]
    fn rejects_garbage() {
        let bad = "header\n   0: 0100007F:ZZZZ 00000000:0000 0A\n";
        assert_eq!(
            parse_proc_net_tcp(bad),
            Err("   0: 0100007F:ZZZZ 00000000:0000 0A".into())
        );
        assert!(parse_proc_net_tcp("header\n   0: 0100007:2328 00000000:0000 0A\n").is_err());
        assert_eq!(parse_proc_net_tcp("header only\n"), Ok(vec![]));
    }

    #[test]
    fn parses_port_ranges() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_port_range("40000 40004"), Some((40000, 40004)));
        assert_eq!(parse_port_range("40004 40000"), None);
        assert_eq!(parse_port_range("40000"), None);
        assert_eq!(parse_port_range("1 2 3"), None);
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn counts_ports_in_range_and_toward_the_destination() {
        let mut entries = parse_proc_net_tcp(TCP).unwrap();
        entries.extend(parse_proc_net_tcp(TCP6).unwrap());
        let usage = summarize((40000, 40004), &entries, addr("127.0.0.1:9000"));
        assert_eq!(
            usage,
            PortUsage {
                range: (40000, 40004),
                range_size: 5,
                // 40000 (TIME_WAIT and SYN_SENT), 40001 (mapped), 40002, 40003 (IPv6).
                in_use_total: 4,
                // 40002, 40000 in TIME_WAIT, 40001 from the IPv6 socket; not the listener's
                // own accepted socket, whose remote is the client.
                in_use_to_destination: 3,
            }
        );
        // A destination given as IPv4-mapped IPv6 is the same destination.
        let mapped = summarize((40000, 40004), &entries, addr("[::ffff:127.0.0.1]:9000"));
        assert_eq!(mapped.in_use_to_destination, 3);
        // The listener's port 9000 is outside the range and is not counted.
        let wide = summarize((1, 65535), &entries, addr("[2001:db8::2]:80"));
        assert_eq!(wide.in_use_total, 6);
        assert_eq!(wide.in_use_to_destination, 1);
    }

    #[test]
    fn a_gone_process_is_an_error() {
        // pid_max is at most 2^22, so this pid cannot exist.
        let err = port_usage(&ns_of(u32::MAX - 1), addr("127.0.0.1:9000")).unwrap_err();
        assert!(
            matches!(err, PortUsageError::Netns(NetnsError::Open { .. })),
            "{err}"
        );
    }

    /// Real namespaces and connections: needs root, like the end-to-end tests.
    mod netns {
        use std::{path::Path, process::Stdio};

        use synspan_testbed::netns::Netns;

        use super::*;

        const SCRIPT: &str = r#"
import json, os, socket, sys, time
n = int(sys.argv[1])
listener = socket.socket()
listener.bind(("127.0.0.1", 9000))
listener.listen(16)
clients = []
for _ in range(n):
    clients.append(socket.create_connection(("127.0.0.1", 9000), timeout=5))
accepted = [listener.accept() for _ in range(n)]
errno = 0
try:
    socket.create_connection(("127.0.0.1", 9000), timeout=5)
except OSError as e:
    errno = e.errno
print(json.dumps({"pid": os.getpid(), "ports": [c.getsockname()[1] for c in clients], "errno": errno}), flush=True)
time.sleep(3600)
"#;

        #[test]
        fn exhausted_range_toward_one_destination() {
            let ns = Netns::new("ports").expect("netns (needs root)");
            // An even number of ports: of an odd-sized range, connect() may find one fewer.
            ns.sysctl("net.ipv4.ip_local_port_range", "40000 40005")
                .expect("sysctl");
            let mut process = ns
                .command(Path::new("python3"))
                .args(["-c", SCRIPT, "6"])
                .stdout(Stdio::piped())
                .spawn()
                .expect("python3");
            let report = synspan_testbed::first_json_line(&mut process);
            // The seventh connect found no port: the failure this evidence explains.
            assert_eq!(report["errno"], libc::EADDRNOTAVAIL, "{report}");
            let pid = report["pid"].as_u64().unwrap() as u32;

            let usage = port_usage(&ns_of(pid), addr("127.0.0.1:9000"));
            let other = port_usage(&ns_of(pid), addr("127.0.0.1:9001"));
            let _ = process.kill();
            let _ = process.wait();
            let usage = usage.unwrap();
            assert_eq!(
                usage,
                PortUsage {
                    range: (40000, 40005),
                    range_size: 6,
                    in_use_total: 6,
                    in_use_to_destination: 6,
                }
            );
            // The same ports are free toward any other destination.
            assert_eq!(other.unwrap().in_use_to_destination, 0);
            // The agent's own namespace is untouched and has its own range.
            let host = port_usage(&ns_of(std::process::id()), addr("127.0.0.1:9000")).unwrap();
            assert_ne!(host.range, (40000, 40005));
        }
        #[test]
        fn sysctls_follow_the_reading_threads_namespace() {
            let scene = Netns::new("sysctl").expect("netns (needs root)");
            scene
                .sysctl("net.ipv4.ip_local_port_range", "40000 40004")
                .expect("sysctl");
            let path = "/proc/sys/net/ipv4/ip_local_port_range";
            let read = || std::fs::read_to_string(path).unwrap();
            let inside = in_netns(&PathBuf::from(format!("/run/netns/{}", scene.name())), read).unwrap();
            assert_eq!(inside.split_whitespace().collect::<Vec<_>>(), ["40000", "40004"]);
            assert_ne!(
                read(),
                inside,
                "the host has the same range as the test namespace"
            );
        }
    }
}
