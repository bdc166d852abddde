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

pub(crate) const MODES: [Mode; 9] = [
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
    // Mode 2 without the drop-reason program: mode 2's ratio against this one is what the
    // program costs when the host drops nothing.
    Mode {
        id: 7,
        name: "success storm, --failures-only, --no-drop-reasons",
        storm: bench::SUCCESS,
        flags: &["--failures-only", "--no-drop-reasons"],
        target: None,
    },
    // The program runs for every packet the host drops: modes 8 and 9 put a steady stream of
    // drops that belong to no attempt beside the success storm, with it and without it.
    Mode {
        id: 8,
        name: "success storm with unrelated drops, --failures-only",
        storm: bench::SUCCESS_WITH_DROPS,
        flags: &["--failures-only"],
        target: None,
    },
    Mode {
        id: 9,
        name: "success storm with unrelated drops, --failures-only, --no-drop-reasons",
        storm: bench::SUCCESS_WITH_DROPS,
        flags: &["--failures-only", "--no-drop-reasons"],
        target: None,
    },
];

/// A cost measured as one mode's ratio against another's of the same run, which differs
/// from it only in what is measured.
pub(crate) struct Cost {
    pub(crate) what: &'static str,
    /// The mode with it.
    pub(crate) on: usize,
    /// The mode without it.
    pub(crate) off: usize,
    /// The ratio with it may be at most this much below the ratio without it.
    pub(crate) target: f64,
}

pub(crate) const COSTS: [Cost; 4] = [
    Cost {
        what: "reading the calling thread's context, every attempt exported",
        on: 6,
        off: 1,
        target: 0.02,
    },
    Cost {
        what: "connect metrics with --failures-only",
        on: 2,
        off: 5,
        target: 0.02,
    },
    Cost {
        what: "drop reasons on the success storm with --failures-only",
        on: 2,
        off: 7,
        target: 0.02,
    },
    Cost {
        what: "drop reasons on the success storm with unrelated drops, --failures-only",
        on: 8,
        off: 9,
        target: 0.02,
    },
];
