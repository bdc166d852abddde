//! A storm of TCP connect attempts on loopback, the load of synspan's benchmark.
//!
//! ```text
//! synspan-storm success|success-in-span|success-with-drops|refused [--count N] [--seconds S] [--threads T]
//!               [--accept-threads A] [--port P]
//! ```
//! success   listen on 127.0.0.1 at an ephemeral port (this process, this namespace), accept
//!           and close every connection in `--accept-threads` threads (default 1), and
//!           connect to it
//! success-in-span  the same, each worker first publishing a thread-context record
//!           (OTEP 4947, the variable in this executable) that stays set for the storm:
//!           what the agent reads per attempt when the application is traced
//! success-with-drops  the same as success, while one more thread sends UDP datagrams to
//!           a closed port of 127.0.0.1 (20 000 a second, paced, for as long as the
//!           connects run): a steady stream of packets the kernel drops that belong to no
//!           attempt, what the drop-reason program meets on a busy host
//! refused   connect to a port of 127.0.0.1 that is bound but not listening: every attempt
//!           is refused with a RST
//! --count   stop after N attempts in all (default 1000000)
//! --seconds stop after S seconds (default 5), whichever comes first
//! --threads worker threads, each a loop of blocking socket, connect, close (default 2)
//! --port    the port of 127.0.0.1 to listen on or hold (default: an ephemeral one), so that
//!           an agent can be told to trace only the storm (`--dest-port`)
//!
//! Prints one JSON line at the end (see `synspan_testbed::bench::StormReport`):
//! `{"mode","attempts","ok","failed","seconds","per_second","threads","errors"}`.
//! Run it inside a network namespace of its own: it only ever talks to 127.0.0.1.
//!
//! Ports. A client that closes a connection first keeps its side in TIME_WAIT for 60 s,
//! holding the source port: tens of thousands of connects a second would use up the
//! ephemeral range (28 232 ports by default) within a second or two, and connect() would
//! then fail with EADDRNOTAVAIL (or crawl through the port search). So every client socket
//! sets SO_LINGER {on, 0}: close() sends a RST and frees the port at once, with no TIME_WAIT
//! on either side (the server's socket, reset, goes straight to CLOSE). The SYN_SENT part
//! that synspan traces is unchanged: SYN, SYN-ACK, ACK, then the socket is ESTABLISHED.
//! Refused attempts never reach TIME_WAIT anyway. `tcp_tw_reuse` would not be enough: it
//! only reuses a TIME_WAIT port one second after it was last used, and the storm cycles
//! through the whole range faster than that. An attempt that fails all the same is counted
//! under its errno in `errors`, never hidden.

use std::{
    collections::BTreeMap,
    io,
    net::SocketAddr,
    os::fd::AsRawFd,
    sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use synspan_testbed::{
    bench::{self, StormReport},
    sockaddr::{accept_and_close, bound_loopback, setsockopt, tcp_socket, to_raw},
    traced::Record,
};

unsafe extern "C" {
    /// From `thread_context.c`, linked into this binary by build.rs.
    fn synspan_testbed_publish(record: *const std::ffi::c_void);
}

struct Args {
    mode: String,
    count: u64,
    seconds: f64,
    threads: u32,
    accept_threads: u32,
    port: u16,
}

const USAGE: &str = "usage: synspan-storm success|success-in-span|success-with-drops|refused [--count N] [--seconds S] \
                     [--threads T] [--accept-threads A] [--port P]";

/// A blocking connect gives up after this long (SO_SNDTIMEO), so that a lost SYN cannot hold
/// a worker past `--seconds` by more than this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

fn parse_args() -> anyhow::Result<Args> {
    let mut args = std::env::args().skip(1);
    let mut parsed = Args {
        mode: String::new(),
        count: 1_000_000,
        seconds: 5.0,
        threads: 2,
        accept_threads: 1,
        port: 0,
    };
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .with_context(|| format!("{name} needs a value; {USAGE}"))
        };
        match arg.as_str() {
            "--count" => parsed.count = value("--count")?.parse().context("--count N")?,
            "--seconds" => parsed.seconds = value("--seconds")?.parse().context("--seconds S")?,
            "--threads" => parsed.threads = value("--threads")?.parse().context("--threads T")?,
            "--accept-threads" => {
                parsed.accept_threads = value("--accept-threads")?.parse().context("--accept-threads A")?
            }
            "--port" => parsed.port = value("--port")?.parse().context("--port P")?,
            "--mode" => parsed.mode = value("--mode")?,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other if parsed.mode.is_empty() && !other.starts_with('-') => parsed.mode = other.to_string(),
            other => bail!("unexpected argument {other}; {USAGE}"),
        }
    }
    if ![
        bench::SUCCESS,
        bench::SUCCESS_IN_SPAN,
        bench::SUCCESS_WITH_DROPS,
        bench::REFUSED,
    ]
    .contains(&parsed.mode.as_str())
    {
        bail!("mode must be `success`, `success-in-span`, `success-with-drops` or `refused`; {USAGE}");
    }
    if !(parsed.seconds > 0.0 && parsed.seconds <= 3600.0) {
        bail!("--seconds must be more than 0 and at most 3600");
    }
    if parsed.threads == 0 || parsed.threads > 256 || parsed.accept_threads == 0 || parsed.accept_threads > 64
    {
        bail!("--threads must be 1..=256 and --accept-threads 1..=64");
    }
    Ok(parsed)
}

/// One attempt: `Ok(errno)` with 0 for a connection, `Err` when no attempt could be made.
fn attempt(target: &(libc::sockaddr_storage, libc::socklen_t)) -> io::Result<i32> {
    let fd = tcp_socket()?;
    // close() sends a RST: no TIME_WAIT, the source port is free again at once (see above).
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    setsockopt(&fd, libc::SOL_SOCKET, libc::SO_LINGER, &linger)?;
    let timeout = libc::timeval {
        tv_sec: CONNECT_TIMEOUT.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    setsockopt(&fd, libc::SOL_SOCKET, libc::SO_SNDTIMEO, &timeout)?;
    // SAFETY: target is a valid sockaddr of the given length.
    let ret = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&target.0 as *const libc::sockaddr_storage).cast(),
            target.1,
        )
    };
    let errno = if ret < 0 {
        io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    } else {
        0
    };
    drop(fd);
    Ok(errno)
}

#[derive(Default)]
struct Tally {
    attempts: u64,
    ok: u64,
    failed: u64,
    errors: BTreeMap<String, u64>,
}

fn worker(
    target: SocketAddr,
    expect: i32,
    claimed: &AtomicU64,
    count: u64,
    deadline: Instant,
) -> io::Result<Tally> {
    let target = to_raw(target);
    let mut tally = Tally::default();
    // Bounded twice: by the shared count and by the deadline.
    while Instant::now() < deadline && claimed.fetch_add(1, Relaxed) < count {
        let errno = attempt(&target)?;
        tally.attempts += 1;
        if errno == expect {
            tally.ok += 1;
        } else {
            tally.failed += 1;
            *tally.errors.entry(bench::errno_name(errno)).or_default() += 1;
        }
    }
    Ok(tally)
}

/// Port 9 (discard) of 127.0.0.1: nothing listens on it in the storm's own namespace, so
/// every datagram is dropped by the kernel with NO_SOCKET (and answered with an ICMP port
/// unreachable, rate-limited by the kernel).
const CLOSED_UDP_PORT: u16 = 9;

/// Datagrams per pacing slot: the sender sends a batch, then sleeps to the next slot.
const DROP_BATCH: u64 = 200;

/// Sends datagrams to a closed port at [`bench::UNRELATED_DROPS_PER_SECOND`] until `stop`;
/// returns how many were sent.
fn unrelated_drops(stop: &AtomicBool, deadline: Instant) -> io::Result<u64> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let target = SocketAddr::from(([127, 0, 0, 1], CLOSED_UDP_PORT));
    let slot = Duration::from_secs_f64(DROP_BATCH as f64 / bench::UNRELATED_DROPS_PER_SECOND as f64);
    let started = Instant::now();
    let mut sent = 0u64;
    // Bounded by the storm's deadline even if the workers never stop.
    while !stop.load(Relaxed) && Instant::now() < deadline {
        for _ in 0..DROP_BATCH {
            // An unconnected socket without IP_RECVERR is told nothing of the ICMP answers.
            socket.send_to(b"x", target)?;
            sent += 1;
        }
        let next = started + slot.mul_f64((sent / DROP_BATCH + 1) as f64);
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    Ok(sent)
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let in_span = args.mode == bench::SUCCESS_IN_SPAN;
    let with_drops = args.mode == bench::SUCCESS_WITH_DROPS;
    let success = args.mode == bench::SUCCESS || in_span || with_drops;
    // Success: a listener with a deep backlog, so that no SYN is dropped for a full queue
    // (that would show up as 1 s SYN retransmits). Refused: a port held bound but not
    // listening, so that nothing else can start listening on it during the storm.
    let (holder, target) =
        bound_loopback(args.port, success.then_some(4096)).context("binding on 127.0.0.1")?;
    let expect = if success { 0 } else { libc::ECONNREFUSED };
    let stop = AtomicBool::new(false);
    let claimed = AtomicU64::new(0);
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.seconds);
    let (tallies, seconds, dropped) = std::thread::scope(|scope| {
        let dropper = with_drops.then(|| scope.spawn(|| unrelated_drops(&stop, deadline)));
        let acceptors: Vec<_> = if success {
            (0..args.accept_threads)
                .map(|_| scope.spawn(|| accept_and_close(&holder, &stop)))
                .collect()
        } else {
            Vec::new()
        };
        let workers: Vec<_> = (0..args.threads)
            .map(|i| {
                let claimed = &claimed;
                scope.spawn(move || {
                    let record =
                        Record::new([0x5a; 16], (u64::from(i) + 1).to_be_bytes(), 1, &[(0, "/storm")]);
                    if in_span {
                        // SAFETY: the record lives until the worker is done.
                        unsafe { synspan_testbed_publish(record.as_ptr()) };
                    }
                    worker(target, expect, claimed, args.count, deadline)
                })
            })
            .collect();
        let tallies: Vec<io::Result<Tally>> = workers
            .into_iter()
            .map(|w| w.join().expect("worker panicked"))
            .collect();
        let seconds = started.elapsed().as_secs_f64();
        stop.store(true, Relaxed);
        // Wakes the acceptors: accept() on a listener that is shut down fails.
        // SAFETY: plain syscall on a listener this storm owns.
        unsafe { libc::shutdown(holder.as_raw_fd(), libc::SHUT_RDWR) };
        for a in acceptors {
            let _ = a.join();
        }
        let dropped = dropper.map(|d| d.join().expect("drop sender panicked"));
        (tallies, seconds, dropped)
    });
    let mut report = StormReport {
        mode: args.mode.clone(),
        seconds,
        threads: args.threads,
        ..Default::default()
    };
    if let Some(dropped) = dropped {
        report.unrelated_drops = dropped.context("sending the unrelated drops")?;
    }
    for tally in tallies {
        let tally = tally.context("a worker could not make an attempt")?;
        report.attempts += tally.attempts;
        report.ok += tally.ok;
        report.failed += tally.failed;
        for (name, n) in tally.errors {
            *report.errors.entry(name).or_default() += n;
        }
    }
    report.per_second = if seconds > 0.0 {
        report.attempts as f64 / seconds
    } else {
        0.0
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
