//! Evidence that explains a failed or retried attempt, looked up when it ends: where NAT sent
//! it (conntrack, in the attempt's own network namespace) and, when no local port was free,
//! how the ephemeral ports were used. Collisions are caught in the kernel instead (see
//! `attempt::Collision`): they are gone before any lookup could find them.

use std::{
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
    rate_limited: u64,
}

impl Explainer {
    pub fn new(enabled: bool, all: bool) -> Self {
        Self {
            all,
            enabled,
            window: Instant::now(),
            used: 0,
            rate_limited: 0,
        }
    }

    /// Lookups not made since start because [`LOOKUPS_PER_SECOND`] was reached.
    pub fn rate_limited(&self) -> u64 {
        self.rate_limited
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
            self.rate_limited += 1;
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
