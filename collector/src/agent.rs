//! The agent: load, attach, read finished attempts, hand them to the sinks, account for
//! every one, and shut down cleanly.

use std::sync::Arc;

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use synspan_shared::ProcessNote;
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};

use crate::{
    attempt::{Attempt, read_record},
    clock::WallClock,
    config::Cli,
    enrich::{Enricher, process::ReadOptions},
    evidence::Explainer,
    kernel_layout,
    loader::{Filters, Limits, Tracer, cgroup_id},
    privilege,
    self_metrics::{SelfMetrics, Snapshot},
    sink::{
        StdoutSink,
        otlp::{OtlpSettings, OtlpSink},
    },
    span::{ConnectSpan, SpanBuilder},
    stats::{Accounting, AgentCounters},
};

/// The kernel wakes the agent only once 32 KiB of records wait (see `wakeup_flags` in the
/// kernel programs); below that, they are picked up at this interval.
const READ_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);

/// How often processes that have exited are forgotten.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// Records handled per wake-up at most, so that a storm cannot starve signal handling.
const MAX_BATCH: usize = 4096;

/// Batches read per poll tick at most: the runtime has one thread, and the export task and
/// signals must get their turn under a storm too.
const MAX_BATCHES_PER_TICK: usize = 8;

/// Reads finished attempts and dispatches them.
struct Pipeline {
    clock: WallClock,
    enricher: Enricher,
    explainer: Explainer,
    spans: SpanBuilder,
    stdout: Option<StdoutSink>,
    otlp: Option<OtlpSink>,
    counters: Arc<AgentCounters>,
    batch: Vec<ConnectSpan>,
}

impl Pipeline {
    /// Reads up to `MAX_BATCH` records; returns how many were read.
    fn read(&mut self, ring: &mut RingBuf<MapData>) -> usize {
        let mut read = 0;
        self.enricher.new_batch();
        while read < MAX_BATCH {
            let Some(item) = ring.next() else { break };
            read += 1;
            let record = match read_record(&item) {
                Ok(record) => record,
                Err(err) => {
                    tracing::warn!("skipping a ring-buffer record: {err}");
                    AgentCounters::add(&self.counters.undecodable, 1);
                    continue;
                }
            };
            drop(item);
            self.clock.refresh(record.end_ns);
            if self.stdout.is_none()
                && let Some(otlp) = &mut self.otlp
                && otlp.room() <= self.batch.len()
            {
                otlp.shed(1);
                continue;
            }
            match Attempt::decode(&record, &self.clock) {
                Ok(attempt) => {
                    let identity = self.enricher.identify(&attempt);
                    let evidence = self.explainer.explain(&attempt, &identity);
                    self.batch.push(self.spans.build(attempt, &identity, evidence));
                }
                Err(err) => {
                    tracing::warn!("skipping an attempt: {err}");
                    AgentCounters::add(&self.counters.undecodable, 1);
                }
            }
        }
        AgentCounters::add(&self.counters.received, read as u64);
        read
    }

    /// Reads process notes: the kernel saw a process start an attempt, and it is alive now.
    fn read_notes(&mut self, notes: &mut RingBuf<MapData>) {
        while let Some(item) = notes.next() {
            if item.len() >= size_of::<ProcessNote>() {
                // SAFETY: ProcessNote is plain old data and the length was checked.
                let note = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<ProcessNote>()) };
                drop(item);
                self.enricher.on_note(&note);
            }
        }
    }

    fn dispatch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        if let Some(stdout) = &mut self.stdout {
            if let Err(err) = stdout.write(&self.batch) {
                tracing::error!("writing to stdout failed ({err}); no more output on stdout");
                self.stdout = None;
            } else if self.otlp.is_none() {
                AgentCounters::add(&self.counters.exported, self.batch.len() as u64);
            }
        }
        match &mut self.otlp {
            Some(otlp) => otlp.submit(std::mem::take(&mut self.batch)),
            None => {
                if self.stdout.is_none() {
                    // Nowhere to go: the output broke, and there is no collector.
                    AgentCounters::add(&self.counters.export_failed, self.batch.len() as u64);
                }
                self.batch.clear();
            }
        }
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    privilege::check()?;
    let resolved = kernel_layout::resolve()?;
    let policy = cli.policy();
    if policy.agent_tgid == 0 {
        tracing::warn!(
            "not in the host's pid namespace: synspan's own connections are traced too, and \
             processes will be hard to name (run with the host's pid namespace, hostPID)"
        );
    }
    let limits = Limits {
        max_in_flight: cli.max_in_flight.get(),
        ring_buffer_bytes: cli.ring_buffer_bytes,
    };
    let filters = Filters {
        pids: cli.pids.clone(),
        cgroup_ids: cli
            .cgroups
            .iter()
            .map(|p| cgroup_id(p))
            .collect::<Result<_, _>>()?,
        ports: cli.dest_ports.clone(),
        dests: cli.dests.clone(),
    };
    let mut tracer = Tracer::load(&resolved, &policy, &limits)?;
    tracer.set_filters(&filters)?;
    let counters = Arc::new(AgentCounters::default());
    let otlp = match &cli.otlp_endpoint {
        Some(endpoint) => Some(OtlpSink::start(
            OtlpSettings {
                endpoint: endpoint.clone(),
                tls: cli.tls.clone(),
                queue_size: cli.export_queue_size.get() as usize,
                batch_size: cli.export_batch_size as usize,
                retry_timeout: cli.export_retry_timeout,
            },
            counters.clone(),
        )?),
        None => None,
    };
    let snapshot: Snapshot = Default::default();
    let self_metrics = match &cli.otlp_endpoint {
        Some(endpoint) if !cli.metrics_interval.is_zero() => Some(SelfMetrics::start(
            endpoint,
            &cli.tls,
            &host_name(),
            cli.metrics_interval,
            snapshot.clone(),
        )?),
        _ => None,
    };
    let ring = tracer.take_attempts()?;
    let notes = tracer.take_process_notes()?;
    // SAFETY: as for the attempts below.
    let mut notes = unsafe { AsyncFd::register_with_interest(notes, Interest::READABLE) }
        .map_err(|err| anyhow::anyhow!("watching the process notes: {err}"))?;
    let stacks = if cli.no_stacks {
        None
    } else {
        Some(tracer.take_stacks()?)
    };
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let skipped = tracer.attach(&resolved, !cli.classic_tracepoints)?;
    for (hook, why) in &skipped {
        tracing::warn!("not attached: {hook} ({why}); spans will lack what it shows");
    }
    // Attaching parsed the kernel's BTF, the kernel's symbols come next: one after the
    // other, with the first handed back in between, they never weigh on the heap together.
    // SAFETY: plain glibc call, no pointers.
    unsafe { libc::malloc_trim(0) };
    let enricher = Enricher::new(
        stacks,
        ReadOptions {
            command_line: cli.capture_command_line,
        },
    );
    // SAFETY: the ring buffer owns its map fd and keeps it open, unchanged, for as long as
    // the AsyncFd owns the ring buffer.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|err| anyhow::anyhow!("watching the ring buffer: {err}"))?;
    let mut pipeline = Pipeline {
        clock: WallClock::sample(),
        enricher,
        explainer: Explainer::new(!cli.no_nat, cli.nat_all),
        spans: SpanBuilder::new(host_name()),
        stdout: StdoutSink::new(cli.output),
        otlp,
        counters: counters.clone(),
        batch: Vec::with_capacity(MAX_BATCH),
    };

    // Reading the symbol table left tens of MiB freed on the heap. Hand them back so the
    // agent's steady footprint is what it uses, not what it parsed.
    // SAFETY: plain glibc call, no pointers.
    unsafe { libc::malloc_trim(0) };
    match privilege::drop_unneeded(!cli.no_nat) {
        Ok(()) => tracing::debug!("capabilities dropped; kept {:?}", privilege::KEPT),
        Err(err) => tracing::warn!("could not drop capabilities: {err}"),
    }
    tracing::info!(
        output = ?cli.output,
        otlp = cli.otlp_endpoint.as_ref().map(crate::config::redacted),
        "synspan ready: tracing TCP connect attempts"
    );

    let ticker = |every: std::time::Duration| {
        (!every.is_zero()).then(|| {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            tick
        })
    };
    let mut stats_tick = ticker(cli.stats_interval);
    let mut read_tick = tokio::time::interval(READ_INTERVAL);
    read_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut sweep_tick = tokio::time::interval(SWEEP_EVERY);
    sweep_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut metrics_tick = self_metrics.as_ref().and_then(|_| ticker(cli.metrics_interval));
    let report = |tracer: &Tracer| -> Accounting {
        let kernel = tracer.counters().unwrap_or_default();
        let accounting = Accounting::read(
            kernel,
            tracer.skipped_runs(),
            tracer.in_flight().unwrap_or(0),
            &counters,
        );
        *snapshot.lock().unwrap_or_else(|e| e.into_inner()) = accounting;
        accounting
    };

    let signal_name = loop {
        tokio::select! {
            guard = notes.readable_mut() => {
                let mut guard = guard.context("polling the process notes")?;
                pipeline.read_notes(guard.get_inner_mut());
                guard.clear_ready();
            }
            guard = ring.readable_mut() => {
                let mut guard = guard.context("polling the ring buffer")?;
                // A note and the attempt it announces can arrive in one wake-up.
                pipeline.read_notes(notes.get_mut());
                let read = pipeline.read(guard.get_inner_mut());
                if read < MAX_BATCH {
                    guard.clear_ready();
                }
                pipeline.dispatch();
            }
            _ = sigint.recv() => break "SIGINT",
            _ = sigterm.recv() => break "SIGTERM",
            _ = async { stats_tick.as_mut().unwrap().tick().await }, if stats_tick.is_some() => {
                tracing::info!("stats: {}", report(&tracer));
            }
            _ = async { metrics_tick.as_mut().unwrap().tick().await }, if metrics_tick.is_some() => {
                report(&tracer);
            }
            _ = sweep_tick.tick() => pipeline.enricher.sweep(),
            _ = read_tick.tick() => {
                pipeline.read_notes(notes.get_mut());
                for _ in 0..MAX_BATCHES_PER_TICK {
                    if pipeline.read(ring.get_mut()) == 0 {
                        break;
                    }
                    pipeline.dispatch();
                }
            }
        }
    };

    tracing::info!("{signal_name}: stopping; a second signal exits at once");
    tokio::spawn(async move {
        tokio::select! {
            _ = sigint.recv() => {}
            _ = sigterm.recv() => {}
        }
        tracing::warn!("second signal: exiting without flushing");
        std::process::exit(130);
    });
    tracer.detach();
    // The programs are gone: whatever is in the ring buffer now is all there will be.
    pipeline.read_notes(notes.get_mut());
    while pipeline.read(ring.get_mut()) > 0 {
        pipeline.dispatch();
    }
    pipeline.dispatch();
    if let Some(otlp) = pipeline.otlp.take() {
        otlp.shutdown(cli.shutdown_timeout).await;
    }
    tracing::info!("final: {}", report(&tracer));
    if pipeline.explainer.skipped() > 0 {
        tracing::info!(
            "evidence lookups skipped for the rate limit: {}",
            pipeline.explainer.skipped()
        );
    }
    if let Some(metrics) = self_metrics {
        // The last reading goes out with the flush; the SDK blocks, so not on the runtime.
        let flush = tokio::task::spawn_blocking(move || metrics.shutdown());
        if tokio::time::timeout(cli.shutdown_timeout, flush).await.is_err() {
            tracing::warn!("self-metrics were not flushed within the shutdown timeout");
        }
    }
    Ok(())
}
