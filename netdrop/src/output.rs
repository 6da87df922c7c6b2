//! Output sinks. One event pipeline feeds any number of sinks: the terminal, JSON lines, and
//! (next) the agent's metrics and the capture file.

use std::io::{self, Write};

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
};

use crate::{aggregate::Summary, event::DropRecord, svc::SvcSummary};

/// Keeps the last drops as text lines, for the live table to show under it.
pub struct RecentSink {
    lines: Arc<Mutex<VecDeque<String>>>,
}

/// How many recent drops the live table shows.
pub const RECENT: usize = 8;

impl RecentSink {
    pub fn new(lines: Arc<Mutex<VecDeque<String>>>) -> Self {
        Self { lines }
    }
}

impl Sink for RecentSink {
    fn on_drop(&mut self, drop: &DropRecord) -> io::Result<()> {
        let mut l = self.lines.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if l.len() == RECENT {
            l.pop_front();
        }
        l.push_back(text_line(drop));
        Ok(())
    }

    fn on_summary(&mut self, _: &Summary) -> io::Result<()> {
        Ok(())
    }

    fn on_target_summary(&mut self, _: &SvcSummary) -> io::Result<()> {
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Receives what the pipeline produces.
pub trait Sink: Send {
    fn on_drop(&mut self, drop: &DropRecord) -> io::Result<()>;
    fn on_summary(&mut self, summary: &Summary) -> io::Result<()>;
    /// A `--svc`/`--pod`/`--node` summary (periodic and final).
    fn on_target_summary(&mut self, summary: &SvcSummary) -> io::Result<()>;
    /// Called after each batch of events: a sink that buffers writes them out here.
    fn flush(&mut self) -> io::Result<()>;
}

/// `-o text|json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A readable line per drop and a table at the end.
    Text,
    /// One JSON object per line.
    Json,
}

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

    fn on_target_summary(&mut self, summary: &SvcSummary) -> io::Result<()> {
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

/// Human-readable lines.
pub struct TextSink<W: Write + Send> {
    out: W,
    header_done: bool,
}

impl<W: Write + Send> TextSink<W> {
    pub fn new(out: W) -> Self {
        Self { out, header_done: false }
    }
}

/// `10.0.0.1:53`, `[fd00::1]:53`, `10.0.0.1`.
pub fn endpoint(e: Option<&crate::event::Endpoint>) -> String {
    match e {
        None => "-".into(),
        Some(e) => match (e.ip, e.port) {
            (std::net::IpAddr::V6(ip), Some(p)) => format!("[{ip}]:{p}"),
            (ip, Some(p)) => format!("{ip}:{p}"),
            (ip, None) => ip.to_string(),
        },
    }
}

/// One line per drop: time, reason, protocol, src → dst, detail, interface, location.
pub fn text_line(d: &DropRecord) -> String {
    // RFC 3339 "2026-11-26T10:21:33.123456789Z" → "10:21:33.123456"
    let time = d.time.get(11..26).unwrap_or(&d.time);
    let mut detail = String::new();
    if let Some(f) = &d.tcp_flags {
        detail = format!(" [{f}]");
    } else if let Some(i) = d.icmp {
        detail = format!(" [type {} code {}]", i.kind, i.code);
    }
    if d.classification != d.reason.to_ascii_lowercase() {
        let mark = if d.certainty == crate::classify::Certainty::Inferred { "?" } else { "" };
        detail.push_str(&format!(" ({}{mark})", d.classification));
    }
    if let Some(o) = &d.orig_dst {
        detail.push_str(&format!(" orig-dst={}", endpoint(Some(o))));
    }
    if let Some(o) = &d.orig_src {
        detail.push_str(&format!(" orig-src={}", endpoint(Some(o))));
    }
    let iface = if d.ifname.is_empty() { "-".to_string() } else { d.ifname.clone() };
    format!(
        "{time} {:<16} {:<6} {} → {}{detail}  if={iface} netns={}  at {}",
        d.reason,
        d.protocol,
        endpoint(d.src.as_ref()),
        endpoint(d.dst.as_ref()),
        d.netns,
        d.location
    )
}

impl<W: Write + Send> Sink for TextSink<W> {
    fn on_target_summary(&mut self, s: &SvcSummary) -> io::Result<()> {
        writeln!(self.out)?;
        write!(self.out, "{}", crate::svc::render(s))?;
        if s.is_final {
            for line in &s.diagnosis {
                writeln!(self.out, "diagnosis: {line}")?;
            }
            if let Some(d) = &s.detail {
                self.on_summary(d)?;
            }
        }
        self.out.flush()
    }

    fn on_drop(&mut self, drop: &DropRecord) -> io::Result<()> {
        if !self.header_done {
            writeln!(self.out, "TIME            REASON           PROTO  SOURCE → DESTINATION")?;
            self.header_done = true;
        }
        writeln!(self.out, "{}", text_line(drop))
    }

    fn on_summary(&mut self, s: &Summary) -> io::Result<()> {
        let o = &mut self.out;
        writeln!(o)?;
        writeln!(o, "--- netdrop summary: {:.1} s on {} via {} ---", s.duration_s, s.node, s.hook)?;
        if s.drops_total == 0 {
            writeln!(o, "no drops matched")?;
        } else {
            writeln!(o, "{:>10}  {:<20} {:<26} {:<5} {:<12} LOCATION", "COUNT", "REASON", "CLASSIFICATION", "IP", "NETNS")?;
            for r in s.drops.iter().filter(|r| !r.hidden).take(20) {
                let class = match r.certainty {
                    crate::classify::Certainty::Exact => r.classification.clone(),
                    crate::classify::Certainty::Inferred => format!("{} (inferred)", r.classification),
                };
                writeln!(o, "{:>10}  {:<20} {:<26} {:<5} {:<12} {}", r.count, r.reason, class, r.ip, r.netns, r.location)?;
            }
            let rows = s.drops.iter().filter(|r| !r.hidden).count();
            if rows > 20 {
                writeln!(o, "  ... {} more rows (-o json has them all)", rows - 20)?;
            }
            writeln!(o, "{:>10}  total", s.drops_total)?;
        }
        if s.hidden_drops > 0 {
            let parts: Vec<String> = s.hidden_by_reason.iter().map(|(r, n)| format!("{r} {n}")).collect();
            writeln!(o, "hidden (benign or not selected; --all-reasons shows them): {} ({})", s.hidden_drops, parts.join(", "))?;
        }
        for c in &s.conntrack {
            writeln!(
                o,
                "conntrack netns {}: {}/{} entries; over the run: insert_failed +{} ({:.0}/s), drop +{}, early_drop +{}, invalid +{}, clash_resolve +{}",
                c.netns, c.count, c.max, c.insert_failed, c.insert_failed_per_s, c.drop, c.early_drop, c.invalid, c.clash_resolve
            )?;
        }
        for h in &s.hints {
            writeln!(o, "hint: {h}")?;
        }
        let mut events = format!("{} events shown, {} lost", s.events_shown, s.lost_events);
        if s.rate_limited_events > 0 {
            events.push_str(&format!(", {} not sent (--event-rate)", s.rate_limited_events));
        }
        if s.uncounted_drops > 0 {
            events.push_str(&format!(", {} drops uncounted (counter map full)", s.uncounted_drops));
        }
        writeln!(o, "{events}")?;
        o.flush()
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}
