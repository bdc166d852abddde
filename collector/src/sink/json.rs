//! One JSON object per attempt, mirroring the span field for field:
//! `{"trace_id", "span_id", "parent_span_id", "name", "kind", "start_time_unix_nano", "end_time_unix_nano",
//!   "status": {"code", "message"}, "attributes", "events", "resource"}`, and "links" when
//! the span links to the application's (`--trace-context link`). `parent_span_id` is empty
//! for a root span.
//! Attribute values keep their types: ports and counts are numbers.

use std::{
    io::{self, Write},
    time::{SystemTime, UNIX_EPOCH},
};

use opentelemetry::{
    KeyValue, Value,
    trace::{SpanId, Status},
};
use serde_json::{Map, Value as Json, json};

use crate::span::ConnectSpan;

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn value(v: &Value) -> Json {
    match v {
        Value::Bool(b) => Json::Bool(*b),
        Value::I64(i) => Json::from(*i),
        Value::F64(f) => Json::from(*f),
        Value::String(s) => Json::from(s.as_str()),
        other => Json::from(other.to_string()),
    }
}

fn attributes<'a>(kvs: impl IntoIterator<Item = (&'a str, &'a Value)>) -> Json {
    Json::Object(
        kvs.into_iter()
            .map(|(k, v)| (k.to_string(), value(v)))
            .collect::<Map<_, _>>(),
    )
}

fn kv_pairs(kvs: &[KeyValue]) -> impl Iterator<Item = (&str, &Value)> {
    kvs.iter().map(|kv| (kv.key.as_str(), &kv.value))
}

pub(crate) fn to_json(span: &ConnectSpan) -> Json {
    let d = &span.span_data();
    let (code, message) = match &d.status {
        Status::Unset => ("unset", String::new()),
        Status::Ok => ("ok", String::new()),
        Status::Error { description } => ("error", description.to_string()),
    };
    let events: Vec<Json> = d
        .events
        .iter()
        .map(|e| {
            json!({
                "name": e.name,
                "time_unix_nano": unix_nanos(e.timestamp),
                "attributes": attributes(kv_pairs(&e.attributes)),
            })
        })
        .collect();
    let parent = if d.parent_span_id == SpanId::INVALID {
        String::new()
    } else {
        d.parent_span_id.to_string()
    };
    let mut line = json!({
        "trace_id": d.span_context.trace_id().to_string(),
        "span_id": d.span_context.span_id().to_string(),
        "parent_span_id": parent,
        "name": d.name,
        "kind": "client",
        "start_time_unix_nano": unix_nanos(d.start_time),
        "end_time_unix_nano": unix_nanos(d.end_time),
        "status": {"code": code, "message": message},
        "attributes": attributes(kv_pairs(&d.attributes)),
        "events": events,
        "resource": attributes(span.resource.iter().map(|(k, v)| (k.as_str(), v))),
    });
    if !d.links.links.is_empty() {
        let links: Vec<Json> = d
            .links
            .iter()
            .map(|l| {
                json!({
                    "trace_id": l.span_context.trace_id().to_string(),
                    "span_id": l.span_context.span_id().to_string(),
                })
            })
            .collect();
        line["links"] = Json::Array(links);
    }
    line
}

pub(crate) fn write_line(out: &mut Vec<u8>, span: &ConnectSpan) -> io::Result<()> {
    serde_json::to_writer(&mut *out, &to_json(span))?;
    out.write_all(b"\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::span::{SpanBuilder, tests::timed_out};

    #[test]
    fn mirrors_the_span() {
        let span = SpanBuilder::new("h".into()).build(timed_out(), &Default::default(), Default::default());
        let mut out = Vec::new();
        write_line(&mut out, &span).unwrap();
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
        let j: Json = serde_json::from_slice(&out).unwrap();
        assert_eq!(j["name"], "tcp connect");
        assert_eq!(j["kind"], "client");
        assert_eq!(j["trace_id"].as_str().unwrap().len(), 32);
        assert_eq!(j["span_id"].as_str().unwrap().len(), 16);
        assert_eq!(j["start_time_unix_nano"], 1_700_000_000_000_000_000u64);
        assert_eq!(j["end_time_unix_nano"], 1_700_000_007_100_000_000u64);
        assert_eq!(j["status"]["code"], "error");
        assert_eq!(j["attributes"]["network.local.port"], 40000);
        assert_eq!(j["attributes"]["synspan.outcome"], "timed_out");
        assert_eq!(j["attributes"]["error.type"], "timed_out");
        assert_eq!(j["events"][0]["name"], "syn_retransmit");
        assert_eq!(j["events"][0]["attributes"]["synspan.retransmit.number"], 1);
        assert_eq!(j["events"][0]["time_unix_nano"], 1_700_000_001_000_000_000u64);
        assert_eq!(j["resource"]["service.name"], "nc");
    }
}
