//! The three ways the tests' attempts end, made at once in a namespace of their own: the
//! kernel giving up after its SYN retransmits, a refusal, and a success from a container.

use std::thread;

use crate::{cgroup::Cgroup, client::Held, netns::Netns};

/// In a new namespace `ns_name`, as `service` (`OTEL_SERVICE_NAME`): an attempt the kernel
/// gives up on after 5 SYN retransmits (about 7 s), a refused one, and an established one from
/// the cgroup a docker container `container_id` would have. The clients stay alive after their
/// attempt (one that exits at once can lose its service name: the agent reads `/proc` too
/// late). Returned in that order; the namespace and cgroup live as long as what is returned.
pub fn three_outcomes(
    ns_name: &str,
    service: &str,
    container_id: &str,
) -> anyhow::Result<(Netns, Cgroup, [Held; 3])> {
    let ns = Netns::new(ns_name)?;
    // 5 retransmits, then the kernel gives up after about 7 s.
    ns.sysctl("net.ipv4.tcp_syn_retries", "2")?;
    ns.iptables(
        false,
        &[
            "-A", "INPUT", "-i", "lo", "-p", "tcp", "--dport", "9", "--syn", "-j", "DROP",
        ],
    )?;
    let env = [("OTEL_SERVICE_NAME", service)];
    let container = Cgroup::named(&format!("docker-{container_id}.scope"))?;
    let (timed_out, refused, established) = thread::scope(|s| -> anyhow::Result<_> {
        let timed_out = s.spawn(|| Held::connect(&ns, None, &env, "127.0.0.1:9", &[]));
        let refused = Held::connect(&ns, None, &env, "127.0.0.1:10", &[])?;
        let established = Held::connect(&ns, Some(&container), &env, "127.0.0.1:0", &["--listen-first"])?;
        let timed_out = timed_out
            .join()
            .map_err(|_| anyhow::anyhow!("the timed-out client's thread panicked"))??;
        Ok((timed_out, refused, established))
    })?;
    for (held, errno) in [
        (&timed_out, libc::ETIMEDOUT),
        (&refused, libc::ECONNREFUSED),
        (&established, 0),
    ] {
        anyhow::ensure!(
            held.report.errno == errno,
            "expected errno {errno}: {:?}",
            held.report
        );
    }
    Ok((ns, container, [timed_out, refused, established]))
}
