//! OTLP trace requests in protobuf, written straight from each [`ConnectSpan`] into reused
//! buffers.
//!
//! The SDK's exporter clones each batch for its retries, converts every span into generated
//! structs (a `String` for every attribute key and value) and encodes those. At tens of
//! thousands of spans a second that was most of the agent's CPU; here a span costs a few
//! buffer appends, and no `SpanData` is built to be walked again. Field numbers are those of `opentelemetry/proto/trace/v1/trace.proto`
//! and its imports; the tests decode the output with the generated types and compare it
//! with the SDK's own conversion.

use opentelemetry::{
    Array, InstrumentationScope, KeyValue, Value,
    trace::{SpanId, Status, TraceFlags},
};
use opentelemetry_sdk::Resource;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};

use crate::{
    otlp::unix_nanos,
    span::{ConnectSpan, SPAN_NAME},
};

/// `Span.SpanKind.SPAN_KIND_CLIENT`.
const SPAN_KIND_CLIENT: u64 = 3;

/// `Span.flags` and `Span.Link.flags`: whether the parent (the linked span) is remote is
/// said; it is when the application's span is the parent (the link), in another process.
const SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE: u32 = 0x100;
const SPAN_FLAGS_CONTEXT_IS_REMOTE: u32 = 0x200;

/// One export request being filled: the spans of one resource and scope.
#[derive(Default)]
pub(crate) struct TraceRequest {
    /// The `ScopeSpans.spans` entries so far.
    spans: Vec<u8>,
    count: usize,
    /// Reused while a span, an event or a value is written: nested messages are prefixed
    /// with their length, known only once they are written.
    span: Vec<u8>,
    event: Vec<u8>,
    value: Vec<u8>,
}

impl TraceRequest {
    pub(crate) fn len(&self) -> usize {
        self.count
    }

    /// Bytes written so far, about what the request will weigh on the wire.
    pub(crate) fn encoded_len(&self) -> usize {
        self.spans.len()
    }

    /// Appends the span of one attempt: no trace state, nothing dropped, so those fields
    /// stay at their defaults and are left out; a parent and a link only when it has them.
    pub(crate) fn push(&mut self, span: &ConnectSpan) {
        let Self {
            span: buf,
            event,
            value,
            ..
        } = self;
        buf.clear();
        bytes_field(buf, 1, &span.trace_id.to_bytes());
        bytes_field(buf, 2, &span.span_id.to_bytes());
        let has_parent = span.parent_span_id() != SpanId::INVALID;
        if has_parent {
            bytes_field(buf, 4, &span.parent_span_id().to_bytes());
        }
        string_field(buf, 5, SPAN_NAME);
        varint_field(buf, 6, SPAN_KIND_CLIENT);
        fixed64_field(buf, 7, unix_nanos(span.attempt.start));
        fixed64_field(buf, 8, unix_nanos(span.attempt.end));
        for kv in &span.attributes() {
            key_value(buf, 9, kv, value);
        }
        for e in span.events() {
            event.clear();
            fixed64_field(event, 1, unix_nanos(e.timestamp));
            string_field(event, 2, &e.name);
            for kv in &e.attributes {
                key_value(event, 3, kv, value);
            }
            message_field(buf, 11, event);
        }
        event.clear();
        let status = span.status();
        let (code, message) = match &status {
            Status::Unset => (0, ""),
            Status::Ok => (1, ""),
            Status::Error { description } => (2, description.as_ref()),
        };
        if let Some((trace_id, span_id)) = span.link() {
            event.clear();
            bytes_field(event, 1, &trace_id.to_bytes());
            bytes_field(event, 2, &span_id.to_bytes());
            let flags = u32::from(TraceFlags::SAMPLED.to_u8())
                | SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE
                | SPAN_FLAGS_CONTEXT_IS_REMOTE;
            encode_key(6, WireType::ThirtyTwoBit, event);
            event.extend_from_slice(&flags.to_le_bytes());
            message_field(buf, 13, event);
        }
        event.clear();
        string_field(event, 2, message);
        varint_field(event, 3, code);
        message_field(buf, 15, event);
        let mut flags = u32::from(TraceFlags::SAMPLED.to_u8()) | SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE;
        if has_parent {
            flags |= SPAN_FLAGS_CONTEXT_IS_REMOTE;
        }
        encode_key(16, WireType::ThirtyTwoBit, buf);
        buf.extend_from_slice(&flags.to_le_bytes());
        message_field(&mut self.spans, 2, buf);
        self.count += 1;
    }

    /// The `ExportTraceServiceRequest` for what was pushed, appended to `out`; the request
    /// starts over empty.
    pub(crate) fn finish(&mut self, resource: &Resource, scope: &InstrumentationScope, out: &mut Vec<u8>) {
        let mut resource_attrs = Vec::new();
        for (k, v) in resource.iter() {
            key_value(
                &mut resource_attrs,
                1,
                &KeyValue::new(k.clone(), v.clone()),
                &mut self.value,
            );
        }
        let mut scope_msg = Vec::new();
        string_field(&mut scope_msg, 1, scope.name());
        string_field(&mut scope_msg, 2, scope.version().unwrap_or_default());
        for kv in scope.attributes() {
            key_value(&mut scope_msg, 3, kv, &mut self.value);
        }

        let scope_spans_len = field_len(1, scope_msg.len())
            + self.spans.len()
            + scope.schema_url().map_or(0, |u| string_len(3, u));
        let resource_len = resource_attrs.len();
        let resource_spans_len = field_len(1, resource_len)
            + field_len(2, scope_spans_len)
            + resource.schema_url().map_or(0, |u| string_len(3, u));

        out.reserve(field_len(1, resource_spans_len));
        length_prefix(out, 1, resource_spans_len);
        message_field(out, 1, &resource_attrs);
        length_prefix(out, 2, scope_spans_len);
        message_field(out, 1, &scope_msg);
        out.extend_from_slice(&self.spans);
        if let Some(url) = scope.schema_url() {
            string_field(out, 3, url);
        }
        if let Some(url) = resource.schema_url() {
            string_field(out, 3, url);
        }
        self.spans.clear();
        self.count = 0;
    }
}

/// Bytes a length-delimited field of `len` bytes takes, key and length included.
fn field_len(tag: u32, len: usize) -> usize {
    prost::encoding::key_len(tag) + encoded_len_varint(len as u64) + len
}

fn string_len(tag: u32, s: &str) -> usize {
    if s.is_empty() { 0 } else { field_len(tag, s.len()) }
}

fn length_prefix(buf: &mut Vec<u8>, tag: u32, len: usize) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(len as u64, buf);
}

/// A nested message, always written: an empty `Status` still says "unset".
fn message_field(buf: &mut Vec<u8>, tag: u32, msg: &[u8]) {
    length_prefix(buf, tag, msg.len());
    buf.extend_from_slice(msg);
}

/// proto3 leaves default values out.
fn bytes_field(buf: &mut Vec<u8>, tag: u32, bytes: &[u8]) {
    if !bytes.is_empty() {
        message_field(buf, tag, bytes);
    }
}

fn string_field(buf: &mut Vec<u8>, tag: u32, s: &str) {
    bytes_field(buf, tag, s.as_bytes());
}

fn varint_field(buf: &mut Vec<u8>, tag: u32, v: u64) {
    if v != 0 {
        encode_key(tag, WireType::Varint, buf);
        encode_varint(v, buf);
    }
}

fn fixed64_field(buf: &mut Vec<u8>, tag: u32, v: u64) {
    if v != 0 {
        encode_key(tag, WireType::SixtyFourBit, buf);
        buf.extend_from_slice(&v.to_le_bytes());
    }
}

/// A `KeyValue` message as field `tag` of `buf`; `scratch` holds its `AnyValue`.
fn key_value(buf: &mut Vec<u8>, tag: u32, kv: &KeyValue, scratch: &mut Vec<u8>) {
    scratch.clear();
    any_value(scratch, &kv.value);
    let key = kv.key.as_str();
    length_prefix(buf, tag, string_len(1, key) + field_len(2, scratch.len()));
    string_field(buf, 1, key);
    message_field(buf, 2, scratch);
}

/// The fields of an `AnyValue` (its oneof always written, zero or not).
fn any_value(buf: &mut Vec<u8>, value: &Value) {
    match value {
        Value::String(s) => message_field(buf, 1, s.as_str().as_bytes()),
        Value::Bool(b) => {
            encode_key(2, WireType::Varint, buf);
            encode_varint(u64::from(*b), buf);
        }
        Value::I64(i) => {
            encode_key(3, WireType::Varint, buf);
            encode_varint(*i as u64, buf);
        }
        Value::F64(f) => {
            encode_key(4, WireType::SixtyFourBit, buf);
            buf.extend_from_slice(&f.to_le_bytes());
        }
        Value::Array(array) => {
            // ArrayValue { repeated AnyValue values = 1 }: rare, so a fresh buffer each.
            let mut values = Vec::new();
            let mut one = Vec::new();
            let mut push = |v: Value| {
                one.clear();
                any_value(&mut one, &v);
                message_field(&mut values, 1, &one);
            };
            match array {
                Array::Bool(v) => v.iter().for_each(|x| push(Value::Bool(*x))),
                Array::I64(v) => v.iter().for_each(|x| push(Value::I64(*x))),
                Array::F64(v) => v.iter().for_each(|x| push(Value::F64(*x))),
                Array::String(v) => v.iter().for_each(|x| push(Value::String(x.clone()))),
                _ => {}
            }
            message_field(buf, 5, &values);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::transform::{
        common::tonic::ResourceAttributesWithSchema, trace::tonic::group_spans_by_resource_and_scope,
    };
    use prost::Message;

    use super::*;
    use crate::{
        attempt::{Attempt, EventKind},
        span::SpanBuilder,
    };

    /// A failure with a stack, a bool and a negative number among its attributes, and a
    /// success with an ICMP event: every kind of value the spans carry.
    fn spans() -> Vec<ConnectSpan> {
        let mut builder = SpanBuilder::new("host".into());
        let mut timed_out = crate::span::tests::timed_out();
        timed_out.never_started = true;
        timed_out.cgroup_id = u64::MAX;
        let mut established: Attempt = crate::span::tests::timed_out();
        established.outcome = crate::outcome::Outcome::Established;
        established.errno = 0;
        established.events.push(crate::attempt::AttemptEvent {
            time: established.end,
            kind: EventKind::IcmpError(113),
        });
        let with_stack = crate::enrich::identity::Identity {
            user_stack: Some(Arc::from("f+0x1\ng+0x2")),
            ..Default::default()
        };
        let a = builder.build(timed_out, &with_stack, Default::default());
        let b = builder.build(established, &Default::default(), Default::default());
        let child = builder.build(
            crate::span::tests::in_the_apps_span(),
            &Default::default(),
            Default::default(),
        );
        let mut linking =
            SpanBuilder::new("host".into()).with_trace_context(crate::config::TraceContext::Link);
        let linked = linking.build(
            crate::span::tests::in_the_apps_span(),
            &Default::default(),
            Default::default(),
        );
        vec![a, b, child, linked]
    }

    #[test]
    fn same_request_as_the_sdk() {
        let spans = spans();
        let mut request = TraceRequest::default();
        for span in &spans {
            request.push(span);
        }
        assert_eq!(request.len(), spans.len());
        let resource = spans[0].resource.clone();
        let mut bytes = Vec::new();
        request.finish(&resource, crate::span::scope(), &mut bytes);
        assert_eq!(request.len(), 0);

        let ours = ExportTraceServiceRequest::decode(bytes.as_slice()).unwrap();
        let sdk = ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(
                spans.iter().map(ConnectSpan::span_data).collect(),
                &ResourceAttributesWithSchema::from(&resource),
            ),
        };
        assert_eq!(ours, sdk);
        let attributes = &ours.resource_spans[0].scope_spans[0].spans[0].attributes;
        for key in ["synspan.user_stack", "synspan.never_started", "synspan.cgroup_id"] {
            assert!(attributes.iter().any(|kv| kv.key == key), "{key} missing");
        }
    }

    #[test]
    fn reusable_after_finish() {
        let spans = spans();
        let resource = &spans[0].resource;
        let mut request = TraceRequest::default();
        let mut first = Vec::new();
        request.push(&spans[0]);
        request.finish(resource, crate::span::scope(), &mut first);
        let mut second = Vec::new();
        request.push(&spans[0]);
        request.finish(resource, crate::span::scope(), &mut second);
        assert_eq!(first, second);
    }
}
