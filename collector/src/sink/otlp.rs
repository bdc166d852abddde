//! OTLP gRPC export with a bounded queue, batching, and retry with backoff.
//!
//! The reader never waits for the collector: it hands spans to a bounded queue and moves on.
//! When the queue is full the span is dropped and counted. One export task drains the queue
//! in batches, keeps up to `MAX_IN_FLIGHT_REQUESTS` requests going, and retries a failed one
//! with exponential backoff until `--export-retry-timeout`, then drops it and counts it. Once
//! that many requests are retrying, new spans wait in the queue, so a collector outage
//! shorter than the queue's worth of attempts loses nothing.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use tokio::{sync::mpsc, task::JoinHandle};
use tonic::{
    Code, Status,
    codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder},
    metadata::{MetadataKey, MetadataMap, MetadataValue},
    transport::Channel,
};

use crate::{
    config::redacted,
    enrich::process::percent_decode,
    sink::{otlp_wire::TraceRequest, tls::TlsMaterial},
    span::ConnectSpan,
    stats::AgentCounters,
};

#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error("OTLP endpoint {endpoint}: {source}")]
    Endpoint {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("{var}: {problem}; expected `key1=value1,key2=value2` (values percent-encoded)")]
    Headers { var: &'static str, problem: String },
    #[error("{var}={value}: unknown compression; use gzip or none")]
    Compression { var: &'static str, value: String },
}

pub struct OtlpSettings {
    pub endpoint: http::Uri,
    pub tls: TlsMaterial,
    pub queue_size: usize,
    pub batch_size: usize,
    pub retry_timeout: Duration,
}

/// How long the export task waits for a batch to fill before it sends what it has.
const BATCH_DELAY: Duration = Duration::from_millis(200);
/// One try of one request, as OTEL_EXPORTER_OTLP_TIMEOUT defaults; the retries go on until
/// `--export-retry-timeout`.
const TRY_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// An export still running after this is being retried: say so once.
const SLOW_EXPORT: Duration = Duration::from_secs(1);
/// At most one "queue full" warning this often.
const WARN_EVERY: Duration = Duration::from_secs(10);

pub struct OtlpSink {
    queue: mpsc::Sender<ConnectSpan>,
    task: JoinHandle<()>,
    counters: Arc<AgentCounters>,
    last_full_warning: Option<Instant>,
}

impl OtlpSink {
    /// Sets up the connection and starts the export task. Connects lazily: a collector that
    /// is down at start-up is retried like any other outage.
    pub fn start(settings: OtlpSettings, counters: Arc<AgentCounters>) -> Result<Self, OtlpError> {
        let client = TraceClient::new(&settings)?;
        let (queue, rx) = mpsc::channel(settings.queue_size);
        let task = tokio::spawn(export_loop(client, rx, settings, counters.clone()));
        Ok(Self {
            queue,
            task,
            counters,
            last_full_warning: None,
        })
    }

    /// Queues spans for export without ever waiting.
    pub fn submit(&mut self, batch: Vec<ConnectSpan>) {
        let mut full = 0u64;
        let mut queued = 0u64;
        for span in batch {
            match self.queue.try_send(span) {
                Ok(()) => queued += 1,
                Err(_) => full += 1,
            }
        }
        AgentCounters::add(&self.counters.submitted, queued);
        if full > 0 {
            self.shed(full);
        }
    }

    /// Spans the queue can take now.
    pub fn room(&self) -> usize {
        self.queue.capacity()
    }

    /// Counts spans dropped because the queue is full. The reader sheds attempts this way
    /// before it builds their spans, so that an overloaded export costs no work per attempt.
    pub fn shed(&mut self, n: u64) {
        AgentCounters::add(&self.counters.export_queue_full, n);
        if self.last_full_warning.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
            self.last_full_warning = Some(Instant::now());
            tracing::warn!(
                dropped = n,
                "OTLP export queue is full ({} spans): dropping spans; the collector is down \
                 or slower than the attempt rate (see --export-queue-size)",
                self.queue.max_capacity()
            );
        }
    }

    /// Exports what is queued, waiting at most `timeout`. Spans left over are counted as
    /// `unflushed`.
    pub async fn shutdown(self, timeout: Duration) {
        let Self {
            queue,
            mut task,
            counters,
            ..
        } = self;
        let left = queue.max_capacity() - queue.capacity();
        drop(queue);
        if tokio::time::timeout(timeout, &mut task).await.is_err() {
            task.abort();
            // Until the task is gone its requests may still complete and be counted.
            let _ = task.await;
            // What the export task had not settled is exactly what is not yet counted.
            tracing::warn!(
                "shutdown timeout: OTLP export did not finish in {timeout:?} ({left} spans were queued)"
            );
            AgentCounters::add(&counters.unflushed, unsettled(&counters));
        }
    }
}

/// The TLS side of an OTLP connection to `endpoint`, shared by spans and self-metrics.
pub(crate) fn tls_config(endpoint: &http::Uri, material: &TlsMaterial) -> tonic::transport::ClientTlsConfig {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    // A CA given on purpose is the only one trusted; otherwise the system's roots are.
    let mut tls = match &material.ca {
        Some(ca) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)),
        None => ClientTlsConfig::new().with_enabled_roots(),
    };
    // gRPC is HTTP/2 whatever ALPN says; TLS terminators that do not negotiate ALPN (stunnel,
    // some load balancers) would otherwise be refused.
    tls = tls.assume_http2(true);
    if let Some((cert, key)) = &material.identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    if let Some(host) = endpoint.host() {
        tls = tls.domain_name(host.trim_matches(['[', ']']));
    }
    tls
}

/// Spans handed to the export task that it has neither exported nor dropped.
fn unsettled(counters: &AgentCounters) -> u64 {
    use std::sync::atomic::Ordering::Relaxed;
    let submitted = counters.submitted.load(Relaxed);
    submitted.saturating_sub(counters.exported.load(Relaxed) + counters.export_failed.load(Relaxed))
}

/// `OTEL_EXPORTER_OTLP_TRACES_<name>`, else `OTEL_EXPORTER_OTLP_<name>`, as the
/// specification orders them; with the variable's name for messages.
fn otlp_env(traces: &'static str, generic: &'static str) -> Option<(&'static str, String)> {
    [traces, generic]
        .into_iter()
        .find_map(|var| std::env::var(var).ok().map(|v| (var, v)))
}

/// Checks the OTLP settings that come from the environment (headers, compression), so that
/// a mistake there stops synspan before it loads anything.
pub fn check_environment() -> Result<(), OtlpError> {
    headers_from_env()?;
    compression_from_env()?;
    Ok(())
}

/// Headers for every export request (API keys, tenants), from the environment. Their values
/// are never logged.
fn headers_from_env() -> Result<MetadataMap, OtlpError> {
    let mut map = MetadataMap::new();
    // Generic first, so that the traces-specific ones win.
    for var in ["OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS"] {
        if let Ok(text) = std::env::var(var) {
            parse_headers(var, &text, &mut map)?;
        }
    }
    Ok(map)
}

fn parse_headers(var: &'static str, text: &str, map: &mut MetadataMap) -> Result<(), OtlpError> {
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let problem = |what: String| OtlpError::Headers { var, problem: what };
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
    Ok(())
}

fn compression_from_env() -> Result<Option<CompressionEncoding>, OtlpError> {
    match otlp_env(
        "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
        "OTEL_EXPORTER_OTLP_COMPRESSION",
    ) {
        None => Ok(None),
        Some((_, v)) if v.is_empty() || v.eq_ignore_ascii_case("none") => Ok(None),
        Some((_, v)) if v.eq_ignore_ascii_case("gzip") => Ok(Some(CompressionEncoding::Gzip)),
        Some((var, value)) => Err(OtlpError::Compression { var, value }),
    }
}

/// Sends requests that are already encoded.
#[derive(Clone, Default)]
struct EncodedCodec;

struct EncodedEncoder;
struct ResponseDecoder;

impl Codec for EncodedCodec {
    type Encode = Bytes;
    type Decode = ExportTraceServiceResponse;
    type Encoder = EncodedEncoder;
    type Decoder = ResponseDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        EncodedEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        ResponseDecoder
    }
}

impl Encoder for EncodedEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl Decoder for ResponseDecoder {
    type Item = ExportTraceServiceResponse;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        prost::Message::decode(src)
            .map(Some)
            .map_err(|err| Status::internal(format!("undecodable export response: {err}")))
    }
}

const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// The trace service of one collector. Clones share the connection.
#[derive(Clone)]
struct TraceClient {
    grpc: tonic::client::Grpc<Channel>,
    headers: MetadataMap,
}

impl TraceClient {
    fn new(settings: &OtlpSettings) -> Result<Self, OtlpError> {
        let endpoint_error = |source| OtlpError::Endpoint {
            endpoint: redacted(&settings.endpoint),
            source,
        };
        // A collector that vanished without closing the connection (a node gone, a dropped
        // route) must not hold a request until the retry timeout: keepalives notice.
        let mut endpoint = Channel::builder(settings.endpoint.clone())
            .connect_timeout(TRY_TIMEOUT)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        if settings.endpoint.scheme_str() == Some("https") {
            endpoint = endpoint
                .tls_config(tls_config(&settings.endpoint, &settings.tls))
                .map_err(endpoint_error)?;
        }
        let mut grpc = tonic::client::Grpc::new(endpoint.connect_lazy());
        if let Some(encoding) = compression_from_env()? {
            grpc = grpc.send_compressed(encoding);
        }
        Ok(Self {
            grpc,
            headers: headers_from_env()?,
        })
    }

    /// One try. Returns how many spans the collector said it rejected.
    async fn export(&mut self, request: Bytes) -> Result<u64, Status> {
        self.grpc
            .ready()
            .await
            .map_err(|err| Status::unavailable(format!("collector not reachable: {err}")))?;
        let mut request = tonic::Request::new(request);
        *request.metadata_mut() = self.headers.clone();
        let response = self
            .grpc
            .unary(
                request,
                http::uri::PathAndQuery::from_static(EXPORT_PATH),
                EncodedCodec,
            )
            .await?;
        let rejected = response.into_inner().partial_success.map_or(0, |p| {
            if p.rejected_spans > 0 {
                tracing::warn!(
                    rejected = p.rejected_spans,
                    "the collector rejected part of an export: {}",
                    p.error_message
                );
            }
            p.rejected_spans.max(0) as u64
        });
        Ok(rejected)
    }
}

/// Failures worth another try, as the OTLP specification lists them.
fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Cancelled
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::OutOfRange
            | Code::Unavailable
            | Code::DataLoss
    )
}

/// Requests sent at once. The collector answers late on a busy host; one request at a time
/// would cap the export rate at a batch per round trip.
const MAX_IN_FLIGHT_REQUESTS: usize = 4;

async fn export_loop(
    client: TraceClient,
    mut rx: mpsc::Receiver<ConnectSpan>,
    settings: OtlpSettings,
    counters: Arc<AgentCounters>,
) {
    let mut batch = Vec::with_capacity(settings.batch_size);
    let mut request = TraceRequest::default();
    let mut in_flight = tokio::task::JoinSet::new();
    loop {
        batch.clear();
        if rx.recv_many(&mut batch, settings.batch_size).await == 0 {
            break;
        }
        // Let a batch fill up under load instead of sending one request per wake-up.
        if batch.len() < settings.batch_size {
            let deadline = tokio::time::Instant::now() + BATCH_DELAY;
            while batch.len() < settings.batch_size {
                let want = settings.batch_size - batch.len();
                match tokio::time::timeout_at(deadline, rx.recv_many(&mut batch, want)).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        }
        for (bytes, n) in encode_batch(&mut request, &mut batch) {
            while in_flight.len() >= MAX_IN_FLIGHT_REQUESTS {
                in_flight.join_next().await;
            }
            in_flight.spawn(export_with_retry(
                client.clone(),
                bytes,
                n,
                settings.retry_timeout,
                counters.clone(),
            ));
        }
    }
    while in_flight.join_next().await.is_some() {}
}

/// gRPC servers refuse messages over 4 MiB by default. A request is closed once it passes
/// this, so it ends at most one span (tens of KiB at worst) above it.
const MAX_REQUEST_BYTES: usize = 3 * 1024 * 1024;

/// One request per resource (the traced process's service), with its span count.
fn encode_batch(request: &mut TraceRequest, batch: &mut Vec<ConnectSpan>) -> Vec<(Bytes, u64)> {
    batch.sort_by(|a, b| a.service.cmp(&b.service));
    let mut requests = Vec::new();
    let mut spans = batch.drain(..).peekable();
    while let Some(first) = spans.next() {
        let data = first.span_data();
        request.push(&data);
        while request.encoded_len() <= MAX_REQUEST_BYTES
            && let Some(next) = spans.next_if(|s| s.service == first.service)
        {
            request.push(&next.span_data());
        }
        let n = request.len() as u64;
        let mut bytes = Vec::with_capacity(request.encoded_len() + 256);
        request.finish(&first.resource, &data.instrumentation_scope, &mut bytes);
        requests.push((Bytes::from(bytes), n));
    }
    requests
}

/// Sends one request, retrying with backoff (100 ms doubling to 5 s) until
/// `--export-retry-timeout`; counts its spans as exported or failed.
async fn export_with_retry(
    mut client: TraceClient,
    request: Bytes,
    n: u64,
    retry_timeout: Duration,
    counters: Arc<AgentCounters>,
) {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + retry_timeout;
    let tries = async {
        let mut delay = BACKOFF_START;
        loop {
            let try_deadline = deadline.min(tokio::time::Instant::now() + TRY_TIMEOUT);
            let status = match tokio::time::timeout_at(try_deadline, client.export(request.clone())).await {
                Ok(Ok(rejected)) => return Ok(rejected),
                Ok(Err(status)) => status,
                Err(_) => Status::deadline_exceeded(format!("no answer within {TRY_TIMEOUT:?}")),
            };
            let now = tokio::time::Instant::now();
            if !retryable(status.code()) || now + delay > deadline {
                return Err(status);
            }
            tracing::debug!("OTLP export failed ({status}); retrying in {delay:?}");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(BACKOFF_MAX);
        }
    };
    tokio::pin!(tries);
    let result = tokio::select! {
        result = &mut tries => result,
        () = tokio::time::sleep(SLOW_EXPORT) => {
            tracing::warn!(
                spans = n,
                "OTLP export not done after {SLOW_EXPORT:?}: the collector is down or slow; \
                 retrying with backoff for up to {retry_timeout:?}"
            );
            tries.await
        }
    };
    match result {
        Ok(rejected) => {
            let rejected = rejected.min(n);
            AgentCounters::add(&counters.exported, n - rejected);
            AgentCounters::add(&counters.export_failed, rejected);
            if started.elapsed() >= SLOW_EXPORT {
                tracing::info!(spans = n, "OTLP export succeeded after {:?}", started.elapsed());
            }
        }
        Err(status) => {
            tracing::error!(
                spans = n,
                "OTLP export failed after {:?}, dropping the batch: {}: {}",
                started.elapsed(),
                status.code(),
                status.message()
            );
            AgentCounters::add(&counters.export_failed, n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers() {
        let mut map = MetadataMap::new();
        parse_headers("V", "Api-Key=abc%3D%3D, tenant = t1", &mut map).unwrap();
        parse_headers("V", "tenant=t2", &mut map).unwrap();
        assert_eq!(map.get("api-key").unwrap(), "abc==");
        assert_eq!(map.get("tenant").unwrap(), "t2");
        let err = parse_headers("V", "secret-without-equals", &mut map).unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
        assert!(parse_headers("V", "bad key=1", &mut map).is_err());
    }

    #[test]
    fn what_is_retried() {
        assert!(retryable(Code::Unavailable));
        assert!(retryable(Code::ResourceExhausted));
        assert!(!retryable(Code::InvalidArgument));
        assert!(!retryable(Code::Unauthenticated));
    }
}
