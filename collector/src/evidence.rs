//! Evidence that explains a failed or retried attempt, looked up when it ends: where NAT sent
//! it (conntrack, in the attempt's own network namespace) and, when no local port was free,
//! how the ephemeral ports were used. Collisions are caught in the kernel instead (see
//! `attempt::Collision`): they are gone before any lookup could find them.

use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use crate::{
    attempt::Attempt,
    enrich::identity::Identity,
    nat::{self, Translation, Tuple},
    outcome::Outcome,
    port_usage::{PortUsage, port_usage},
};

#[derive(Clone, Debug, Default)]
pub struct Evidence {
    /// Present when conntrack rewrote the destination or the source.
    pub nat: Option<Translation>,
    /// For `address_not_available`.
    pub ports: Option<PortUsage>,
}

/// Lookups enter another network namespace on a fresh thread and talk netlink: a storm of
/// failures must not turn into a storm of those. Past this many a second, the rest of the
/// second's attempts go without.
const LOOKUPS_PER_SECOND: u32 = 200;

pub struct Explainer {
    /// Look up NAT for every attempt, not only failed or retried ones.
    all: bool,
    enabled: bool,
    window: Instant,
    used: u32,
    skipped: u64,
}

impl Explainer {
    pub fn new(enabled: bool, all: bool) -> Self {
        Self {
            all,
            enabled,
            window: Instant::now(),
            used: 0,
            skipped: 0,
        }
    }

    /// Lookups skipped for the rate limit since start.
    pub fn skipped(&self) -> u64 {
        self.skipped
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
            self.skipped += 1;
            false
        }
    }

    pub fn explain(&mut self, attempt: &Attempt, identity: &Identity) -> Evidence {
        let mut evidence = Evidence::default();
        if !self.enabled {
            return evidence;
        }
        let interesting =
            attempt.outcome.is_failure() || attempt.syn_retransmits > 0 || attempt.collision.is_some();
        let netns = identity
            .process
            .as_ref()
            .map(|p| p.netns_path())
            .unwrap_or_else(|| PathBuf::from(format!("/proc/{}/ns/net", attempt.pid)));
        if attempt.outcome == Outcome::AddressNotAvailable && self.budget() {
            evidence.ports = port_usage(&netns, attempt.peer)
                .map_err(|err| tracing::debug!("port usage of {}: {err}", attempt.pid))
                .ok();
        }
        // Without a local port there is no tuple for conntrack to know.
        if (interesting || self.all) && attempt.local.port() != 0 && self.budget() {
            let tuple = Tuple {
                src: attempt.local,
                dst: attempt.peer,
            };
            match nat::lookup(&netns, &tuple) {
                Ok(Some(t)) if t.dnat || t.snat => evidence.nat = Some(t),
                Ok(_) => {}
                Err(err) => tracing::debug!("conntrack for {} -> {}: {err}", attempt.local, attempt.peer),
            }
        }
        evidence
    }
}

/// A one-line summary for the console: `redirected to 127.0.0.1:15001`, port usage.
pub fn summary(evidence: &Evidence, peer: SocketAddr) -> Vec<String> {
    let mut parts = Vec::new();
    if let Some(t) = &evidence.nat {
        if t.dnat {
            parts.push(format!("redirected to {}", t.reply_src));
        }
        if t.snat {
            parts.push(format!("source translated to {}", t.reply_dst));
        }
    }
    if let Some(p) = &evidence.ports {
        parts.push(format!(
            "{} of {} ephemeral ports ({}-{}) toward {peer} in use, {} in use in all",
            p.in_use_to_destination, p.range_size, p.range.0, p.range.1, p.in_use_total
        ));
    }
    parts
}
