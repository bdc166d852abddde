//! What synspan and the rest of the host cost: CPU time and memory from /proc, the run
//! time of synspan's kernel programs, and whether other load disturbed a run.

use std::{
    collections::HashMap,
    fs,
    os::fd::{FromRawFd, OwnedFd},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::bail;
use serde_json::Value;
use synspan_testbed::agent::Agent;

/// A run is disturbed when other processes used more than this share of one CPU.
pub(crate) const OTHERS_MAX_CPU: f64 = 0.1;
/// Before a pair, wait at most this long for the host to be quiet.
pub(crate) const CALM_LIMIT: Duration = Duration::from_secs(60);

fn clock_ticks() -> f64 {
    // SAFETY: plain libc call.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// The fields of /proc/PID/stat after the command, from `state` (field 3) on.
fn stat_fields(pid: u32) -> Option<Vec<u64>> {
    Some(read_stat(&format!("/proc/{pid}/stat"))?.1)
}

/// A `stat` file of /proc (a process's or a thread's): the command, and the fields after it.
fn read_stat(path: &str) -> Option<(String, Vec<u64>)> {
    let stat = fs::read_to_string(path).ok()?;
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    // The state is a letter: keep the positions, with 0 in its place.
    let fields = stat[close + 1..]
        .split_whitespace()
        .map(|f| f.parse::<i64>().map_or(0, |v| v.max(0) as u64))
        .collect();
    Some((stat.get(open + 1..close)?.to_string(), fields))
}

/// utime + stime in `stat_fields`, in seconds.
fn cpu_of(fields: &[u64]) -> Option<f64> {
    Some((fields.get(UTIME)? + fields.get(STIME)?) as f64 / clock_ticks())
}

// Indexes into `stat_fields`: field number - 3.
const PPID: usize = 1;
const UTIME: usize = 11;
const STIME: usize = 12;
const CUTIME: usize = 13;
const CSTIME: usize = 14;
const STARTTIME: usize = 19;

/// utime + stime of a whole process, in seconds.
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    cpu_of(&stat_fields(pid)?)
}

/// utime + stime of each thread of a process, in seconds, summed by thread name: the agent
/// names each of its stages' threads. At most `MAX_THREADS` threads are read.
pub(crate) fn thread_cpu_seconds(pid: u32) -> HashMap<String, f64> {
    const MAX_THREADS: usize = 256;
    let mut by_name = HashMap::new();
    let tids = fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .take(MAX_THREADS);
    for tid in tids {
        let Some((name, fields)) = read_stat(&format!("/proc/{pid}/task/{tid}/stat")) else {
            continue;
        };
        *by_name.entry(name).or_insert(0.0) += cpu_of(&fields).unwrap_or(0.0);
    }
    by_name
}

/// A `kB` line of /proc/PID/status, in MiB.
pub(crate) fn status_mib(pid: u32, key: &str) -> Option<f64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn comm(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn all_pids() -> Vec<u32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// synspan processes this benchmark did not start: their programs see our storms too.
fn foreign_agents() -> usize {
    let me = std::process::id() as u64;
    all_pids()
        .into_iter()
        .filter(|&pid| comm(pid) == "synspan")
        .filter(|&pid| stat_fields(pid).and_then(|f| f.get(PPID).copied()) != Some(me))
        .count()
}

/// What every other process of the host did, to tell a quiet run from a disturbed one.
pub(crate) struct HostSnapshot {
    /// pid → (start time, utime + stime + cutime + cstime): a child that exits and is
    /// reaped adds its time to its parent's cutime/cstime.
    procs: HashMap<u32, (u64, u64)>,
    steal: u64,
    foreign: usize,
}

impl HostSnapshot {
    pub(crate) fn take() -> Self {
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
            foreign: foreign_agents(),
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
pub(crate) struct Disturbance {
    /// Most synspan processes of others seen at the start or the end.
    pub(crate) foreign: usize,
    pub(crate) others_cpu_s: f64,
    pub(crate) steal_s: f64,
}

impl Disturbance {
    pub(crate) fn between(start: &HostSnapshot, end: &HostSnapshot) -> Self {
        let (others_cpu_s, steal_s) = end.since(start);
        Self {
            foreign: start.foreign.max(end.foreign),
            others_cpu_s,
            steal_s,
        }
    }

    pub(crate) fn disturbed(&self, seconds: f64) -> bool {
        self.foreign > 0 || self.others_cpu_s > OTHERS_MAX_CPU * seconds
    }
}

/// Waits (bounded) until no other synspan runs and the other processes are near idle.
pub(crate) fn wait_calm() -> bool {
    let started = Instant::now();
    let mut said = false;
    while started.elapsed() < CALM_LIMIT && !crate::interrupted() {
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

/// While it lives, the kernel measures the run time of every BPF program (BPF_ENABLE_STATS);
/// closing the fd turns it off again, even if this process dies.
pub(crate) struct BpfStats {
    _fd: OwnedFd,
}

impl BpfStats {
    pub(crate) fn enable() -> anyhow::Result<Self> {
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
        // SAFETY: the kernel just returned this fd to us, and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(Self { _fd: fd })
    }
}

#[derive(Clone, Debug, Default)]
pub(crate) struct ProgStat {
    pub(crate) name: String,
    pub(crate) run_time_ns: u64,
    pub(crate) run_cnt: u64,
    pub(crate) recursion_misses: u64,
}

/// The programs synspan holds, as bpftool shows them.
pub(crate) fn prog_stats(agent: &Agent) -> Vec<ProgStat> {
    let mut ids = agent.prog_ids();
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
pub(crate) fn prog_delta(before: &[ProgStat], after: &[ProgStat]) -> Vec<ProgStat> {
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
