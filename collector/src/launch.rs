//! The process's edge: the command line, the environment and the TLS files are read here,
//! once; logging and the runtime are set up; the agent runs; its result is the exit code.

use std::process::ExitCode;

use clap::{CommandFactory as _, Parser as _, error::ErrorKind};
use tracing_subscriber::EnvFilter;

use crate::{
    config::{Cli, Settings},
    otlp::Export,
};

/// The flags, resolved against this process's environment, and the TLS files they name.
/// Bad input exits with status 2 and a message, as clap does for flags, before anything is
/// loaded.
fn settings() -> (Settings, Option<Export>) {
    let bad = |message: String| -> ! { Cli::command().error(ErrorKind::InvalidValue, message).exit() };
    let env = |var: &str| std::env::var(var).ok();
    let mut settings = Settings::resolve(Cli::parse(), &env).unwrap_or_else(|e| bad(e));
    let export = settings
        .export
        .take()
        .map(Export::load)
        .transpose()
        .unwrap_or_else(|e| bad(e.to_string()));
    (settings, export)
}

/// synspan's `main`.
pub fn main() -> ExitCode {
    let (settings, export) = settings();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(EnvFilter::try_from_env("SYNSPAN_LOG").unwrap_or_else(|_| EnvFilter::new("info")))
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    keep_large_buffers_off_the_heap();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(crate::agent::run(settings, export)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Buffers this large are mapped on their own and handed back to the kernel when freed.
/// glibc's default raises this threshold to the size of the largest such buffer freed, after
/// which they come from the heap and stay resident: under the refused storm of the benchmark
/// that kept about 10 MiB more of the agent's anonymous memory resident (39 MiB instead of 29
/// MiB) with a threshold of 256 KiB. That low, though, every export request (up to 3 MiB,
/// `MAX_REQUEST_BYTES`) and tonic's buffer for it were fresh pages to fault in: a tenth of the
/// agent's CPU with every attempt exported (perf). At 4 MiB, above any request, the success
/// storm with every attempt exported cost the agent 5.2 µs an attempt instead of 6.1 (peak
/// RSS 35.0 MiB instead of 32.1), and the churn soak and memory-limit tests keep their bounds.
const MMAP_THRESHOLD: libc::c_int = 4 * 1024 * 1024;

/// Free memory at the top of a heap beyond this goes back to the kernel. Fixing the mmap
/// threshold also fixes this one at glibc's 128 KiB, and then freeing one export request
/// shrank the heap and the next request faulted the same pages in again: page faults were
/// 250 of 2 900 perf samples of the agent under the success storm with every attempt
/// exported. At 8 MiB, room for a request and tonic's copy of it, they were gone and the agent
/// took 16 % fewer samples for the same storm.
const TRIM_THRESHOLD: libc::c_int = 8 * 1024 * 1024;

/// Called before any thread starts: the settings are process-wide.
fn keep_large_buffers_off_the_heap() {
    for (name, param, value) in [
        ("M_MMAP_THRESHOLD", libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        ("M_TRIM_THRESHOLD", libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD),
    ] {
        // SAFETY: plain glibc call with two integers; no allocation is in flight on another
        // thread, because there is none yet.
        if unsafe { libc::mallopt(param, value) } != 1 {
            tracing::debug!("mallopt({name}) refused; glibc's default stays");
        }
    }
}
