//! End to end: the connect metrics. Real programs count real attempts made inside network
//! namespaces the tests create; the metrics are read as the test bed's OTLP receiver
//! (`synspan-otlp-sink`, which decodes every request) got them, and set against the spans
//! it got and the agent's accounting. Needs root.

use std::{
    collections::{BTreeMap, HashSet},
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Stdio},
    time::Duration,
};

use synspan_testbed::{
    agent::{Agent, Stopped},
    client::{Report, connect_many},
    netns::Netns,
    otlp_sink::{ConnectPoint, OtlpSink, SinkCounts},
    wait_until, workspace_bin,
};

const ATTEMPTS: &str = "synspan.connect.attempts";
const DURATION: &str = "synspan.connect.duration";
const RETRANSMITS: &str = "synspan.connect.syn_retransmits";
const WAIT: Duration = Duration::from_secs(30);

/// A TCP listener inside `ns` that never accepts: the kernel completes handshakes into its
/// backlog. Killed by pid on drop, after which connects to it are refused.
struct Listener(Child);

impl Listener {
    fn start(ns: &Netns, addr: &str, port: u16) -> Self {
        let script = format!(
            "import socket,time\n\
             s=socket.socket()\n\
             s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
             s.bind(('{addr}',{port}))\n\
             s.listen(4096)\n\
             print('listening',flush=True)\n\
             time.sleep(120)\n"
        );
        let mut child = ns
            .command(Path::new("python3"))
            .args(["-c", &script])
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 listener");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "listening");
        Self(child)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `n` attempts to `target` from one client process that lives a little while between them,
/// so that the agent reads its service while it is alive.
fn attempts(ns: &Netns, target: &str, n: u32, extra: &[&str]) -> Vec<Report> {
    let count = n.to_string();
    let mut args = vec!["--count", count.as_str(), "--interval", "20"];
    args.extend_from_slice(extra);
    connect_many(ns, target, &args).unwrap()
}

/// A receiver, and synspan exporting to it every second with `args`, spans also on stdout.
fn exporting(args: &[&str]) -> (OtlpSink, Agent) {
    let sink = OtlpSink::start().unwrap();
    let mut all = vec!["--otlp-endpoint", sink.endpoint(), "--metrics-interval", "1s"];
    all.extend_from_slice(args);
    let agent = Agent::start(&all).unwrap();
    (sink, agent)
}

fn sink_counts(sink: &OtlpSink) -> SinkCounts {
    sink.counts().unwrap()
}

/// The value of the one `synspan.connect.attempts` point of this destination and outcome
/// (summed over services when `service` is `None`).
fn attempts_of(counts: &SinkCounts, service: Option<&str>, addr: &str, port: u16, outcome: &str) -> i64 {
    let port = port.to_string();
    counts
        .connect_points(
            ATTEMPTS,
            &[
                ("server.address", addr),
                ("server.port", &port),
                ("synspan.outcome", outcome),
            ],
        )
        .into_iter()
        .filter(|p| service.is_none_or(|s| p.service == s))
        .map(|p| p.value)
        .sum()
}

fn point<'a>(counts: &'a SinkCounts, metric: &str, addr: &str, port: u16, outcome: &str) -> &'a ConnectPoint {
    let port = port.to_string();
    let points = counts.connect_points(
        metric,
        &[
            ("server.address", addr),
            ("server.port", &port),
            ("synspan.outcome", outcome),
        ],
    );
    assert_eq!(points.len(), 1, "{metric} {addr}:{port} {outcome}: {points:#?}");
    points[0]
}

/// Waits until the receiver has every expected count, then returns what it has.
fn wait_for(sink: &OtlpSink, expected: &[(&str, u16, &str, i64)]) -> SinkCounts {
    let matches = |c: &SinkCounts| {
        expected
            .iter()
            .all(|&(addr, port, outcome, n)| attempts_of(c, None, addr, port, outcome) == n)
    };
    wait_until(WAIT, || Some(sink_counts(sink)).filter(matches)).unwrap_or_else(|| {
        let c = sink_counts(sink);
        panic!(
            "the receiver never had {expected:?}; it has {:#?}",
            c.connect_points(ATTEMPTS, &[])
        )
    })
}

/// Every attempt counted, everywhere on the host: every series and the overflow.
fn total_attempts(counts: &SinkCounts) -> i64 {
    counts.connect_points(ATTEMPTS, &[]).iter().map(|p| p.value).sum()
}

/// The books at exit, against the metrics the last export carried: every attempt that
/// finished while synspan ran is in a series or the overflow, exactly once.
fn assert_totals_are_the_books(stopped: &Stopped, counts: &SinkCounts) {
    let books = stopped.exact_books();
    let finished =
        books["seen"] - books["in_flight"] - books["evicted"] - books["replaced"] - books["track_failed"];
    assert_eq!(
        total_attempts(counts) as u64,
        finished,
        "books {books:?}\n{}",
        stopped.stderr
    );
}

/// The bucket of `bounds` a duration in seconds falls in.
fn bucket_of(bounds: &[f64], seconds: f64) -> usize {
    bounds.iter().position(|&b| seconds <= b).unwrap_or(bounds.len())
}

fn span_seconds(span: &serde_json::Value) -> f64 {
    let start = span["start_time_unix_nano"].as_u64().unwrap();
    let end = span["end_time_unix_nano"].as_u64().unwrap();
    (end - start) as f64 / 1e9
}

#[test]
fn failures_only_counts_every_attempt_and_exemplars_lead_to_failed_spans() {
    let (sink, agent) = exporting(&["--failures-only"]);
    let ns = Netns::new("mxfo").unwrap();
    // The kernel gives up after about 3 s.
    ns.sysctl("net.ipv4.tcp_syn_retries", "1").unwrap();
    let (a, pa, b, pb) = ("127.0.0.71", 47101, "127.0.0.72", 47102);
    let (n_a, n_b, m_a, m_b, k_b) = (20, 12, 5, 3, 2);
    let mut reports = Vec::new();
    {
        let _la = Listener::start(&ns, a, pa);
        let _lb = Listener::start(&ns, b, pb);
        reports.extend(attempts(&ns, &format!("{a}:{pa}"), n_a, &[]));
        reports.extend(attempts(&ns, &format!("{b}:{pb}"), n_b, &[]));
    }
    reports.extend(attempts(&ns, &format!("{a}:{pa}"), m_a, &[]));
    reports.extend(attempts(&ns, &format!("{b}:{pb}"), m_b, &[]));
    let port_b = pb.to_string();
    ns.iptables(
        false,
        &[
            "-A", "INPUT", "-i", "lo", "-p", "tcp", "--dport", &port_b, "--syn", "-j", "DROP",
        ],
    )
    .unwrap();
    reports.extend(attempts(
        &ns,
        &format!("{b}:{pb}"),
        1,
        &["--parallel", &k_b.to_string()],
    ));
    let errnos: BTreeMap<i32, usize> = reports.iter().fold(BTreeMap::new(), |mut m, r| {
        *m.entry(r.errno).or_default() += 1;
        m
    });
    assert_eq!(
        errnos,
        BTreeMap::from([
            (0, (n_a + n_b) as usize),
            (111, (m_a + m_b) as usize),
            (110, k_b as usize)
        ]),
        "what the clients saw"
    );
    let expected = [
        (a, pa, "established", i64::from(n_a)),
        (b, pb, "established", i64::from(n_b)),
        (a, pa, "connection_refused", i64::from(m_a)),
        (b, pb, "connection_refused", i64::from(m_b)),
        (b, pb, "timed_out", i64::from(k_b)),
    ];
    wait_for(&sink, &expected);
    let pids: HashSet<u64> = reports.iter().map(|r| u64::from(r.pid)).collect();
    let stopped = agent.stop(Duration::from_secs(20)).unwrap();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    let counts = sink_counts(&sink);

    for &(addr, port, outcome, n) in &expected {
        assert_eq!(
            attempts_of(&counts, Some("synspan-connect"), addr, port, outcome),
            n,
            "{addr}:{port} {outcome} under the client's own service"
        );
        let histogram = point(&counts, DURATION, addr, port, outcome);
        assert_eq!(histogram.count, n as u64, "{histogram:#?}");
        assert_eq!(
            histogram.bucket_counts.iter().sum::<u64>(),
            n as u64,
            "{histogram:#?}"
        );
        assert_eq!(histogram.bucket_counts.len(), histogram.bounds.len() + 1);
        let failed = outcome != "established";
        assert_eq!(
            histogram.attributes.get("error.type").map(String::as_str),
            failed.then_some(outcome),
            "{histogram:#?}"
        );
        assert_eq!(histogram.attribute("network.type"), Some("ipv4"));
    }
    // Refusals on loopback take well under 10 ms.
    for (addr, port) in [(a, pa), (b, pb)] {
        let refused = point(&counts, DURATION, addr, port, "connection_refused");
        let fast = bucket_of(&refused.bounds, 0.010);
        assert_eq!(
            refused.bucket_counts[..=fast].iter().sum::<u64>(),
            refused.count,
            "{refused:#?}"
        );
        assert!(refused.sum < 0.010 * refused.count as f64, "{refused:#?}");
    }

    // The exported spans are exactly the failures.
    let ours: Vec<_> = stopped
        .spans
        .iter()
        .filter(|s| {
            s["attributes"]["process.pid"]
                .as_u64()
                .is_some_and(|p| pids.contains(&p))
        })
        .collect();
    assert_eq!(ours.len(), (m_a + m_b + k_b) as usize, "{ours:#?}");
    assert!(ours.iter().all(|s| s["attributes"]["error.type"].is_string()));
    let received: u64 = pids.iter().map(|&p| counts.of_pid(p as u32)).sum();
    assert_eq!(received, u64::from(m_a + m_b + k_b), "spans at the receiver");

    // Timeouts sit in the bucket their spans' durations say, a multi-second one.
    let timeouts = point(&counts, DURATION, b, pb, "timed_out");
    let timed_out: Vec<_> = ours
        .iter()
        .filter(|s| s["attributes"]["synspan.outcome"] == "timed_out")
        .collect();
    assert_eq!(timed_out.len(), k_b as usize);
    for span in &timed_out {
        let bucket = bucket_of(&timeouts.bounds, span_seconds(span));
        assert!(timeouts.bounds[bucket - 1] >= 1.0, "{timeouts:#?}");
        assert_eq!(timeouts.bucket_counts[bucket], u64::from(k_b), "{timeouts:#?}");
    }
    let retransmits = point(&counts, RETRANSMITS, b, pb, "timed_out");
    let span_retransmits: i64 = timed_out
        .iter()
        .map(|s| s["attributes"]["synspan.syn_retransmits"].as_i64().unwrap())
        .sum();
    assert_eq!(retransmits.value, span_retransmits);
    assert!(retransmits.value >= i64::from(k_b));

    // Exemplars lead from the failure counts and the latency to the failed attempts' spans.
    let span_ids: HashSet<&str> = ours.iter().map(|s| s["span_id"].as_str().unwrap()).collect();
    let mut led = 0;
    for (addr, port, outcome) in [
        (a, pa, "connection_refused"),
        (b, pb, "connection_refused"),
        (b, pb, "timed_out"),
    ] {
        for metric in [ATTEMPTS, DURATION] {
            let p = point(&counts, metric, addr, port, outcome);
            for e in &p.exemplars {
                assert!(span_ids.contains(e.span_id.as_str()), "{e:?} is no exported span");
                assert_eq!(e.trace_id.len(), 32);
                led += 1;
            }
        }
    }
    assert!(
        led > 0,
        "no exemplar: {:#?}",
        counts.connect_points(ATTEMPTS, &[])
    );
    assert!(
        point(&counts, ATTEMPTS, a, pa, "established")
            .exemplars
            .is_empty()
    );

    assert_totals_are_the_books(&stopped, &counts);
}

#[test]
fn sampled_successes_are_still_counted_exactly() {
    let (sink, agent) = exporting(&["--sample-successes", "0.1"]);
    let ns = Netns::new("mxsa").unwrap();
    let (addr, port, n) = ("127.0.0.73", 47103, 60);
    let reports = {
        let _l = Listener::start(&ns, addr, port);
        attempts(&ns, &format!("{addr}:{port}"), n, &[])
    };
    assert!(reports.iter().all(|r| r.errno == 0));
    wait_for(&sink, &[(addr, port, "established", i64::from(n))]);
    let stopped = agent.stop(Duration::from_secs(20)).unwrap();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    let counts = sink_counts(&sink);
    assert_eq!(
        attempts_of(&counts, None, addr, port, "established"),
        i64::from(n)
    );
    let exported = stopped
        .spans
        .iter()
        .filter(|s| s["attributes"]["process.pid"].as_u64() == Some(u64::from(reports[0].pid)))
        .count();
    // One in ten on average: all 60 would happen once in 10^60 runs.
    assert!(exported < n as usize, "{exported} spans of {n}");
    let histogram = point(&counts, DURATION, addr, port, "established");
    assert_eq!(histogram.count, u64::from(n));
    assert_totals_are_the_books(&stopped, &counts);
}

#[test]
fn past_the_bound_attempts_go_to_the_overflow_series_and_totals_stay_exact() {
    let bound = 4;
    let (sink, agent) = exporting(&["--metrics-max-series", &bound.to_string()]);
    let ns = Netns::new("mxov").unwrap();
    let destinations: Vec<String> = (0..12).map(|i| format!("127.0.0.74:{}", 47110 + i)).collect();
    for target in &destinations {
        attempts(&ns, target, 2, &[]);
    }
    let overflowed = wait_until(WAIT, || {
        let c = sink_counts(&sink);
        let overflow = c.connect_points(ATTEMPTS, &[("otel.metric.overflow", "true")]);
        (overflow.iter().map(|p| p.value).sum::<i64>() >= 2 * (12 - bound)).then_some(c)
    });
    assert!(overflowed.is_some(), "{:#?}", sink_counts(&sink).connect);
    let stopped = agent.stop(Duration::from_secs(20)).unwrap();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    let counts = sink_counts(&sink);
    let overflow = counts.connect_points(ATTEMPTS, &[("otel.metric.overflow", "true")]);
    assert!(
        overflow
            .iter()
            .all(|p| p.service == "synspan" && p.attribute("server.address").is_none()),
        "{overflow:#?}"
    );
    assert!(
        overflow
            .iter()
            .any(|p| p.attribute("synspan.outcome") == Some("connection_refused") && p.value > 0)
    );
    // At most `bound` series of ours made it into the map; the rest are in the overflow.
    let ours: i64 = destinations
        .iter()
        .map(|d| {
            let (addr, port) = d.split_once(':').unwrap();
            attempts_of(&counts, None, addr, port.parse().unwrap(), "connection_refused")
        })
        .sum();
    let series = destinations
        .iter()
        .filter(|d| {
            let (addr, port) = d.split_once(':').unwrap();
            attempts_of(&counts, None, addr, port.parse().unwrap(), "connection_refused") > 0
        })
        .count();
    assert!(
        series <= bound as usize,
        "{series} series past a bound of {bound}"
    );
    // Every one of the 24 is somewhere: in its series or the overflow (which may hold other
    // processes' refusals too); past the bound some are not in their own.
    let overflow_refused: i64 = overflow
        .iter()
        .filter(|p| p.attribute("synspan.outcome") == Some("connection_refused"))
        .map(|p| p.value)
        .sum();
    assert!(ours < 24, "{ours}");
    assert!(ours + overflow_refused >= 24, "{ours} + {overflow_refused}");
    assert_totals_are_the_books(&stopped, &counts);
}

#[test]
fn two_services_get_their_own_resources() {
    let (sink, agent) = exporting(&["--failures-only"]);
    let ns = Netns::new("mxsv").unwrap();
    let (addr, port) = ("127.0.0.75", 47104);
    let target = format!("{addr}:{port}");
    let run = |service: &str, n: u32| {
        let out = ns
            .command(&workspace_bin("synspan-connect"))
            .arg(&target)
            .args(["--count", &n.to_string(), "--interval", "50"])
            .env("OTEL_SERVICE_NAME", service)
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
        assert!(out.status.success());
    };
    {
        let _l = Listener::start(&ns, addr, port);
        run("checkout", 7);
        run("billing", 4);
    }
    wait_for(&sink, &[(addr, port, "established", 11)]);
    let counts = sink_counts(&sink);
    assert_eq!(
        attempts_of(&counts, Some("checkout"), addr, port, "established"),
        7
    );
    assert_eq!(
        attempts_of(&counts, Some("billing"), addr, port, "established"),
        4
    );
    let stopped = agent.stop(Duration::from_secs(20)).unwrap();
    assert!(stopped.status.success(), "{}", stopped.stderr);
}

#[test]
fn the_stats_line_names_the_busiest_destinations() {
    // Only this test's destination is traced: the line shows the host's busiest five.
    let agent = Agent::start(&[
        "--stats-interval",
        "1s",
        "--metrics-interval",
        "0",
        "--dest",
        "127.0.0.76/32",
    ])
    .unwrap();
    let ns = Netns::new("mxst").unwrap();
    attempts(&ns, "127.0.0.76:47105", 3, &[]);
    let line = wait_until(WAIT, || {
        agent
            .stderr()
            .lines()
            .find(|l| l.contains("busiest destinations") && l.contains("127.0.0.76:47105"))
            .map(str::to_owned)
    });
    assert!(line.is_some(), "{}", agent.stderr());
    assert!(
        line.unwrap().contains("127.0.0.76:47105 attempts=3 failed=3"),
        "{}",
        agent.stderr()
    );
    let stopped = agent.stop(Duration::from_secs(20)).unwrap();
    assert!(stopped.status.success(), "{}", stopped.stderr);
}
