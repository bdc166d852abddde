//! End to end: an application with its own OpenTelemetry spans publishes the active one as
//! thread context (OTEP 4947) and connects inside it; its connect spans, as a real OTLP
//! receiver got them, are children of its spans, in its traces. The application exports its
//! own spans to the same receiver. Needs root.

use std::{path::Path, time::Duration};

use serde_json::Value;
use synspan_testbed::{
    agent::Agent,
    client::Held,
    musl_bin,
    netns::Netns,
    receiver::Receiver,
    traced::{ThreadReport, TracedApp},
    workspace_bin,
};

const WAIT: Duration = Duration::from_secs(30);

/// A receiver, and synspan exporting to it.
fn exporting() -> (Receiver, Agent) {
    let receiver = Receiver::start().unwrap();
    let agent = Agent::start(&["--otlp-endpoint", &receiver.endpoint()]).unwrap();
    (receiver, agent)
}

/// Each report's connect span is parented in its thread's span and ended as `outcomes` says,
/// in the reports' order.
fn assert_outcomes_parented(
    receiver: &Receiver,
    app: &TracedApp,
    reports: &[ThreadReport],
    outcomes: &[&str],
) {
    for ((connect, own), (report, outcome)) in spans_of(receiver, app, reports)
        .iter()
        .zip(reports.iter().zip(outcomes))
    {
        assert_parented(connect, own, report);
        assert_eq!(connect["attributes"]["synspan.outcome"], *outcome, "{connect:#}");
        // What the receiver got, side by side (shown with --nocapture).
        println!("application's span: {own}\nits connect span: {connect}");
    }
}

/// `bin ARGS --otlp-endpoint RECEIVER --targets TARGETS`, once `agent` found where it
/// publishes (`None`: not waited for).
fn traced(receiver: &Receiver, agent: Option<&Agent>, bin: &Path, args: &[&str], targets: &str) -> TracedApp {
    traced_with_env(receiver, agent, bin, args, targets, &[])
}

/// As `traced`, with `env` added to the application's environment.
fn traced_with_env(
    receiver: &Receiver,
    agent: Option<&Agent>,
    bin: &Path,
    args: &[&str],
    targets: &str,
    env: &[(&str, &str)],
) -> TracedApp {
    let endpoint = receiver.endpoint();
    let mut all = args.to_vec();
    all.extend(["--otlp-endpoint", &endpoint, "--targets", targets]);
    let app = TracedApp::start_with_env(bin, &all, env).unwrap();
    if let Some(agent) = agent {
        app.wait_found_by(agent, WAIT).unwrap();
    }
    app
}

/// For each report, the connect span of its thread and the application's own span.
fn spans_of(receiver: &Receiver, app: &TracedApp, reports: &[ThreadReport]) -> Vec<(Value, Value)> {
    let connects = receiver.wait_spans(reports.len(), WAIT, |s| {
        s["name"] == "tcp connect"
            && s["attributes"]["process.pid"] == app.pid
            && reports.iter().any(|r| s["attributes"]["thread.id"] == r.tid)
    });
    assert_eq!(connects.len(), reports.len(), "{connects:#?}\n{reports:#?}");
    reports
        .iter()
        .map(|r| {
            let connect = connects
                .iter()
                .find(|s| s["attributes"]["thread.id"] == r.tid)
                .unwrap()
                .clone();
            let own = receiver
                .wait_span(&r.span_id, WAIT)
                .unwrap_or_else(|| panic!("the application's span {} never arrived", r.span_id));
            (connect, own)
        })
        .collect()
}

/// The connect span is a child of the application's span, in its trace.
fn assert_parented(connect: &Value, own: &Value, report: &ThreadReport) {
    let ctx = format!("{connect:#}\napplication's span: {own:#}\n{report:?}");
    assert_eq!(connect["trace_id"], report.trace_id, "{ctx}");
    assert_eq!(connect["parent_span_id"], report.span_id, "{ctx}");
    assert_ne!(connect["span_id"], report.span_id, "{ctx}");
    assert_eq!(own["trace_id"], report.trace_id, "{ctx}");
    assert_eq!(own["resource"]["service.name"], "traced-app", "{ctx}");
    assert!(
        own["name"].as_str().unwrap().starts_with("GET /checkout/"),
        "{ctx}"
    );
    // The thread context's attributes, named by the process context's key map.
    let route = own["name"].as_str().unwrap().trim_start_matches("GET ");
    assert_eq!(
        connect["attributes"]["synspan.thread_context.http.route"], route,
        "{ctx}"
    );
    assert_eq!(
        connect["attributes"]["synspan.thread_context.http.request.method"], "GET",
        "{ctx}"
    );
    assert_eq!(connect["resource"]["service.name"], "traced-app", "{ctx}");
}

fn root(span: &Value) -> bool {
    span["parent_span_id"].as_str().is_some_and(str::is_empty)
}

/// Refused, timed out by the kernel and established, from three threads of one application
/// at the same moment, each under a span of its own; the variable in the executable (static
/// TLS, initial-exec/local-exec).
#[test]
fn every_outcome_is_a_child_of_the_threads_active_span() {
    let (receiver, agent) = exporting();
    let ns = Netns::new("tctx").unwrap();
    ns.sysctl("net.ipv4.tcp_syn_retries", "1").unwrap();
    ns.iptables(
        false,
        &[
            "-A", "INPUT", "-i", "lo", "-p", "tcp", "--dport", "9", "--syn", "-j", "DROP",
        ],
    )
    .unwrap();
    let mut app = traced(
        &receiver,
        Some(&agent),
        &workspace_bin("synspan-traced"),
        &["--netns", ns.name()],
        "127.0.0.1:1,127.0.0.1:9,listen",
    );
    let reports = app.connect().unwrap();
    assert_outcomes_parented(
        &receiver,
        &app,
        &reports,
        &["connection_refused", "timed_out", "established"],
    );
    // Each thread its own trace: three spans, three parents.
    let traces: std::collections::HashSet<&str> = reports.iter().map(|r| r.trace_id.as_str()).collect();
    assert_eq!(traces.len(), 3, "{reports:#?}");
    // The agent's own JSON line names the same parent.
    let json = agent.spans_of(app.pid);
    assert!(
        json.iter().any(|s| s["parent_span_id"] == reports[0].span_id),
        "{json:#?}"
    );
}

/// Two threads with different active spans connect at the same moment: each attempt gets its
/// own thread's parent.
#[test]
fn two_threads_get_their_own_parents() {
    let (receiver, agent) = exporting();
    let mut app = traced(
        &receiver,
        Some(&agent),
        &workspace_bin("synspan-traced"),
        &[],
        "127.0.0.1:1,127.0.0.1:1",
    );
    let reports = app.connect().unwrap();
    assert_ne!(reports[0].span_id, reports[1].span_id);
    for ((connect, own), report) in spans_of(&receiver, &app, &reports).iter().zip(&reports) {
        assert_parented(connect, own, report);
    }
}

/// A `connect()` that fails before its socket reaches SYN_SENT (no route in a namespace with
/// only loopback up) is an attempt of its own, seen when the call returns: in the calling
/// thread too, so it is a child of that thread's span as well.
#[test]
fn a_connect_that_never_starts_is_a_child_too() {
    let (receiver, agent) = exporting();
    let ns = Netns::new("tnoroute").unwrap();
    let mut app = traced(
        &receiver,
        Some(&agent),
        &workspace_bin("synspan-traced"),
        &["--netns", ns.name()],
        "198.18.7.7:80",
    );
    let reports = app.connect().unwrap();
    let (connect, own) = &spans_of(&receiver, &app, &reports)[0];
    assert_parented(connect, own, &reports[0]);
    assert_eq!(
        connect["attributes"]["synspan.never_started"], true,
        "{connect:#}"
    );
    assert_eq!(
        connect["attributes"]["synspan.outcome"], "network_unreachable",
        "{connect:#}"
    );
    println!("application's span: {own}\nits connect span: {connect}");
}

/// The variable in a shared library that `bin` loads with `dlopen`, in each of the two
/// dialects a tracer's native module is built with. Returns the agent, to read what it said.
fn from_a_library(bin: &Path, lib: &str) -> Agent {
    from_a_library_with_env(bin, lib, &[])
}

fn from_a_library_with_env(bin: &Path, lib: &str, env: &[(&str, &str)]) -> Agent {
    let (receiver, agent) = exporting();
    let mut app = traced_with_env(
        &receiver,
        Some(&agent),
        bin,
        &["--lib", lib],
        "127.0.0.1:1,listen",
        env,
    );
    let reports = app.connect().unwrap();
    for ((connect, own), report) in spans_of(&receiver, &app, &reports).iter().zip(&reports) {
        assert_parented(connect, own, report);
    }
    agent
}

#[test]
fn a_dlopened_library_with_tlsdesc() {
    from_a_library(&workspace_bin("synspan-traced-dl"), "tlsdesc");
}

/// glibc puts a dlopened library's TLSDESC block in static TLS while the optional part of
/// its surplus lasts. With none (a tunable), the descriptor resolves to glibc's dynamic
/// resolver, and the variable is reached through the DTV: a block the connecting threads
/// allocated when they first touched it.
#[test]
fn a_dlopened_library_with_tlsdesc_in_dynamic_tls() {
    let agent = from_a_library_with_env(
        &workspace_bin("synspan-traced-dl"),
        "tlsdesc",
        &[("GLIBC_TUNABLES", "glibc.rtld.optional_static_tls=0")],
    );
    assert!(
        agent.stderr().contains("dynamic TLS, module"),
        "{}",
        agent.stderr()
    );
}

#[test]
fn a_dlopened_library_with_general_dynamic_tls() {
    from_a_library(&workspace_bin("synspan-traced-dl"), "gd");
}

/// The library that holds the variable is loaded only after the agent first saw the process
/// and found none: the agent looks again once the process's mapped files have changed (at
/// its next attempt, at most once a second), and the attempts after that are parented.
#[test]
fn a_library_loaded_after_the_process_was_first_seen() {
    let (receiver, agent) = exporting();
    let mut app = traced(
        &receiver,
        None,
        &workspace_bin("synspan-traced-dl"),
        &["--lib", "tlsdesc", "--load-later"],
        "127.0.0.1:1,listen",
    );
    // Its first connect's span arrived: the agent has looked at the process by then.
    let first = receiver.wait_spans(1, WAIT, |s| s["attributes"]["process.pid"] == app.pid);
    assert_eq!(first.len(), 1, "{}", agent.stderr());
    let found = format!("process {} publishes its thread context", app.pid);
    assert!(
        !agent.stderr().contains(&found),
        "found before it was loaded:\n{}",
        agent.stderr()
    );
    app.command("load").unwrap();
    let mut poked = std::time::Instant::now() - Duration::from_secs(1);
    let seen = synspan_testbed::wait_until(WAIT, || {
        if poked.elapsed() >= Duration::from_millis(250) {
            app.command("poke").unwrap();
            poked = std::time::Instant::now();
        }
        agent.stderr().contains(&found).then_some(())
    });
    assert!(seen.is_some(), "not found after the load:\n{}", agent.stderr());
    let reports = app.connect().unwrap();
    assert_outcomes_parented(&receiver, &app, &reports, &["connection_refused", "established"]);
}

/// The application built for musl (scripts/build-musl.sh), its spans exported by the same
/// SDK: the variable in its executable, static TLS as musl's loader lays it out. Refused and
/// established, from two threads at once.
#[test]
fn musl_executable_static_tls() {
    let (receiver, agent) = exporting();
    let mut app = traced(
        &receiver,
        Some(&agent),
        &musl_bin("synspan-traced"),
        &[],
        "127.0.0.1:1,listen",
    );
    let reports = app.connect().unwrap();
    assert_outcomes_parented(&receiver, &app, &reports, &["connection_refused", "established"]);
    assert!(agent.stderr().contains("static TLS at tp-"), "{}", agent.stderr());
}

/// musl's `dlopen` of a library with TLS: a TLSDESC descriptor resolved to musl's dynamic
/// resolver, and a general-dynamic module id, both through musl's DTV (8-byte entries, the
/// count in entry 0), which it grew for every thread at once.
fn musl_library(lib: &str) {
    let agent = from_a_library(&musl_bin("synspan-traced-dl"), lib);
    assert!(
        agent.stderr().contains("dynamic TLS through musl's DTV"),
        "{}",
        agent.stderr()
    );
}

#[test]
fn musl_dlopened_library_with_tlsdesc() {
    musl_library("tlsdesc");
}

#[test]
fn musl_dlopened_library_with_general_dynamic_tls() {
    musl_library("gd");
}

/// A connect with no active span (the pointer NULL) in a process that publishes, and one
/// from a process that publishes nothing: root spans in traces of their own.
#[test]
fn no_active_span_and_no_publisher_make_root_spans() {
    let (receiver, agent) = exporting();
    let mut app = traced(
        &receiver,
        Some(&agent),
        &workspace_bin("synspan-traced"),
        &["--no-span"],
        "127.0.0.1:1",
    );
    let reports = app.connect().unwrap();
    let connect = &spans_of(&receiver, &app, &reports)[0].0;
    assert!(root(connect), "{connect:#}");
    assert_ne!(connect["trace_id"], reports[0].trace_id, "{connect:#}");
    assert!(connect["attributes"]["synspan.thread_context.http.route"].is_null());

    // A library's dynamic TLS block that the connecting thread never touched: glibc has not
    // allocated it, and its DTV slot says so.
    let mut untouched = traced(
        &receiver,
        Some(&agent),
        &workspace_bin("synspan-traced-dl"),
        &["--lib", "gd", "--no-span"],
        "127.0.0.1:1",
    );
    let reports = untouched.connect().unwrap();
    let connect = &spans_of(&receiver, &untouched, &reports)[0].0;
    assert!(root(connect), "{connect:#}");

    let ns = Netns::new("tnone").unwrap();
    let plain = Held::connect(&ns, None, &[], "127.0.0.1:1", &[]).unwrap();
    let spans = receiver.wait_spans(1, WAIT, |s| s["attributes"]["process.pid"] == plain.report.pid);
    assert_eq!(spans.len(), 1, "{}", agent.stderr());
    assert!(root(&spans[0]), "{:#}", spans[0]);
}

/// `--trace-context link`: a root span that links to the application's span;
/// `--trace-context off`: a root span, no link.
#[test]
fn link_and_off_make_root_spans() {
    for (mode, linked) in [("link", true), ("off", false)] {
        let receiver = Receiver::start().unwrap();
        let agent =
            Agent::start(&["--trace-context", mode, "--otlp-endpoint", &receiver.endpoint()]).unwrap();
        let mut app = traced(
            &receiver,
            linked.then_some(&agent),
            &workspace_bin("synspan-traced"),
            &[],
            "127.0.0.1:1",
        );
        let reports = app.connect().unwrap();
        let connect = &spans_of(&receiver, &app, &reports)[0].0;
        assert!(root(connect), "{mode}: {connect:#}");
        assert_ne!(connect["trace_id"], reports[0].trace_id, "{mode}: {connect:#}");
        let json = agent.wait_spans_of(app.pid, 2, WAIT);
        let mine = json
            .iter()
            .find(|s| s["attributes"]["thread.id"] == reports[0].tid)
            .unwrap_or_else(|| panic!("{json:#?}"));
        if linked {
            assert_eq!(mine["links"][0]["trace_id"], reports[0].trace_id, "{mine:#}");
            assert_eq!(mine["links"][0]["span_id"], reports[0].span_id, "{mine:#}");
        } else {
            assert!(mine["links"].is_null(), "{mine:#}");
            assert!(!agent.stderr().contains("publishes its thread context"));
        }
    }
}
