//! otelite, an OTLP backend independent of synspan's own test bed (a SQLite store with its own
//! receivers and REST API), as a child process with a HOME and database of its own. Installed
//! by `scripts/otelite-test.sh`; `SYNSPAN_OTELITE` names the binary.

use std::{
    fs,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::{free_port, get_json, repo_root, terminate, wait_until};

pub struct Otelite {
    child: Child,
    dir: PathBuf,
    api: u16,
    grpc: u16,
    http: u16,
}

fn binary() -> PathBuf {
    std::env::var_os("SYNSPAN_OTELITE")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/otelite/bin/otelite"))
}

impl Otelite {
    /// Starts otelite on free loopback ports; returns once all three accept connections.
    pub fn start() -> anyhow::Result<Self> {
        let bin = binary();
        anyhow::ensure!(
            bin.exists(),
            "{} is missing: run scripts/otelite-test.sh, or set SYNSPAN_OTELITE",
            bin.display()
        );
        let (api, grpc, http) = (free_port()?, free_port()?, free_port()?);
        let dir = std::env::temp_dir().join(format!("synspan-otelite-{}-{api}", std::process::id()));
        fs::create_dir_all(&dir)?;
        let log = fs::File::create(dir.join("otelite.log"))?;
        // Its config goes to $HOME/.config/otelite: a HOME of its own keeps it out of root's.
        let child = Command::new(&bin)
            .arg("serve")
            .args(["--addr", &format!("127.0.0.1:{api}")])
            .arg("--storage-path")
            .arg(dir.join("data"))
            .args(["--no-color", "--log-level", "warn"])
            .env("HOME", &dir)
            .env("OTELITE_OTLP_GRPC_PORT", grpc.to_string())
            .env("OTELITE_OTLP_HTTP_PORT", http.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut otelite = Self {
            child,
            dir,
            api,
            grpc,
            http,
        };
        let up = wait_until(Duration::from_secs(20), || {
            [api, grpc, http]
                .iter()
                .all(|&port| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
                .then_some(())
        });
        if up.is_none() {
            otelite.stop();
            bail!("otelite did not start; log:\n{}", otelite.log());
        }
        Ok(otelite)
    }

    pub fn otlp_grpc_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc)
    }

    /// The OTLP/HTTP base endpoint (`/v1/traces` below it).
    pub fn otlp_http_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.http)
    }

    /// GET on the REST API (`/api/traces/{id}`, …), as JSON; `None` for a 404.
    pub fn api(&self, path_and_query: &str) -> anyhow::Result<Option<Value>> {
        get_json(&format!("http://127.0.0.1:{}{path_and_query}", self.api))
    }

    /// `/api/traces/{id}` once otelite has stored the trace, or `None` after `timeout`.
    pub fn wait_trace(&self, id: &str, timeout: Duration) -> Option<Value> {
        wait_until(timeout, || self.api(&format!("/api/traces/{id}")).ok().flatten())
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("otelite.log")).unwrap_or_default()
    }

    /// Stops it: SIGTERM, then SIGKILL.
    pub fn stop(&mut self) {
        terminate(&mut self.child);
    }
}

impl Drop for Otelite {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.stop();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}
