//! An OTLP receiver, gRPC or HTTP, that decodes every request and keeps count: spans in all,
//! spans by `process.pid` and the `service.name` they came under, requests. The benchmark's
//! receiver: a collector that writes spans out (rotel with the test bed's span processor, as
//! the end-to-end tests use) spends more CPU per span than synspan does, on the same cores as
//! the storm it is meant to measure.
//!
//! usage: synspan-otlp-sink LISTEN_ADDR COUNTS_FILE [ANSWER [grpc|http]]
//!
//! ANSWER is how trace requests are answered (default `accept`): see
//! `synspan_testbed::otlp_sink::Answer`, which the tests use to make the collector push back.
//! Over HTTP (`POST /v1/traces`, `/v1/metrics`) a refusal is the HTTP status a collector
//! answers with (`synspan_testbed::otlp_http`): 503, 429 with `Retry-After`, 400, 500.
//! Prints `listening <addr>` once it accepts connections. After every request it rewrites
//! COUNTS_FILE (JSON: see `SinkCounts`), atomically, so a reader never sees half of it. Stops
//! on SIGTERM or SIGINT.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex, OnceLock},
    task::{Context, Poll},
    time::Instant,
};

use anyhow::Context as _;
use opentelemetry_proto::tonic::{
    collector::{
        metrics::v1::{
            ExportMetricsServiceRequest, ExportMetricsServiceResponse,
            metrics_service_server::{MetricsService, MetricsServiceServer},
        },
        trace::v1::{
            ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
            trace_service_server::{TraceService, TraceServiceServer},
        },
    },
    common::v1::any_value::Value,
    metrics::v1::{Exemplar, exemplar, metric, number_data_point},
};
use synspan_testbed::{
    otlp_http,
    otlp_sink::{Answer, ConnectExemplar, ConnectPoint},
};
use tonic::{
    Code, Status,
    codegen::{BoxFuture, Service, http},
};
use tonic_types::{ErrorDetails, StatusExt as _};

/// `synspan_testbed::otlp_sink::SinkCounts`, written.
#[derive(Default, serde::Serialize)]
struct Counts {
    spans: u64,
    requests: u64,
    metric_requests: u64,
    by_pid: BTreeMap<i64, u64>,
    service_of_pid: BTreeMap<i64, String>,
    received_spans: u64,
    refused: u64,
    unanswered: u64,
    rejected_spans: u64,
    arrivals_ms: Vec<u64>,
    connect: BTreeMap<String, ConnectPoint>,
}

/// Exemplars kept per series: enough for the tests, bounded for long runs.
const MAX_EXEMPLARS: usize = 64;

fn text(value: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        _ => String::new(),
    }
}

fn attributes(kvs: &[opentelemetry_proto::tonic::common::v1::KeyValue]) -> BTreeMap<String, String> {
    kvs.iter().map(|kv| (kv.key.clone(), text(&kv.value))).collect()
}

fn exemplars(list: &[Exemplar]) -> Vec<ConnectExemplar> {
    list.iter()
        .map(|e| ConnectExemplar {
            trace_id: hex(&e.trace_id),
            span_id: hex(&e.span_id),
            value: match e.value {
                Some(exemplar::Value::AsDouble(d)) => d,
                Some(exemplar::Value::AsInt(i)) => i as f64,
                None => 0.0,
            },
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The `synspan.connect.*` data points of a request, flattened.
fn connect_points(request: &ExportMetricsServiceRequest) -> Vec<ConnectPoint> {
    let mut points = Vec::new();
    for rm in &request.resource_metrics {
        let resource = rm
            .resource
            .as_ref()
            .map(|r| attributes(&r.attributes))
            .unwrap_or_default();
        let service = resource.get("service.name").cloned().unwrap_or_default();
        for metric in rm.scope_metrics.iter().flat_map(|s| &s.metrics) {
            if !metric.name.starts_with("synspan.connect.") {
                continue;
            }
            let base = ConnectPoint {
                metric: metric.name.clone(),
                service: service.clone(),
                ..Default::default()
            };
            match &metric.data {
                Some(metric::Data::Sum(sum)) => points.extend(sum.data_points.iter().map(|p| ConnectPoint {
                    attributes: attributes(&p.attributes),
                    value: match p.value {
                        Some(number_data_point::Value::AsInt(i)) => i,
                        Some(number_data_point::Value::AsDouble(d)) => d as i64,
                        None => 0,
                    },
                    exemplars: exemplars(&p.exemplars),
                    ..base.clone()
                })),
                Some(metric::Data::Histogram(h)) => {
                    points.extend(h.data_points.iter().map(|p| ConnectPoint {
                        attributes: attributes(&p.attributes),
                        count: p.count,
                        sum: p.sum.unwrap_or_default(),
                        bounds: p.explicit_bounds.clone(),
                        bucket_counts: p.bucket_counts.clone(),
                        exemplars: exemplars(&p.exemplars),
                        ..base.clone()
                    }))
                }
                _ => {}
            }
        }
    }
    points
}

/// Arrival times kept: enough for the tests, bounded for the benchmark's millions of spans.
const MAX_ARRIVALS: usize = 1000;

struct Sink {
    counts: Mutex<Counts>,
    path: PathBuf,
    answer: Answer,
    first_request: OnceLock<Instant>,
}

impl Sink {
    /// Changes the counts in memory only: the next [`Sink::update`] writes them. Every
    /// request ends in one (accepted, refused or left unanswered), so the file is rewritten
    /// once per request, not twice: with a pid for each of tens of thousands of processes it
    /// is large.
    fn note<T>(&self, f: impl FnOnce(&mut Counts) -> T) -> T {
        f(&mut self.counts.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn update<T>(&self, f: impl FnOnce(&mut Counts) -> T) -> Result<T, Status> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let value = f(&mut counts);
        let json = serde_json::to_vec(&*counts).map_err(|e| Status::internal(e.to_string()))?;
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, json)
            .and_then(|()| std::fs::rename(&tmp, &self.path))
            .map_err(|e| Status::internal(format!("{}: {e}", self.path.display())))?;
        Ok(value)
    }

    /// The error this request gets instead of an answer, if any; never returns for a request
    /// that is not to be answered.
    async fn push_back(&self, index: u64, arrived: Instant, first: Instant) -> Option<Status> {
        match self.answer {
            Answer::Throttle { delay, requests } if index < u64::from(requests) => {
                Some(Status::with_error_details(
                    Code::ResourceExhausted,
                    "throttled",
                    ErrorDetails::with_retry_info(Some(delay)),
                ))
            }
            Answer::Exhausted => Some(Status::resource_exhausted("out of memory")),
            Answer::Invalid => Some(Status::invalid_argument("malformed request")),
            Answer::Unavailable { outage } if arrived.duration_since(first) < outage => {
                Some(Status::unavailable("restarting"))
            }
            Answer::Slow { delay } => {
                tokio::time::sleep(delay).await;
                None
            }
            Answer::Silent { requests } if index < u64::from(requests) => {
                self.update(|counts| counts.unanswered += 1).ok()?;
                std::future::pending().await
            }
            _ => None,
        }
    }
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, Status> {
        let arrived = Instant::now();
        let first = *self.first_request.get_or_init(|| arrived);
        let request = request.into_inner();
        let mut by_pid: BTreeMap<i64, u64> = BTreeMap::new();
        let mut service_of_pid: BTreeMap<i64, String> = BTreeMap::new();
        let mut spans = 0;
        for resource_spans in &request.resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(name) => Some(name),
                    _ => None,
                });
            for span in resource_spans.scope_spans.iter().flat_map(|s| &s.spans) {
                spans += 1;
                let pid = span
                    .attributes
                    .iter()
                    .find(|kv| kv.key == "process.pid")
                    .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                        Value::IntValue(pid) => Some(*pid),
                        _ => None,
                    });
                if let Some(pid) = pid {
                    *by_pid.entry(pid).or_default() += 1;
                    if let Some(service) = service {
                        service_of_pid.insert(pid, service.clone());
                    }
                }
            }
        }
        let index = self.note(|counts| {
            counts.requests += 1;
            counts.received_spans += spans;
            if counts.arrivals_ms.len() < MAX_ARRIVALS {
                let ms = arrived.duration_since(first).as_millis();
                counts.arrivals_ms.push(u64::try_from(ms).unwrap_or(u64::MAX));
            }
            counts.requests - 1
        });
        if let Some(status) = self.push_back(index, arrived, first).await {
            self.update(|counts| counts.refused += 1)?;
            return Err(status);
        }
        let rejected = match self.answer {
            Answer::Partial { rejected } => u64::from(rejected).min(spans),
            _ => 0,
        };
        self.update(|counts| {
            counts.spans += spans;
            counts.rejected_spans += rejected;
            for (pid, n) in by_pid {
                *counts.by_pid.entry(pid).or_default() += n;
            }
            counts.service_of_pid.extend(service_of_pid);
        })?;
        let partial_success = (rejected > 0).then(|| ExportTracePartialSuccess {
            rejected_spans: i64::try_from(rejected).unwrap_or(i64::MAX),
            error_message: "spans over the tenant's quota".into(),
        });
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success,
        }))
    }
}

#[tonic::async_trait]
impl MetricsService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, Status> {
        let points = connect_points(request.get_ref());
        self.update(|counts| {
            counts.metric_requests += 1;
            for mut point in points {
                let key = point.key();
                if let Some(old) = counts.connect.remove(&key) {
                    let mut kept = old.exemplars;
                    kept.append(&mut point.exemplars);
                    let excess = kept.len().saturating_sub(MAX_EXEMPLARS);
                    kept.drain(..excess);
                    point.exemplars = kept;
                }
                counts.connect.insert(key, point);
            }
        })?;
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

/// Sends each request to the service its path names.
#[derive(Clone)]
struct Otlp {
    traces: TraceServiceServer<Sink>,
    metrics: MetricsServiceServer<Sink>,
}

impl Service<http::Request<tonic::body::Body>> for Otlp {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        if request
            .uri()
            .path()
            .starts_with("/opentelemetry.proto.collector.metrics.")
        {
            self.metrics.call(request)
        } else {
            self.traces.call(request)
        }
    }
}

/// OTLP/HTTP in front of the same services.
fn http_routes(sink: Arc<Sink>) -> axum::Router {
    use axum::{body::Bytes, http::HeaderMap, routing::post};
    let metrics = sink.clone();
    axum::Router::new()
        .route(
            "/v1/traces",
            post(move |headers: HeaderMap, body: Bytes| async move {
                otlp_http::answer(&headers, &body, |request| async move {
                    TraceService::export(&*sink, tonic::Request::new(request)).await
                })
                .await
            }),
        )
        .route(
            "/v1/metrics",
            post(move |headers: HeaderMap, body: Bytes| async move {
                otlp_http::answer(&headers, &body, |request| async move {
                    MetricsService::export(&*metrics, tonic::Request::new(request)).await
                })
                .await
            }),
        )
        .layer(axum::extract::DefaultBodyLimit::max(otlp_http::MAX_REQUEST_BYTES))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (listen, path, answer, http) = match args.as_slice() {
        [listen, path] => (listen, path, Answer::Accept, false),
        [listen, path, answer] => (listen, path, answer.parse()?, false),
        [listen, path, answer, protocol] if matches!(protocol.as_str(), "grpc" | "http") => {
            (listen, path, answer.parse()?, protocol == "http")
        }
        _ => anyhow::bail!("usage: synspan-otlp-sink LISTEN_ADDR COUNTS_FILE [ANSWER [grpc|http]]"),
    };
    let listen: SocketAddr = listen
        .parse()
        .with_context(|| format!("{listen}: not an address:port"))?;
    let sink = Arc::new(Sink {
        counts: Mutex::default(),
        path: PathBuf::from(path),
        answer,
        first_request: OnceLock::new(),
    });
    sink.update(|_| {})?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        println!("listening {}", listener.local_addr()?);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let stop = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        if http {
            return axum::serve(listener, http_routes(sink))
                .with_graceful_shutdown(stop)
                .await
                .context("serving OTLP/HTTP");
        }
        let otlp = Otlp {
            // synspan cuts requests at 3 MiB; take anything a collector would.
            traces: TraceServiceServer::from_arc(sink.clone()).max_decoding_message_size(64 << 20),
            metrics: MetricsServiceServer::from_arc(sink),
        };
        tonic::transport::Server::builder()
            .serve_with_incoming_shutdown(
                otlp,
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                stop,
            )
            .await
            .context("serving OTLP")
    })
}
