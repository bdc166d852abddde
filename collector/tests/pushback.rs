//! End to end: a collector that pushes back (throttles, refuses, is down for a while, answers
//! slowly or never, rejects part of a request), and synspan's books at exit. The collector is
//! the test bed's sink told how to answer. Needs root.
//!
//! Each test traces only its own destination port (`--dest-port`), refused inside a network
//! namespace of its own, so every request the sink gets is the test's own, however many tests
//! and agents run at once: everything else the host does is counted as `filtered`.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use synspan_testbed::{
    agent::{Agent, Output, Stopped},
    client::connect_many,
    netns::Netns,
    otlp_sink::{Answer, OtlpSink, SinkCounts},
    wait_until,
};

/// Attempts each test makes, from one process in one quick burst: one export request.
const ATTEMPTS: u64 = 20;

struct Run {
    stopped: Stopped,
    books: HashMap<String, u64>,
    sink: SinkCounts,
}

/// Starts a sink answering `answer` and synspan exporting to it (with `args` and `env`), makes
/// `count` refused attempts to `port` from `parallel` threads, waits until `done` says the
/// sink has seen what it should (or `wait` passed), and stops synspan.
struct Case<'a> {
    answer: Answer,
    port: u16,
    count: u64,
    parallel: u64,
    output: Output,
    args: &'a [&'a str],
    env: &'a [(&'a str, &'a str)],
    wait: Duration,
    /// How long synspan runs on once `done`: room for what must not happen (a retry).
    linger: Duration,
    /// Over OTLP/HTTP instead of gRPC.
    http: bool,
}

impl Case<'_> {
    fn new(answer: Answer, port: u16) -> Self {
        Self {
            answer,
            port,
            count: ATTEMPTS,
            parallel: 1,
            output: Output::None,
            args: &[],
            env: &[],
            wait: Duration::from_secs(20),
            linger: Duration::ZERO,
            http: false,
        }
    }

    fn over_http(mut self) -> Self {
        self.http = true;
        self
    }

    fn run(&self, done: impl Fn(&SinkCounts) -> bool) -> Run {
        self.run_watching(done, |_| {})
    }

    /// As [`Case::run`], calling `watch` with the agent once the attempts are made.
    fn run_watching(&self, done: impl Fn(&SinkCounts) -> bool, watch: impl FnOnce(&Agent)) -> Run {
        let sink = if self.http {
            OtlpSink::start_http(self.answer)
        } else {
            OtlpSink::start_answering(self.answer)
        }
        .unwrap();
        let port = self.port.to_string();
        let protocol = if self.http { "http/protobuf" } else { "grpc" };
        let mut args = vec![
            "--otlp-protocol",
            protocol,
            "--otlp-endpoint",
            sink.endpoint(),
            "--dest-port",
            &port,
            "--metrics-interval",
            "0",
        ];
        args.extend_from_slice(self.args);
        let agent = Agent::start_with_env(self.output, &args, self.env).unwrap();
        let ns = Netns::new(&format!("push{port}")).unwrap();
        let per_thread = (self.count / self.parallel).to_string();
        let parallel = self.parallel.to_string();
        let reports = connect_many(
            &ns,
            &format!("127.0.0.1:{port}"),
            &["--count", &per_thread, "--parallel", &parallel],
        )
        .unwrap();
        assert_eq!(reports.len() as u64, self.count);
        assert!(
            reports.iter().all(|r| r.errno == libc::ECONNREFUSED),
            "{reports:?}"
        );
        watch(&agent);
        wait_until(self.wait, || sink.counts().ok().filter(|c| done(c)));
        std::thread::sleep(self.linger);
        let stopped = agent.stop(Duration::from_secs(30)).unwrap();
        assert!(stopped.status.success(), "{}", stopped.stderr);
        let books = stopped.exact_books();
        // Of what passed the port filter, each attempt of this test is exactly one of these.
        let settled =
            books["exported"] + books["export_queue_full"] + books["export_failed"] + books["unflushed"];
        assert_eq!(settled, self.count, "{books:?}\n{}", stopped.stderr);
        assert_eq!(
            books["dropped"] - books["filtered"],
            settled - books["exported"],
            "{books:?}"
        );
        let sink = sink.counts().unwrap();
        Run { stopped, books, sink }
    }
}

fn last_arrival(sink: &SinkCounts) -> u64 {
    sink.arrivals_ms.iter().copied().max().unwrap_or(0)
}

#[test]
fn throttled_with_retry_info_waits_the_delay_it_names() {
    let delay = Duration::from_millis(1500);
    let run = Case::new(Answer::Throttle { delay, requests: 1 }, 11).run(|s| s.spans >= ATTEMPTS);
    let (books, sink) = (&run.books, &run.sink);
    eprintln!("throttled: tries at {:?} ms", sink.arrivals_ms);
    assert_eq!(books["exported"], ATTEMPTS, "{books:?}");
    assert_eq!(books["export_failed"], 0, "{books:?}");
    assert_eq!(sink.refused, 1, "{sink:?}");
    assert_eq!(sink.spans, ATTEMPTS, "{sink:?}");
    // The refused request came back after the named delay, not after the 100 ms backoff step.
    let retried = last_arrival(sink);
    assert!(
        (1500..2500).contains(&retried),
        "retried {retried} ms after the first request: {sink:?}"
    );
}

/// 429 with `Retry-After`: the collector's seconds are waited, not the backoff's step.
#[test]
fn http_429_waits_its_retry_after() {
    // 1.5 s, which the header rounds up to 2.
    let delay = Duration::from_millis(1500);
    let run = Case::new(Answer::Throttle { delay, requests: 1 }, 83)
        .over_http()
        .run(|s| s.spans >= ATTEMPTS);
    let (books, sink) = (&run.books, &run.sink);
    eprintln!("429 over HTTP: tries at {:?} ms", sink.arrivals_ms);
    assert_eq!(books["exported"], ATTEMPTS, "{books:?}\n{}", run.stopped.stderr);
    assert_eq!(books["export_failed"], 0, "{books:?}");
    assert_eq!(sink.refused, 1, "{sink:?}");
    let retried = last_arrival(sink);
    assert!(
        (2000..3000).contains(&retried),
        "retried {retried} ms after the first request: {sink:?}"
    );
}

/// 503 while the collector is down: retried with backoff until it is back, nothing lost.
#[test]
fn http_503_is_retried_until_the_collector_is_back() {
    let outage = Duration::from_secs(2);
    let run = Case::new(Answer::Unavailable { outage }, 89)
        .over_http()
        .run(|s| s.spans >= ATTEMPTS);
    let (books, sink) = (&run.books, &run.sink);
    eprintln!("503 over HTTP for {outage:?}: tries at {:?} ms", sink.arrivals_ms);
    assert_eq!(books["exported"], ATTEMPTS, "{books:?}\n{}", run.stopped.stderr);
    assert_eq!(books["export_failed"], 0, "{books:?}");
    // Backoff steps of 0.1, 0.2, 0.4, 0.8, 1.6 s (each wait in its upper half) fit at least
    // 4 tries into the outage.
    assert!(sink.refused >= 4, "{sink:?}");
    assert!(last_arrival(sink) >= 2000, "{sink:?}");
}

#[test]
fn http_400_is_not_retried() {
    fails_at_once_over(Answer::Invalid, 97, true);
}

/// Refusals the specification calls permanent: counted `export_failed` at once, sent once.
fn fails_at_once(answer: Answer, port: u16) {
    fails_at_once_over(answer, port, false);
}

fn fails_at_once_over(answer: Answer, port: u16, http: bool) {
    let mut case = Case::new(answer, port);
    case.http = http;
    // A retry would come within 100 ms of the refusal.
    case.linger = Duration::from_millis(500);
    let run = case.run(|s| s.received_spans >= ATTEMPTS);
    let (books, sink) = (&run.books, &run.sink);
    assert_eq!(
        books["export_failed"], ATTEMPTS,
        "{books:?}\n{}",
        run.stopped.stderr
    );
    assert_eq!(books["exported"], 0, "{books:?}");
    // Still retrying at exit would have made them `unflushed` after the shutdown timeout.
    assert_eq!(books["unflushed"], 0, "{books:?}");
    assert_eq!(
        sink.received_spans, ATTEMPTS,
        "sent once, never retried: {sink:?}"
    );
    assert_eq!(sink.refused, sink.requests, "{sink:?}");
}

#[test]
fn resource_exhausted_without_retry_info_is_not_retried() {
    fails_at_once(Answer::Exhausted, 13);
}

#[test]
fn invalid_argument_is_not_retried() {
    fails_at_once(Answer::Invalid, 17);
}

#[test]
fn unavailable_for_five_seconds_loses_nothing() {
    let outage = Duration::from_secs(5);
    let run = Case::new(Answer::Unavailable { outage }, 19).run(|s| s.spans >= ATTEMPTS);
    let (books, sink) = (&run.books, &run.sink);
    eprintln!("unavailable for {outage:?}: tries at {:?} ms", sink.arrivals_ms);
    assert_eq!(books["exported"], ATTEMPTS, "{books:?}\n{}", run.stopped.stderr);
    assert_eq!(
        books["export_failed"] + books["export_queue_full"],
        0,
        "{books:?}"
    );
    assert_eq!(sink.spans, ATTEMPTS, "{sink:?}");
    let accepted = sink.requests - sink.refused;
    // Backoff from 100 ms doubling, each wait in the upper half of its step: a request refused
    // from the start of the outage is tried at 0, then 5 times by 3.1 s at the latest (0.1,
    // 0.3, 0.7, 1.5, 3.1 s) or 1.55 s at the earliest, all in the outage; the sixth retry comes
    // between 3.15 and 6.3 s, in the outage or after it: six or seven refusals; the next is at
    // most 5 s later. A request that began later meets fewer.
    assert!(
        sink.refused >= 6 && sink.refused <= 7 * accepted,
        "{} refusals for {accepted} requests: {sink:?}",
        sink.refused
    );
    // Recovered by the try after the outage: at most one 5 s step late.
    assert!(
        (5000..10_000).contains(&last_arrival(sink)),
        "recovered at {} ms: {sink:?}",
        last_arrival(sink)
    );
    if accepted == 1 {
        // One request: its tries are the backoff itself, each gap in the upper half of its
        // step. A retry is never early; it may be late by what the host's scheduler adds (up
        // to a second seen on a loaded 2-core machine), which says nothing about the backoff.
        let gaps: Vec<u64> = sink.arrivals_ms.windows(2).map(|w| w[1] - w[0]).collect();
        let mut step = 100;
        for &gap in &gaps {
            assert!(
                gap + 20 >= step / 2 && gap <= step + 1000,
                "gap {gap} ms outside the {step} ms step: {gaps:?}"
            );
            step = (step * 2).min(5000);
        }
    }
}

#[test]
fn slow_collector_fills_the_queue_not_the_reader() {
    const STORM: u64 = 2000;
    let mut case = Case::new(
        Answer::Slow {
            delay: Duration::from_secs(2),
        },
        37,
    );
    case.count = STORM;
    case.parallel = 2;
    case.output = Output::Json;
    // 4 requests in flight of 8 spans each, 2 s per answer: 16 spans a second.
    case.args = &[
        "--export-queue-size",
        "32",
        "--export-batch-size",
        "8",
        "--shutdown-timeout",
        "20s",
    ];
    // Once the attempts are made, the sink is only waited for at exit.
    case.wait = Duration::ZERO;
    let mut printed_after = None;
    let run = case.run_watching(
        |_| true,
        |agent| {
            let storm_done = Instant::now();
            // The reader goes on at its own pace: every span is printed while the export
            // crawls.
            let printed = wait_until(Duration::from_secs(10), || {
                let n = agent
                    .spans()
                    .iter()
                    .filter(|s| s["attributes"]["server.port"] == 37)
                    .count();
                (n as u64 == STORM).then_some(n)
            });
            assert!(printed.is_some(), "the JSON output stalled:\n{}", agent.stderr());
            printed_after = Some(storm_done.elapsed());
        },
    );
    let (books, sink) = (&run.books, &run.sink);
    eprintln!(
        "slow collector: {STORM} attempts printed {:?} after the storm; books {books:?}; sink {} spans in {} requests",
        printed_after.unwrap(),
        sink.spans,
        sink.requests
    );
    assert!(
        books["export_queue_full"] > 0,
        "the queue never filled: {books:?}"
    );
    assert_eq!(
        books["ringbuf_full"] + books["enrich_queue_full"],
        0,
        "the reader fell behind: {books:?}"
    );
    assert_eq!(books["export_failed"] + books["unflushed"], 0, "{books:?}");
    // Every span that left the queue was received exactly once.
    assert_eq!(books["exported"], sink.spans, "{books:?} {sink:?}");
    assert_eq!(sink.received_spans, sink.spans, "{sink:?}");
    assert!(
        books["exported"] < STORM / 2,
        "the export was not slowed: {books:?}"
    );
}

#[test]
fn silent_collector_times_out_each_try_then_retries() {
    let mut case = Case::new(Answer::Silent { requests: 1 }, 43);
    case.env = &[("OTEL_EXPORTER_OTLP_TIMEOUT", "1000")];
    let run = case.run(|s| s.spans >= ATTEMPTS);
    let (books, sink) = (&run.books, &run.sink);
    eprintln!("silent collector: tries at {:?} ms", sink.arrivals_ms);
    assert_eq!(books["exported"], ATTEMPTS, "{books:?}\n{}", run.stopped.stderr);
    assert_eq!(books["export_failed"], 0, "{books:?}");
    assert_eq!(sink.unanswered, 1, "{sink:?}");
    // The unanswered try ended at the 1 s timeout, and the next came one backoff step later.
    let retried = last_arrival(sink);
    assert!(
        (1000..1800).contains(&retried),
        "retried {retried} ms after the first try: {sink:?}"
    );
}

#[test]
fn rejected_spans_of_a_partial_success_are_counted() {
    let run = Case::new(Answer::Partial { rejected: 3 }, 79).run(|s| s.spans >= ATTEMPTS);
    let (books, sink) = (&run.books, &run.sink);
    assert!(sink.rejected_spans >= 3, "{sink:?}");
    assert_eq!(sink.refused, 0, "{sink:?}");
    assert_eq!(books["export_failed"], sink.rejected_spans, "{books:?} {sink:?}");
    assert_eq!(books["exported"], ATTEMPTS - sink.rejected_spans, "{books:?}");
}
