//! A Jaeger backend for the tests: the real Jaeger UI and Jaeger's JSON query API
//! (`otlp-embedded`, traces in memory), fed by OTLP over gRPC (gzip accepted) and over
//! HTTP (`POST /v1/traces`, protobuf, gzip accepted).
//!
//! usage: synspan-jaeger GRPC_ADDR UI_ADDR HTTP_ADDR   (port 0: any free port)
//!
//! Prints one JSON line, `{"grpc":"127.0.0.1:…","ui":"…","http":"…"}`, once all three
//! accept connections. Stops on SIGTERM or SIGINT.
//!
//! `otlp-embedded` keeps spans as OTLP sent them and shows only their attributes, so the UI
//! would show no kind, no status and no error marker. Real Jaeger derives tags from those
//! fields when it takes OTLP in; this receiver adds the same ones before storing a span, so
//! the UI and the API show what a user of real Jaeger sees.

use std::net::SocketAddr;

use anyhow::Context as _;
use axum::{body::Bytes, http::HeaderMap};
use otlp_embedded::{
    Config, State, TraceService, TraceServiceImpl, TraceServiceServer,
    proto::{
        collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse},
        common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value::Value},
        trace::v1::{Span, span::SpanKind, status::StatusCode as OtlpStatus},
    },
    ui_app,
};
use synspan_testbed::otlp_http::{self, MAX_REQUEST_BYTES};
use tokio::net::TcpListener;

fn string_tag(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(Value::StringValue(value.to_owned())),
        }),
    }
}

/// Pushes `tag` unless the span already has an attribute of that name, as Jaeger's
/// translator leaves an explicit attribute alone.
fn add_tag(attributes: &mut Vec<KeyValue>, tag: KeyValue) {
    if !attributes.iter().any(|kv| kv.key == tag.key) {
        attributes.push(tag);
    }
}

/// The tags Jaeger's OTLP translator derives from a span's kind, status and scope, and the
/// `event` field it gives each log.
fn add_jaeger_tags(span: &mut Span, scope: Option<&InstrumentationScope>) {
    let kind = match SpanKind::try_from(span.kind) {
        Ok(SpanKind::Client) => Some("client"),
        Ok(SpanKind::Server) => Some("server"),
        Ok(SpanKind::Producer) => Some("producer"),
        Ok(SpanKind::Consumer) => Some("consumer"),
        Ok(SpanKind::Internal) => Some("internal"),
        Ok(SpanKind::Unspecified) | Err(_) => None,
    };
    let attributes = &mut span.attributes;
    if let Some(kind) = kind {
        add_tag(attributes, string_tag("span.kind", kind));
    }
    if let Some(status) = &span.status {
        match OtlpStatus::try_from(status.code) {
            Ok(OtlpStatus::Error) => {
                add_tag(attributes, string_tag("otel.status_code", "ERROR"));
                let error = KeyValue {
                    key: "error".to_owned(),
                    value: Some(AnyValue {
                        value: Some(Value::BoolValue(true)),
                    }),
                };
                add_tag(attributes, error);
            }
            Ok(OtlpStatus::Ok) => add_tag(attributes, string_tag("otel.status_code", "OK")),
            Ok(OtlpStatus::Unset) | Err(_) => {}
        }
        if !status.message.is_empty() {
            add_tag(attributes, string_tag("otel.status_description", &status.message));
        }
    }
    if let Some(scope) = scope {
        if !scope.name.is_empty() {
            add_tag(attributes, string_tag("otel.scope.name", &scope.name));
        }
        if !scope.version.is_empty() {
            add_tag(attributes, string_tag("otel.scope.version", &scope.version));
        }
    }
    for event in &mut span.events {
        if !event.name.is_empty() {
            let name = event.name.clone();
            add_tag(&mut event.attributes, string_tag("event", &name));
        }
    }
}

fn with_jaeger_tags(mut request: ExportTraceServiceRequest) -> ExportTraceServiceRequest {
    for scope_spans in request.resource_spans.iter_mut().flat_map(|r| &mut r.scope_spans) {
        let scope = scope_spans.scope.clone();
        for span in &mut scope_spans.spans {
            add_jaeger_tags(span, scope.as_ref());
        }
    }
    request
}

/// The crate's store behind Jaeger's tags.
struct Tagged(TraceServiceImpl);

#[tonic::async_trait]
impl TraceService for Tagged {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let request = with_jaeger_tags(request.into_inner());
        self.0.export(tonic::Request::new(request)).await
    }
}

/// `POST /v1/traces` as the OTLP/HTTP specification says, protobuf only.
async fn http_export(
    axum::extract::Extension(service): axum::extract::Extension<std::sync::Arc<Tagged>>,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    otlp_http::answer(&headers, &body, |request| async move {
        service.export(tonic::Request::new(request)).await
    })
    .await
}

fn parse_addr(arg: &str) -> anyhow::Result<SocketAddr> {
    arg.parse().with_context(|| format!("{arg}: not an address:port"))
}

async fn stopped() {
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [grpc, ui, http] = args.as_slice() else {
        anyhow::bail!("usage: synspan-jaeger GRPC_ADDR UI_ADDR HTTP_ADDR");
    };
    let (grpc, ui, http) = (parse_addr(grpc)?, parse_addr(ui)?, parse_addr(http)?);
    let state = State::new(Config {
        max_length: 10_000,
        max_memory_usage: 256 << 20,
    });
    let service = std::sync::Arc::new(Tagged(TraceServiceImpl::new(state.clone())));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {addr}"))
        };
        let (grpc, ui, http) = (bind(grpc).await?, bind(ui).await?, bind(http).await?);
        println!(
            "{}",
            serde_json::json!({
                "grpc": grpc.local_addr()?.to_string(),
                "ui": ui.local_addr()?.to_string(),
                "http": http.local_addr()?.to_string(),
            })
        );
        let traces = TraceServiceServer::from_arc(service.clone())
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
            .max_decoding_message_size(MAX_REQUEST_BYTES);
        let grpc = tonic::transport::Server::builder()
            .add_service(traces)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(grpc));
        let ui = axum::serve(ui, ui_app(state, "/"));
        let otlp_http = axum::Router::new()
            .route("/v1/traces", axum::routing::post(http_export))
            .layer(axum::extract::DefaultBodyLimit::max(MAX_REQUEST_BYTES))
            .layer(axum::extract::Extension(service));
        let http = axum::serve(http, otlp_http);
        // Traces live in memory only: nothing to finish before exiting, so a stop does not
        // wait for the browser's or the exporter's idle connections to close.
        tokio::select! {
            served = grpc => served.context("serving OTLP gRPC"),
            served = ui => served.context("serving the Jaeger UI"),
            served = http => served.context("serving OTLP/HTTP"),
            () = stopped() => Ok(()),
        }
    })
}
