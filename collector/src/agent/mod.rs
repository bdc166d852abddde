//! The agent, in the order an attempt passes through it: the kernel programs finish it, the
//! [`reader`] decodes it off the ring buffer, the [`enrichment`] worker makes it a span, the
//! sinks deliver it, and the accounting counts it. [`run`] is start, serve, shutdown.

mod enrichment;
mod reader;

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::{mpsc, oneshot},
    time::{Interval, MissedTickBehavior},
};

use self::{
    enrichment::{Finished, Setup},
    reader::Reader,
};
use crate::{
    btf::KernelBtf,
    config::{Cli, Settings, TraceContext},
    connect_metrics::ConnectMetrics,
    drop_reason::DropReasons,
    enrich::process::ReadOptions,
    kernel_layout,
    loader::{Filters, KernelObject, Limits, cgroup_id, lacking},
    otlp::Export,
    privilege,
    self_metrics::{SelfMetrics, Snapshot},
    sink::{
        Sinks, StdoutSink,
        otlp::{OtlpSettings, OtlpSink},
    },
    span::SpanBuilder,
    stats::{Accounting, AgentCounters},
};

/// The kernel wakes the agent only once 32 KiB of records wait (see `wakeup_flags` in the
/// kernel programs); below that, they are picked up at this interval.
const READ_INTERVAL: Duration = Duration::from_millis(50);

/// Destinations on the `--stats-interval` line of the busiest.
const BUSIEST: usize = 5;

/// How often processes that have exited are forgotten.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// Batches read per poll tick at most: the runtime has one thread, and the export task and
/// signals must get their turn under a storm too.
const MAX_BATCHES_PER_TICK: usize = 8;

/// Runs until SIGINT or SIGTERM. `export`: where spans and self-metrics go, their TLS files
/// read; `None` when nothing is exported.
pub(crate) async fn run(settings: Settings, export: Option<Export>) -> anyhow::Result<()> {
    let mut agent = Agent::start(&settings, export.as_ref())?;
    let stopped_by = agent.serve(&settings.flags).await?;
    agent.shutdown(stopped_by, &settings.flags).await
}

/// A running agent: the kernel object, the reader, and the worker behind it.
struct Agent {
    kernel: KernelObject,
    reader: Reader,
    finished: oneshot::Receiver<Finished>,
    counters: Arc<AgentCounters>,
    snapshot: Snapshot,
    self_metrics: Option<SelfMetrics>,
    /// `None` with `--metrics-max-series 0`.
    connect_metrics: Option<ConnectMetrics>,
    sigint: Signal,
    sigterm: Signal,
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// The allow-lists the flags name, cgroup paths resolved to their ids.
fn filters(cli: &Cli) -> anyhow::Result<Filters> {
    Ok(Filters {
        pids: cli.pids.clone(),
        cgroup_ids: cli
            .cgroups
            .iter()
            .map(|p| cgroup_id(p))
            .collect::<Result<_, _>>()?,
        ports: cli.dest_ports.clone(),
        dests: cli.dests.clone(),
    })
}

/// The span export queue and the self-metrics, on one OTLP client, when there is a collector.
fn start_export(
    cli: &Cli,
    export: Option<&Export>,
    counters: &Arc<AgentCounters>,
    snapshot: &Snapshot,
    connect_metrics: Option<&ConnectMetrics>,
) -> anyhow::Result<(Option<OtlpSink>, Option<SelfMetrics>)> {
    let Some(clients) = export.map(Export::connect).transpose()? else {
        return Ok((None, None));
    };
    let spans = OtlpSink::start(
        OtlpSettings {
            client: clients.traces.clone(),
            queue_size: cli.export_queue_size.get() as usize,
            batch_size: cli.export_batch_size as usize,
            retry_timeout: cli.export_retry_timeout,
        },
        counters.clone(),
    );
    let metrics = (!cli.metrics_interval.is_zero()).then(|| {
        SelfMetrics::start(
            clients.metrics.clone(),
            &host_name(),
            cli.metrics_interval,
            snapshot.clone(),
            connect_metrics.cloned(),
        )
    });
    Ok((Some(spans), metrics))
}

/// One consistent reading of every counter, also handed to the self-metrics, and the
/// kernel's connect series folded into the connect metrics.
fn report(
    kernel: &mut KernelObject,
    counters: &AgentCounters,
    snapshot: &Snapshot,
    connect_metrics: Option<&ConnectMetrics>,
) -> Accounting {
    if let Some(metrics) = connect_metrics {
        match kernel.connect_series() {
            Ok(reading) => metrics.fold(reading, |key| kernel.forget_series(key)),
            Err(err) => tracing::debug!("reading the connect series: {err}"),
        }
    }
    let counted = kernel.counters().unwrap_or_default();
    let accounting = Accounting::read(
        counted,
        kernel.recursion_misses(),
        kernel.in_flight().unwrap_or(0),
        counters,
    );
    *snapshot.lock().unwrap_or_else(|e| e.into_inner()) = accounting;
    accounting
}

fn ticker(every: Duration) -> Option<Interval> {
    (!every.is_zero()).then(|| {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
        tick
    })
}

impl Agent {
    /// Loads and attaches the programs, starts the sinks and the enrichment worker, and
    /// drops the privileges that are no longer needed.
    fn start(settings: &Settings, export: Option<&Export>) -> anyhow::Result<Self> {
        let cli = &settings.flags;
        privilege::check()?;
        // Mapped once: the layout reads struct members from it, and aya's parse of the same
        // bytes loads the programs and attaches the BTF tracepoints. The mapping goes with
        // the parse.
        let vmlinux = match &cli.kernel_btf {
            Some(path) => KernelBtf::open(path),
            None => KernelBtf::from_sys_fs(),
        };
        let resolved = kernel_layout::resolve(vmlinux.as_ref())?;
        let drop_reasons = match vmlinux.as_ref().map(KernelBtf::types) {
            _ if cli.no_drop_reasons => None,
            Ok(Ok(types)) => Some(DropReasons::from_btf(&types)),
            _ => Some(DropReasons::default()),
        };
        let btf = vmlinux.and_then(|vmlinux| vmlinux.for_aya());
        let mut policy = cli.policy(privilege::host_tgid().unwrap_or(0));
        if let Some(reasons) = &drop_reasons {
            policy.answered_reasons = reasons.answered();
        }
        if policy.agent_tgid == 0 {
            tracing::warn!(
                "not in the host's pid namespace: synspan's own connections are traced too, and \
                 processes will be hard to name (run with the host's pid namespace, hostPID)"
            );
        }
        let limits = Limits {
            max_in_flight: cli.max_in_flight.get(),
            ring_buffer_bytes: cli.ring_buffer_bytes,
            max_series: cli.metrics_max_series,
        };
        let mut kernel = KernelObject::load(&resolved, &policy, &limits, btf.as_ref().ok())?;
        kernel.set_filters(&filters(cli)?)?;
        let counters = Arc::new(AgentCounters::default());
        let snapshot: Snapshot = Default::default();
        let connect_metrics = (cli.metrics_max_series > 0)
            .then(|| ConnectMetrics::new(cli.metrics_max_series, cli.metrics_interval, &host_name()));
        let (otlp, self_metrics) = start_export(cli, export, &counters, &snapshot, connect_metrics.as_ref())?;
        let attempts = kernel.take_attempts()?;
        let notes = kernel.take_process_notes()?;
        let stacks = if cli.no_stacks {
            None
        } else {
            Some(kernel.take_stacks()?)
        };
        let thread_context_tls = match cli.trace_context {
            TraceContext::Off => None,
            TraceContext::Parent | TraceContext::Link => Some(kernel.take_thread_context_tls()?),
        };
        let sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let unattached = kernel.attach(
            &resolved,
            !cli.classic_tracepoints,
            drop_reasons.is_some(),
            btf.as_ref(),
            &cli.pretend_missing,
        )?;
        drop(btf);
        for (hook, why) in &unattached {
            tracing::warn!("not attached: {hook} ({why}); missing: {}", lacking(hook));
        }
        // aya's parse of the kernel's BTF is gone, the kernel's symbols come next (on the
        // worker's thread): one after the other, with the first handed back in between, they
        // never weigh on the heap together.
        // SAFETY: plain glibc call, no pointers.
        unsafe { libc::malloc_trim(0) };
        let (work, queue) = mpsc::channel(enrichment::MESSAGES);
        let backlog = enrichment::Backlog::default();
        let finished = enrichment::spawn(
            Setup {
                stacks,
                thread_context_tls,
                read: ReadOptions {
                    command_line: cli.capture_command_line,
                },
                nat: !cli.no_nat,
                nat_all: cli.nat_all,
                evidence_delay: cli.evidence_delay,
                spans: SpanBuilder::new(host_name()).with_trace_context(cli.trace_context),
                sinks: Sinks::new(settings.stdout.map(StdoutSink::new), otlp, counters.clone()),
                drop_reasons,
                backlog: backlog.clone(),
                metrics: connect_metrics.clone(),
            },
            queue,
        )?;
        let reader = Reader::new(attempts, notes, work, backlog.clone(), counters.clone())?;
        match privilege::drop_unneeded(!cli.no_nat) {
            Ok(()) => tracing::debug!("capabilities dropped; kept {:?}", privilege::KEPT),
            Err(err) => tracing::warn!("could not drop capabilities: {err}"),
        }
        for warning in export
            .into_iter()
            .flat_map(|e| [&e.traces.settings, &e.metrics.settings])
            .filter_map(crate::otlp::Settings::port_mismatch)
            .collect::<std::collections::BTreeSet<_>>()
        {
            tracing::warn!("{warning}");
        }
        tracing::info!(
            output = ?cli.output,
            otlp = export.map(|export| crate::otlp::redacted(&export.traces.settings.endpoint)),
            protocol = export.map(|export| export.traces.settings.protocol.name()),
            "synspan ready: tracing TCP connect attempts"
        );
        Ok(Self {
            kernel,
            reader,
            finished,
            counters,
            snapshot,
            self_metrics,
            connect_metrics,
            sigint,
            sigterm,
        })
    }

    fn report(&mut self) -> Accounting {
        report(
            &mut self.kernel,
            &self.counters,
            &self.snapshot,
            self.connect_metrics.as_ref(),
        )
    }

    /// Reads finished attempts until a signal; returns the signal's name.
    async fn serve(&mut self, cli: &Cli) -> anyhow::Result<&'static str> {
        let mut stats_tick = ticker(cli.stats_interval);
        let mut metrics_tick = self
            .self_metrics
            .as_ref()
            .and_then(|_| ticker(cli.metrics_interval));
        let mut read_tick = ticker(READ_INTERVAL).context("read interval")?;
        let mut sweep_tick = ticker(SWEEP_EVERY).context("sweep interval")?;
        let backlog = self.reader.backlog();
        loop {
            tokio::select! {
                guard = self.reader.notes.readable_mut() => {
                    guard.context("polling the process notes")?.clear_ready();
                    self.reader.read_notes();
                }
                guard = self.reader.attempts.readable_mut() => {
                    // Cleared before reading: a record that lands meanwhile wakes us again.
                    guard.context("polling the ring buffer")?.clear_ready();
                    self.reader.read_batches(MAX_BATCHES_PER_TICK);
                }
                // The worker took attempts from a full backlog: what waited in the ring.
                _ = backlog.room() => self.reader.read_batches(MAX_BATCHES_PER_TICK),
                _ = self.sigint.recv() => return Ok("SIGINT"),
                _ = self.sigterm.recv() => return Ok("SIGTERM"),
                _ = async { stats_tick.as_mut().unwrap().tick().await }, if stats_tick.is_some() => {
                    tracing::info!("stats: {}", self.report());
                    if let Some(metrics) = &self.connect_metrics {
                        tracing::info!("stats: busiest destinations: {}", metrics.busiest(BUSIEST));
                    }
                }
                _ = async { metrics_tick.as_mut().unwrap().tick().await }, if metrics_tick.is_some() => {
                    self.report();
                }
                _ = sweep_tick.tick() => {
                    self.reader.sweep();
                }
                _ = read_tick.tick() => self.reader.read_batches(MAX_BATCHES_PER_TICK),
            }
        }
    }

    /// Detaches, hands the worker what is left in the ring buffers, exports what is pending
    /// for at most `--shutdown-timeout`, and prints the final accounting.
    async fn shutdown(self, stopped_by: &str, cli: &Cli) -> anyhow::Result<()> {
        tracing::info!("{stopped_by}: stopping; a second signal exits at once");
        let Self {
            mut kernel,
            mut reader,
            finished,
            counters,
            snapshot,
            self_metrics,
            connect_metrics,
            mut sigint,
            mut sigterm,
        } = self;
        tokio::spawn(async move {
            tokio::select! {
                _ = sigint.recv() => {}
                _ = sigterm.recv() => {}
            }
            tracing::warn!("second signal: exiting without flushing");
            std::process::exit(130);
        });
        kernel.detach();
        if let Some(metrics) = &connect_metrics {
            metrics.last_reading();
        }
        // The programs are gone: whatever is in the ring buffer now is all there will be.
        let deadline = tokio::time::Instant::now() + cli.shutdown_timeout;
        let mut late = tokio::time::timeout_at(deadline, reader.drain()).await.is_err();
        if late {
            tracing::warn!("shutdown timeout: the ring buffer was not drained");
        }
        // Closing the queue lets the worker finish once it has emptied it.
        drop(reader);
        match tokio::time::timeout_at(deadline, finished).await {
            Ok(Ok(finished)) => {
                let missed = finished.evidence_missed;
                if missed != Default::default() {
                    tracing::info!(
                        "evidence lookups missed: rate_limited={} timed_out={} stalled={}",
                        missed.rate_limited,
                        missed.timed_out,
                        missed.stalled
                    );
                }
                finished
                    .sinks
                    .shutdown(deadline.saturating_duration_since(tokio::time::Instant::now()))
                    .await;
            }
            Ok(Err(_)) => {
                tracing::error!("the enrichment thread ended early");
                late = true;
            }
            Err(_) => {
                tracing::warn!(
                    "shutdown timeout: enrichment did not finish in {:?}",
                    cli.shutdown_timeout
                );
                late = true;
            }
        }
        if late {
            // What is neither exported nor dropped by now never will be.
            let unsettled = report(&mut kernel, &counters, &snapshot, connect_metrics.as_ref()).pending();
            AgentCounters::add(&counters.unflushed, unsettled);
        }
        let accounting = report(&mut kernel, &counters, &snapshot, connect_metrics.as_ref());
        tracing::info!("final: {accounting}");
        // The same counters for tools, on a line of their own outside the log format.
        eprintln!("{}", accounting.json_line());
        if let Some(metrics) = self_metrics {
            metrics.shutdown(cli.shutdown_timeout).await;
        }
        Ok(())
    }
}
