//! synspan's overhead benchmark: connects per second with and without synspan, what synspan
//! costs (CPU, peak RSS), and whether every attempt is accounted for.
//!
//! ```text
//! synspan-bench [--pairs N] [--seconds S] [--count N] [--threads T] [--modes 1,2,3,4]
//!               [--retries N] [--bpf-stats] [--synspan-args ARGS] [--out FILE | --no-write]
//! ```
//! --pairs     A/B pairs per mode (default 3)
//! --seconds   length of each storm (default 5)
//! --count     at most this many attempts per storm (default 5000000)
//! --threads   connect threads of the storm (default 2)
//! --modes     which modes to run (default all four, see `MODES`)
//! --retries   how many times a disturbed pair is run again (default 2)
//! --bpf-stats also measure the run time of synspan's kernel programs (BPF_ENABLE_STATS,
//!             for as long as the benchmark runs; it costs a few tens of ns per program run)
//! --synspan-args
//!             more flags for synspan in every B run, split at spaces
//!             (e.g. "--export-queue-size 65536")
//! --out       the report (default BENCHMARKS.md at the repository root); --no-write: none
//!
//! Everything happens inside one network namespace that the benchmark creates and removes:
//! this process enters it (setns, so that the children keep the host's mounts, tracefs
//! included), then starts the OTLP receiver (`synspan-otlp-sink`) and, run after run, the load generator
//! `synspan-storm` and synspan. Only 127.0.0.1 of that namespace ever sees a packet.
//!
//! Each pair is an A run (no tracer) followed by a B run (synspan started, ready, then the
//! same storm). After a B run the benchmark waits until the receiver stops receiving,
//! reads synspan's CPU time and peak RSS from /proc, sends SIGTERM, waits for exit status
//! 0, and reads the final accounting line.
//!
//! The host is shared: a pair during which another synspan ran (its programs slow every
//! connect down) or other processes used more than a tenth of a CPU is run again, up to
//! `--retries` times; the discarded pairs are listed in the report.

use std::{
    collections::HashMap,
    fmt::Write as _,
    fs,
    io::{BufRead, BufReader, Read},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, bail};
use serde_json::Value;
use synspan_testbed::{
    bench::{self, StormReport},
    netns::Netns,
    otlp_sink::{OtlpSink, SinkCounts},
    repo_root, wait_until, workspace_bin,
};

struct Mode {
    id: usize,
    name: &'static str,
    storm: &'static str,
    /// synspan's flags besides the endpoint and `--output none`.
    flags: &'static [&'static str],
    /// The lowest acceptable ratio of synspan's median to the baseline's, if the issue sets one.
    target: Option<f64>,
}

impl Mode {
    fn failures_only(&self) -> bool {
        self.flags.contains(&"--failures-only")
    }
}

const MODES: [Mode; 4] = [
    Mode {
        id: 1,
        name: "success storm, every attempt over OTLP",
        storm: bench::SUCCESS,
        flags: &[],
        target: Some(0.85),
    },
    Mode {
        id: 2,
        name: "success storm, --failures-only (production policy)",
        storm: bench::SUCCESS,
        flags: &["--failures-only"],
        target: Some(0.95),
    },
    Mode {
        id: 3,
        name: "refused storm, every failure over OTLP",
        storm: bench::REFUSED,
        flags: &[],
        target: Some(0.75),
    },
    Mode {
        id: 4,
        name: "success storm, every attempt over OTLP, --no-stacks",
        storm: bench::SUCCESS,
        flags: &["--no-stacks"],
        target: None,
    },
];

const RSS_TARGET_MIB: f64 = 64.0;
/// synspan gets this long to flush at SIGTERM; the benchmark waits for the export to go
/// quiet first, so this only matters when the receiver falls far behind.
const SHUTDOWN_TIMEOUT_S: u64 = 120;
/// The receiver is drained when its output has not grown for this long.
const QUIET: Duration = Duration::from_millis(1500);
const DRAIN_LIMIT: Duration = Duration::from_secs(180);
/// A run is disturbed when other processes used more than this share of one CPU.
const OTHERS_MAX_CPU: f64 = 0.1;
/// Before a pair, wait at most this long for the host to be quiet.
const CALM_LIMIT: Duration = Duration::from_secs(60);

struct Args {
    pairs: u32,
    seconds: f64,
    count: u64,
    threads: u32,
    modes: Vec<usize>,
    retries: u32,
    bpf_stats: bool,
    synspan_args: Vec<String>,
    out: Option<PathBuf>,
    raw: Vec<String>,
}

const USAGE: &str = "usage: synspan-bench [--pairs N] [--seconds S] [--count N] [--threads T] \
                     [--modes 1,2,3,4] [--retries N] [--bpf-stats] [--synspan-args ARGS] \
                     [--out FILE | --no-write]";

const HELP: &str = "\
A/B benchmark of synspan on a loopback connect storm, inside a network namespace it creates.
Prints a table and writes BENCHMARKS.md. Needs root.

  --pairs N          A/B pairs per mode (default 3)
  --seconds S        length of each storm (default 5)
  --count N          at most this many attempts per storm (default 5000000)
  --threads T        connect threads of the storm (default 2)
  --modes LIST       modes to run, of 1 (success, OTLP), 2 (success, --failures-only),
                     3 (refused, OTLP), 4 (success, OTLP, --no-stacks); default 1,2,3,4
  --retries N        reruns of a pair disturbed by other load (default 2)
  --bpf-stats        also measure the run time of synspan's kernel programs
  --synspan-args ARGS
                     more flags for every synspan run, split at spaces
  --out FILE         where to write the report (default BENCHMARKS.md at the repository root)
  --no-write         write no report";

fn parse_args() -> anyhow::Result<Args> {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let mut args = raw.iter();
    let mut parsed = Args {
        pairs: 3,
        seconds: 5.0,
        count: 5_000_000,
        threads: 2,
        modes: vec![1, 2, 3, 4],
        retries: 2,
        bpf_stats: false,
        synspan_args: Vec::new(),
        out: Some(repo_root().join("BENCHMARKS.md")),
        raw: raw.clone(),
    };
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .cloned()
                .with_context(|| format!("{name} needs a value; {USAGE}"))
        };
        match arg.as_str() {
            "--pairs" => parsed.pairs = value("--pairs")?.parse().context("--pairs N")?,
            "--seconds" => parsed.seconds = value("--seconds")?.parse().context("--seconds S")?,
            "--count" => parsed.count = value("--count")?.parse().context("--count N")?,
            "--threads" => parsed.threads = value("--threads")?.parse().context("--threads T")?,
            "--retries" => parsed.retries = value("--retries")?.parse().context("--retries N")?,
            "--modes" => {
                parsed.modes = value("--modes")?
                    .split(',')
                    .map(|m| m.trim().parse::<usize>().context("--modes: numbers from 1 to 4"))
                    .collect::<anyhow::Result<_>>()?
            }
            "--bpf-stats" => parsed.bpf_stats = true,
            "--synspan-args" => {
                parsed.synspan_args = value("--synspan-args")?
                    .split_whitespace()
                    .map(str::to_string)
                    .collect()
            }
            "--out" => parsed.out = Some(PathBuf::from(value("--out")?)),
            "--no-write" => parsed.out = None,
            "-h" | "--help" => {
                println!("{USAGE}\n\n{HELP}");
                std::process::exit(0);
            }
            other => bail!("unexpected argument {other}; {USAGE}"),
        }
    }
    if parsed.pairs == 0 || parsed.pairs > 100 {
        bail!("--pairs must be 1..=100");
    }
    if !(parsed.seconds > 0.0 && parsed.seconds <= 600.0) {
        bail!("--seconds must be more than 0 and at most 600");
    }
    if parsed.count == 0 || parsed.threads == 0 || parsed.threads > 256 || parsed.retries > 10 {
        bail!("--count must be positive, --threads 1..=256, --retries 0..=10");
    }
    if parsed.modes.is_empty() || parsed.modes.iter().any(|m| !(1..=4).contains(m)) {
        bail!("--modes takes numbers from 1 to 4");
    }
    Ok(parsed)
}

// ---------------------------------------------------------------------------------------
// Signals: Ctrl-C stops the benchmark between steps, and everything is still cleaned up.

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

fn check_interrupted() -> anyhow::Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The namespace: this thread enters it, and leaves it before the namespace is removed.

/// While it lives, this thread (and every child it starts) is inside the namespace.
struct Inside {
    home: OwnedFd,
}

impl Inside {
    fn enter(ns: &Netns) -> anyhow::Result<Self> {
        let home: OwnedFd = fs::File::open("/proc/thread-self/ns/net")
            .context("opening this thread's network namespace")?
            .into();
        let target = fs::File::open(Path::new("/run/netns").join(ns.name()))
            .with_context(|| format!("opening /run/netns/{}", ns.name()))?;
        // SAFETY: plain syscall on fds we own.
        if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("entering {}: {}", ns.name(), std::io::Error::last_os_error());
        }
        Ok(Self { home })
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        // SAFETY: plain syscall; back to where this thread started. Netns::drop kills every
        // process inside the namespace, which must not include this one.
        if unsafe { libc::setns(self.home.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            eprintln!(
                "synspan-bench: could not leave the namespace: {}; exiting",
                std::io::Error::last_os_error()
            );
            std::process::exit(1);
        }
    }
}

// ---------------------------------------------------------------------------------------
// /proc

fn clock_ticks() -> f64 {
    // SAFETY: plain libc call.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// The fields of /proc/PID/stat after the command, from `state` (field 3) on.
fn stat_fields(pid: i32) -> Option<Vec<u64>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    // The state is a letter: keep the positions, with 0 in its place.
    Some(
        rest.split_whitespace()
            .map(|f| f.parse::<i64>().map_or(0, |v| v.max(0) as u64))
            .collect(),
    )
}

// Indexes into `stat_fields`: field number - 3.
const PPID: usize = 1;
const UTIME: usize = 11;
const STIME: usize = 12;
const CUTIME: usize = 13;
const CSTIME: usize = 14;
const STARTTIME: usize = 19;

/// utime + stime of a whole process, in seconds.
fn cpu_seconds(pid: i32) -> Option<f64> {
    let f = stat_fields(pid)?;
    Some((f.get(UTIME)? + f.get(STIME)?) as f64 / clock_ticks())
}

/// A `kB` line of /proc/PID/status, in MiB.
fn status_mib(pid: i32, key: &str) -> Option<f64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn comm(pid: i32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn all_pids() -> Vec<i32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// synspan processes this benchmark did not start: their programs see our storms too.
fn foreign_tracers() -> usize {
    let me = std::process::id() as u64;
    all_pids()
        .into_iter()
        .filter(|&pid| comm(pid) == "synspan")
        .filter(|&pid| stat_fields(pid).and_then(|f| f.get(PPID).copied()) != Some(me))
        .count()
}

/// What every other process of the host did, to tell a quiet run from a disturbed one.
struct HostSnapshot {
    /// pid → (start time, utime + stime + cutime + cstime): a child that exits and is
    /// reaped adds its time to its parent's cutime/cstime.
    procs: HashMap<i32, (u64, u64)>,
    steal: u64,
    foreign: usize,
}

impl HostSnapshot {
    fn take() -> Self {
        let me = std::process::id() as u64;
        let mut procs = HashMap::new();
        for pid in all_pids() {
            let Some(f) = stat_fields(pid) else { continue };
            let ppid = f.get(PPID).copied().unwrap_or(0);
            // Ourselves and our children (storm, synspan, receiver), and kernel threads,
            // which mostly work for our storm (ksoftirqd, kworkers).
            if pid as u64 == me || ppid == me || pid == 2 || ppid == 2 {
                continue;
            }
            let ticks = [UTIME, STIME, CUTIME, CSTIME]
                .iter()
                .map(|&i| f.get(i).copied().unwrap_or(0))
                .sum();
            procs.insert(pid, (f.get(STARTTIME).copied().unwrap_or(0), ticks));
        }
        let steal = fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| {
                let cpu = s.lines().find(|l| l.starts_with("cpu "))?;
                cpu.split_whitespace().nth(8)?.parse().ok()
            })
            .unwrap_or(0);
        Self {
            procs,
            steal,
            foreign: foreign_tracers(),
        }
    }

    /// CPU seconds other processes used since `earlier`, and CPU seconds stolen by the
    /// hypervisor.
    fn since(&self, earlier: &HostSnapshot) -> (f64, f64) {
        let ticks: u64 = self
            .procs
            .iter()
            .map(|(pid, &(start, now))| match earlier.procs.get(pid) {
                Some(&(s, before)) if s == start => now.saturating_sub(before),
                _ => now,
            })
            .sum();
        let steal = self.steal.saturating_sub(earlier.steal);
        (ticks as f64 / clock_ticks(), steal as f64 / clock_ticks())
    }
}

/// What the rest of the host did during one run.
#[derive(Clone, Copy, Debug, Default)]
struct Disturbance {
    /// Most synspan processes of others seen at the start or the end.
    foreign: usize,
    others_cpu_s: f64,
    steal_s: f64,
}

impl Disturbance {
    fn between(start: &HostSnapshot, end: &HostSnapshot) -> Self {
        let (others_cpu_s, steal_s) = end.since(start);
        Self {
            foreign: start.foreign.max(end.foreign),
            others_cpu_s,
            steal_s,
        }
    }

    fn disturbed(&self, seconds: f64) -> bool {
        self.foreign > 0 || self.others_cpu_s > OTHERS_MAX_CPU * seconds
    }
}

/// Waits (bounded) until no foreign tracer runs and the other processes are near idle.
fn wait_calm() -> bool {
    let started = Instant::now();
    let mut said = false;
    while started.elapsed() < CALM_LIMIT && !interrupted() {
        let before = HostSnapshot::take();
        thread::sleep(Duration::from_secs(1));
        let d = Disturbance::between(&before, &HostSnapshot::take());
        if !d.disturbed(1.0) {
            return true;
        }
        if !said {
            eprintln!(
                "synspan-bench: waiting for the host to calm down ({} other synspan, {:.2} CPU used by others)",
                d.foreign, d.others_cpu_s
            );
            said = true;
        }
    }
    false
}

// ---------------------------------------------------------------------------------------
// synspan's kernel programs: run counts and time (with --bpf-stats), recursion misses.

/// While it lives, the kernel measures the run time of every BPF program (BPF_ENABLE_STATS);
/// closing the fd turns it off again, even if this process dies.
struct BpfStats {
    _fd: OwnedFd,
}

impl BpfStats {
    fn enable() -> anyhow::Result<Self> {
        const BPF_ENABLE_STATS: libc::c_long = 32;
        // union bpf_attr { struct { __u32 type; } enable_stats; ... }; BPF_STATS_RUN_TIME = 0.
        let attr = [0u64; 16];
        // SAFETY: the attribute buffer is valid and zeroed beyond the fields used.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_ENABLE_STATS,
                attr.as_ptr(),
                std::mem::size_of_val(&attr),
            )
        };
        if fd < 0 {
            bail!("BPF_ENABLE_STATS: {}", std::io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this fd to us.
        Ok(Self {
            _fd: unsafe { OwnedFd::from_raw_fd(fd as i32) },
        })
    }
}

#[derive(Clone, Debug, Default)]
struct ProgStat {
    name: String,
    run_time_ns: u64,
    run_cnt: u64,
    recursion_misses: u64,
}

/// The programs synspan holds, from its file descriptors, as bpftool shows them.
fn prog_stats(pid: i32) -> Vec<ProgStat> {
    let mut ids: Vec<u32> = fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| fs::read_to_string(e.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("prog_id:"))
                .and_then(|id| id.trim().parse().ok())
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids.into_iter()
        .filter_map(|id| {
            let out = Command::new("bpftool")
                .args(["--json", "prog", "show", "id", &id.to_string()])
                .stderr(Stdio::null())
                .output()
                .ok()?;
            let v: Value = serde_json::from_slice(&out.stdout).ok()?;
            let n = |k: &str| v[k].as_u64().unwrap_or(0);
            Some(ProgStat {
                name: v["name"].as_str().unwrap_or("?").to_string(),
                run_time_ns: n("run_time_ns"),
                run_cnt: n("run_cnt"),
                recursion_misses: n("recursion_misses"),
            })
        })
        .collect()
}

/// `after - before`, program by program (matched by name).
fn prog_delta(before: &[ProgStat], after: &[ProgStat]) -> Vec<ProgStat> {
    after
        .iter()
        .map(|a| {
            let b = before
                .iter()
                .find(|b| b.name == a.name)
                .cloned()
                .unwrap_or_default();
            ProgStat {
                name: a.name.clone(),
                run_time_ns: a.run_time_ns.saturating_sub(b.run_time_ns),
                run_cnt: a.run_cnt.saturating_sub(b.run_cnt),
                recursion_misses: a.recursion_misses.saturating_sub(b.recursion_misses),
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// What the receiver got.

#[derive(Clone, Copy, Debug, Default)]
struct Received {
    total: u64,
    storm: u64,
    synspan: u64,
}

/// Waits until the sink has received nothing new for `QUIET`; returns how long it kept
/// receiving.
fn wait_quiet(sink: &OtlpSink) -> Duration {
    let spans = || sink.counts().map(|c| c.spans).unwrap_or(0);
    let started = Instant::now();
    let mut last = spans();
    let mut since = Instant::now();
    while started.elapsed() < DRAIN_LIMIT && !interrupted() {
        thread::sleep(Duration::from_millis(100));
        let now = spans();
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= QUIET {
            break;
        }
    }
    since.duration_since(started)
}

/// Spans received between two readings, and how many came from the storm's and from
/// synspan's pid.
fn received(before: &SinkCounts, after: &SinkCounts, storm: u32, synspan: u32) -> Received {
    Received {
        total: after.spans - before.spans,
        storm: after.of_pid(storm) - before.of_pid(storm),
        synspan: after.of_pid(synspan) - before.of_pid(synspan),
    }
}

// ---------------------------------------------------------------------------------------
// Children reaped with wait4, for their rusage.

struct Exit {
    code: Option<i32>,
    signal: Option<i32>,
    cpu_s: f64,
    max_rss_mib: f64,
}

impl Exit {
    fn describe(&self) -> String {
        match (self.code, self.signal) {
            (Some(code), _) => format!("exit {code}"),
            (None, Some(sig)) => format!("signal {sig}"),
            _ => "?".into(),
        }
    }
}

/// A child whose pid we reap ourselves; killed (SIGKILL) and reaped on drop if still there.
struct Reaped {
    pid: i32,
    done: bool,
}

impl Reaped {
    fn new(child: std::process::Child) -> Self {
        let pid = child.id() as i32;
        // std's Child neither kills nor waits on drop: from here on the pid is ours to reap.
        drop(child);
        Self { pid, done: false }
    }

    fn try_wait(&mut self) -> Option<Exit> {
        if self.done {
            return None;
        }
        let mut status = 0;
        // SAFETY: zeroed rusage is valid; plain syscall on our own child.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::wait4(self.pid, &mut status, libc::WNOHANG, &mut usage) } != self.pid {
            return None;
        }
        self.done = true;
        let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        Some(Exit {
            code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
            signal: libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status)),
            cpu_s: seconds(usage.ru_utime) + seconds(usage.ru_stime),
            max_rss_mib: usage.ru_maxrss as f64 / 1024.0,
        })
    }

    fn wait(&mut self, limit: Duration) -> Option<Exit> {
        wait_until(limit, || self.try_wait())
    }

    fn signal(&self, sig: libc::c_int) {
        if !self.done {
            // SAFETY: plain syscall on our own, not yet reaped, child.
            unsafe { libc::kill(self.pid, sig) };
        }
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if !self.done {
            // SAFETY: plain syscalls on our own, not yet reaped, child.
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
                libc::waitpid(self.pid, std::ptr::null_mut(), 0);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// synspan, started by hand: `Agent::start` always passes `--output json`, and clap refuses
// a second `--output`.

struct Tracer {
    proc: Reaped,
    stderr: Arc<Mutex<String>>,
    reader: Option<JoinHandle<()>>,
}

impl Tracer {
    fn start(endpoint: &str, flags: &[&str], extra: &[String]) -> anyhow::Result<Self> {
        let timeout = format!("{SHUTDOWN_TIMEOUT_S}s");
        let mut child = Command::new(workspace_bin("synspan"))
            .args(["--otlp-endpoint", endpoint, "--output", "none"])
            .args(["--shutdown-timeout", &timeout])
            .args(flags)
            .args(extra)
            .env("SYNSPAN_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting synspan")?;
        let err = child.stderr.take().context("synspan's stderr")?;
        let stderr = Arc::new(Mutex::new(String::new()));
        let log = stderr.clone();
        let reader = thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut log = log.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let mut tracer = Self {
            proc: Reaped::new(child),
            stderr,
            reader: Some(reader),
        };
        let ready = wait_until(Duration::from_secs(30), || {
            if tracer.stderr().contains("synspan ready") {
                return Some(true);
            }
            tracer.proc.try_wait().map(|_| false)
        });
        if ready != Some(true) {
            bail!("synspan did not become ready; stderr:\n{}", tracer.stderr());
        }
        Ok(tracer)
    }

    fn pid(&self) -> i32 {
        self.proc.pid
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// SIGTERM, then waits for the exit and the end of stderr.
    fn stop(mut self) -> anyhow::Result<(Exit, String)> {
        self.proc.signal(libc::SIGTERM);
        let limit = Duration::from_secs(SHUTDOWN_TIMEOUT_S + 30);
        let Some(exit) = self.proc.wait(limit) else {
            bail!(
                "synspan did not exit within {limit:?} of SIGTERM; stderr:\n{}",
                self.stderr()
            );
        };
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        Ok((exit, self.stderr()))
    }
}

/// The `key=value` counters of synspan's last `final:` line, and the line.
fn final_accounting(stderr: &str) -> Option<(HashMap<String, u64>, String)> {
    let line = stderr.lines().rfind(|l| l.contains("final: attempts"))?;
    let counters = line
        .split([' ', '(', ')'])
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect();
    let text = line.find("final:").map_or(line, |i| &line[i..]).to_string();
    Some((counters, text))
}

// ---------------------------------------------------------------------------------------
// One storm.

struct Storm {
    pid: u32,
    report: StormReport,
    cpu_s: f64,
}

fn storm(args: &Args, mode: &str) -> anyhow::Result<Storm> {
    let mut child = Command::new(workspace_bin("synspan-storm"))
        .arg(mode)
        .args(["--seconds", &args.seconds.to_string()])
        .args(["--count", &args.count.to_string()])
        .args(["--threads", &args.threads.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting synspan-storm")?;
    let (mut stdout, mut stderr) = (
        child.stdout.take().context("storm stdout")?,
        child.stderr.take().context("storm stderr")?,
    );
    let pid = child.id();
    let mut proc = Reaped::new(child);
    // The storm bounds itself; this is the watchdog in case it does not. Its output is one
    // short line, well within a pipe's buffer, so it cannot block on a full pipe.
    let limit = Duration::from_secs_f64(args.seconds + 60.0);
    let Some(exit) = proc.wait(limit) else {
        bail!("synspan-storm ran past {limit:?} and was killed");
    };
    let (mut out, mut err) = (String::new(), String::new());
    stdout.read_to_string(&mut out)?;
    stderr.read_to_string(&mut err)?;
    if exit.code != Some(0) {
        bail!("synspan-storm failed ({}): {}", exit.describe(), err.trim());
    }
    let report: StormReport =
        serde_json::from_str(out.trim()).with_context(|| format!("storm report {out:?}"))?;
    Ok(Storm {
        pid,
        report,
        cpu_s: exit.cpu_s,
    })
}

// ---------------------------------------------------------------------------------------
// Runs.

#[derive(Clone, Debug, Default)]
struct TracerRun {
    /// synspan's CPU while the storm ran.
    cpu_storm_s: f64,
    /// synspan's CPU from start to just before SIGTERM (after the export drained).
    cpu_s: f64,
    /// From wait4: everything, shutdown included.
    cpu_total_s: f64,
    /// VmHWM just before SIGTERM.
    hwm_mib: f64,
    /// ru_maxrss from wait4.
    max_rss_mib: f64,
    /// From the end of the storm until the receiver went quiet.
    drain_s: f64,
    receiver_cpu_s: f64,
    accounting: HashMap<String, u64>,
    final_line: String,
    received: Received,
    /// synspan's programs from just before the storm to just before SIGTERM.
    progs: Vec<ProgStat>,
    exit: String,
    exit_ok: bool,
}

impl TracerRun {
    fn get(&self, key: &str) -> u64 {
        self.accounting.get(key).copied().unwrap_or(0)
    }

    /// Attempts synspan saw (`seen`, or `started` in older versions).
    fn seen(&self) -> u64 {
        self.accounting
            .get("seen")
            .or_else(|| self.accounting.get("started"))
            .copied()
            .unwrap_or(0)
    }

    fn settled(&self) -> u64 {
        self.get("exported") + self.get("dropped")
    }

    fn peak_rss_mib(&self) -> f64 {
        self.hwm_mib.max(self.max_rss_mib)
    }

    fn recursion_misses(&self) -> u64 {
        self.progs.iter().map(|p| p.recursion_misses).sum()
    }

    fn kernel_ns(&self) -> u64 {
        self.progs.iter().map(|p| p.run_time_ns).sum()
    }
}

#[derive(Clone, Debug)]
struct Run {
    mode: usize,
    pair: u32,
    storm: StormReport,
    storm_cpu_s: f64,
    host: Disturbance,
    tracer: Option<TracerRun>,
}

impl Run {
    fn storm_cpu_us(&self) -> f64 {
        self.storm_cpu_s * 1e6 / self.storm.attempts.max(1) as f64
    }
}

struct Bench<'a> {
    args: &'a Args,
    sink: &'a OtlpSink,
}

impl Bench<'_> {
    fn baseline(&self, mode: &Mode, pair: u32) -> anyhow::Result<Run> {
        let host = HostSnapshot::take();
        let storm = storm(self.args, mode.storm)?;
        Ok(Run {
            mode: mode.id,
            pair,
            storm: storm.report,
            storm_cpu_s: storm.cpu_s,
            host: Disturbance::between(&host, &HostSnapshot::take()),
            tracer: None,
        })
    }

    fn traced(&self, mode: &Mode, pair: u32) -> anyhow::Result<Run> {
        let before = self.sink.counts()?;
        let receiver_cpu = || cpu_seconds(self.sink.pid() as i32).unwrap_or(0.0);
        let rx_before = receiver_cpu();
        let tracer = Tracer::start(self.sink.endpoint(), mode.flags, &self.args.synspan_args)?;
        let pid = tracer.pid();
        let progs_before = prog_stats(pid);
        let cpu_start = cpu_seconds(pid).unwrap_or(0.0);
        let host = HostSnapshot::take();
        let storm = storm(self.args, mode.storm)?;
        let host = Disturbance::between(&host, &HostSnapshot::take());
        let cpu_storm_s = cpu_seconds(pid).unwrap_or(0.0) - cpu_start;
        let drain_s = wait_quiet(self.sink).as_secs_f64();
        let cpu_s = cpu_seconds(pid).unwrap_or(f64::NAN);
        let hwm_mib = status_mib(pid, "VmHWM:").unwrap_or(f64::NAN);
        let progs = prog_delta(&progs_before, &prog_stats(pid));
        let (exit, stderr) = tracer.stop()?;
        // Whatever synspan flushed at exit arrives a moment later.
        wait_quiet(self.sink);
        let received = received(&before, &self.sink.counts()?, storm.pid, pid as u32);
        let Some((accounting, final_line)) = final_accounting(&stderr) else {
            bail!("synspan printed no final accounting; stderr:\n{stderr}");
        };
        let exit_ok = exit.code == Some(0);
        if !exit_ok {
            eprintln!(
                "synspan-bench: synspan ended with {}; stderr:\n{stderr}",
                exit.describe()
            );
        }
        for line in stderr
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains("ERROR"))
        {
            eprintln!("synspan-bench: synspan said: {line}");
        }
        let run = TracerRun {
            cpu_storm_s,
            cpu_s,
            cpu_total_s: exit.cpu_s,
            hwm_mib,
            max_rss_mib: exit.max_rss_mib,
            drain_s,
            receiver_cpu_s: receiver_cpu() - rx_before,
            accounting,
            final_line,
            received,
            progs,
            exit: exit.describe(),
            exit_ok,
        };
        Ok(Run {
            mode: mode.id,
            pair,
            storm: storm.report,
            storm_cpu_s: storm.cpu_s,
            host,
            tracer: Some(run),
        })
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The accounting checks of one traced run.
struct Exactness {
    /// synspan's own books: seen = exported + dropped, nothing pending or in flight.
    books: bool,
    /// The receiver got exactly what synspan counted as exported.
    receiver: bool,
    /// Every storm attempt was seen, and is exported or among the counted drops (with
    /// --failures-only: filtered in the kernel, none exported).
    storm: bool,
    /// made = exported + counted drops, as the issue puts it; off by the host's other
    /// attempts.
    made_equals_settled: bool,
    notes: Vec<String>,
}

impl Exactness {
    fn exact(&self) -> bool {
        self.books && self.receiver && self.storm
    }
}

fn exactness(mode: &Mode, run: &Run) -> Option<Exactness> {
    let t = run.tracer.as_ref()?;
    let made = run.storm.attempts;
    let seen = t.seen();
    let books = seen == t.settled() && t.get("pending") == 0 && t.get("in_flight") == 0;
    let receiver = t.received.total == t.get("exported");
    let storm = seen >= made
        && if mode.failures_only() {
            // Every storm attempt is a fast, unretried success: filtered, none exported.
            t.received.storm == 0 && t.get("filtered") >= made
        } else {
            // Attempts of the storm that did not arrive must be among the counted drops.
            t.received.storm <= made && made - t.received.storm <= t.get("dropped")
        };
    let mut notes = Vec::new();
    if seen != made {
        let others = t.received.total - t.received.storm - t.received.synspan;
        notes.push(format!(
            "synspan saw {:+} attempt(s) besides the storm's: {} exported from synspan's own pid (its \
             OTLP connection), {} exported from other processes of the host, the rest filtered or dropped",
            seen as i64 - made as i64,
            t.received.synspan,
            others
        ));
    }
    for key in [
        "ringbuf_full",
        "evicted",
        "replaced",
        "track_failed",
        "undecodable",
        "export_queue_full",
        "export_failed",
        "unflushed",
        "untracked_finish",
    ] {
        if t.get(key) > 0 {
            notes.push(format!("{key}={}", t.get(key)));
        }
    }
    if t.recursion_misses() > 0 {
        let progs: Vec<String> = t
            .progs
            .iter()
            .filter(|p| p.recursion_misses > 0)
            .map(|p| format!("{} {}", p.name, p.recursion_misses))
            .collect();
        notes.push(format!(
            "the kernel skipped synspan's programs {} time(s) (recursion misses: {}); synspan counts them \
             as kernel_skipped_runs, without knowing which attempts they cost",
            t.recursion_misses(),
            progs.join(", ")
        ));
    }
    if !books {
        notes.push(format!("books do not balance: `{}`", t.final_line));
    }
    Some(Exactness {
        books,
        receiver,
        storm,
        made_equals_settled: made == t.settled(),
        notes,
    })
}

// ---------------------------------------------------------------------------------------
// The report.

fn thousands(n: f64) -> String {
    if !n.is_finite() {
        return "—".into();
    }
    let s = format!("{:.0}", n);
    let (sign, digits) = s.strip_prefix('-').map_or(("", s.as_str()), |d| ("-", d));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(' ');
        }
        out.push(c);
    }
    format!("{sign}{out}")
}

fn command_output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn machine() -> String {
    let nproc = thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU".to_string(), |(_, m)| m.trim().to_string());
    let mem_gib = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<f64>()
                .ok()
        })
        .map_or(f64::NAN, |kib| kib / 1024.0 / 1024.0);
    format!("nproc {nproc}, kernel `{kernel}`, {model}, {mem_gib:.0} GiB RAM")
}

fn revision() -> String {
    let root = repo_root();
    let git = |args: &[&str]| {
        command_output(
            Command::new("git")
                .arg("-C")
                .arg(&root)
                .args(args)
                // Read-only: no opportunistic index refresh.
                .env("GIT_OPTIONAL_LOCKS", "0"),
        )
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        Some(head) => {
            let dirty =
                git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
            format!("`{head}`{}", if dirty { " with uncommitted changes" } else { "" })
        }
        None => "unknown".into(),
    }
}

struct Summary {
    mode: &'static Mode,
    base: f64,
    traced: f64,
    ratio: f64,
    made: u64,
    settled: u64,
    cpu_s: f64,
    rss_mib: f64,
    exact: bool,
    storm_cpu_us_a: f64,
    storm_cpu_us_b: f64,
    synspan_cpu_us: f64,
    receiver_cpu_us: f64,
    kernel_us: f64,
    recursion_misses: u64,
}

fn summarize(runs: &[Run]) -> Vec<Summary> {
    MODES
        .iter()
        .filter_map(|mode| {
            let a: Vec<&Run> = runs
                .iter()
                .filter(|r| r.mode == mode.id && r.tracer.is_none())
                .collect();
            let b: Vec<&Run> = runs
                .iter()
                .filter(|r| r.mode == mode.id && r.tracer.is_some())
                .collect();
            if a.is_empty() || b.is_empty() {
                return None;
            }
            let t = |r: &&Run| r.tracer.clone().unwrap_or_default();
            let per_attempt = |f: &dyn Fn(&Run) -> f64| {
                median(
                    b.iter()
                        .map(|r| f(r) * 1e6 / r.storm.attempts.max(1) as f64)
                        .collect(),
                )
            };
            let base = median(a.iter().map(|r| r.storm.per_second).collect());
            let traced = median(b.iter().map(|r| r.storm.per_second).collect());
            Some(Summary {
                mode,
                base,
                traced,
                ratio: traced / base,
                made: b.iter().map(|r| r.storm.attempts).sum(),
                settled: b.iter().map(|r| t(r).settled()).sum(),
                cpu_s: median(b.iter().map(|r| t(r).cpu_s).collect()),
                rss_mib: b.iter().map(|r| t(r).peak_rss_mib()).fold(0.0, f64::max),
                exact: b
                    .iter()
                    .all(|r| exactness(mode, r).is_some_and(|e| e.exact()) && t(r).exit_ok),
                storm_cpu_us_a: median(a.iter().map(|r| r.storm_cpu_us()).collect()),
                storm_cpu_us_b: median(b.iter().map(|r| r.storm_cpu_us()).collect()),
                synspan_cpu_us: per_attempt(&|r| t(&r).cpu_s),
                receiver_cpu_us: per_attempt(&|r| t(&r).receiver_cpu_s),
                kernel_us: per_attempt(&|r| t(&r).kernel_ns() as f64 / 1e9),
                recursion_misses: b.iter().map(|r| t(r).recursion_misses()).sum(),
            })
        })
        .collect()
}

fn table(summaries: &[Summary]) -> String {
    let mut out = String::new();
    out.push_str(
        "| mode | baseline median conn/s | synspan median conn/s | ratio | target | made | exported+dropped | CPU s | peak RSS MiB |\n\
         |---|---:|---:|---:|---|---:|---:|---:|---:|\n",
    );
    for s in summaries {
        let target = match s.mode.target {
            Some(t) if s.ratio >= t => format!("≥ {t:.2} met"),
            Some(t) => format!("≥ {t:.2} **missed by {:.2}**", t - s.ratio),
            None => "— (none)".into(),
        };
        let _ = writeln!(
            out,
            "| {}. {} | {} | {} | {:.2} | {} | {} | {} | {:.2} | {:.1} |",
            s.mode.id,
            s.mode.name,
            thousands(s.base),
            thousands(s.traced),
            s.ratio,
            target,
            thousands(s.made as f64),
            thousands(s.settled as f64),
            s.cpu_s,
            s.rss_mib,
        );
    }
    out
}

fn targets(summaries: &[Summary], runs: &[Run]) -> String {
    let mut out = String::new();
    for s in summaries {
        let Some(t) = s.mode.target else { continue };
        if s.ratio >= t {
            let _ = writeln!(
                out,
                "- mode {} ({}): ratio ≥ {t:.2} — **met** ({:.2}).",
                s.mode.id, s.mode.name, s.ratio
            );
        } else {
            let _ = writeln!(
                out,
                "- mode {} ({}): ratio ≥ {t:.2} — **missed** by {:.2} ({:.2}): synspan's median would have \
                 to be {} conn/s, it is {} ({} conn/s or {:.0} % short).",
                s.mode.id,
                s.mode.name,
                t - s.ratio,
                s.ratio,
                thousands(t * s.base),
                thousands(s.traced),
                thousands(t * s.base - s.traced),
                (1.0 - s.traced / (t * s.base)) * 100.0
            );
        }
    }
    let rss = summaries.iter().map(|s| s.rss_mib).fold(0.0, f64::max);
    if rss <= RSS_TARGET_MIB {
        let _ = writeln!(
            out,
            "- peak RSS ≤ {RSS_TARGET_MIB:.0} MiB — **met** (at most {rss:.1} MiB)."
        );
    } else {
        let over: Vec<String> = summaries
            .iter()
            .filter(|s| s.rss_mib > RSS_TARGET_MIB)
            .map(|s| format!("mode {} {:.1} MiB", s.mode.id, s.rss_mib))
            .collect();
        let _ = writeln!(
            out,
            "- peak RSS ≤ {RSS_TARGET_MIB:.0} MiB — **missed** by {:.1} MiB ({}).",
            rss - RSS_TARGET_MIB,
            over.join(", ")
        );
    }
    let traced = runs.iter().filter(|r| r.tracer.is_some()).count();
    let inexact: Vec<String> = summaries
        .iter()
        .filter(|s| !s.exact)
        .map(|s| format!("mode {}", s.mode.id))
        .collect();
    if inexact.is_empty() {
        let made_equal = runs
            .iter()
            .filter_map(|r| r.tracer.as_ref().map(|t| r.storm.attempts == t.settled()))
            .all(|equal| equal);
        let _ = writeln!(
            out,
            "- accounting exact — **met** in all {traced} synspan runs: synspan's books balance, the receiver \
             got exactly the spans synspan counted as exported, and every storm attempt was seen and is \
             exported or among the counted drops (with `--failures-only`: filtered in the kernel). {}",
            if made_equal {
                "`made` = `exported+dropped` in every run: nothing else on the host connected meanwhile."
            } else {
                "Where `made` differs from `exported+dropped`, other processes of the host connected \
                 meanwhile (see below)."
            }
        );
    } else {
        let _ = writeln!(
            out,
            "- accounting exact — **missed** in {}: see the notes under \"Every synspan run\".",
            inexact.join(", ")
        );
    }
    let misses: u64 = summaries.iter().map(|s| s.recursion_misses).sum();
    if misses > 0 {
        let _ = writeln!(
            out,
            "- note: the kernel skipped synspan's programs {misses} time(s) in all (bpf recursion misses: the \
             program was already running on that CPU when its hook fired again from an interrupt). synspan \
             reports them as `kernel_skipped_runs`. Most are state changes of no interest to it; one that was \
             an attempt's start or end would make its run's `exact` column say no."
        );
    }
    out
}

fn cost_table(summaries: &[Summary], bpf_stats: bool) -> String {
    let mut out = String::new();
    out.push_str(
        "| mode | storm CPU µs/attempt, A | storm CPU µs/attempt, B | synspan's programs µs/attempt | synspan CPU µs/attempt | receiver CPU µs/attempt |\n\
         |---|---:|---:|---:|---:|---:|\n",
    );
    for s in summaries {
        let kernel = if bpf_stats {
            format!("{:.1}", s.kernel_us)
        } else {
            "— (run with --bpf-stats)".into()
        };
        let _ = writeln!(
            out,
            "| {}. {} | {:.1} | {:.1} | {} | {:.1} | {:.1} |",
            s.mode.id,
            s.mode.name,
            s.storm_cpu_us_a,
            s.storm_cpu_us_b,
            kernel,
            s.synspan_cpu_us,
            s.receiver_cpu_us
        );
    }
    out
}

fn prog_table(runs: &[Run]) -> String {
    let mut out = String::from(
        "| mode | program | runs per attempt | ns per run | µs per attempt | recursion misses |\n\
         |---|---|---:|---:|---:|---:|\n",
    );
    for mode in &MODES {
        let b: Vec<&TracerRun> = runs
            .iter()
            .filter(|r| r.mode == mode.id)
            .filter_map(|r| r.tracer.as_ref())
            .collect();
        let made: u64 = runs
            .iter()
            .filter(|r| r.mode == mode.id && r.tracer.is_some())
            .map(|r| r.storm.attempts)
            .sum();
        let mut names: Vec<&str> = b
            .iter()
            .flat_map(|t| t.progs.iter().map(|p| p.name.as_str()))
            .collect();
        names.sort_unstable();
        names.dedup();
        for name in names {
            let (mut ns, mut cnt, mut misses) = (0u64, 0u64, 0u64);
            for p in b.iter().flat_map(|t| t.progs.iter()).filter(|p| p.name == name) {
                ns += p.run_time_ns;
                cnt += p.run_cnt;
                misses += p.recursion_misses;
            }
            let _ = writeln!(
                out,
                "| {} | `{name}` | {:.2} | {:.0} | {:.2} | {misses} |",
                mode.id,
                cnt as f64 / made.max(1) as f64,
                ns as f64 / cnt.max(1) as f64,
                ns as f64 / 1e3 / made.max(1) as f64,
            );
        }
    }
    out
}

fn details(runs: &[Run]) -> String {
    let mut out = String::new();
    out.push_str(
        "| mode | pair | baseline conn/s | synspan conn/s | made | seen | exported | dropped | made = exported+dropped | \
         books | receiver got | storm spans | exact | synspan CPU s (storm / to SIGTERM / total) | VmHWM / maxrss MiB | \
         drain s | receiver CPU s | others' CPU s A / B | steal s A / B | other synspan | exit |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---|---|---|---:|---:|---|---|---:|---|\n",
    );
    for b in runs.iter().filter(|r| r.tracer.is_some()) {
        let mode = &MODES[b.mode - 1];
        let a = runs
            .iter()
            .find(|r| r.mode == b.mode && r.pair == b.pair && r.tracer.is_none());
        let t = b.tracer.as_ref().expect("traced run");
        let e = exactness(mode, b).expect("traced run");
        let yes = |ok: bool| if ok { "yes" } else { "**no**" };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {}{} | {} | {} | {:.2} / {:.2} / {:.2} | {:.1} / {:.1} | {:.1} | {:.2} | {} / {:.2} | {} / {:.2} | {} | {} |",
            b.mode,
            b.pair,
            a.map_or("—".into(), |a| thousands(a.storm.per_second)),
            thousands(b.storm.per_second),
            b.storm.attempts,
            t.seen(),
            t.get("exported"),
            t.get("dropped"),
            if e.made_equals_settled {
                "yes".to_string()
            } else {
                format!("no ({:+})", t.settled() as i64 - b.storm.attempts as i64)
            },
            yes(e.books),
            t.received.total,
            if e.receiver { "" } else { " **≠ exported**" },
            t.received.storm,
            yes(e.exact()),
            t.cpu_storm_s,
            t.cpu_s,
            t.cpu_total_s,
            t.hwm_mib,
            t.max_rss_mib,
            t.drain_s,
            t.receiver_cpu_s,
            a.map_or("—".into(), |a| format!("{:.2}", a.host.others_cpu_s)),
            b.host.others_cpu_s,
            a.map_or("—".into(), |a| format!("{:.2}", a.host.steal_s)),
            b.host.steal_s,
            b.host.foreign.max(a.map_or(0, |a| a.host.foreign)),
            t.exit,
        );
    }
    let mut notes: Vec<String> = runs
        .iter()
        .filter(|b| b.tracer.is_some())
        .filter(|b| {
            runs.iter()
                .filter(|r| r.mode == b.mode && r.pair == b.pair)
                .any(|r| r.host.disturbed(r.storm.seconds))
        })
        .map(|b| {
            format!(
                "- mode {} pair {}: kept although other load disturbed it (no retry left); see `others' CPU s` \
                 and `other synspan`.",
                b.mode, b.pair
            )
        })
        .collect();
    notes.extend(runs.iter().filter_map(|r| {
        let e = exactness(&MODES[r.mode - 1], r)?;
        (!e.notes.is_empty()).then(|| format!("- mode {} pair {}: {}.", r.mode, r.pair, e.notes.join("; ")))
    }));
    if !notes.is_empty() {
        out.push('\n');
        out.push_str(&notes.join("\n"));
        out.push('\n');
    }
    let failed: Vec<String> = runs
        .iter()
        .filter(|r| r.storm.failed > 0)
        .map(|r| {
            format!(
                "- mode {} pair {} {}: {} of {} attempts failed: {:?}",
                r.mode,
                r.pair,
                if r.tracer.is_some() { "B" } else { "A" },
                r.storm.failed,
                r.storm.attempts,
                r.storm.errors
            )
        })
        .collect();
    out.push('\n');
    if failed.is_empty() {
        out.push_str(
            "No storm attempt failed in any run (success storms: every connect() connected; refused storms: \
             every one was refused with ECONNREFUSED).\n",
        );
    } else {
        out.push_str("Storm attempts that did not end as the mode expects:\n\n");
        out.push_str(&failed.join("\n"));
        out.push('\n');
    }
    out
}

fn discarded_list(discarded: &[(Run, Run)]) -> String {
    if discarded.is_empty() {
        return "None: no other synspan ran and other processes stayed under a tenth of a CPU in every \
                pair.\n"
            .into();
    }
    let mut out = String::new();
    for (a, b) in discarded {
        let _ = writeln!(
            out,
            "- mode {} pair {}: A {} conn/s (others {:.2} CPU s, {} other synspan), B {} conn/s (others {:.2} \
             CPU s, {} other synspan)",
            a.mode,
            a.pair,
            thousands(a.storm.per_second),
            a.host.others_cpu_s,
            a.host.foreign,
            thousands(b.storm.per_second),
            b.host.others_cpu_s,
            b.host.foreign
        );
    }
    out
}

fn document(args: &Args, command: &str, date: &str, runs: &[Run], discarded: &[(Run, Run)]) -> String {
    let summaries = summarize(runs);
    let mut doc = String::new();
    let _ = write!(
        doc,
        "# Benchmarks\n\n\
         Produced by `{command}` on {date}.\n\n\
         - machine: {}\n\
         - synspan: `{}`, revision {}, release build{}\n\
         - settings: {} A/B pairs per mode, {} s per storm (at most {} attempts), {} connect thread(s)\n\n\
         ## Results\n\n\
         Connects per second of a loopback storm without synspan (baseline, A) and with it (B), medians over \
         the pairs; ratio = B / A. `made` and `exported+dropped` are summed over the synspan runs; CPU s is \
         synspan's median CPU time (user + system) per run, from its start until the export had drained; \
         peak RSS is the highest of VmHWM (before SIGTERM) and ru_maxrss (at exit) over all runs.\n\n{}\n\
         ## Targets\n\n{}\n",
        machine(),
        command_output(Command::new(workspace_bin("synspan")).arg("--version")).unwrap_or_default(),
        revision(),
        if args.synspan_args.is_empty() {
            String::new()
        } else {
            format!("; added to every synspan run: `{}`", args.synspan_args.join(" "))
        },
        args.pairs,
        args.seconds,
        args.count,
        args.threads,
        table(&summaries),
        targets(&summaries, runs),
    );
    let _ = write!(
        doc,
        "## Where the time goes\n\n\
         Medians per attempt. The storm's CPU (user + system, from wait4) includes the kernel's connect \
         path and, in B runs, synspan's programs, which run in the context of the thread that changes the \
         socket's state; the difference between B and A is roughly what the programs and their side effects \
         cost. synspan's and the receiver's CPU come on top, on the same CPUs. Every figure is divided by \
         the storm's attempts, also when synspan dropped part of the spans (export queue full): per span \
         actually exported, synspan's and the receiver's CPU are higher.\n\n{}\n",
        cost_table(&summaries, args.bpf_stats)
    );
    if args.bpf_stats {
        let _ = write!(
            doc,
            "synspan's programs, from the kernel's run-time statistics (BPF_ENABLE_STATS), summed over \
             the synspan runs of each mode:\n\n{}\n",
            prog_table(runs)
        );
    }
    let _ = write!(
        doc,
        "## Every synspan run\n\n\
         `made`: connect() calls of the storm. `seen`, `exported`, `dropped`: synspan's final accounting line. \
         `books`: seen = exported + dropped with nothing pending or in flight. `receiver got`: spans the \
         receiver decoded, which must equal `exported`. `storm spans`: those of them with the storm's pid; \
         every storm attempt not among them must be among the counted drops (with `--failures-only` none is \
         exported: every storm attempt is a fast success that the kernel filters, counted as `filtered`). \
         `exact`: all of these hold. synspan traces the whole host (but not itself), so `seen` also counts \
         any connect made elsewhere on the host meanwhile: that would be the difference between `made` and \
         `exported + dropped`. Its own connection to the receiver shows in the notes as \
         `untracked_finish=1`: a socket that left SYN_SENT without a traced start. `others' CPU s`: CPU \
         time of every process outside the benchmark during the A and the B storm.\n\n{}\n\
         ## Discarded pairs\n\n\
         Pairs run again because another synspan was running or other processes used more than {:.0} % of \
         a CPU during the A or the B storm:\n\n{}\n",
        details(runs),
        OTHERS_MAX_CPU * 100.0,
        discarded_list(discarded)
    );
    let _ = write!(
        doc,
        "## Method\n\n\
         - One network namespace, created for the benchmark and removed after it. The benchmark enters it \
         with setns, so the OTLP receiver, synspan and the storms all run in it and only its 127.0.0.1 \
         sees traffic; synspan still traces every connect on the host.\n\
         - The receiver is `synspan-otlp-sink` (testbed/src/bin/synspan-otlp-sink.rs): OTLP gRPC (tonic), \
         decodes every request and counts its spans by `process.pid`, writes nothing else. The end-to-end \
         tests use rotel with a Python span processor that writes each span out as JSON; here that \
         receiver alone used 14–20 µs of CPU per span (revision edce245), more than synspan, on the same \
         two CPUs as the storm it is meant to measure.\n\
         - `synspan-storm` (testbed/src/bin/synspan-storm.rs): {} thread(s), each a loop of blocking \
         socket → connect → close. `success` connects to a listener of its own (one accept thread, backlog \
         4096); `refused` to a port that is bound but not listening. Client sockets use SO_LINGER {{1, 0}}: \
         close() sends a RST, so no TIME_WAIT holds ephemeral ports and no attempt fails for lack of one.\n\
         - Each pair is an A run then a B run. B: synspan starts (`--otlp-endpoint <receiver> --output none \
         --shutdown-timeout {SHUTDOWN_TIMEOUT_S}s` plus the mode's flags), the benchmark waits for `synspan \
         ready`, runs the same storm, waits until the receiver has got nothing new for {:.1} s, reads \
         utime + stime from /proc/PID/stat and VmHWM from /proc/PID/status, sends SIGTERM and requires exit \
         status 0.\n\
         - The receiver and synspan share the machine's CPUs with the storm: on a small machine what the \
         receiver spends (column `receiver CPU`) slows the B runs down as much as what synspan spends.\n\
         - Before each pair the benchmark waits (up to {} s) until no other synspan runs and other \
         processes are near idle; a pair disturbed all the same is run again (up to {} times).\n",
        args.threads,
        QUIET.as_secs_f64(),
        CALM_LIMIT.as_secs(),
        args.retries,
    );
    doc
}

fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    if unsafe { libc::geteuid() } != 0 {
        bail!("synspan-bench needs root: it creates a network namespace and runs synspan");
    }
    for bin in ["synspan", "synspan-storm"] {
        workspace_bin(bin);
    }
    let command = std::env::var("SYNSPAN_BENCH_COMMAND").unwrap_or_else(|_| {
        std::iter::once("target/release/synspan-bench".to_string())
            .chain(args.raw.iter().map(|a| {
                if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '\'' || c == '"') {
                    format!("'{}'", a.replace('\'', "'\\''"))
                } else {
                    a.clone()
                }
            }))
            .collect::<Vec<_>>()
            .join(" ")
    });
    let date = utc_now();
    let _stats = if args.bpf_stats {
        Some(BpfStats::enable()?)
    } else {
        None
    };

    // Drop order matters: the receiver stops inside the namespace, this thread leaves it,
    // then the namespace goes.
    let ns = Netns::new("bench")?;
    ns.sysctl("net.core.somaxconn", "4096")?;
    ns.sysctl("net.ipv4.tcp_max_syn_backlog", "4096")?;
    let inside = Inside::enter(&ns)?;
    let sink = OtlpSink::start()?;
    let bench = Bench {
        args: &args,
        sink: &sink,
    };
    eprintln!(
        "synspan-bench: namespace {}, receiver {} (pid {}); {} pair(s) × {} mode(s) × 2 runs of {} s",
        ns.name(),
        sink.endpoint(),
        sink.pid(),
        args.pairs,
        args.modes.len(),
        args.seconds
    );

    let mut runs = Vec::new();
    let mut discarded = Vec::new();
    let result = (|| -> anyhow::Result<()> {
        for &id in &args.modes {
            let mode = &MODES[id - 1];
            for pair in 1..=args.pairs {
                for attempt in 0..=args.retries {
                    check_interrupted()?;
                    wait_calm();
                    let a = bench.baseline(mode, pair)?;
                    eprintln!(
                        "synspan-bench: mode {id} pair {pair} A: {:.0} conn/s ({} attempts, {} failed; \
                         others {:.2} CPU s)",
                        a.storm.per_second, a.storm.attempts, a.storm.failed, a.host.others_cpu_s
                    );
                    thread::sleep(Duration::from_millis(500));
                    check_interrupted()?;
                    let b = bench.traced(mode, pair)?;
                    let t = b.tracer.as_ref().expect("traced");
                    eprintln!(
                        "synspan-bench: mode {id} pair {pair} B: {:.0} conn/s ({} attempts, {} failed; others \
                         {:.2} CPU s); synspan seen={} exported={} dropped={} cpu={:.2}s hwm={:.1}MiB \
                         drain={:.1}s {}",
                        b.storm.per_second,
                        b.storm.attempts,
                        b.storm.failed,
                        b.host.others_cpu_s,
                        t.seen(),
                        t.get("exported"),
                        t.get("dropped"),
                        t.cpu_s,
                        t.hwm_mib,
                        t.drain_s,
                        t.exit
                    );
                    thread::sleep(Duration::from_millis(500));
                    let disturbed = a.host.disturbed(a.storm.seconds) || b.host.disturbed(b.storm.seconds);
                    if disturbed && attempt < args.retries {
                        eprintln!("synspan-bench: mode {id} pair {pair} was disturbed; running it again");
                        discarded.push((a, b));
                        continue;
                    }
                    runs.push(a);
                    runs.push(b);
                    break;
                }
            }
        }
        // A run cut short by Ctrl-C (its drain not waited for) must not make the report.
        check_interrupted()
    })();
    drop(sink);
    drop(inside);
    drop(ns);
    result?;

    let doc = document(&args, &command, &date, &runs, &discarded);
    let summaries = summarize(&runs);
    println!("{}", table(&summaries));
    println!("{}", targets(&summaries, &runs));
    println!("{}", cost_table(&summaries, args.bpf_stats));
    if let Some(out) = &args.out {
        fs::write(out, &doc).with_context(|| format!("writing {}", out.display()))?;
        eprintln!("synspan-bench: wrote {}", out.display());
    }
    if runs.iter().filter_map(|r| r.tracer.as_ref()).any(|t| !t.exit_ok) {
        bail!("synspan did not exit 0 in every run");
    }
    Ok(())
}
