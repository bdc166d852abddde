//! Accounting: every attempt the kernel saw is exported or counted under a named reason.

use std::{
    fmt,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
};

use crate::loader::KernelCounters;

/// Counters kept by the agent. Shared between the reader and the export task.
#[derive(Debug, Default)]
pub(crate) struct AgentCounters {
    /// Records read from the ring buffer.
    pub(crate) received: AtomicU64,
    /// Records that could not be decoded (an unknown address family).
    pub(crate) undecodable: AtomicU64,
    /// Attempts dropped because the enrichment worker was too far behind the reader.
    pub(crate) enrich_queue_full: AtomicU64,
    /// Spans handed to the OTLP export queue.
    pub(crate) submitted: AtomicU64,
    /// Spans delivered: accepted by the OTLP collector when exporting, else written to stdout.
    pub(crate) exported: AtomicU64,
    pub(crate) export_queue_full: AtomicU64,
    pub(crate) export_failed: AtomicU64,
    /// Spans still queued when the shutdown timeout ran out.
    pub(crate) unflushed: AtomicU64,
}

impl AgentCounters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }
}

/// One consistent reading of every counter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Accounting {
    pub(crate) kernel: KernelCounters,
    /// Runs of synspan's programs the kernel left out (see `KernelObject::recursion_misses`).
    pub(crate) recursion_misses: u64,
    pub(crate) in_flight: u64,
    pub(crate) received: u64,
    pub(crate) undecodable: u64,
    pub(crate) enrich_queue_full: u64,
    pub(crate) exported: u64,
    pub(crate) export_queue_full: u64,
    pub(crate) export_failed: u64,
    pub(crate) unflushed: u64,
}

impl Accounting {
    pub(crate) fn read(
        kernel: KernelCounters,
        recursion_misses: u64,
        in_flight: u64,
        agent: &AgentCounters,
    ) -> Self {
        Self {
            kernel,
            recursion_misses,
            in_flight,
            received: agent.received.load(Relaxed),
            undecodable: agent.undecodable.load(Relaxed),
            enrich_queue_full: agent.enrich_queue_full.load(Relaxed),
            exported: agent.exported.load(Relaxed),
            export_queue_full: agent.export_queue_full.load(Relaxed),
            export_failed: agent.export_failed.load(Relaxed),
            unflushed: agent.unflushed.load(Relaxed),
        }
    }

    /// Attempts pushed out of the in-flight map by newer ones before they finished.
    pub(crate) fn evicted(&self) -> u64 {
        let k = &self.kernel;
        k.started
            .saturating_sub(k.finished)
            .saturating_sub(self.in_flight)
            .saturating_sub(k.replaced)
    }

    /// Attempts the policy dropped: at SYN_SENT by an allow-list, or at the end by the
    /// success rules and sampling.
    pub(crate) fn filtered(&self) -> u64 {
        self.kernel.filtered + self.kernel.not_allowed
    }

    /// (reason, count) for every way an attempt can be dropped, under the names of the
    /// accounting line.
    pub(crate) fn drops(&self) -> [(&'static str, u64); 11] {
        let k = &self.kernel;
        [
            ("filtered", self.filtered()),
            ("rate_limited", k.rate_limited),
            ("ringbuf_full", k.ringbuf_full),
            ("evicted", self.evicted()),
            ("replaced", k.replaced),
            ("track_failed", k.track_failed),
            ("undecodable", self.undecodable),
            ("enrich_queue_full", self.enrich_queue_full),
            ("export_queue_full", self.export_queue_full),
            ("export_failed", self.export_failed),
            ("unflushed", self.unflushed),
        ]
    }

    /// Attempts that will never be exported, whatever the reason.
    pub(crate) fn dropped(&self) -> u64 {
        self.drops().iter().map(|(_, n)| n).sum()
    }

    /// Attempts the kernel saw enter SYN_SENT while synspan ran.
    pub(crate) fn seen(&self) -> u64 {
        self.kernel.started + self.kernel.track_failed + self.kernel.not_allowed
    }

    /// Every attempt the kernel saw is exported, in flight, dropped under a reason, or
    /// received and not yet settled by the exporter.
    pub(crate) fn pending(&self) -> u64 {
        let seen = self.seen();
        seen.saturating_sub(self.exported + self.dropped() + self.in_flight)
    }
}

/// The accounting under the names of the human line, the shape tools read:
/// `{"synspan_accounting":{"seen":…,…}}` on stderr at exit. A counter added to one must
/// be added to the other (the test below compares them).
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub(crate) struct AccountingLine {
    seen: u64,
    in_flight: u64,
    exported: u64,
    pending: u64,
    dropped: u64,
    filtered: u64,
    rate_limited: u64,
    ringbuf_full: u64,
    evicted: u64,
    replaced: u64,
    track_failed: u64,
    undecodable: u64,
    enrich_queue_full: u64,
    export_queue_full: u64,
    export_failed: u64,
    unflushed: u64,
    untracked_finish: u64,
    never_started: u64,
    kernel_skipped_runs: u64,
    packet_drops_matched: u64,
    packet_drops_unmatched: u64,
}

impl From<&Accounting> for AccountingLine {
    fn from(a: &Accounting) -> Self {
        let k = &a.kernel;
        Self {
            seen: a.seen(),
            in_flight: a.in_flight,
            exported: a.exported,
            pending: a.pending(),
            dropped: a.dropped(),
            filtered: a.filtered(),
            rate_limited: k.rate_limited,
            ringbuf_full: k.ringbuf_full,
            evicted: a.evicted(),
            replaced: k.replaced,
            track_failed: k.track_failed,
            undecodable: a.undecodable,
            enrich_queue_full: a.enrich_queue_full,
            export_queue_full: a.export_queue_full,
            export_failed: a.export_failed,
            unflushed: a.unflushed,
            untracked_finish: k.untracked_finish,
            never_started: k.never_started,
            kernel_skipped_runs: a.recursion_misses,
            packet_drops_matched: k.packet_drops_matched,
            packet_drops_unmatched: k.packet_drops_unmatched,
        }
    }
}

impl Accounting {
    /// One JSON object on one line, keyed `synspan_accounting` so that it is found among
    /// the log lines.
    pub(crate) fn json_line(&self) -> String {
        #[derive(serde::Serialize)]
        struct Keyed {
            synspan_accounting: AccountingLine,
        }
        serde_json::to_string(&Keyed {
            synspan_accounting: self.into(),
        })
        .expect("a struct of integers serializes")
    }
}

impl fmt::Display for Accounting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let k = &self.kernel;
        write!(
            f,
            "attempts seen={} in_flight={} exported={} pending={} dropped={} \
             (filtered={} rate_limited={} ringbuf_full={} evicted={} replaced={} track_failed={} \
             undecodable={} enrich_queue_full={} export_queue_full={} export_failed={} unflushed={}) \
             untracked_finish={} never_started={} kernel_skipped_runs={} \
             packet_drops_matched={} packet_drops_unmatched={}",
            self.seen(),
            self.in_flight,
            self.exported,
            self.pending(),
            self.dropped(),
            self.filtered(),
            k.rate_limited,
            k.ringbuf_full,
            self.evicted(),
            k.replaced,
            k.track_failed,
            self.undecodable,
            self.enrich_queue_full,
            self.export_queue_full,
            self.export_failed,
            self.unflushed,
            k.untracked_finish,
            k.never_started,
            self.recursion_misses,
            k.packet_drops_matched,
            k.packet_drops_unmatched,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_attempt_is_accounted_for() {
        let a = Accounting {
            kernel: KernelCounters {
                started: 100,
                finished: 95,
                filtered: 10,
                ringbuf_full: 5,
                replaced: 1,
                untracked_finish: 3,
                track_failed: 0,
                not_allowed: 4,
                never_started: 0,
                packet_drops_matched: 6,
                packet_drops_unmatched: 1,
                rate_limited: 7,
            },
            recursion_misses: 0,
            in_flight: 2,
            received: 80,
            undecodable: 0,
            enrich_queue_full: 2,
            exported: 63,
            export_queue_full: 4,
            export_failed: 3,
            unflushed: 1,
        };
        assert_eq!(a.evicted(), 2);
        assert_eq!(a.seen(), 104);
        assert_eq!(a.dropped(), 14 + 7 + 5 + 1 + 2 + 2 + 4 + 3 + 1);
        assert_eq!(a.pending(), 104 - 63 - 39 - 2);
        let line = a.to_string();
        assert!(line.contains("seen=104") && line.contains("evicted=2"), "{line}");
        let json: serde_json::Value = serde_json::from_str(&a.json_line()).unwrap();
        let books = &json["synspan_accounting"];
        assert_eq!(books["seen"], 104, "{json}");
        assert_eq!(books["dropped"], a.dropped(), "{json}");
        assert_eq!(books["pending"], a.pending(), "{json}");
        // Every counter of the human line, by the same name, and nothing else.
        let names: Vec<&str> = line
            .split([' ', '(', ')'])
            .filter_map(|kv| Some(kv.split_once('=')?.0))
            .collect();
        assert_eq!(names.len(), books.as_object().unwrap().len(), "{line} vs {json}");
        for name in names {
            assert!(books[name].is_u64(), "{name} missing from {json}");
        }
    }
}
