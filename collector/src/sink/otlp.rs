//! Spans to OTLP gRPC, with a bounded queue, batching, and retry with backoff.
//!
//! The reader never waits for the collector: it hands spans to a bounded queue and moves on.
//! When the queue is full the span is dropped and counted. One export task drains the queue
//! in batches, keeps up to `MAX_IN_FLIGHT_REQUESTS` requests going, and retries a failed one
//! as [`crate::otlp::retry`] says until `--export-retry-timeout`, then drops it and counts it. Once
//! that many requests are retrying, new spans wait in the queue, so a collector outage
//! shorter than the queue's worth of attempts loses nothing.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use tokio::{sync::mpsc, task::JoinHandle};

use crate::{
    otlp::{Client, retry::with_retry},
    sink::otlp_wire::TraceRequest,
    span::{ConnectSpan, scope},
    stats::AgentCounters,
};

pub(crate) struct OtlpSettings {
    /// The traces client: its endpoint, TLS, headers, compression and per-try timeout.
    pub(crate) client: Client,
    pub(crate) queue_size: usize,
    pub(crate) batch_size: usize,
    pub(crate) retry_timeout: Duration,
}

/// How long the export task waits for a batch to fill before it sends what it has.
const BATCH_DELAY: Duration = Duration::from_millis(200);
/// An export still running after this is being retried: say so once.
const SLOW_EXPORT: Duration = Duration::from_secs(1);
/// At most one "queue full" warning this often.
const WARN_EVERY: Duration = Duration::from_secs(10);

pub(crate) struct OtlpSink {
    queue: mpsc::Sender<ConnectSpan>,
    task: JoinHandle<()>,
    counters: Arc<AgentCounters>,
    last_full_warning: Option<Instant>,
}

impl OtlpSink {
    /// Starts the export task.
    pub(crate) fn start(settings: OtlpSettings, counters: Arc<AgentCounters>) -> Self {
        let (queue, rx) = mpsc::channel(settings.queue_size);
        let task = tokio::spawn(export_loop(rx, settings, counters.clone()));
        Self {
            queue,
            task,
            counters,
            last_full_warning: None,
        }
    }

    /// Queues spans for export without ever waiting.
    /// Queues the spans of `batch`, leaving it empty with its capacity: a batch of 1024 spans
    /// is 656 KiB, above the heap's mmap threshold, so a new one each time was fresh pages to
    /// fault in, a tenth of the agent's CPU with every attempt exported (perf).
    pub(crate) fn submit(&mut self, batch: &mut Vec<ConnectSpan>) {
        let mut full = 0u64;
        let mut queued = 0u64;
        for span in batch.drain(..) {
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
    pub(crate) fn room(&self) -> usize {
        self.queue.capacity()
    }

    /// Counts spans dropped because the queue is full. The reader sheds attempts this way
    /// before it builds their spans, so that an overloaded export costs no work per attempt.
    pub(crate) fn shed(&mut self, n: u64) {
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
    pub(crate) async fn shutdown(self, timeout: Duration) {
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

/// Spans handed to the export task that it has neither exported nor dropped.
fn unsettled(counters: &AgentCounters) -> u64 {
    use std::sync::atomic::Ordering::Relaxed;
    let submitted = counters.submitted.load(Relaxed);
    submitted.saturating_sub(counters.exported.load(Relaxed) + counters.export_failed.load(Relaxed))
}

/// Requests sent at once. The collector answers late on a busy host; one request at a time
/// would cap the export rate at a batch per round trip.
const MAX_IN_FLIGHT_REQUESTS: usize = 4;

async fn export_loop(
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
        fill(&mut rx, &mut batch, settings.batch_size).await;
        for (bytes, n) in encode_batch(&mut request, &mut batch) {
            while in_flight.len() >= MAX_IN_FLIGHT_REQUESTS {
                in_flight.join_next().await;
            }
            in_flight.spawn(export_with_retry(
                settings.client.clone(),
                bytes,
                n,
                settings.retry_timeout,
                counters.clone(),
            ));
        }
    }
    while in_flight.join_next().await.is_some() {}
}

/// Lets a batch fill up under load instead of sending one request per wake-up: until it holds
/// `batch_size` spans or `BATCH_DELAY` has passed, or the queue is closed and empty.
///
/// The queue is looked at every `FILL_TICK` rather than waited on: a task waiting on the
/// queue is woken by every span the enrichment thread sends, a context switch each. With every
/// attempt exported (43,000 spans a second) those switches were a fifth of the agent's CPU
/// (perf, `finish_task_switch`); a span waits at most `BATCH_DELAY` either way.
async fn fill(rx: &mut mpsc::Receiver<ConnectSpan>, batch: &mut Vec<ConnectSpan>, batch_size: usize) {
    let deadline = tokio::time::Instant::now() + BATCH_DELAY;
    loop {
        while batch.len() < batch_size {
            match rx.try_recv() {
                Ok(span) => batch.push(span),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => return,
            }
        }
        let now = tokio::time::Instant::now();
        if batch.len() >= batch_size || now >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline.min(now + FILL_TICK)).await;
    }
}

/// How often a filling batch looks at the queue: at 43,000 spans a second, 430 spans a look.
const FILL_TICK: Duration = Duration::from_millis(10);

/// gRPC servers refuse messages over 4 MiB by default. A request is closed once it passes
/// this, so it ends at most one span (tens of KiB at worst) above it.
const MAX_REQUEST_BYTES: usize = 3 * 1024 * 1024;

/// One request per resource (the traced process's service), with its span count.
fn encode_batch(request: &mut TraceRequest, batch: &mut Vec<ConnectSpan>) -> Vec<(Bytes, u64)> {
    // Sorted by reference: a span is over 600 bytes, and moving them was a tenth of the
    // agent's time per span with every attempt exported.
    let mut order: Vec<&ConnectSpan> = batch.iter().collect();
    order.sort_by(|a, b| a.service.cmp(&b.service));
    let mut requests = Vec::new();
    let mut spans = order.into_iter().peekable();
    while let Some(first) = spans.next() {
        request.push(first);
        while request.encoded_len() <= MAX_REQUEST_BYTES
            && let Some(next) = spans.next_if(|s| s.service == first.service)
        {
            request.push(next);
        }
        let n = request.len() as u64;
        let mut bytes = Vec::with_capacity(request.encoded_len() + 256);
        request.finish(&first.resource, scope(), &mut bytes);
        requests.push((Bytes::from(bytes), n));
    }
    batch.clear();
    requests
}

/// Sends one request, retrying until `--export-retry-timeout`; counts its spans as exported
/// or failed.
async fn export_with_retry(
    client: Client,
    request: Bytes,
    n: u64,
    retry_timeout: Duration,
    counters: Arc<AgentCounters>,
) {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + retry_timeout;
    let tries = with_retry(deadline, || {
        let mut client = client.clone();
        let request = request.clone();
        async move {
            let response: ExportTraceServiceResponse = client.export(request).await?;
            Ok(rejected_spans(response))
        }
    });
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
        Err(err) => {
            tracing::error!(
                spans = n,
                "OTLP export failed after {:?}, dropping the batch: {err}",
                started.elapsed(),
            );
            AgentCounters::add(&counters.export_failed, n);
        }
    }
}

/// How many spans the collector said it rejected.
fn rejected_spans(response: ExportTraceServiceResponse) -> u64 {
    response.partial_success.map_or(0, |p| {
        if p.rejected_spans > 0 {
            tracing::warn!(
                rejected = p.rejected_spans,
                "the collector rejected part of an export: {}",
                p.error_message
            );
        }
        p.rejected_spans.max(0) as u64
    })
}
