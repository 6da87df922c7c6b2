//! Output sinks. One event pipeline feeds any number of sinks: the terminal, JSON lines, and
//! (next) the agent's metrics and the capture file.

use std::{
    collections::VecDeque,
    io::{self, IsTerminal as _, Write},
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use crate::{
    aggregate::Summary,
    aggregate::target_summary::SvcSummary,
    enrich::classify::Effect,
    enrich::record::{DropRecord, Endpoint},
    resolve::PeerKind,
};

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
        let mut l = self.lines.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if l.len() == RECENT {
            l.pop_front();
        }
        l.push_back(text_fields(drop));
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

/// Whether log lines on stderr get colour: only for a person at a terminal, and not when
/// `NO_COLOR` is set to anything but the empty string (<https://no-color.org>).
pub fn log_colour(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(std::ffi::OsStr::is_empty)
}

/// Columns and rows of the terminal on stdout; `None` when stdout is not a terminal. The
/// kernel's window size (`TIOCGWINSZ`), else `$COLUMNS`/`$LINES`, else 80×24.
pub fn terminal_size() -> Option<(usize, usize)> {
    let stdout = io::stdout();
    if !stdout.is_terminal() {
        return None;
    }
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `struct winsize` to the pointer, which is valid and
    // exclusively borrowed for the call.
    let rc = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&stdout), libc::TIOCGWINSZ, &raw mut ws) };
    let env = |k: &str| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|n| *n > 0)
    };
    let cols = if rc == 0 && ws.ws_col > 0 {
        usize::from(ws.ws_col)
    } else {
        env("COLUMNS").unwrap_or(80)
    };
    let rows = if rc == 0 && ws.ws_row > 0 {
        usize::from(ws.ws_row)
    } else {
        env("LINES").unwrap_or(24)
    };
    Some((cols, rows))
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

/// Display width of a line (one column per `char`: names, addresses and `→` are all narrow).
fn columns(s: &str) -> usize {
    s.chars().count()
}

/// `s` cut to `width` columns, ending in `…` when cut.
pub fn truncate(s: &str, width: usize) -> String {
    if columns(s) <= width {
        return s.to_string();
    }
    if width == 0 {
        return String::new();
    }
    let mut t: String = s.chars().take(width - 1).collect();
    t.push('…');
    t
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

/// One line per drop: time, reason, protocol, both ends (named as pods, nodes and Services when
/// Kubernetes knows them, with the Service the flow was sent to and the node the drop happened
/// on), detail, the addresses, interface and location.
pub fn text_line(d: &DropRecord) -> String {
    text_fields(d).full()
}

/// [`text_line`] as fields, to fit a terminal.
pub fn text_fields(d: &DropRecord) -> TextLine {
    // RFC 3339 "2026-11-26T10:21:33.123456789Z" → "10:21:33.123456"
    let time = d.time.get(11..26).unwrap_or(&d.time);
    let mut f: Vec<(Keep, String)> = Vec::new();
    let head = format!("{time} {:<16} {:<6} ", d.reason, d.protocol);
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
    let mark = if d.certainty == crate::enrich::classify::Certainty::Inferred {
        "?"
    } else {
        ""
    };
    let class = match (d.classification != d.reason.to_ascii_lowercase(), cost) {
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

/// The live view of a target trace in a `width`×`height` terminal: the table, then the most
/// recent drops. Every line fits `width` and there are at most `height - 1` lines, so drawing
/// it never scrolls the terminal and the next frame replaces it in place. When it is too tall,
/// the recent drops give way first, then the backends with the fewest drops (a line says how
/// many are not shown).
pub fn live_frame(s: &SvcSummary, recent: &VecDeque<TextLine>, width: usize, height: usize) -> Vec<String> {
    let budget = height.saturating_sub(1).max(1);
    let mut table: Vec<String> = crate::aggregate::target_summary::render(s)
        .lines()
        .map(String::from)
        .collect();
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
        let hidden: Vec<&crate::aggregate::target_summary::BackendRow> = s
            .backends
            .iter()
            .enumerate()
            .filter(|(i, _)| !shown.contains(i))
            .map(|(_, b)| b)
            .collect();
        let with_drops = hidden.iter().filter(|b| b.drops > 0).count();
        table = crate::aggregate::target_summary::render(&trimmed)
            .lines()
            .map(String::from)
            .collect();
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
pub fn final_text(s: &SvcSummary, width: Option<usize>) -> Vec<String> {
    let mut out: Vec<String> = crate::aggregate::target_summary::render(s)
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

/// A line of the drop summary in a terminal `width` columns wide: table rows (indented) are cut,
/// prose (hints, conntrack statistics) is wrapped. `None`: the line as it is.
fn fit_summary_line(line: &str, width: Option<usize>) -> Vec<String> {
    match width {
        Some(w) if line.starts_with(' ') => vec![truncate(line, w)],
        _ => wrap(line, width),
    }
}

/// Word-wraps a line of prose to `width` columns, continuation lines indented by two spaces.
/// A word longer than a line is cut. `None`: the line as it is.
pub fn wrap(line: &str, width: Option<usize>) -> Vec<String> {
    let Some(width) = width.filter(|w| *w > 8) else {
        return vec![line.to_string()];
    };
    let mut out = Vec::new();
    let mut cur = String::new();
    for word in line.split(' ') {
        if !cur.is_empty() && columns(&cur) + 1 + columns(word) > width {
            out.push(std::mem::take(&mut cur));
        }
        if cur.is_empty() {
            let indent = if out.is_empty() { "" } else { "  " };
            cur = format!("{indent}{word}");
        } else {
            cur.push(' ');
            cur.push_str(word);
        }
    }
    out.push(cur);
    out.into_iter().map(|l| truncate(&l, width)).collect()
}

impl<W: Write + Send> Sink for TextSink<W> {
    fn on_target_summary(&mut self, s: &SvcSummary) -> io::Result<()> {
        writeln!(self.out)?;
        write!(self.out, "{}", crate::aggregate::target_summary::render(s))?;
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
            s.duration_s, s.node, s.hook
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
                    crate::enrich::classify::Certainty::Exact => r.classification.clone(),
                    crate::enrich::classify::Certainty::Inferred => format!("{} (inferred)", r.classification),
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
        let mut events = format!("{} events shown, {} lost", s.events_shown, s.lost_events);
        if s.rate_limited_events > 0 {
            events.push_str(&format!(", {} not sent (--event-rate)", s.rate_limited_events));
        }
        if s.uncounted_drops > 0 {
            events.push_str(&format!(", {} drops uncounted (counter map full)", s.uncounted_drops));
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

#[cfg(test)]
mod tests {
    use std::{collections::VecDeque, ffi::OsStr, net::IpAddr};

    use super::*;
    use crate::{
        enrich::classify::Certainty,
        enrich::record::RawDetail,
        resolve::{Name, Peer},
    };

    fn ep(addr: &str, peer: Option<Peer>) -> Endpoint {
        let a: SocketAddr = addr.parse().expect("addr");
        Endpoint {
            ip: a.ip(),
            port: Some(a.port()),
            k8s: peer,
        }
    }

    fn pod(ns: &str, name: &str, node: &str) -> Peer {
        Peer {
            kind: PeerKind::Pod,
            namespace: Some(Name::new(ns)),
            pod: Some(Name::new(name)),
            node: Some(Name::new(node)),
            ..Peer::default()
        }
    }

    fn backend(ns: &str, name: &str, node: &str, svc: &str, port: &str) -> Peer {
        Peer {
            service: Some(Name::new(svc)),
            service_port: Some(Name::new(port)),
            ready: Some(true),
            ..pod(ns, name, node)
        }
    }

    fn service(svc: &str, port: &str) -> Peer {
        Peer {
            kind: PeerKind::Service,
            namespace: Some(Name::new("default")),
            service: Some(Name::new(svc)),
            service_port: Some(Name::new(port)),
            ..Peer::default()
        }
    }

    fn node(name: &str) -> Peer {
        Peer {
            kind: PeerKind::Node,
            node: Some(Name::new(name)),
            ..Peer::default()
        }
    }

    fn record(src: Endpoint, dst: Endpoint) -> DropRecord {
        DropRecord {
            kind: "drop",
            time: "2026-11-26T10:21:33.123456789Z".into(),
            node: "node-a".into(),
            reason: "NETFILTER_DROP".into(),
            reason_code: 12,
            location: "nf_hook_slow+0x7d".into(),
            protocol: "tcp".into(),
            src: Some(src),
            dst: Some(dst),
            ifindex: 2,
            ifname: "eth0".into(),
            netns: 4_026_531_840,
            len: 60,
            tcp_flags: Some("SYN".into()),
            payload_len: Some(0),
            icmp: None,
            classification: "conntrack_insert_failed".into(),
            certainty: Certainty::Exact,
            effect: Effect::Attempt,
            conntrack: Some("unconfirmed"),
            orig_dst: None,
            orig_src: None,
            raw: RawDetail::default(),
        }
    }

    /// The drop of the field notes: SNAT to node-a's address, DNAT to web-2 on node-b.
    fn snat_dnat() -> DropRecord {
        let mut d = record(
            ep("192.168.50.10:40002", Some(node("node-a"))),
            ep(
                "10.244.2.10:8080",
                Some(backend("default", "web-2", "node-b", "default/web", "http")),
            ),
        );
        d.orig_dst = Some(ep("10.96.0.10:80", Some(service("default/web", "http"))));
        d.orig_src = Some(ep("10.244.1.2:35632", Some(pod("default", "client", "node-a"))));
        d
    }

    #[test]
    fn names_both_ends_the_service_and_the_node_then_the_addresses() {
        assert_eq!(
            text_line(&snat_dnat()),
            "10:21:33.123456 NETFILTER_DROP   tcp    default/client → default/web-2 via svc default/web:80 [SYN] \
             (conntrack_insert_failed)  on node-a  at nf_hook_slow+0x7d  192.168.50.10:40002 → 10.244.2.10:8080 \
             orig-dst=10.96.0.10:80 orig-src=10.244.1.2:35632  if=eth0 netns=4026531840"
        );
    }

    #[test]
    fn without_kubernetes_the_line_is_addresses_as_before() {
        let mut d = snat_dnat();
        for e in [&mut d.src, &mut d.dst, &mut d.orig_src, &mut d.orig_dst]
            .into_iter()
            .flatten()
        {
            e.k8s = None;
        }
        assert_eq!(
            text_line(&d),
            "10:21:33.123456 NETFILTER_DROP   tcp    192.168.50.10:40002 → 10.244.2.10:8080 [SYN] (conntrack_insert_failed) \
             orig-dst=10.96.0.10:80 orig-src=10.244.1.2:35632  if=eth0 netns=4026531840  at nf_hook_slow+0x7d"
        );
        // Resolution on, the addresses outside the cluster: the same.
        for e in [&mut d.src, &mut d.dst, &mut d.orig_src, &mut d.orig_dst]
            .into_iter()
            .flatten()
        {
            e.k8s = Some(Peer::external());
        }
        assert!(
            text_line(&d)
                .starts_with("10:21:33.123456 NETFILTER_DROP   tcp    192.168.50.10:40002 → 10.244.2.10:8080 [SYN]")
        );
    }

    #[test]
    fn a_drop_before_dnat_names_the_service_as_the_destination() {
        let mut d = record(
            ep("10.244.1.2:35632", Some(pod("default", "client", "node-a"))),
            ep("10.96.0.10:80", Some(service("default/web", "http"))),
        );
        d.classification = "netfilter_rule".into();
        let line = text_line(&d);
        assert!(
            line.contains("   default/client → svc default/web:80 [SYN] (netfilter_rule)  on node-a  at "),
            "{line}"
        );
        assert!(!line.contains(" via "), "{line}");
        // One end unknown: its address stands in for the name.
        d.dst = Some(ep("203.0.113.9:443", Some(Peer::external())));
        assert!(
            text_line(&d).contains("   default/client → 203.0.113.9:443 [SYN]"),
            "{}",
            text_line(&d)
        );
        // A backend reached without conntrack's help still names its Service, by port name.
        d.dst = Some(ep(
            "10.244.2.10:8080",
            Some(backend("default", "web-2", "node-b", "default/web", "http")),
        ));
        assert!(
            text_line(&d).contains("default/client → default/web-2 via svc default/web:http [SYN]"),
            "{}",
            text_line(&d)
        );
    }

    #[test]
    fn discards_that_lose_nothing_or_reset_say_so_and_an_unknown_namespace_is_not_0() {
        let mut d = record(
            ep("10.244.1.2:35632", Some(pod("default", "client", "node-a"))),
            ep("10.244.2.10:8080", None),
        );
        (d.reason, d.classification, d.tcp_flags, d.effect) = (
            "TCP_OLD_DATA".into(),
            "tcp_old_data".into(),
            Some("ACK".into()),
            Effect::Lossless,
        );
        assert!(
            text_line(&d).contains(" [ACK] (lossless)  on node-a"),
            "{}",
            text_line(&d)
        );
        (d.reason, d.classification, d.effect) = ("TCP_FLAGS".into(), "tcp_flags".into(), Effect::Reset);
        assert!(text_line(&d).contains(" [ACK] (reset)  on node-a"), "{}", text_line(&d));
        (d.classification, d.certainty) = ("conntrack_invalid".into(), Certainty::Inferred);
        assert!(
            text_line(&d).contains(" (conntrack_invalid?, reset)"),
            "{}",
            text_line(&d)
        );
        d.netns = 0;
        assert!(text_line(&d).ends_with(" netns=unknown"), "{}", text_line(&d));
    }

    #[test]
    fn ipv6_addresses_are_bracketed_with_their_ports() {
        let mut d = record(ep("[fd00:10:244:1::2]:35632", None), ep("[fd00:96::50]:80", None));
        d.orig_dst = Some(ep("[fd00:96::50]:80", None));
        let line = text_line(&d);
        assert!(
            line.contains("[fd00:10:244:1::2]:35632 → [fd00:96::50]:80 [SYN]"),
            "{line}"
        );
        assert!(line.contains("orig-dst=[fd00:96::50]:80"), "{line}");
        let no_port = Endpoint::new("fd00::1".parse::<IpAddr>().expect("ip"), None);
        assert_eq!(endpoint(Some(&no_port)), "fd00::1");
        let svc6 = ep("[fd00:96::50]:80", Some(service("default/web6", "http")));
        assert_eq!(k8s_name(&svc6).as_deref(), Some("svc default/web6:80"));
    }

    #[test]
    fn lines_fit_the_terminal_by_leaving_out_the_least_important_fields() {
        let line = text_fields(&snat_dnat());
        let full = line.full();
        assert_eq!(line.fit(None), full, "not a terminal: whole lines");
        assert_eq!(line.fit(Some(500)), full);
        for width in [80, 100, 120, 160, 200] {
            let fit = line.fit(Some(width));
            assert!(fit.chars().count() <= width, "{width}: {fit}");
            assert!(
                fit.starts_with("10:21:33.123456 NETFILTER_DROP   tcp    default/client"),
                "{width}: {fit}"
            );
            assert!(
                !fit.contains("netns=4026") || fit == full,
                "the interface goes first: {width}: {fit}"
            );
        }
        // 200 columns: all but the interface and the pre-NAT addresses.
        assert!(
            line.fit(Some(200))
                .ends_with("  at nf_hook_slow+0x7d  192.168.50.10:40002 → 10.244.2.10:8080"),
            "{}",
            line.fit(Some(200))
        );
        // 160: the addresses give way; the location stays.
        assert!(
            line.fit(Some(160))
                .ends_with("(conntrack_insert_failed)  on node-a  at nf_hook_slow+0x7d"),
            "{}",
            line.fit(Some(160))
        );
        // 120: the location, flags and node too; names, Service and classification stay.
        assert_eq!(
            line.fit(Some(120)),
            "10:21:33.123456 NETFILTER_DROP   tcp    default/client → default/web-2 via svc default/web:80 (conntrack_insert_failed)"
        );
        // 100: the Service gives way before the classification.
        assert_eq!(
            line.fit(Some(100)),
            "10:21:33.123456 NETFILTER_DROP   tcp    default/client → default/web-2 (conntrack_insert_failed)"
        );
        // 80: the names, whole; fields are left out, not cut.
        assert_eq!(
            line.fit(Some(80)),
            "10:21:33.123456 NETFILTER_DROP   tcp    default/client → default/web-2"
        );
        // Narrower than the names: cut, never wrapped.
        let narrow = line.fit(Some(30));
        assert_eq!((narrow.chars().count(), narrow.ends_with('…')), (30, true), "{narrow}");
    }

    fn summary(backends: usize, bad: usize) -> SvcSummary {
        use crate::aggregate::target_summary::{BackendRow, SvcSummary, TopReason, Unmatched};
        let rows = (0..backends)
            .map(|i| BackendRow {
                pod: format!("default/big-{i:02}"),
                node: Some(if i % 2 == 0 { "node-a" } else { "node-b" }.into()),
                ip: IpAddr::from([10, 244, 1, 50 + i as u8]),
                ports: vec!["8080/tcp".into()],
                ready: true,
                attempts: Some(100),
                drops: if i == bad { 40 } else { 0 },
                drop_ratio: Some(if i == bad { 0.4 } else { 0.0 }),
                top_reasons: if i == bad {
                    vec![TopReason {
                        reason: "NETFILTER_DROP".into(),
                        classification: "netfilter_rule".into(),
                        certainty: Certainty::Exact,
                        location: "nft_do_chain+0x3e8".into(),
                        node: Some("node-b".into()),
                        count: 40,
                        effect: Effect::Attempt,
                    }]
                } else {
                    vec![]
                },
                drops_by_node: vec![],
                lossless: 0,
                resets: 0,
                discard_reasons: vec![],
            })
            .collect();
        SvcSummary {
            kind: "summary",
            service: "default/big".into(),
            time: String::new(),
            duration_s: 5.0,
            is_final: false,
            attempts: Some(100 * backends as u64),
            drops: 40,
            drop_ratio: Some(40.0 / (100.0 * f64::from(backends as u32))),
            lossless: 0,
            resets: 0,
            backends: rows,
            unmatched: Unmatched::default(),
            other_namespaces: 0,
            pods: false,
            lost_events: 0,
            diagnosis: vec![
                "default/big: 40 drops for 5000 attempts (0.8% of attempts).".into(),
                "Next (netfilter_rule): a firewall rule dropped it: find the chain with `iptables-save -c | grep -- '-j DROP'` or `nft list ruleset` (NetworkPolicy: `kubectl get networkpolicy -A`, Calico: `calicoctl get networkpolicy`).".into(),
            ],
            detail: None,
        }
    }

    fn recent(n: usize) -> VecDeque<TextLine> {
        (0..n).map(|_| text_fields(&snat_dnat())).collect()
    }

    #[test]
    fn the_live_frame_fits_the_terminal_so_it_redraws_in_place() {
        let s = summary(3, 2);
        let frame = live_frame(&s, &recent(8), 200, 50);
        let table = crate::aggregate::target_summary::render(&s);
        let rows: Vec<&str> = table.lines().map(str::trim_end).collect();
        assert_eq!(frame[..rows.len()], rows[..], "room for everything: the whole table");
        assert_eq!(frame.len(), table.lines().count() + 2 + 8, "and the 8 recent drops");
        for (w, h) in [(200, 50), (80, 24), (60, 12), (40, 6)] {
            let frame = live_frame(&s, &recent(8), w, h);
            assert!(frame.len() < h, "{w}x{h}: {} lines", frame.len());
            assert!(frame.iter().all(|l| l.chars().count() <= w), "{w}x{h}: {frame:#?}");
            assert!(
                frame[0].starts_with("default/big — attempts 300  drops 40"),
                "{frame:#?}"
            );
        }
        // 50 backends in 24 rows: the bad one stays, a line counts the others, no drops shown.
        let s = summary(50, 37);
        let frame = live_frame(&s, &recent(8), 100, 24);
        assert_eq!(frame.len(), 23, "{frame:#?}");
        assert!(frame.iter().any(|l| l.starts_with("default/big-37 ")), "{frame:#?}");
        let more = frame
            .iter()
            .find(|l| l.starts_with("... "))
            .expect("a line counts the backends left out");
        let shown = frame.iter().filter(|l| l.starts_with("default/big-")).count();
        assert_eq!(
            more,
            &format!(
                "... {} more backends (0 with drops; a taller terminal or -o json shows them)",
                50 - shown
            )
        );
        assert!(!frame.iter().any(|l| l.starts_with("most recent drops")), "{frame:#?}");
    }

    #[test]
    fn long_pod_names_widen_the_backend_column_instead_of_shifting_the_numbers() {
        let mut s = summary(2, 1);
        s.backends[0].pod = "kube-system/coredns-5d78c9869d-x2x9z-canary".into();
        s.backends[1].ready = false;
        let table = crate::aggregate::target_summary::render(&s);
        let lines: Vec<&str> = table.lines().collect();
        let node_col = lines[1].find("NODE").expect("header");
        for row in &lines[2..5] {
            assert_eq!(row.chars().nth(node_col - 1), Some(' '), "{table}");
            assert_ne!(
                row.chars().nth(node_col),
                Some(' '),
                "the node starts under NODE: {table}"
            );
        }
        assert!(lines[3].starts_with("default/big-01 (not ready) "), "{table}");
    }

    #[test]
    fn the_final_text_wraps_the_diagnosis_and_cuts_table_rows() {
        let s = summary(3, 2);
        let lines = final_text(&s, Some(60));
        assert!(lines.iter().all(|l| l.chars().count() <= 60), "{lines:#?}");
        let words = |t: &str| t.split_whitespace().map(String::from).collect::<Vec<_>>();
        let after_table = crate::aggregate::target_summary::render(&s).lines().count() + 1;
        assert_eq!(
            words(&lines[after_table..].join(" ")),
            words(&s.diagnosis.join(" ")),
            "wrapped, nothing lost"
        );
        assert_eq!(lines[after_table], s.diagnosis[0], "a short line stays whole");
        assert!(
            lines[after_table + 2].starts_with("  "),
            "continuation lines are indented: {lines:#?}"
        );
        let whole = final_text(&s, None);
        assert_eq!(whole[after_table..], s.diagnosis[..], "not a terminal: whole lines");
    }

    #[test]
    fn the_drop_summary_fits_a_terminal() {
        let row = "       812  NO_SOCKET            no_socket                  ipv4  4026532177   __udp4_lib_rcv+0x4bc";
        assert_eq!(
            fit_summary_line(row, Some(60)),
            [format!("{}…", &row[..59])],
            "table rows are cut"
        );
        let hint = "hint: 3 no_socket: nothing listens on that port: the backend is not listening on targetPort, or the process is down";
        let wrapped = fit_summary_line(hint, Some(60));
        assert!(
            wrapped.len() > 1 && wrapped.iter().all(|l| l.chars().count() <= 60),
            "{wrapped:#?}"
        );
        assert_eq!(fit_summary_line(hint, None), [hint], "not a terminal: whole lines");
    }

    #[test]
    fn wrap_keeps_words_and_cuts_only_what_cannot_fit() {
        assert_eq!(wrap("a bb ccc dddd", Some(9)), ["a bb ccc", "  dddd"]);
        assert_eq!(wrap("short", Some(80)), ["short"]);
        assert_eq!(wrap("x".repeat(20).as_str(), Some(10)), [format!("{}…", "x".repeat(9))]);
    }

    #[test]
    fn log_lines_are_coloured_only_on_a_terminal_without_no_color() {
        assert!(log_colour(true, None));
        assert!(
            log_colour(true, Some(OsStr::new(""))),
            "an empty NO_COLOR does not count"
        );
        assert!(!log_colour(true, Some(OsStr::new("1"))));
        assert!(!log_colour(false, None), "piped or redirected: no escape codes");
    }
}
