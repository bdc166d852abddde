//! Network namespaces that a test creates and always removes, with veth pairs between them.

use std::{
    path::Path,
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, bail};

static NEXT: AtomicU32 = AtomicU32::new(0);

fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out)
}

/// A network namespace, deleted (with every process left in it killed by pid) on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let name = format!(
            "ss-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NS ARGS`.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args)).map(drop)
    }

    /// Runs a command inside the namespace and waits for it.
    pub fn exec(&self, args: &[&str]) -> anyhow::Result<Output> {
        run(Command::new("ip").args(["netns", "exec", &self.name]).args(args))
    }

    /// A command that will run inside the namespace.
    pub fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd.stdin(Stdio::null());
        cmd
    }

    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        self.exec(&["sysctl", "-q", "-w", &format!("{key}={value}")])
            .map(drop)
    }

    /// Adds an iptables (or ip6tables) rule inside the namespace; it goes with the namespace.
    pub fn iptables(&self, v6: bool, rule: &[&str]) -> anyhow::Result<()> {
        let tool = if v6 { "ip6tables" } else { "iptables" };
        let mut args = vec![tool, "-w"];
        args.extend_from_slice(rule);
        self.exec(&args).map(drop)
    }

    /// Redirects TCP to `dest:port` made inside the namespace to its own `to_port` (the nat
    /// table's REDIRECT, as a sidecar proxy's interception does).
    pub fn redirect(&self, v6: bool, dest: &str, port: u16, to_port: u16) -> anyhow::Result<()> {
        let (port, to_port) = (port.to_string(), to_port.to_string());
        self.iptables(
            v6,
            &[
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "-p",
                "tcp",
                "-d",
                dest,
                "--dport",
                &port,
                "-j",
                "REDIRECT",
                "--to-ports",
                &to_port,
            ],
        )
    }

    /// Connects two namespaces with a veth pair and gives each end an address (CIDR form).
    pub fn link(&self, peer: &Netns, addr: &str, peer_addr: &str) -> anyhow::Result<()> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let (a, b) = (
            format!("ssa{}x{n}", std::process::id() % 10000),
            format!("ssb{}x{n}", std::process::id() % 10000),
        );
        run(Command::new("ip").args([
            "link", "add", &a, "netns", &self.name, "type", "veth", "peer", "name", &b, "netns", &peer.name,
        ]))?;
        add_addr(self, &a, addr)?;
        add_addr(peer, &b, peer_addr)?;
        self.ip(&["link", "set", &a, "up"])?;
        peer.ip(&["link", "set", &b, "up"])?;
        Ok(())
    }

    /// Processes in the namespace.
    fn pids(&self) -> Vec<i32> {
        Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn add_addr(ns: &Netns, dev: &str, cidr: &str) -> anyhow::Result<()> {
    let mut args = vec!["addr", "add", cidr, "dev", dev];
    // Duplicate address detection would hold an IPv6 address back for a second or two.
    if cidr.contains(':') {
        args.push("nodad");
    }
    ns.ip(&args)
}

impl Drop for Netns {
    fn drop(&mut self) {
        for pid in self.pids() {
            // SAFETY: plain syscall; these pids live in the namespace this test created.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}
