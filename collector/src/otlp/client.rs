//! One gRPC channel per collector, shared by every signal sent there, and one export try:
//! an already encoded request, its signal's headers and compression, bounded by its timeout.

use std::{marker::PhantomData, time::Duration};

use bytes::Bytes;
use tonic::{
    Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};

use super::{Destination, OtlpError, TlsMaterial, redacted};

/// The service method each signal's requests go to.
pub(crate) const TRACES_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
pub(crate) const METRICS_PATH: &str = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export";

/// One signal's client. Clones share the connection.
#[derive(Clone)]
pub(crate) struct Client {
    grpc: tonic::client::Grpc<Channel>,
    headers: tonic::metadata::MetadataMap,
    timeout: Duration,
    path: &'static str,
}

/// The clients of both signals.
pub(crate) struct Clients {
    pub(crate) traces: Client,
    pub(crate) metrics: Client,
}

impl Clients {
    /// Connects lazily: a collector that is down at start-up is retried like any outage.
    pub(crate) fn new(traces: &Destination, metrics: &Destination) -> Result<Self, OtlpError> {
        let traces_channel = channel(traces)?;
        let same_place = traces.settings.endpoint == metrics.settings.endpoint && traces.tls == metrics.tls;
        let metrics_channel = if same_place {
            traces_channel.clone()
        } else {
            channel(metrics)?
        };
        Ok(Self {
            traces: Client::new(traces, traces_channel, TRACES_PATH),
            metrics: Client::new(metrics, metrics_channel, METRICS_PATH),
        })
    }
}

fn channel(destination: &Destination) -> Result<Channel, OtlpError> {
    let uri = &destination.settings.endpoint;
    // A collector that vanished without closing the connection (a node gone, a dropped
    // route) must not hold a request until the retry timeout: keepalives notice.
    let mut endpoint = Channel::builder(uri.clone())
        .connect_timeout(destination.settings.timeout)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    if uri.scheme_str() == Some("https") {
        endpoint = endpoint
            .tls_config(tls_config(uri, &destination.tls))
            .map_err(|source| OtlpError::Endpoint {
                endpoint: redacted(uri),
                source,
            })?;
    }
    Ok(endpoint.connect_lazy())
}

fn tls_config(endpoint: &http::Uri, material: &TlsMaterial) -> ClientTlsConfig {
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

impl Client {
    fn new(destination: &Destination, channel: Channel, path: &'static str) -> Self {
        let settings = &destination.settings;
        let mut grpc = tonic::client::Grpc::new(channel);
        if let Some(encoding) = settings.compression {
            grpc = grpc.send_compressed(encoding);
        }
        Self {
            grpc,
            headers: settings.headers.0.clone(),
            timeout: settings.timeout,
            path,
        }
    }

    /// One try of an encoded request; `R` is the service's response. A try that outlasts the
    /// signal's timeout, connecting included, fails with `DEADLINE_EXCEEDED`, which is retried.
    pub(crate) async fn export<R>(&mut self, request: Bytes) -> Result<R, Status>
    where
        R: prost::Message + Default + Send + 'static,
    {
        let timeout = self.timeout;
        let path = self.path;
        let headers = self.headers.clone();
        let grpc = &mut self.grpc;
        let attempt = async move {
            grpc.ready()
                .await
                .map_err(|err| Status::unavailable(format!("collector not reachable: {err}")))?;
            let mut request = tonic::Request::new(request);
            *request.metadata_mut() = headers;
            let response = grpc
                .unary(
                    request,
                    http::uri::PathAndQuery::from_static(path),
                    EncodedCodec::<R>(PhantomData),
                )
                .await?;
            Ok(response.into_inner())
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(Status::deadline_exceeded(format!("no answer within {timeout:?}"))),
        }
    }
}

/// Sends requests that are already encoded, and decodes the response as `R`.
struct EncodedCodec<R>(PhantomData<R>);

struct EncodedEncoder;
struct ResponseDecoder<R>(PhantomData<R>);

impl<R: prost::Message + Default + Send + 'static> Codec for EncodedCodec<R> {
    type Encode = Bytes;
    type Decode = R;
    type Encoder = EncodedEncoder;
    type Decoder = ResponseDecoder<R>;

    fn encoder(&mut self) -> Self::Encoder {
        EncodedEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        ResponseDecoder(PhantomData)
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

impl<R: prost::Message + Default + Send + 'static> Decoder for ResponseDecoder<R> {
    type Item = R;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<R>, Status> {
        R::decode(src)
            .map(Some)
            .map_err(|err| Status::internal(format!("undecodable export response: {err}")))
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        net::SocketAddr,
        sync::{
            Arc, Mutex,
            atomic::{AtomicUsize, Ordering},
        },
    };

    use opentelemetry_proto::tonic::collector::{
        metrics::v1::ExportMetricsServiceResponse,
        trace::v1::{
            ExportTraceServiceRequest, ExportTraceServiceResponse,
            trace_service_server::{TraceService, TraceServiceServer},
        },
    };
    use tokio::time::Instant;
    use tokio_stream::StreamExt as _;
    use tonic::Code;
    use tonic_types::{ErrorDetails, StatusExt as _};

    use super::*;
    use crate::otlp::{retry::with_retry, settings};

    /// What the collector saw of each request.
    #[derive(Debug)]
    struct Seen {
        api_key: Option<String>,
        encoding: Option<String>,
    }

    /// A trace collector that refuses the first request with `RESOURCE_EXHAUSTED` and a
    /// `RetryInfo`, and takes the ones after it; or answers nothing for `stall`.
    struct Collector {
        seen: Mutex<Vec<Seen>>,
        throttle: Option<Duration>,
        stall: Option<Duration>,
    }

    #[tonic::async_trait]
    impl TraceService for Collector {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, Status> {
            let header = |name: &str| {
                request
                    .metadata()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(String::from)
            };
            let first = {
                let mut seen = self.seen.lock().unwrap();
                seen.push(Seen {
                    api_key: header("api-key"),
                    encoding: header("grpc-encoding"),
                });
                seen.len() == 1
            };
            if let Some(stall) = self.stall {
                tokio::time::sleep(stall).await;
            }
            match self.throttle {
                Some(delay) if first => Err(Status::with_error_details(
                    Code::ResourceExhausted,
                    "slow down",
                    ErrorDetails::with_retry_info(Some(delay)),
                )),
                _ => Ok(tonic::Response::new(ExportTraceServiceResponse::default())),
            }
        }
    }

    /// Serves `collector` on a free port of 127.0.0.1; counts the connections it accepts.
    async fn serve(collector: Arc<Collector>) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(move |conn| {
            counted.fetch_add(1, Ordering::Relaxed);
            conn
        });
        let service = TraceServiceServer::from_arc(collector)
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip);
        tokio::spawn(tonic::transport::Server::builder().serve_with_incoming(service, incoming));
        (addr, connections)
    }

    fn clients(vars: &[(&str, String)]) -> Clients {
        let vars: HashMap<&str, String> = vars.iter().cloned().collect();
        let signals = settings::resolve(&settings::Flags::default(), &|var| vars.get(var).cloned())
            .unwrap()
            .unwrap();
        let destination = |settings| Destination {
            settings,
            tls: TlsMaterial::default(),
        };
        Clients::new(&destination(signals.traces), &destination(signals.metrics)).unwrap()
    }

    #[tokio::test]
    async fn one_connection_for_both_signals_with_their_settings() {
        let collector = Arc::new(Collector {
            seen: Mutex::default(),
            throttle: Some(Duration::from_millis(300)),
            stall: None,
        });
        let (addr, connections) = serve(collector.clone()).await;
        let mut clients = clients(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{addr}")),
            ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=k1".into()),
            ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip".into()),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "4000".into()),
        ]);

        let started = Instant::now();
        let traces = clients.traces.clone();
        let response = with_retry(started + Duration::from_secs(20), || {
            let mut client = traces.clone();
            async move { client.export::<ExportTraceServiceResponse>(Bytes::new()).await }
        })
        .await;
        assert!(response.is_ok(), "{response:?}");
        // Throttled once: the collector's delay was waited, not the 100 ms backoff step.
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "{:?}",
            started.elapsed()
        );

        // The collector serves no metrics: UNIMPLEMENTED, which is not retried.
        let status = clients
            .metrics
            .export::<ExportMetricsServiceResponse>(Bytes::new())
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unimplemented, "{status:?}");

        assert_eq!(
            connections.load(Ordering::Relaxed),
            1,
            "one channel for both signals"
        );
        let seen = collector.seen.lock().unwrap();
        assert_eq!(seen.len(), 2, "{seen:?}");
        for request in seen.iter() {
            assert_eq!(request.api_key.as_deref(), Some("k1"));
            assert_eq!(request.encoding.as_deref(), Some("gzip"));
        }
    }

    #[tokio::test]
    async fn a_try_ends_at_the_signal_timeout() {
        let collector = Arc::new(Collector {
            seen: Mutex::default(),
            throttle: None,
            stall: Some(Duration::from_secs(30)),
        });
        let (addr, _) = serve(collector).await;
        let mut clients = clients(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{addr}")),
            ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "200".into()),
        ]);
        let started = Instant::now();
        let status = clients
            .traces
            .export::<ExportTraceServiceResponse>(Bytes::new())
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }
}
