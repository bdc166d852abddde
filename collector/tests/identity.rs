//! End to end: who made an attempt and from where. Stacks, process, container and service
//! identity, also for a process that is killed while its connect is pending. Needs root.

use std::{
    process::{Child, Stdio},
    time::Duration,
};

use serde_json::Value;
use synspan_testbed::{
    agent::Agent, cgroup::Cgroup, netns::Netns, receiver::Receiver, wait_until, workspace_bin,
};

const WAIT: Duration = Duration::from_secs(20);

/// The distinctive function the test client connects from.
const CONNECT_FN: &str = "synspan_testbed_connect_attempt";

/// A client that keeps running after its attempt (its pid is the child's: `ip netns exec`
/// execs in place).
struct Client(Child);

impl Client {
    fn spawn(ns: &Netns, args: &[&str], env: &[(&str, &str)]) -> Self {
        let child = ns
            .command(&workspace_bin("synspan-connect"))
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        Self(child)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn one_span(agent: &Agent, pid: u32) -> Value {
    let spans = agent.wait_spans_of(pid, 1, WAIT);
    assert_eq!(spans.len(), 1, "pid {pid}\n{}", agent.stderr());
    spans.into_iter().next().unwrap()
}

fn text<'a>(span: &'a Value, key: &str) -> &'a str {
    span["attributes"][key]
        .as_str()
        .unwrap_or_else(|| panic!("no {key} on {span:#}"))
}

#[test]
fn stacks_and_process_identity() {
    let agent = Agent::start(&[]).unwrap();
    let ns = Netns::new("stk").unwrap();
    let client = Client::spawn(&ns, &["127.0.0.1:0", "--listen-first", "--hold"], &[]);
    let span = one_span(&agent, client.pid());
    let user = text(&span, "synspan.user_stack");
    assert!(user.contains(CONNECT_FN), "user stack:\n{user}");
    assert!(user.lines().count() >= 3, "one frame per line:\n{user}");
    // connect(2) always reaches SYN_SENT by the same kernel path: not walked.
    assert!(span["attributes"]["synspan.kernel_stack"].is_null(), "{span:#}");
    // A success ends on the one path there is: no end stack is taken for it.
    assert!(
        span["attributes"]["synspan.end_kernel_stack"].is_null(),
        "{span:#}"
    );
    assert!(text(&span, "process.executable.path").ends_with("/synspan-connect"));
    assert_eq!(text(&span, "process.executable.name"), "synspan-connect");
    assert_eq!(text(&span, "process.command"), "synspan-connect");
    assert!(span["attributes"]["process.parent_pid"].as_u64().unwrap() > 0);
    assert!(span["attributes"]["synspan.netns.inode"].as_u64().unwrap() > 0);
    assert!(
        span["attributes"]["process.command_line"].is_null(),
        "command lines are opt-in"
    );
}

#[test]
fn command_line_is_opt_in() {
    let agent = Agent::start(&["--capture-command-line"]).unwrap();
    let ns = Netns::new("cmd").unwrap();
    let client = Client::spawn(&ns, &["127.0.0.1:0", "--listen-first", "--hold"], &[]);
    let span = one_span(&agent, client.pid());
    let line = text(&span, "process.command_line");
    assert!(line.contains("--listen-first --hold"), "{line}");
}

#[test]
fn container_id_from_a_docker_cgroup() {
    let id = "3f4e5d6c7b8a99887766554433221100ffeeddccbbaa00112233445566778899";
    let cgroup = Cgroup::named(&format!("docker-{id}.scope")).unwrap();
    let agent = Agent::start(&[]).unwrap();
    let ns = Netns::new("ctr").unwrap();
    let mut cmd = ns.command(&workspace_bin("synspan-connect"));
    cmd.args(["127.0.0.1:0", "--listen-first", "--hold"]);
    let child = cgroup.wrap(&cmd).stdout(Stdio::null()).spawn().unwrap();
    // `sh` execs `ip`, which execs the client: one pid throughout.
    let client = Client(child);
    let span = one_span(&agent, client.pid());
    // Where the process runs belongs to its resource, not to each span.
    assert_eq!(span["resource"]["container.id"], id, "{span:#}");
    assert!(span["attributes"]["container.id"].is_null(), "{span:#}");
    drop(client);
}

#[test]
fn each_process_keeps_its_own_service_in_one_export() {
    let receiver = Receiver::start().unwrap();
    let agent = Agent::start(&["--otlp-endpoint", &receiver.endpoint()]).unwrap();
    let ns = Netns::new("svc").unwrap();
    let args = ["127.0.0.1:0", "--listen-first", "--hold"];
    let checkout = Client::spawn(
        &ns,
        &args,
        &[
            ("OTEL_SERVICE_NAME", "checkout"),
            ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=test"),
        ],
    );
    let plain = Client::spawn(&ns, &args, &[]);
    let pids = [checkout.pid(), plain.pid()];
    let got = receiver.wait_spans(2, WAIT, |s| {
        pids.iter().any(|p| s["attributes"]["process.pid"] == *p)
    });
    assert_eq!(got.len(), 2, "{}", agent.stderr());
    for span in &got {
        let resource = &span["resource"];
        if span["attributes"]["process.pid"] == checkout.pid() {
            println!("span as the OTLP receiver saw it:\n{span:#}");
            assert_eq!(resource["service.name"], "checkout", "{span:#}");
            assert_eq!(resource["deployment.environment.name"], "test", "{span:#}");
        } else {
            assert_eq!(resource["service.name"], "synspan-connect", "{span:#}");
            assert!(resource["deployment.environment.name"].is_null(), "{span:#}");
        }
        assert!(resource["host.name"].is_string(), "{span:#}");
        assert_eq!(span["scope"]["name"], "synspan");
    }
}

/// Killed while its SYN goes unanswered: the span still names it, its service and its code.
#[test]
fn killed_in_syn_sent_keeps_its_identity() {
    let agent = Agent::start(&[]).unwrap();
    let ns = Netns::new("kill").unwrap();
    ns.iptables(
        false,
        &[
            "-A", "INPUT", "-i", "lo", "-p", "tcp", "--dport", "9", "--syn", "-j", "DROP",
        ],
    )
    .unwrap();
    let mut client = Client::spawn(&ns, &["127.0.0.1:9"], &[("OTEL_SERVICE_NAME", "doomed")]);
    let pid = client.pid();
    // Let it get into SYN_SENT (and synspan take note of it), then SIGKILL it by pid.
    let in_syn_sent = wait_until(Duration::from_secs(5), || {
        let out = ns.exec(&["ss", "-Htn", "state", "syn-sent"]).ok()?;
        String::from_utf8_lossy(&out.stdout)
            .contains("127.0.0.1:9")
            .then_some(())
    });
    assert!(in_syn_sent.is_some());
    std::thread::sleep(Duration::from_millis(300));
    client.0.kill().unwrap();
    client.0.wait().unwrap();
    let span = one_span(&agent, pid);
    assert_eq!(span["attributes"]["synspan.outcome"], "aborted", "{span:#}");
    assert_eq!(span["attributes"]["process.pid"], pid);
    assert_eq!(text(&span, "process.executable.name"), "synspan-connect");
    assert_eq!(span["resource"]["service.name"], "doomed", "{span:#}");
    let user = text(&span, "synspan.user_stack");
    assert!(
        user.contains(CONNECT_FN),
        "user stack of the killed client:\n{user}"
    );
}

/// A process that publishes its resource as an OpenTelemetry process context: its spans
/// carry that resource, not the one its environment names.
#[test]
fn the_published_process_context_is_the_resource() {
    let receiver = Receiver::start().unwrap();
    let agent = Agent::start(&["--otlp-endpoint", &receiver.endpoint()]).unwrap();
    let ns = Netns::new("pctx").unwrap();
    let client = Client::spawn(
        &ns,
        &[
            "127.0.0.1:0",
            "--listen-first",
            "--hold",
            "--process-context",
            "service.name=published,service.instance.id=i-42,service.namespace=shop,\
             deployment.environment.name=prod",
        ],
        &[
            ("OTEL_SERVICE_NAME", "from-environment"),
            ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=dev"),
        ],
    );
    let got = receiver.wait_spans(1, WAIT, |s| s["attributes"]["process.pid"] == client.pid());
    assert_eq!(got.len(), 1, "{}", agent.stderr());
    let resource = &got[0]["resource"];
    assert_eq!(resource["service.name"], "published", "{resource:#}");
    assert_eq!(resource["service.instance.id"], "i-42", "{resource:#}");
    assert_eq!(resource["service.namespace"], "shop", "{resource:#}");
    assert_eq!(resource["deployment.environment.name"], "prod", "{resource:#}");
    assert!(resource["host.name"].is_string(), "{resource:#}");
}

/// A process context that is broken in any of the ways a buggy or hostile process can
/// leave it: the agent goes on, and the resource comes from the environment.
#[test]
fn a_malformed_process_context_falls_back_to_the_environment() {
    let receiver = Receiver::start().unwrap();
    let agent = Agent::start(&["--otlp-endpoint", &receiver.endpoint()]).unwrap();
    let ns = Netns::new("pbad").unwrap();
    let kinds = ["signature", "huge-payload", "truncated", "never-settled"];
    let clients: Vec<(&str, Client)> = kinds
        .iter()
        .map(|&how| {
            let service = format!("fallback-{how}");
            let client = Client::spawn(
                &ns,
                &[
                    "127.0.0.1:0",
                    "--listen-first",
                    "--hold",
                    "--process-context",
                    "service.name=must-not-show",
                    "--process-context-malformed",
                    how,
                ],
                &[("OTEL_SERVICE_NAME", service.as_str())],
            );
            (how, client)
        })
        .collect();
    let got = receiver.wait_spans(kinds.len(), WAIT, |s| {
        clients
            .iter()
            .any(|(_, c)| s["attributes"]["process.pid"] == c.pid())
    });
    assert_eq!(got.len(), kinds.len(), "{}", agent.stderr());
    for (how, client) in &clients {
        let span = got
            .iter()
            .find(|s| s["attributes"]["process.pid"] == client.pid())
            .unwrap();
        assert_eq!(
            span["resource"]["service.name"],
            format!("fallback-{how}"),
            "{span:#}"
        );
    }
    let stopped = agent.stop(Duration::from_secs(10)).unwrap();
    assert!(stopped.status.success(), "{}", stopped.stderr);
}

/// A process that rewrites its process context while synspan runs (the specification's
/// updating protocol): its next attempts carry the new resource.
#[test]
fn a_rewritten_process_context_is_picked_up() {
    let receiver = Receiver::start().unwrap();
    let agent = Agent::start(&["--otlp-endpoint", &receiver.endpoint()]).unwrap();
    let ns = Netns::new("pnew").unwrap();
    // The second attempt comes after the rewrite, and after the agent's one-second recheck
    // of a process it knows.
    let client = Client::spawn(
        &ns,
        &[
            "127.0.0.1:9",
            "--count",
            "2",
            "--interval",
            "1500",
            "--hold",
            "--process-context",
            "service.name=before,service.version=1",
            "--process-context-update",
            "service.name=after,service.version=2",
        ],
        &[],
    );
    let got = receiver.wait_spans(2, WAIT, |s| s["attributes"]["process.pid"] == client.pid());
    assert_eq!(got.len(), 2, "{}", agent.stderr());
    let mut seen: Vec<(String, String)> = got
        .iter()
        .map(|s| {
            let r = &s["resource"];
            (
                r["service.name"].as_str().unwrap_or_default().to_string(),
                r["service.version"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("after".to_string(), "2".to_string()),
            ("before".to_string(), "1".to_string())
        ],
        "{got:#?}"
    );
}
