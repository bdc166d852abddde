//! Where finished attempts go: stdout (console or JSON Lines) and OTLP, and the rule for
//! what counts as exported.

pub(crate) mod console;
pub(crate) mod json;
pub(crate) mod otlp;
pub(crate) mod otlp_wire;

use std::{
    io::{self, BufWriter, Stdout, Write},
    sync::Arc,
    time::Duration,
};

use crate::{span::ConnectSpan, stats::AgentCounters};

/// How attempts are written on stdout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    /// One human-readable line per attempt.
    Console,
    /// One JSON object per attempt (JSON Lines).
    Json,
}

/// Console lines or JSON Lines on stdout, one per attempt, flushed once per batch.
pub(crate) struct StdoutSink {
    format: Format,
    out: BufWriter<Stdout>,
    line: Vec<u8>,
}

impl StdoutSink {
    pub(crate) fn new(format: Format) -> Self {
        Self {
            format,
            out: BufWriter::with_capacity(64 * 1024, io::stdout()),
            line: Vec::with_capacity(1024),
        }
    }

    pub(crate) fn write(&mut self, batch: &[ConnectSpan]) -> io::Result<()> {
        for span in batch {
            self.line.clear();
            match self.format {
                Format::Console => console::write_line(&mut self.line, span)?,
                Format::Json => json::write_line(&mut self.line, span)?,
            }
            self.out.write_all(&self.line)?;
        }
        self.out.flush()
    }
}

/// Every sink a finished attempt goes to. An attempt counts as exported once: when the
/// collector accepted it if there is one (the export task counts it then), else when it was
/// written to stdout.
pub(crate) struct Sinks {
    stdout: Option<StdoutSink>,
    otlp: Option<otlp::OtlpSink>,
    counters: Arc<AgentCounters>,
}

impl Sinks {
    pub(crate) fn new(
        stdout: Option<StdoutSink>,
        otlp: Option<otlp::OtlpSink>,
        counters: Arc<AgentCounters>,
    ) -> Self {
        Self {
            stdout,
            otlp,
            counters,
        }
    }

    /// Whether one more span would be dropped at a full export queue anyway. Only OTLP can
    /// be full; with stdout as well every attempt is still printed, so none is shed.
    pub(crate) fn full(&self, pending: usize) -> bool {
        self.stdout.is_none() && self.otlp.as_ref().is_some_and(|otlp| otlp.room() <= pending)
    }

    /// Counts an attempt dropped before its span was built because the export queue is full.
    pub(crate) fn shed(&mut self) {
        if let Some(otlp) = &mut self.otlp {
            otlp.shed(1);
        }
    }

    /// Hands a batch to every sink and empties it.
    pub(crate) fn deliver(&mut self, batch: &mut Vec<ConnectSpan>) {
        if batch.is_empty() {
            return;
        }
        if let Some(stdout) = &mut self.stdout {
            if let Err(err) = stdout.write(batch) {
                tracing::error!("writing to stdout failed ({err}); no more output on stdout");
                self.stdout = None;
            } else if self.otlp.is_none() {
                AgentCounters::add(&self.counters.exported, batch.len() as u64);
            }
        }
        match &mut self.otlp {
            Some(otlp) => otlp.submit(batch),
            None => {
                if self.stdout.is_none() {
                    // Nowhere to go: the output broke, and there is no collector.
                    AgentCounters::add(&self.counters.export_failed, batch.len() as u64);
                }
                batch.clear();
            }
        }
    }

    /// Exports what is queued, waiting at most `timeout`.
    pub(crate) async fn shutdown(self, timeout: Duration) {
        if let Some(otlp) = self.otlp {
            otlp.shutdown(timeout).await;
        }
    }
}
