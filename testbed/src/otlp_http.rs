//! OTLP/HTTP in front of a test bed receiver's gRPC services: `POST /v1/traces` or
//! `/v1/metrics` with a protobuf body, gzip accepted, answered with the service's response.
//! A refusal becomes the HTTP status the OTLP specification's retry rules read: 503 for
//! `UNAVAILABLE`, 429 with `Retry-After` for a throttle (`RESOURCE_EXHAUSTED` with a
//! `RetryInfo`), 400 for a malformed request, 500 for the rest; its body a
//! `google.rpc.Status`.

use std::{future::Future, io::Read as _};

use axum::{
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use prost::Message;
use tonic::Code;
use tonic_types::StatusExt as _;

/// synspan cuts its requests at 3 MiB; take anything a collector would.
pub const MAX_REQUEST_BYTES: usize = 64 << 20;

/// Decodes `body` as `Req`, has `export` answer it, and writes the answer as OTLP/HTTP does.
pub async fn answer<Req, Resp, F, Fut>(headers: &HeaderMap, body: &[u8], export: F) -> Response
where
    Req: Message + Default,
    Resp: Message,
    F: FnOnce(Req) -> Fut,
    Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
{
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if content_type != "application/x-protobuf" {
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("content-type {content_type:?}: only application/x-protobuf"),
        )
            .into_response();
    }
    let request = match request_body(headers, body) {
        Ok(bytes) => bytes,
        Err(refusal) => return refusal.into_response(),
    };
    let request = match Req::decode(request.as_slice()) {
        Ok(request) => request,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("not an export request: {e}")).into_response(),
    };
    match export(request).await {
        Ok(response) => protobuf(StatusCode::OK, response.into_inner().encode_to_vec()),
        Err(status) => refusal(&status),
    }
}

fn protobuf(code: StatusCode, body: Vec<u8>) -> Response {
    (code, [(header::CONTENT_TYPE, "application/x-protobuf")], body).into_response()
}

fn refusal(status: &tonic::Status) -> Response {
    let retry_info = status.get_details_retry_info();
    let code = match status.code() {
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::ResourceExhausted if retry_info.is_some() => StatusCode::TOO_MANY_REQUESTS,
        Code::InvalidArgument => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let body = tonic_types::Status {
        code: status.code() as i32,
        message: status.message().to_owned(),
        details: vec![],
    };
    let mut response = protobuf(code, body.encode_to_vec());
    // Whole seconds, rounded up: the header has no finer unit.
    let retry_after = retry_info
        .and_then(|info| info.retry_delay)
        .map(|delay| delay.as_secs() + u64::from(delay.subsec_nanos() > 0));
    if let Some(seconds) = retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

/// A request body, gunzipped when the sender said so, never more than `MAX_REQUEST_BYTES`.
fn request_body(headers: &HeaderMap, body: &[u8]) -> Result<Vec<u8>, (StatusCode, String)> {
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("identity");
    match encoding {
        "identity" => Ok(body.to_vec()),
        "gzip" => {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(body)
                .take(MAX_REQUEST_BYTES as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|e| (StatusCode::BAD_REQUEST, format!("gzip: {e}")))?;
            if out.len() > MAX_REQUEST_BYTES {
                return Err((StatusCode::PAYLOAD_TOO_LARGE, "request too large".to_owned()));
            }
            Ok(out)
        }
        other => Err((
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("content-encoding {other} is not supported"),
        )),
    }
}
