//! The runs of a pair: a storm alone (A), then synspan started, the same storm, the export
//! drained, synspan stopped (B).

use std::{
    collections::HashMap,
    io::Read,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use synspan_testbed::{
    agent::{Agent, Output},
    bench::StormReport,
    otlp_sink::{OtlpSink, SinkCounts},
    reaped::{Reaped, describe},
    workspace_bin,
};

use crate::{
    args::Args,
    measure::{self, Disturbance, HostSnapshot, ProgStat},
    mode::Mode,
    peers::Peer,
};

/// synspan gets this long to flush at SIGTERM; the benchmark waits for the export to go
/// quiet first, so this only matters when the receiver falls far behind.
pub(crate) const SHUTDOWN_TIMEOUT_S: u64 = 120;
/// The receiver is drained when its output has not grown for this long.
pub(crate) const QUIET: Duration = Duration::from_millis(1500);
const DRAIN_LIMIT: Duration = Duration::from_secs(180);

/// What the receiver got during one B run.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Received {
    pub(crate) total: u64,
    /// From the storm's pid.
    pub(crate) storm: u64,
    /// From synspan's own pid.
    pub(crate) synspan: u64,
}

/// What synspan did and cost in one B run.
#[derive(Clone, Debug, Default)]
pub(crate) struct AgentRun {
    /// synspan's CPU while the storm ran.
    pub(crate) cpu_storm_s: f64,
    /// synspan's CPU from start to just before SIGTERM (after the export drained).
    pub(crate) cpu_s: f64,
    /// synspan's CPU just before the storm: start-up, loading and attaching.
    pub(crate) cpu_before_storm_s: f64,
    /// Each thread's CPU by name, from just before the storm to just before SIGTERM.
    pub(crate) threads: Vec<(String, f64)>,
    /// From wait4: everything, shutdown included.
    pub(crate) cpu_total_s: f64,
    /// VmHWM just before SIGTERM.
    pub(crate) hwm_mib: f64,
    /// ru_maxrss from wait4.
    pub(crate) max_rss_mib: f64,
    /// From the end of the storm until the receiver went quiet.
    pub(crate) drain_s: f64,
    pub(crate) receiver_cpu_s: f64,
    /// synspan's final accounting, counter by counter.
    pub(crate) accounting: HashMap<String, u64>,
    pub(crate) received: Received,
    /// synspan's programs from just before the storm to just before SIGTERM.
    pub(crate) progs: Vec<ProgStat>,
    pub(crate) exit: String,
    pub(crate) exit_ok: bool,
}

impl AgentRun {
    pub(crate) fn get(&self, key: &str) -> u64 {
        self.accounting.get(key).copied().unwrap_or(0)
    }

    /// Attempts synspan saw.
    pub(crate) fn seen(&self) -> u64 {
        self.get("seen")
    }

    pub(crate) fn settled(&self) -> u64 {
        self.get("exported") + self.get("dropped")
    }

    pub(crate) fn peak_rss_mib(&self) -> f64 {
        self.hwm_mib.max(self.max_rss_mib)
    }

    pub(crate) fn recursion_misses(&self) -> u64 {
        self.progs.iter().map(|p| p.recursion_misses).sum()
    }

    pub(crate) fn kernel_ns(&self) -> u64 {
        self.progs.iter().map(|p| p.run_time_ns).sum()
    }
}

/// What a peer cost in one of its runs.
#[derive(Clone, Debug)]
pub(crate) struct PeerRun {
    pub(crate) peer: &'static Peer,
    /// While the storm ran.
    pub(crate) cpu_storm_s: f64,
    pub(crate) hwm_mib: f64,
}

/// One run: A (the storm alone), B (synspan, `agent`) or a peer's (`peer`).
#[derive(Clone, Debug)]
pub(crate) struct Run {
    pub(crate) mode: usize,
    pub(crate) pair: u32,
    pub(crate) storm: StormReport,
    pub(crate) storm_cpu_s: f64,
    pub(crate) host: Disturbance,
    pub(crate) agent: Option<AgentRun>,
    pub(crate) peer: Option<PeerRun>,
}

impl Run {
    /// The storm alone.
    pub(crate) fn is_baseline(&self) -> bool {
        self.agent.is_none() && self.peer.is_none()
    }

    pub(crate) fn storm_cpu_us(&self) -> f64 {
        self.storm_cpu_s * 1e6 / self.storm.attempts.max(1) as f64
    }
}

pub(crate) struct Bench<'a> {
    pub(crate) args: &'a Args,
    pub(crate) sink: &'a OtlpSink,
}

impl Bench<'_> {
    pub(crate) fn baseline(&self, mode: &Mode, pair: u32) -> anyhow::Result<Run> {
        let host = HostSnapshot::take();
        let storm = storm(self.args, mode.storm)?;
        Ok(Run {
            mode: mode.id,
            pair,
            storm: storm.report,
            storm_cpu_s: storm.cpu_s,
            host: Disturbance::between(&host, &HostSnapshot::take()),
            agent: None,
            peer: None,
        })
    }

    /// The storm with a peer instead of synspan.
    pub(crate) fn peer(&self, mode: &Mode, pair: u32, peer: &'static Peer) -> anyhow::Result<Run> {
        let running = peer.start()?;
        let cpu_start = measure::cpu_seconds(running.pid()).unwrap_or(0.0);
        let host = HostSnapshot::take();
        let storm = storm(self.args, mode.storm)?;
        let host = Disturbance::between(&host, &HostSnapshot::take());
        let cpu_storm_s = measure::cpu_seconds(running.pid()).unwrap_or(f64::NAN) - cpu_start;
        let stopped = running.stop()?;
        Ok(Run {
            mode: mode.id,
            pair,
            storm: storm.report,
            storm_cpu_s: storm.cpu_s,
            host,
            agent: None,
            peer: Some(PeerRun {
                peer,
                cpu_storm_s,
                hwm_mib: stopped.hwm_mib,
            }),
        })
    }

    pub(crate) fn traced(&self, mode: &Mode, pair: u32) -> anyhow::Result<Run> {
        let before = self.sink.counts()?;
        let receiver_cpu = || measure::cpu_seconds(self.sink.pid()).unwrap_or(0.0);
        let rx_before = receiver_cpu();
        let timeout = format!("{SHUTDOWN_TIMEOUT_S}s");
        let mut flags = vec![
            "--otlp-endpoint",
            self.sink.endpoint(),
            "--shutdown-timeout",
            &timeout,
        ];
        flags.extend(mode.flags);
        flags.extend(self.args.synspan_args());
        let agent = Agent::start_as_shipped(Output::None, &flags)?;
        let pid = agent.pid();
        let progs_before = measure::prog_stats(&agent);
        let cpu_start = measure::cpu_seconds(pid).unwrap_or(0.0);
        let threads_start = measure::thread_cpu_seconds(pid);
        let host = HostSnapshot::take();
        let storm = storm(self.args, mode.storm)?;
        let host = Disturbance::between(&host, &HostSnapshot::take());
        let cpu_storm_s = measure::cpu_seconds(pid).unwrap_or(0.0) - cpu_start;
        let drain_s = wait_quiet(self.sink).as_secs_f64();
        let cpu_s = measure::cpu_seconds(pid).unwrap_or(f64::NAN);
        let mut threads: Vec<(String, f64)> = measure::thread_cpu_seconds(pid)
            .into_iter()
            .map(|(name, s)| {
                let before = threads_start.get(&name).copied().unwrap_or(0.0);
                (name, s - before)
            })
            .collect();
        threads.sort_by(|a, b| a.0.cmp(&b.0));
        let hwm_mib = measure::status_mib(pid, "VmHWM:").unwrap_or(f64::NAN);
        let progs = measure::prog_delta(&progs_before, &measure::prog_stats(&agent));
        let stopped = agent.stop(Duration::from_secs(SHUTDOWN_TIMEOUT_S + 30))?;
        // Whatever synspan flushed at exit arrives a moment later.
        wait_quiet(self.sink);
        let received = received(&before, &self.sink.counts()?, storm.pid, pid);
        let accounting = stopped.accounting();
        if accounting.is_empty() {
            bail!("synspan printed no final accounting; stderr:\n{}", stopped.stderr);
        }
        let exit_ok = stopped.status.code() == Some(0);
        if !exit_ok {
            eprintln!(
                "synspan-bench: synspan ended with {}; stderr:\n{}",
                describe(stopped.status),
                stopped.stderr
            );
        }
        for line in stopped
            .stderr
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains("ERROR"))
        {
            eprintln!("synspan-bench: synspan said: {line}");
        }
        let run = AgentRun {
            cpu_storm_s,
            cpu_s,
            threads,
            cpu_before_storm_s: cpu_start,
            cpu_total_s: stopped.usage.cpu_s,
            hwm_mib,
            max_rss_mib: stopped.usage.max_rss_mib,
            drain_s,
            receiver_cpu_s: receiver_cpu() - rx_before,
            accounting,
            received,
            progs,
            exit: describe(stopped.status),
            exit_ok,
        };
        Ok(Run {
            mode: mode.id,
            pair,
            storm: storm.report,
            storm_cpu_s: storm.cpu_s,
            host,
            agent: Some(run),
            peer: None,
        })
    }
}

struct Storm {
    pid: u32,
    report: StormReport,
    cpu_s: f64,
}

/// Runs `synspan-storm` to its end and reads its report.
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
    if exit.status.code() != Some(0) {
        bail!("synspan-storm failed ({}): {}", describe(exit.status), err.trim());
    }
    let report: StormReport =
        serde_json::from_str(out.trim()).with_context(|| format!("storm report {out:?}"))?;
    Ok(Storm {
        pid: proc.pid(),
        report,
        cpu_s: exit.usage.cpu_s,
    })
}

/// Waits until the sink has received nothing new for `QUIET`; returns how long it kept
/// receiving.
fn wait_quiet(sink: &OtlpSink) -> Duration {
    let spans = || sink.counts().map(|c| c.spans).unwrap_or(0);
    let started = Instant::now();
    let mut last = spans();
    let mut since = Instant::now();
    while started.elapsed() < DRAIN_LIMIT && !crate::interrupted() {
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
