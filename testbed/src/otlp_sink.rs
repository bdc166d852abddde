//! `synspan-otlp-sink`, the benchmark's OTLP receiver, as a child process: it decodes every
//! request and counts spans by `process.pid` (see its source for why not rotel here).

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
};

use anyhow::{Context, bail};

use crate::workspace_bin;

/// What the sink has received since it started.
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct SinkCounts {
    pub spans: u64,
    pub requests: u64,
    pub metric_requests: u64,
    pub by_pid: BTreeMap<i64, u64>,
}

impl SinkCounts {
    pub fn of_pid(&self, pid: u32) -> u64 {
        self.by_pid.get(&i64::from(pid)).copied().unwrap_or(0)
    }
}

pub struct OtlpSink {
    child: Child,
    endpoint: String,
    counts: PathBuf,
}

impl OtlpSink {
    /// Starts a sink on a free port of this network namespace's 127.0.0.1.
    pub fn start() -> anyhow::Result<Self> {
        let counts = std::env::temp_dir().join(format!("synspan-sink-{}.json", std::process::id()));
        let mut child = Command::new(workspace_bin("synspan-otlp-sink"))
            .arg("127.0.0.1:0")
            .arg(&counts)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting synspan-otlp-sink")?;
        let mut line = String::new();
        let stdout = child.stdout.take().context("the sink's stdout")?;
        BufReader::new(stdout).read_line(&mut line)?;
        let Some(addr) = line.trim().strip_prefix("listening ") else {
            let _ = child.kill();
            let _ = child.wait();
            bail!("synspan-otlp-sink did not start (it said {line:?})");
        };
        Ok(Self {
            endpoint: format!("http://{addr}"),
            child,
            counts,
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn counts(&self) -> anyhow::Result<SinkCounts> {
        let text = std::fs::read_to_string(&self.counts)
            .with_context(|| format!("reading {}", self.counts.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", self.counts.display()))
    }
}

impl Drop for OtlpSink {
    fn drop(&mut self) {
        // SAFETY: plain syscall on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        if crate::wait_until(std::time::Duration::from_secs(5), || {
            self.child.try_wait().ok().flatten()
        })
        .is_none()
        {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.counts);
    }
}
