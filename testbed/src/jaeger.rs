//! `synspan-jaeger` (the real Jaeger UI and query API over OTLP) as a child process, its API
//! read as Jaeger's own clients read it, and its trace page rendered by a real browser.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, bail};
use serde::Deserialize;
use serde_json::Value;

use crate::{first_report, get_json, repo_root, terminate, wait_until, workspace_bin};

/// Where the receiver listens, as it reports on its first line.
#[derive(Deserialize)]
struct Listening {
    grpc: SocketAddr,
    ui: SocketAddr,
    http: SocketAddr,
}

pub struct Jaeger {
    child: Child,
    listening: Listening,
}

impl Jaeger {
    /// Starts a receiver on free ports of 127.0.0.1. It reports its ports once every one of
    /// them accepts connections, so there is nothing to poll.
    pub fn start() -> anyhow::Result<Self> {
        let mut child = Command::new(workspace_bin("synspan-jaeger"))
            .args(["127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting synspan-jaeger")?;
        let listening = first_report(&mut child).context("synspan-jaeger")?;
        Ok(Self { child, listening })
    }

    /// The OTLP gRPC endpoint, as `--otlp-endpoint` takes it.
    pub fn otlp_grpc_endpoint(&self) -> String {
        format!("http://{}", self.listening.grpc)
    }

    /// The OTLP/HTTP base endpoint (`/v1/traces` below it).
    pub fn otlp_http_endpoint(&self) -> String {
        format!("http://{}", self.listening.http)
    }

    /// The UI's address: `/search`, `/trace/<id>`, `/api/…`.
    pub fn ui_url(&self) -> String {
        format!("http://{}", self.listening.ui)
    }

    /// GET on the query API (`/api/services`, …), as JSON; `None` for a 404 (a trace not
    /// received yet).
    pub fn api(&self, path_and_query: &str) -> anyhow::Result<Option<Value>> {
        get_json(&format!("{}{path_and_query}", self.ui_url()))
    }

    /// `/api/traces?service=SERVICE&limit=LIMIT` until it holds `n` traces or `timeout`
    /// passes; the traces it last returned.
    pub fn wait_traces(&self, service: &str, n: usize, timeout: Duration) -> anyhow::Result<Vec<Value>> {
        let query = format!("/api/traces?service={service}&limit=100");
        let read = || -> anyhow::Result<Vec<Value>> {
            let body = self.api(&query)?.unwrap_or_default();
            Ok(body["data"].as_array().cloned().unwrap_or_default())
        };
        if let Some(traces) = wait_until(timeout, || read().ok().filter(|t| t.len() >= n)) {
            return Ok(traces);
        }
        read()
    }

    /// `/api/traces/{id}` until the trace holds `n` spans or `timeout` passes (its spans come
    /// from more than one exporter); the trace it last returned, `Null` if none.
    pub fn wait_trace(&self, id: &str, n: usize, timeout: Duration) -> anyhow::Result<Value> {
        let path = format!("/api/traces/{id}");
        let read = || -> anyhow::Result<Value> {
            Ok(self
                .api(&path)?
                .map(|body| body["data"][0].clone())
                .unwrap_or_default())
        };
        let spans = |trace: &Value| trace["spans"].as_array().map_or(0, Vec::len);
        if let Some(trace) = wait_until(timeout, || read().ok().filter(|t| spans(t) >= n)) {
            return Ok(trace);
        }
        read()
    }

    /// Stops it: SIGTERM, then SIGKILL.
    pub fn stop(&mut self) {
        terminate(&mut self.child);
    }
}

impl Drop for Jaeger {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.stop();
        }
    }
}

/// One span's row in the trace view, as Chromium rendered it.
#[derive(Clone, Debug, Deserialize)]
pub struct SpanRow {
    pub service: String,
    pub operation: String,
    /// The spans the row is indented under, by their ids (`root` for the trace), outermost
    /// first: the view's indent guides.
    pub ancestors: Vec<String>,
    /// The row has children it can collapse.
    pub parent: bool,
}

/// A Jaeger UI trace page as Chromium rendered it.
#[derive(Debug, Deserialize)]
pub struct RenderedTrace {
    /// The page's text once its first `tcp connect` span is expanded (tags and every log).
    pub text: String,
    /// The trace view's span rows, top to bottom.
    pub rows: Vec<SpanRow>,
}

/// Renders a Jaeger UI trace page and expands its first `tcp connect` span, with a
/// screenshot of the page written to `screenshot`. Drives Debian's `chromium` through
/// `testbed/jaeger_ui/trace_page.mjs` (playwright-core).
pub fn rendered_trace_page(url: &str, screenshot: &Path) -> anyhow::Result<RenderedTrace> {
    let dir = repo_root().join("testbed/jaeger_ui");
    anyhow::ensure!(
        dir.join("node_modules/playwright-core").exists(),
        "{}/node_modules is missing: run scripts/setup-test.sh",
        dir.display()
    );
    let out = Command::new("node")
        .arg(dir.join("trace_page.mjs"))
        .arg(url)
        .arg(screenshot)
        .stdin(Stdio::null())
        .output()
        .context("running node (scripts/setup-test.sh installs it)")?;
    if !out.status.success() {
        bail!(
            "rendering {url} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "the page script printed {:?}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}
