//! synspan: every TCP connect attempt on the host as an OpenTelemetry span.
//!
//! Data flow: kernel tracepoints → in-flight map → one ring-buffer record per finished
//! attempt ([`loader`]) → [`attempt::Attempt`] ([`clock`], [`outcome`]) → span
//! ([`span`]) → sinks ([`sink`]; OTLP through [`otlp`]), with every attempt accounted for
//! ([`stats`]).

mod agent;
mod attempt;
mod btf;
mod clock;
mod config;
mod connect_metrics;
mod drop_reason;
mod enrich;
mod evidence;
/// Parser entry points for the fuzz targets in `fuzz/`; not an interface.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod kernel_layout;
mod launch;
mod loader;
mod otlp;
mod outcome;
mod privilege;
mod self_metrics;
mod sink;
mod span;
mod stats;

pub use launch::main;
