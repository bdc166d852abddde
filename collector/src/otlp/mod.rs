//! The OTLP client every signal shares: spans ([`crate::sink::otlp`]) and synspan's own
//! counters ([`crate::self_metrics`]) go out over the same connection, with the same TLS,
//! headers, compression, timeout and retry rules, over gRPC or HTTP.
//!
//! - [`settings`]: protocol, endpoint, headers, compression, timeout and TLS files, from the
//!   flags and the environment as the OTLP exporter specification orders them.
//! - [`tls`]: the TLS files read and checked.
//! - [`client`]: one connection per collector, one export try, over either transport.
//! - [`http`]: the OTLP/HTTP transport: a POST and how its answer reads.
//! - [`retry`]: which failures are retried, and after how long.

pub(crate) mod client;
pub(crate) mod http;
pub(crate) mod retry;
pub(crate) mod settings;
pub(crate) mod tls;

pub(crate) use client::{Client, Clients};
pub(crate) use settings::{Flags, Protocol, Settings, parse_endpoint, parse_protocol, redacted};
pub(crate) use tls::{TlsError, TlsFile, TlsMaterial};

#[derive(Debug, thiserror::Error)]
pub(crate) enum OtlpError {
    #[error("invalid {var}: {problem}")]
    Variable { var: String, problem: String },
    #[error("{var}: {problem}; expected `key1=value1,key2=value2` (values percent-encoded)")]
    Headers { var: String, problem: String },
    #[error("{var}={value}: unknown compression; use gzip or none")]
    Compression { var: String, value: String },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("OTLP endpoint {endpoint}: {source}")]
    Endpoint {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("OTLP endpoint {endpoint}: TLS setup: {problem}")]
    TlsSetup { endpoint: String, problem: String },
}

/// An OTLP timestamp: nanoseconds since the Unix epoch, 0 for a time before it.
pub(crate) fn unix_nanos(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Where one signal goes: its settings and the TLS material its files hold.
#[derive(Clone, Debug)]
pub(crate) struct Destination {
    pub(crate) settings: Settings,
    pub(crate) tls: TlsMaterial,
}

impl Destination {
    fn load(settings: Settings) -> Result<Self, OtlpError> {
        let files = &settings.tls;
        let tls = TlsMaterial::load(
            files.ca.as_ref(),
            files.client_cert.as_ref(),
            files.client_key.as_ref(),
        )?;
        Ok(Self { settings, tls })
    }
}

/// Spans and self-metrics, each with its destination.
#[derive(Clone, Debug)]
pub(crate) struct Export {
    pub(crate) traces: Destination,
    pub(crate) metrics: Destination,
}

impl Export {
    /// Reads both signals' TLS files, so that a mistake in either stops synspan before it
    /// loads anything.
    pub(crate) fn load(signals: settings::Signals) -> Result<Self, OtlpError> {
        Ok(Self {
            traces: Destination::load(signals.traces)?,
            metrics: Destination::load(signals.metrics)?,
        })
    }

    /// Clients for both signals; they share one channel when they go to the same place.
    pub(crate) fn connect(&self) -> Result<Clients, OtlpError> {
        Clients::new(&self.traces, &self.metrics)
    }
}
