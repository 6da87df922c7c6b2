//! The live view of a target trace in a terminal: the table redrawn in place about once a
//! second with the most recent drops under it, and the final table with the diagnosis.

use std::{
    collections::VecDeque,
    io::{self, Write as _},
    sync::{Arc, Mutex, PoisonError},
};

use super::{
    Sink, table,
    terminal::{terminal_size, truncate, wrap},
    text::{TextLine, text_fields},
};
use crate::{
    aggregate::{
        Summary,
        target_summary::{BackendRow, TargetSummary},
    },
    enrich::record::DropRecord,
};

/// The live table on stdout: redrawn in place, then replaced by the final table.
#[derive(Default)]
pub struct LiveTable {
    /// Recent drops as text, filled by a [`RecentSink`].
    recent: Arc<Mutex<VecDeque<TextLine>>>,
    /// Whether the table has been drawn (the first frame clears the screen).
    drawn: bool,
}

impl LiveTable {
    /// The sink that keeps the recent drops this table shows.
    pub fn recent_sink(&self) -> RecentSink {
        RecentSink::new(self.recent.clone())
    }

    /// Redraws the live table in the terminal, with the most recent drops under it, in place:
    /// the cursor goes home, each line erases what the previous frame left on it, and the frame
    /// ends by erasing below itself. The frame fits the terminal (see [`live_frame`]), so
    /// it never scrolls and leaves no copies of itself behind.
    pub fn redraw(&mut self, s: &TargetSummary) -> io::Result<()> {
        let (width, height) = terminal_size().unwrap_or((80, 24));
        let frame = {
            let recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
            live_frame(s, &recent, width, height)
        };
        let mut buf = String::from(if self.drawn { "\x1b[H" } else { "\x1b[H\x1b[2J" });
        self.drawn = true;
        for line in frame {
            buf.push_str(&line);
            buf.push_str("\x1b[K\n");
        }
        buf.push_str("\x1b[J");
        let mut out = io::stdout().lock();
        out.write_all(buf.as_bytes())?;
        out.flush()
    }

    /// The final table and the diagnosis, replacing the live table; it stays on screen.
    pub fn final_text(&self, s: &TargetSummary) -> String {
        let width = terminal_size().map(|(w, _)| w);
        let mut t = String::from("\x1b[H\x1b[J");
        for line in final_text(s, width) {
            t.push_str(&line);
            t.push('\n');
        }
        t
    }
}

/// Keeps the last drops as text lines, for the live table to show under it.
pub struct RecentSink {
    lines: Arc<Mutex<VecDeque<TextLine>>>,
}

/// How many recent drops the live table shows.
pub const RECENT: usize = 8;

impl RecentSink {
    pub fn new(lines: Arc<Mutex<VecDeque<TextLine>>>) -> Self {
        Self { lines }
    }
}

impl Sink for RecentSink {
    fn on_drop(&mut self, drop: &DropRecord) -> io::Result<()> {
        let mut l = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        if l.len() == RECENT {
            l.pop_front();
        }
        l.push_back(text_fields(drop));
        Ok(())
    }

    fn on_summary(&mut self, _: &Summary) -> io::Result<()> {
        Ok(())
    }

    fn on_target_summary(&mut self, _: &TargetSummary) -> io::Result<()> {
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The live view of a target trace in a `width`×`height` terminal: the table, then the most
/// recent drops. Every line fits `width` and there are at most `height - 1` lines, so drawing
/// it never scrolls the terminal and the next frame replaces it in place. When it is too tall,
/// the recent drops give way first, then the backends with the fewest drops (a line says how
/// many are not shown).
pub fn live_frame(s: &TargetSummary, recent: &VecDeque<TextLine>, width: usize, height: usize) -> Vec<String> {
    let budget = height.saturating_sub(1).max(1);
    let mut table: Vec<String> = table::render(s).lines().map(String::from).collect();
    if table.len() > budget && !s.backends.is_empty() {
        let fixed = table.len() - s.backends.len();
        // Room for the backends kept and the line that counts the others.
        let room = budget.saturating_sub(fixed + 1);
        let mut order: Vec<usize> = (0..s.backends.len()).collect();
        order.sort_by(|a, b| s.backends[*b].drops.cmp(&s.backends[*a].drops));
        let mut shown: Vec<usize> = order.into_iter().take(room).collect();
        shown.sort_unstable();
        let mut trimmed = s.clone();
        trimmed.backends = shown.iter().map(|i| s.backends[*i].clone()).collect();
        trimmed.detail = None;
        let hidden: Vec<&BackendRow> = s
            .backends
            .iter()
            .enumerate()
            .filter(|(i, _)| !shown.contains(i))
            .map(|(_, b)| b)
            .collect();
        let with_drops = hidden.iter().filter(|b| b.drops > 0).count();
        table = table::render(&trimmed).lines().map(String::from).collect();
        table.push(format!(
            "... {} more backends ({with_drops} with drops; a taller terminal or -o json shows them)",
            hidden.len()
        ));
    }
    let mut frame: Vec<String> = table.iter().map(|l| truncate(l.trim_end(), width)).collect();
    // A blank line and a title before the drops, and at least one of them.
    let room = budget.saturating_sub(frame.len());
    if !recent.is_empty() && room >= 3 {
        let n = recent.len().min(room - 2);
        frame.push(String::new());
        frame.push(truncate(&format!("most recent drops (of the last {RECENT}):"), width));
        for l in recent.iter().skip(recent.len() - n) {
            frame.push(format!("  {}", l.fit(Some(width.saturating_sub(2)))));
        }
    }
    frame.truncate(budget);
    frame
}

/// The final table and the diagnosis for a terminal `width` columns wide (`None`: whole lines):
/// table rows cut to fit, the diagnosis's prose wrapped.
pub fn final_text(s: &TargetSummary, width: Option<usize>) -> Vec<String> {
    let mut out: Vec<String> = table::render(s)
        .lines()
        .map(str::trim_end)
        .map(|l| width.map_or_else(|| l.to_string(), |w| truncate(l, w)))
        .collect();
    out.push(String::new());
    for line in &s.diagnosis {
        out.extend(wrap(line, width));
    }
    out
}
