//! Test bed for synspan: network namespaces, a connect client, the agent under test, and a
//! real OTLP receiver (rotel) for the end-to-end tests, a counting one for the benchmark.

pub mod agent;
pub mod bench;
pub mod cgroup;
pub mod churn;
pub mod client;
pub mod jaeger;
pub mod netns;
pub mod otelite;
pub mod otlp_http;
pub mod otlp_sink;
pub mod outcomes;
pub mod process_context;
pub mod reaped;
pub mod receiver;
pub mod sockaddr;
pub mod traced;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

/// A binary of this workspace, next to the running test in `target/<profile>/`.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test>-<hash> or target/<profile>/<bench>
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace's binaries first (`cargo build --release --workspace --bins`, as scripts/test.sh does)",
        path.display()
    );
    path
}

/// The target the test bed's applications are also built for, with musl as their C library
/// (`scripts/build-musl.sh`).
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";

/// A binary of this workspace built for [`MUSL_TARGET`]: `target/<MUSL_TARGET>/<profile>/`,
/// the profile the running test was built with.
pub fn musl_bin(name: &str) -> PathBuf {
    let glibc = workspace_bin(name);
    let profile_dir = glibc.parent().expect("profile dir");
    let profile = profile_dir.file_name().expect("profile name");
    let target = profile_dir.parent().expect("target dir");
    let path = target.join(MUSL_TARGET).join(profile).join(name);
    assert!(
        path.exists(),
        "{} is missing: build the musl binaries first (scripts/build-musl.sh, as scripts/test.sh does)",
        path.display()
    );
    path
}

/// The repository root (for `.venv` and the receiver's processor script).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

/// Polls `f` until it returns `Some`, or `timeout` passes.
pub fn wait_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reads a file of JSON lines, skipping a torn last line.
pub fn read_json_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The first line a child prints on its (piped) stdout, as JSON: how the tests' helper
/// scripts report what they set up while they keep running.
pub fn first_json_line(child: &mut std::process::Child) -> serde_json::Value {
    use std::io::BufRead;
    let mut line = String::new();
    let stdout = child.stdout.as_mut().expect("the child's stdout is piped");
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .expect("reading the child's report");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("the child reported {line:?}: {e}"))
}

/// The first line a child prints on its (piped) stdout, as a `T`; when it is not one, the
/// child is killed and reaped.
pub fn first_report<T: serde::de::DeserializeOwned>(child: &mut std::process::Child) -> anyhow::Result<T> {
    let report = first_json_line(child);
    serde_json::from_value(report.clone()).map_err(|e| {
        let _ = child.kill();
        let _ = child.wait();
        anyhow::anyhow!("it reported {report}: {e}")
    })
}

/// `GET url` of a JSON API on loopback: the body, `None` for a 404 (not there, or not yet).
pub fn get_json(url: &str) -> anyhow::Result<Option<serde_json::Value>> {
    use anyhow::Context as _;
    let response = ureq::get(url)
        .config()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .call()
        .with_context(|| format!("GET {url}"))?;
    match response.status().as_u16() {
        404 => Ok(None),
        200 => {
            let body = response
                .into_body()
                .read_json()
                .with_context(|| format!("GET {url}: not JSON"))?;
            Ok(Some(body))
        }
        status => anyhow::bail!("GET {url}: HTTP {status}"),
    }
}

/// A free port of 127.0.0.1, for a child process to listen on.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Stops a child of ours: SIGTERM, then SIGKILL if it has not exited within 5 s.
pub fn terminate(child: &mut std::process::Child) {
    // SAFETY: plain syscall on our own child's pid, not yet reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    if wait_until(Duration::from_secs(5), || child.try_wait().ok().flatten()).is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
}
