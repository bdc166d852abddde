//! OTLP gRPC export with a bounded queue, batching, and retry with backoff.
//!
//! The reader never waits for the collector: it hands spans to a bounded queue and moves on.
//! When the queue is full the span is dropped and counted. One export task drains the queue
//! in batches and retries a failed batch with exponential backoff until
//! `--export-retry-timeout`, then drops it and counts it. While it retries, new spans wait in
//! the queue, so a collector outage shorter than the queue's worth of attempts loses nothing.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::{Resource, trace::SpanExporter};
use tokio::{sync::mpsc, task::JoinHandle};

use crate::{config::redacted, sink::tls::TlsMaterial, span::ConnectSpan, stats::AgentCounters};

#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error("cannot build the OTLP exporter for {endpoint}: {source}")]
    Build {
        endpoint: String,
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
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
    /// Builds the exporter and starts the export task. Connects lazily: a collector that is
    /// down at start-up is retried like any other outage.
    pub fn start(settings: OtlpSettings, counters: Arc<AgentCounters>) -> Result<Self, OtlpError> {
        let endpoint = settings.endpoint.to_string();
        let endpoint = endpoint.trim_end_matches('/').to_string();
        let mut builder = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_retry_policy(retry_policy(settings.retry_timeout))
            // The exporter's timeout bounds all tries of one batch together.
            .with_timeout(settings.retry_timeout);
        if settings.endpoint.scheme_str() == Some("https") {
            builder = builder.with_tls_config(tls_config(&settings.endpoint, &settings.tls));
        }
        let exporter = builder.build().map_err(|source| OtlpError::Build {
            endpoint: redacted(&settings.endpoint),
            source,
        })?;
        let (queue, rx) = mpsc::channel(settings.queue_size);
        let task = tokio::spawn(export_loop(exporter, rx, settings, counters.clone()));
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

async fn export_loop(
    mut exporter: opentelemetry_otlp::SpanExporter,
    mut rx: mpsc::Receiver<ConnectSpan>,
    settings: OtlpSettings,
    counters: Arc<AgentCounters>,
) {
    let mut batch = Vec::with_capacity(settings.batch_size);
    loop {
        batch.clear();
        if rx.recv_many(&mut batch, settings.batch_size).await == 0 {
            return;
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
        export_batch(&mut exporter, &mut batch, &settings, &counters).await;
    }
}

/// Exports one batch, one request per service (the resource is per request in the
/// exporter), retrying each with backoff.
async fn export_batch(
    exporter: &mut opentelemetry_otlp::SpanExporter,
    batch: &mut Vec<ConnectSpan>,
    settings: &OtlpSettings,
    counters: &AgentCounters,
) {
    batch.sort_by(|a, b| a.service.cmp(&b.service));
    let mut spans = batch.drain(..).peekable();
    while let Some(first) = spans.next() {
        // One service's spans, as many as fit in one request (the first always does).
        let resource = first.resource.clone();
        let data = first.span_data();
        let mut bytes = encoded_size(&data);
        let mut request = vec![data];
        while let Some(next) = spans.next_if(|s| s.service == first.service) {
            let data = next.span_data();
            bytes += encoded_size(&data);
            request.push(data);
            if bytes > MAX_REQUEST_BYTES {
                break;
            }
        }
        export_with_retry(exporter, &resource, request, settings, counters).await;
    }
}

/// gRPC servers refuse messages over 4 MiB by default. A request is closed once it passes
/// this, so it ends at most one span (tens of KiB at worst) above it.
const MAX_REQUEST_BYTES: usize = 3 * 1024 * 1024;

/// A span's size on the wire, near enough: its strings plus a fixed overhead per field.
fn encoded_size(span: &opentelemetry_sdk::trace::SpanData) -> usize {
    let kv = |kv: &opentelemetry::KeyValue| {
        let value = match &kv.value {
            opentelemetry::Value::String(s) => s.as_str().len(),
            _ => 8,
        };
        kv.key.as_str().len() + value + 8
    };
    128 + span.attributes.iter().map(kv).sum::<usize>()
        + span
            .events
            .iter()
            .map(|e| 32 + e.name.len() + e.attributes.iter().map(kv).sum::<usize>())
            .sum::<usize>()
}

async fn export_with_retry(
    exporter: &mut opentelemetry_otlp::SpanExporter,
    resource: &Resource,
    spans: Vec<opentelemetry_sdk::trace::SpanData>,
    settings: &OtlpSettings,
    counters: &AgentCounters,
) {
    let n = spans.len() as u64;
    exporter.set_resource(resource);
    let started = Instant::now();
    // The exporter retries by itself (see `retry_policy`), on a batch it shares across tries:
    // the spans are not copied for a retry that rarely comes.
    let export = exporter.export(spans);
    tokio::pin!(export);
    let result = tokio::select! {
        result = &mut export => result,
        () = tokio::time::sleep(SLOW_EXPORT) => {
            tracing::warn!(
                spans = n,
                "OTLP export not done after {SLOW_EXPORT:?}: the collector is down or slow; \
                 retrying with backoff for up to {:?}",
                settings.retry_timeout
            );
            export.await
        }
    };
    match result {
        Ok(()) => {
            AgentCounters::add(&counters.exported, n);
            if started.elapsed() >= SLOW_EXPORT {
                tracing::info!(spans = n, "OTLP export succeeded after {:?}", started.elapsed());
            }
        }
        Err(err) => {
            tracing::error!(
                spans = n,
                "OTLP export failed after {:?}, dropping the batch: {err}",
                started.elapsed()
            );
            AgentCounters::add(&counters.export_failed, n);
        }
    }
}

/// Backoff from 100 ms, doubling to 5 s, with as many retries as fit in `timeout`.
pub(crate) fn retry_policy(timeout: Duration) -> opentelemetry_otlp::RetryPolicy {
    let mut retries = 0;
    let mut delay = BACKOFF_START;
    let mut total = Duration::ZERO;
    while total + delay <= timeout {
        total += delay;
        retries += 1;
        delay = (delay * 2).min(BACKOFF_MAX);
    }
    opentelemetry_otlp::RetryPolicy::default()
        .with_max_retries(retries)
        .with_initial_delay(BACKOFF_START)
        .with_max_delay(BACKOFF_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_stay_under_the_grpc_limit() {
        use opentelemetry::KeyValue;
        let mut span = crate::span::SpanBuilder::new("h".into())
            .build(
                crate::span::tests::timed_out(),
                &Default::default(),
                Default::default(),
            )
            .span_data();
        let small = encoded_size(&span);
        assert!((200..2000).contains(&small), "{small}");
        span.attributes
            .push(KeyValue::new("synspan.user_stack", "x".repeat(10_000)));
        assert!(encoded_size(&span) > 10_000);
    }

    #[test]
    fn retries_fill_the_timeout() {
        // 0.1 + 0.2 + 0.4 + 0.8 + 1.6 + 3.2 = 6.3 s, then 5 s steps: 60 s holds 6 + 10 retries.
        let policy = format!("{:?}", retry_policy(Duration::from_secs(60)));
        assert!(policy.contains("max_retries: 16"), "{policy}");
        let none = format!("{:?}", retry_policy(Duration::ZERO));
        assert!(none.contains("max_retries: 0"), "{none}");
    }
}
