//! The ring-buffer reader: decodes finished attempts and process notes and hands them to the
//! enrichment worker without ever waiting for it. It runs on the runtime that also drives the
//! export and the signals, so nothing here may block.

use std::{sync::Arc, time::Instant};

use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::mpsc::{self, error::TrySendError},
};

use super::enrichment::{Backlog, MESSAGES, Work};
use crate::{
    attempt::{Attempt, read_record},
    clock::WallClock,
    stats::AgentCounters,
};

/// Records handled per wake-up at most, so that a storm cannot starve signal handling.
pub(super) const MAX_BATCH: usize = 1024;

/// At most one "enrichment is behind" warning this often.
const WARN_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

pub(super) struct Reader {
    pub(super) attempts: AsyncFd<RingBuf<MapData>>,
    pub(super) notes: AsyncFd<RingBuf<MapData>>,
    clock: WallClock,
    work: mpsc::Sender<Work>,
    backlog: Backlog,
    counters: Arc<AgentCounters>,
    last_full_warning: Option<Instant>,
}

impl Reader {
    pub(super) fn new(
        attempts: RingBuf<MapData>,
        notes: RingBuf<MapData>,
        work: mpsc::Sender<Work>,
        backlog: Backlog,
        counters: Arc<AgentCounters>,
    ) -> anyhow::Result<Self> {
        // SAFETY: each ring buffer owns its map fd and keeps it open, unchanged, for as long
        // as the AsyncFd owns the ring buffer.
        let attempts = unsafe { AsyncFd::register_with_interest(attempts, Interest::READABLE) }
            .map_err(|err| anyhow::anyhow!("watching the ring buffer: {err}"))?;
        // SAFETY: as above.
        let notes = unsafe { AsyncFd::register_with_interest(notes, Interest::READABLE) }
            .map_err(|err| anyhow::anyhow!("watching the process notes: {err}"))?;
        Ok(Self {
            attempts,
            notes,
            clock: WallClock::sample(),
            work,
            counters,
            last_full_warning: None,
            backlog,
        })
    }

    /// Reads process notes: the kernel saw a process start an attempt, and it is alive now.
    /// A note that does not fit is only a missed early look at the process: its attempts
    /// still go out, identified when they are enriched.
    pub(super) fn read_notes(&mut self) {
        while let Some(item) = self.notes.get_mut().next() {
            let Some(note) = crate::enrich::read_note(&item) else {
                continue;
            };
            drop(item);
            if self.work.try_send(Work::Note(Box::new(note))).is_err() {
                tracing::debug!(pid = note.pid, "process note dropped: enrichment is behind");
            }
        }
    }

    /// Up to `limit` decoded attempts, and how many records that took.
    fn next_batch(&mut self, limit: usize) -> (Vec<Attempt>, usize) {
        let mut read = 0;
        let mut attempts = Vec::new();
        while read < limit {
            let Some(attempt) = self.next_attempt(&mut read) else {
                break;
            };
            attempts.push(attempt);
        }
        AgentCounters::add(&self.counters.received, read as u64);
        (attempts, read)
    }

    /// Reads up to `MAX_BATCH` finished attempts, as many as the worker has room for, and
    /// hands them over in one batch; returns how many records were read. With no room it
    /// reads nothing: the records wait in the ring buffer, and [`Backlog::room`] says when to
    /// come back.
    pub(super) fn read_attempts(&mut self) -> usize {
        let free = self.backlog.free();
        if free == 0 {
            return 0;
        }
        let (mut attempts, read) = self.next_batch(free.min(MAX_BATCH));
        let decoded = attempts.len();
        let fit = self.backlog.reserve(decoded);
        attempts.truncate(fit);
        let mut behind = decoded - fit;
        if fit > 0
            && let Err(TrySendError::Full(work) | TrySendError::Closed(work)) =
                self.work.try_send(Work::Attempts(attempts))
        {
            self.backlog.release(fit);
            behind += fit;
            drop(work);
        }
        if behind > 0 {
            self.enrichment_behind(behind as u64);
        }
        read
    }

    /// Notes, then up to `batches` batches of attempts: as many as wait, within a bound.
    pub(super) fn read_batches(&mut self, batches: usize) {
        self.read_notes();
        for _ in 0..batches {
            if self.read_attempts() < MAX_BATCH {
                break;
            }
        }
    }

    /// What waits for the worker; [`Backlog::room`] says when the reader may read again.
    pub(super) fn backlog(&self) -> Backlog {
        self.backlog.clone()
    }

    /// Asks the worker to forget processes that have exited; a sweep that does not fit now
    /// is made at the next one.
    pub(super) fn sweep(&self) {
        let _ = self.work.try_send(Work::Sweep);
    }

    /// After the programs are detached: everything left in the rings, waiting for the
    /// enrichment worker where it is behind instead of dropping.
    pub(super) async fn drain(&mut self) {
        self.read_notes();
        loop {
            let (attempts, read) = self.next_batch(MAX_BATCH);
            if read == 0 {
                break;
            }
            let n = attempts.len();
            self.backlog.force(n);
            if n > 0 && self.work.send(Work::Attempts(attempts)).await.is_err() {
                AgentCounters::add(&self.counters.enrich_queue_full, n as u64);
            }
        }
    }

    /// The next decodable attempt, counting every record read and every one that is not.
    fn next_attempt(&mut self, read: &mut usize) -> Option<Attempt> {
        loop {
            let item = self.attempts.get_mut().next()?;
            *read += 1;
            let decoded = read_record(&item).map(|record| {
                drop(item);
                self.clock.refresh(record.end_ns);
                Attempt::decode(&record, &self.clock)
            });
            match decoded {
                Ok(Ok(attempt)) => return Some(attempt),
                Ok(Err(err)) | Err(err) => {
                    tracing::warn!("skipping a ring-buffer record: {err}");
                    AgentCounters::add(&self.counters.undecodable, 1);
                }
            }
        }
    }

    fn enrichment_behind(&mut self, n: u64) {
        AgentCounters::add(&self.counters.enrich_queue_full, n);
        if self.last_full_warning.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
            self.last_full_warning = Some(Instant::now());
            tracing::warn!(
                dropped = n,
                "enrichment is {} hand-overs behind the kernel: dropping attempts (counted as \
                 enrich_queue_full); /proc or symbol reads are slow on this host",
                MESSAGES
            );
        }
    }
}
