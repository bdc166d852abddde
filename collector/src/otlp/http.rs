//! OTLP/HTTP with protobuf bodies: one pooled HTTP/1.1 client per TLS setting, shared by
//! every signal sent with it, and one POST per export try. The collector's answer is read as
//! the specification's "OTLP/HTTP Response" section says: a 2xx body is the service's
//! response message, anything else a failure whose body (a `google.rpc.Status`, or text) is
//! only a message for the log, and whose `Retry-After` is the wait before the next try.

use std::{
    io::Write as _,
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use super::{Destination, OtlpError, TlsMaterial, redacted, retry::ExportError};

/// A collector's answer is a few bytes (a partial success, an error message); anything
/// bigger is cut off rather than buffered.
const MAX_RESPONSE_BYTES: usize = 1 << 20;
/// What of a failure's body goes into the log.
const MAX_MESSAGE_CHARS: usize = 200;

/// hyper's client is a handle on shared state already, but a large one: signals and tries
/// clone an `Arc` of it.
pub(crate) type Pool = Arc<Client<HttpsConnector<HttpConnector>, Full<Bytes>>>;

/// A client for `destination`'s TLS setting; it connects when the first request goes out.
pub(crate) fn pool(destination: &Destination) -> Result<Pool, OtlpError> {
    let mut tcp = HttpConnector::new();
    // https URLs go through the TLS layer, which hands plain http ones down as they are.
    tcp.enforce_http(false);
    tcp.set_connect_timeout(Some(destination.settings.timeout));
    // A collector that vanished without closing the connection must not hold a request
    // until the retry timeout; the try's own timeout ends it, keepalives close the socket.
    tcp.set_keepalive(Some(Duration::from_secs(30)));
    tcp.set_nodelay(true);
    let tls = tls_config(&destination.settings.endpoint, &destination.tls)?;
    let connector = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(tcp);
    Ok(Arc::new(
        Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector),
    ))
}

/// The same trust as the gRPC transport: a CA given on purpose is the only one trusted,
/// otherwise the system's roots are; a client certificate when one is given.
fn tls_config(endpoint: &http::Uri, material: &TlsMaterial) -> Result<rustls::ClientConfig, OtlpError> {
    let setup = |problem: String| OtlpError::TlsSetup {
        endpoint: redacted(endpoint),
        problem,
    };
    let mut roots = rustls::RootCertStore::empty();
    match &material.ca {
        Some(pem) => {
            let certs = CertificateDer::pem_slice_iter(pem).filter_map(Result::ok);
            roots.add_parsable_certificates(certs);
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for err in &native.errors {
                tracing::debug!("skipping a system root certificate: {err}");
            }
            roots.add_parsable_certificates(native.certs);
        }
    }
    let builder =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| setup(e.to_string()))?
            .with_root_certificates(roots);
    match &material.identity {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(cert)
                .filter_map(Result::ok)
                .collect();
            let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| setup(e.to_string()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| setup(format!("the client certificate and key: {e}")))
        }
        None => Ok(builder.with_no_client_auth()),
    }
}

/// One signal's requests: its URL, headers and compression, over a shared pool.
#[derive(Clone)]
pub(crate) struct HttpExport {
    pub(crate) pool: Pool,
    pub(crate) url: http::Uri,
    pub(crate) headers: HeaderMap,
    pub(crate) gzip: bool,
}

impl HttpExport {
    /// One POST of an encoded request; `R` is the service's response.
    pub(crate) async fn export<R: prost::Message + Default>(&self, request: Bytes) -> Result<R, ExportError> {
        let body = if self.gzip { gzip(&request) } else { request };
        let mut post = http::Request::new(Full::new(body));
        *post.method_mut() = http::Method::POST;
        *post.uri_mut() = self.url.clone();
        let headers = post.headers_mut();
        headers.extend(self.headers.clone());
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-protobuf"),
        );
        headers.insert(
            header::USER_AGENT,
            HeaderValue::from_static(concat!("synspan/", env!("CARGO_PKG_VERSION"))),
        );
        if self.gzip {
            headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        }
        let response = self
            .pool
            .request(post)
            .await
            .map_err(|err| ExportError::Unreachable(error_chain(&err)))?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map(|collected| collected.to_bytes());
        if parts.status.is_success() {
            return Ok(accepted(&parts.headers, body.ok()));
        }
        Err(failure(
            parts.status,
            &parts.headers,
            &body.unwrap_or_default(),
            SystemTime::now(),
        ))
    }
}

/// A 2xx: the collector took the data. Its body is the service's response when it is
/// protobuf; some receivers answer JSON instead (otelite), which says nothing of a partial
/// success, so it reads as a full one rather than failing an export that worked.
fn accepted<R: prost::Message + Default>(headers: &HeaderMap, body: Option<Bytes>) -> R {
    let protobuf = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|t| t.starts_with("application/x-protobuf"));
    match body {
        Some(body) if protobuf => R::decode(body).unwrap_or_else(|err| {
            tracing::debug!("an accepted export's response is not protobuf ({err}); taken as a full success");
            R::default()
        }),
        _ => R::default(),
    }
}

fn gzip(data: &[u8]) -> Bytes {
    let mut encoder =
        flate2::write::GzEncoder::new(Vec::with_capacity(data.len() / 4), flate2::Compression::fast());
    // Writing to a Vec cannot fail.
    let _ = encoder.write_all(data);
    Bytes::from(encoder.finish().unwrap_or_default())
}

/// The error and its causes, for the log: hyper's own says only "client error (Connect)".
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A non-2xx answer. Its headers and body come from the collector: bounded, never trusted.
pub(crate) fn failure(status: StatusCode, headers: &HeaderMap, body: &[u8], now: SystemTime) -> ExportError {
    ExportError::Http {
        status,
        retry_after: headers
            .get(header::RETRY_AFTER)
            .and_then(|value| retry_after(value, now)),
        message: message(body),
    }
}

/// `Retry-After`: seconds, or an HTTP date. A date in the past or zero seconds says
/// nothing, and the backoff decides.
pub(crate) fn retry_after(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    let delay = match text.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => httpdate::parse_http_date(text).ok()?.duration_since(now).ok()?,
    };
    (!delay.is_zero()).then_some(delay)
}

/// The body of a failure: the `google.rpc.Status` the specification asks for, else text.
fn message(body: &[u8]) -> String {
    let text = match <tonic_types::Status as prost::Message>::decode(body) {
        Ok(status) if !status.message.is_empty() => status.message,
        _ => String::from_utf8_lossy(body).into_owned(),
    };
    let text: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_MESSAGE_CHARS)
        .collect();
    let text = text.trim();
    if text.is_empty() {
        "no message".into()
    } else {
        text.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::otlp::retry::{Verdict, classify};

    fn answer(code: u16, retry_after: Option<&str>) -> ExportError {
        let mut headers = HeaderMap::new();
        if let Some(value) = retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_str(value).unwrap());
        }
        failure(
            StatusCode::from_u16(code).unwrap(),
            &headers,
            b"",
            SystemTime::now(),
        )
    }

    #[test]
    fn status_codes_as_the_specification_lists_them() {
        for code in [429, 502, 503, 504] {
            assert_eq!(classify(&answer(code, None)), Verdict::Retry(None), "{code}");
        }
        for code in [400, 401, 403, 404, 405, 413, 415, 500, 501, 505, 301, 304] {
            assert_eq!(classify(&answer(code, None)), Verdict::Fail, "{code}");
        }
        // Retry-After does not make a permanent failure retryable.
        assert_eq!(classify(&answer(400, Some("5"))), Verdict::Fail);
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        assert_eq!(
            classify(&answer(503, Some("3"))),
            Verdict::Retry(Some(Duration::from_secs(3)))
        );
        assert_eq!(
            classify(&answer(429, Some(" 120 "))),
            Verdict::Retry(Some(Duration::from_secs(120)))
        );
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        let value = HeaderValue::from_str(&later).unwrap();
        assert_eq!(retry_after(&value, now), Some(Duration::from_secs(90)));
        // Nothing usable: the backoff decides.
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(90));
        for junk in ["0", "-1", "soon", "1.5", earlier.as_str(), ""] {
            let value = HeaderValue::from_str(junk).unwrap();
            assert_eq!(retry_after(&value, now), None, "{junk:?}");
        }
        let binary = HeaderValue::from_bytes(b"\xff\xfe").unwrap();
        assert_eq!(retry_after(&binary, now), None);
    }

    #[test]
    fn failure_messages_are_bounded_text() {
        let status = tonic_types::Status {
            code: 8,
            message: "quota exceeded".into(),
            details: vec![],
        };
        let body = prost::Message::encode_to_vec(&status);
        assert_eq!(message(&body), "quota exceeded");
        assert_eq!(message(b"bad gateway\r\n"), "bad gateway");
        assert_eq!(message(b""), "no message");
        let long = "x".repeat(10_000);
        assert_eq!(message(long.as_bytes()).len(), MAX_MESSAGE_CHARS);
        let err = failure(
            StatusCode::SERVICE_UNAVAILABLE,
            &HeaderMap::new(),
            b"busy",
            SystemTime::now(),
        );
        assert_eq!(err.to_string(), "HTTP 503 Service Unavailable: busy");
    }

    #[test]
    fn an_accepted_export_whatever_its_body() {
        use opentelemetry_proto::tonic::collector::trace::v1::{
            ExportTracePartialSuccess, ExportTraceServiceResponse,
        };
        let partial = ExportTraceServiceResponse {
            partial_success: Some(ExportTracePartialSuccess {
                rejected_spans: 3,
                error_message: "over quota".into(),
            }),
        };
        let mut headers = HeaderMap::new();
        let body = Bytes::from(prost::Message::encode_to_vec(&partial));
        let got: ExportTraceServiceResponse = accepted(&headers, Some(body.clone()));
        assert_eq!(got, partial, "no content type: read as protobuf");
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-protobuf"),
        );
        let got: ExportTraceServiceResponse = accepted(&headers, Some(body));
        assert_eq!(got, partial);
        let got: ExportTraceServiceResponse = accepted(&headers, Some(Bytes::from_static(b"\xff\xff")));
        assert_eq!(got, ExportTraceServiceResponse::default());
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let json = Bytes::from_static(br#"{"accepted_spans":1,"status":"success"}"#);
        let got: ExportTraceServiceResponse = accepted(&headers, Some(json));
        assert_eq!(got, ExportTraceServiceResponse::default());
        let got: ExportTraceServiceResponse = accepted(&headers, None);
        assert_eq!(got, ExportTraceServiceResponse::default());
    }

    #[test]
    fn gzip_round_trips() {
        use std::io::Read as _;
        let data = b"an encoded request".repeat(100);
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&gzip(&data)[..])
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, data);
    }
}
