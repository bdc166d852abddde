//! Where finished attempts go: stdout (console or JSON Lines) and OTLP.

pub mod console;
pub mod json;
pub mod otlp;
pub mod otlp_wire;

use std::io::{self, BufWriter, Stdout, Write};

use crate::{config::Output, span::ConnectSpan};

/// Console lines or JSON Lines on stdout, one per attempt, flushed once per batch.
pub struct StdoutSink {
    output: Output,
    out: BufWriter<Stdout>,
    line: Vec<u8>,
}

impl StdoutSink {
    pub fn new(output: Output) -> Option<Self> {
        (output != Output::None).then(|| Self {
            output,
            out: BufWriter::with_capacity(64 * 1024, io::stdout()),
            line: Vec::with_capacity(1024),
        })
    }

    pub fn write(&mut self, batch: &[ConnectSpan]) -> io::Result<()> {
        for span in batch {
            self.line.clear();
            match self.output {
                Output::Console => console::write_line(&mut self.line, span)?,
                Output::Json => json::write_line(&mut self.line, span)?,
                Output::None => continue,
            }
            self.out.write_all(&self.line)?;
        }
        self.out.flush()
    }
}
