//! The synspan binary under test: started with a JSON stdout (or none), read while it runs,
//! stopped with SIGTERM and reaped with its rusage.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread::{self, JoinHandle},
    time::Duration,
};

use anyhow::{Context, bail};
use serde::Deserialize;
use serde_json::Value;

use crate::{
    cgroup::join_before_exec,
    reaped::{Reaped, Usage},
    receiver::Receiver,
    wait_until, workspace_bin,
};

/// What synspan writes on stdout for each finished attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// `--output json`: every span is kept, see [`Agent::spans`].
    Json,
    /// `--output none`: spans go only to the OTLP endpoint among the flags.
    None,
}

pub struct Agent {
    proc: Reaped,
    spans: Arc<Mutex<Vec<Value>>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

pub struct Stopped {
    pub status: ExitStatus,
    pub usage: Usage,
    pub stderr: String,
    pub spans: Vec<Value>,
}

/// The line synspan prints on stderr at exit: `{"synspan_accounting":{"seen":…,…}}`.
#[derive(Deserialize)]
struct AccountingLine {
    synspan_accounting: HashMap<String, u64>,
}

impl Stopped {
    /// The final accounting, checked to be exact: every attempt seen is exported, dropped
    /// under a reason, or in flight, and none is pending. Panics naming what is off.
    pub fn exact_books(&self) -> HashMap<String, u64> {
        let a = self.accounting();
        assert!(
            a.contains_key("seen"),
            "no final accounting line:\n{}",
            self.stderr
        );
        assert_eq!(a["pending"], 0, "{a:?}");
        assert_eq!(a["seen"], a["exported"] + a["dropped"] + a["in_flight"], "{a:?}");
        a
    }

    /// The counters of the final accounting, by name; empty if synspan printed none.
    pub fn accounting(&self) -> HashMap<String, u64> {
        self.stderr
            .lines()
            .rev()
            .filter(|l| l.starts_with(r#"{"synspan_accounting""#))
            .find_map(|l| serde_json::from_str::<AccountingLine>(l).ok())
            .map(|l| l.synspan_accounting)
            .unwrap_or_default()
    }
}

impl Agent {
    /// Starts `synspan --output json ARGS` and waits until it says it is ready.
    pub fn start(args: &[&str]) -> anyhow::Result<Self> {
        Self::start_with(Output::Json, args)
    }

    /// Starts a receiver, then `synspan --output json --otlp-endpoint RECEIVER ARGS`: every
    /// span both on stdout and as the receiver got it.
    pub fn start_exporting(args: &[&str]) -> anyhow::Result<(Receiver, Self)> {
        Self::start_exporting_with_env(args, &[])
    }

    /// As [`Agent::start_exporting`], with `env` added to synspan's environment.
    pub fn start_exporting_with_env(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<(Receiver, Self)> {
        let receiver = Receiver::start().context("starting the OTLP receiver")?;
        let endpoint = receiver.endpoint();
        let mut all = vec!["--otlp-endpoint", &endpoint];
        all.extend_from_slice(args);
        Ok((receiver, Self::start_with_env(Output::Json, &all, env)?))
    }

    /// Starts `synspan --output json` exporting its spans, and no self-metrics, over
    /// gzip-compressed OTLP/HTTP to `endpoint` (a base URL: `/v1/traces` is appended).
    pub fn start_exporting_http(endpoint: &str) -> anyhow::Result<Self> {
        Self::start_with_env(
            Output::Json,
            &[
                "--otlp-protocol",
                "http/protobuf",
                "--otlp-endpoint",
                endpoint,
                "--metrics-interval",
                "0",
            ],
            &[("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")],
        )
    }

    /// Starts `synspan --output OUTPUT ARGS` with synspan's own defaults, as a user would run
    /// it (the other starts turn the span rate limit off unless `args` set it), and waits
    /// until it says it is ready.
    pub fn start_as_shipped(output: Output, args: &[&str]) -> anyhow::Result<Self> {
        Self::spawn(output, args, &[], None, true)
    }

    /// Starts `synspan --output OUTPUT ARGS` and waits until it says it is ready.
    pub fn start_with(output: Output, args: &[&str]) -> anyhow::Result<Self> {
        Self::start_with_env(output, args, &[])
    }

    /// Starts `synspan --output OUTPUT ARGS` with `env` added to its environment
    /// (`OTEL_EXPORTER_OTLP_*`) and waits until it says it is ready.
    pub fn start_with_env(output: Output, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::spawn(output, args, env, None, false)
    }

    /// Starts `synspan --output OUTPUT ARGS` inside the cgroup whose `cgroup.procs` is
    /// `procs`, from its first instruction on, and waits until it says it is ready.
    pub fn start_in_cgroup(procs: &Path, output: Output, args: &[&str]) -> anyhow::Result<Self> {
        Self::spawn(output, args, &[], Some(procs), false)
    }

    fn spawn(
        output: Output,
        args: &[&str],
        env: &[(&str, &str)],
        cgroup_procs: Option<&Path>,
        as_shipped: bool,
    ) -> anyhow::Result<Self> {
        let (flag, stdout) = match output {
            Output::Json => ("json", Stdio::piped()),
            Output::None => ("none", Stdio::null()),
        };
        let mut command = Command::new(workspace_bin("synspan"));
        command.args(["--output", flag]);
        // The tests count every span of their storms; the rate limit's own tests set it.
        if !as_shipped && !args.iter().any(|a| a.starts_with("--span-rate-limit")) {
            command.args(["--span-rate-limit", "0"]);
        }
        command
            .args(args)
            .env("SYNSPAN_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped());
        if let Some(procs) = cgroup_procs {
            join_before_exec(&mut command, procs)?;
        }
        let mut child = command.spawn().context("starting synspan")?;
        let spans = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut readers = Vec::new();
        if let Some(stdout) = child.stdout.take() {
            let sink = spans.clone();
            readers.push(thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    let value: Value = serde_json::from_str(&line)
                        .unwrap_or_else(|e| panic!("synspan wrote a line that is not JSON ({e}): {line}"));
                    sink.lock().unwrap().push(value);
                }
            }));
        }
        let err = child.stderr.take().context("stderr")?;
        let log = stderr.clone();
        readers.push(thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut log = log.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        }));
        let mut agent = Self {
            proc: Reaped::new(child),
            spans,
            stderr,
            readers,
        };
        let ready = wait_until(Duration::from_secs(30), || {
            if agent.stderr().contains("synspan ready") {
                return Some(true);
            }
            agent.proc.try_wait().map(|_| false)
        });
        if ready != Some(true) {
            agent.proc.signal(libc::SIGKILL);
            agent.proc.wait(Duration::from_secs(5));
            agent.join_readers();
            bail!("synspan did not become ready; stderr:\n{}", agent.stderr());
        }
        Ok(agent)
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Runs `f` while synspan is stopped (SIGSTOP), and lets it go on after (SIGCONT, also
    /// when `f` panics). What the kernel records meanwhile waits in its maps and ring buffers
    /// for synspan, and a process that exits within `f` is gone before synspan can read
    /// anything of it: no race left to chance.
    pub fn while_stopped<T>(&self, f: impl FnOnce() -> T) -> T {
        struct Resume<'a>(&'a Reaped);
        impl Drop for Resume<'_> {
            fn drop(&mut self) {
                self.0.signal(libc::SIGCONT);
            }
        }
        self.proc.signal(libc::SIGSTOP);
        let _resume = Resume(&self.proc);
        f()
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

    /// SIGTERM, then waits up to `timeout` for the exit and the end of its output.
    pub fn stop(mut self, timeout: Duration) -> anyhow::Result<Stopped> {
        self.proc.signal(libc::SIGTERM);
        let Some(exit) = self.proc.wait(timeout) else {
            bail!(
                "synspan did not exit within {timeout:?} of SIGTERM; stderr:\n{}",
                self.stderr()
            );
        };
        self.join_readers();
        Ok(Stopped {
            status: exit.status,
            usage: exit.usage,
            stderr: self.stderr(),
            spans: self.spans(),
        })
    }

    /// The end of what synspan said: its final accounting and whatever it warned of.
    fn tail_of_stderr(&self, lines: usize) -> String {
        let stderr = self.stderr();
        let all: Vec<&str> = stderr.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Once synspan has exited its pipes reach EOF, so the readers end.
    fn join_readers(&mut self) {
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }
}

/// A test that fails with the agent still running gets the agent's own account of every
/// attempt (seen, in flight, exported, dropped and why): what a missing span needs to be
/// explained. A passing test only has it killed.
impl Drop for Agent {
    fn drop(&mut self) {
        if !std::thread::panicking() || self.readers.is_empty() {
            return;
        }
        self.proc.signal(libc::SIGTERM);
        let ended = if self.proc.wait(Duration::from_secs(10)).is_some() {
            self.join_readers();
            "stopped by SIGTERM"
        } else {
            "still running 10 s after SIGTERM, so without its final accounting"
        };
        println!(
            "synspan {} at the failure ({ended}), the end of its stderr:\n{}",
            self.proc.pid(),
            self.tail_of_stderr(20)
        );
    }
}
