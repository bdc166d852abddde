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
