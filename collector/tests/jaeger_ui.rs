//! End to end, where users look: synspan exports real attempts (refused, timed out by the
//! kernel with its SYN retransmits, established) over gzip-compressed OTLP gRPC to the real
//! Jaeger UI's backend (`synspan-jaeger`); the Jaeger query API returns them as Jaeger's UI
//! reads them, and Chromium renders the timed-out attempt's trace page. The receiver's
//! OTLP/HTTP port gets them from a real collector's OTLP/HTTP exporter. An application that
//! exports its own span to the same receiver and connects inside it (thread context) gets one
//! trace of two spans: the connect span CHILD_OF the application's in the API, and its
//! `tcp connect` row indented under the application's row, which can collapse it, on the
//! rendered page. Needs root, node and chromium (scripts/setup-test.sh).

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::Value;
use synspan_testbed::{
    agent::{Agent, Output},
    client::{Held, Report},
    jaeger::{Jaeger, SpanRow, rendered_trace_page},
    netns::Netns,
    outcomes::three_outcomes,
    receiver::Receiver,
    traced::TracedApp,
    workspace_bin,
};

const WAIT: Duration = Duration::from_secs(20);
const SERVICE: &str = "checkout-jaeger-ui";
const CONTAINER_ID: &str = "0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9";
/// Tests run at once: each makes its own container cgroup.
const OTHER_CONTAINER_ID: &str = "1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90a";

/// A Jaeger tag (or log field) by key: its value, `Null` when absent.
fn tag<'a>(tags: &'a Value, key: &str) -> &'a Value {
    tags.as_array()
        .and_then(|tags| tags.iter().find(|t| t["key"] == key))
        .map_or(&Value::Null, |t| &t["value"])
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_owned()
}

/// The one trace of `client`'s attempt, as `/api/traces/{id}` returns it, checked for what
/// every synspan span shows in Jaeger (see `assert_connect_span`) and for the host it came
/// from. Returns the span and the trace.
fn trace_of(jaeger: &Jaeger, agent: &Agent, client: &Report, service: &str, outcome: &str) -> (Value, Value) {
    let spans = agent.wait_spans_of(client.pid, 1, WAIT);
    assert_eq!(spans.len(), 1, "spans of {client:?}\n{}", agent.stderr());
    let exported = &spans[0];
    let id = exported["trace_id"].as_str().unwrap();
    let trace = jaeger
        .api(&format!("/api/traces/{id}"))
        .unwrap()
        .unwrap_or_else(|| panic!("trace {id} not in Jaeger\n{}", agent.stderr()));
    let trace = trace["data"][0].clone();
    let ctx = format!("{trace:#}");
    assert_eq!(trace["traceID"], id, "{ctx}");
    let spans = trace["spans"].as_array().unwrap();
    assert_eq!(spans.len(), 1, "{ctx}");
    let span = spans[0].clone();
    assert_connect_span(&span, &trace, exported, service, outcome);
    assert_eq!(
        tag(&span["tags"], "network.local.port"),
        client.local_port,
        "{ctx}"
    );
    let process = &trace["processes"][span["processID"].as_str().unwrap()];
    assert_eq!(tag(&process["tags"], "host.name"), hostname().as_str(), "{ctx}");
    (span, trace)
}

/// `span` of `trace` is the connect span synspan `exported` (as its JSON output printed it),
/// as Jaeger shows every one: name, kind, scope, outcome, status and the service of the
/// process it came from.
fn assert_connect_span(span: &Value, trace: &Value, exported: &Value, service: &str, outcome: &str) {
    let ctx = format!("{trace:#}");
    assert_eq!(span["spanID"], exported["span_id"], "{ctx}");
    assert_eq!(span["operationName"], "tcp connect", "{ctx}");
    let tags = &span["tags"];
    assert_eq!(tag(tags, "span.kind"), "client", "{ctx}");
    assert_eq!(tag(tags, "otel.scope.name"), "synspan", "{ctx}");
    assert_eq!(tag(tags, "synspan.outcome"), outcome, "{ctx}");
    assert_eq!(
        tag(tags, "process.pid"),
        &exported["attributes"]["process.pid"],
        "{ctx}"
    );
    let process = &trace["processes"][span["processID"].as_str().unwrap()];
    assert_eq!(process["serviceName"], service, "{ctx}");
    assert_eq!(tag(&process["tags"], "service.name"), service, "{ctx}");
    if outcome == "established" {
        for derived in ["error", "otel.status_code", "otel.status_description"] {
            assert!(tag(tags, derived).is_null(), "{derived} on a success: {ctx}");
        }
    } else {
        assert_eq!(tag(tags, "error"), true, "{ctx}");
        assert_eq!(tag(tags, "otel.status_code"), "ERROR", "{ctx}");
        assert_eq!(
            tag(tags, "otel.status_description"),
            &exported["status"]["message"],
            "{ctx}"
        );
        assert!(
            tag(tags, "otel.status_description")
                .as_str()
                .is_some_and(|m| m.starts_with("connect failed: ")),
            "{ctx}"
        );
    }
}

/// A tag of the process (the resource) `span` of `trace` came from.
fn process_tag<'a>(trace: &'a Value, span: &Value, key: &str) -> &'a Value {
    tag(
        &trace["processes"][span["processID"].as_str().unwrap()]["tags"],
        key,
    )
}

/// The timed-out attempt's five retransmits, as Jaeger logs.
fn retransmit_logs(span: &Value) -> Vec<Value> {
    span["logs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| tag(&l["fields"], "event") == "syn_retransmit")
        .map(|l| tag(&l["fields"], "synspan.retransmit.number").clone())
        .collect()
}

#[test]
fn attempts_in_the_jaeger_api_and_ui() {
    let jaeger = Jaeger::start().unwrap();
    let endpoint = jaeger.otlp_grpc_endpoint();
    let agent = Agent::start_with_env(
        Output::Json,
        &["--otlp-endpoint", &endpoint, "--metrics-interval", "0"],
        &[("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")],
    )
    .unwrap();
    let (_ns, _container, [timed_out, refused, established]) =
        three_outcomes("jui", SERVICE, CONTAINER_ID).unwrap();
    let (timed_out, refused, established) = (&timed_out.report, &refused.report, &established.report);

    let listed = jaeger.wait_traces(SERVICE, 3, WAIT).unwrap();
    assert_eq!(listed.len(), 3, "{listed:#?}\n{}", agent.stderr());
    let services = jaeger.api("/api/services").unwrap().unwrap();
    assert!(
        services["data"].as_array().unwrap().iter().any(|s| s == SERVICE),
        "{services}"
    );

    let (span, _) = trace_of(&jaeger, &agent, refused, SERVICE, "connection_refused");
    let logs = span["logs"].as_array().unwrap();
    assert!(
        logs.iter().any(|l| tag(&l["fields"], "event") == "rst_received"),
        "{span:#}"
    );
    let (span, trace) = trace_of(&jaeger, &agent, established, SERVICE, "established");
    assert_eq!(
        process_tag(&trace, &span, "container.id"),
        CONTAINER_ID,
        "{trace:#}"
    );
    let (span, trace) = trace_of(&jaeger, &agent, timed_out, SERVICE, "timed_out");
    println!("the Jaeger API's trace of the timed-out attempt:\n{trace:#}");
    assert_eq!(retransmit_logs(&span), [1, 2, 3, 4, 5], "{span:#}");
    // The list the search page shows holds the same trace as the trace page.
    assert!(
        listed.iter().any(|t| t["traceID"] == trace["traceID"]),
        "{listed:#?}"
    );

    let id = trace["traceID"].as_str().unwrap();
    let screenshot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("jaeger-timed-out.png");
    let rendered = rendered_trace_page(&format!("{}/trace/{id}", jaeger.ui_url()), &screenshot).unwrap();
    println!("screenshot of the trace page: {}", screenshot.display());
    let text = &rendered.text;
    assert_eq!(rendered.rows.len(), 1, "{:#?}", rendered.rows);
    assert_row(&rendered.rows[0], SERVICE, "tcp connect", &["root"], false);
    for shown in [
        format!("{SERVICE}: tcp connect"),
        "synspan.outcome\t\ntimed_out".to_owned(),
        "connect failed: Connection timed out".to_owned(),
        // Five retransmits, and the six SYNs the namespace's INPUT rule dropped.
        "Logs (11)".to_owned(),
        "event=syn_retransmit".to_owned(),
        "event=packet_dropped".to_owned(),
        "synspan.packet_drop.reason=NETFILTER_DROP".to_owned(),
        format!("service.name={SERVICE}"),
    ] {
        assert!(text.contains(&shown), "the page does not show {shown:?}:\n{text}");
    }
    assert_png(&screenshot);
}

fn assert_png(screenshot: &Path) {
    let png = std::fs::read(screenshot).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "{}", screenshot.display());
}

/// A row of the trace view: its span's service and name, the spans it is indented under, and
/// whether it has children to collapse.
fn assert_row(row: &SpanRow, service: &str, operation: &str, ancestors: &[&str], parent: bool) {
    assert_eq!(
        (row.service.as_str(), row.operation.as_str(), row.parent),
        (service, operation, parent),
        "{row:#?}"
    );
    assert_eq!(row.ancestors, ancestors, "{row:#?}");
}

/// An application's own span (its OpenTelemetry SDK exports it) and, nested under it,
/// synspan's span of the connect the application made inside it: one trace in the Jaeger
/// API, the connect span CHILD_OF the application's, and the trace view indenting the
/// `tcp connect` row under the application's row. Both exporters send to the same receiver's
/// OTLP gRPC port.
#[test]
fn an_applications_span_with_its_connect_span_nested_in_the_jaeger_ui() {
    const TRACED: &str = "checkout-traced-jaeger-ui";
    let jaeger = Jaeger::start().unwrap();
    let endpoint = jaeger.otlp_grpc_endpoint();
    let agent = Agent::start(&["--otlp-endpoint", &endpoint, "--metrics-interval", "0"]).unwrap();
    // Refused on loopback: the port nothing listens on.
    let mut app = TracedApp::start(
        &workspace_bin("synspan-traced"),
        &[
            "--service",
            TRACED,
            "--otlp-endpoint",
            &endpoint,
            "--targets",
            "127.0.0.1:1",
        ],
    )
    .unwrap();
    app.wait_found_by(&agent, WAIT).unwrap();
    let reports = app.connect().unwrap();
    let [report] = reports.as_slice() else {
        panic!("{reports:#?}")
    };
    // Its connect outside any span before it was ready, then the one inside its span.
    let exported = agent.wait_spans_of(app.pid, 2, WAIT);
    let exported = exported
        .iter()
        .find(|s| s["attributes"]["thread.id"] == report.tid)
        .unwrap_or_else(|| panic!("no span of {report:?}: {exported:#?}\n{}", agent.stderr()));

    let trace = jaeger.wait_trace(&report.trace_id, 2, WAIT).unwrap();
    let ctx = format!("{trace:#}\n{report:?}");
    assert_eq!(trace["traceID"], report.trace_id, "{ctx}");
    let spans = trace["spans"].as_array().unwrap();
    assert_eq!(spans.len(), 2, "{ctx}");
    let by_id = |id: &Value| {
        spans
            .iter()
            .find(|s| s["spanID"] == *id)
            .unwrap_or_else(|| panic!("{ctx}"))
    };
    let own = by_id(&Value::from(report.span_id.as_str()));
    let connect = by_id(&exported["span_id"]);
    assert_eq!(own["operationName"], "GET /checkout/0", "{ctx}");
    assert_eq!(tag(&own["tags"], "otel.scope.name"), "synspan-traced", "{ctx}");
    assert!(own["references"].as_array().is_none_or(Vec::is_empty), "{ctx}");
    let process = &trace["processes"][own["processID"].as_str().unwrap()];
    assert_eq!(process["serviceName"], TRACED, "{ctx}");
    assert_connect_span(connect, &trace, exported, TRACED, "connection_refused");
    assert_eq!(tag(&connect["tags"], "thread.id"), report.tid, "{ctx}");
    assert_eq!(
        tag(&connect["tags"], "synspan.thread_context.http.route"),
        "/checkout/0",
        "{ctx}"
    );
    assert_eq!(
        connect["references"],
        serde_json::json!([
            {"refType": "CHILD_OF", "traceID": report.trace_id, "spanID": report.span_id}
        ]),
        "{ctx}"
    );
    let listed = jaeger.wait_traces(TRACED, 1, WAIT).unwrap();
    assert!(
        listed.iter().any(|t| t["traceID"] == report.trace_id),
        "{listed:#?}"
    );

    let screenshot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("jaeger-nested.png");
    let url = format!("{}/trace/{}", jaeger.ui_url(), report.trace_id);
    let rendered = rendered_trace_page(&url, &screenshot).unwrap();
    println!("screenshot of the trace page: {}", screenshot.display());
    let rows = &rendered.rows;
    assert_eq!(rows.len(), 2, "{rows:#?}");
    assert_row(&rows[0], TRACED, "GET /checkout/0", &["root"], true);
    assert_row(&rows[1], TRACED, "tcp connect", &["root", &report.span_id], false);
    for shown in [
        format!("{TRACED}: GET /checkout/0"),
        "synspan.outcome\t\nconnection_refused".to_owned(),
        "connect failed: Connection refused".to_owned(),
        "event=rst_received".to_owned(),
    ] {
        assert!(
            rendered.text.contains(&shown),
            "the page does not show {shown:?}:\n{}",
            rendered.text
        );
    }
    assert_png(&screenshot);
}

/// synspan's gRPC export forwarded by rotel's OTLP/HTTP exporter (protobuf, gzip) to the
/// receiver's HTTP port: the same tags reach the Jaeger API.
#[test]
fn otlp_http_into_the_jaeger_ui() {
    const VIA_HTTP: &str = "checkout-via-http";
    let jaeger = Jaeger::start().unwrap();
    let rotel = Receiver::start_forwarding_http(&jaeger.otlp_http_endpoint()).unwrap();
    let agent = Agent::start(&["--otlp-endpoint", &rotel.endpoint(), "--metrics-interval", "0"]).unwrap();
    let ns = Netns::new("juih").unwrap();
    let refused = Held::connect(&ns, None, &[("OTEL_SERVICE_NAME", VIA_HTTP)], "127.0.0.1:10", &[]).unwrap();
    let listed = jaeger.wait_traces(VIA_HTTP, 1, WAIT).unwrap();
    assert_eq!(listed.len(), 1, "{listed:#?}\nrotel:\n{}", rotel.log());
    trace_of(&jaeger, &agent, &refused.report, VIA_HTTP, "connection_refused");
}

/// synspan's own OTLP/HTTP export (protobuf, gzip) straight to the receiver's HTTP port: the
/// same three attempts reach the Jaeger API with the same tags as over gRPC.
#[test]
fn synspan_over_otlp_http_into_the_jaeger_ui() {
    const OVER_HTTP: &str = "checkout-over-http";
    let jaeger = Jaeger::start().unwrap();
    let agent = Agent::start_exporting_http(&jaeger.otlp_http_endpoint()).unwrap();
    let (_ns, _container, [timed_out, refused, established]) =
        three_outcomes("juid", OVER_HTTP, OTHER_CONTAINER_ID).unwrap();
    let listed = jaeger.wait_traces(OVER_HTTP, 3, WAIT).unwrap();
    assert_eq!(listed.len(), 3, "{listed:#?}\n{}", agent.stderr());
    let (span, _) = trace_of(&jaeger, &agent, &refused.report, OVER_HTTP, "connection_refused");
    assert!(
        span["logs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| tag(&l["fields"], "event") == "rst_received"),
        "{span:#}"
    );
    let (span, trace) = trace_of(&jaeger, &agent, &established.report, OVER_HTTP, "established");
    assert_eq!(
        process_tag(&trace, &span, "container.id"),
        OTHER_CONTAINER_ID,
        "{trace:#}"
    );
    let (span, _) = trace_of(&jaeger, &agent, &timed_out.report, OVER_HTTP, "timed_out");
    assert_eq!(retransmit_logs(&span), [1, 2, 3, 4, 5], "{span:#}");
    let stopped = agent.stop(Duration::from_secs(10)).unwrap();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    assert!(
        !stopped.stderr.contains("OTLP export failed"),
        "{}",
        stopped.stderr
    );
}
