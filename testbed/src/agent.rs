//! The synspan binary under test: started with a JSON stdout, read while it runs, stopped
//! with SIGTERM.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::{wait_until, workspace_bin};

pub struct Agent {
    child: Child,
    spans: Arc<Mutex<Vec<Value>>>,
    stderr: Arc<Mutex<String>>,
}

pub struct Stopped {
    pub status: ExitStatus,
    pub stderr: String,
    pub spans: Vec<Value>,
}

impl Stopped {
    /// The `key=value` counters of the final accounting line.
    pub fn accounting(&self) -> std::collections::HashMap<String, u64> {
        let line = self
            .stderr
            .lines()
            .rfind(|l| l.contains("final: attempts"))
            .unwrap_or_default();
        line.split([' ', '(', ')'])
            .filter_map(|kv| kv.split_once('='))
            .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
            .collect()
    }
}

impl Agent {
    /// Starts `synspan --output json ARGS` and waits until it says it is ready.
    pub fn start(args: &[&str]) -> anyhow::Result<Self> {
        let mut child = Command::new(workspace_bin("synspan"))
            .args(["--output", "json"])
            .args(args)
            .env("SYNSPAN_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting synspan")?;
        let spans = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let stdout = child.stdout.take().context("stdout")?;
        let sink = spans.clone();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let value: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("synspan wrote a line that is not JSON ({e}): {line}"));
                sink.lock().unwrap().push(value);
            }
        });
        let err = child.stderr.take().context("stderr")?;
        let log = stderr.clone();
        thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut log = log.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let mut agent = Self { child, spans, stderr };
        let ready = wait_until(Duration::from_secs(30), || {
            if agent.stderr().contains("synspan ready") {
                return Some(true);
            }
            match agent.child.try_wait() {
                Ok(Some(_)) => Some(false),
                _ => None,
            }
        });
        if ready != Some(true) {
            let _ = agent.child.kill();
            thread::sleep(Duration::from_millis(100));
            bail!("synspan did not become ready; stderr:\n{}", agent.stderr());
        }
        Ok(agent)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Ids of the BPF programs this agent holds, from its file descriptors.
    pub fn prog_ids(&self) -> Vec<u32> {
        self.fd_ids("prog_id:")
    }

    /// Ids of the BPF maps this agent holds.
    pub fn map_ids(&self) -> Vec<u32> {
        self.fd_ids("map_id:")
    }

    fn fd_ids(&self, field: &str) -> Vec<u32> {
        let dir = format!("/proc/{}/fdinfo", self.pid());
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| std::fs::read_to_string(entry.path()).ok())
            .filter_map(|info| {
                info.lines()
                    .find_map(|l| l.strip_prefix(field))
                    .and_then(|id| id.trim().parse().ok())
            })
            .collect()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn spans(&self) -> Vec<Value> {
        self.spans.lock().unwrap().clone()
    }

    /// Spans whose `process.pid` is `pid`.
    pub fn spans_of(&self, pid: u32) -> Vec<Value> {
        self.spans()
            .into_iter()
            .filter(|s| s["attributes"]["process.pid"] == pid)
            .collect()
    }

    /// Waits until `n` spans of `pid` arrived.
    pub fn wait_spans_of(&self, pid: u32, n: usize, timeout: Duration) -> Vec<Value> {
        wait_until(timeout, || {
            let spans = self.spans_of(pid);
            (spans.len() >= n).then_some(spans)
        })
        .unwrap_or_else(|| self.spans_of(pid))
    }

    /// SIGTERM, then waits up to `timeout` for the exit.
    pub fn stop(mut self, timeout: Duration) -> anyhow::Result<Stopped> {
        // SAFETY: plain syscall on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = wait_until(timeout, || self.child.try_wait().ok().flatten());
        let Some(status) = status else {
            let _ = self.child.kill();
            bail!(
                "synspan did not exit within {timeout:?} of SIGTERM; stderr:\n{}",
                self.stderr()
            );
        };
        // Let the reader threads see EOF.
        thread::sleep(Duration::from_millis(100));
        Ok(Stopped {
            status,
            stderr: self.stderr(),
            spans: self.spans(),
        })
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
