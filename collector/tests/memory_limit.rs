//! synspan under a memory limit: in a cgroup with 96 MiB, tracing a refused storm with every
//! failure exported to a collector that answers each request only after 2 s. Nothing is
//! OOM-killed, what cannot be exported is dropped and counted under its reason, and the books
//! are exact at exit. Needs root.

use std::time::Duration;

use synspan_testbed::{
    agent::{Agent, Output},
    bench::StormReport,
    cgroup::MemoryCgroup,
    netns::Netns,
    otlp_sink::{Answer, OtlpSink},
    workspace_bin,
};

const LIMIT_BYTES: u64 = 96 * 1024 * 1024;
const PORT: &str = "23481";
const STORM_SECONDS: &str = "8";

#[test]
fn refused_storm_to_a_slow_collector_within_96_mib() {
    let cgroup = MemoryCgroup::new("memlimit", LIMIT_BYTES).unwrap();
    let sink = OtlpSink::start_answering(Answer::Slow {
        delay: Duration::from_secs(2),
    })
    .unwrap();
    let agent = Agent::start_in_cgroup(
        &cgroup.procs(),
        Output::None,
        &[
            "--otlp-endpoint",
            sink.endpoint(),
            "--dest-port",
            PORT,
            "--metrics-interval",
            "0",
            "--shutdown-timeout",
            "5s",
        ],
    )
    .unwrap();
    let in_cgroup = std::fs::read_to_string(cgroup.procs()).unwrap();
    assert!(
        in_cgroup.lines().any(|p| p.trim() == agent.pid().to_string()),
        "synspan ({}) is not in {}: {in_cgroup}",
        agent.pid(),
        cgroup.path().display()
    );

    let ns = Netns::new("memlimit").unwrap();
    let out = ns
        .command(&workspace_bin("synspan-storm"))
        .args([
            "refused",
            "--port",
            PORT,
            "--seconds",
            STORM_SECONDS,
            "--threads",
            "2",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "synspan-storm: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let storm: StormReport = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(storm.failed, 0, "{storm:?}");

    let stopped = agent.stop(Duration::from_secs(30)).unwrap();
    let oom_kills = cgroup.oom_kills().unwrap();
    let peak_mib = cgroup.peak_bytes().unwrap() as f64 / (1024.0 * 1024.0);
    assert_eq!(oom_kills, 0, "OOM kills in the cgroup\n{}", stopped.stderr);
    assert!(
        stopped.status.success(),
        "{:?}\n{}",
        stopped.status,
        stopped.stderr
    );
    let books = stopped.exact_books();
    let sink = sink.counts().unwrap();
    eprintln!(
        "memory limit: {} refused attempts in {:.1} s ({:.0}/s); cgroup peak {peak_mib:.1} MiB of 96, \
         agent ru_maxrss {:.1} MiB; sink accepted {} spans in {} requests; books {books:?}",
        storm.attempts, storm.seconds, storm.per_second, stopped.usage.max_rss_mib, sink.spans, sink.requests,
    );
    // Each attempt of the storm, and nothing else that passed the port filter, is exported or
    // dropped under a reason.
    assert_eq!(books["seen"] - books["filtered"], storm.attempts, "{books:?}");
    assert_eq!(books["in_flight"], 0, "{books:?}");
    assert_eq!(
        books["exported"] + books["dropped"] - books["filtered"],
        storm.attempts,
        "{books:?}"
    );
    // The slow collector is what sheds them: the export queue fills, and what is still
    // queued at the shutdown timeout is unflushed.
    assert!(books["export_queue_full"] > 0, "{books:?}");
    assert!(books["exported"] > 0, "{books:?}");
    assert_eq!(books["export_failed"], 0, "{books:?}");
    // A request still unanswered at the shutdown timeout is counted unflushed, though the sink
    // may count it once its answer is due.
    assert!(
        sink.spans >= books["exported"] && sink.spans <= books["exported"] + books["unflushed"],
        "sink {} spans; {books:?}",
        sink.spans
    );
}
