//! Evidence that explains a failed or retried attempt, looked up when it ends: where NAT sent
//! it (conntrack, in the attempt's own network namespace), how full the accept queue of a
//! listener in that namespace was, and, when no local port was free, how the ephemeral ports
//! were used. Collisions are caught in the kernel instead (see
//! `attempt::Collision`): they are gone before any lookup could find them.
//!
//! Lookups enter another network namespace and talk netlink or read `/proc/net/tcp`; any of
//! that can be slow or hang. They run on a thread of their own, and the enrichment worker
//! waits for an answer at most `LOOKUP_DEADLINE`: past it the attempt goes on without, and
//! while that lookup is still stuck the next attempts go without at once.

use std::{
    path::PathBuf,
    sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError},
    time::{Duration, Instant},
};

pub(crate) mod listener;
mod nat;
mod netlink;
mod netns;
mod port_usage;

pub(crate) use self::{listener::ListenerQueue, nat::Translation, port_usage::PortUsage};
use self::{nat::Tuple, netns::in_netns, port_usage::port_usage};
use crate::{attempt::Attempt, enrich::identity::Identity, outcome::Outcome};

#[derive(Clone, Debug, Default)]
pub(crate) struct Evidence {
    /// Present when conntrack rewrote the destination or the source.
    pub(crate) nat: Option<Translation>,
    /// For `address_not_available`.
    pub(crate) ports: Option<PortUsage>,
    /// For an attempt that retransmitted its SYN or timed out, when the destination is a
    /// listener in the attempt's own network namespace. Boxed: rare, and every queued span
    /// carries an `Evidence`.
    pub(crate) listener: Option<Box<ListenerQueue>>,
}

/// Lookups enter another network namespace on a fresh thread and talk netlink: a storm of
/// failures must not turn into a storm of those. Past this many a second, the rest of the
/// second's attempts go without.
const LOOKUPS_PER_SECOND: u32 = 200;

/// How long an attempt waits for its lookup. The conntrack request itself gives up after
/// 200 ms; this leaves room for entering the namespace.
const LOOKUP_DEADLINE: Duration = Duration::from_millis(300);

/// Why attempts went without the evidence they would have had.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Missed {
    /// Over `LOOKUPS_PER_SECOND`.
    pub(crate) rate_limited: u64,
    /// The lookup was not answered within `LOOKUP_DEADLINE`.
    pub(crate) timed_out: u64,
    /// An earlier lookup was still stuck, so none was made.
    pub(crate) stalled: u64,
}

/// What to look up for one attempt.
struct Lookup {
    netns: PathBuf,
    tuple: Tuple,
    pid: u32,
    ports: bool,
    nat: bool,
    listener: bool,
}

impl Lookup {
    fn run(self) -> Evidence {
        let mut evidence = Evidence::default();
        if self.ports {
            evidence.ports = port_usage(&self.netns, self.tuple.dst)
                .map_err(|err| tracing::debug!("port usage of {}: {err}", self.pid))
                .ok();
        }
        // Both talk netlink in the attempt's namespace: entered once, on one thread, for both.
        if self.nat || self.listener {
            let found = in_netns(&self.netns, || {
                (
                    self.nat.then(|| nat::lookup_here(&self.tuple)),
                    self.listener.then(|| listener::lookup(self.tuple.dst)),
                )
            });
            let (nat, listener) = match found {
                Ok(found) => found,
                Err(err) => {
                    tracing::debug!("evidence for {}: {err}", self.pid);
                    (None, None)
                }
            };
            match nat {
                Some(Ok(Some(t))) if t.dnat || t.snat => evidence.nat = Some(t),
                Some(Err(err)) => {
                    tracing::debug!("conntrack for {} -> {}: {err}", self.tuple.src, self.tuple.dst);
                }
                _ => {}
            }
            evidence.listener = listener
                .and_then(|found| {
                    found
                        .map_err(|err| tracing::debug!("listener at {}: {err}", self.tuple.dst))
                        .ok()
                })
                .flatten()
                .map(Box::new);
        }
        evidence
    }
}

/// The lookup thread and the one request it may be working on.
struct Lookups {
    requests: SyncSender<Lookup>,
    answers: Receiver<Evidence>,
    /// A request timed out and its answer has not come yet.
    stuck: bool,
}

impl Lookups {
    fn spawn(delay: Duration) -> std::io::Result<Self> {
        let (requests, incoming) = mpsc::sync_channel::<Lookup>(1);
        let (answer, answers) = mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("synspan-evidence".into())
            .spawn(move || {
                for lookup in incoming {
                    if !delay.is_zero() {
                        std::thread::sleep(delay);
                    }
                    if answer.send(lookup.run()).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Self {
            requests,
            answers,
            stuck: false,
        })
    }

    fn ask(&mut self, lookup: Lookup, missed: &mut Missed) -> Evidence {
        if self.stuck {
            match self.answers.try_recv() {
                // The late answer belongs to an attempt that has gone on without it.
                Ok(_) => self.stuck = false,
                Err(TryRecvError::Empty) => {
                    missed.stalled += 1;
                    return Evidence::default();
                }
                Err(TryRecvError::Disconnected) => return Evidence::default(),
            }
        }
        if self.requests.send(lookup).is_err() {
            return Evidence::default();
        }
        match self.answers.recv_timeout(LOOKUP_DEADLINE) {
            Ok(evidence) => evidence,
            Err(RecvTimeoutError::Timeout) => {
                self.stuck = true;
                missed.timed_out += 1;
                Evidence::default()
            }
            Err(RecvTimeoutError::Disconnected) => Evidence::default(),
        }
    }
}

pub(crate) struct Explainer {
    /// Look up NAT for every attempt, not only failed or retried ones.
    all: bool,
    lookups: Option<Lookups>,
    window: Instant,
    used: u32,
    missed: Missed,
}

impl Explainer {
    /// `delay` holds every lookup back that long: a stuck netlink peer, made on purpose.
    pub(crate) fn new(enabled: bool, all: bool, delay: Duration) -> std::io::Result<Self> {
        Ok(Self {
            all,
            lookups: if enabled {
                Some(Lookups::spawn(delay)?)
            } else {
                None
            },
            window: Instant::now(),
            used: 0,
            missed: Missed::default(),
        })
    }

    /// Attempts that went without evidence, by reason, since start.
    pub(crate) fn missed(&self) -> Missed {
        self.missed
    }

    fn budget(&mut self) -> bool {
        if self.window.elapsed() >= Duration::from_secs(1) {
            self.window = Instant::now();
            self.used = 0;
        }
        if self.used < LOOKUPS_PER_SECOND {
            self.used += 1;
            true
        } else {
            self.missed.rate_limited += 1;
            false
        }
    }

    pub(crate) fn explain(&mut self, attempt: &Attempt, identity: &Identity) -> Evidence {
        if self.lookups.is_none() {
            return Evidence::default();
        }
        let interesting =
            attempt.outcome.is_failure() || attempt.syn_retransmits > 0 || attempt.collision.is_some();
        let ports = attempt.outcome == Outcome::AddressNotAvailable;
        // Without a local port there is no tuple for conntrack to know.
        let nat = (interesting || self.all) && attempt.local.port() != 0;
        // The SYN went unanswered at least once: a full accept queue is one reason.
        let listener = attempt.syn_retransmits > 0 || attempt.outcome == Outcome::TimedOut;
        if !(ports || nat || listener) || !self.budget() {
            return Evidence::default();
        }
        let lookup = Lookup {
            netns: identity
                .process
                .as_ref()
                .map(|p| p.netns_path())
                .unwrap_or_else(|| PathBuf::from(format!("/proc/{}/ns/net", attempt.pid))),
            tuple: Tuple {
                src: attempt.local,
                dst: attempt.peer,
            },
            pid: attempt.pid,
            ports,
            nat,
            listener,
        };
        let Some(lookups) = &mut self.lookups else {
            return Evidence::default();
        };
        lookups.ask(lookup, &mut self.missed)
    }
}
