//! Command line and environment. Flags win over `OTEL_*` variables, which win over defaults.
//!
//! [`Cli`] is what clap parses; [`Settings::resolve`] turns it and an environment, passed
//! in, into what the agent runs with. Neither reads a file or the process's environment:
//! the binary's `main` does that, once.

use std::{num::NonZeroU32, path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};
use synspan_shared::{MAX_ANSWERED_REASONS, Policy, filter};

use crate::{
    loader::OPTIONAL_HOOKS,
    otlp::{self, parse_endpoint, parse_protocol, settings::Env},
    sink::Format,
};

/// `--span-rate-limit`'s default: more of one process's identical attempts to one
/// destination than anyone reads as spans, few enough that a storm of them costs the agent
/// next to nothing (benchmark mode 3).
const DEFAULT_SPAN_RATE_LIMIT: u32 = 100;

const ABOUT: &str = "Every TCP connect attempt on this host as an OpenTelemetry span.";

const LONG_ABOUT: &str = "\
Every TCP connect attempt on this host as an OpenTelemetry span.

synspan watches the kernel (tracepoints, no kprobes) and follows each outbound TCP connect
from SYN_SENT until the socket leaves it: established, refused, timed out, unreachable, or
aborted by the application. Each attempt carries the 4-tuple the kernel chose, the pid,
thread and command of the caller, every SYN retransmit, and why it ended.

With no flags it prints one line per finished attempt. Add --otlp-endpoint to export spans
to an OpenTelemetry Collector over OTLP gRPC or HTTP; use --output json for one JSON object
per attempt on stdout. Needs root, or CAP_BPF and CAP_PERFMON.";

const AFTER_HELP: &str = "\
Environment:
  OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, OTEL_EXPORTER_OTLP_ENDPOINT
                    OTLP endpoint when --otlp-endpoint is not given (in that order); over
                    http/protobuf the _TRACES_ one is the whole URL, the generic one a
                    base that /v1/traces and /v1/metrics are appended to
  OTEL_EXPORTER_OTLP_PROTOCOL
                    grpc (default) or http/protobuf, when --otlp-protocol is not given
  OTEL_EXPORTER_OTLP_CERTIFICATE, OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE,
  OTEL_EXPORTER_OTLP_CLIENT_KEY
                    TLS files when the --otlp-* flags are not given
  OTEL_EXPORTER_OTLP_HEADERS, OTEL_EXPORTER_OTLP_COMPRESSION
                    sent with every request; header values (API keys) are never logged
  OTEL_EXPORTER_OTLP_TIMEOUT
                    milliseconds one export try may take (default 10000)
  Each OTEL_EXPORTER_OTLP_* variable has _TRACES_ and _METRICS_ forms that replace it
  for that signal (OTEL_EXPORTER_OTLP_METRICS_ENDPOINT: where self-metrics go).
  SYNSPAN_LOG       log filter for stderr (tracing's EnvFilter syntax), default `info`

Examples:
  synspan                                   print every attempt
  synspan --failures-only                   failures, retried and slow successes only
  synspan --otlp-endpoint http://127.0.0.1:4317 --output none
  synspan --otlp-protocol http/protobuf --otlp-endpoint http://127.0.0.1:4318
  synspan --output json | jq 'select(.attributes[\"synspan.outcome\"] != \"established\")'";

/// What synspan writes to stdout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Output {
    /// One human-readable line per attempt.
    Console,
    /// One JSON object per attempt (JSON Lines); nothing else goes to stdout.
    Json,
    /// Nothing; use with --otlp-endpoint.
    None,
}

/// What to do with the span an application publishes as active on the connecting thread
/// (OpenTelemetry thread context, OTEP 4947).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum TraceContext {
    /// The connect span joins the application's trace, as a child of its active span.
    Parent,
    /// The connect span is a root span with a span link to the application's span.
    Link,
    /// Published thread context is not read.
    Off,
}

#[derive(Debug, Parser)]
#[command(name = "synspan", version, about = ABOUT, long_about = LONG_ABOUT, after_help = AFTER_HELP)]
pub(crate) struct Cli {
    /// What to print on stdout for each finished attempt. Logs always go to stderr.
    #[arg(long, value_enum, default_value_t = Output::Console)]
    pub(crate) output: Output,

    /// Export spans to this OpenTelemetry collector: http://127.0.0.1:4317 for gRPC; for
    /// http/protobuf a base URL such as http://127.0.0.1:4318, to which /v1/traces and
    /// /v1/metrics are appended.
    #[arg(long, value_name = "URL", value_parser = parse_endpoint)]
    pub(crate) otlp_endpoint: Option<http::Uri>,

    /// The OTLP transport: grpc or http/protobuf. Default: grpc.
    /// Env: OTEL_EXPORTER_OTLP_PROTOCOL (and its _TRACES_ and _METRICS_ forms).
    #[arg(long, value_name = "PROTOCOL", value_parser = parse_protocol)]
    pub(crate) otlp_protocol: Option<otlp::Protocol>,

    /// CA certificate(s), PEM, that sign the collector's certificate (https endpoints).
    /// Default: the system's roots. Env: OTEL_EXPORTER_OTLP_CERTIFICATE.
    #[arg(long, value_name = "FILE")]
    pub(crate) otlp_ca_file: Option<PathBuf>,

    /// Client certificate chain, PEM, for mutual TLS. Env: OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE.
    #[arg(long, value_name = "FILE", requires = "otlp_client_key")]
    pub(crate) otlp_client_cert: Option<PathBuf>,

    /// Client private key, PEM, for mutual TLS. Env: OTEL_EXPORTER_OTLP_CLIENT_KEY.
    #[arg(long, value_name = "FILE", requires = "otlp_client_cert")]
    pub(crate) otlp_client_key: Option<PathBuf>,

    /// Keep every failure plus successes that needed a SYN retransmit or took longer than
    /// --slow-threshold (default 1s); drop other successes in the kernel. The production
    /// setting. Same as `--sample-successes 0 --keep-retried --slow-threshold 1s`.
    #[arg(long)]
    pub(crate) failures_only: bool,

    /// Keep successes that took at least this long (e.g. 200ms, 1s).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub(crate) slow_threshold: Option<Duration>,

    /// Keep successes that needed at least one SYN retransmit.
    #[arg(long)]
    pub(crate) keep_retried: bool,

    /// Fraction of the remaining successes to keep, from 0 to 1. Default 1, or 0 with
    /// --failures-only. Failures are always kept (within --span-rate-limit).
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub(crate) sample_successes: Option<f64>,

    /// Spans a second per process, destination and outcome; kept attempts past it are
    /// dropped in the kernel, before the ring buffer, and counted as `rate_limited`. The
    /// connect metrics still count every attempt. A client hammering a dead backend then
    /// costs this many spans a second, not one per attempt. 0: no limit.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_SPAN_RATE_LIMIT)]
    pub(crate) span_rate_limit: u32,

    /// Trace only attempts made by these processes (tgid). Repeat or separate with commas.
    #[arg(long = "pid", value_name = "PID", value_delimiter = ',')]
    pub(crate) pids: Vec<u32>,

    /// Trace only attempts made from these cgroup v2 directories (e.g.
    /// /sys/fs/cgroup/system.slice/nginx.service). Repeat or separate with commas.
    #[arg(long = "cgroup", value_name = "PATH", value_delimiter = ',')]
    pub(crate) cgroups: Vec<PathBuf>,

    /// Trace only attempts to these destination ports. Repeat or separate with commas.
    #[arg(long = "dest-port", value_name = "PORT", value_delimiter = ',')]
    pub(crate) dest_ports: Vec<u16>,

    /// Trace only attempts to these destination networks (CIDR, IPv4 or IPv6, e.g.
    /// 10.0.0.0/8). Repeat or separate with commas.
    #[arg(long = "dest", value_name = "CIDR", value_delimiter = ',')]
    pub(crate) dests: Vec<ipnet::IpNet>,

    /// Do not look up evidence in the attempt's network namespace for failed and retried
    /// attempts: NAT (conntrack), a local listener's accept queue, ephemeral port use. Lets
    /// synspan drop CAP_SYS_ADMIN and CAP_NET_ADMIN after start-up.
    #[arg(long, conflicts_with = "nat_all")]
    pub(crate) no_nat: bool,

    /// Look up NAT for every attempt, successes included (costs a netlink query each; at most
    /// 200 lookups a second are made).
    #[arg(long)]
    pub(crate) nat_all: bool,

    /// Put the traced process's full command line on its spans (`process.command_line`).
    /// Off by default: command lines often carry passwords and tokens.
    #[arg(long)]
    pub(crate) capture_command_line: bool,

    /// Do not capture kernel and user stacks: the lowest overhead.
    #[arg(long)]
    pub(crate) no_stacks: bool,

    /// What a connect span does with the span the application published as active on the
    /// connecting thread (OpenTelemetry thread context): `parent` makes it that span's
    /// child, in the application's trace; `link` makes it a root span linked to it; `off`
    /// reads no thread context.
    #[arg(long, value_enum, value_name = "MODE", default_value_t = TraceContext::Parent)]
    pub(crate) trace_context: TraceContext,

    /// Do not watch the kernel's packet drops (skb:kfree_skb) for the attempts' handshake
    /// packets: spans no longer say where a SYN or SYN-ACK died and why.
    #[arg(long)]
    pub(crate) no_drop_reasons: bool,

    /// Trace attempts, retransmits and resets with classic tracepoints even where BTF
    /// tracepoints work: what a kernel without BTF gets. For testing that path.
    #[arg(long, hide = true)]
    pub(crate) classic_tracepoints: bool,

    /// Treat these optional hooks as absent from the kernel, as if attaching them had failed:
    /// what a kernel without them gets. For testing that path.
    #[arg(
        long,
        hide = true,
        value_name = "HOOK",
        value_delimiter = ',',
        value_parser = clap::builder::PossibleValuesParser::new(OPTIONAL_HOOKS.map(|(hook, _)| hook))
    )]
    pub(crate) pretend_missing: Vec<String>,

    /// Read the kernel's BTF from this file instead of /sys/kernel/btf/vmlinux: a file that
    /// does not exist is what a kernel without BTF gets. For testing that path.
    #[arg(long, hide = true, value_name = "FILE")]
    pub(crate) kernel_btf: Option<PathBuf>,

    /// Hold every evidence lookup (NAT, port usage) back this long: a stuck netlink peer or
    /// /proc read, made on purpose. For testing that nothing waits for one.
    #[arg(long, hide = true, value_name = "DURATION", default_value = "0s", value_parser = parse_duration)]
    pub(crate) evidence_delay: Duration,

    /// Attempts tracked in flight at once (the in-flight map's size). An attempt pushed out
    /// by newer ones is counted as evicted.
    #[arg(long, value_name = "N", default_value = "16384")]
    pub(crate) max_in_flight: NonZeroU32,

    /// Connect-metric series the kernel keeps (one per process, destination and outcome).
    /// Attempts past the bound are counted in an overflow series per outcome. 0 turns the
    /// connect metrics off.
    #[arg(long, value_name = "N", default_value = "4096")]
    pub(crate) metrics_max_series: u32,

    /// Size of the kernel-to-agent ring buffer in bytes: a power of two, at least 4096.
    /// Records that do not fit are counted as `ringbuf_full`.
    #[arg(long, value_name = "BYTES", default_value = "4194304", value_parser = parse_ring_size)]
    pub(crate) ring_buffer_bytes: u32,

    /// Spans waiting for the OTLP exporter. When full, new spans are dropped and counted as
    /// `export_queue_full`. A queued span takes about half a KiB: its process and stacks are
    /// shared, and it is encoded only in the batch that sends it.
    #[arg(long, value_name = "SPANS", default_value = "8192")]
    pub(crate) export_queue_size: NonZeroU32,

    /// Spans per OTLP export request, at most 2048: with stacks a span is 1 to 2 KiB, and a
    /// request must stay under the 4 MiB a gRPC server accepts by default.
    #[arg(long, value_name = "SPANS", default_value = "512", value_parser = clap::value_parser!(u32).range(1..=2048))]
    pub(crate) export_batch_size: u32,

    /// How long to retry one failed export, with backoff, before its spans are dropped and
    /// counted as `export_failed`.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub(crate) export_retry_timeout: Duration,

    /// Print accounting counters, and the busiest destinations with their failures, on
    /// stderr this often (e.g. 10s). 0 turns it off; a final summary is always printed at
    /// exit.
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = parse_duration)]
    pub(crate) stats_interval: Duration,

    /// Export the connect metrics (every attempt, by service, destination and outcome) and
    /// synspan's own counters (seen, exported, dropped by reason) as OTLP metrics to the same
    /// endpoint this often. 0 turns them off.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub(crate) metrics_interval: Duration,

    /// On SIGINT or SIGTERM, wait this long for pending spans to be exported. A second
    /// signal exits at once.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub(crate) shutdown_timeout: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s).map_err(|e| format!("{e}; write a duration such as 500ms, 5s or 1m"))
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err("expected a number from 0 to 1, such as 0.01".into()),
    }
}

fn parse_ring_size(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n) if n >= 4096 && n.is_power_of_two() => Ok(n),
        _ => Err("expected a power of two of at least 4096, such as 4194304 (4 MiB)".into()),
    }
}

/// What the agent runs with: the flags, and what they and the environment resolve to.
#[derive(Debug)]
pub(crate) struct Settings {
    pub(crate) flags: Cli,
    /// What goes to stdout for each attempt; `None` for `--output none`.
    pub(crate) stdout: Option<Format>,
    /// Where spans and self-metrics go, before their TLS files are read; `None` when
    /// nothing is exported.
    pub(crate) export: Option<otlp::settings::Signals>,
}

impl Settings {
    /// Resolves the flags against `env` (the process's environment, in the binary) and
    /// checks what clap cannot. The message names the problem and the fix.
    pub(crate) fn resolve(flags: Cli, env: Env) -> Result<Self, String> {
        let export = otlp::settings::resolve(
            &otlp::Flags {
                protocol: flags.otlp_protocol,
                endpoint: flags.otlp_endpoint.as_ref(),
                ca_file: flags.otlp_ca_file.as_deref(),
                client_cert: flags.otlp_client_cert.as_deref(),
                client_key: flags.otlp_client_key.as_deref(),
            },
            env,
        )
        .map_err(|e| e.to_string())?;
        let stdout = match flags.output {
            Output::Console => Some(Format::Console),
            Output::Json => Some(Format::Json),
            Output::None if export.is_none() => {
                return Err(
                    "--output none without an OTLP endpoint would send every attempt nowhere: \
                     give --otlp-endpoint (or OTEL_EXPORTER_OTLP_ENDPOINT), or another --output"
                        .into(),
                );
            }
            Output::None => None,
        };
        Ok(Self {
            flags,
            stdout,
            export,
        })
    }
}

impl Cli {
    /// The in-kernel policy these flags ask for. `agent_tgid`: synspan's own process as
    /// the kernel sees it, whose connections are not traced (0: none).
    pub(crate) fn policy(&self, agent_tgid: u32) -> Policy {
        let rate = self
            .sample_successes
            .unwrap_or(if self.failures_only { 0.0 } else { 1.0 });
        let slow = self
            .slow_threshold
            .or(self.failures_only.then_some(Duration::from_secs(1)))
            .unwrap_or_default();
        Policy {
            slow_ns: u64::try_from(slow.as_nanos()).unwrap_or(u64::MAX),
            sample_below: (rate * f64::from(u32::MAX)) as u32,
            sample_all: u8::from(rate >= 1.0),
            keep_retried: u8::from(self.keep_retried || self.failures_only),
            stacks: u8::from(!self.no_stacks),
            filters: [
                (!self.pids.is_empty(), filter::PID),
                (!self.cgroups.is_empty(), filter::CGROUP),
                (!self.dest_ports.is_empty(), filter::PORT),
                (!self.dests.is_empty(), filter::DEST),
            ]
            .into_iter()
            .filter(|(on, _)| *on)
            .fold(0, |bits, (_, bit)| bits | bit),
            agent_tgid,
            drop_reasons: u8::from(!self.no_drop_reasons),
            reserved: [0; 3],
            // Set by the agent, which knows this kernel's numbers.
            answered_reasons: [0; MAX_ANSWERED_REASONS],
            count_series: u8::from(self.metrics_max_series > 0),
            reserved_end: [0; 3],
            span_rate_limit: self.span_rate_limit,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("synspan").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_keep_everything() {
        let c = cli(&[]).unwrap();
        assert_eq!(c.output, Output::Console);
        assert_eq!(
            c.policy(7),
            Policy {
                agent_tgid: 7,
                drop_reasons: 1,
                count_series: 1,
                span_rate_limit: DEFAULT_SPAN_RATE_LIMIT,
                ..Policy::ALL
            }
        );
    }

    fn resolve(args: &[&str], vars: &[(&str, &str)]) -> Result<Settings, String> {
        let env = |var: &str| vars.iter().find(|(k, _)| *k == var).map(|(_, v)| v.to_string());
        Settings::resolve(cli(args).unwrap(), &env)
    }

    #[test]
    fn settings_from_flags_and_environment() {
        let s = resolve(&[], &[]).unwrap();
        assert_eq!(s.stdout, Some(Format::Console));
        assert!(s.export.is_none());
        let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")];
        let s = resolve(&["--output", "none"], &env).unwrap();
        assert_eq!(s.stdout, None);
        let export = s.export.unwrap();
        assert_eq!(export.traces.endpoint, "http://127.0.0.1:4317/");
        // The flag wins over the variable.
        let s = resolve(&["--otlp-endpoint", "http://127.0.0.2:4317"], &env).unwrap();
        assert_eq!(s.export.unwrap().traces.endpoint, "http://127.0.0.2:4317/");
        let err = resolve(&["--output", "none"], &[]).unwrap_err();
        assert!(err.contains("send every attempt nowhere"), "{err}");
        let err = resolve(&[], &[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317")]).unwrap_err();
        assert!(err.contains("OTEL_EXPORTER_OTLP_ENDPOINT"), "{err}");
        let s = resolve(&["--output", "json"], &[]).unwrap();
        assert_eq!(s.stdout, Some(Format::Json));
    }

    #[test]
    fn failures_only_policy() {
        let p = cli(&["--failures-only"]).unwrap().policy(0);
        assert_eq!(p.sample_all, 0);
        assert_eq!(p.sample_below, 0);
        assert_eq!(p.keep_retried, 1);
        assert_eq!(p.slow_ns, 1_000_000_000);
        let p = cli(&["--failures-only", "--slow-threshold", "250ms", "--no-stacks"])
            .unwrap()
            .policy(0);
        assert_eq!(p.slow_ns, 250_000_000);
        assert_eq!(p.stacks, 0);
    }

    #[test]
    fn filters() {
        let c = cli(&[
            "--pid",
            "1,2",
            "--dest-port",
            "443",
            "--dest",
            "10.0.0.0/8,fd00::/8",
        ])
        .unwrap();
        assert_eq!(c.pids, [1, 2]);
        assert_eq!(c.dests.len(), 2);
        assert_eq!(c.policy(0).filters, filter::PID | filter::PORT | filter::DEST);
        assert!(cli(&["--dest", "10.0.0.0/33"]).is_err());
        assert!(cli(&["--dest-port", "70000"]).is_err());
    }

    #[test]
    fn sampling_rate() {
        let p = cli(&["--sample-successes", "0"]).unwrap().policy(0);
        assert_eq!((p.sample_all, p.sample_below, p.keep_retried), (0, 0, 0));
        let p = cli(&["--sample-successes", "0.5"]).unwrap().policy(0);
        assert_eq!(p.sample_all, 0);
        assert!((p.sample_below as f64 / u32::MAX as f64 - 0.5).abs() < 1e-6);
        assert!(cli(&["--sample-successes", "1.5"]).is_err());
    }

    #[test]
    fn bad_endpoint_exits_2() {
        let err = cli(&["--otlp-endpoint", "localhost"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn bad_values_exit_2() {
        for args in [
            &["--output", "xml"][..],
            &["--ring-buffer-bytes", "1000"],
            &["--stats-interval", "soon"],
            &["--max-in-flight", "0"],
            &["--export-batch-size", "4096"],
            &["--no-such-flag"],
        ] {
            let err = cli(args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
    }
}
