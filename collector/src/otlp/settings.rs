//! Where and how each signal is exported, in the order the OTLP exporter specification gives:
//! a flag, else the signal's own variable (`OTEL_EXPORTER_OTLP_TRACES_*`,
//! `OTEL_EXPORTER_OTLP_METRICS_*`), else the generic `OTEL_EXPORTER_OTLP_*`. A variable set to
//! the empty string counts as unset. The environment is a lookup passed in: resolving touches
//! nothing else, so the precedence is tested without the process's own environment.

use std::{fmt, path::Path, time::Duration};

use tonic::{
    codec::CompressionEncoding,
    metadata::{MetadataKey, MetadataMap, MetadataValue},
};

use super::{OtlpError, TlsError, TlsFile};
use crate::enrich::process::percent_decode;

/// Looks a variable up: `std::env::var(..).ok()` outside the tests.
pub(crate) type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Signal {
    Traces,
    Metrics,
}

impl Signal {
    /// What the specification appends to a base URL for the signal over HTTP.
    fn http_path(self) -> &'static str {
        match self {
            Signal::Traces => "v1/traces",
            Signal::Metrics => "v1/metrics",
        }
    }

    /// The signal's variable for `option` first, then the generic one.
    fn vars(self, option: &str) -> [String; 2] {
        let signal = match self {
            Signal::Traces => "TRACES",
            Signal::Metrics => "METRICS",
        };
        [
            format!("OTEL_EXPORTER_OTLP_{signal}_{option}"),
            format!("OTEL_EXPORTER_OTLP_{option}"),
        ]
    }
}

/// The command line's say, which wins over every variable. The flags apply to both signals.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Flags<'a> {
    pub(crate) protocol: Option<Protocol>,
    pub(crate) endpoint: Option<&'a http::Uri>,
    pub(crate) ca_file: Option<&'a Path>,
    pub(crate) client_cert: Option<&'a Path>,
    pub(crate) client_key: Option<&'a Path>,
}

/// The OTLP transport, as `OTEL_EXPORTER_OTLP_PROTOCOL` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Protocol {
    Grpc,
    HttpProtobuf,
}

impl Protocol {
    /// gRPC, not the specification's `http/protobuf`: synspan exported over gRPC before it
    /// had HTTP, and the specification lets an exporter keep the default it shipped with.
    pub(crate) const DEFAULT: Self = Self::Grpc;

    /// Where a collector listens for it by default.
    pub(crate) fn default_port(self) -> u16 {
        match self {
            Self::Grpc => 4317,
            Self::HttpProtobuf => 4318,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::HttpProtobuf => "http/protobuf",
        }
    }
}

/// `grpc` or `http/protobuf`, as the specification spells them.
pub(crate) fn parse_protocol(s: &str) -> Result<Protocol, String> {
    match s.trim() {
        "grpc" => Ok(Protocol::Grpc),
        "http/protobuf" => Ok(Protocol::HttpProtobuf),
        "http/json" => Err("http/json is not supported; use http/protobuf or grpc".into()),
        other => Err(format!("unknown protocol `{other}`; use grpc or http/protobuf")),
    }
}

/// How one signal is exported.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Settings {
    pub(crate) protocol: Protocol,
    /// gRPC: scheme and authority. HTTP: the whole URL requests are posted to.
    pub(crate) endpoint: http::Uri,
    pub(crate) headers: Headers,
    pub(crate) compression: Option<CompressionEncoding>,
    /// One try of one request.
    pub(crate) timeout: Duration,
    pub(crate) tls: TlsFiles,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct TlsFiles {
    pub(crate) ca: Option<TlsFile>,
    pub(crate) client_cert: Option<TlsFile>,
    pub(crate) client_key: Option<TlsFile>,
}

/// Headers sent with every request (API keys, tenants). Their values never reach a log.
#[derive(Clone, Default)]
pub(crate) struct Headers(pub MetadataMap);

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set()
            .entries(self.0.keys().map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => k.as_str(),
                tonic::metadata::KeyRef::Binary(k) => k.as_str(),
            }))
            .finish()
    }
}

impl PartialEq for Headers {
    fn eq(&self, other: &Self) -> bool {
        self.0.clone().into_headers() == other.0.clone().into_headers()
    }
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Signals {
    pub(crate) traces: Settings,
    pub(crate) metrics: Settings,
}

/// What the specification defaults `OTEL_EXPORTER_OTLP_TIMEOUT` to.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Both signals' settings, or `None` when no endpoint is given for spans: then nothing is
/// exported. The metrics go where the spans go unless an endpoint is given for them.
pub(crate) fn resolve(flags: &Flags, env: Env) -> Result<Option<Signals>, OtlpError> {
    let Some(traces) = endpoint(Signal::Traces, flags, env)? else {
        return Ok(None);
    };
    let metrics = endpoint(Signal::Metrics, flags, env)?.unwrap_or_else(|| traces.follow());
    let traces_protocol = protocol(Signal::Traces, flags, env)?;
    let metrics_protocol = protocol(Signal::Metrics, flags, env)?;
    Ok(Some(Signals {
        traces: settings(
            Signal::Traces,
            traces_protocol,
            traces.url(Signal::Traces, traces_protocol)?,
            flags,
            env,
        )?,
        metrics: settings(
            Signal::Metrics,
            metrics_protocol,
            metrics.url(Signal::Metrics, metrics_protocol)?,
            flags,
            env,
        )?,
    }))
}

fn protocol(signal: Signal, flags: &Flags, env: Env) -> Result<Protocol, OtlpError> {
    if let Some(protocol) = flags.protocol {
        return Ok(protocol);
    }
    lookup(signal, "PROTOCOL", env).map_or(Ok(Protocol::DEFAULT), |(var, value)| {
        parse_protocol(&value).map_err(|problem| OtlpError::Variable { var, problem })
    })
}

/// An endpoint as it was given, with where it came from for messages.
#[derive(Clone, Debug)]
struct GivenEndpoint {
    uri: http::Uri,
    source: String,
    /// A signal's own variable: its URL is used as is. The flag and the generic variable
    /// are a base that each signal's path is appended to.
    as_is: bool,
}

impl GivenEndpoint {
    /// The metrics' endpoint when none is given for them: the spans' collector.
    fn follow(&self) -> Self {
        let mut followed = self.clone();
        if followed.as_is {
            // A URL given for the spans names their path; the metrics' is its sibling.
            followed.as_is = false;
            let path = followed.uri.path();
            let base = path.strip_suffix("v1/traces").unwrap_or(path).to_owned();
            followed.uri = with_path(&followed.uri, &base);
        }
        followed
    }

    fn url(&self, signal: Signal, protocol: Protocol) -> Result<http::Uri, OtlpError> {
        match protocol {
            Protocol::Grpc if !matches!(self.uri.path(), "" | "/") => Err(OtlpError::Variable {
                var: self.source.clone(),
                problem: format!(
                    "OTLP gRPC takes no path (got `{}`); expected a URL such as http://127.0.0.1:4317, \
                     or use --otlp-protocol http/protobuf",
                    self.uri.path()
                ),
            }),
            Protocol::Grpc => Ok(self.uri.clone()),
            Protocol::HttpProtobuf if self.as_is => Ok(self.uri.clone()),
            Protocol::HttpProtobuf => {
                let base = self.uri.path().trim_end_matches('/');
                Ok(with_path(&self.uri, &format!("{base}/{}", signal.http_path())))
            }
        }
    }
}

fn with_path(uri: &http::Uri, path: &str) -> http::Uri {
    let mut parts = uri.clone().into_parts();
    let path = if path.is_empty() { "/" } else { path };
    parts.path_and_query = path.parse().ok();
    // Only the path changed, and it came from a valid URI.
    http::Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
}

fn settings(
    signal: Signal,
    protocol: Protocol,
    endpoint: http::Uri,
    flags: &Flags,
    env: Env,
) -> Result<Settings, OtlpError> {
    let tls = TlsFiles {
        ca: tls_file(signal, flags.ca_file, "--otlp-ca-file", "CERTIFICATE", env),
        client_cert: tls_file(
            signal,
            flags.client_cert,
            "--otlp-client-cert",
            "CLIENT_CERTIFICATE",
            env,
        ),
        client_key: tls_file(signal, flags.client_key, "--otlp-client-key", "CLIENT_KEY", env),
    };
    if tls != TlsFiles::default() && endpoint.scheme_str() != Some("https") {
        return Err(TlsError::NotHttps(redacted(&endpoint)).into());
    }
    Ok(Settings {
        protocol,
        headers: headers(signal, env)?,
        compression: compression(signal, env)?,
        timeout: timeout(signal, env)?,
        endpoint,
        tls,
    })
}

/// The signal's variable, else the generic one, with its name for messages.
fn lookup(signal: Signal, option: &str, env: Env) -> Option<(String, String)> {
    signal
        .vars(option)
        .into_iter()
        .find_map(|var| env(&var).filter(|v| !v.is_empty()).map(|v| (var, v)))
}

fn endpoint(signal: Signal, flags: &Flags, env: Env) -> Result<Option<GivenEndpoint>, OtlpError> {
    if let Some(uri) = flags.endpoint {
        return Ok(Some(GivenEndpoint {
            uri: uri.clone(),
            source: "--otlp-endpoint".into(),
            as_is: false,
        }));
    }
    let Some((var, value)) = lookup(signal, "ENDPOINT", env) else {
        return Ok(None);
    };
    let uri = parse_endpoint(&value).map_err(|problem| OtlpError::Variable {
        var: var.clone(),
        problem,
    })?;
    let as_is = var != "OTEL_EXPORTER_OTLP_ENDPOINT";
    Ok(Some(GivenEndpoint {
        uri,
        source: var,
        as_is,
    }))
}

fn tls_file(signal: Signal, flag: Option<&Path>, flag_name: &str, option: &str, env: Env) -> Option<TlsFile> {
    if let Some(path) = flag {
        return Some(TlsFile {
            what: flag_name.into(),
            path: path.to_path_buf(),
        });
    }
    lookup(signal, option, env).map(|(var, value)| TlsFile {
        what: var,
        path: value.into(),
    })
}

/// `key1=value1,key2=value2`, values percent-encoded, as the specification writes them. The
/// signal's variable replaces the generic one, as it does for every other option.
fn headers(signal: Signal, env: Env) -> Result<Headers, OtlpError> {
    let mut map = MetadataMap::new();
    let Some((var, text)) = lookup(signal, "HEADERS", env) else {
        return Ok(Headers(map));
    };
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let problem = |what: String| OtlpError::Headers {
            var: var.clone(),
            problem: what,
        };
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| problem("an entry has no `=`".into()))?;
        let key = key.trim().to_ascii_lowercase();
        let key = MetadataKey::from_bytes(key.as_bytes())
            .map_err(|_| problem(format!("`{key}` is not a valid header name")))?;
        let value = percent_decode(value.trim())
            .and_then(|v| MetadataValue::try_from(v.as_str()).ok())
            .ok_or_else(|| problem(format!("the value of `{key}` is not a valid header value")))?;
        map.insert(key, value);
    }
    Ok(Headers(map))
}

fn compression(signal: Signal, env: Env) -> Result<Option<CompressionEncoding>, OtlpError> {
    match lookup(signal, "COMPRESSION", env) {
        None => Ok(None),
        Some((_, v)) if v.eq_ignore_ascii_case("none") => Ok(None),
        Some((_, v)) if v.eq_ignore_ascii_case("gzip") => Ok(Some(CompressionEncoding::Gzip)),
        Some((var, value)) => Err(OtlpError::Compression { var, value }),
    }
}

/// Milliseconds, as the specification says.
fn timeout(signal: Signal, env: Env) -> Result<Duration, OtlpError> {
    let Some((var, value)) = lookup(signal, "TIMEOUT", env) else {
        return Ok(DEFAULT_TIMEOUT);
    };
    match value.trim().parse::<u64>() {
        Ok(ms) if ms > 0 => Ok(Duration::from_millis(ms)),
        _ => Err(OtlpError::Variable {
            var,
            problem: format!("`{value}` is not a positive number of milliseconds, such as 10000"),
        }),
    }
}

/// An OTLP endpoint: `http://` or `https://` and a host; the port and a path are optional
/// (gRPC refuses a path once the protocol is known).
pub(crate) fn parse_endpoint(s: &str) -> Result<http::Uri, String> {
    let hint = "expected a URL such as http://127.0.0.1:4317";
    let uri: http::Uri = s.parse().map_err(|e| format!("{e}; {hint}"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        Some(other) => return Err(format!("unsupported scheme `{other}`; {hint}")),
        None => return Err(format!("no scheme; {hint}")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("no host; {hint}"));
    }
    Ok(uri)
}

impl Settings {
    /// A warning when the endpoint's port is the other protocol's usual one: a collector
    /// answers gRPC on 4317 and HTTP on 4318, and the wrong pairing fails every export.
    pub(crate) fn port_mismatch(&self) -> Option<String> {
        let other = match self.protocol {
            Protocol::Grpc => Protocol::HttpProtobuf,
            Protocol::HttpProtobuf => Protocol::Grpc,
        };
        (self.endpoint.port_u16() == Some(other.default_port())).then(|| {
            format!(
                "OTLP endpoint {} uses port {}, where collectors take {}; this export speaks {} \
                 (collectors take it on {}): check --otlp-protocol and the endpoint",
                redacted(&self.endpoint),
                other.default_port(),
                other.name(),
                self.protocol.name(),
                self.protocol.default_port()
            )
        })
    }
}

/// An endpoint fit for logs: user information (a password) is cut out.
pub(crate) fn redacted(uri: &http::Uri) -> String {
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
    let host = authority.rsplit('@').next().unwrap_or_default();
    // The path says which HTTP URL is posted to; a query could hold a token.
    let path = uri.path().trim_end_matches('/');
    format!("{}://{host}{path}", uri.scheme_str().unwrap_or("http"))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn resolve_with(flags: &Flags, vars: &[(&str, &str)]) -> Result<Option<Signals>, OtlpError> {
        let vars: HashMap<String, String> =
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        resolve(flags, &|var| vars.get(var).cloned())
    }

    fn signals(flags: &Flags, vars: &[(&str, &str)]) -> Signals {
        resolve_with(flags, vars).unwrap().expect("an endpoint")
    }

    #[test]
    fn no_endpoint_no_export() {
        assert!(resolve_with(&Flags::default(), &[]).unwrap().is_none());
        // Metrics alone do not turn the export on: they report on the spans' export.
        let only_metrics = [("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "http://m:4317")];
        assert!(resolve_with(&Flags::default(), &only_metrics).unwrap().is_none());
        // Empty is unset.
        assert!(
            resolve_with(&Flags::default(), &[("OTEL_EXPORTER_OTLP_ENDPOINT", "")])
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn endpoint_precedence() {
        let flag: http::Uri = "http://flag:4317".parse().unwrap();
        let all = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://generic:4317"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4317"),
            ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "http://metrics:4317"),
        ];
        let s = signals(&Flags::default(), &all);
        assert_eq!(s.traces.endpoint, "http://traces:4317/");
        assert_eq!(s.metrics.endpoint, "http://metrics:4317/");
        let flags = Flags {
            endpoint: Some(&flag),
            ..Flags::default()
        };
        let s = signals(&flags, &all);
        assert_eq!(s.traces.endpoint, flag);
        assert_eq!(s.metrics.endpoint, flag);
        let s = signals(&Flags::default(), &all[..1]);
        assert_eq!(s.traces.endpoint, "http://generic:4317/");
        assert_eq!(s.metrics.endpoint, "http://generic:4317/");
        // Without an endpoint of their own the metrics follow the spans.
        let s = signals(&Flags::default(), &all[1..2]);
        assert_eq!(s.metrics.endpoint, "http://traces:4317/");
        let err = resolve_with(
            &Flags::default(),
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317")],
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("invalid OTEL_EXPORTER_OTLP_ENDPOINT: "), "{err}");
    }

    #[test]
    fn signal_variables_win_over_generic_ones() {
        let vars = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c:4317"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=generic,tenant=t0"),
            ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "Api-Key=abc%3D%3D"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
            ("OTEL_EXPORTER_OTLP_METRICS_COMPRESSION", "none"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            ("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "700"),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/generic-ca.pem"),
            ("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", "/traces-ca.pem"),
        ];
        let s = signals(&Flags::default(), &vars);
        let (t, m) = (&s.traces, &s.metrics);
        // The signal's headers replace the generic ones, they do not merge.
        assert_eq!(t.headers.0.get("api-key").unwrap(), "abc==");
        assert!(t.headers.0.get("tenant").is_none());
        assert_eq!(m.headers.0.get("api-key").unwrap(), "generic");
        assert_eq!(m.headers.0.get("tenant").unwrap(), "t0");
        assert_eq!(t.compression, Some(CompressionEncoding::Gzip));
        assert_eq!(m.compression, None);
        assert_eq!(t.timeout, Duration::from_millis(2500));
        assert_eq!(m.timeout, Duration::from_millis(700));
        let ca = t.tls.ca.as_ref().unwrap();
        assert_eq!(
            (ca.what.as_str(), ca.path.to_str()),
            ("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", Some("/traces-ca.pem"))
        );
        let ca = m.tls.ca.as_ref().unwrap();
        assert_eq!(
            (ca.what.as_str(), ca.path.to_str()),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", Some("/generic-ca.pem"))
        );

        // Flags win over both.
        let flags = Flags {
            ca_file: Some(Path::new("/flag-ca.pem")),
            ..Flags::default()
        };
        let s = signals(&flags, &vars);
        for ca in [&s.traces.tls.ca, &s.metrics.tls.ca] {
            assert_eq!(ca.as_ref().unwrap().what, "--otlp-ca-file");
        }
    }

    #[test]
    fn defaults() {
        let s = signals(
            &Flags::default(),
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317")],
        );
        for signal in [&s.traces, &s.metrics] {
            assert_eq!(signal.timeout, DEFAULT_TIMEOUT);
            assert_eq!(signal.compression, None);
            assert!(signal.headers.0.is_empty());
            assert_eq!(signal.tls, TlsFiles::default());
        }
        assert_eq!(s.traces, s.metrics);
    }

    #[test]
    fn bad_values_name_their_variable() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317");
        let err = |var: (&str, &str)| {
            resolve_with(&Flags::default(), &[endpoint, var])
                .unwrap_err()
                .to_string()
        };
        let e = err(("OTEL_EXPORTER_OTLP_HEADERS", "secret-without-equals"));
        assert!(
            e.starts_with("OTEL_EXPORTER_OTLP_HEADERS: an entry has no `=`"),
            "{e}"
        );
        assert!(!e.contains("secret"), "{e}");
        let e = err(("OTEL_EXPORTER_OTLP_METRICS_HEADERS", "bad key=1"));
        assert!(e.contains("`bad key` is not a valid header name"), "{e}");
        let e = err(("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "zstd"));
        assert!(e.contains("unknown compression; use gzip or none"), "{e}");
        for ms in ["0", "10s", "-1"] {
            let e = err(("OTEL_EXPORTER_OTLP_TIMEOUT", ms));
            assert!(e.starts_with("invalid OTEL_EXPORTER_OTLP_TIMEOUT:"), "{e}");
        }
        let e = err(("OTEL_EXPORTER_OTLP_CLIENT_KEY", "/key.pem"));
        assert!(e.contains("is not https://"), "{e}");
    }

    #[test]
    fn endpoints() {
        assert!(parse_endpoint("http://127.0.0.1:4317").is_ok());
        assert!(parse_endpoint("https://collector.example:4317/").is_ok());
        assert!(parse_endpoint("127.0.0.1:4317").unwrap_err().contains("http://"));
        assert!(
            parse_endpoint("ftp://x:1")
                .unwrap_err()
                .contains("unsupported scheme")
        );
        assert!(parse_endpoint("http://:4317").is_err());
        // A path is the protocol's business: gRPC refuses one, HTTP takes it.
        let err = resolve_with(
            &Flags::default(),
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://x:4317/v1/traces")],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("invalid OTEL_EXPORTER_OTLP_ENDPOINT: OTLP gRPC takes no path"),
            "{err}"
        );
        let flag: http::Uri = "http://x:4317/otlp".parse().unwrap();
        let flags = Flags {
            endpoint: Some(&flag),
            ..Flags::default()
        };
        let err = resolve_with(&flags, &[]).unwrap_err().to_string();
        assert!(
            err.starts_with("invalid --otlp-endpoint: OTLP gRPC takes no path"),
            "{err}"
        );
    }

    fn http_signals(vars: &[(&str, &str)]) -> Signals {
        let mut vars = vars.to_vec();
        vars.push(("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"));
        signals(&Flags::default(), &vars)
    }

    #[test]
    fn http_endpoints_as_the_specification_builds_them() {
        // The generic endpoint is a base: each signal's path is appended.
        for base in ["http://c:4318", "http://c:4318/"] {
            let s = http_signals(&[("OTEL_EXPORTER_OTLP_ENDPOINT", base)]);
            assert_eq!(s.traces.endpoint, "http://c:4318/v1/traces", "{base}");
            assert_eq!(s.metrics.endpoint, "http://c:4318/v1/metrics", "{base}");
            assert_eq!(s.traces.protocol, Protocol::HttpProtobuf);
        }
        let s = http_signals(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c/otlp/")]);
        assert_eq!(s.traces.endpoint, "https://c/otlp/v1/traces");
        assert_eq!(s.metrics.endpoint, "https://c/otlp/v1/metrics");
        // A signal's own endpoint is used as is, without a path the root path.
        let s = http_signals(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://generic:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:4318/custom/spans"),
            ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "http://m:4318"),
        ]);
        assert_eq!(s.traces.endpoint, "http://t:4318/custom/spans");
        assert_eq!(s.metrics.endpoint, "http://m:4318/");
        // Metrics without an endpoint of their own go to the spans' collector, at their path.
        let s = http_signals(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:4318/v1/traces")]);
        assert_eq!(s.metrics.endpoint, "http://t:4318/v1/metrics");
        let s = http_signals(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:4318/x")]);
        assert_eq!(s.metrics.endpoint, "http://t:4318/x/v1/metrics");
        // The flag is a base, like the generic variable, and wins over the signals' own.
        let flag: http::Uri = "http://flag:4318".parse().unwrap();
        let flags = Flags {
            endpoint: Some(&flag),
            protocol: Some(Protocol::HttpProtobuf),
            ..Flags::default()
        };
        let s = signals(
            &flags,
            &[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:4318/v1/traces")],
        );
        assert_eq!(s.traces.endpoint, "http://flag:4318/v1/traces");
        assert_eq!(s.metrics.endpoint, "http://flag:4318/v1/metrics");
    }

    #[test]
    fn protocol_precedence() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318");
        let s = signals(&Flags::default(), &[endpoint]);
        assert_eq!(s.traces.protocol, Protocol::Grpc, "the default");
        let vars = [
            endpoint,
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
        ];
        let s = signals(&Flags::default(), &vars);
        assert_eq!(s.traces.protocol, Protocol::HttpProtobuf);
        assert_eq!(s.traces.endpoint, "http://c:4318/v1/traces");
        assert_eq!(s.metrics.protocol, Protocol::Grpc);
        assert_eq!(s.metrics.endpoint, "http://c:4318/");
        let s = signals(
            &Flags::default(),
            &[endpoint, ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "http/protobuf")],
        );
        assert_eq!(s.traces.protocol, Protocol::Grpc);
        assert_eq!(s.metrics.protocol, Protocol::HttpProtobuf);
        let flags = Flags {
            protocol: Some(Protocol::Grpc),
            ..Flags::default()
        };
        let s = signals(&flags, &vars);
        assert_eq!(
            (s.traces.protocol, s.metrics.protocol),
            (Protocol::Grpc, Protocol::Grpc)
        );
        for (value, problem) in [
            (
                "http/json",
                "http/json is not supported; use http/protobuf or grpc",
            ),
            ("http", "unknown protocol `http`; use grpc or http/protobuf"),
        ] {
            let err = resolve_with(
                &Flags::default(),
                &[endpoint, ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", value)],
            )
            .unwrap_err()
            .to_string();
            assert_eq!(
                err,
                format!("invalid OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: {problem}")
            );
        }
    }

    #[test]
    fn a_port_of_the_other_protocol_is_warned_about() {
        let grpc_on_4318 = signals(
            &Flags::default(),
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")],
        );
        let warning = grpc_on_4318.traces.port_mismatch().unwrap();
        assert!(warning.contains("this export speaks grpc"), "{warning}");
        let http_on_4317 = http_signals(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317")]);
        assert!(http_on_4317.traces.port_mismatch().is_some());
        for fine in [
            http_signals(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")]),
            signals(
                &Flags::default(),
                &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317")],
            ),
            http_signals(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c")]),
        ] {
            assert_eq!(fine.traces.port_mismatch(), None);
        }
    }

    #[test]
    fn endpoint_logs_without_password() {
        let uri = parse_endpoint("https://user:secret@collector:4317").unwrap();
        assert_eq!(redacted(&uri), "https://collector:4317");
        let uri = parse_endpoint("https://user:secret@collector:4318/v1/traces?token=t").unwrap();
        assert_eq!(redacted(&uri), "https://collector:4318/v1/traces");
    }

    #[test]
    fn headers_never_logged() {
        let s = signals(
            &Flags::default(),
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=hunter2"),
            ],
        );
        let debug = format!("{s:?}");
        assert!(debug.contains("api-key") && !debug.contains("hunter2"), "{debug}");
    }
}
