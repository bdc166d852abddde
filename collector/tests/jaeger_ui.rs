//! End to end, where users look: synspan exports real attempts (refused, timed out by the
//! kernel with its SYN retransmits, established) over gzip-compressed OTLP gRPC to the real
//! Jaeger UI's backend (`synspan-jaeger`); the Jaeger query API returns them as Jaeger's UI
//! reads them, and Chromium renders the timed-out attempt's trace page. The receiver's
//! OTLP/HTTP port gets them from a real collector's OTLP/HTTP exporter. Needs root, node and
//! chromium (scripts/setup-test.sh).

use std::{path::PathBuf, time::Duration};

use serde_json::Value;
use synspan_testbed::{
    agent::{Agent, Output},
    client::{Held, Report},
    jaeger::{Jaeger, rendered_trace_page},
    netns::Netns,
    outcomes::three_outcomes,
    receiver::Receiver,
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
/// every synspan span shows in Jaeger: name, kind, scope, outcome and the process it came
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
    assert_eq!(span["spanID"], exported["span_id"], "{ctx}");
    assert_eq!(span["operationName"], "tcp connect", "{ctx}");
    let tags = &span["tags"];
    assert_eq!(tag(tags, "span.kind"), "client", "{ctx}");
    assert_eq!(tag(tags, "otel.scope.name"), "synspan", "{ctx}");
    assert_eq!(tag(tags, "synspan.outcome"), outcome, "{ctx}");
    assert_eq!(tag(tags, "process.pid"), client.pid, "{ctx}");
    assert_eq!(tag(tags, "network.local.port"), client.local_port, "{ctx}");
    let process = &trace["processes"][span["processID"].as_str().unwrap()];
    assert_eq!(process["serviceName"], service, "{ctx}");
    assert_eq!(tag(&process["tags"], "service.name"), service, "{ctx}");
    assert_eq!(tag(&process["tags"], "host.name"), hostname().as_str(), "{ctx}");
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
    (span, trace)
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
    let (span, _) = trace_of(&jaeger, &agent, established, SERVICE, "established");
    assert_eq!(tag(&span["tags"], "container.id"), CONTAINER_ID, "{span:#}");
    let (span, trace) = trace_of(&jaeger, &agent, timed_out, SERVICE, "timed_out");
    assert_eq!(retransmit_logs(&span), [1, 2, 3, 4, 5], "{span:#}");
    // The list the search page shows holds the same trace as the trace page.
    assert!(
        listed.iter().any(|t| t["traceID"] == trace["traceID"]),
        "{listed:#?}"
    );

    let id = trace["traceID"].as_str().unwrap();
    let screenshot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("jaeger-timed-out.png");
    let text = rendered_trace_page(&format!("{}/trace/{id}", jaeger.ui_url()), &screenshot).unwrap();
    println!("screenshot of the trace page: {}", screenshot.display());
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
    let png = std::fs::read(&screenshot).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "{}", screenshot.display());
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
    let (span, _) = trace_of(&jaeger, &agent, &established.report, OVER_HTTP, "established");
    assert_eq!(tag(&span["tags"], "container.id"), OTHER_CONTAINER_ID, "{span:#}");
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
