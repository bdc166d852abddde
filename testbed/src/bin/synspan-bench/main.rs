//! synspan's overhead benchmark: connects per second with and without synspan, what synspan
//! costs (CPU, peak RSS), and whether every attempt is accounted for. `--help` lists the
//! flags; `scripts/bench.sh` builds everything and runs it.
//!
//! Everything happens inside one network namespace that the benchmark creates and removes:
//! this process enters it (setns, so that the children keep the host's mounts, tracefs
//! included), then starts the OTLP receiver (`synspan-otlp-sink`) and, run after run, the
//! load generator `synspan-storm` and synspan. Only 127.0.0.1 of that namespace ever sees a
//! packet.
//!
//! Each pair is an A run (no synspan) followed by a B run (synspan started, ready, then the
//! same storm). After a B run the benchmark waits until the receiver stops receiving,
//! reads synspan's CPU time and peak RSS from /proc, sends SIGTERM, waits for exit status
//! 0, and reads the final accounting from synspan's JSON accounting line.
//!
//! The host is shared: a pair during which another synspan ran (its programs slow every
//! connect down) or other processes used more than a tenth of a CPU is run again, up to
//! `--retries` times; the discarded pairs are listed in the report.

mod args;
mod checks;
mod inside;
mod measure;
mod mode;
mod peers;
mod report;
mod runner;
mod summary;

use std::{
    fs,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::Duration,
};

use anyhow::{Context, bail};
use clap::Parser;
use synspan_testbed::{netns::Netns, otlp_sink::OtlpSink, workspace_bin};

use crate::{
    args::Args,
    inside::Inside,
    measure::BpfStats,
    mode::Mode,
    runner::{Bench, Run},
    summary::summarize,
};

// Ctrl-C stops the benchmark between steps, and everything is still cleaned up.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

pub(crate) fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

fn check_interrupted() -> anyhow::Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// The command line the report names: `scripts/bench.sh` passes its own.
fn command_line() -> String {
    std::env::var("SYNSPAN_BENCH_COMMAND").unwrap_or_else(|_| {
        let argv: Vec<String> = std::env::args().skip(1).collect();
        let words = std::iter::once("target/release/synspan-bench").chain(argv.iter().map(String::as_str));
        shlex::try_join(words).unwrap_or_else(|_| "target/release/synspan-bench".into())
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    // SAFETY: plain syscall without arguments.
    if unsafe { libc::geteuid() } != 0 {
        bail!("synspan-bench needs root: it creates a network namespace and runs synspan");
    }
    for bin in ["synspan", "synspan-storm"] {
        workspace_bin(bin);
    }
    for peer in args.peers() {
        peer.check_installed()?;
    }
    let command = command_line();
    let date = report::utc_now();
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
    let result = run_pairs(&bench, &mut runs, &mut discarded);
    drop(sink);
    drop(inside);
    drop(ns);
    result?;

    let doc = report::document(&args, &command, &date, &runs, &discarded);
    let summaries = summarize(&runs);
    println!("{}", report::table(&summaries));
    println!("{}", report::targets(&summaries, &runs));
    let peers = summary::summarize_peers(&runs);
    if !peers.is_empty() {
        println!("{}", report::peer_table(&summaries, &peers));
        println!("{}", report::peer_targets(&summaries, &peers, &runs));
    }
    println!("{}", report::cost_table(&summaries, args.bpf_stats));
    if let Some(out) = args.report_path() {
        let previous = fs::read_to_string(&out).ok();
        let doc = report::keep_written_part(doc, previous.as_deref());
        fs::write(&out, &doc).with_context(|| format!("writing {}", out.display()))?;
        eprintln!("synspan-bench: wrote {}", out.display());
    }
    if runs.iter().filter_map(|r| r.agent.as_ref()).any(|t| !t.exit_ok) {
        bail!("synspan did not exit 0 in every run");
    }
    Ok(())
}

/// Every pair of every mode asked for; a disturbed pair goes to `discarded` and runs again
/// while retries are left.
fn run_pairs(bench: &Bench, runs: &mut Vec<Run>, discarded: &mut Vec<(Run, Run)>) -> anyhow::Result<()> {
    let args = bench.args;
    for &id in &args.modes {
        let mode = Mode::by_id(usize::from(id));
        for pair in 1..=args.pairs {
            for attempt in 0..=args.retries {
                check_interrupted()?;
                measure::wait_calm();
                let a = bench.baseline(mode, pair)?;
                eprintln!(
                    "synspan-bench: mode {id} pair {pair} A: {:.0} conn/s ({} attempts, {} failed; \
                     others {:.2} CPU s)",
                    a.storm.per_second, a.storm.attempts, a.storm.failed, a.host.others_cpu_s
                );
                thread::sleep(Duration::from_millis(500));
                check_interrupted()?;
                let b = bench.traced(mode, pair)?;
                let t = b.agent.as_ref().expect("a traced run has its agent");
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
                if args.peers_run_in(mode) {
                    for peer in args.peers() {
                        check_interrupted()?;
                        let p = bench.peer(mode, pair, peer)?;
                        let cost = p.peer.as_ref().expect("a peer's run has its peer");
                        eprintln!(
                            "synspan-bench: mode {id} pair {pair} {}: {:.0} conn/s ({} attempts; others {:.2} \
                             CPU s); cpu={:.2}s hwm={:.1}MiB",
                            peer.name,
                            p.storm.per_second,
                            p.storm.attempts,
                            p.host.others_cpu_s,
                            cost.cpu_storm_s,
                            cost.hwm_mib
                        );
                        thread::sleep(Duration::from_millis(500));
                        runs.push(p);
                    }
                }
                break;
            }
        }
    }
    // A run cut short by Ctrl-C (its drain not waited for) must not make the report.
    check_interrupted()
}
