//! The modes: a storm and the flags synspan runs with during it.

use synspan_testbed::bench;

pub(crate) struct Mode {
    pub(crate) id: usize,
    pub(crate) name: &'static str,
    pub(crate) storm: &'static str,
    /// synspan's flags besides the endpoint and `--output none`.
    pub(crate) flags: &'static [&'static str],
    /// The lowest acceptable ratio of synspan's median to the baseline's, if the issue sets one.
    pub(crate) target: Option<f64>,
}

impl Mode {
    pub(crate) fn failures_only(&self) -> bool {
        self.flags.contains(&"--failures-only")
    }

    /// Mode `id`, as `--modes` numbers them (checked there).
    pub(crate) fn by_id(id: usize) -> &'static Mode {
        &MODES[id - 1]
    }
}

pub(crate) const MODES: [Mode; 6] = [
    Mode {
        id: 1,
        name: "success storm, every attempt over OTLP",
        storm: bench::SUCCESS,
        flags: &["--span-rate-limit", "0"],
        target: Some(0.85),
    },
    Mode {
        id: 2,
        name: "success storm, --failures-only (production policy)",
        storm: bench::SUCCESS,
        flags: &["--failures-only"],
        target: Some(0.95),
    },
    Mode {
        id: 3,
        name: "refused storm, every failure kept, default span rate limit",
        storm: bench::REFUSED,
        flags: &[],
        target: Some(0.75),
    },
    Mode {
        id: 4,
        name: "success storm, every attempt over OTLP, --no-stacks",
        storm: bench::SUCCESS,
        flags: &["--no-stacks", "--span-rate-limit", "0"],
        target: None,
    },
    // Mode 2 without the connect metrics: what counting every attempt in the kernel costs is
    // the difference of the two ratios.
    Mode {
        id: 5,
        name: "success storm, --failures-only, connect metrics off",
        storm: bench::SUCCESS,
        flags: &["--failures-only", "--metrics-max-series", "0"],
        target: None,
    },
    // Against mode 1: the cost of reading the calling thread's context at each attempt.
    Mode {
        id: 6,
        name: "success storm inside published spans (thread context), every attempt over OTLP",
        storm: bench::SUCCESS_IN_SPAN,
        flags: &["--span-rate-limit", "0"],
        target: None,
    },
];

/// The connect metrics' cost with `--failures-only`: mode 2's ratio may be at most this much
/// below mode 5's.
pub(crate) const METRICS_COST_TARGET: f64 = 0.02;
