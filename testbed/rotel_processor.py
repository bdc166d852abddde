"""Rotel trace processor that records every received span as one JSON line.

Run with: rotel-agent start --otlp-with-trace-processor /abs/path/rotel_processor.py
Output file: $SYNSPAN_RECEIVER_OUT (appended to; nothing is written if unset).

Rotel embeds the system libpython3.11 and does not see any venv, so only the
standard library may be imported here.
"""

import json
import os
import sys
import traceback


def _plain(any_value):
    # AnyValue.value is already a Python str/int/float/bool (None when unset).
    # Rotel hands bytes_value over as a plain list of ints, which we hex-encode
    # like the ids; arrays and kv-lists are rotel's own iterable wrappers.
    v = any_value.value if any_value is not None else None
    if v is None or isinstance(v, (str, bool, int, float)):
        return v
    if isinstance(v, (bytes, list)):
        return bytes(v).hex()
    items = list(v)
    if items and hasattr(items[0], "key"):
        return _attrs(items)
    return [_plain(x) for x in items]


def _attrs(key_values):
    return {kv.key: _plain(kv.value) for kv in key_values}


def _span_record(span, resource, scope):
    st = span.status
    return {
        "trace_id": span.trace_id.hex(),
        "span_id": span.span_id.hex(),
        "parent_span_id": span.parent_span_id.hex(),
        "name": span.name,
        "kind": span.kind,  # OTLP enum int: 1 internal, 2 server, 3 client, 4 producer, 5 consumer
        "start_time_unix_nano": span.start_time_unix_nano,
        "end_time_unix_nano": span.end_time_unix_nano,
        # OTLP enum int: 0 unset, 1 ok, 2 error (rotel gives None when absent)
        "status": {"code": st.code, "message": st.message} if st else {"code": 0, "message": ""},
        "attributes": _attrs(span.attributes),
        "events": [
            {"name": e.name, "time_unix_nano": e.time_unix_nano, "attributes": _attrs(e.attributes)}
            for e in span.events
        ],
        "resource": resource,
        "scope": scope,
    }


def process_spans(resource_spans):
    # Rotel hands over its live objects and forwards whatever they hold once we
    # return (the return value is ignored), so this only reads and never mutates.
    # An exception escaping this function panics rotel's pipeline and the agent
    # exits (with status 0), so every failure is contained and reported here.
    path = os.environ.get("SYNSPAN_RECEIVER_OUT")
    if not path:
        return
    try:
        resource = _attrs(resource_spans.resource.attributes) if resource_spans.resource else {}
        with open(path, "a", encoding="utf-8") as out:
            for scope_spans in resource_spans.scope_spans:
                sc = scope_spans.scope
                scope = {"name": sc.name if sc else "", "version": sc.version if sc else ""}
                for span in scope_spans.spans:
                    out.write(json.dumps(_span_record(span, resource, scope)) + "\n")
                    # Tests poll this file while rotel keeps running.
                    out.flush()
    except Exception:
        print("rotel_processor: " + traceback.format_exc(), file=sys.stderr, flush=True)
