//! End to end: collector outages, concurrency, socket-address reuse, clean exit, bad input,
//! missing privileges, TLS. Needs root.

use std::{
    collections::{HashMap, HashSet},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use synspan_testbed::{
    agent::Agent,
    client::{Report, connect_many},
    netns::Netns,
    receiver::Receiver,
    workspace_bin,
};

/// `count` refused attempts, each from its own process (so each has its own pid).
fn refused_attempts(ns: &Netns, count: usize) -> Vec<Report> {
    (0..count)
        .flat_map(|_| connect_many(ns, "127.0.0.1:9", &[]).unwrap())
        .collect()
}

fn pids(reports: &[Report]) -> HashSet<u64> {
    reports.iter().map(|r| u64::from(r.pid)).collect()
}

fn of_pids(spans: &[Value], pids: &HashSet<u64>) -> Vec<Value> {
    spans
        .iter()
        .filter(|s| {
            s["attributes"]["process.pid"]
                .as_u64()
                .is_some_and(|p| pids.contains(&p))
        })
        .cloned()
        .collect()
}

/// At exit every attempt synspan saw is exported, still in flight, or dropped under a reason.
/// Waits until the exporter says an export is stuck: the collector's outage is being lived
/// through, not only begun.
fn wait_retrying(agent: &Agent) {
    let retrying = synspan_testbed::wait_until(Duration::from_secs(10), || {
        agent
            .stderr()
            .contains("OTLP export not done after")
            .then_some(())
    });
    assert!(retrying.is_some(), "{}", agent.stderr());
}

fn assert_accounted(stopped: &synspan_testbed::agent::Stopped) {
    stopped.exact_books();
}

#[test]
fn collector_down_at_start_loses_nothing() {
    let mut receiver = Receiver::reserve().unwrap();
    let agent = Agent::start(&["--otlp-endpoint", &receiver.endpoint()]).unwrap();
    let ns = Netns::new("down").unwrap();
    let reports = refused_attempts(&ns, 50);
    let pids = pids(&reports);
    let printed = synspan_testbed::wait_until(Duration::from_secs(10), || {
        Some(of_pids(&agent.spans(), &pids).len()).filter(|&n| n == 50)
    });
    assert_eq!(printed, Some(50), "JSON output");
    wait_retrying(&agent);
    receiver.restart().unwrap();
    // Backoff tops out at 5 s between tries.
    let got = receiver.wait_spans(50, Duration::from_secs(30), |s| {
        s["attributes"]["process.pid"]
            .as_u64()
            .is_some_and(|p| pids.contains(&p))
    });
    assert_eq!(got.len(), 50, "received {} of 50\n{}", got.len(), agent.stderr());
    let stopped = agent.stop(Duration::from_secs(10)).unwrap();
    assert!(stopped.status.success());
    assert_accounted(&stopped);
}

#[test]
fn collector_outage_in_the_middle() {
    let mut receiver = Receiver::start().unwrap();
    let agent = Agent::start(&["--otlp-endpoint", &receiver.endpoint()]).unwrap();
    let ns = Netns::new("outage").unwrap();
    let mut reports = refused_attempts(&ns, 20);
    receiver.stop();
    reports.extend(refused_attempts(&ns, 20));
    wait_retrying(&agent);
    receiver.restart().unwrap();
    reports.extend(refused_attempts(&ns, 20));
    let pids = pids(&reports);
    let in_pids = |s: &Value| {
        s["attributes"]["process.pid"]
            .as_u64()
            .is_some_and(|p| pids.contains(&p))
    };
    let got = receiver.wait_spans(60, Duration::from_secs(30), in_pids);
    let stopped = agent.stop(Duration::from_secs(10)).unwrap();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    assert_accounted(&stopped);
    let a = stopped.accounting();
    let lost = a["export_queue_full"] + a["export_failed"] + a["unflushed"];
    let received: HashSet<String> = got
        .iter()
        .map(|s| s["span_id"].as_str().unwrap().to_string())
        .collect();
    assert!(
        received.len() as u64 + lost >= 60,
        "received {} of 60, counted lost {lost}\n{}",
        received.len(),
        stopped.stderr
    );
    assert_eq!(
        received.len(),
        60,
        "an outage this short must lose nothing\n{}",
        stopped.stderr
    );
}

#[test]
fn concurrent_attempts_keep_their_identity() {
    let agent = Agent::start(&[]).unwrap();
    let ns = Netns::new("conc").unwrap();
    let clients: Vec<_> = (0..20)
        .map(|_| {
            ns.command(&workspace_bin("synspan-connect"))
                .args(["127.0.0.1:9", "--parallel", "10"])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let reports: Vec<Report> = clients
        .into_iter()
        .flat_map(|c| {
            let out = c.wait_with_output().unwrap();
            assert!(out.status.success());
            String::from_utf8(out.stdout)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<Report>(l).unwrap())
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(reports.len(), 200);
    let pids = pids(&reports);
    assert_eq!(pids.len(), 20);
    let spans = synspan_testbed::wait_until(Duration::from_secs(20), || {
        let spans = of_pids(&agent.spans(), &pids);
        (spans.len() >= 200).then_some(spans)
    })
    .unwrap_or_else(|| of_pids(&agent.spans(), &pids));
    assert_eq!(spans.len(), 200);
    // A refused attempt frees its port at once, so two attempts racing for the same
    // destination may get the same port one after the other: the key is (tid, port).
    let key = |tid: u64, port: u64| (tid, port);
    let by_key: HashMap<(u64, u64), &Value> = spans
        .iter()
        .map(|s| {
            let a = &s["attributes"];
            (
                key(
                    a["thread.id"].as_u64().unwrap(),
                    a["network.local.port"].as_u64().unwrap(),
                ),
                s,
            )
        })
        .collect();
    assert_eq!(by_key.len(), 200, "every attempt must be its own span");
    let ids: HashSet<&str> = spans.iter().map(|s| s["span_id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 200);
    for r in &reports {
        let span = by_key
            .get(&key(u64::from(r.tid), u64::from(r.local_port)))
            .unwrap_or_else(|| panic!("no span for {r:?}"));
        let a = &span["attributes"];
        assert_eq!(a["process.pid"], r.pid, "{span}");
        assert_eq!(a["synspan.outcome"], "connection_refused", "{span}");
        assert_eq!(a["network.peer.port"], 9, "{span}");
    }
    let ports: HashSet<u64> = reports.iter().map(|r| u64::from(r.local_port)).collect();
    assert!(ports.len() > 150, "ports should mostly differ: {}", ports.len());
}

#[test]
fn ten_thousand_sequential_attempts_are_ten_thousand_spans() {
    // What is checked is that no attempt is lost or merged, not the agent's speed: the
    // client refuses 90 000 attempts a second on a fast host, and the default 4 MiB ring
    // (2 900 records, 33 ms of them) filled while the agent wrote JSON (ringbuf_full, which
    // the overflow test checks). 32 MiB hold all 10 000.
    let agent = Agent::start(&["--ring-buffer-bytes", "33554432"]).unwrap();
    let ns = Netns::new("reuse").unwrap();
    let reports = connect_many(&ns, "127.0.0.1:9", &["--count", "10000"]).unwrap();
    assert_eq!(reports.len(), 10_000);
    let pid = reports[0].pid;
    let spans = agent.wait_spans_of(pid, 10_000, Duration::from_secs(60));
    assert_eq!(spans.len(), 10_000, "{}", agent.stderr());
    let ids: HashSet<&str> = spans.iter().map(|s| s["span_id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 10_000);
    // The same port may come back across attempts: compare as multisets, in order.
    let seen: Vec<u64> = spans
        .iter()
        .map(|s| s["attributes"]["network.local.port"].as_u64().unwrap())
        .collect();
    let made: Vec<u64> = reports.iter().map(|r| u64::from(r.local_port)).collect();
    assert_eq!(
        seen, made,
        "spans must come in attempt order with the ports the client saw"
    );
    assert!(
        spans
            .iter()
            .all(|s| s["attributes"]["synspan.outcome"] == "connection_refused")
    );
    let stopped = agent.stop(Duration::from_secs(10)).unwrap();
    assert_accounted(&stopped);
    assert_eq!(stopped.accounting()["replaced"], 0);
}

#[test]
fn sigterm_exits_cleanly_and_unloads_everything() {
    let agent = Agent::start(&["--shutdown-timeout", "2s"]).unwrap();
    let ids = agent.prog_ids();
    assert!(ids.len() >= 2, "expected the agent's programs, got {ids:?}");
    let maps = agent.map_ids();
    assert!(maps.len() >= 2, "expected the agent's maps, got {maps:?}");
    let started = Instant::now();
    let stopped = agent.stop(Duration::from_secs(10)).unwrap();
    assert_eq!(stopped.status.code(), Some(0), "{}", stopped.stderr);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?}",
        started.elapsed()
    );
    assert!(stopped.stderr.contains("final: attempts"), "{}", stopped.stderr);
    // The kernel frees programs, then the maps they used, after an RCU grace period.
    let held = |what: &str, ids: &[u32]| -> Vec<Value> {
        let out = Command::new("bpftool")
            .args(["-j", what, "show"])
            .output()
            .expect("bpftool");
        let all: Vec<Value> = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
        all.into_iter()
            .filter(|p| ids.iter().any(|id| p["id"] == *id))
            .collect()
    };
    let gone = synspan_testbed::wait_until(Duration::from_secs(5), || {
        (held("prog", &ids).is_empty() && held("map", &maps).is_empty()).then_some(())
    });
    assert!(
        gone.is_some(),
        "left in the kernel: programs {:#?} maps {:#?}",
        held("prog", &ids),
        held("map", &maps)
    );
}

fn run_synspan(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = Command::new(workspace_bin("synspan"))
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_input_exits_2_with_a_message() {
    // (arguments, environment, what the message must say)
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 11] = [
        (&["--output", "none"], &[], "send every attempt nowhere"),
        (&["--no-such-flag"], &[], "unexpected argument"),
        (&["--output", "xml"], &[], "invalid value 'xml'"),
        (&["--otlp-endpoint", "localhost:4317"], &[], "http://"),
        (&["--otlp-endpoint", "http://h:4317/v1/traces"], &[], "no path"),
        (&["--stats-interval", "soon"], &[], "duration"),
        (&["--ring-buffer-bytes", "1000"], &[], "power of two"),
        (
            &[],
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317")],
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ),
        (
            &[
                "--otlp-endpoint",
                "https://h:4317",
                "--otlp-ca-file",
                "/nonexistent/ca.pem",
            ],
            &[],
            "cannot read --otlp-ca-file",
        ),
        (
            &["--otlp-endpoint", "http://127.0.0.1:4317"],
            &[("OTEL_EXPORTER_OTLP_HEADERS", "api-key")],
            "OTEL_EXPORTER_OTLP_HEADERS: an entry has no `=`",
        ),
        (
            &["--otlp-endpoint", "http://127.0.0.1:4317"],
            &[("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "zstd")],
            "unknown compression; use gzip or none",
        ),
    ];
    for (args, env, needle) in cases {
        let (code, stderr) = run_synspan(args, env);
        assert_eq!(code, Some(2), "{args:?} {env:?}: {stderr}");
        assert!(
            stderr.contains(needle),
            "{args:?}: expected `{needle}` in: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn without_privileges_it_says_which_are_missing() {
    let synspan = workspace_bin("synspan");
    for who in [&["--reuid=65534", "--regid=65534", "--clear-groups"][..], &[]] {
        let out = Command::new("setpriv")
            .args(who)
            .args(["--inh-caps=-all", "--bounding-set=-all", "--"])
            .arg(&synspan)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("missing capabilities: CAP_BPF, CAP_PERFMON"),
            "{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    }
}

#[test]
fn self_metrics_reach_the_collector() {
    let receiver = Receiver::start().unwrap();
    let agent = Agent::start(&[
        "--otlp-endpoint",
        &receiver.endpoint(),
        "--metrics-interval",
        "1s",
    ])
    .unwrap();
    let ns = Netns::new("metrics").unwrap();
    refused_attempts(&ns, 3);
    let log = synspan_testbed::wait_until(Duration::from_secs(20), || {
        let log = receiver.log();
        (log.contains("synspan.attempts.dropped") && log.contains("synspan.attempts.exported")).then_some(log)
    });
    assert!(
        log.is_some(),
        "no self-metrics at the receiver:\n{}",
        receiver.log()
    );
    let log = log.unwrap();
    for needle in [
        "synspan.attempts.seen",
        "synspan.drop.reason",
        "ringbuf_full",
        "synspan.attempts.in_flight",
    ] {
        assert!(log.contains(needle), "`{needle}` missing from:\n{log}");
    }
    let stopped = agent.stop(Duration::from_secs(10)).unwrap();
    assert!(stopped.status.success(), "{}", stopped.stderr);
}

/// With the collector down, a SIGTERM waits for the export; a second one exits at once.
#[test]
fn second_signal_exits_at_once() {
    let receiver = Receiver::reserve().unwrap();
    let agent = Agent::start(&[
        "--otlp-endpoint",
        &receiver.endpoint(),
        "--shutdown-timeout",
        "60s",
    ])
    .unwrap();
    let ns = Netns::new("sig2").unwrap();
    refused_attempts(&ns, 3);
    let pid = agent.pid() as i32;
    // Let the refused attempts reach the export queue, where they wait for the collector.
    synspan_testbed::wait_until(Duration::from_secs(10), || {
        (agent.spans().len() >= 3).then_some(())
    });
    // SAFETY: plain syscall on the agent this test started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let stopping = synspan_testbed::wait_until(Duration::from_secs(10), || {
        agent.stderr().contains("SIGTERM: stopping").then_some(())
    });
    assert!(stopping.is_some(), "{}", agent.stderr());
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let stopped = agent.stop(Duration::from_secs(10)).unwrap();
    assert_eq!(stopped.status.code(), Some(130), "{}", stopped.stderr);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(stopped.stderr.contains("second signal"), "{}", stopped.stderr);
}

/// An evidence lookup that never answers (a conntrack socket that hangs, made on purpose
/// here: every lookup is held back two minutes) holds up neither the attempts behind it nor
/// a SIGTERM: the stuck one times out, the next ones go without evidence at once.
#[test]
fn a_stuck_evidence_lookup_holds_up_neither_export_nor_sigterm() {
    let receiver = Receiver::start().unwrap();
    let agent = Agent::start(&[
        "--otlp-endpoint",
        &receiver.endpoint(),
        "--evidence-delay",
        "120s",
    ])
    .unwrap();
    let ns = Netns::new("stuck").unwrap();
    // Each refusal asks for its NAT evidence; the first one's lookup never comes back.
    let reports = refused_attempts(&ns, 10);
    let pids = pids(&reports);
    let got = receiver.wait_spans(10, Duration::from_secs(30), |s| {
        s["attributes"]["process.pid"]
            .as_u64()
            .is_some_and(|p| pids.contains(&p))
    });
    assert_eq!(got.len(), 10, "received {} of 10\n{}", got.len(), agent.stderr());
    // Well inside the two minutes the lookup is held: the stop does not wait for it.
    let stopped = agent.stop(Duration::from_secs(20)).unwrap();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    assert_accounted(&stopped);
    assert!(stopped.accounting()["exported"] >= 10, "{}", stopped.stderr);
    assert!(
        stopped.stderr.contains("timed_out=1") && stopped.stderr.contains("stalled="),
        "{}",
        stopped.stderr
    );
}

/// Two agents on one host, as in a DaemonSet rollout where the new pod starts before the old
/// one has stopped: nothing in the kernel is shared (no pinned maps, programs attached per
/// process), so each traces every attempt on its own, and the old one leaving takes nothing
/// from the new one.
#[test]
fn two_agents_work_independently_through_a_rollout() {
    let port = "23461";
    let filter = ["--dest-port", port];
    let (old_receiver, old) = Agent::start_exporting(&filter).unwrap();
    let (new_receiver, new) = Agent::start_exporting(&filter).unwrap();
    let ns = Netns::new("twoagents").unwrap();
    let target = format!("127.0.0.1:{port}");
    let during = connect_many(&ns, &target, &["--count", "10"]).unwrap();
    let pid = u64::from(during[0].pid);
    let of = |pid: u64| move |s: &Value| s["attributes"]["process.pid"] == pid;
    for (receiver, agent) in [(&old_receiver, &old), (&new_receiver, &new)] {
        let got = receiver.wait_spans(10, Duration::from_secs(20), of(pid));
        assert_eq!(got.len(), 10, "{}", agent.stderr());
        let ports: HashSet<u64> = got
            .iter()
            .map(|s| s["attributes"]["network.local.port"].as_u64().unwrap())
            .collect();
        let made: HashSet<u64> = during.iter().map(|r| u64::from(r.local_port)).collect();
        assert_eq!(ports, made);
    }
    let old_programs = old.prog_ids();
    let new_programs = new.prog_ids();
    assert!(
        old_programs.iter().all(|id| !new_programs.contains(id)),
        "the agents share programs: {old_programs:?} {new_programs:?}"
    );
    let stopped = old.stop(Duration::from_secs(10)).unwrap();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    let books = stopped.exact_books();
    assert_eq!(books["exported"], 10, "{books:?}");
    // The old agent is gone; the new one goes on alone.
    let after = connect_many(&ns, &target, &["--count", "10"]).unwrap();
    let pid = u64::from(after[0].pid);
    let got = new_receiver.wait_spans(10, Duration::from_secs(20), of(pid));
    assert_eq!(got.len(), 10, "{}", new.stderr());
    assert!(old_receiver.spans().iter().all(|s| !of(pid)(s)));
    let stopped = new.stop(Duration::from_secs(10)).unwrap();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    let books = stopped.exact_books();
    assert_eq!(books["exported"], 20, "{books:?}");
    assert_eq!(books["seen"] - books["filtered"], 20, "{books:?}");
}
