//! End to end: a kernel without what synspan would like. An optional tracepoint that is
//! missing (`--pretend-missing`, as if attaching it had failed) and a kernel without BTF
//! (`--kernel-btf` naming a file that is not there, or one that is not BTF): synspan starts,
//! warns once per gap naming what the spans lose, and the spans still reach the collector.
//! Needs root.

use std::time::Duration;

use serde_json::Value;
use synspan_testbed::{
    agent::Agent,
    client::{Report, connect},
    netns::Netns,
    receiver::Receiver,
};

const SPAN_WAIT: Duration = Duration::from_secs(20);

/// The span of `client`'s attempt as the collector received it.
fn received(receiver: &Receiver, agent: &Agent, client: &Report) -> Value {
    let pid = u64::from(client.pid);
    let spans = receiver.wait_spans(1, SPAN_WAIT, |s| s["attributes"]["process.pid"] == pid);
    assert_eq!(
        spans.len(),
        1,
        "spans of {client:?} at the collector: {spans:#?}\n{}",
        agent.stderr()
    );
    let span = spans.into_iter().next().unwrap();
    assert_eq!(
        span["attributes"]["network.local.port"], client.local_port,
        "{span:#}"
    );
    span
}

fn outcome(span: &Value) -> &str {
    span["attributes"]["synspan.outcome"].as_str().unwrap_or_default()
}

fn event_names(span: &Value) -> Vec<&str> {
    span["events"]
        .as_array()
        .map(|events| events.iter().filter_map(|e| e["name"].as_str()).collect())
        .unwrap_or_default()
}

/// `needle` is on exactly one line of `log`.
fn warned_once(log: &str, needle: &str) {
    let lines = log.lines().filter(|l| l.contains(needle)).count();
    assert_eq!(lines, 1, "`{needle}` on {lines} lines of:\n{log}");
}

#[test]
fn missing_optional_tracepoints_cost_only_what_they_show() {
    let ns = Netns::new("gap").unwrap();
    // SYNs to port 7 vanish, so an attempt there retransmits until the client gives up.
    ns.iptables(
        false,
        &[
            "-A", "INPUT", "-i", "lo", "-p", "tcp", "--dport", "7", "--syn", "-j", "DROP",
        ],
    )
    .unwrap();
    let (receiver, agent) =
        Agent::start_exporting(&["--pretend-missing", "tcp_retransmit_skb,tcp_receive_reset"]).unwrap();

    let refused = connect(&ns, "127.0.0.1:9", &[]).unwrap();
    assert_eq!(refused.errno, libc::ECONNREFUSED, "{refused:?}");
    let span = received(&receiver, &agent, &refused);
    // The outcome comes from the socket's error at its end, not from the reset hook.
    assert_eq!(outcome(&span), "connection_refused", "{span:#}");
    assert!(!event_names(&span).contains(&"rst_received"), "{span:#}");

    // Two SYN retransmits happen (at about 1 and 2 s); without the hook nobody sees them.
    let dropped = connect(&ns, "127.0.0.1:7", &["--close-after", "2500"]).unwrap();
    assert!(dropped.closed_by_app, "{dropped:?}");
    let span = received(&receiver, &agent, &dropped);
    assert_eq!(outcome(&span), "aborted", "{span:#}");
    assert!(!event_names(&span).contains(&"syn_retransmit"), "{span:#}");
    assert_eq!(span["attributes"]["synspan.syn_retransmits"], 0, "{span:#}");

    let ok = connect(&ns, "127.0.0.1:0", &["--listen-first"]).unwrap();
    assert_eq!(outcome(&received(&receiver, &agent, &ok)), "established");

    let stopped = agent.stop(Duration::from_secs(10)).unwrap();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    warned_once(
        &stopped.stderr,
        "not attached: tcp_retransmit_skb (--pretend-missing); missing: syn_retransmit events and \
         synspan.syn_retransmits",
    );
    warned_once(
        &stopped.stderr,
        "not attached: tcp_receive_reset (--pretend-missing); missing: rst_received events",
    );
    // Only what was left out is missing.
    assert_eq!(
        stopped.stderr.matches("not attached:").count(),
        2,
        "{}",
        stopped.stderr
    );
    stopped.exact_books();
}

/// Attempts on a kernel without usable BTF: classic tracepoints, the same outcomes.
fn classic_path_traces_attempts(kernel_btf: &str, why: &str) {
    let ns = Netns::new("nobtf").unwrap();
    let (receiver, agent) = Agent::start_exporting(&["--kernel-btf", kernel_btf]).unwrap();
    let refused = connect(&ns, "127.0.0.1:9", &[]).unwrap();
    assert_eq!(
        outcome(&received(&receiver, &agent, &refused)),
        "connection_refused"
    );
    let refused6 = connect(&ns, "[::1]:9", &[]).unwrap();
    assert_eq!(
        outcome(&received(&receiver, &agent, &refused6)),
        "connection_refused"
    );
    let ok = connect(&ns, "127.0.0.1:0", &["--listen-first"]).unwrap();
    let span = received(&receiver, &agent, &ok);
    assert_eq!(outcome(&span), "established", "{span:#}");
    assert_eq!(span["attributes"]["process.pid"], ok.pid, "{span:#}");
    let stopped = agent.stop(Duration::from_secs(10)).unwrap();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    let log = &stopped.stderr;
    warned_once(
        log,
        &format!("attempts are traced with classic tracepoints (no kernel BTF: {why}"),
    );
    warned_once(log, &format!("no kernel BTF ({why}"));
    for gap in [
        "not attached: inet_sk_error_report (no offset for struct sock::sk_err in kernel BTF); \
         missing: icmp_error events",
        "not attached: kfree_skb (no struct sk_buff header offsets in kernel BTF); missing: \
         packet_dropped events",
        "not attached: sys_enter_connect (cannot tell TCP sockets from others without kernel \
         BTF); missing:",
    ] {
        warned_once(log, gap);
    }
    assert!(!log.contains("panicked"), "{log}");
    stopped.exact_books();
}

#[test]
fn without_kernel_btf_attempts_are_traced_with_classic_tracepoints() {
    classic_path_traces_attempts(
        "/nonexistent/btf/vmlinux",
        "reading /nonexistent/btf/vmlinux: No such file or directory",
    );
}

/// A BTF file that is not BTF (corrupt, or another kernel's format) is no BTF at all.
#[test]
fn with_unreadable_kernel_btf_attempts_are_traced_with_classic_tracepoints() {
    let path = std::env::temp_dir().join(format!("synspan-not-btf-{}", std::process::id()));
    std::fs::write(
        &path,
        b"\x9f\xeb\x01\x00this is not the kernel's type information",
    )
    .unwrap();
    let path_str = path.to_str().unwrap().to_string();
    let run = std::panic::catch_unwind(|| classic_path_traces_attempts(&path_str, ""));
    let _ = std::fs::remove_file(&path);
    if let Err(panic) = run {
        std::panic::resume_unwind(panic);
    }
}
