//! End to end: the evidence that explains a failure. An Istio-like port collision behind a
//! REDIRECT, rebuilt in network namespaces this test creates. Needs root and python3.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Stdio},
    time::Duration,
};

use synspan_testbed::{agent::Agent, client::connect, netns::Netns, receiver::Receiver, wait_until};

/// The "sidecar": accepts on 15001 and holds every connection; the first one it half-closes
/// (shutdown(SHUT_WR)), which leaves it in FIN_WAIT2 once the peer acknowledges the FIN.
const SIDECAR: &str = r#"
import socket
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("0.0.0.0", 15001))
l.listen(64)
print("ready", flush=True)
held = []
while True:
    c, _ = l.accept()
    if not held:
        c.shutdown(socket.SHUT_WR)
    held.append(c)
"#;

/// The old connection from source port P: it reads the sidecar's FIN, then vanishes without
/// a trace (its RST is dropped), as a connection whose NAT state was lost would.
const OLD_CLIENT: &str = r#"
import socket, struct, subprocess, sys, time
port = int(sys.argv[1])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port))
s.connect(("198.18.0.100", 7777))
assert s.recv(1) == b""
# Our ACK of the FIN may be delayed: vanish only once the sidecar has it (FIN_WAIT2).
for _ in range(100):
    ss = subprocess.run(["ss", "-Htn", "state", "fin-wait-2"], capture_output=True, text=True).stdout
    if f"198.18.0.1:{port}" in ss:
        break
    time.sleep(0.02)
rule = ["OUTPUT", "-p", "tcp", "--sport", str(port), "--tcp-flags", "RST", "RST", "-j", "DROP"]
subprocess.run(["iptables", "-w", "-A"] + rule, check=True)
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
s.close()
subprocess.run(["iptables", "-w", "-D"] + rule, check=True)
"#;

struct Sidecar(Child);

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn istio_like_collision_behind_a_redirect() {
    let pod = Netns::new("pod").unwrap();
    let peer = Netns::new("svc").unwrap();
    // RFC 2544 benchmarking addresses, only inside these two namespaces. The service
    // address 198.18.0.100 is on the pod's link, and REDIRECT sends it to the sidecar.
    pod.link(&peer, "198.18.0.1/24", "198.18.0.2/24").unwrap();
    pod.redirect(false, "198.18.0.100", 7777, 15001).unwrap();
    let mut sidecar = pod.command("python3".as_ref());
    let mut sidecar = Sidecar(
        sidecar
            .args(["-c", SIDECAR])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut ready = String::new();
    BufReader::new(sidecar.0.stdout.as_mut().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert_eq!(ready.trim(), "ready");

    let port = "40123";
    pod.exec(&["python3", "-c", OLD_CLIENT, port]).unwrap();
    let fin_wait2 = wait_until(Duration::from_secs(5), || {
        let out = pod.exec(&["ss", "-Htn", "state", "fin-wait-2"]).ok()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.contains(&format!("198.18.0.1:{port}")).then_some(text)
    });
    let sockets = pod
        .exec(&["ss", "-tan"])
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string());
    assert!(
        fin_wait2.is_some(),
        "the sidecar socket is not in FIN_WAIT2: {sockets:?}"
    );

    let receiver = Receiver::start().unwrap();
    let agent = Agent::start(&["--otlp-endpoint", &receiver.endpoint()]).unwrap();
    let client = connect(&pod, "198.18.0.100:7777", &["--bind-port", port]).unwrap();
    assert_eq!(client.errno, 0, "{client:?}");
    let spans = agent.wait_spans_of(client.pid, 1, Duration::from_secs(20));
    assert_eq!(spans.len(), 1, "{}", agent.stderr());
    let span = &spans[0];
    let a = &span["attributes"];
    assert_eq!(a["network.local.port"], 40123, "{span:#}");
    assert_eq!(a["network.peer.address"], "198.18.0.100", "{span:#}");
    assert_eq!(a["synspan.collision.state"], "FIN_WAIT2", "{span:#}");
    assert_eq!(a["synspan.collision.local.address"], "127.0.0.1", "{span:#}");
    assert_eq!(a["synspan.collision.local.port"], 15001, "{span:#}");
    assert_eq!(a["synspan.collision.peer.address"], "198.18.0.1", "{span:#}");
    assert_eq!(a["synspan.collision.peer.port"], 40123, "{span:#}");
    // Where the REDIRECT sent it, from conntrack in the pod's namespace.
    assert_eq!(a["synspan.nat.peer.address"], "127.0.0.1", "{span:#}");
    assert_eq!(a["synspan.nat.peer.port"], 15001, "{span:#}");
    let events: Vec<&str> = span["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert!(events.contains(&"rst_sent"), "{events:?}");
    assert!(events.contains(&"collision"), "{events:?}");
    let got = receiver
        .wait_span(span["span_id"].as_str().unwrap(), Duration::from_secs(20))
        .expect("the receiver got the span");
    assert_eq!(got["attributes"], span["attributes"]);
    println!("span as the OTLP receiver saw it:\n{got:#}");
}

/// A namespace whose few ephemeral ports are all held by connections to one destination:
/// the next connect finds no port, and the span says so.
#[test]
fn port_exhaustion_shows_port_usage() {
    let ns = Netns::new("ports").unwrap();
    // An even range: one connect() scans ports in pairs.
    ns.sysctl("net.ipv4.ip_local_port_range", "40000 40005").unwrap();
    let mut holder = ns.command("python3".as_ref());
    let holder = holder
        .args(["-c", HOLDER])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut holder = Sidecar(holder);
    let mut line = String::new();
    BufReader::new(holder.0.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line.trim().to_string();
    assert!(port.parse::<u16>().is_ok(), "holder said {line:?}");
    let agent = Agent::start(&[]).unwrap();
    let mut client = ns.command(&synspan_testbed::workspace_bin("synspan-connect"));
    let mut client = Sidecar(
        client
            .args([&format!("127.0.0.1:{port}"), "--hold"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let pid = client.0.id();
    let mut report = String::new();
    BufReader::new(client.0.stdout.as_mut().unwrap())
        .read_line(&mut report)
        .unwrap();
    assert!(report.contains("\"errno\":99"), "{report}");
    let spans = agent.wait_spans_of(pid, 1, Duration::from_secs(20));
    assert_eq!(spans.len(), 1, "{}", agent.stderr());
    let a = &spans[0]["attributes"];
    assert_eq!(a["synspan.outcome"], "address_not_available", "{a:#}");
    assert_eq!(a["synspan.ports.range"], "40000-40005", "{a:#}");
    assert_eq!(a["synspan.ports.range_size"], 6, "{a:#}");
    assert_eq!(a["synspan.ports.in_use_to_destination"], 6, "{a:#}");
    assert!(a["synspan.ports.in_use"].as_u64().unwrap() >= 6, "{a:#}");
}

/// Listens, makes six connections to itself from the namespace's six ephemeral ports, prints
/// the port and holds everything open.
const HOLDER: &str = r#"
import socket, time
l = socket.socket()
l.bind(("127.0.0.1", 5000))  # outside the ephemeral range: it would take one of them
l.listen(16)
port = l.getsockname()[1]
held = []
for _ in range(6):
    c = socket.create_connection(("127.0.0.1", port))
    held.append(c)
    held.append(l.accept()[0])
print(port, flush=True)
time.sleep(600)
"#;

/// Ordinary failures carry no collision evidence.
#[test]
fn no_collision_on_ordinary_failures() {
    let ns = Netns::new("nofp").unwrap();
    ns.iptables(
        false,
        &[
            "-A", "INPUT", "-i", "lo", "-p", "tcp", "--dport", "8", "--syn", "-j", "DROP",
        ],
    )
    .unwrap();
    let agent = Agent::start(&[]).unwrap();
    let refused = connect(&ns, "127.0.0.1:9", &[]).unwrap();
    let aborted = connect(&ns, "127.0.0.1:8", &["--close-after", "1500"]).unwrap();
    for client in [refused, aborted] {
        let spans = agent.wait_spans_of(client.pid, 1, Duration::from_secs(20));
        assert_eq!(spans.len(), 1);
        let keys: Vec<&String> = spans[0]["attributes"].as_object().unwrap().keys().collect();
        assert!(
            !keys.iter().any(|k| k.starts_with("synspan.collision")),
            "{keys:?}"
        );
        let events = spans[0]["events"].as_array().unwrap();
        assert!(
            !events
                .iter()
                .any(|e| e["name"] == "collision" || e["name"] == "rst_sent"),
            "{events:?}"
        );
    }
}
