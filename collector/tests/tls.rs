//! End to end: OTLP gRPC and OTLP/HTTP over mutual TLS, with a CA this test makes, to the
//! real receiver behind a real TLS terminator (stunnel). Needs root, openssl and stunnel.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use synspan_testbed::{agent::Agent, client::connect, netns::Netns, receiver::Receiver, wait_until};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for localhost and a client certificate, all signed by the CA.
fn make_pki(dir: &Path) {
    openssl(
        dir,
        &[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        ]
        .into_iter()
        .chain(["-days", "1", "-subj", "/CN=synspan test CA"])
        .collect::<Vec<_>>(),
    );
    for (name, cn, ext) in [
        (
            "server",
            "localhost",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        ),
        ("client", "synspan-agent", "extendedKeyUsage=clientAuth\n"),
    ] {
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        let (key, csr, pem) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
        );
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &format!("/CN={cn}"),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
            ]
            .into_iter()
            .chain(["-days", "1", "-extfile", &format!("{name}.ext")])
            .collect::<Vec<_>>(),
        );
    }
}

struct Stunnel(Child);

impl Drop for Stunnel {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// TLS on `port`, requiring a client certificate from our CA, forwarding to `backend`.
fn stunnel(dir: &Path, port: u16, backend: u16) -> Stunnel {
    let conf = format!(
        "foreground = yes\npid =\n[otlp]\naccept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{backend}\n\
         cert = {d}/server.pem\nkey = {d}/server.key\nCAfile = {d}/ca.pem\nverifyChain = yes\n",
        d = dir.display()
    );
    std::fs::write(dir.join("stunnel.conf"), conf).unwrap();
    let child = Command::new("stunnel")
        .arg(dir.join("stunnel.conf"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("stunnel.log")).unwrap())
        .spawn()
        .expect("stunnel");
    let tunnel = Stunnel(child);
    wait_until(Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    })
    .expect("stunnel listening");
    tunnel
}

/// Exports one refused attempt over `protocol` through stunnel, which requires a client
/// certificate from the test's CA, to the receiver's port for that protocol.
fn over_mutual_tls(protocol: &str) {
    let dir = std::env::temp_dir().join(format!(
        "synspan-tls-{}-{}",
        std::process::id(),
        protocol.replace('/', "-")
    ));
    std::fs::create_dir_all(&dir).unwrap();
    make_pki(&dir);
    let receiver = Receiver::start().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let backend = match protocol {
        "grpc" => receiver.port(),
        _ => receiver.http_port(),
    };
    let _tunnel = stunnel(&dir, port, backend);
    let file = |name: &str| dir.join(name).display().to_string();
    let agent = Agent::start(&[
        "--otlp-protocol",
        protocol,
        "--otlp-endpoint",
        &format!("https://localhost:{port}"),
        "--otlp-ca-file",
        &file("ca.pem"),
        "--otlp-client-cert",
        &file("client.pem"),
        "--otlp-client-key",
        &file("client.key"),
    ])
    .unwrap();
    let ns = Netns::new(if protocol == "grpc" { "tls" } else { "tlsh" }).unwrap();
    let client = connect(&ns, "127.0.0.1:9", &[]).unwrap();
    let got = receiver.wait_spans(1, Duration::from_secs(20), |s| {
        s["attributes"]["process.pid"] == client.pid
    });
    let log = std::fs::read_to_string(dir.join("stunnel.log")).unwrap_or_default();
    assert_eq!(
        got.len(),
        1,
        "no span over TLS\nsynspan:\n{}\nstunnel:\n{log}",
        agent.stderr()
    );
    assert_eq!(got[0]["attributes"]["synspan.outcome"], "connection_refused");
    let stopped = agent.stop(Duration::from_secs(10)).unwrap();
    assert!(stopped.status.success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn exports_over_mutual_tls_with_a_private_ca() {
    over_mutual_tls("grpc");
}

#[test]
fn exports_over_http_with_mutual_tls_and_a_private_ca() {
    over_mutual_tls("http/protobuf");
}
