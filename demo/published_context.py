"""The demo application's OpenTelemetry context where synspan reads it: the active span of
each calling thread as thread context (OTEP 4947), the resource as process context (OTEP
4719), both through the otel_context extension (otel_context.c, built in the image by
build-otel-context.sh). Without the extension the application runs as before and synspan's
connect spans are root spans beside its own.
"""

import contextlib
import logging

from opentelemetry import trace
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as ResourceProto

log = logging.getLogger("demo-checkout")

try:
    import otel_context
except ImportError:  # not built: nothing is published
    otel_context = None

# The record's attribute keys, by index, named in the process context.
THREAD_ATTRIBUTE_KEYS = ("http.request.method", "peer.service")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, message: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(message)) + message


def _string(key: str, value: str) -> KeyValue:
    return KeyValue(key=key, value=AnyValue(string_value=value))


def encode_process_context(resource: dict) -> bytes:
    """`ProcessContext { Resource resource = 1; repeated KeyValue attributes = 2; }`, with the
    thread-context schema and key map among the attributes."""
    pb_resource = ResourceProto(attributes=[_string(k, str(v)) for k, v in resource.items()])
    attributes = [
        _string("threadlocal.schema_version", "tlsdesc_v1_dev"),
        KeyValue(
            key="threadlocal.attribute_key_map",
            value=AnyValue(array_value=ArrayValue(
                values=[AnyValue(string_value=k) for k in THREAD_ATTRIBUTE_KEYS])),
        ),
    ]
    return _field(1, pb_resource.SerializeToString()) + b"".join(
        _field(2, kv.SerializeToString()) for kv in attributes)


def publish_process_context(resource: dict) -> bool:
    if otel_context is None:
        log.info("otel_context not built: publishing no context")
        return False
    otel_context.publish_process_context(encode_process_context(resource))
    return True


def _attributes(values: dict) -> bytes:
    """`[key index][length][UTF-8 value]` entries, values cut at 255 bytes."""
    out = bytearray()
    for index, key in enumerate(THREAD_ATTRIBUTE_KEYS):
        value = values.get(key)
        if value is None:
            continue
        raw = str(value).encode()[:255]
        out += bytes([index, len(raw)]) + raw
    return bytes(out)


@contextlib.contextmanager
def published(span: trace.Span, attributes: dict):
    """Publishes `span` as this thread's active span for the duration of the block."""
    ctx = span.get_span_context()
    if otel_context is None or not ctx.is_valid:
        yield
        return
    otel_context.set_thread_context(
        ctx.trace_id.to_bytes(16, "big"),
        ctx.span_id.to_bytes(8, "big"),
        int(ctx.trace_flags),
        _attributes(attributes),
    )
    try:
        yield
    finally:
        otel_context.clear_thread_context()
