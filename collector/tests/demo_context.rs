//! End to end: the compose demo's application (`demo/app.py`, with the OpenTelemetry Python
//! SDK and its `otel_context` extension) against synspan, without Docker. Its refused calls'
//! connect spans, as a real OTLP receiver got them, are children of its own `GET` spans, with
//! the resource it published as process context. Needs root, and the demo's Python
//! environment: run through `scripts/demo-context-test.sh`, which builds it (PyPI) and sets
//! `SYNSPAN_DEMO_PYTHON` and `SYNSPAN_DEMO_EXT`.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use synspan_testbed::{agent::Agent, free_port, receiver::Receiver, repo_root, terminate};

const WAIT: Duration = Duration::from_secs(60);

/// Kills the demo application by its pid whatever the test's outcome.
struct App(std::process::Child);

impl Drop for App {
    fn drop(&mut self) {
        terminate(&mut self.0);
    }
}

#[test]
#[ignore = "needs the demo's Python environment: scripts/demo-context-test.sh"]
fn the_demo_app_publishes_its_context() {
    let python =
        std::env::var("SYNSPAN_DEMO_PYTHON").expect("SYNSPAN_DEMO_PYTHON: run scripts/demo-context-test.sh");
    let ext = std::env::var("SYNSPAN_DEMO_EXT").expect("SYNSPAN_DEMO_EXT: run scripts/demo-context-test.sh");
    let receiver = Receiver::start().unwrap();
    let agent = Agent::start(&["--otlp-endpoint", &receiver.endpoint()]).unwrap();
    let demo = repo_root().join("demo");
    // Every dependency refuses: nothing listens on these loopback ports.
    let url = |path: &str| format!("http://127.0.0.1:{}/{path}", free_port().unwrap());
    let app = App(Command::new(python)
        .arg(demo.join("app.py"))
        .env("PYTHONPATH", format!("{ext}:{}", demo.display()))
        .env("OTEL_SERVICE_NAME", "demo-checkout")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.http_endpoint())
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        .env("OTEL_BSP_SCHEDULE_DELAY", "200")
        .env("DEMO_HEALTHY_URL", url("items"))
        .env("DEMO_DROPPING_URL", url("charge"))
        .env("DEMO_REFUSING_URL", url("suggest"))
        .env("DEMO_REFUSING_EVERY", "0.5")
        .stdin(Stdio::null())
        .spawn()
        .expect("starting demo/app.py"));
    let pid = app.0.id();
    // Its first attempt is how synspan learns of the process: the first spans may be roots.
    let connects = receiver.wait_spans(1, WAIT, |s| {
        s["name"] == "tcp connect"
            && s["attributes"]["process.pid"] == pid
            && s["attributes"]["synspan.thread_context.peer.service"] == "recommendations"
    });
    let connect = connects
        .first()
        .unwrap_or_else(|| panic!("no parented connect span of the demo app\n{}", agent.stderr()));
    let parent = connect["parent_span_id"].as_str().unwrap();
    let own = receiver
        .wait_span(parent, WAIT)
        .unwrap_or_else(|| panic!("the application's span {parent} never arrived: {connect:#}"));
    let ctx = format!("{connect:#}\napplication's span: {own:#}");
    assert_eq!(own["name"], "GET recommendations", "{ctx}");
    assert_eq!(own["trace_id"], connect["trace_id"], "{ctx}");
    assert_eq!(
        connect["attributes"]["synspan.outcome"], "connection_refused",
        "{ctx}"
    );
    assert_eq!(
        connect["attributes"]["synspan.thread_context.http.request.method"], "GET",
        "{ctx}"
    );
    // The instance id exists only in the application: synspan got it from the process context.
    let instance = own["resource"]["service.instance.id"]
        .as_str()
        .unwrap_or_default();
    assert!(!instance.is_empty(), "{ctx}");
    assert_eq!(connect["resource"]["service.instance.id"], instance, "{ctx}");
    assert_eq!(connect["resource"]["service.name"], "demo-checkout", "{ctx}");
    println!("application's span: {own}\nits connect span: {connect}");
}
