//! Process churn: many short-lived processes, each making one or two TCP connect attempts on
//! loopback and exiting at once. The load of synspan's churn soak.
//!
//! ```text
//! synspan-churn --netns NAME --processes N [--parallel P] [--refused-port R] [--listen-port L]
//!               [--rate R] [--service-every K] [--cgroup-every K --cgroup DIR...]
//! ```
//! --netns         the network namespace (`ip netns add NAME`) to enter before anything else;
//!                 entered with setns, so that the host's mounts (the cgroup v2 tree) stay
//! --processes     how many clients to start in all
//! --parallel      how many run at once (default 32)
//! --rate          start at most R clients a second (default 0: as fast as they finish), so
//!                 that a soak's load is the same on a quiet host and a busy one
//! --refused-port  a port of 127.0.0.1 held bound, not listening: refused (default 23471)
//! --listen-port   a port of 127.0.0.1 listened on and accepted: established (default 23472)
//! --service-every every Kth client gets `OTEL_SERVICE_NAME=churn-K` (default 3, 0: none)
//! --cgroup-every  every Kth client joins one of the `--cgroup` directories before it runs
//!
//! Client i makes, by `i % 3`: a refused and an established attempt; a refused one; an
//! established one. Each client is this binary again (`--client PORT:EXPECT...`), exec'd, and
//! exits with status 0 when each attempt ended as expected.
//!
//! Prints one JSON line when every client has exited (see `synspan_testbed::churn`): the
//! totals and, for each client, its pid, attempts, service name and cgroup. Bounded by
//! `--processes` and by `DEADLINE`.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    os::fd::AsRawFd,
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicBool, Ordering::Relaxed},
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use synspan_testbed::{
    cgroup::join_before_exec,
    churn::{ChurnReport, Client},
    sockaddr::{accept_and_close, bound_loopback, check, setsockopt, tcp_socket, to_raw},
};

/// The whole churn gives up after this long: clients still running are waited for, no new
/// one starts.
const DEADLINE: Duration = Duration::from_secs(300);

struct Args {
    netns: String,
    processes: u32,
    parallel: u32,
    rate: u32,
    refused_port: u16,
    listen_port: u16,
    service_every: u32,
    cgroup_every: u32,
    cgroups: Vec<PathBuf>,
}

const USAGE: &str = "usage: synspan-churn --netns NAME --processes N [--parallel P] [--rate R] \
                     [--refused-port R] [--listen-port L] [--service-every K] \
                     [--cgroup-every K --cgroup DIR...]";

fn parse_args(mut args: impl Iterator<Item = String>) -> anyhow::Result<Args> {
    let mut parsed = Args {
        netns: String::new(),
        processes: 0,
        parallel: 32,
        rate: 0,
        refused_port: 23471,
        listen_port: 23472,
        service_every: 3,
        cgroup_every: 0,
        cgroups: Vec::new(),
    };
    while let Some(arg) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{arg} needs a value; {USAGE}"))?;
        let number = |what| format!("{arg}: {what}; {USAGE}");
        match arg.as_str() {
            "--netns" => parsed.netns = value,
            "--processes" => parsed.processes = value.parse().with_context(|| number("a count"))?,
            "--parallel" => parsed.parallel = value.parse().with_context(|| number("a count"))?,
            "--rate" => parsed.rate = value.parse().with_context(|| number("a count"))?,
            "--refused-port" => parsed.refused_port = value.parse().with_context(|| number("a port"))?,
            "--listen-port" => parsed.listen_port = value.parse().with_context(|| number("a port"))?,
            "--service-every" => parsed.service_every = value.parse().with_context(|| number("a count"))?,
            "--cgroup-every" => parsed.cgroup_every = value.parse().with_context(|| number("a count"))?,
            "--cgroup" => parsed.cgroups.push(value.into()),
            other => bail!("unexpected argument {other}; {USAGE}"),
        }
    }
    ensure!(!parsed.netns.is_empty(), "--netns is required; {USAGE}");
    ensure!(
        (1..=1_000_000).contains(&parsed.processes),
        "--processes must be 1..=1000000"
    );
    ensure!((1..=512).contains(&parsed.parallel), "--parallel must be 1..=512");
    ensure!(
        parsed.cgroup_every == 0 || !parsed.cgroups.is_empty(),
        "--cgroup-every needs at least one --cgroup"
    );
    ensure!(
        parsed.refused_port != parsed.listen_port,
        "--refused-port and --listen-port must differ"
    );
    Ok(parsed)
}

fn enter_netns(name: &str) -> anyhow::Result<()> {
    let path = format!("/run/netns/{name}");
    let ns = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    // SAFETY: plain syscall on a descriptor we hold; the process has one thread here.
    check(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) })
        .with_context(|| format!("entering {path}"))?;
    Ok(())
}

/// The client: one blocking attempt per `PORT:EXPECT` (`refused` or `established`); exit
/// status 0 when each ended so.
fn client(targets: impl Iterator<Item = String>) -> anyhow::Result<()> {
    for target in targets {
        let (port, expect) = target.split_once(':').context("PORT:EXPECT")?;
        let port: u16 = port.parse().context("PORT")?;
        let fd = tcp_socket()?;
        // close() sends a RST: no TIME_WAIT to hold the port of an established attempt.
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        setsockopt(&fd, libc::SOL_SOCKET, libc::SO_LINGER, &linger)?;
        let (raw, len) = to_raw(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port));
        // SAFETY: raw/len describe a valid sockaddr_in.
        let ret = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&raw as *const libc::sockaddr_storage).cast(),
                len,
            )
        };
        let errno = if ret < 0 {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
        } else {
            0
        };
        let expected = if expect == "refused" {
            libc::ECONNREFUSED
        } else {
            0
        };
        ensure!(
            errno == expected,
            "127.0.0.1:{port}: errno {errno}, expected {expected}"
        );
    }
    Ok(())
}

/// A client's command: its attempts, its service name, its cgroup.
fn command(args: &Args, exe: &std::path::Path, i: u32, client: &mut Client) -> anyhow::Result<Command> {
    let refused = format!("{}:refused", args.refused_port);
    let established = format!("{}:established", args.listen_port);
    let targets = match i % 3 {
        0 => vec![refused, established],
        1 => vec![refused],
        _ => vec![established],
    };
    client.attempts = targets.len() as u32;
    let mut cmd = Command::new(exe);
    cmd.arg("--client").args(targets);
    cmd.stdin(std::process::Stdio::null());
    if args.service_every > 0 && i.is_multiple_of(args.service_every) {
        let name = format!("churn-{}", i % 7);
        cmd.env("OTEL_SERVICE_NAME", &name);
        client.service = Some(name);
    }
    if args.cgroup_every > 0 && i.is_multiple_of(args.cgroup_every) {
        let dir = &args.cgroups[(i / args.cgroup_every) as usize % args.cgroups.len()];
        client.cgroup = Some(dir.clone());
        join_before_exec(&mut cmd, &dir.join("cgroup.procs"))?;
    }
    Ok(cmd)
}

/// Reaps one child; returns its pid and whether it exited 0.
fn reap_one() -> anyhow::Result<(i32, bool)> {
    let mut status = 0;
    // SAFETY: plain syscall writing into a local.
    let pid = check(unsafe { libc::waitpid(-1, &mut status, 0) })?;
    Ok((pid, libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0))
}

fn churn(args: &Args) -> anyhow::Result<ChurnReport> {
    let (_refused, _) = bound_loopback(args.refused_port, None)
        .with_context(|| format!("binding 127.0.0.1:{}", args.refused_port))?;
    let (listener, _) = bound_loopback(args.listen_port, Some(4096))
        .with_context(|| format!("binding 127.0.0.1:{}", args.listen_port))?;
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let deadline = started + DEADLINE;
    let mut report = ChurnReport::default();
    let exe = std::env::current_exe().context("this binary's path")?;
    std::thread::scope(|scope| -> anyhow::Result<()> {
        scope.spawn(|| accept_and_close(&listener, &stop));
        let mut running: HashMap<i32, Client> = HashMap::new();
        let result = (|| -> anyhow::Result<()> {
            for i in 0..args.processes {
                if Instant::now() >= deadline {
                    break;
                }
                if args.rate > 0 {
                    let due = started + Duration::from_secs_f64(f64::from(i) / f64::from(args.rate));
                    std::thread::sleep(due.saturating_duration_since(Instant::now()));
                }
                while running.len() >= args.parallel as usize {
                    let (pid, ok) = reap_one()?;
                    report.finish(running.remove(&pid), ok);
                }
                let mut client = Client::default();
                let child = command(args, &exe, i, &mut client)?
                    .spawn()
                    .context("starting a client")?;
                client.pid = child.id();
                // Reaped with waitpid below; std's Child neither waits nor kills on drop.
                drop(child);
                running.insert(client.pid as i32, client);
            }
            Ok(())
        })();
        while !running.is_empty() {
            let (pid, ok) = reap_one()?;
            report.finish(running.remove(&pid), ok);
        }
        report.seconds = started.elapsed().as_secs_f64();
        stop.store(true, Relaxed);
        // Wakes the acceptor: accept() on a listener that is shut down fails.
        // SAFETY: plain syscall on a listener this process owns.
        unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR) };
        result
    })?;
    Ok(report)
}

fn main() -> anyhow::Result<()> {
    let mut argv = std::env::args().skip(1).peekable();
    if argv.peek().map(String::as_str) == Some("--client") {
        argv.next();
        return client(argv);
    }
    let args = parse_args(argv)?;
    enter_netns(&args.netns)?;
    let report = churn(&args)?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
