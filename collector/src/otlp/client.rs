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
pub struct Client {
    grpc: tonic::client::Grpc<Channel>,
    headers: tonic::metadata::MetadataMap,
    timeout: Duration,
    path: &'static str,
}

/// The clients of both signals.
pub struct Clients {
    pub traces: Client,
    pub metrics: Client,
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
    /// signal's timeout fails with `DEADLINE_EXCEEDED`, which is retried.
    pub async fn export<R>(&mut self, request: Bytes) -> Result<R, Status>
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
            // The collector learns the deadline too (`grpc-timeout`) and can give up with us.
            request.set_timeout(timeout);
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
