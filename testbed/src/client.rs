//! Runs `synspan-connect` inside a namespace and reads its report.

use std::process::{Child, Stdio};

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::{cgroup::Cgroup, first_report, netns::Netns, workspace_bin};

/// What the client saw of its own attempt.
#[derive(Clone, Debug, Deserialize)]
pub struct Report {
    pub pid: u32,
    pub tid: u32,
    pub local: String,
    pub local_port: u16,
    pub peer: String,
    pub errno: i32,
    pub closed_by_app: bool,
    pub elapsed_ms: f64,
    /// The kernel's count of the socket's retransmitted segments (`TCP_INFO`).
    #[serde(default)]
    pub syn_retransmits: Option<u32>,
}

/// One attempt from inside `ns`: `synspan-connect TARGET ARGS`.
pub fn connect(ns: &Netns, target: &str, args: &[&str]) -> anyhow::Result<Report> {
    let mut reports = connect_many(ns, target, args)?;
    anyhow::ensure!(reports.len() == 1, "expected one report, got {}", reports.len());
    Ok(reports.remove(0))
}

/// Attempts from inside `ns`, one report per attempt (`--count`, `--parallel`).
pub fn connect_many(ns: &Netns, target: &str, args: &[&str]) -> anyhow::Result<Vec<Report>> {
    let out = ns
        .command(&workspace_bin("synspan-connect"))
        .arg(target)
        .args(args)
        .stderr(Stdio::piped())
        .output()
        .context("running synspan-connect")?;
    if !out.status.success() {
        bail!(
            "synspan-connect {target} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).with_context(|| format!("client report {line:?}")))
        .collect()
}

/// One attempt from inside `ns` by a client that stays alive after it (`--hold`), so that
/// the agent reads its identity (service name, stacks) however fast the attempt ended; killed
/// by pid on drop.
pub struct Held {
    child: Child,
    pub report: Report,
}

impl Held {
    /// `synspan-connect TARGET ARGS --hold` with `env` added to its environment
    /// (`OTEL_SERVICE_NAME`, …), in `cgroup` if given; returns once it reported its attempt.
    pub fn connect(
        ns: &Netns,
        cgroup: Option<&Cgroup>,
        env: &[(&str, &str)],
        target: &str,
        args: &[&str],
    ) -> anyhow::Result<Self> {
        let mut cmd = ns.command(&workspace_bin("synspan-connect"));
        cmd.arg(target).args(args).arg("--hold");
        let mut cmd = match cgroup {
            Some(cgroup) => cgroup.wrap(&cmd),
            None => cmd,
        };
        let mut child = cmd
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting synspan-connect")?;
        let report =
            first_report(&mut child).with_context(|| format!("synspan-connect {target} {args:?}"))?;
        Ok(Self { child, report })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
