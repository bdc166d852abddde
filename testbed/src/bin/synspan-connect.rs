//! One TCP connect attempt, reported as one JSON line on stdout: the client side of
//! synspan's tests and benchmarks.
//!
//! ```text
//! synspan-connect ADDR:PORT [--bind-port P] [--close-after MS] [--listen-first] [--hold]
//!                 [--count N] [--parallel N]
//! ```
//! --listen-first  listen on ADDR at an ephemeral port first and connect to it (a success)
//! --close-after   close the socket if the attempt has not ended after MS milliseconds
//! --hold          print the report, then sleep until killed (tests that kill the client)
//! --count N       N attempts one after another, one report line each
//! --parallel N    N threads, each making its attempts at the same moment
//! --process-context K=V,…           publish this resource as an OpenTelemetry process
//!                                   context (OTEP 4719) before the first attempt
//! --process-context-update K=V,…    replace it after the first attempt
//! --interval MS                     wait this long between attempts (with --count)
//! --process-context-malformed HOW   publish it broken: signature, huge-payload, truncated,
//!                                   never-settled
//!
//! The connect is non-blocking so that the local port can be read right after the kernel
//! chose it: once an attempt fails, the kernel releases the port and getsockname says 0.

use std::{
    io::{self, Write},
    mem::size_of,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Instant,
};

use anyhow::{Context, bail};
use synspan_testbed::{
    process_context::{Malformed, Published, parse_pairs},
    sockaddr::{check, local_addr, to_raw},
};

struct Args {
    target: SocketAddr,
    bind_port: Option<u16>,
    close_after_ms: Option<i32>,
    listen_first: bool,
    hold: bool,
    count: u32,
    parallel: u32,
    process_context: Option<Vec<(String, String)>>,
    process_context_update: Option<Vec<(String, String)>>,
    process_context_malformed: Option<Malformed>,
    interval_ms: u64,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = std::env::args().skip(1);
    let mut target = None;
    let mut parsed = Args {
        target: "127.0.0.1:0".parse()?,
        bind_port: None,
        close_after_ms: None,
        listen_first: false,
        hold: false,
        count: 1,
        parallel: 1,
        process_context: None,
        process_context_update: None,
        process_context_malformed: None,
        interval_ms: 0,
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--bind-port" => parsed.bind_port = Some(args.next().context("--bind-port P")?.parse()?),
            "--close-after" => {
                parsed.close_after_ms = Some(args.next().context("--close-after MS")?.parse()?)
            }
            "--listen-first" => parsed.listen_first = true,
            "--hold" => parsed.hold = true,
            "--count" => parsed.count = args.next().context("--count N")?.parse()?,
            "--parallel" => parsed.parallel = args.next().context("--parallel N")?.parse()?,
            "--process-context" => {
                let pairs = args.next().context("--process-context K=V,…")?;
                parsed.process_context = Some(parse_pairs(&pairs).map_err(anyhow::Error::msg)?);
            }
            "--process-context-update" => {
                let pairs = args.next().context("--process-context-update K=V,…")?;
                parsed.process_context_update = Some(parse_pairs(&pairs).map_err(anyhow::Error::msg)?);
            }
            "--interval" => parsed.interval_ms = args.next().context("--interval MS")?.parse()?,
            "--process-context-malformed" => {
                let how = args.next().context("--process-context-malformed HOW")?;
                parsed.process_context_malformed = Some(how.parse().map_err(anyhow::Error::msg)?);
            }
            other if target.is_none() => target = Some(other.parse::<SocketAddr>().context("ADDR:PORT")?),
            other => bail!("unexpected argument {other}"),
        }
    }
    parsed.target = target.context(
        "usage: synspan-connect ADDR:PORT [--bind-port P] [--close-after MS] [--listen-first] [--hold]",
    )?;
    Ok(parsed)
}

fn socket(ip: IpAddr) -> io::Result<OwnedFd> {
    let family = if ip.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain syscalls; the fd is owned right away.
    let fd = check(unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: the fd was just returned by socket() and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn bind(fd: &OwnedFd, addr: SocketAddr) -> io::Result<()> {
    let one: libc::c_int = 1;
    let (raw, len) = to_raw(addr);
    // SAFETY: plain syscalls on an fd we own, with pointers to locals that outlive them.
    unsafe {
        check(libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as u32,
        ))?;
        check(libc::bind(
            fd.as_raw_fd(),
            (&raw as *const libc::sockaddr_storage).cast(),
            len,
        ))?;
    }
    Ok(())
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: plain syscalls on an fd we own.
    let flags = check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    // SAFETY: as above.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
    Ok(())
}

fn so_error(fd: &OwnedFd) -> io::Result<i32> {
    let mut err: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: err and len describe a buffer of the size SO_ERROR writes.
    check(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    Ok(err)
}

#[inline(never)]
fn main() -> anyhow::Result<()> {
    let mut args = parse_args()?;
    let _listener = if args.listen_first {
        let listener = socket(args.target.ip())?;
        bind(&listener, SocketAddr::new(args.target.ip(), 0))?;
        // SAFETY: plain syscall on an fd we own.
        check(unsafe { libc::listen(listener.as_raw_fd(), 16) })?;
        args.target = local_addr(&listener)?;
        Some(listener)
    } else {
        None
    };
    let published = match (&args.process_context, args.process_context_malformed) {
        (Some(resource), None) => Some(Published::publish(resource)?),
        (Some(resource), Some(how)) => Some(Published::publish_malformed(resource, how)?),
        (None, Some(_)) => bail!("--process-context-malformed needs --process-context"),
        (None, None) => None,
    };
    let published = std::sync::Mutex::new(published);
    let barrier = std::sync::Barrier::new(args.parallel as usize);
    let reports: Vec<String> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..args.parallel)
            .map(|_| {
                scope.spawn(|| -> anyhow::Result<Vec<String>> {
                    barrier.wait();
                    (0..args.count)
                        .map(|i| {
                            if i > 0 {
                                std::thread::sleep(std::time::Duration::from_millis(args.interval_ms));
                            }
                            if i == 1
                                && let Some(resource) = &args.process_context_update
                                && let Some(published) = published.lock().unwrap().as_mut()
                            {
                                published.update(resource);
                            }
                            synspan_testbed_connect_attempt(&args).map(|r| r.to_string())
                        })
                        .collect()
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("attempt thread panicked"))
            .collect::<anyhow::Result<Vec<_>>>()
            .map(|v| v.concat())
    })?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for report in reports {
        writeln!(out, "{report}")?;
    }
    out.flush()?;
    drop(out);
    if args.hold {
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
    Ok(())
}

/// libc's connect() keeps no frame pointer, so a frame-pointer walk from inside it skips its
/// immediate caller: this is that caller, and the function below it is the one that shows.
#[inline(never)]
fn start_connect(fd: &OwnedFd, raw: &libc::sockaddr_storage, len: libc::socklen_t) -> libc::c_int {
    // SAFETY: raw holds len bytes of a socket address; plain syscall on an fd we own.
    let ret = unsafe { libc::connect(fd.as_raw_fd(), (raw as *const libc::sockaddr_storage).cast(), len) };
    // Work after the call keeps it from becoming a tail jump, which would leave no frame.
    std::hint::black_box(ret)
}

/// The function whose name the user stack on the span must show: keep it out of line and
/// give it a name nothing else has.
#[inline(never)]
#[unsafe(no_mangle)]
fn synspan_testbed_connect_attempt(args: &Args) -> anyhow::Result<serde_json::Value> {
    let fd = socket(args.target.ip())?;
    if let Some(port) = args.bind_port {
        let any: IpAddr = if args.target.is_ipv4() {
            [0u8; 4].into()
        } else {
            [0u16; 8].into()
        };
        bind(&fd, SocketAddr::new(any, port))?;
    }
    set_nonblocking(&fd)?;
    let started = Instant::now();
    let (raw, len) = to_raw(args.target);
    let ret = start_connect(&fd, &raw, len);
    let connect_errno = if ret < 0 {
        io::Error::last_os_error().raw_os_error().unwrap_or(0)
    } else {
        0
    };
    let local = local_addr(&fd)?;
    let mut errno = connect_errno;
    let mut closed_by_app = false;
    if connect_errno == libc::EINPROGRESS {
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        let wait_ms = args.close_after_ms.unwrap_or(300_000);
        // SAFETY: one pollfd, a local.
        let ready = check(unsafe { libc::poll(&mut pfd, 1, wait_ms) })?;
        if ready == 0 {
            closed_by_app = true;
            errno = 0;
        } else {
            errno = so_error(&fd)?;
        }
    }
    let elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
    let syn_retransmits = total_retransmits(&fd);
    drop(fd);
    Ok(serde_json::json!({
        "pid": std::process::id(),
        // SAFETY: plain syscall without arguments.
        "tid": unsafe { libc::gettid() },
        "local": local.to_string(),
        "local_port": local.port(),
        "peer": args.target.to_string(),
        "errno": errno,
        "closed_by_app": closed_by_app,
        "elapsed_ms": elapsed_ms,
        "syn_retransmits": syn_retransmits,
    }))
}

/// The segments the kernel retransmitted on the socket (`tcpi_total_retrans`): before the
/// handshake completes, its SYNs. How many fit before a timeout depends on when the
/// retransmit timer ran, so a test compares the span with this rather than with a count it
/// expects.
fn total_retransmits(fd: &OwnedFd) -> Option<u32> {
    // SAFETY: tcp_info is plain old data; zeroed is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, a local of that size.
    let ret = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    (ret == 0).then_some(info.tcpi_total_retrans)
}
