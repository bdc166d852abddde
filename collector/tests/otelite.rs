//! End to end, in a second backend independent of the test bed's receivers: synspan exports a
//! refused attempt, a kernel timeout with its retransmits and an established attempt over
//! gzip-compressed OTLP/HTTP to otelite, and otelite's REST API returns them with their
//! attributes, events, status and resource. Needs root and otelite, which takes long to build:
//! `scripts/otelite-test.sh` installs it once and runs this test.

use std::time::Duration;

use serde_json::Value;
use synspan_testbed::{agent::Agent, client::Report, otelite::Otelite, outcomes::three_outcomes};

const WAIT: Duration = Duration::from_secs(20);
const SERVICE: &str = "checkout-otelite";
const CONTAINER_ID: &str = "2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90a1b";

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_owned()
}

/// The span of `client`'s attempt as otelite's `/api/traces/{id}` returns it, checked against
/// the span synspan printed: ids, name, kind, attributes (otelite gives every value as a
/// string), status and resource.
fn stored_span(otelite: &Otelite, agent: &Agent, client: &Report, outcome: &str) -> Value {
    let spans = agent.wait_spans_of(client.pid, 1, WAIT);
    assert_eq!(spans.len(), 1, "spans of {client:?}\n{}", agent.stderr());
    let exported = &spans[0];
    let id = exported["trace_id"].as_str().unwrap();
    let trace = otelite
        .wait_trace(id, WAIT)
        .unwrap_or_else(|| panic!("trace {id} not in otelite\n{}\n{}", agent.stderr(), otelite.log()));
    let ctx = format!("{trace:#}\nexported: {exported:#}");
    let stored = trace["spans"].as_array().unwrap();
    assert_eq!(stored.len(), 1, "{ctx}");
    let span = stored[0].clone();
    assert_eq!(span["span_id"], exported["span_id"], "{ctx}");
    assert_eq!(span["name"], "tcp connect", "{ctx}");
    assert_eq!(span["kind"], "Client", "{ctx}");
    assert_eq!(span["start_time"], exported["start_time_unix_nano"], "{ctx}");
    assert_eq!(span["end_time"], exported["end_time_unix_nano"], "{ctx}");
    for (key, value) in exported["attributes"].as_object().unwrap() {
        let text = value.as_str().map_or_else(|| value.to_string(), str::to_owned);
        assert_eq!(span["attributes"][key], text.as_str(), "{key}\n{ctx}");
    }
    let attributes = &span["attributes"];
    assert_eq!(attributes["synspan.outcome"], outcome, "{ctx}");
    assert_eq!(attributes["process.pid"], client.pid.to_string(), "{ctx}");
    assert_eq!(
        attributes["network.local.port"],
        client.local_port.to_string(),
        "{ctx}"
    );
    assert_eq!(attributes["otel.scope.name"], "synspan", "{ctx}");
    if outcome == "established" {
        assert_eq!(span["status"]["code"], "Unset", "{ctx}");
    } else {
        assert_eq!(span["status"]["code"], "Error", "{ctx}");
        assert_eq!(span["status"]["message"], exported["status"]["message"], "{ctx}");
        assert_eq!(attributes["error.type"], outcome, "{ctx}");
    }
    let resource = &span["resource"]["attributes"];
    assert_eq!(resource["service.name"], SERVICE, "{ctx}");
    assert_eq!(resource["host.name"], hostname().as_str(), "{ctx}");
    span
}

/// The names of the span's events, and the retransmit numbers of its `syn_retransmit` ones.
fn events(span: &Value) -> (Vec<String>, Vec<String>) {
    let events = span["events"].as_array().unwrap();
    let names = events
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_owned())
        .collect();
    let retransmits = events
        .iter()
        .filter(|e| e["name"] == "syn_retransmit")
        .map(|e| {
            e["attributes"]["synspan.retransmit.number"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    (names, retransmits)
}

#[test]
#[ignore = "needs otelite, which takes long to build: run scripts/otelite-test.sh"]
fn attempts_in_otelite() {
    let otelite = Otelite::start().unwrap();
    let agent = Agent::start_exporting_http(&otelite.otlp_http_endpoint()).unwrap();
    let (_ns, _container, [timed_out, refused, established]) =
        three_outcomes("otel", SERVICE, CONTAINER_ID).unwrap();

    let span = stored_span(&otelite, &agent, &refused.report, "connection_refused");
    assert!(events(&span).0.contains(&"rst_received".to_owned()), "{span:#}");
    let span = stored_span(&otelite, &agent, &established.report, "established");
    assert_eq!(
        span["resource"]["attributes"]["container.id"], CONTAINER_ID,
        "{span:#}"
    );
    let span = stored_span(&otelite, &agent, &timed_out.report, "timed_out");
    assert_eq!(events(&span).1, ["1", "2", "3", "4", "5"], "{span:#}");
    println!(
        "otelite's answer for the timed-out attempt: {}",
        serde_json::to_string(&span).unwrap()
    );

    // The service's list shows the three (it lags the trace lookups by a few seconds).
    let listed = synspan_testbed::wait_until(WAIT, || {
        let body = otelite
            .api(&format!("/api/traces?service={SERVICE}&limit=10"))
            .ok()??;
        (body["traces"].as_array()?.len() >= 3).then_some(body)
    });
    assert!(
        listed.is_some(),
        "{:?}",
        otelite.api(&format!("/api/traces?service={SERVICE}&limit=10"))
    );
    let stopped = agent.stop(Duration::from_secs(10)).unwrap();
    assert!(stopped.status.success(), "{}", stopped.stderr);
    assert!(
        !stopped.stderr.contains("OTLP export failed"),
        "{}",
        stopped.stderr
    );
}
