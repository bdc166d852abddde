//! An OTLP gRPC receiver that decodes every request and keeps count: spans in all, spans by
//! `process.pid`, requests. The benchmark's receiver: a collector that writes spans out
//! (rotel with the test bed's span processor, as the end-to-end tests use) spends more CPU
//! per span than synspan does, on the same cores as the storm it is meant to measure.
//!
//! usage: synspan-otlp-sink LISTEN_ADDR COUNTS_FILE
//!
//! Prints `listening <addr>` once it accepts connections. After every request it rewrites
//! COUNTS_FILE (JSON: `spans`, `requests`, `metric_requests`, `by_pid`), atomically, so a
//! reader never sees half of it. Stops on SIGTERM or SIGINT.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use anyhow::Context as _;
use opentelemetry_proto::tonic::{
    collector::{
        metrics::v1::{
            ExportMetricsServiceRequest, ExportMetricsServiceResponse,
            metrics_service_server::{MetricsService, MetricsServiceServer},
        },
        trace::v1::{
            ExportTraceServiceRequest, ExportTraceServiceResponse,
            trace_service_server::{TraceService, TraceServiceServer},
        },
    },
    common::v1::any_value::Value,
};
use tonic::codegen::{BoxFuture, Service, http};

#[derive(Default, serde::Serialize)]
struct Counts {
    spans: u64,
    requests: u64,
    metric_requests: u64,
    by_pid: BTreeMap<i64, u64>,
}

struct Sink {
    counts: Mutex<Counts>,
    path: PathBuf,
}

impl Sink {
    fn update(&self, f: impl FnOnce(&mut Counts)) -> Result<(), tonic::Status> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut counts);
        let json = serde_json::to_vec(&*counts).map_err(|e| tonic::Status::internal(e.to_string()))?;
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, json)
            .and_then(|()| std::fs::rename(&tmp, &self.path))
            .map_err(|e| tonic::Status::internal(format!("{}: {e}", self.path.display())))
    }
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let request = request.into_inner();
        let mut by_pid: BTreeMap<i64, u64> = BTreeMap::new();
        let mut spans = 0;
        for span in request
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| &s.spans)
        {
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
            }
        }
        self.update(|counts| {
            counts.requests += 1;
            counts.spans += spans;
            for (pid, n) in by_pid {
                *counts.by_pid.entry(pid).or_default() += n;
            }
        })?;
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Sink {
    async fn export(
        &self,
        _request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.update(|counts| counts.metric_requests += 1)?;
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

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, path] = args.as_slice() else {
        anyhow::bail!("usage: synspan-otlp-sink LISTEN_ADDR COUNTS_FILE");
    };
    let listen: SocketAddr = listen
        .parse()
        .with_context(|| format!("{listen}: not an address:port"))?;
    let sink = Arc::new(Sink {
        counts: Mutex::default(),
        path: PathBuf::from(path),
    });
    sink.update(|_| {})?;
    let otlp = Otlp {
        // synspan cuts requests at 3 MiB; take anything a collector would.
        traces: TraceServiceServer::from_arc(sink.clone()).max_decoding_message_size(64 << 20),
        metrics: MetricsServiceServer::from_arc(sink),
    };
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
