//! The peers: what an engineer would run instead of synspan, measured on the same storms in
//! the same pairs, so that every "cheaper than" in the report is a figure from one run.

use std::{
    fs,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use synspan_testbed::reaped::{Reaped, describe};

use crate::measure;

#[derive(Debug)]
pub(crate) struct Peer {
    /// As `--peers` names it.
    pub(crate) name: &'static str,
    /// As the report describes it.
    pub(crate) what: &'static str,
    program: &'static str,
    args: &'static [&'static str],
    /// The Debian package that has `program`.
    package: &'static str,
}

pub(crate) static PEERS: [Peer; 4] = [
    Peer {
        name: "bpftrace-count",
        what: "bpftrace, one line: count SYN_SENT on `sock:inet_sock_set_state`",
        program: "bpftrace",
        args: &["-e", include_str!("../../../peers/syn-sent-count.bt")],
        package: "bpftrace",
    },
    Peer {
        name: "bpftrace-seed",
        what: "bpftrace, the incident script's connect/retransmit/close logic on tracepoints, counters only",
        program: "bpftrace",
        args: &["-e", include_str!("../../../peers/connect-retransmit-close.bt")],
        package: "bpftrace",
    },
    Peer {
        name: "tcplife",
        what: "libbpf-tools `tcplife` (a line per connection)",
        program: "tcplife",
        args: &[],
        package: "libbpf-tools",
    },
    Peer {
        name: "tcpstates",
        what: "libbpf-tools `tcpstates` (a line per state change)",
        program: "tcpstates",
        args: &[],
        package: "libbpf-tools",
    },
];

impl Peer {
    pub(crate) fn by_name(name: &str) -> Option<&'static Peer> {
        PEERS.iter().find(|p| p.name == name)
    }

    /// Fails, naming the package, when the peer's program is not installed.
    pub(crate) fn check_installed(&self) -> anyhow::Result<()> {
        if which::which(self.program).is_err() {
            bail!(
                "peer {}: `{}` is not installed (apt-get install {}, or run scripts/bench.sh, which installs it); \
                 --peers none skips the peers",
                self.name,
                self.program,
                self.package
            );
        }
        Ok(())
    }

    /// Starts the peer and waits until its programs are attached.
    pub(crate) fn start(&'static self) -> anyhow::Result<Running> {
        let log =
            std::env::temp_dir().join(format!("synspan-bench-{}-{}.log", self.name, std::process::id()));
        let err = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(self.program)
            .args(self.args)
            .stdin(Stdio::null())
            // What the tool prints is part of what it costs; nobody reads it here.
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {}", self.program))?;
        let mut running = Running {
            peer: self,
            proc: Reaped::new(child),
            log,
        };
        running.wait_attached()?;
        Ok(running)
    }
}

/// A peer between start and stop.
pub(crate) struct Running {
    pub(crate) peer: &'static Peer,
    proc: Reaped,
    log: std::path::PathBuf,
}

/// Starting a peer takes this long at most: bpftrace compiles its script first.
const ATTACH_LIMIT: Duration = Duration::from_secs(30);
/// Its programs are taken as attached once the count of its BPF file descriptors has not
/// changed for this long: a tool loads and attaches all its programs in one go.
const SETTLED: Duration = Duration::from_millis(700);

impl Running {
    pub(crate) fn pid(&self) -> u32 {
        self.proc.pid()
    }

    fn wait_attached(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        let (mut seen, mut since) = ((0, 0), Instant::now());
        while started.elapsed() < ATTACH_LIMIT && !crate::interrupted() {
            if let Some(exit) = self.proc.try_wait() {
                bail!(
                    "peer {} exited while starting ({}): {}",
                    self.peer.name,
                    describe(exit.status),
                    self.log_text()
                );
            }
            let now = bpf_fds(self.pid());
            if now != seen {
                (seen, since) = (now, Instant::now());
            } else if now.0 > 0 && now.1 > 0 && since.elapsed() >= SETTLED {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "peer {} did not attach within {ATTACH_LIMIT:?}: {}",
            self.peer.name,
            self.log_text()
        )
    }

    /// Stops the peer (SIGINT, as a user would); returns its peak RSS.
    pub(crate) fn stop(mut self) -> anyhow::Result<Stopped> {
        let pid = self.pid();
        let hwm_mib = measure::status_mib(pid, "VmHWM:").unwrap_or(f64::NAN);
        self.proc.signal(libc::SIGINT);
        let exit = match self.proc.wait(Duration::from_secs(10)) {
            Some(exit) => exit,
            None => bail!("peer {} ignored SIGINT for 10 s and was killed", self.peer.name),
        };
        if !exit.status.success() && exit.status.code() != Some(130) {
            bail!(
                "peer {} ended with {}: {}",
                self.peer.name,
                describe(exit.status),
                self.log_text()
            );
        }
        let _ = fs::remove_file(&self.log);
        Ok(Stopped { hwm_mib })
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .trim()
            .to_string()
    }
}

pub(crate) struct Stopped {
    pub(crate) hwm_mib: f64,
}

/// BPF programs a process holds, and the links or perf events that attach them.
fn bpf_fds(pid: u32) -> (usize, usize) {
    let (mut progs, mut attachments) = (0, 0);
    for entry in fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let Ok(target) = fs::read_link(entry.path()) else {
            continue;
        };
        match target.to_string_lossy().as_ref() {
            "anon_inode:bpf-prog" => progs += 1,
            "anon_inode:bpf_link" | "anon_inode:[perf_event]" => attachments += 1,
            _ => {}
        }
    }
    (progs, attachments)
}
