//! End to end: the in-kernel policy and exact accounting. Needs root.

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use serde_json::Value;
use synspan_testbed::{
    agent::Agent,
    cgroup::Cgroup,
    client::{Report, connect_many},
    netns::Netns,
    otlp_sink::{OtlpSink, SinkCounts},
    wait_until, workspace_bin,
};

fn outcomes_of(agent: &Agent, reports: &[Report]) -> Vec<String> {
    let pids: Vec<u32> = reports.iter().map(|r| r.pid).collect();
    agent
        .spans()
        .iter()
        .filter(|s| pids.iter().any(|p| s["attributes"]["process.pid"] == *p))
        .map(|s| s["attributes"]["synspan.outcome"].as_str().unwrap().to_string())
        .collect()
}

/// `n` fast successes and `n` refusals, each its own process.
fn mixed(ns: &Netns, n: usize) -> (Vec<Report>, Vec<Report>) {
    let ok = (0..n)
        .flat_map(|_| connect_many(ns, "127.0.0.1:0", &["--listen-first"]).unwrap())
        .collect();
    let refused = (0..n)
        .flat_map(|_| connect_many(ns, "127.0.0.1:9", &[]).unwrap())
        .collect();
    (ok, refused)
}

/// Waits until the agent has everything it will get: a marker failure made last.
fn settle(agent: &Agent, ns: &Netns) {
    let marker = connect_many(ns, "127.0.0.1:9", &[]).unwrap();
    let got = agent.wait_spans_of(marker[0].pid, 1, Duration::from_secs(20));
    assert_eq!(got.len(), 1, "{}", agent.stderr());
}

#[test]
fn failures_only_keeps_failures_and_drops_fast_successes() {
    let agent = Agent::start(&["--failures-only"]).unwrap();
    let ns = Netns::new("fo").unwrap();
    let (ok, refused) = mixed(&ns, 5);
    settle(&agent, &ns);
    assert!(
        outcomes_of(&agent, &ok).is_empty(),
        "fast successes must stay in the kernel"
    );
    assert_eq!(outcomes_of(&agent, &refused), vec!["connection_refused"; 5]);
    let stopped = agent.stop(Duration::from_secs(10)).unwrap();
    assert!(stopped.accounting()["filtered"] >= 5, "{}", stopped.stderr);
}

#[test]
fn sampling_rate_zero_drops_every_success() {
    let agent = Agent::start(&["--sample-successes", "0"]).unwrap();
    let ns = Netns::new("s0").unwrap();
    let (ok, refused) = mixed(&ns, 5);
    settle(&agent, &ns);
    assert!(outcomes_of(&agent, &ok).is_empty());
    assert_eq!(outcomes_of(&agent, &refused).len(), 5);
}

#[test]
fn slow_threshold_keeps_a_slow_success_and_drops_a_fast_one() {
    let agent = Agent::start(&["--sample-successes", "0", "--slow-threshold", "300ms"]).unwrap();
    let ns = Netns::new("slow").unwrap();
    // Every SYN to an ephemeral listener port is dropped until the rule goes: the client's
    // first SYN is lost, its retransmit about a second later gets through.
    let rule = [
        "INPUT",
        "-i",
        "lo",
        "-p",
        "tcp",
        "--dport",
        "32768:60999",
        "--syn",
        "-j",
        "DROP",
    ];
    ns.iptables(false, &[&["-A"][..], &rule].concat()).unwrap();
    let slow = ns
        .command(&workspace_bin("synspan-connect"))
        .args(["127.0.0.1:0", "--listen-first"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Once its first SYN is out (and dropped), let the retransmit through.
    let in_syn_sent = synspan_testbed::wait_until(Duration::from_secs(5), || {
        let out = ns.exec(&["ss", "-Htn", "state", "syn-sent"]).ok()?;
        (!out.stdout.is_empty()).then_some(())
    });
    assert!(in_syn_sent.is_some());
    ns.iptables(false, &[&["-D"][..], &rule].concat()).unwrap();
    let out = slow.wait_with_output().unwrap();
    let slow: Report = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(slow.errno, 0);
    assert!(slow.elapsed_ms > 300.0, "{slow:?}");
    let fast = connect_many(&ns, "127.0.0.1:0", &["--listen-first"]).unwrap();
    settle(&agent, &ns);
    let kept: Vec<Value> = agent.spans_of(slow.pid);
    assert_eq!(kept.len(), 1, "the slow success is kept");
    assert_eq!(kept[0]["attributes"]["synspan.outcome"], "established");
    assert!(kept[0]["attributes"]["synspan.syn_retransmits"].as_u64().unwrap() >= 1);
    assert!(
        outcomes_of(&agent, &fast).is_empty(),
        "the fast success is dropped"
    );
}

/// With a ring buffer that holds a dozen records, a storm overflows it. Every attempt of
/// the storm is still exported or counted, exactly; the cgroup filter keeps the rest of the
/// host out of the count.
#[test]
fn accounting_is_exact_when_the_ring_buffer_overflows() {
    let cgroup = Cgroup::new("acct").unwrap();
    let cg = cgroup.path().display().to_string();
    let agent = Agent::start(&["--ring-buffer-bytes", "4096", "--cgroup", &cg]).unwrap();
    let ns = Netns::new("acct").unwrap();
    let mut storm = ns.command(&workspace_bin("synspan-connect"));
    storm.args(["127.0.0.1:9", "--count", "3000", "--parallel", "2"]);
    let out = cgroup.wrap(&storm).stdout(Stdio::piped()).output().unwrap();
    assert!(out.status.success());
    let made = String::from_utf8_lossy(&out.stdout).lines().count() as u64;
    assert_eq!(made, 6000);
    let stopped = agent.stop(Duration::from_secs(10)).unwrap();
    let a = stopped.accounting();
    let exported = stopped.spans.len() as u64;
    assert_eq!(a["exported"], exported, "{a:?}");
    assert_eq!(a["in_flight"], 0, "{a:?}");
    // Attempts from outside the cgroup are seen and filtered at SYN_SENT; ours are all here.
    let ours = a["seen"] - a["filtered"];
    assert_eq!(ours, made, "{a:?}");
    assert_eq!(
        made,
        // A ring buffer this small hands the worker an attempt or two at a time, so its
        // channel of hand-overs can fill too (`enrich_queue_full`): counted, like the rest.
        exported + a["ringbuf_full"] + a["evicted"] + a["replaced"] + a["enrich_queue_full"],
        "{a:?}"
    );
    assert!(
        a["ringbuf_full"] > 0,
        "the storm was meant to overflow the ring buffer: {a:?}"
    );
}

/// A refused storm to one destination, with a span rate limit: the kernel lets through
/// about the limit a second and counts the rest as `rate_limited`; the connect metrics
/// still count every attempt.
#[test]
fn a_storm_of_identical_failures_is_rate_limited_in_the_kernel_and_still_counted() {
    const LIMIT: u64 = 20;
    let sink = OtlpSink::start().unwrap();
    let cgroup = Cgroup::new("rate").unwrap();
    let cg = cgroup.path().display().to_string();
    let limit = LIMIT.to_string();
    let agent = Agent::start(&[
        "--otlp-endpoint",
        sink.endpoint(),
        "--metrics-interval",
        "1s",
        "--span-rate-limit",
        &limit,
        "--cgroup",
        &cg,
    ])
    .unwrap();
    let ns = Netns::new("rate").unwrap();
    let mut storm = ns.command(&workspace_bin("synspan-connect"));
    storm.args(["127.0.0.1:9", "--count", "1500", "--parallel", "2"]);
    let began = Instant::now();
    let out = cgroup.wrap(&storm).stdout(Stdio::piped()).output().unwrap();
    let seconds = began.elapsed().as_secs_f64();
    assert!(out.status.success());
    let made = String::from_utf8_lossy(&out.stdout).lines().count() as u64;
    assert_eq!(made, 3000);
    let refused = |c: &SinkCounts| {
        c.connect_points(
            "synspan.connect.attempts",
            &[("server.address", "127.0.0.1"), ("server.port", "9")],
        )
        .iter()
        .map(|p| p.value as u64)
        .sum::<u64>()
    };
    let counts = wait_until(Duration::from_secs(30), || {
        sink.counts().ok().filter(|c| refused(c) == made)
    });
    assert!(
        counts.is_some(),
        "the metrics never counted {made}: {:?}",
        sink.counts()
    );
    let stopped = agent.stop(Duration::from_secs(20)).unwrap();
    let a = stopped.exact_books();
    let exported = sink.counts().unwrap().spans;
    assert_eq!(a["exported"], exported, "{a:?}");
    assert_eq!(a["seen"] - a["filtered"], made, "{a:?}");
    assert_eq!(exported + a["rate_limited"], made, "{a:?}");
    // One budget per started second of the storm; two CPUs may each pass one attempt past a
    // budget that the other is about to fill.
    let windows = seconds.ceil() as u64 + 1;
    assert!(
        (LIMIT..=windows * (LIMIT + 2)).contains(&exported),
        "{exported} spans in {seconds:.2} s with a limit of {LIMIT}/s: {a:?}"
    );
}
