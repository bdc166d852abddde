//! The report: the tables printed at the end and BENCHMARKS.md.

use std::{
    fmt::Write as _,
    fs,
    process::{Command, Stdio},
    thread,
    time::SystemTime,
};

use synspan_testbed::{bench, repo_root, workspace_bin};

use crate::{
    args::Args,
    checks::exactness,
    measure::{CALM_LIMIT, OTHERS_MAX_CPU},
    mode::{COSTS, MODES, Mode},
    runner::{AgentRun, QUIET, Run, SHUTDOWN_TIMEOUT_S},
    summary::{PeerSummary, Summary, summarize, summarize_peers},
};

/// Peak RSS the project sets as synspan's limit.
const RSS_TARGET_MIB: f64 = 64.0;

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

pub(crate) fn table(summaries: &[Summary]) -> String {
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

pub(crate) fn targets(summaries: &[Summary], runs: &[Run]) -> String {
    let mut out = String::new();
    let ratio_of = |id: usize| summaries.iter().find(|s| s.mode.id == id).map(|s| s.ratio);
    for c in &COSTS {
        let (Some(on), Some(off)) = (ratio_of(c.on), ratio_of(c.off)) else {
            continue;
        };
        let cost = off - on;
        let verdict = if cost <= c.target { "**met**" } else { "**missed**" };
        let _ = writeln!(
            out,
            "- {} (mode {} against mode {}, same run): ratio {on:.2} with them, {off:.2} without, a \
             cost of {cost:.2}; at most {:.2} — {verdict}.",
            c.what, c.on, c.off, c.target
        );
    }
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
    let traced = runs.iter().filter(|r| r.agent.is_some()).count();
    let inexact: Vec<String> = summaries
        .iter()
        .filter(|s| !s.exact)
        .map(|s| format!("mode {}", s.mode.id))
        .collect();
    if inexact.is_empty() {
        let made_equal = runs
            .iter()
            .filter_map(|r| r.agent.as_ref().map(|t| r.storm.attempts == t.settled()))
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

/// The peers beside synspan, storm by storm.
pub(crate) fn peer_table(summaries: &[Summary], peers: &[PeerSummary]) -> String {
    let mut out = String::new();
    out.push_str(
        "| storm | tool | median conn/s | ratio | tool's CPU µs/attempt | storm CPU µs/attempt | peak RSS MiB |\n\
         |---|---|---:|---:|---:|---:|---:|\n",
    );
    for storm in [bench::SUCCESS, bench::REFUSED] {
        for p in peers.iter().filter(|p| p.mode.storm == storm) {
            let _ = writeln!(
                out,
                "| {storm} | {} | {} | {:.2} | {:.1} | {:.1} | {:.1} |",
                p.peer.what,
                thousands(p.traced),
                p.ratio,
                p.cpu_us,
                p.storm_cpu_us,
                p.rss_mib
            );
        }
        for s in summaries.iter().filter(|s| s.mode.storm == storm) {
            let _ = writeln!(
                out,
                "| {storm} | synspan: mode {}, {} | {} | {:.2} | {:.1} | {:.1} | {:.1} |",
                s.mode.id,
                s.mode.name,
                thousands(s.traced),
                s.ratio,
                s.synspan_cpu_us,
                s.storm_cpu_us_b,
                s.rss_mib
            );
        }
    }
    out
}

/// The targets that name a peer: a synspan mode's ratio against a peer's on the same storm,
/// some with drop reasons that must stay at zero.
pub(crate) fn peer_targets(summaries: &[Summary], peers: &[PeerSummary], runs: &[Run]) -> String {
    let targets: [(usize, &str, &[&str]); 3] = [
        (2, "bpftrace-count", &[]),
        (1, "bpftrace-seed", &["export_queue_full"]),
        (3, "bpftrace-seed", &["ringbuf_full", "export_queue_full"]),
    ];
    let mut out = String::new();
    for (mode, peer, zero) in targets {
        let Some(s) = summaries.iter().find(|s| s.mode.id == mode) else {
            continue;
        };
        let Some(p) = peers
            .iter()
            .find(|p| p.peer.name == peer && p.mode.storm == s.mode.storm)
        else {
            continue;
        };
        let drops: Vec<String> = zero
            .iter()
            .map(|reason| {
                let n: u64 = runs
                    .iter()
                    .filter(|r| r.mode == mode)
                    .filter_map(|r| r.agent.as_ref())
                    .map(|t| t.get(reason))
                    .sum();
                (reason, n)
            })
            .filter(|&(_, n)| n > 0)
            .map(|(reason, n)| format!("{reason} = {n}"))
            .collect();
        let also = if zero.is_empty() {
            String::new()
        } else {
            format!(", with no {}", zero.join(" and no "))
        };
        let verdict = match (s.ratio >= p.ratio, drops.is_empty()) {
            (true, true) => "**met**".to_string(),
            (false, _) => format!("**missed** by {:.2}", p.ratio - s.ratio),
            (true, false) => format!("**missed**: {}", drops.join(", ")),
        };
        let _ = writeln!(
            out,
            "- mode {mode} ({}) at or above `{}` ({:.2}){also}: {verdict} ({:.2}).",
            s.mode.name, p.peer.name, p.ratio, s.ratio
        );
    }
    out
}

pub(crate) fn cost_table(summaries: &[Summary], bpf_stats: bool) -> String {
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
        let b: Vec<&AgentRun> = runs
            .iter()
            .filter(|r| r.mode == mode.id)
            .filter_map(|r| r.agent.as_ref())
            .collect();
        let made: u64 = runs
            .iter()
            .filter(|r| r.mode == mode.id && r.agent.is_some())
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

/// synspan's CPU per attempt by thread, over the B runs of each mode: the agent names a thread
/// after each stage, so this is where its own time goes. "other" is what threads that had
/// exited by the end (or that were beyond the bound of threads read) used.
fn thread_table(runs: &[Run]) -> String {
    let mut out = String::from(
        "| mode | thread | µs per attempt | share of synspan's CPU |\n\
         |---|---|---:|---:|\n",
    );
    for mode in &MODES {
        let b: Vec<(&Run, &AgentRun)> = runs
            .iter()
            .filter(|r| r.mode == mode.id)
            .filter_map(|r| Some((r, r.agent.as_ref()?)))
            .collect();
        let made: u64 = b.iter().map(|(r, _)| r.storm.attempts).sum();
        let total: f64 = b.iter().map(|(_, t)| t.cpu_s - t.cpu_before_storm_s).sum();
        if made == 0 || total <= 0.0 {
            continue;
        }
        let mut by_name: Vec<(&str, f64)> = Vec::new();
        for (name, s) in b.iter().flat_map(|(_, t)| t.threads.iter()) {
            match by_name.iter_mut().find(|(n, _)| n == name) {
                Some((_, sum)) => *sum += s,
                None => by_name.push((name, *s)),
            }
        }
        let named: f64 = by_name.iter().map(|(_, s)| s).sum();
        by_name.push(("other", (total - named).max(0.0)));
        // Process and thread times are read at slightly different moments, a tick apart at
        // worst: the threads may add up to a little more than the process.
        let total = total.max(named);
        for (name, s) in by_name {
            let _ = writeln!(
                out,
                "| {} | `{name}` | {:.2} | {:.0} % |",
                mode.id,
                s * 1e6 / made as f64,
                100.0 * s / total,
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
    for b in runs.iter().filter(|r| r.agent.is_some()) {
        let mode = Mode::by_id(b.mode);
        let a = runs
            .iter()
            .find(|r| r.mode == b.mode && r.pair == b.pair && r.is_baseline());
        let t = b.agent.as_ref().expect("traced run");
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
        .filter(|b| b.agent.is_some())
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
        let e = exactness(Mode::by_id(r.mode), r)?;
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
                match (&r.agent, &r.peer) {
                    (Some(_), _) => "B",
                    (None, Some(p)) => p.peer.name,
                    (None, None) => "A",
                },
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

pub(crate) fn document(
    args: &Args,
    command: &str,
    date: &str,
    runs: &[Run],
    discarded: &[(Run, Run)],
) -> String {
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
        if args.synspan_args().is_empty() {
            String::new()
        } else {
            format!(
                "; added to every synspan run: `{}`",
                args.synspan_args().join(" ")
            )
        },
        args.pairs,
        args.seconds,
        args.count,
        args.threads,
        table(&summaries),
        targets(&summaries, runs),
    );
    let peers = summarize_peers(runs);
    if !peers.is_empty() {
        let _ = write!(
            doc,
            "## Peers on the same storms\n\n\
             The tools an engineer would run instead, in the same pairs as synspan (after its B run, on \
             the same storm) and against the same baselines. The bpftrace scripts are in `testbed/peers/`. \
             The tool's CPU is its own process's while the storm ran (what it does in user space); its \
             programs run inside the storm's threads, in the storm's CPU.\n\n{}\n{}\n",
            peer_table(&summaries, &peers),
            peer_targets(&summaries, &peers, runs)
        );
    }
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
    let _ = write!(
        doc,
        "synspan's own CPU by thread, from the storm's start until the export had drained, summed over \
         the synspan runs of each mode and divided by their attempts. `synspan` is the main thread: it \
         reads the ring buffer, decodes records, encodes spans and drives the OTLP export and the signals; \
         `synspan-enrich` names processes and stacks; `synspan-evidenc` (the kernel keeps 15 characters \
         of a thread's name) and `synspan-netns` make the conntrack and listener lookups of retried \
         attempts. CPU time comes in clock ticks of 10 ms, so a share below a few ticks is noise.\n\n{}\n",
        thread_table(runs)
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
         4096); `refused` to a port that is bound but not listening. `success-with-drops` (modes 8 and 9) is \
         `success` while one more thread sends {} UDP datagrams a second to a closed port of 127.0.0.1, \
         each one a packet the kernel drops that belongs to no attempt. Client sockets use SO_LINGER {{1, 0}}: \
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
        thousands(bench::UNRELATED_DROPS_PER_SECOND as f64),
        QUIET.as_secs_f64(),
        CALM_LIMIT.as_secs(),
        args.retries,
    );
    doc
}

/// Where a report's written part starts: comparisons with other revisions, measured by their
/// own benchmark in the same session, which this run cannot reproduce.
pub(crate) const WRITTEN_PART: &str =
    "<!-- Written, not generated: kept as it is when synspan-bench writes this file again. -->";

/// The new report, followed by the written part of the one it replaces, if that has one.
pub(crate) fn keep_written_part(mut doc: String, previous: Option<&str>) -> String {
    if let Some(kept) = previous.and_then(|p| Some(&p[p.find(WRITTEN_PART)?..])) {
        doc.push('\n');
        doc.push_str(kept);
    }
    doc
}

/// `2026-12-01 21:40 UTC`.
pub(crate) fn utc_now() -> String {
    let stamp = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    // 2026-12-01T21:40:31Z
    format!("{} {} UTC", &stamp[..10], &stamp[11..16])
}

#[cfg(test)]
mod tests {
    use synspan_testbed::bench::StormReport;

    use super::*;
    use crate::{
        peers::Peer,
        runner::{AgentRun, PeerRun},
    };

    fn run(mode: usize, per_second: f64, agent: Option<AgentRun>, peer: Option<&'static str>) -> Run {
        Run {
            mode,
            pair: 1,
            storm: StormReport {
                attempts: 1000,
                per_second,
                ..Default::default()
            },
            storm_cpu_s: 0.0,
            host: Default::default(),
            agent,
            peer: peer.map(|name| PeerRun {
                peer: Peer::by_name(name).unwrap(),
                cpu_storm_s: 0.001,
                hwm_mib: 10.0,
            }),
        }
    }

    #[test]
    fn the_written_part_outlives_a_new_report() {
        let previous = format!("# Benchmarks\n\nold figures\n\n{WRITTEN_PART}\n\n## Against 626e43e\n");
        let doc = keep_written_part("# Benchmarks\n\nnew figures\n".into(), Some(&previous));
        assert_eq!(
            doc,
            format!("# Benchmarks\n\nnew figures\n\n{WRITTEN_PART}\n\n## Against 626e43e\n")
        );
        assert_eq!(keep_written_part("new\n".into(), Some("old\n")), "new\n");
        assert_eq!(keep_written_part("new\n".into(), None), "new\n");
    }

    fn agent(counters: &[(&str, u64)]) -> Option<AgentRun> {
        Some(AgentRun {
            accounting: counters.iter().map(|&(k, v)| (k.to_string(), v)).collect(),
            ..Default::default()
        })
    }

    #[test]
    fn a_peer_target_needs_the_ratio_and_no_drops_under_the_named_reasons() {
        let runs = [
            run(3, 100.0, None, None),
            run(3, 85.0, agent(&[("export_queue_full", 5)]), None),
            run(3, 80.0, None, Some("bpftrace-seed")),
            run(1, 100.0, None, None),
            run(1, 70.0, agent(&[]), None),
            run(1, 75.0, None, Some("bpftrace-seed")),
        ];
        let summaries = summarize(&runs);
        let peers = summarize_peers(&runs);
        assert_eq!(peers.len(), 2);
        assert!(
            (peers[0].ratio - 0.75).abs() < 1e-9,
            "mode 1's peer against mode 1's baseline"
        );
        let text = peer_targets(&summaries, &peers, &runs);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines[0].starts_with("- mode 1") && lines[0].contains("**missed** by 0.05"),
            "{text}"
        );
        assert!(
            lines[1].starts_with("- mode 3") && lines[1].contains("**missed**: export_queue_full = 5"),
            "{text}"
        );
        let table = peer_table(&summaries, &peers);
        assert!(
            table.contains("| refused | bpftrace, the incident script's"),
            "{table}"
        );
    }
}
