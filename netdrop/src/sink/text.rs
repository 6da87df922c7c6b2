//! Human-readable output: one line per drop (fitted to a terminal when there is one), the
//! target table and the drop summary.

use std::{
    fmt::Write as _,
    io::{self, Write},
    net::SocketAddr,
};

use super::{
    Sink, table,
    terminal::{columns, terminal_size, truncate, wrap},
};
use crate::{
    aggregate::{Summary, target_summary::TargetSummary},
    enrich::{
        classify::{Certainty, Effect},
        record::{DropRecord, Endpoint},
    },
    resolve::PeerKind,
};

/// Human-readable lines.
pub struct TextSink<W: Write + Send> {
    out: W,
    header_done: bool,
    /// Drop lines fit this many columns (a terminal's width); `None`: whole lines.
    width: Option<usize>,
    /// Measure stdout's terminal again after each batch (it may have been resized).
    measure: bool,
}

impl<W: Write + Send> TextSink<W> {
    /// Whole lines, whatever their length (files, pipes).
    pub fn new(out: W) -> Self {
        Self {
            out,
            header_done: false,
            width: None,
            measure: false,
        }
    }

    /// Lines fit the terminal on stdout, when stdout is one (measured again after each batch).
    pub fn for_stdout(out: W) -> Self {
        Self {
            out,
            header_done: false,
            width: terminal_size().map(|(w, _)| w),
            measure: true,
        }
    }
}

/// `10.0.0.1:53`, `[fd00::1]:53`, `10.0.0.1`.
pub fn endpoint(e: Option<&Endpoint>) -> String {
    match e {
        None => "-".into(),
        Some(e) => match e.port {
            Some(p) => SocketAddr::new(e.ip, p).to_string(),
            None => e.ip.to_string(),
        },
    }
}

/// How `kubectl` users name an end of a packet: `default/web-2`, `node/node-a`,
/// `svc default/web:80`. `None` when Kubernetes does not know the address (or resolution is off).
pub fn k8s_name(e: &Endpoint) -> Option<String> {
    let p = e.k8s.as_ref()?;
    let pod = || Some(format!("{}/{}", p.namespace.as_deref()?, p.pod.as_deref()?));
    match p.kind {
        PeerKind::Pod => pod(),
        // A hostNetwork pod shares its node's address: the pod, when the endpoint names it.
        PeerKind::Node => pod().or_else(|| Some(format!("node/{}", p.node.as_deref()?))),
        PeerKind::Service => {
            let svc = p.service.as_deref()?;
            Some(match (e.port, &p.service_port) {
                (Some(port), _) => format!("svc {svc}:{port}"),
                (None, Some(sp)) => format!("svc {svc}:{sp}"),
                (None, None) => format!("svc {svc}"),
            })
        }
        PeerKind::External | PeerKind::Unresolved => None,
    }
}

/// The Service a flow was addressed to, for a drop whose destination is already a backend:
/// the pre-DNAT Service address, else the Service the backend serves (`svc default/web:http`).
fn via_service(d: &DropRecord) -> Option<String> {
    let dst = d.dst.as_ref()?;
    if dst.k8s.as_ref().is_some_and(|p| p.kind == PeerKind::Service) {
        return None;
    }
    if let Some(name) = d
        .orig_dst
        .as_ref()
        .filter(|o| o.k8s.as_ref().is_some_and(|p| p.kind == PeerKind::Service))
        .and_then(k8s_name)
    {
        return Some(name);
    }
    let p = dst.k8s.as_ref()?;
    let svc = p.service.as_deref()?;
    Some(match &p.service_port {
        Some(sp) => format!("svc {svc}:{sp}"),
        None => format!("svc {svc}"),
    })
}

/// Fields of a drop line that give way, in this order, when the line must fit a terminal
/// (lower = kept longer; [`Keep::Always`] fields are truncated, never dropped).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Keep {
    /// Time, reason, protocol and both ends.
    Always,
    Classification,
    Service,
    Node,
    Flags,
    Location,
    Addresses,
    PreNat,
    Interface,
}

/// One drop as text: its fields in display order, each with its leading separator and how
/// long it is kept when the line must fit a terminal (see [`TextLine::fit`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextLine {
    fields: Vec<(Keep, String)>,
}

impl TextLine {
    /// The whole line, every field.
    pub fn full(&self) -> String {
        self.fields.iter().map(|(_, f)| f.as_str()).collect()
    }

    /// The line in at most `width` columns: the least important fields are left out first
    /// (interface, pre-NAT addresses, addresses, location, flags, node, Service, classification);
    /// what still does not fit is cut, ending in `…`. `None`: the whole line (not a terminal).
    pub fn fit(&self, width: Option<usize>) -> String {
        let Some(width) = width else { return self.full() };
        let mut keep: Vec<bool> = vec![true; self.fields.len()];
        let mut len: usize = self.fields.iter().map(|(_, f)| columns(f)).sum();
        while len > width {
            // The least important field still shown; the last of equals goes first.
            let Some(i) = (0..self.fields.len())
                .filter(|i| keep[*i] && self.fields[*i].0 != Keep::Always)
                .max_by_key(|i| (self.fields[*i].0, *i))
            else {
                break;
            };
            keep[i] = false;
            len -= columns(&self.fields[i].1);
        }
        let line: String = self
            .fields
            .iter()
            .zip(&keep)
            .filter(|(_, k)| **k)
            .map(|((_, f), _)| f.as_str())
            .collect();
        truncate(&line, width)
    }
}

/// `10:21:33.123456`: the time of day in UTC, to the microsecond (truncated, as the JSON's
/// nanoseconds are).
fn time_of_day(t: std::time::SystemTime) -> String {
    let since = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let s = since.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:06}",
        s / 3600,
        s / 60 % 60,
        s % 60,
        since.subsec_micros()
    )
}

/// One line per drop: time, reason, protocol, both ends (named as pods, nodes and Services when
/// Kubernetes knows them, with the Service the flow was sent to and the node the drop happened
/// on), detail, the addresses, interface and location.
pub fn text_line(d: &DropRecord) -> String {
    text_fields(d).full()
}

/// [`text_line`] as fields, to fit a terminal.
pub fn text_fields(d: &DropRecord) -> TextLine {
    let time = time_of_day(d.time);
    let mut f: Vec<(Keep, String)> = Vec::new();
    // `{:<16}` pads only what implements padding: the reason and protocol as strings.
    let head = format!("{time} {:<16} {:<6} ", d.reason.to_string(), d.protocol.to_string());
    let flags = if let Some(fl) = &d.tcp_flags {
        Some(format!(" [{fl}]"))
    } else {
        d.icmp.map(|i| format!(" [type {} code {}]", i.kind, i.code))
    };
    // What the drop cost, when it lost nothing or was answered with a reset.
    let cost = match d.effect {
        Effect::Lossless => Some("lossless"),
        Effect::Reset => Some("reset"),
        Effect::Unknown | Effect::Attempt | Effect::Data => None,
    };
    let mark = if d.certainty == Certainty::Inferred { "?" } else { "" };
    let class = match (!d.classification.is_reason(), cost) {
        (true, Some(c)) => Some(format!(" ({}{mark}, {c})", d.classification)),
        (true, None) => Some(format!(" ({}{mark})", d.classification)),
        (false, Some(c)) => Some(format!(" ({c})")),
        (false, None) => None,
    };
    let pre_nat = [("orig-dst", &d.orig_dst), ("orig-src", &d.orig_src)]
        .into_iter()
        .filter_map(|(k, e)| {
            e.as_ref()
                .map(|e| (Keep::PreNat, format!(" {k}={}", endpoint(Some(e)))))
        });
    let iface = if d.ifname.is_empty() { "-" } else { d.ifname.as_str() };
    // Namespace 0: the kernel left no way to tell (JSON says null).
    let netns = if d.netns == 0 {
        "unknown".to_string()
    } else {
        d.netns.to_string()
    };
    let interface = format!("  if={iface} netns={netns}");
    let location = format!("  at {}", d.location);
    let addresses = format!("{} → {}", endpoint(d.src.as_ref()), endpoint(d.dst.as_ref()));
    // The client as it was before SNAT, the destination after DNAT (the backend it reached).
    let client = d.orig_src.as_ref().or(d.src.as_ref());
    let src_name = client.and_then(k8s_name);
    let dst_name = d.dst.as_ref().and_then(k8s_name);
    if src_name.is_none() && dst_name.is_none() {
        // Nothing known to Kubernetes (or resolution off): the addresses are the names.
        f.push((Keep::Always, head + &addresses));
        f.extend(flags.map(|s| (Keep::Flags, s)));
        f.extend(class.map(|s| (Keep::Classification, s)));
        f.extend(pre_nat);
        f.push((Keep::Interface, interface));
        f.push((Keep::Location, location));
        return TextLine { fields: f };
    }
    let src = src_name.unwrap_or_else(|| endpoint(client));
    let dst = dst_name.unwrap_or_else(|| endpoint(d.dst.as_ref()));
    f.push((Keep::Always, format!("{head}{src} → {dst}")));
    f.extend(via_service(d).map(|s| (Keep::Service, format!(" via {s}"))));
    f.extend(flags.map(|s| (Keep::Flags, s)));
    f.extend(class.map(|s| (Keep::Classification, s)));
    f.push((Keep::Node, format!("  on {}", d.node)));
    f.push((Keep::Location, location));
    f.push((Keep::Addresses, format!("  {addresses}")));
    f.extend(pre_nat);
    f.push((Keep::Interface, interface));
    TextLine { fields: f }
}

/// A line of the drop summary in a terminal `width` columns wide: table rows (indented) are cut,
/// prose (hints, conntrack statistics) is wrapped. `None`: the line as it is.
pub(crate) fn fit_summary_line(line: &str, width: Option<usize>) -> Vec<String> {
    match width {
        Some(w) if line.starts_with(' ') => vec![truncate(line, w)],
        _ => wrap(line, width),
    }
}

impl<W: Write + Send> Sink for TextSink<W> {
    fn on_target_summary(&mut self, s: &TargetSummary) -> io::Result<()> {
        writeln!(self.out)?;
        write!(self.out, "{}", table::render(s))?;
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
            let header = "TIME            REASON           PROTO  SOURCE → DESTINATION";
            writeln!(
                self.out,
                "{}",
                self.width.map_or_else(|| header.to_string(), |w| truncate(header, w))
            )?;
            self.header_done = true;
        }
        writeln!(self.out, "{}", text_fields(drop).fit(self.width))
    }

    fn on_summary(&mut self, s: &Summary) -> io::Result<()> {
        let mut text = Vec::new();
        let o = &mut text;
        writeln!(o)?;
        writeln!(
            o,
            "--- netdrop summary: {:.1} s on {} via {} ---",
            s.duration_s,
            s.node,
            s.hook.drop_hook_name()
        )?;
        if s.drops_total == 0 {
            writeln!(o, "no drops matched")?;
        } else {
            writeln!(
                o,
                "{:>10}  {:<20} {:<26} {:<5} {:<12} LOCATION",
                "COUNT", "REASON", "CLASSIFICATION", "IP", "NETNS"
            )?;
            for r in s.drops.iter().filter(|r| !r.hidden).take(20) {
                let class = match r.certainty {
                    Certainty::Exact => r.classification.clone(),
                    Certainty::Inferred => format!("{} (inferred)", r.classification),
                };
                writeln!(
                    o,
                    "{:>10}  {:<20} {:<26} {:<5} {:<12} {}",
                    r.count, r.reason, class, r.ip, r.netns, r.location
                )?;
            }
            let rows = s.drops.iter().filter(|r| !r.hidden).count();
            if rows > 20 {
                writeln!(o, "  ... {} more rows (-o json has them all)", rows - 20)?;
            }
            writeln!(o, "{:>10}  total", s.drops_total)?;
        }
        if s.hidden_drops > 0 {
            let parts: Vec<String> = s.hidden_by_reason.iter().map(|(r, n)| format!("{r} {n}")).collect();
            writeln!(
                o,
                "hidden (benign or not selected; --all-reasons shows them): {} ({})",
                s.hidden_drops,
                parts.join(", ")
            )?;
        }
        for c in &s.conntrack {
            writeln!(
                o,
                "conntrack netns {}: {}/{} entries; over the run: insert_failed +{} ({:.0}/s), drop +{}, early_drop +{}, invalid +{}, clash_resolve +{}",
                c.netns,
                c.count,
                c.max,
                c.insert_failed,
                c.insert_failed_per_s,
                c.drop,
                c.early_drop,
                c.invalid,
                c.clash_resolve
            )?;
        }
        for h in &s.hints {
            writeln!(o, "hint: {h}")?;
        }
        for line in s.attach.summary_lines() {
            writeln!(o, "{line}")?;
        }
        let mut events = format!("{} events shown, {} lost", s.events_shown, s.lost_events);
        if s.rate_limited_events > 0 {
            let _ = write!(events, ", {} not sent (--event-rate)", s.rate_limited_events);
        }
        if s.uncounted_drops > 0 {
            let _ = write!(events, ", {} drops uncounted (counter map full)", s.uncounted_drops);
        }
        writeln!(o, "{events}")?;
        for line in String::from_utf8_lossy(&text).lines() {
            for l in fit_summary_line(line, self.width) {
                writeln!(self.out, "{l}")?;
            }
        }
        self.out.flush()
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.measure {
            self.width = terminal_size().map(|(w, _)| w);
        }
        self.out.flush()
    }
}
