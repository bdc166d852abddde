//! Whether a B run accounted for every attempt: synspan's books, the receiver, the storm.

use crate::{mode::Mode, runner::Run};

/// The accounting checks of one traced run.
pub(crate) struct Exactness {
    /// synspan's own books: seen = exported + dropped, nothing pending or in flight.
    pub(crate) books: bool,
    /// The receiver got exactly what synspan counted as exported.
    pub(crate) receiver: bool,
    /// Every storm attempt was seen, and is exported or among the counted drops (with
    /// --failures-only: filtered in the kernel, none exported).
    pub(crate) storm: bool,
    /// made = exported + counted drops, as the issue puts it; off by the host's other
    /// attempts.
    pub(crate) made_equals_settled: bool,
    pub(crate) notes: Vec<String>,
}

impl Exactness {
    pub(crate) fn exact(&self) -> bool {
        self.books && self.receiver && self.storm
    }
}

/// `None` for an A run.
pub(crate) fn exactness(mode: &Mode, run: &Run) -> Option<Exactness> {
    let t = run.agent.as_ref()?;
    let made = run.storm.attempts;
    let seen = t.seen();
    let books = seen == t.settled() && t.get("pending") == 0 && t.get("in_flight") == 0;
    let receiver = t.received.total == t.get("exported");
    let storm = seen >= made
        && if mode.failures_only() {
            // Every storm attempt is a fast, unretried success: filtered, none exported.
            t.received.storm == 0 && t.get("filtered") >= made
        } else {
            // Attempts of the storm that did not arrive must be among the counted drops.
            t.received.storm <= made && made - t.received.storm <= t.get("dropped")
        };
    let mut notes = Vec::new();
    if seen != made {
        let others = t.received.total - t.received.storm - t.received.synspan;
        notes.push(format!(
            "synspan saw {:+} attempt(s) besides the storm's: {} exported from synspan's own pid (its \
             OTLP connection), {} exported from other processes of the host, the rest filtered or dropped",
            seen as i64 - made as i64,
            t.received.synspan,
            others
        ));
    }
    for key in [
        "rate_limited",
        "ringbuf_full",
        "evicted",
        "replaced",
        "track_failed",
        "undecodable",
        "export_queue_full",
        "export_failed",
        "unflushed",
        "untracked_finish",
    ] {
        if t.get(key) > 0 {
            notes.push(format!("{key}={}", t.get(key)));
        }
    }
    if t.recursion_misses() > 0 {
        let progs: Vec<String> = t
            .progs
            .iter()
            .filter(|p| p.recursion_misses > 0)
            .map(|p| format!("{} {}", p.name, p.recursion_misses))
            .collect();
        notes.push(format!(
            "the kernel skipped synspan's programs {} time(s) (recursion misses: {}); synspan counts them \
             as kernel_skipped_runs, without knowing which attempts they cost",
            t.recursion_misses(),
            progs.join(", ")
        ));
    }
    if !books {
        notes.push(format!(
            "books do not balance: seen={seen} exported={} dropped={} pending={} in_flight={}",
            t.get("exported"),
            t.get("dropped"),
            t.get("pending"),
            t.get("in_flight")
        ));
    }
    Some(Exactness {
        books,
        receiver,
        storm,
        made_equals_settled: made == t.settled(),
        notes,
    })
}

#[cfg(test)]
mod tests {
    use synspan_testbed::bench::StormReport;

    use super::*;
    use crate::{mode::MODES, runner::AgentRun};

    fn run(made: u64, counters: &[(&str, u64)], received_storm: u64, received: u64) -> Run {
        Run {
            mode: 1,
            pair: 1,
            storm: StormReport {
                attempts: made,
                ..Default::default()
            },
            storm_cpu_s: 0.0,
            host: Default::default(),
            agent: Some(AgentRun {
                accounting: counters.iter().map(|&(k, v)| (k.to_string(), v)).collect(),
                received: crate::runner::Received {
                    total: received,
                    storm: received_storm,
                    synspan: received - received_storm,
                },
                ..Default::default()
            }),
            peer: None,
        }
    }

    #[test]
    fn balanced_books_are_exact() {
        // synspan's own OTLP connection is one attempt more than the storm's.
        let r = run(100, &[("seen", 101), ("exported", 91), ("dropped", 10)], 90, 91);
        let e = exactness(&MODES[0], &r).unwrap();
        assert!(e.exact() && !e.made_equals_settled, "{:?}", e.notes);
        assert_eq!(e.notes.len(), 1, "{:?}", e.notes);
    }

    #[test]
    fn an_uncounted_loss_is_not_exact() {
        // synspan counted 100 exported; 5 never reached the receiver and are counted nowhere.
        let r = run(100, &[("seen", 100), ("exported", 100)], 95, 95);
        let e = exactness(&MODES[0], &r).unwrap();
        assert!(e.books && !e.receiver && !e.storm && !e.exact());
        let r = run(100, &[("seen", 100), ("exported", 95), ("pending", 5)], 95, 95);
        let e = exactness(&MODES[0], &r).unwrap();
        assert!(!e.books, "{:?}", e.notes);
        assert!(
            e.notes.iter().any(|n| n.contains("books do not balance")),
            "{:?}",
            e.notes
        );
    }

    #[test]
    fn failures_only_must_filter_every_storm_attempt() {
        let r = run(100, &[("seen", 100), ("dropped", 100), ("filtered", 100)], 0, 0);
        assert!(exactness(&MODES[1], &r).unwrap().exact());
        let r = run(
            100,
            &[("seen", 100), ("exported", 1), ("dropped", 99), ("filtered", 99)],
            1,
            1,
        );
        assert!(!exactness(&MODES[1], &r).unwrap().exact());
    }
}
