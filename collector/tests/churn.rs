//! The churn soak: 20,000 short-lived processes, each making one or two connect attempts
//! (refused and established, a third of them with `OTEL_SERVICE_NAME`, a fifth in cgroups of
//! their own), against one agent exporting to the test bed's OTLP sink. Every attempt is
//! exported under its own pid, or counted; the agent's RSS, sampled every second, stays under 64 MiB; its
//! caches stay within their bounds; its CPU per attempt is printed. Needs root.

use std::{
    collections::HashMap,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use synspan_testbed::{
    agent::{Agent, Output},
    cgroup::Cgroup,
    churn::ChurnReport,
    netns::Netns,
    otlp_sink::OtlpSink,
    wait_until, workspace_bin,
};

const PROCESSES: u32 = 20_000;
/// Clients running at once, and started a second: 40 s of churn, on a quiet host or a busy one.
const PARALLEL: &str = "16";
const RATE: &str = "500";
const REFUSED_PORT: &str = "23471";
const LISTEN_PORT: &str = "23472";
const RSS_LIMIT_MIB: f64 = 64.0;

/// A `/proc/<pid>/status` field in KiB, as MiB.
fn status_mib(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// User + system CPU seconds of `pid` so far, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name, in parentheses, may hold spaces: fields count from after it.
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: plain libc call without pointers.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks as f64 / per_second
}

/// Samples the agent's RSS every second until stopped; the peak, in MiB.
struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(f64, usize)>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut peak, mut samples) = (0.0f64, 0);
            // Bounded: the test stops it, or the agent goes away.
            while !stopped.load(Relaxed) {
                let Some(rss) = status_mib(pid, "VmRSS:") else {
                    break;
                };
                peak = peak.max(rss);
                samples += 1;
                std::thread::sleep(Duration::from_secs(1));
            }
            (peak, samples)
        });
        Self { stop, thread }
    }

    fn stop(self) -> (f64, usize) {
        self.stop.store(true, Relaxed);
        self.thread.join().unwrap()
    }
}

/// `name=len/cap` pairs of the agent's `caches at exit:` log line.
fn caches_at_exit(stderr: &str) -> Vec<(String, u64, u64)> {
    let line = stderr
        .lines()
        .find_map(|l| l.split_once("caches at exit: ").map(|(_, c)| c))
        .unwrap_or_else(|| panic!("no cache report:\n{stderr}"));
    line.split_whitespace()
        .map(|pair| {
            let (name, use_) = pair.split_once('=').unwrap();
            let (len, cap) = use_.split_once('/').unwrap();
            (name.to_string(), len.parse().unwrap(), cap.parse().unwrap())
        })
        .collect()
}

#[test]
fn twenty_thousand_short_lived_processes_are_all_exported_within_64_mib() {
    let ns = Netns::new("churn").unwrap();
    let cgroups: Vec<Cgroup> = (0..4).map(|_| Cgroup::new("churn").unwrap()).collect();
    let sink = OtlpSink::start().unwrap();
    let agent = Agent::start_with(
        Output::None,
        &[
            "--otlp-endpoint",
            sink.endpoint(),
            "--dest-port",
            &format!("{REFUSED_PORT},{LISTEN_PORT}"),
            "--metrics-interval",
            "0",
        ],
    )
    .unwrap();
    let pid = agent.pid();
    let sampler = RssSampler::start(pid);
    let cpu_before = cpu_seconds(pid);
    let started = Instant::now();

    let processes = PROCESSES.to_string();
    let mut churn = Command::new(workspace_bin("synspan-churn"));
    churn.args([
        "--netns",
        ns.name(),
        "--processes",
        &processes,
        "--parallel",
        PARALLEL,
        "--rate",
        RATE,
        "--refused-port",
        REFUSED_PORT,
        "--listen-port",
        LISTEN_PORT,
        "--service-every",
        "3",
        "--cgroup-every",
        "5",
    ]);
    for cgroup in &cgroups {
        churn.arg("--cgroup").arg(cgroup.path());
    }
    let out = churn.stdin(Stdio::null()).output().unwrap();
    assert!(
        out.status.success(),
        "synspan-churn: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: ChurnReport = serde_json::from_slice(&out.stdout).unwrap();
    let churned = started.elapsed();
    assert_eq!(report.processes, u64::from(PROCESSES), "{}", report.failed);
    assert_eq!(report.failed, 0, "clients whose attempts ended unexpectedly");

    // Until every attempt arrived, or the sink got nothing more for 3 s: on a loaded host the
    // export may have shed some, which the books then count.
    let mut last = (0, Instant::now());
    wait_until(Duration::from_secs(60), || {
        let spans = sink.counts().map(|c| c.spans).unwrap_or(0);
        if spans != last.0 {
            last = (spans, Instant::now());
        }
        (spans >= report.attempts || last.1.elapsed() > Duration::from_secs(3)).then_some(())
    });
    let cpu = cpu_seconds(pid) - cpu_before;
    let (peak_rss, samples) = sampler.stop();
    let high_water = status_mib(pid, "VmHWM:").unwrap_or_default();
    let stopped = agent.stop(Duration::from_secs(30)).unwrap();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    let books = stopped.exact_books();
    let sink = sink.counts().unwrap();

    let with_service = report.clients.iter().filter(|c| c.service.is_some()).count();
    let named = report
        .clients
        .iter()
        .filter(|c| c.service.is_some() && sink.service_of_pid.get(&i64::from(c.pid)) == c.service.as_ref())
        .count();
    let in_cgroups = report.clients.iter().filter(|c| c.cgroup.is_some()).count();
    eprintln!(
        "churn: {} processes, {} attempts in {:.1} s ({:.1} s with the export); agent CPU {:.2} s = \
         {:.1} µs per attempt; RSS peak {peak_rss:.1} MiB over {samples} samples (VmHWM {high_water:.1} \
         MiB); service name on {named} of {with_service} clients that set one; {in_cgroups} clients in \
         cgroups of their own; books {books:?}; {}",
        report.processes,
        report.attempts,
        report.seconds,
        churned.as_secs_f64(),
        cpu,
        cpu / report.attempts as f64 * 1e6,
        stopped
            .stderr
            .lines()
            .find(|l| l.contains("caches at exit"))
            .unwrap_or_default(),
    );

    // Every attempt of every process, exported under its own pid or counted: nothing lost
    // quietly, nothing counted twice. Only the export may shed (a sink slowed by the host's
    // load); the kernel side and the reader never.
    let shed = books["dropped"] - books["filtered"];
    assert_eq!(sink.spans, books["exported"], "{books:?}");
    assert_eq!(books["exported"] + shed, report.attempts, "{books:?}");
    assert_eq!(shed, books["export_queue_full"] + books["unflushed"], "{books:?}");
    let by_pid: HashMap<u32, u32> = report.clients.iter().map(|c| (c.pid, c.attempts)).collect();
    let missing: u64 = by_pid
        .iter()
        .map(|(&pid, &made)| u64::from(made).saturating_sub(sink.of_pid(pid)))
        .sum();
    assert_eq!(
        missing, shed,
        "spans missing at the sink against attempts shed: {books:?}"
    );
    let wrong: Vec<(u32, u32, u64)> = by_pid
        .iter()
        .map(|(&pid, &made)| (pid, made, sink.of_pid(pid)))
        .filter(|&(_, made, got)| got > u64::from(made))
        .take(10)
        .collect();
    assert!(
        wrong.is_empty(),
        "more spans than attempts (pid, attempts made, spans received): {wrong:?}"
    );

    // A client that exits within a millisecond of its attempt may be gone before the agent
    // reads its environment (see README): then its spans carry the executable's name. Never
    // another process's name.
    assert!(named > 0, "no span carried its process's OTEL_SERVICE_NAME");
    let misnamed: Vec<_> = report
        .clients
        .iter()
        .filter_map(|c| {
            let got = sink.service_of_pid.get(&i64::from(c.pid))?;
            (Some(got) != c.service.as_ref() && got != "synspan-churn").then_some((c.pid, got))
        })
        .take(10)
        .collect();
    assert!(misnamed.is_empty(), "spans under another service: {misnamed:?}");

    assert!(samples >= 5, "{samples} RSS samples");
    assert!(peak_rss < RSS_LIMIT_MIB, "RSS peaked at {peak_rss:.1} MiB");
    assert!(high_water < RSS_LIMIT_MIB, "VmHWM {high_water:.1} MiB");
    let caches = caches_at_exit(&stopped.stderr);
    assert!(
        caches.iter().any(|(name, _, _)| name == "processes"),
        "{caches:?}"
    );
    for (name, len, cap) in &caches {
        assert!(len <= cap, "cache {name} holds {len} of {cap}");
    }
    // More processes than the process cache holds went through it.
    let processes = caches.iter().find(|(name, _, _)| name == "processes").unwrap();
    assert!(u64::from(PROCESSES) > processes.2, "{caches:?}");
}
