//! End to end: the kernel's own drop reasons on the span. Handshake packets are dropped on
//! purpose inside network namespaces each test creates (iptables rules, a full accept
//! queue, a neighbour that never answers), and the spans a real OTLP receiver got must say
//! which packet died, where and why, and nothing for packets that were not the attempt's.
//! Needs root, iptables and python3.

use std::{process::Stdio, time::Duration};

use serde_json::Value;
use synspan_testbed::{
    agent::Agent,
    client::{Report, connect},
    netns::Netns,
    receiver::Receiver,
};

const SPAN_WAIT: Duration = Duration::from_secs(30);

fn start(args: &[&str]) -> (Receiver, Agent) {
    Agent::start_exporting(args).expect("start synspan and its receiver")
}

/// A namespace where the kernel gives up on a SYN after about 3 s (`tcp_syn_retries=1`,
/// with the retransmits `tcp_syn_linear_timeouts` adds).
fn namespace(tag: &str) -> Netns {
    let ns = Netns::new(tag).unwrap();
    ns.sysctl("net.ipv4.tcp_syn_retries", "1").unwrap();
    ns
}

/// A [`namespace`] whose OUTPUT chain drops every SYN to port 9.
fn dropping_syns_to_9(tag: &str) -> Netns {
    let ns = namespace(tag);
    ns.iptables(
        false,
        &["-A", "OUTPUT", "-p", "tcp", "--dport", "9", "--syn", "-j", "DROP"],
    )
    .unwrap();
    ns
}

/// The span of `client`'s attempt as the OTLP receiver got it, checked against the one
/// synspan printed.
fn received_span(receiver: &Receiver, agent: &Agent, client: &Report, outcome: &str) -> Value {
    let spans = agent.wait_spans_of(client.pid, 1, SPAN_WAIT);
    assert_eq!(spans.len(), 1, "{spans:#?}\n{}", agent.stderr());
    let printed = &spans[0];
    assert_eq!(printed["attributes"]["synspan.outcome"], outcome, "{printed:#}");
    let span_id = printed["span_id"].as_str().unwrap();
    let got = receiver
        .wait_span(span_id, SPAN_WAIT)
        .unwrap_or_else(|| panic!("the receiver never got {span_id}\n{}", receiver.log()));
    assert_eq!(got["attributes"], printed["attributes"], "{got:#}\n{printed:#}");
    assert_eq!(got["events"], printed["events"], "{got:#}\n{printed:#}");
    got
}

fn events<'a>(span: &'a Value, name: &str) -> Vec<&'a Value> {
    span["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["name"] == name)
        .collect()
}

/// Every `packet_dropped` event of `span` is this packet, direction and reason; returns
/// the drops they stand for.
fn drops_all(span: &Value, packet: &str, direction: &str, reasons: &[&str]) -> u64 {
    let drops = events(span, "packet_dropped");
    assert!(!drops.is_empty(), "no packet_dropped event: {span:#}");
    check_drops(span, &drops, packet, direction, reasons);
    assert_eq!(
        span["attributes"]["synspan.packet_drop.count"],
        drop_count(&drops),
        "{span:#}"
    );
    drop_count(&drops)
}

fn drop_count(drops: &[&Value]) -> u64 {
    drops
        .iter()
        .map(|d| d["attributes"]["synspan.packet_drop.count"].as_u64().unwrap())
        .sum()
}

/// The drops are all this packet, direction and one of these reasons, at a named function;
/// the span's reason is the last drop's.
fn check_drops(span: &Value, drops: &[&Value], packet: &str, direction: &str, reasons: &[&str]) {
    for drop in drops {
        let a = &drop["attributes"];
        assert_eq!(a["synspan.packet_drop.packet"], packet, "{span:#}");
        assert_eq!(a["synspan.packet_drop.direction"], direction, "{span:#}");
        let reason = a["synspan.packet_drop.reason"].as_str().unwrap();
        assert!(reasons.contains(&reason), "{reason} not in {reasons:?}: {span:#}");
        let location = a["synspan.packet_drop.location"].as_str().unwrap();
        assert!(
            !location.is_empty() && !location.starts_with("0x"),
            "location not symbolized: {span:#}"
        );
    }
    let last = &events(span, "packet_dropped").last().unwrap()["attributes"]["synspan.packet_drop.reason"];
    assert_eq!(
        &span["attributes"]["synspan.packet_drop.reason"], last,
        "{span:#}"
    );
}

fn no_drops(span: &Value) {
    assert!(events(span, "packet_dropped").is_empty(), "{span:#}");
    let attrs = span["attributes"].as_object().unwrap();
    assert!(
        !attrs.keys().any(|k| k.starts_with("synspan.packet_drop")),
        "{span:#}"
    );
}

fn retransmits(span: &Value) -> u64 {
    span["attributes"]["synspan.syn_retransmits"].as_u64().unwrap()
}

/// An OUTPUT rule drops every SYN the client sends: each one, the first and every
/// retransmit, is a NETFILTER_DROP on egress.
#[test]
fn syn_dropped_on_egress_by_an_output_rule() {
    let ns = dropping_syns_to_9("dregr");
    let (receiver, agent) = start(&[]);
    let client = connect(&ns, "127.0.0.1:9", &[]).unwrap();
    let span = received_span(&receiver, &agent, &client, "timed_out");
    let sent = retransmits(&span) + 1;
    assert!(sent >= 2, "{span:#}");
    assert_eq!(
        drops_all(&span, "SYN", "egress", &["NETFILTER_DROP"]),
        sent,
        "one drop per SYN sent: {span:#}"
    );
    let line = agent.stderr();
    let stopped = agent.stop(Duration::from_secs(10)).unwrap();
    assert!(stopped.status.success(), "{line}");
    assert!(
        stopped.accounting()["packet_drops_matched"] >= sent,
        "{}",
        stopped.stderr
    );
    eprintln!("received span: {span}");
}

/// The SYN passes; an INPUT rule drops the SYN-ACKs coming back (the listener's first and
/// its retransmits), found by their tuple. The client's retransmitted SYNs, which the
/// listener answers with another SYN-ACK, are freed there too (NOT_SPECIFIED, in
/// `tcp_v4_rcv`): the kernel reports them as drops, and so do we.
#[test]
fn syn_ack_dropped_on_ingress_by_an_input_rule() {
    let ns = namespace("dring");
    ns.iptables(
        false,
        &[
            "-A",
            "INPUT",
            "-p",
            "tcp",
            "--tcp-flags",
            "SYN,ACK",
            "SYN,ACK",
            "-j",
            "DROP",
        ],
    )
    .unwrap();
    let (receiver, agent) = start(&[]);
    let client = connect(&ns, "127.0.0.1:0", &["--listen-first"]).unwrap();
    let span = received_span(&receiver, &agent, &client, "timed_out");
    let (syn_acks, others): (Vec<&Value>, Vec<&Value>) = events(&span, "packet_dropped")
        .into_iter()
        .partition(|d| d["attributes"]["synspan.packet_drop.packet"] == "SYN-ACK");
    assert!(!syn_acks.is_empty(), "{span:#}");
    check_drops(&span, &syn_acks, "SYN-ACK", "ingress", &["NETFILTER_DROP"]);
    check_drops(&span, &others, "SYN", "ingress", &["NOT_SPECIFIED"]);
    assert!(others.len() as u64 <= retransmits(&span), "{span:#}");
}

/// A peer address on the link with nobody behind it: the SYN waits for a neighbour that
/// never answers and dies with it.
#[test]
fn syn_dropped_when_the_neighbour_never_answers() {
    let ns = namespace("drnei");
    // The neighbour gives up after about 3 s (3 solicitations a second apart): the attempt
    // must outlive that.
    ns.sysctl("net.ipv4.tcp_syn_retries", "4").unwrap();
    let peer = Netns::new("drnep").unwrap();
    ns.link(&peer, "198.18.7.1/24", "198.18.7.2/24").unwrap();
    let (receiver, agent) = start(&[]);
    let client = connect(&ns, "198.18.7.77:80", &[]).unwrap();
    let span = received_span(&receiver, &agent, &client, "host_unreachable");
    // The SYN waiting in the neighbour's queue dies when the neighbour is given up on.
    drops_all(&span, "SYN", "egress", &["NEIGH_FAILED"]);
}

/// Listens with a backlog of 1 on 127.0.0.1:`argv[1]`, says "listening", never accepts; gone
/// after 60 s at the latest.
const FULL_LISTENER: &str = r#"
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(1)
print("listening", flush=True)
time.sleep(60)
"#;

/// A local listener that never accepts, SYN cookies off: the kernel admits backlog + 1
/// connections, then consumes the next SYN without a drop reason (`ListenOverflows` counts
/// it), so the third client retransmits until it times out, and its span says the queue
/// was full.
#[test]
fn a_full_accept_queue_is_on_the_span() {
    let ns = namespace("drlsn");
    ns.sysctl("net.ipv4.tcp_syncookies", "0").unwrap();
    let mut listener = ns
        .command(std::path::Path::new("python3"))
        .args(["-c", FULL_LISTENER, "24680"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(listener.stdout.take().unwrap()),
        &mut ready,
    )
    .unwrap();
    assert_eq!(ready.trim(), "listening");
    let (receiver, agent) = start(&[]);
    for _ in 0..2 {
        let admitted = connect(&ns, "127.0.0.1:24680", &[]).unwrap();
        received_span(&receiver, &agent, &admitted, "established");
    }
    let refused_entry = connect(&ns, "127.0.0.1:24680", &[]).unwrap();
    let span = received_span(&receiver, &agent, &refused_entry, "timed_out");
    listener.kill().unwrap();
    listener.wait().unwrap();
    let attrs = &span["attributes"];
    assert!(retransmits(&span) >= 1, "{span:#}");
    assert_eq!(attrs["synspan.listener.backlog"], 1, "{span:#}");
    assert_eq!(
        attrs["synspan.listener.queued"], 2,
        "backlog + 1 admitted: {span:#}"
    );
    assert!(
        attrs["synspan.listener.overflows"].as_i64().unwrap() > retransmits(&span) as i64,
        "each SYN counted: {span:#}"
    );
}

/// Ordinary attempts lose no packet: a refusal (its SYN is freed with NO_SOCKET after the
/// RST went out, which is the kernel's answer, not a loss) and a success show no drop.
#[test]
fn ordinary_attempts_show_no_drop() {
    let ns = namespace("drnof");
    let (receiver, agent) = start(&[]);
    let refused = connect(&ns, "127.0.0.1:9", &[]).unwrap();
    no_drops(&received_span(&receiver, &agent, &refused, "connection_refused"));
    let established = connect(&ns, "127.0.0.1:0", &["--listen-first"]).unwrap();
    no_drops(&received_span(&receiver, &agent, &established, "established"));
}

/// Sends UDP to a closed port, and TCP SYNs that an INPUT rule drops, `count` of each, then
/// prints "done".
const STORM: &str = r#"
import socket, sys
count = int(sys.argv[1])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(count):
    u.sendto(b"x", ("127.0.0.1", 7))
for _ in range(count // 10):
    s = socket.socket()
    s.setblocking(False)
    try:
        s.connect(("127.0.0.1", 6))
    except BlockingIOError:
        pass
    s.close()
print("done", flush=True)
"#;

/// While an attempt waits (its SYNs dropped at INPUT), other packets die by the thousand:
/// not one of them goes on its span.
#[test]
fn unrelated_drops_are_not_attributed() {
    let ns = namespace("drsto");
    for port in ["8", "6"] {
        ns.iptables(
            false,
            &["-A", "INPUT", "-p", "tcp", "--dport", port, "--syn", "-j", "DROP"],
        )
        .unwrap();
    }
    let (receiver, agent) = start(&[]);
    let waiting = ns
        .command(&synspan_testbed::workspace_bin("synspan-connect"))
        .arg("127.0.0.1:8")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let storm = ns
        .command(std::path::Path::new("python3"))
        .args(["-c", STORM, "5000"])
        .output()
        .unwrap();
    assert!(storm.status.success(), "{storm:?}");
    let out = waiting.wait_with_output().unwrap();
    let client: Report = serde_json::from_slice(&out.stdout).unwrap();
    let span = received_span(&receiver, &agent, &client, "timed_out");
    assert_eq!(
        drops_all(&span, "SYN", "ingress", &["NETFILTER_DROP"]),
        retransmits(&span) + 1,
        "only the attempt's own SYNs: {span:#}"
    );
}

/// `--no-drop-reasons`: the program is not attached, and spans say nothing of drops.
#[test]
fn no_drop_reasons_flag() {
    let ns = dropping_syns_to_9("droff");
    let (receiver, agent) = start(&["--no-drop-reasons"]);
    let client = connect(&ns, "127.0.0.1:9", &[]).unwrap();
    no_drops(&received_span(&receiver, &agent, &client, "timed_out"));
}

/// A SYN that has not left the host when its retransmit timer fires: a slow token bucket on
/// the namespace's loopback, with datagrams queued ahead of the SYN. The kernel sends
/// nothing then (`-EBUSY`); the span counts those timeouts as held, not as retransmits, so
/// its retransmits are the kernel's own count (`TCP_INFO`).
#[test]
fn a_syn_still_queued_in_the_host_is_held_not_retransmitted() {
    let ns = Netns::new("dheld").unwrap();
    // 4 000 bytes a second: six datagrams of 1400 bytes ahead of the SYN hold it for about
    // two seconds, past the first retransmit timeout (1 s).
    ns.exec(&[
        "tc", "qdisc", "replace", "dev", "lo", "root", "tbf", "rate", "32kbit", "burst", "1600", "latency",
        "60s",
    ])
    .unwrap();
    let (receiver, agent) = start(&[]);
    ns.exec(&[
        "python3",
        "-c",
        "import socket\nu = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         for _ in range(6):\n    u.sendto(b'x' * 1400, ('127.0.0.1', 9))",
    ])
    .unwrap();
    let client = connect(&ns, "127.0.0.1:0", &["--listen-first"]).unwrap();
    let span = received_span(&receiver, &agent, &client, "established");
    let held = span["attributes"]["synspan.syn_retransmits_held"]
        .as_u64()
        .unwrap_or(0);
    assert!(held >= 1, "{span:#}");
    assert_eq!(
        Some(retransmits(&span)),
        client.syn_retransmits.map(u64::from),
        "the kernel's count: {span:#}"
    );
    assert_eq!(
        events(&span, "syn_retransmit").len() as u64,
        retransmits(&span),
        "{span:#}"
    );
}
