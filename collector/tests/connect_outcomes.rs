//! End to end: real programs in the kernel, real connect attempts inside network namespaces
//! that each test creates, spans read from synspan's JSON output and from a real OTLP
//! receiver. Needs root.

use std::time::Duration;

use serde_json::Value;
use synspan_testbed::{
    agent::Agent,
    client::{Report, connect},
    netns::Netns,
    receiver::Receiver,
};

const SPAN_WAIT: Duration = Duration::from_secs(20);

fn start(args: &[&str]) -> (Receiver, Agent) {
    Agent::start_exporting(args).expect("start synspan and its receiver")
}

fn attr<'a>(span: &'a Value, key: &str) -> &'a Value {
    &span["attributes"][key]
}

/// The one span of `client`'s attempt, checked against what the client itself saw.
fn span_for(agent: &Agent, client: &Report, outcome: &str, retransmits: usize) -> Value {
    let spans = agent.wait_spans_of(client.pid, 1, SPAN_WAIT);
    assert_eq!(
        spans.len(),
        1,
        "spans of pid {}: {spans:#?}\nstderr:\n{}",
        client.pid,
        agent.stderr()
    );
    let span = spans.into_iter().next().unwrap();
    let ctx = format!("{span:#}\nclient: {client:?}");
    assert_eq!(span["name"], "tcp connect", "{ctx}");
    assert_eq!(span["kind"], "client", "{ctx}");
    assert_eq!(attr(&span, "synspan.outcome"), outcome, "{ctx}");
    if outcome == "established" {
        assert_eq!(span["status"]["code"], "unset", "{ctx}");
        assert!(attr(&span, "error.type").is_null(), "{ctx}");
    } else {
        assert_eq!(span["status"]["code"], "error", "{ctx}");
        assert_eq!(attr(&span, "error.type"), outcome, "{ctx}");
    }
    assert_ne!(client.local_port, 0, "{ctx}");
    assert_eq!(attr(&span, "network.local.port"), client.local_port, "{ctx}");
    let local_ip = client.local.rsplit_once(':').unwrap().0.trim_matches(['[', ']']);
    assert_eq!(attr(&span, "network.local.address"), local_ip, "{ctx}");
    let (peer_ip, peer_port) = client.peer.rsplit_once(':').unwrap();
    assert_eq!(
        attr(&span, "network.peer.address"),
        peer_ip.trim_matches(['[', ']']),
        "{ctx}"
    );
    assert_eq!(
        attr(&span, "network.peer.port"),
        peer_port.parse::<u16>().unwrap(),
        "{ctx}"
    );
    assert_eq!(
        attr(&span, "server.port"),
        peer_port.parse::<u16>().unwrap(),
        "{ctx}"
    );
    assert_eq!(attr(&span, "network.transport"), "tcp", "{ctx}");
    let network_type = if client.peer.starts_with('[') {
        "ipv6"
    } else {
        "ipv4"
    };
    assert_eq!(attr(&span, "network.type"), network_type, "{ctx}");
    assert_eq!(attr(&span, "process.pid"), client.pid, "{ctx}");
    assert_eq!(attr(&span, "thread.id"), client.tid, "{ctx}");
    assert_eq!(attr(&span, "process.executable.name"), "synspan-connect", "{ctx}");
    // The scenario sets up `retransmits`; a loaded host's late retransmit timer may fit one
    // fewer before the timeout. The span must say what the kernel counted on the socket.
    let retransmits = match client.syn_retransmits {
        Some(counted) if outcome == "timed_out" => {
            assert!(counted > 0 && counted as usize <= retransmits, "{ctx}");
            counted as usize
        }
        _ => retransmits,
    };
    assert_eq!(attr(&span, "synspan.syn_retransmits"), retransmits, "{ctx}");

    let start = span["start_time_unix_nano"].as_u64().unwrap();
    let end = span["end_time_unix_nano"].as_u64().unwrap();
    assert!(start <= end, "{ctx}");
    // The client timed its own attempt; the span must agree to within a few milliseconds.
    let span_ms = (end - start) as f64 / 1e6;
    assert!(
        (span_ms - client.elapsed_ms).abs() < 25.0,
        "span {span_ms}ms vs client {}ms\n{ctx}",
        client.elapsed_ms
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    assert!(
        now >= end && now - end < 60_000_000_000,
        "end {end} is not within the last minute of {now}\n{ctx}"
    );

    let syn_events: Vec<&Value> = span["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["name"] == "syn_retransmit")
        .collect();
    assert_eq!(syn_events.len(), retransmits, "{ctx}");
    for (i, event) in syn_events.iter().enumerate() {
        assert_eq!(event["attributes"]["synspan.retransmit.number"], i + 1, "{ctx}");
        let t = event["time_unix_nano"].as_u64().unwrap();
        assert!(
            start < t && t <= end,
            "event {i} at {t} outside [{start}, {end}]\n{ctx}"
        );
    }
    span
}

/// The receiver got the same span: same ids, attributes, events, status, and times.
fn check_received(receiver: &Receiver, span: &Value) {
    let span_id = span["span_id"].as_str().unwrap();
    let got = receiver.wait_span(span_id, SPAN_WAIT).unwrap_or_else(|| {
        panic!(
            "the OTLP receiver never got span {span_id}\nreceiver log:\n{}",
            receiver.log()
        )
    });
    let ctx = format!("exported: {span:#}\nreceived: {got:#}");
    for key in [
        "trace_id",
        "span_id",
        "name",
        "start_time_unix_nano",
        "end_time_unix_nano",
        "attributes",
    ] {
        assert_eq!(got[key], span[key], "{key}\n{ctx}");
    }
    // OTLP enums: SPAN_KIND_CLIENT = 3; STATUS_CODE_UNSET = 0, STATUS_CODE_ERROR = 2.
    assert_eq!(got["kind"], 3, "{ctx}");
    let code = if span["status"]["code"] == "error" { 2 } else { 0 };
    assert_eq!(got["status"]["code"], code, "{ctx}");
    assert_eq!(got["status"]["message"], span["status"]["message"], "{ctx}");
    let names = |s: &Value| -> Vec<(Value, Value)> {
        s["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["name"].clone(), e["time_unix_nano"].clone()))
            .collect()
    };
    assert_eq!(names(&got), names(span), "{ctx}");
    assert_eq!(
        got["resource"]["service.name"], span["resource"]["service.name"],
        "{ctx}"
    );
    assert_eq!(got["scope"]["name"], "synspan", "{ctx}");
}

fn outcome_test(ns: &Netns, target: &str, args: &[&str], outcome: &str, retransmits: usize) -> Value {
    let (receiver, agent) = start(&[]);
    let client = connect(ns, target, args).expect("client");
    let span = span_for(&agent, &client, outcome, retransmits);
    check_received(&receiver, &span);
    let stopped = agent.stop(Duration::from_secs(10)).unwrap();
    assert!(
        stopped.status.success(),
        "exit {:?}\n{}",
        stopped.status,
        stopped.stderr
    );
    span
}

/// Kernels without BTF get the classic tracepoint programs: the same spans.
#[test]
fn classic_tracepoints() {
    let ns = Netns::new("cls").unwrap();
    let (receiver, agent) = start(&["--classic-tracepoints"]);
    let refused = connect(&ns, "127.0.0.1:9", &[]).expect("client");
    let span = span_for(&agent, &refused, "connection_refused", 0);
    check_received(&receiver, &span);
    let ok = connect(&ns, "[::1]:0", &["--listen-first"]).expect("client");
    span_for(&agent, &ok, "established", 0);
    let stopped = agent.stop(Duration::from_secs(10)).unwrap();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    assert!(
        stopped
            .stderr
            .contains("attempts are traced with classic tracepoints (--classic-tracepoints)"),
        "{}",
        stopped.stderr
    );
}

#[test]
fn established_v4() {
    let ns = Netns::new("ok4").unwrap();
    outcome_test(&ns, "127.0.0.1:0", &["--listen-first"], "established", 0);
}

#[test]
fn established_v6() {
    let ns = Netns::new("ok6").unwrap();
    outcome_test(&ns, "[::1]:0", &["--listen-first"], "established", 0);
}

#[test]
fn refused_v4() {
    let ns = Netns::new("ref4").unwrap();
    let span = outcome_test(&ns, "127.0.0.1:9", &[], "connection_refused", 0);
    // A refusal ends on the one path there is, the RST arriving: no end stack.
    assert!(attr(&span, "synspan.end_kernel_stack").is_null(), "{span:#}");
}

#[test]
fn refused_v6() {
    let ns = Netns::new("ref6").unwrap();
    outcome_test(&ns, "[::1]:9", &[], "connection_refused", 0);
}

/// SYNs dropped on INPUT: the kernel retransmits, then gives up (ETIMEDOUT). With
/// tcp_syn_retries=2 and linear timeouts that is 5 retransmits in about 7 s.
#[test]
fn kernel_gives_up_v4() {
    let ns = Netns::new("kto4").unwrap();
    ns.sysctl("net.ipv4.tcp_syn_retries", "2").unwrap();
    ns.iptables(
        false,
        &[
            "-A", "INPUT", "-i", "lo", "-p", "tcp", "--dport", "9", "--syn", "-j", "DROP",
        ],
    )
    .unwrap();
    let (receiver, agent) = start(&[]);
    let client = connect(&ns, "127.0.0.1:9", &[]).unwrap();
    assert_eq!(client.errno, libc::ETIMEDOUT, "{client:?}");
    let span = span_for(&agent, &client, "timed_out", 5);
    assert_eq!(attr(&span, "synspan.errno"), libc::ETIMEDOUT);
    // The kernel gave up in its retransmit timer, and the end stack says so.
    let end = attr(&span, "synspan.end_kernel_stack")
        .as_str()
        .unwrap_or_default();
    assert!(
        end.contains("tcp_write_timer") || end.contains("tcp_retransmit_timer"),
        "end stack:\n{end}"
    );
    check_received(&receiver, &span);
}

fn app_closes(v6: bool) {
    let ns = Netns::new(if v6 { "abt6" } else { "abt4" }).unwrap();
    ns.iptables(
        v6,
        &[
            "-A", "INPUT", "-i", "lo", "-p", "tcp", "--dport", "9", "--syn", "-j", "DROP",
        ],
    )
    .unwrap();
    let (receiver, agent) = start(&[]);
    let target = if v6 { "[::1]:9" } else { "127.0.0.1:9" };
    let client = connect(&ns, target, &["--close-after", "2500"]).unwrap();
    assert!(client.closed_by_app, "{client:?}");
    // Retransmits at about 1 s and 2 s; the close at 2.5 s ends the attempt.
    let span = span_for(&agent, &client, "aborted", 2);
    check_received(&receiver, &span);
}

#[test]
fn app_closes_pending_connect_v4() {
    app_closes(false);
}

#[test]
fn app_closes_pending_connect_v6() {
    app_closes(true);
}

/// A peer namespace rejects with ICMP host-unreachable. The first ICMP arrives while
/// connect() holds the socket lock and is only recorded as a soft error; the attempt dies
/// at the next one, after one retransmit.
#[test]
fn host_unreachable_v4() {
    let client_ns = Netns::new("unr-c").unwrap();
    let peer_ns = Netns::new("unr-p").unwrap();
    // RFC 2544 benchmarking addresses, only inside these two namespaces.
    client_ns
        .link(&peer_ns, "198.18.0.1/30", "198.18.0.2/30")
        .unwrap();
    peer_ns
        .iptables(
            false,
            &[
                "-A",
                "INPUT",
                "-p",
                "tcp",
                "--dport",
                "80",
                "-j",
                "REJECT",
                "--reject-with",
                "icmp-host-unreachable",
            ],
        )
        .unwrap();
    let (receiver, agent) = start(&[]);
    let client = connect(&client_ns, "198.18.0.2:80", &[]).unwrap();
    assert_eq!(client.errno, libc::EHOSTUNREACH, "{client:?}");
    let spans = agent.wait_spans_of(client.pid, 1, SPAN_WAIT);
    let retransmits = spans
        .first()
        .and_then(|s| attr(s, "synspan.syn_retransmits").as_u64())
        .unwrap_or(0) as usize;
    assert!(retransmits <= 2, "{spans:#?}");
    let span = span_for(&agent, &client, "host_unreachable", retransmits);
    assert_eq!(attr(&span, "synspan.errno"), libc::EHOSTUNREACH);
    let reported = span["events"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["name"] == "icmp_error");
    assert!(reported, "no icmp_error event: {span:#}");
    check_received(&receiver, &span);
}

/// No route: `connect()` fails before SYN_SENT. That is an attempt too; a UDP `connect()`
/// failing the same way is not.
#[test]
fn no_route_never_starts() {
    let ns = Netns::new("noroute").unwrap();
    let agent = Agent::start(&[]).unwrap();
    // Only loopback is up in the namespace: there is no route to this address.
    let client = connect(&ns, "198.18.7.7:80", &[]).unwrap();
    assert_eq!(client.errno, libc::ENETUNREACH, "{client:?}");
    let udp = ns
        .command("python3".as_ref())
        .args(["-c", "import socket,os\nprint(os.getpid(),flush=True)\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ntry: s.connect(('198.18.7.7',80))\nexcept OSError: pass"])
        .output()
        .unwrap();
    let udp_pid: u32 = String::from_utf8_lossy(&udp.stdout).trim().parse().unwrap();
    let spans = synspan_testbed::wait_until(SPAN_WAIT, || {
        let spans: Vec<Value> = agent
            .spans()
            .into_iter()
            .filter(|s| s["attributes"]["network.peer.address"] == "198.18.7.7")
            .collect();
        (!spans.is_empty()).then_some(spans)
    })
    .unwrap_or_default();
    assert_eq!(spans.len(), 1, "{spans:#?}\n{}", agent.stderr());
    let span = &spans[0];
    assert_ne!(
        attr(span, "process.pid"),
        udp_pid,
        "a UDP connect is not a TCP attempt"
    );
    assert_eq!(attr(span, "process.pid"), client.pid);
    assert_eq!(attr(span, "thread.id"), client.tid);
    assert_eq!(attr(span, "synspan.outcome"), "network_unreachable", "{span:#}");
    assert_eq!(attr(span, "error.type"), "network_unreachable");
    assert_eq!(attr(span, "synspan.never_started"), true);
    assert_eq!(attr(span, "synspan.errno"), libc::ENETUNREACH);
    assert_eq!(attr(span, "network.peer.port"), 80);
    assert_eq!(attr(span, "synspan.syn_retransmits"), 0);
    assert_eq!(span["status"]["code"], "error");
}

/// The same spans over OTLP/HTTP protobuf, at rotel's HTTP port: a refusal, a kernel timeout
/// with its five retransmit events and an established attempt arrive with the same ids,
/// attributes, events, status and times as over gRPC; so do the self-metrics.
#[test]
fn outcomes_over_otlp_http() {
    let ns = Netns::new("http").unwrap();
    ns.sysctl("net.ipv4.tcp_syn_retries", "2").unwrap();
    ns.iptables(
        false,
        &[
            "-A", "INPUT", "-i", "lo", "-p", "tcp", "--dport", "9", "--syn", "-j", "DROP",
        ],
    )
    .unwrap();
    let receiver = Receiver::start().unwrap();
    let agent = Agent::start(&[
        "--otlp-protocol",
        "http/protobuf",
        "--otlp-endpoint",
        &receiver.http_endpoint(),
        "--metrics-interval",
        "1s",
    ])
    .unwrap();
    let (timed_out, refused, established) = std::thread::scope(|s| {
        let timed_out = s.spawn(|| connect(&ns, "127.0.0.1:9", &[]).unwrap());
        let refused = connect(&ns, "127.0.0.1:10", &[]).unwrap();
        let established = connect(&ns, "[::1]:0", &["--listen-first"]).unwrap();
        (timed_out.join().unwrap(), refused, established)
    });
    for (client, outcome, retransmits) in [
        (&refused, "connection_refused", 0),
        (&established, "established", 0),
        (&timed_out, "timed_out", 5),
    ] {
        let span = span_for(&agent, client, outcome, retransmits);
        check_received(&receiver, &span);
    }
    let metrics = synspan_testbed::wait_until(SPAN_WAIT, || {
        receiver.log().contains("synspan.attempts.exported").then_some(())
    });
    assert!(
        metrics.is_some(),
        "no self-metrics over HTTP:\n{}",
        receiver.log()
    );
    let stopped = agent.stop(Duration::from_secs(10)).unwrap();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    assert!(
        stopped.stderr.contains("protocol=\"http/protobuf\""),
        "{}",
        stopped.stderr
    );
    assert!(!stopped.stderr.contains("export failed"), "{}", stopped.stderr);
}
