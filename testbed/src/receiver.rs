//! rotel, a real OpenTelemetry collector, as the OTLP receiver of the tests, on a gRPC and
//! an HTTP port. Its Python trace processor (`testbed/rotel_processor.py`) writes one JSON
//! line per span, whichever port it came in on.

use std::{
    fs,
    io::Read,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::{free_port, read_json_lines, repo_root, wait_until};

pub struct Receiver {
    child: Option<Child>,
    port: u16,
    http_port: u16,
    dir: PathBuf,
    /// Where rotel sends what it receives, over OTLP/HTTP; nowhere when `None`.
    forward_http: Option<String>,
}

fn agent_path() -> PathBuf {
    std::env::var_os("SYNSPAN_ROTEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv/lib/python3.11/site-packages/rotel/rotel-agent"))
}

impl Receiver {
    /// A receiver with a free loopback port chosen but not yet listening: the collector
    /// is "down" until [`Receiver::restart`].
    pub fn reserve() -> anyhow::Result<Self> {
        let port = free_port()?;
        let dir = std::env::temp_dir().join(format!("synspan-rx-{}-{port}", std::process::id()));
        fs::create_dir_all(&dir)?;
        Ok(Self {
            child: None,
            port,
            http_port: free_port()?,
            dir,
            forward_http: None,
        })
    }

    /// Starts a receiver on a free loopback port.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(Self::reserve()?)
    }

    /// Starts a receiver that also exports what it receives to `endpoint` (the base URL,
    /// `/v1/traces` is appended) over OTLP/HTTP protobuf, gzip-compressed: a real OTLP/HTTP
    /// client for a receiver under test.
    pub fn start_forwarding_http(endpoint: &str) -> anyhow::Result<Self> {
        let mut rx = Self::reserve()?;
        rx.forward_http = Some(endpoint.to_owned());
        Self::start_with(rx)
    }

    fn start_with(mut rx: Self) -> anyhow::Result<Self> {
        // Another process can take the port between our probe and rotel's bind: try again.
        for _ in 0..5 {
            rx.port = free_port()?;
            rx.http_port = free_port()?;
            if rx.spawn().is_ok() {
                return Ok(rx);
            }
        }
        bail!("rotel did not start; log:\n{}", rx.log())
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let agent = agent_path();
        anyhow::ensure!(
            agent.exists(),
            "{} is missing: run scripts/setup-test.sh",
            agent.display()
        );
        let log = fs::File::create(self.dir.join("rotel.log"))?;
        let child = Command::new(&agent)
            .args([
                "start",
                "--otlp-grpc-endpoint",
                &format!("127.0.0.1:{}", self.port),
            ])
            .args(["--otlp-http-endpoint", &format!("127.0.0.1:{}", self.http_port)])
            .args(match &self.forward_http {
                None => vec!["--exporter", "blackhole"],
                Some(endpoint) => vec![
                    "--exporter",
                    "otlp",
                    "--otlp-exporter-endpoint",
                    endpoint.as_str(),
                    "--otlp-exporter-protocol",
                    "http",
                    "--otlp-exporter-compression",
                    "gzip",
                ],
            })
            .args([
                "--debug-log",
                "metrics",
                "--debug-log-verbosity",
                "detailed",
                "--otlp-receiver-logs-disabled",
            ])
            .arg("--otlp-with-trace-processor")
            .arg(repo_root().join("testbed/rotel_processor.py"))
            .env("NO_COLOR", "1")
            .env("SYNSPAN_RECEIVER_OUT", self.spans_path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", agent.display()))?;
        self.child = Some(child);
        let up = wait_until(Duration::from_secs(10), || {
            [self.port, self.http_port]
                .iter()
                .all(|&port| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
                .then_some(())
        });
        // A processor that fails to load makes rotel exit just after it binds.
        std::thread::sleep(Duration::from_millis(100));
        let alive = matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)));
        if up.is_none() || !alive {
            self.stop();
            bail!(
                "rotel is not listening on 127.0.0.1:{} and :{}",
                self.port,
                self.http_port
            );
        }
        Ok(())
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The OTLP/HTTP base URL: `/v1/traces` and `/v1/metrics` go after it.
    pub fn http_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    pub fn http_port(&self) -> u16 {
        self.http_port
    }

    fn spans_path(&self) -> PathBuf {
        self.dir.join("spans.jsonl")
    }

    pub fn spans(&self) -> Vec<Value> {
        read_json_lines(&self.spans_path())
    }

    pub fn wait_span(&self, span_id: &str, timeout: Duration) -> Option<Value> {
        wait_until(timeout, || {
            self.spans().into_iter().find(|s| s["span_id"] == span_id)
        })
    }

    /// Waits until at least `n` received spans satisfy `pred`; returns those.
    pub fn wait_spans(&self, n: usize, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        let matching = || self.spans().into_iter().filter(|s| pred(s)).collect::<Vec<_>>();
        wait_until(timeout, || Some(matching()).filter(|m| m.len() >= n)).unwrap_or_else(matching)
    }

    pub fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = fs::File::open(self.dir.join("rotel.log")) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    /// Stops the receiver (SIGTERM, then SIGKILL); `restart` brings it back on the same port.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: plain syscall on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            if wait_until(Duration::from_secs(5), || child.try_wait().ok().flatten()).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.spawn()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
