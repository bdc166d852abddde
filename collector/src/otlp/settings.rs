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
    pub(crate) endpoint: Option<&'a http::Uri>,
    pub(crate) ca_file: Option<&'a Path>,
    pub(crate) client_cert: Option<&'a Path>,
    pub(crate) client_key: Option<&'a Path>,
}

/// How one signal is exported.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Settings {
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
    let metrics = endpoint(Signal::Metrics, flags, env)?.unwrap_or_else(|| traces.clone());
    Ok(Some(Signals {
        traces: settings(Signal::Traces, traces, flags, env)?,
        metrics: settings(Signal::Metrics, metrics, flags, env)?,
    }))
}

fn settings(signal: Signal, endpoint: http::Uri, flags: &Flags, env: Env) -> Result<Settings, OtlpError> {
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

fn endpoint(signal: Signal, flags: &Flags, env: Env) -> Result<Option<http::Uri>, OtlpError> {
    if let Some(uri) = flags.endpoint {
        return Ok(Some(uri.clone()));
    }
    lookup(signal, "ENDPOINT", env)
        .map(|(var, value)| parse_endpoint(&value).map_err(|problem| OtlpError::Variable { var, problem }))
        .transpose()
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

/// An OTLP gRPC endpoint: `http://` or `https://`, a host, an optional port, no path.
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
    if !matches!(uri.path(), "" | "/") {
        return Err(format!("OTLP gRPC takes no path (got `{}`); {hint}", uri.path()));
    }
    Ok(uri)
}

/// An endpoint fit for logs: user information (a password) is cut out.
pub(crate) fn redacted(uri: &http::Uri) -> String {
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
    let host = authority.rsplit('@').next().unwrap_or_default();
    format!("{}://{host}", uri.scheme_str().unwrap_or("http"))
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
        assert!(
            parse_endpoint("http://x:4317/v1/traces")
                .unwrap_err()
                .contains("no path")
        );
        assert!(parse_endpoint("http://:4317").is_err());
    }

    #[test]
    fn endpoint_logs_without_password() {
        let uri = parse_endpoint("https://user:secret@collector:4317").unwrap();
        assert_eq!(redacted(&uri), "https://collector:4317");
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
