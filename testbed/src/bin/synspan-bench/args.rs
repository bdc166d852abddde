//! The command line.

use std::path::PathBuf;

use clap::Parser;
use synspan_testbed::{bench, repo_root};

use crate::{
    mode::Mode,
    peers::{PEERS, Peer},
};

/// A/B benchmark of synspan on a loopback connect storm, inside a network namespace it
/// creates. Prints a table and writes BENCHMARKS.md. Needs root.
#[derive(Debug, Parser)]
#[command(name = "synspan-bench", version)]
pub(crate) struct Args {
    /// A/B pairs per mode.
    #[arg(long, value_name = "N", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub(crate) pairs: u32,

    /// Length of each storm, in seconds (at most 600).
    #[arg(long, value_name = "S", default_value_t = 5.0, value_parser = storm_seconds)]
    pub(crate) seconds: f64,

    /// At most this many attempts per storm.
    #[arg(long, value_name = "N", default_value_t = 5_000_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) count: u64,

    /// Connect threads of the storm.
    #[arg(long, value_name = "T", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(1..=256))]
    pub(crate) threads: u32,

    /// Modes to run, of 1 (success, OTLP), 2 (success, --failures-only), 3 (refused, OTLP),
    /// 4 (success, OTLP, --no-stacks), 5 (success, --failures-only, connect metrics off:
    /// mode 2 against it is what the connect metrics cost), 6 (success inside published spans,
    /// OTLP: the cost of reading thread context, against mode 1), 7 (mode 2 with
    /// --no-drop-reasons: mode 2 against it is what the drop reasons cost), 8 and 9 (the
    /// success storm beside a stream of unrelated drops, --failures-only, with drop reasons
    /// and without).
    #[arg(long, value_name = "LIST", value_delimiter = ',', default_value = "1,2,3,4,5,6,7,8,9",
          value_parser = clap::value_parser!(u8).range(1..=9))]
    pub(crate) modes: Vec<u8>,

    /// Tools measured on the same storms, in the same pairs, instead of synspan: of
    /// bpftrace-count, bpftrace-seed, tcplife, tcpstates; `none` for none. They run in the
    /// pairs of the first mode of each storm (success, refused) that `--modes` names.
    #[arg(long, value_name = "LIST", value_delimiter = ',',
          default_value = "bpftrace-count,bpftrace-seed,tcplife,tcpstates", value_parser = peer_name)]
    peers: Vec<String>,

    /// Reruns of a pair disturbed by other load.
    #[arg(long, value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(0..=10))]
    pub(crate) retries: u32,

    /// Also measure the run time of synspan's kernel programs (BPF_ENABLE_STATS, for as
    /// long as the benchmark runs; it costs a few tens of ns per program run).
    #[arg(long)]
    pub(crate) bpf_stats: bool,

    /// More flags for every synspan run, split at spaces (e.g. "--export-queue-size 65536").
    #[arg(
        long = "synspan-args",
        value_name = "ARGS",
        default_value = "",
        allow_hyphen_values = true,
        hide_default_value = true
    )]
    synspan_args: String,

    /// Where to write the report [default: BENCHMARKS.md at the repository root].
    #[arg(long, value_name = "FILE", conflicts_with = "no_write")]
    out: Option<PathBuf>,

    /// Write no report.
    #[arg(long)]
    no_write: bool,
}

impl Args {
    pub(crate) fn synspan_args(&self) -> Vec<&str> {
        self.synspan_args.split_whitespace().collect()
    }

    /// The peers asked for, in order.
    pub(crate) fn peers(&self) -> Vec<&'static Peer> {
        self.peers.iter().filter_map(|name| Peer::by_name(name)).collect()
    }

    /// Whether the peers run in this mode's pairs: the first mode of its storm, of the plain
    /// success and refused storms.
    pub(crate) fn peers_run_in(&self, mode: &Mode) -> bool {
        [bench::SUCCESS, bench::REFUSED].contains(&mode.storm)
            && self
                .modes
                .iter()
                .map(|&id| Mode::by_id(usize::from(id)))
                .find(|m| m.storm == mode.storm)
                .is_some_and(|first| first.id == mode.id)
    }

    /// Where the report goes, if anywhere.
    pub(crate) fn report_path(&self) -> Option<PathBuf> {
        if self.no_write {
            return None;
        }
        Some(
            self.out
                .clone()
                .unwrap_or_else(|| repo_root().join("BENCHMARKS.md")),
        )
    }
}

fn peer_name(s: &str) -> Result<String, String> {
    if s == "none" || Peer::by_name(s).is_some() {
        Ok(s.to_string())
    } else {
        let names: Vec<&str> = PEERS.iter().map(|p| p.name).collect();
        Err(format!(
            "no such peer; the peers are {}, or none",
            names.join(", ")
        ))
    }
}

fn storm_seconds(s: &str) -> Result<f64, String> {
    let seconds: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if seconds > 0.0 && seconds <= 600.0 {
        Ok(seconds)
    } else {
        Err("must be more than 0 and at most 600".into())
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn command_line_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn defaults_and_bounds() {
        let a = Args::try_parse_from(["synspan-bench"]).unwrap();
        assert_eq!(
            (a.pairs, a.seconds, a.count, a.threads, a.retries),
            (3, 5.0, 5_000_000, 2, 2)
        );
        assert_eq!(a.modes, [1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(a.peers().len(), PEERS.len());
        // Success storms: mode 1 first; refused: mode 3. Modes 6, 8 and 9 have storms of
        // their own.
        let runs_peers: Vec<bool> = (1..=9).map(|id| a.peers_run_in(Mode::by_id(id))).collect();
        assert_eq!(
            runs_peers,
            [true, false, true, false, false, false, false, false, false]
        );
        assert!(a.synspan_args().is_empty());
        assert!(a.report_path().is_some_and(|p| p.ends_with("BENCHMARKS.md")));
        let a = Args::try_parse_from([
            "synspan-bench",
            "--modes",
            "3,1",
            "--synspan-args",
            "--export-queue-size 65536",
            "--no-write",
            "--peers",
            "none",
        ])
        .unwrap();
        assert_eq!(a.modes, [3, 1]);
        assert!(a.peers().is_empty());
        assert_eq!(a.synspan_args(), ["--export-queue-size", "65536"]);
        assert_eq!(a.report_path(), None);
        for bad in [
            &["--pairs", "0"][..],
            &["--seconds", "0"],
            &["--seconds", "601"],
            &["--modes", "10"],
            &["--threads", "0"],
            &["--retries", "11"],
            &["--peers", "perf"],
            &["--out", "x.md", "--no-write"],
        ] {
            let argv = std::iter::once("synspan-bench").chain(bad.iter().copied());
            assert!(Args::try_parse_from(argv).is_err(), "{bad:?} was accepted");
        }
    }
}
