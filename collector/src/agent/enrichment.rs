//! The enrichment worker: turns decoded attempts into spans (the process, its stacks, the
//! evidence, the span itself) and hands them to the sinks. It runs on a thread of its own:
//! `/proc` reads, symbolization and evidence lookups can be slow, and the reader, the export
//! and the signals must never wait for them.

use std::{
    sync::{
        Arc,
        atomic::{
            AtomicBool, AtomicUsize,
            Ordering::{Relaxed, SeqCst},
        },
    },
    time::Duration,
};

use anyhow::Context as _;
use aya::maps::{MapData, StackTraceMap};
use synspan_shared::ProcessNote;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::{
    attempt::Attempt,
    connect_metrics::ConnectMetrics,
    drop_reason::DropReasons,
    enrich::{Enricher, process::ReadOptions},
    evidence::{Explainer, Missed},
    privilege,
    sink::Sinks,
    span::{ConnectSpan, SpanBuilder},
};

/// What the reader hands the worker, in the order it read it: a note can announce the
/// attempts that follow it. Attempts come in the batches they were read in: one hand-over
/// per batch, not per attempt, is what keeps the second thread from costing the reader more
/// than the work it takes off it.
pub(super) enum Work {
    /// Boxed: a note carries a stack of build ids, a KiB, and the queue holds many of the
    /// rest.
    Note(Box<ProcessNote>),
    Attempts(Vec<Attempt>),
    /// Forget processes that have exited.
    Sweep,
}

/// Attempts waiting for the worker. When this many wait, the reader stops reading and leaves
/// the rest in the kernel's ring buffer, which holds thousands more; what does not fit there
/// is dropped by the kernel before a record is written (`ringbuf_full`). Dropping there, not
/// here, costs no decode for an attempt that is lost anyway, and keeps what waits in the
/// agent's heap small: a decoded attempt is a few hundred bytes, so this is about 0.6 MiB.
pub(super) const QUEUE: usize = 2048;

/// Hand-overs waiting for the worker: batches of attempts, notes, sweeps. The attempts in
/// them are bounded by [`Backlog`]; this only bounds the messages. Past it the reader drops,
/// counted as `enrich_queue_full`.
pub(super) const MESSAGES: usize = 1024;

/// Attempts handed to the worker and not yet taken by it, shared by the two threads.
#[derive(Clone, Default)]
pub(super) struct Backlog(Arc<Waiting>);

#[derive(Default)]
struct Waiting {
    attempts: AtomicUsize,
    /// Set by a reader that found no room, so that the worker wakes it when it takes some.
    reader_waits: AtomicBool,
    room: Notify,
}

impl Backlog {
    /// Takes room for up to `n` more attempts within [`QUEUE`]; returns how many fit.
    pub(super) fn reserve(&self, n: usize) -> usize {
        let mut fit = 0;
        let _ = self.0.attempts.fetch_update(Relaxed, Relaxed, |waiting| {
            fit = n.min(QUEUE.saturating_sub(waiting));
            Some(waiting + fit)
        });
        fit
    }

    /// How many more attempts fit now. At none, the reader is woken by [`Backlog::room`]
    /// once the worker has taken some.
    pub(super) fn free(&self) -> usize {
        let free = || QUEUE.saturating_sub(self.0.attempts.load(SeqCst));
        if free() > 0 {
            return free();
        }
        self.0.reader_waits.store(true, SeqCst);
        // The worker may have taken attempts before it could see the flag: look again.
        free()
    }

    /// Ready once the worker has taken attempts from a backlog that had no room.
    pub(super) async fn room(&self) {
        self.0.room.notified().await;
    }

    /// Room for attempts the reader will wait for, past the bound (shutdown's drain).
    pub(super) fn force(&self, n: usize) {
        self.0.attempts.fetch_add(n, Relaxed);
    }

    pub(super) fn release(&self, n: usize) {
        self.0.attempts.fetch_sub(n, SeqCst);
        // A permit is kept when the reader is not waiting yet, so no wake-up is lost.
        if self.0.reader_waits.swap(false, SeqCst) {
            self.0.room.notify_one();
        }
    }
}

/// Attempts made into spans and handed to the sinks together: stacks are read from the
/// kernel's map once per batch, and stdout is flushed once.
const BATCH: usize = 1024;

/// What the worker leaves behind when the reader is done.
pub(super) struct Finished {
    pub(super) sinks: Sinks,
    pub(super) evidence_missed: Missed,
}

/// Everything the worker is made of that can be made on the agent's thread.
pub(super) struct Setup {
    pub(super) stacks: Option<StackTraceMap<MapData>>,
    /// `None` with `--trace-context off`.
    pub(super) thread_context_tls: Option<aya::maps::HashMap<MapData, u32, synspan_shared::ThreadContextTls>>,
    pub(super) read: ReadOptions,
    pub(super) nat: bool,
    pub(super) nat_all: bool,
    pub(super) evidence_delay: Duration,
    pub(super) spans: SpanBuilder,
    pub(super) sinks: Sinks,
    /// `None` with `--no-drop-reasons`.
    pub(super) drop_reasons: Option<DropReasons>,
    pub(super) backlog: Backlog,
    /// Told each process's service and each attempt made a span; `None` with the connect
    /// metrics off.
    pub(super) metrics: Option<ConnectMetrics>,
}

struct Worker {
    enricher: Enricher,
    drop_reasons: DropReasons,
    explainer: Explainer,
    spans: SpanBuilder,
    sinks: Sinks,
    backlog: Backlog,
    metrics: Option<ConnectMetrics>,
}

/// Starts the worker on its own thread and waits until it is ready. It runs until every
/// sender of `work` is gone and the queue is empty, then hands its sinks back.
///
/// The symbolizer cannot move between threads, so the enricher is made on the worker's
/// thread, which reads the kernel's symbols with the agent's start-up privileges and then
/// drops them for itself; capabilities belong to each thread.
pub(super) fn spawn(setup: Setup, work: mpsc::Receiver<Work>) -> anyhow::Result<oneshot::Receiver<Finished>> {
    let (done, finished) = oneshot::channel();
    let (ready, started) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("synspan-enrich".into())
        .spawn(move || {
            let worker = match Worker::new(setup) {
                Ok(worker) => worker,
                Err(err) => {
                    let _ = ready.send(Err(err));
                    return;
                }
            };
            let _ = ready.send(Ok(()));
            let _ = done.send(worker.run(work));
        })
        .context("starting the enrichment thread")?;
    started
        .recv()
        .context("the enrichment thread ended while starting")??;
    Ok(finished)
}

impl Worker {
    fn new(setup: Setup) -> anyhow::Result<Self> {
        let mut enricher = Enricher::new(setup.stacks, setup.read, setup.drop_reasons.is_some());
        if let Some(map) = setup.thread_context_tls {
            enricher.find_thread_contexts(map);
        }
        // Reading the symbol table left tens of MiB freed on the heap. Hand them back so the
        // agent's steady footprint is what it uses, not what it parsed.
        // SAFETY: plain glibc call, no pointers.
        unsafe { libc::malloc_trim(0) };
        if let Err(err) = privilege::drop_unneeded(setup.nat) {
            tracing::warn!("could not drop capabilities on the enrichment thread: {err}");
        }
        // Made after the drop: the lookup thread inherits this thread's capabilities.
        let explainer = Explainer::new(setup.nat, setup.nat_all, setup.evidence_delay)
            .context("starting the evidence lookup thread")?;
        Ok(Self {
            enricher,
            drop_reasons: setup.drop_reasons.unwrap_or_default(),
            explainer,
            spans: setup.spans,
            sinks: setup.sinks,
            backlog: setup.backlog,
            metrics: setup.metrics,
        })
    }

    fn run(mut self, mut work: mpsc::Receiver<Work>) -> Finished {
        let mut batch = Vec::with_capacity(BATCH);
        while let Some(first) = work.blocking_recv() {
            // Stacks are read from the kernel's map once per batch.
            self.enricher.new_batch();
            self.handle(first, &mut batch);
            while batch.len() < BATCH {
                let Ok(next) = work.try_recv() else { break };
                self.handle(next, &mut batch);
            }
            self.sinks.deliver(&mut batch);
        }
        tracing::info!("caches at exit: {}", self.enricher.cache_use());
        Finished {
            evidence_missed: self.explainer.missed(),
            sinks: self.sinks,
        }
    }

    fn handle(&mut self, work: Work, batch: &mut Vec<ConnectSpan>) {
        match work {
            Work::Note(note) => {
                self.enricher.on_note(&note);
                // Its fast successes may never become spans: the connect metrics learn its
                // service here, while it is alive for sure.
                if let Some(metrics) = &self.metrics
                    && let Some(process) = self.enricher.process(note.pid)
                {
                    let (service, resource) = self.spans.service(Some(&process), &process.info.exe_name);
                    metrics.service(note.pid, service, &resource);
                }
            }
            Work::Sweep => self.enricher.sweep(),
            Work::Attempts(attempts) => {
                self.backlog.release(attempts.len());
                for attempt in attempts {
                    self.make_span(attempt, batch);
                }
            }
        }
    }

    fn make_span(&mut self, mut attempt: Attempt, batch: &mut Vec<ConnectSpan>) {
        // An overloaded export costs no work per attempt: shed before the span is built.
        if self.sinks.full(batch.len()) {
            self.sinks.shed();
            return;
        }
        for drop in &mut attempt.drops {
            drop.reason_name = Some(self.drop_reasons.name(drop.reason));
            drop.function = self.enricher.kernel_function(drop.location);
        }
        let identity = self.enricher.identify(&attempt);
        let evidence = self.explainer.explain(&attempt, &identity);
        let span = self.spans.build(attempt, &identity, evidence);
        if let Some(metrics) = &self.metrics {
            metrics.exported(&span);
        }
        batch.push(span);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_reader_without_room_is_woken_when_the_worker_takes_attempts() {
        let backlog = Backlog::default();
        assert_eq!(backlog.reserve(QUEUE + 5), QUEUE, "the bound holds");
        assert_eq!(backlog.free(), 0);
        let worker = backlog.clone();
        std::thread::spawn(move || worker.release(100));
        tokio::time::timeout(Duration::from_secs(10), backlog.room())
            .await
            .expect("the worker's release wakes the reader");
        assert_eq!(backlog.free(), 100);
    }

    #[tokio::test]
    async fn a_release_before_the_reader_waits_is_not_lost() {
        let backlog = Backlog::default();
        backlog.reserve(QUEUE);
        assert_eq!(backlog.free(), 0);
        // The worker takes attempts before the reader starts to wait: the permit is kept.
        backlog.release(1);
        tokio::time::timeout(Duration::from_secs(10), backlog.room())
            .await
            .expect("the permit was kept");
    }
}
