//! Medians over the pairs of each mode.

use crate::{
    checks::exactness,
    mode::{MODES, Mode},
    peers::{PEERS, Peer},
    runner::Run,
};

pub(crate) struct Summary {
    pub(crate) mode: &'static Mode,
    pub(crate) base: f64,
    pub(crate) traced: f64,
    pub(crate) ratio: f64,
    pub(crate) made: u64,
    pub(crate) settled: u64,
    pub(crate) cpu_s: f64,
    pub(crate) rss_mib: f64,
    pub(crate) exact: bool,
    pub(crate) storm_cpu_us_a: f64,
    pub(crate) storm_cpu_us_b: f64,
    pub(crate) synspan_cpu_us: f64,
    pub(crate) receiver_cpu_us: f64,
    pub(crate) kernel_us: f64,
    pub(crate) recursion_misses: u64,
}

/// One summary per mode that has both A and B runs.
pub(crate) fn summarize(runs: &[Run]) -> Vec<Summary> {
    MODES
        .iter()
        .filter_map(|mode| {
            let a: Vec<&Run> = runs
                .iter()
                .filter(|r| r.mode == mode.id && r.is_baseline())
                .collect();
            let b: Vec<&Run> = runs
                .iter()
                .filter(|r| r.mode == mode.id && r.agent.is_some())
                .collect();
            if a.is_empty() || b.is_empty() {
                return None;
            }
            let t = |r: &&Run| r.agent.clone().unwrap_or_default();
            let per_attempt = |f: &dyn Fn(&Run) -> f64| {
                median(
                    b.iter()
                        .map(|r| f(r) * 1e6 / r.storm.attempts.max(1) as f64)
                        .collect(),
                )
            };
            let base = median(a.iter().map(|r| r.storm.per_second).collect());
            let traced = median(b.iter().map(|r| r.storm.per_second).collect());
            Some(Summary {
                mode,
                base,
                traced,
                ratio: traced / base,
                made: b.iter().map(|r| r.storm.attempts).sum(),
                settled: b.iter().map(|r| t(r).settled()).sum(),
                cpu_s: median(b.iter().map(|r| t(r).cpu_s).collect()),
                rss_mib: b.iter().map(|r| t(r).peak_rss_mib()).fold(0.0, f64::max),
                exact: b
                    .iter()
                    .all(|r| exactness(mode, r).is_some_and(|e| e.exact()) && t(r).exit_ok),
                storm_cpu_us_a: median(a.iter().map(|r| r.storm_cpu_us()).collect()),
                storm_cpu_us_b: median(b.iter().map(|r| r.storm_cpu_us()).collect()),
                synspan_cpu_us: per_attempt(&|r| t(&r).cpu_s),
                receiver_cpu_us: per_attempt(&|r| t(&r).receiver_cpu_s),
                kernel_us: per_attempt(&|r| t(&r).kernel_ns() as f64 / 1e9),
                recursion_misses: b.iter().map(|r| t(r).recursion_misses()).sum(),
            })
        })
        .collect()
}

/// A peer on one mode's storm: its runs against the same mode's baselines.
pub(crate) struct PeerSummary {
    pub(crate) peer: &'static Peer,
    pub(crate) mode: &'static Mode,
    pub(crate) traced: f64,
    pub(crate) ratio: f64,
    /// The peer's own CPU while the storm ran, per attempt.
    pub(crate) cpu_us: f64,
    /// The storm's CPU per attempt, in which the peer's programs run.
    pub(crate) storm_cpu_us: f64,
    pub(crate) rss_mib: f64,
}

/// One summary per peer and mode that has both peer runs and baselines.
pub(crate) fn summarize_peers(runs: &[Run]) -> Vec<PeerSummary> {
    let mut out = Vec::new();
    for mode in &MODES {
        let base = median(
            runs.iter()
                .filter(|r| r.mode == mode.id && r.is_baseline())
                .map(|r| r.storm.per_second)
                .collect(),
        );
        for peer in &PEERS {
            let p: Vec<&Run> = runs
                .iter()
                .filter(|r| r.mode == mode.id && r.peer.as_ref().is_some_and(|c| c.peer.name == peer.name))
                .collect();
            if p.is_empty() || !base.is_finite() {
                continue;
            }
            let cost = |r: &Run| r.peer.clone().expect("a peer's run");
            let traced = median(p.iter().map(|r| r.storm.per_second).collect());
            out.push(PeerSummary {
                peer,
                mode,
                traced,
                ratio: traced / base,
                cpu_us: median(
                    p.iter()
                        .map(|r| cost(r).cpu_storm_s * 1e6 / r.storm.attempts.max(1) as f64)
                        .collect(),
                ),
                storm_cpu_us: median(p.iter().map(|r| r.storm_cpu_us()).collect()),
                rss_mib: p.iter().map(|r| cost(r).hwm_mib).fold(0.0, f64::max),
            });
        }
    }
    out
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}
