//! JSON lines: one object per drop, per summary; the field names are the schema.

use std::io::{self, Write};

use super::Sink;
use crate::{
    aggregate::{Summary, target_summary::TargetSummary},
    enrich::record::DropRecord,
};

/// JSON lines: `{"type":"drop",...}` and `{"type":"summary",...}`.
pub struct JsonSink<W: Write + Send> {
    out: W,
}

impl<W: Write + Send> JsonSink<W> {
    pub fn new(out: W) -> Self {
        Self { out }
    }
}

impl<W: Write + Send> Sink for JsonSink<W> {
    fn on_drop(&mut self, drop: &DropRecord) -> io::Result<()> {
        serde_json::to_writer(&mut self.out, drop)?;
        self.out.write_all(b"\n")
    }

    fn on_target_summary(&mut self, summary: &TargetSummary) -> io::Result<()> {
        serde_json::to_writer(&mut self.out, summary)?;
        self.out.write_all(b"\n")?;
        self.out.flush()
    }

    fn on_summary(&mut self, summary: &Summary) -> io::Result<()> {
        serde_json::to_writer(&mut self.out, summary)?;
        self.out.write_all(b"\n")?;
        self.out.flush()
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}
