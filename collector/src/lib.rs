//! synspan: every TCP connect attempt on the host as an OpenTelemetry span.
//!
//! Data flow: kernel tracepoints → in-flight map → one ring-buffer record per finished
//! attempt ([`loader`]) → [`attempt::Attempt`] ([`clock`], [`outcome`]) → span
//! ([`span`]) → sinks ([`sink`]), with every attempt accounted for ([`stats`]).

pub mod agent;
pub mod attempt;
pub mod btf;
pub mod clock;
pub mod config;
pub mod enrich;
pub mod evidence;
pub mod kernel_layout;
pub mod loader;
pub mod nat;
pub mod netns;
pub mod outcome;
pub mod port_usage;
pub mod privilege;
pub mod self_metrics;
pub mod sink;
pub mod span;
pub mod stats;
