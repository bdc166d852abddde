//! An application with its own OpenTelemetry spans that publishes the active one as thread
//! context (OTEP 4947) and connects inside it: the two `synspan-traced` binaries, which
//! differ only in where the TLS variable lives (see `thread_context.c`).
//!
//! ```text
//! synspan-traced[-dl] --otlp-endpoint URL --targets ADDR:PORT,… [--netns NAME] [--no-span]
//!                     [--route ROUTE] [--service NAME] [--lib tlsdesc|gd [--load-later]]
//! ```
//! It publishes its process context (with the attribute key map), makes one connect outside
//! any span (to a closed port: the agent then notices the process), prints
//! `{"ready":true,"pid":N}`, and waits for a line on stdin. With `--load-later` the library
//! that holds the variable is not loaded yet: the lines are commands, `load` (dlopen it,
//! answered `{"loaded":true}`), `poke` (one more connect outside any span, answered
//! `{"poked":true}`), until `go`. Then one thread per target, all
//! at the same moment, starts a span `GET ROUTE/i`, publishes it, connects, unpublishes and
//! ends the span; with `--no-span` the threads connect with the pointer NULL. A target
//! `listen` is a listener of the application's own. One JSON line per thread follows
//! (`tid`, `trace_id`, `span_id`, `error`), the spans are flushed to the collector, and it
//! waits for stdin to close.
//!
//! With `--netns`, everything after the exporter's start happens inside that network
//! namespace (`/run/netns/NAME`): the exporter's own threads and connection stay outside,
//! where the collector is.

use std::{
    ffi::c_void,
    io::{BufRead, Write},
    net::{SocketAddr, TcpStream},
    sync::{Arc, Barrier},
    time::Duration,
};

use anyhow::Context as _;
use opentelemetry::trace::{Span as _, SpanKind, Tracer as _, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::{Resource, trace::SdkTracerProvider};

use crate::process_context::{Published, THREAD_ATTRIBUTE_KEYS};

/// How the binary sets this thread's `otel_thread_ctx_v1`.
pub type Publish = unsafe extern "C" fn(*const c_void);

/// A thread-context record, laid out as the specification says: `trace_id[16] span_id[8]
/// valid:u8 trace_flags:u8 attrs_size:u16`, then `[key][len][value]` entries. Backed by
/// `u16`s: the record must be 2-byte aligned.
pub struct Record(Box<[u16]>);

impl Record {
    pub fn new(trace_id: [u8; 16], span_id: [u8; 8], trace_flags: u8, attributes: &[(u8, &str)]) -> Self {
        let mut bytes = Vec::with_capacity(64);
        bytes.extend_from_slice(&trace_id);
        bytes.extend_from_slice(&span_id);
        bytes.push(1);
        bytes.push(trace_flags);
        let mut attrs = Vec::new();
        for (key, value) in attributes {
            let value = &value.as_bytes()[..value.len().min(255)];
            attrs.push(*key);
            attrs.push(value.len() as u8);
            attrs.extend_from_slice(value);
        }
        bytes.extend_from_slice(&(attrs.len() as u16).to_ne_bytes());
        bytes.extend_from_slice(&attrs);
        if bytes.len() % 2 == 1 {
            bytes.push(0);
        }
        let words = bytes
            .as_chunks::<2>()
            .0
            .iter()
            .map(|pair| u16::from_ne_bytes(*pair))
            .collect();
        Self(words)
    }

    pub fn as_ptr(&self) -> *const c_void {
        self.0.as_ptr().cast()
    }
}

struct Args {
    endpoint: String,
    /// `None`: the application's own listener.
    targets: Vec<Option<SocketAddr>>,
    netns: Option<String>,
    no_span: bool,
    route: String,
    service: String,
    load_later: bool,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> anyhow::Result<Args> {
    let mut parsed = Args {
        endpoint: String::new(),
        targets: Vec::new(),
        netns: None,
        no_span: false,
        route: "/checkout".into(),
        service: "traced-app".into(),
        load_later: false,
    };
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--otlp-endpoint" => parsed.endpoint = value()?,
            "--targets" => {
                parsed.targets = value()?
                    .split(',')
                    .map(|t| {
                        if t == "listen" {
                            Ok(None)
                        } else {
                            t.parse().map(Some)
                        }
                    })
                    .collect::<Result<_, _>>()?
            }
            "--netns" => parsed.netns = Some(value()?),
            "--route" => parsed.route = value()?,
            "--service" => parsed.service = value()?,
            "--no-span" => parsed.no_span = true,
            "--load-later" => parsed.load_later = true,
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    anyhow::ensure!(!parsed.endpoint.is_empty(), "--otlp-endpoint URL is required");
    anyhow::ensure!(
        (1..=64).contains(&parsed.targets.len()),
        "--targets names 1 to 64 ADDR:PORT (or listen)"
    );
    Ok(parsed)
}

/// Moves this thread, and the threads it starts from now on, into a named network namespace.
fn enter_netns(name: &str) -> anyhow::Result<()> {
    let ns = std::fs::File::open(format!("/run/netns/{name}")).with_context(|| format!("netns {name}"))?;
    // SAFETY: plain syscall on a descriptor we hold.
    if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setns");
    }
    Ok(())
}

fn gettid() -> i64 {
    // SAFETY: takes no arguments.
    unsafe { libc::gettid() as i64 }
}

/// One connect outside any span, to a closed port: the agent notices the process, or looks
/// at it again.
fn poke() -> anyhow::Result<()> {
    let _ = TcpStream::connect_timeout(&"127.0.0.1:1".parse()?, Duration::from_secs(2));
    Ok(())
}

/// Runs the application with the publisher `load` gives; `args` without the program name.
/// `load` is called at start, or on the command `load` with `--load-later`.
pub fn run(
    args: impl Iterator<Item = String>,
    load: impl FnOnce() -> anyhow::Result<Publish>,
) -> anyhow::Result<()> {
    let args = parse_args(args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let _entered = runtime.enter();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(&args.endpoint)
        .build()?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            Resource::builder_empty()
                .with_service_name(args.service.clone())
                .build(),
        )
        .build();
    let tracer = Arc::new(provider.tracer("synspan-traced"));
    if let Some(name) = &args.netns {
        enter_netns(name)?;
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let own = listener.local_addr()?;
    let _context = Published::publish(&[("service.name".to_string(), args.service.clone())])?;

    let mut load = Some(load);
    let mut publish = if args.load_later {
        None
    } else {
        load.take().map(|load| load()).transpose()?
    };
    // Outside any span, so that the agent has seen this process (with its library, unless
    // `--load-later`) before the real attempts.
    poke()?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{}",
        serde_json::json!({"ready": true, "pid": std::process::id()})
    )?;
    out.flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    while args.load_later && line.trim() != "go" {
        let answer = match line.trim() {
            "load" => {
                let load = load.take().context("load: loaded already")?;
                publish = Some(load()?);
                "loaded"
            }
            "poke" => {
                poke()?;
                "poked"
            }
            other => anyhow::bail!("unknown command {other:?}: expected load, poke or go"),
        };
        writeln!(out, "{}", serde_json::json!({answer: true}))?;
        out.flush()?;
        line.clear();
        anyhow::ensure!(std::io::stdin().lock().read_line(&mut line)? > 0, "stdin closed");
    }
    let publish = publish.context("go before load")?;

    let barrier = Arc::new(Barrier::new(args.targets.len()));
    let route_key = THREAD_ATTRIBUTE_KEYS
        .iter()
        .position(|k| *k == "http.route")
        .unwrap_or_default() as u8;
    let threads: Vec<_> = (args.targets.iter().enumerate())
        .map(|(i, target)| {
            let (tracer, barrier) = (tracer.clone(), barrier.clone());
            let (target, no_span) = (target.unwrap_or(own), args.no_span);
            let route = format!("{}/{i}", args.route);
            std::thread::spawn(move || {
                let mut span = tracer
                    .span_builder(format!("GET {route}"))
                    .with_kind(SpanKind::Client)
                    .start(&*tracer);
                let ctx = span.span_context().clone();
                let record = Record::new(
                    ctx.trace_id().to_bytes(),
                    ctx.span_id().to_bytes(),
                    ctx.trace_flags().to_u8(),
                    &[(route_key, route.as_str()), (1, "GET")],
                );
                barrier.wait();
                if !no_span {
                    // SAFETY: the record outlives its publication: it is unpublished below.
                    unsafe { publish(record.as_ptr()) };
                }
                let result = TcpStream::connect_timeout(&target, Duration::from_secs(30));
                // SAFETY: NULL is "no active span".
                unsafe { publish(std::ptr::null()) };
                span.end();
                serde_json::json!({
                    "tid": gettid(),
                    "trace_id": ctx.trace_id().to_string(),
                    "span_id": ctx.span_id().to_string(),
                    "error": result.err().map(|e| e.to_string()),
                })
            })
        })
        .collect();
    for thread in threads {
        let report = thread
            .join()
            .map_err(|_| anyhow::anyhow!("a connecting thread panicked"))?;
        writeln!(out, "{report}")?;
    }
    out.flush()?;
    provider.force_flush()?;
    provider.shutdown()?;
    writeln!(out, "{}", serde_json::json!({"flushed": true}))?;
    out.flush()?;
    // Alive until told, so the agent can read this process however fast its attempts ended.
    let _ = std::io::stdin().lock().read_line(&mut line);
    drop(listener);
    Ok(())
}

/// A running traced application, for the tests: killed by pid on drop.
pub struct TracedApp {
    child: std::process::Child,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    pub pid: u32,
}

/// What one connecting thread of the application reports.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct ThreadReport {
    pub tid: u32,
    pub trace_id: String,
    pub span_id: String,
    pub error: Option<String>,
}

impl TracedApp {
    /// Starts `bin` (a build of `synspan-traced` or `synspan-traced-dl`) with `args`; returns
    /// once it is ready (it made its first connect, outside any span).
    pub fn start(bin: &std::path::Path, args: &[&str]) -> anyhow::Result<Self> {
        Self::start_with_env(bin, args, &[])
    }

    /// As [`TracedApp::start`], with `env` added to the application's environment.
    pub fn start_with_env(
        bin: &std::path::Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let mut child = std::process::Command::new(bin)
            .args(args)
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut stdout = std::io::BufReader::new(child.stdout.take().context("stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let ready: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("{} said {line:?}", bin.display()))?;
        let pid = ready["pid"].as_u64().context("no pid")? as u32;
        Ok(Self { child, stdout, pid })
    }

    /// Waits until `agent` says it found where this application publishes its thread
    /// context: an attempt before that has no parent to find.
    pub fn wait_found_by(&self, agent: &crate::agent::Agent, timeout: Duration) -> anyhow::Result<()> {
        let needle = format!("process {} publishes its thread context", self.pid);
        crate::wait_until(timeout, || agent.stderr().contains(&needle).then_some(()))
            .with_context(|| format!("no {needle:?} in:\n{}", agent.stderr()))
    }

    /// Sends a command of `--load-later` (`load`, `poke`) and waits for its answer.
    pub fn command(&mut self, command: &str) -> anyhow::Result<()> {
        let stdin = self.child.stdin.as_mut().context("stdin")?;
        writeln!(stdin, "{command}")?;
        stdin.flush()?;
        let mut line = String::new();
        anyhow::ensure!(self.stdout.read_line(&mut line)? > 0, "the application exited");
        let answer: serde_json::Value = serde_json::from_str(&line)?;
        anyhow::ensure!(
            answer.as_object().is_some_and(|o| o.values().all(|v| v == true)),
            "{command}: {line}"
        );
        Ok(())
    }

    /// Lets the threads connect; returns their reports once the application's spans are
    /// flushed to its collector.
    pub fn connect(&mut self) -> anyhow::Result<Vec<ThreadReport>> {
        let stdin = self.child.stdin.as_mut().context("stdin")?;
        stdin.write_all(b"go\n")?;
        stdin.flush()?;
        let mut reports = Vec::new();
        loop {
            let mut line = String::new();
            anyhow::ensure!(self.stdout.read_line(&mut line)? > 0, "the application exited");
            let value: serde_json::Value = serde_json::from_str(&line)?;
            if value["flushed"] == true {
                return Ok(reports);
            }
            reports.push(serde_json::from_value(value)?);
        }
    }
}

impl Drop for TracedApp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
