//! One connection per collector, shared by every signal sent there, and one export try: an
//! already encoded request, its signal's headers and compression, bounded by its timeout,
//! over gRPC (a tonic channel, HTTP/2) or HTTP ([`super::http`], HTTP/1.1).

use std::{marker::PhantomData, time::Duration};

use bytes::Bytes;
use tonic::{
    Status,
    codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder},
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};

use super::{
    Destination, OtlpError, Protocol, TlsMaterial,
    http::{self, HttpExport},
    redacted,
    retry::ExportError,
    settings::Signal,
};

/// The service method each signal's requests go to over gRPC.
pub(crate) const TRACES_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
pub(crate) const METRICS_PATH: &str = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export";

/// One signal's client. Clones share the connection.
#[derive(Clone)]
pub(crate) struct Client {
    transport: Transport,
    timeout: Duration,
}

#[derive(Clone)]
enum Transport {
    Grpc {
        grpc: tonic::client::Grpc<Channel>,
        headers: tonic::metadata::MetadataMap,
        path: &'static str,
    },
    Http(HttpExport),
}

/// What signals sent to the same collector share.
#[derive(Clone)]
enum Connection {
    Grpc(Channel),
    Http(http::Pool),
}

/// The clients of both signals.
pub(crate) struct Clients {
    pub(crate) traces: Client,
    pub(crate) metrics: Client,
}

impl Clients {
    /// Connects lazily: a collector that is down at start-up is retried like any outage.
    pub(crate) fn new(traces: &Destination, metrics: &Destination) -> Result<Self, OtlpError> {
        let traces_connection = connection(traces)?;
        let (t, m) = (&traces.settings, &metrics.settings);
        // An HTTP pool keeps a connection per collector, so any two HTTP signals with the
        // same trust can share one; a gRPC channel is one collector's.
        let shared = t.protocol == m.protocol
            && traces.tls == metrics.tls
            && (t.protocol == Protocol::HttpProtobuf || t.endpoint == m.endpoint);
        let metrics_connection = if shared {
            traces_connection.clone()
        } else {
            connection(metrics)?
        };
        Ok(Self {
            traces: Client::new(traces, traces_connection, Signal::Traces),
            metrics: Client::new(metrics, metrics_connection, Signal::Metrics),
        })
    }
}

fn connection(destination: &Destination) -> Result<Connection, OtlpError> {
    match destination.settings.protocol {
        Protocol::Grpc => channel(destination).map(Connection::Grpc),
        Protocol::HttpProtobuf => http::pool(destination).map(Connection::Http),
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

fn tls_config(endpoint: &::http::Uri, material: &TlsMaterial) -> ClientTlsConfig {
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
    fn new(destination: &Destination, connection: Connection, signal: Signal) -> Self {
        let settings = &destination.settings;
        let transport = match connection {
            Connection::Grpc(channel) => {
                let mut grpc = tonic::client::Grpc::new(channel);
                if let Some(encoding) = settings.compression {
                    grpc = grpc.send_compressed(encoding);
                }
                Transport::Grpc {
                    grpc,
                    headers: settings.headers.0.clone(),
                    path: match signal {
                        Signal::Traces => TRACES_PATH,
                        Signal::Metrics => METRICS_PATH,
                    },
                }
            }
            Connection::Http(pool) => Transport::Http(HttpExport {
                pool,
                url: settings.endpoint.clone(),
                headers: settings.headers.0.clone().into_headers(),
                gzip: settings.compression == Some(CompressionEncoding::Gzip),
            }),
        };
        Self {
            transport,
            timeout: settings.timeout,
        }
    }

    /// One try of an encoded request; `R` is the service's response. A try that outlasts the
    /// signal's timeout, connecting included, fails with [`ExportError::NoAnswer`], which is
    /// retried.
    pub(crate) async fn export<R>(&mut self, request: Bytes) -> Result<R, ExportError>
    where
        R: prost::Message + Default + Send + 'static,
    {
        let timeout = self.timeout;
        let attempt = async {
            match &mut self.transport {
                Transport::Grpc { grpc, headers, path } => {
                    grpc_export(grpc, headers.clone(), path, request).await
                }
                Transport::Http(http) => http.export(request).await,
            }
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(ExportError::NoAnswer(timeout)),
        }
    }
}

async fn grpc_export<R>(
    grpc: &mut tonic::client::Grpc<Channel>,
    headers: tonic::metadata::MetadataMap,
    path: &'static str,
    request: Bytes,
) -> Result<R, ExportError>
where
    R: prost::Message + Default + Send + 'static,
{
    grpc.ready()
        .await
        .map_err(|err| ExportError::Unreachable(err.to_string()))?;
    let mut request = tonic::Request::new(request);
    *request.metadata_mut() = headers;
    let response = grpc
        .unary(
            request,
            ::http::uri::PathAndQuery::from_static(path),
            EncodedCodec::<R>(PhantomData),
        )
        .await?;
    Ok(response.into_inner())
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
        assert!(
            matches!(&status, ExportError::Grpc(s) if s.code() == Code::Unimplemented),
            "{status:?}"
        );

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
        assert!(matches!(status, ExportError::NoAnswer(_)), "{status:?}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    /// What an OTLP/HTTP collector saw of one request.
    #[derive(Debug)]
    struct Posted {
        path: String,
        content_type: Option<String>,
        encoding: Option<String>,
        api_key: Option<String>,
        body: Vec<u8>,
    }

    /// An OTLP/HTTP collector on a free port of 127.0.0.1: answers request `i` with
    /// `answers[i]` (a status and a `Retry-After`), the ones after with 200 and a partial
    /// success rejecting 2 spans; or stalls for `stall`. Counts the connections it accepts.
    async fn serve_http(
        answers: Vec<(u16, Option<&'static str>)>,
        stall: Option<Duration>,
    ) -> (SocketAddr, Arc<Mutex<Vec<Posted>>>, Arc<AtomicUsize>) {
        use http_body_util::BodyExt as _;
        use hyper_util::rt::TokioIo;
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTracePartialSuccess;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let posted = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (seen, counted) = (posted.clone(), connections.clone());
        let answers = Arc::new(answers);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::Relaxed);
                let (seen, answers) = (seen.clone(), answers.clone());
                let service =
                    hyper::service::service_fn(move |request: ::http::Request<hyper::body::Incoming>| {
                        let (seen, answers) = (seen.clone(), answers.clone());
                        async move {
                            let header = |name: &str| {
                                request
                                    .headers()
                                    .get(name)
                                    .and_then(|v| v.to_str().ok())
                                    .map(String::from)
                            };
                            let mut post = Posted {
                                path: request.uri().path().to_owned(),
                                content_type: header("content-type"),
                                encoding: header("content-encoding"),
                                api_key: header("api-key"),
                                body: Vec::new(),
                            };
                            let body = request.into_body().collect().await.unwrap().to_bytes();
                            post.body = if post.encoding.as_deref() == Some("gzip") {
                                let mut out = Vec::new();
                                std::io::Read::read_to_end(
                                    &mut flate2::read::GzDecoder::new(&body[..]),
                                    &mut out,
                                )
                                .unwrap();
                                out
                            } else {
                                body.to_vec()
                            };
                            let n = {
                                let mut seen = seen.lock().unwrap();
                                seen.push(post);
                                seen.len() - 1
                            };
                            if let Some(stall) = stall {
                                tokio::time::sleep(stall).await;
                            }
                            let mut response = ::http::Response::builder();
                            let body = match answers.get(n) {
                                Some(&(code, retry_after)) => {
                                    response = response.status(code);
                                    if let Some(value) = retry_after {
                                        response = response.header("retry-after", value);
                                    }
                                    let status = tonic_types::Status {
                                        code: 14,
                                        message: format!("answer {n}"),
                                        details: vec![],
                                    };
                                    prost::Message::encode_to_vec(&status)
                                }
                                None => prost::Message::encode_to_vec(&ExportTraceServiceResponse {
                                    partial_success: Some(ExportTracePartialSuccess {
                                        rejected_spans: 2,
                                        error_message: "two too many".into(),
                                    }),
                                }),
                            };
                            let response = response
                                .header("content-type", "application/x-protobuf")
                                .body(http_body_util::Full::new(Bytes::from(body)))
                                .unwrap();
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        (addr, posted, connections)
    }

    fn http_clients(addr: SocketAddr, vars: &[(&str, &str)]) -> Clients {
        let mut all = vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{addr}")),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".into()),
        ];
        all.extend(vars.iter().map(|(k, v)| (*k, v.to_string())));
        clients(&all)
    }

    #[tokio::test]
    async fn http_retries_after_retry_after_with_the_signals_settings() {
        let (addr, posted, connections) = serve_http(vec![(503, Some("1")), (429, None)], None).await;
        let clients = http_clients(
            addr,
            &[
                ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=k1"),
                ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip"),
            ],
        );
        let request = Bytes::from_static(b"\x0a\x00 an encoded request");
        let started = Instant::now();
        let traces = clients.traces.clone();
        let response = with_retry(started + Duration::from_secs(20), || {
            let mut client = traces.clone();
            let request = request.clone();
            async move { client.export::<ExportTraceServiceResponse>(request).await }
        })
        .await
        .unwrap();
        // 503 with Retry-After: its second was waited; 429 without: the backoff's step.
        assert!(
            started.elapsed() >= Duration::from_millis(1050),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(response.partial_success.unwrap().rejected_spans, 2);

        let mut metrics = clients.metrics.clone();
        metrics
            .export::<ExportMetricsServiceResponse>(Bytes::from_static(b"metrics"))
            .await
            .unwrap();

        let posted = posted.lock().unwrap();
        let paths: Vec<&str> = posted.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(paths, ["/v1/traces", "/v1/traces", "/v1/traces", "/v1/metrics"]);
        for (i, post) in posted.iter().enumerate() {
            assert_eq!(
                post.content_type.as_deref(),
                Some("application/x-protobuf"),
                "{post:?}"
            );
            assert_eq!(post.api_key.as_deref(), Some("k1"), "{post:?}");
            let (encoding, body) = if i < 3 {
                (Some("gzip"), &request[..])
            } else {
                (None, &b"metrics"[..])
            };
            assert_eq!(post.encoding.as_deref(), encoding, "{post:?}");
            assert_eq!(post.body, body, "{post:?}");
        }
        assert_eq!(
            connections.load(Ordering::Relaxed),
            1,
            "one kept-alive connection for every request of both signals"
        );
    }

    #[tokio::test]
    async fn http_permanent_failures_are_not_retried() {
        let (addr, posted, _) = serve_http(vec![(400, Some("1")), (500, None)], None).await;
        let clients = http_clients(addr, &[]);
        for expected in [400, 500] {
            let traces = clients.traces.clone();
            let err = with_retry(Instant::now() + Duration::from_secs(20), || {
                let mut client = traces.clone();
                async move { client.export::<ExportTraceServiceResponse>(Bytes::new()).await }
            })
            .await
            .unwrap_err();
            match &err {
                ExportError::Http { status, message, .. } => {
                    assert_eq!(status.as_u16(), expected);
                    assert!(message.starts_with("answer "), "{err}");
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(posted.lock().unwrap().len(), 2, "one try each");
    }

    #[tokio::test]
    async fn http_tries_end_at_the_timeout_and_a_closed_port_is_retried() {
        let (addr, _, _) = serve_http(vec![], Some(Duration::from_secs(30))).await;
        let mut clients = http_clients(addr, &[("OTEL_EXPORTER_OTLP_TIMEOUT", "200")]);
        let started = Instant::now();
        let err = clients
            .traces
            .export::<ExportTraceServiceResponse>(Bytes::new())
            .await
            .unwrap_err();
        assert!(matches!(err, ExportError::NoAnswer(_)), "{err:?}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );

        // Nothing listens on a port just freed.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let mut clients = http_clients(closed, &[]);
        let err = clients
            .traces
            .export::<ExportTraceServiceResponse>(Bytes::new())
            .await
            .unwrap_err();
        assert!(matches!(err, ExportError::Unreachable(_)), "{err:?}");
        assert!(err.to_string().contains("onnection refused"), "{err}");
        assert_eq!(
            crate::otlp::retry::classify(&err),
            crate::otlp::retry::Verdict::Retry(None)
        );
    }
}
