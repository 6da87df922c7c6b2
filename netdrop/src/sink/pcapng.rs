//! pcapng capture files of dropped packets (`netdrop capture`), readable by Wireshark/tshark
//! with nothing but the file: one interface block per (node, network namespace, ifindex), the
//! packet from its IP header (`LINKTYPE_RAW`, IPv4 and IPv6 on one interface), nanosecond
//! timestamps, and the verdict as a `key=value` comment on each packet (`frame.comment`;
//! `deploy/wireshark/netdrop.lua` turns it into `netdrop.*` fields).
//!
//! The file ends with a second section whose header carries, as comments, what the capture did
//! not keep (ring buffer full, `--event-rate`, `--max-size`, `--count`, no IP header) and the
//! run's summary as the JSON line `-o json` prints, so `netdrop report` re-renders it offline.
//!
//! Written with the `pcap-file` 2.0 crate: it writes every EPB timestamp in nanoseconds
//! whatever the interface says, so every IDB here carries `if_tsresol=9` (without it, readers
//! take the default microseconds and date the packets 1000× too late).
//!
//! Only [`capture_packet`] reads a [`DropRecord`]: the rest works on [`CapturePacket`].

use std::{
    borrow::Cow,
    collections::HashMap,
    io::{self, Write},
    sync::mpsc,
    time::{Duration, UNIX_EPOCH},
};

use pcap_file::{
    DataLink, Endianness,
    pcapng::{
        PcapNgWriter,
        blocks::{
            enhanced_packet::{EnhancedPacketBlock, EnhancedPacketOption},
            interface_description::{InterfaceDescriptionBlock, InterfaceDescriptionOption},
            section_header::{SectionHeaderBlock, SectionHeaderOption},
        },
    },
};
use serde::Serialize;

use super::Sink;
use crate::{
    aggregate::{Summary, target_summary::TargetSummary},
    enrich::record::{DropRecord, Endpoint},
    resolve::PeerKind,
};

/// The bytes of each packet the kernel program copies (`netdrop_common::HEADER_BYTES`): the
/// capture length, and each interface's snaplen.
pub const SNAPLEN: u32 = netdrop_common::HEADER_BYTES as u32;

/// The comment prefix of the trailer's summary chunks: `netdrop.summary 1/3 {...`.
pub const SUMMARY_PREFIX: &str = "netdrop.summary ";
/// The comment prefix of the trailer's counts line.
pub const KEPT_PREFIX: &str = "netdrop.capture ";
/// The comment prefix of every packet's verdict.
pub const VERDICT_PREFIX: &str = "netdrop ";
/// An option's length is 16 bits: longer summaries are split over several comments.
const CHUNK: usize = 60_000;

/// Errors of the capture file.
#[derive(Debug, thiserror::Error)]
pub enum PcapngError {
    /// Writing a block failed (disk full, closed pipe).
    #[error("writing the capture file")]
    Write(#[source] pcap_file::PcapError),
}

impl From<PcapngError> for io::Error {
    fn from(e: PcapngError) -> Self {
        match e {
            PcapngError::Write(pcap_file::PcapError::IoError(io)) => io,
            e @ PcapngError::Write(_) => Self::other(e),
        }
    }
}

/// The interface a packet was dropped on, as the capture names it: one IDB each.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Iface {
    pub node: String,
    pub netns: u32,
    pub ifindex: u32,
    pub ifname: String,
}

/// What the capture writes of one dropped packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapturePacket<'a> {
    /// Nanoseconds since the Unix epoch (the same instant as the JSON event's `time`).
    pub ts_ns: u128,
    /// The packet from its IP header, as the kernel program copied it (at most [`SNAPLEN`]).
    pub data: &'a [u8],
    pub iface: Iface,
    /// The verdict, in the order written: `reason=NETFILTER_DROP classification=...`.
    pub verdict: Vec<(&'static str, String)>,
}

/// The one place a [`DropRecord`] is read: record → what the capture writes.
pub fn capture_packet(r: &DropRecord) -> CapturePacket<'_> {
    let ts_ns = r.time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    // The verdict's words are the JSON line's (the same serializer), so a comment and the
    // event it came from read the same.
    let json = serde_json::to_value(r).unwrap_or_default();
    let text = |k: &str| match json.get(k) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    };
    let mut v: Vec<(&'static str, String)> = vec![
        ("reason", text("reason")),
        ("reason_code", text("reason_code")),
        ("classification", text("classification")),
        ("certainty", text("certainty")),
        ("effect", text("effect")),
        ("location", text("location")),
        ("node", r.node.clone()),
        ("netns", r.netns.to_string()),
        ("ifname", r.ifname.clone()),
        ("proto", text("protocol")),
    ];
    let mut push = |k, val: Option<String>| {
        if let Some(val) = val.filter(|s| !s.is_empty()) {
            v.push((k, val));
        }
    };
    push("src", r.src.as_ref().map(addr));
    push("dst", r.dst.as_ref().map(addr));
    push("src_pod", r.src.as_ref().and_then(pod));
    push("dst_pod", r.dst.as_ref().and_then(pod));
    push("service", service(r));
    push("orig_src", r.orig_src.as_ref().map(addr));
    push("orig_dst", r.orig_dst.as_ref().map(addr));
    push("conntrack", Some(text("conntrack")));
    push("tcp_flags", Some(text("tcp_flags").replace(' ', ",")));
    push("time", Some(text("time")));
    CapturePacket {
        ts_ns,
        data: &r.raw.headers,
        iface: Iface {
            node: r.node.clone(),
            netns: r.netns,
            ifindex: r.ifindex,
            ifname: r.ifname.clone(),
        },
        verdict: v,
    }
}

fn addr(e: &Endpoint) -> String {
    match e.port {
        Some(p) => std::net::SocketAddr::new(e.ip, p).to_string(),
        None => e.ip.to_string(),
    }
}

/// `namespace/pod` of a pod's end (hostNetwork pods included).
fn pod(e: &Endpoint) -> Option<String> {
    let p = e.k8s.as_ref()?;
    Some(format!("{}/{}", p.namespace.as_deref()?, p.pod.as_deref()?))
}

/// The Service the flow was addressed to: the pre-DNAT destination's, else the destination's.
fn service(r: &DropRecord) -> Option<String> {
    [r.orig_dst.as_ref(), r.dst.as_ref()]
        .into_iter()
        .flatten()
        .filter_map(|e| e.k8s.as_ref())
        .find(|p| p.kind == PeerKind::Service || p.service.is_some())
        .and_then(|p| p.service.as_deref().map(str::to_string))
}

/// `netdrop reason=... key=value ...`: values never hold spaces (they are replaced by `_`), so
/// the comment splits on whitespace.
pub fn verdict_comment(verdict: &[(&'static str, String)]) -> String {
    let mut s = String::from(VERDICT_PREFIX.trim_end());
    for (k, v) in verdict {
        s.push(' ');
        s.push_str(k);
        s.push('=');
        s.extend(v.chars().map(|c| if c.is_whitespace() { '_' } else { c }));
    }
    s
}

/// The IP packet's own length (IPv4 total length, IPv6 40 + payload length) and the captured
/// bytes that belong to it; `None` without an IP header.
pub fn ip_lengths(data: &[u8]) -> Option<(u32, usize)> {
    let orig = match data.first()? >> 4 {
        4 if data.len() >= 20 => u32::from(u16::from_be_bytes([data[2], data[3]])),
        // A jumbogram (payload length 0 with a hop-by-hop option) is longer; it is not seen on
        // the paths netdrop watches, and its captured bytes stay within the 40 counted here.
        6 if data.len() >= 40 => 40 + u32::from(u16::from_be_bytes([data[4], data[5]])),
        _ => return None,
    };
    // A header whose length is less than what was captured (trailer bytes after the packet):
    // only the packet's bytes are kept, so the captured length never exceeds the original.
    let min_header = if data[0] >> 4 == 4 { 20 } else { 40 };
    if orig < min_header {
        return None;
    }
    Some((orig, data.len().min(orig as usize)))
}

/// How a capture is bounded.
#[derive(Clone, Copy, Debug, Default)]
pub struct Limits {
    /// Stop after this many packets (`--count`).
    pub count: Option<u64>,
    /// Write no more packets once the file would exceed this (`--max-size`); the trailer is
    /// written all the same.
    pub max_bytes: Option<u64>,
}

/// What the capture kept and did not keep.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CaptureStats {
    pub packets: u64,
    /// The file's size so far (not in the trailer).
    #[serde(skip)]
    pub bytes: u64,
    /// Interface blocks written (not in the trailer).
    #[serde(skip)]
    pub interfaces: u64,
    /// Events the kernel could not send: ring buffer full.
    pub ring_full: u64,
    /// Events the kernel did not send: `--event-rate`.
    pub rate_limited: u64,
    /// Packets over `--max-size`.
    pub size_cap: u64,
    /// Packets after `--count` was reached (before the capture stopped).
    pub count_reached: u64,
    /// Drops without an IP header (ARP, non-IP frames): `LINKTYPE_RAW` cannot hold them.
    pub no_ip_header: u64,
    /// A flight recorder's dump ([`super::recorder`]): records pushed out of the recorder by
    /// newer ones before the dump. `None` in a capture (and not in its trailer line).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overwritten: Option<u64>,
}

impl CaptureStats {
    pub fn not_kept(&self) -> u64 {
        self.ring_full
            + self.rate_limited
            + self.size_cap
            + self.count_reached
            + self.no_ip_header
            + self.overwritten.unwrap_or(0)
    }

    /// The trailer's line; `netdrop report` parses it back ([`CaptureStats::parse`]).
    pub fn line(&self) -> String {
        let overwritten = self
            .overwritten
            .map_or_else(String::new, |n| format!(" overwritten={n}"));
        format!(
            "{KEPT_PREFIX}packets={} not_kept={} ring_full={} rate_limited={} size_cap={} count_reached={} no_ip_header={}{overwritten}",
            self.packets,
            self.not_kept(),
            self.ring_full,
            self.rate_limited,
            self.size_cap,
            self.count_reached,
            self.no_ip_header
        )
    }

    /// Reads [`CaptureStats::line`] back (`bytes` and `interfaces` are not in it).
    pub fn parse(line: &str) -> Option<Self> {
        let rest = line.strip_prefix(KEPT_PREFIX)?;
        let mut s = Self::default();
        for kv in rest.split_whitespace() {
            let (k, v) = kv.split_once('=')?;
            let v: u64 = v.parse().ok()?;
            match k {
                "packets" => s.packets = v,
                "ring_full" => s.ring_full = v,
                "rate_limited" => s.rate_limited = v,
                "size_cap" => s.size_cap = v,
                "count_reached" => s.count_reached = v,
                "no_ip_header" => s.no_ip_header = v,
                "overwritten" => s.overwritten = Some(v),
                _ => {}
            }
        }
        Some(s)
    }

    /// For people: `812 packets written; not kept: 3 (ring buffer full 3)`.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = [
            (self.ring_full, "ring buffer full"),
            (self.rate_limited, "over --event-rate"),
            (self.size_cap, "over --max-size"),
            (self.count_reached, "after --count"),
            (self.no_ip_header, "no IP header"),
            (self.overwritten.unwrap_or(0), "overwritten by newer drops"),
        ]
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| format!("{what} {n}"))
        .collect();
        if parts.is_empty() {
            format!("{} packets written; not kept: 0", self.packets)
        } else {
            format!(
                "{} packets written; not kept: {} ({})",
                self.packets,
                self.not_kept(),
                parts.join(", ")
            )
        }
    }
}

/// Counts the bytes written through it.
struct Counting<W> {
    inner: W,
    bytes: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes dropped packets as pcapng; the trailer goes out with the final summary.
pub struct PcapngSink<W: Write + Send> {
    writer: PcapNgWriter<Counting<W>>,
    ifaces: HashMap<Iface, u32>,
    limits: Limits,
    stats: CaptureStats,
    finished: bool,
    /// Gets the final counts once the trailer is written.
    done_tx: Option<mpsc::Sender<CaptureStats>>,
}

/// `4 + value + padding`: one option's size.
fn opt_len(value: usize) -> u64 {
    4 + value.next_multiple_of(4) as u64
}

impl<W: Write + Send> PcapngSink<W> {
    /// Starts the file: its section header names the program and `about` (the command line).
    pub fn new(out: W, limits: Limits, about: &str, done_tx: Option<mpsc::Sender<CaptureStats>>) -> io::Result<Self> {
        let shb = SectionHeaderBlock {
            endianness: Endianness::native(),
            major_version: 1,
            minor_version: 0,
            section_length: -1,
            options: vec![
                SectionHeaderOption::UserApplication(Cow::Owned(format!("netdrop {}", env!("CARGO_PKG_VERSION")))),
                SectionHeaderOption::Comment(Cow::Owned(truncate(about, CHUNK))),
            ],
        };
        let writer = PcapNgWriter::with_section_header(Counting { inner: out, bytes: 0 }, shb)
            .map_err(|e| io::Error::from(PcapngError::Write(e)))?;
        Ok(Self {
            writer,
            ifaces: HashMap::new(),
            limits,
            stats: CaptureStats::default(),
            finished: false,
            done_tx,
        })
    }

    /// The output, after [`PcapngSink::finish`].
    pub fn into_inner(self) -> W {
        self.writer.into_inner().inner
    }

    pub fn stats(&self) -> CaptureStats {
        CaptureStats {
            bytes: self.writer.get_ref().bytes,
            ..self.stats
        }
    }

    /// Writes one packet (and its interface's block the first time), or counts why not.
    pub fn write_packet(&mut self, p: &CapturePacket<'_>) -> Result<(), PcapngError> {
        if self.finished {
            return Ok(());
        }
        if self.limits.count.is_some_and(|n| self.stats.packets >= n) {
            self.stats.count_reached += 1;
            return Ok(());
        }
        let Some((original_len, kept)) = ip_lengths(p.data) else {
            self.stats.no_ip_header += 1;
            return Ok(());
        };
        let comment = verdict_comment(&p.verdict);
        let comment = truncate(&comment, CHUNK);
        let idb = (!self.ifaces.contains_key(&p.iface)).then(|| idb(&p.iface));
        // Block sizes as written: 12 bytes of type/lengths, the body, the options and their end.
        let idb_len = idb.as_ref().map_or(0, |b| {
            let opts: u64 = b.options.iter().map(idb_opt_len).sum();
            12 + 8 + opts + 4
        });
        let epb_len = 12 + 20 + kept.next_multiple_of(4) as u64 + opt_len(comment.len()) + 4;
        if let Some(max) = self.limits.max_bytes
            && self.writer.get_ref().bytes + idb_len + epb_len > max
        {
            self.stats.size_cap += 1;
            return Ok(());
        }
        let interface_id = match idb {
            Some(b) => {
                let id = self.ifaces.len() as u32;
                self.writer.write_pcapng_block(b).map_err(PcapngError::Write)?;
                self.ifaces.insert(p.iface.clone(), id);
                self.stats.interfaces += 1;
                id
            }
            None => self.ifaces[&p.iface],
        };
        let epb = EnhancedPacketBlock {
            interface_id,
            timestamp: Duration::new((p.ts_ns / 1_000_000_000) as u64, (p.ts_ns % 1_000_000_000) as u32),
            original_len,
            data: Cow::Borrowed(&p.data[..kept]),
            options: vec![EnhancedPacketOption::Comment(Cow::Owned(comment))],
        };
        self.writer.write_pcapng_block(epb).map_err(PcapngError::Write)?;
        self.stats.packets += 1;
        Ok(())
    }

    /// A flight recorder's dump: how many records newer ones pushed out before it (said in the
    /// trailer even when 0).
    pub fn set_overwritten(&mut self, n: u64) {
        self.stats.overwritten = Some(n);
    }

    /// Ends the file: a second section whose header says what was not kept and carries the
    /// summary (`summary_json`, the `-o json` line), then flushes.
    pub fn finish(&mut self, lost: u64, rate_limited: u64, summary_json: &str) -> Result<(), PcapngError> {
        if self.finished {
            return Ok(());
        }
        self.finished = true;
        self.stats.ring_full = lost;
        self.stats.rate_limited = rate_limited;
        let mut options = vec![
            SectionHeaderOption::UserApplication(Cow::Owned(format!("netdrop {}", env!("CARGO_PKG_VERSION")))),
            SectionHeaderOption::Comment(Cow::Owned(self.stats.line())),
        ];
        let chunks = chunks(summary_json, CHUNK);
        let n = chunks.len();
        for (i, c) in chunks.into_iter().enumerate() {
            options.push(SectionHeaderOption::Comment(Cow::Owned(format!(
                "{SUMMARY_PREFIX}{}/{n} {c}",
                i + 1
            ))));
        }
        let shb = SectionHeaderBlock {
            endianness: Endianness::native(),
            major_version: 1,
            minor_version: 0,
            section_length: -1,
            options,
        };
        self.writer.write_pcapng_block(shb).map_err(PcapngError::Write)?;
        self.writer
            .get_mut()
            .flush()
            .map_err(|e| PcapngError::Write(pcap_file::PcapError::IoError(e)))?;
        if let Some(tx) = self.done_tx.take() {
            let _ = tx.send(self.stats());
        }
        Ok(())
    }
}

fn idb(i: &Iface) -> InterfaceDescriptionBlock<'static> {
    let name = if i.ifname.is_empty() {
        format!("ifindex{}", i.ifindex)
    } else {
        i.ifname.clone()
    };
    let netns = if i.netns == 0 {
        "unknown".to_string()
    } else {
        i.netns.to_string()
    };
    InterfaceDescriptionBlock {
        linktype: DataLink::RAW,
        snaplen: SNAPLEN,
        options: vec![
            InterfaceDescriptionOption::IfName(Cow::Owned(name.clone())),
            InterfaceDescriptionOption::IfDescription(Cow::Owned(format!(
                "{name} ifindex={} netns={netns} node={}",
                i.ifindex, i.node
            ))),
            InterfaceDescriptionOption::IfTsResol(9),
        ],
    }
}

fn idb_opt_len(o: &InterfaceDescriptionOption<'_>) -> u64 {
    match o {
        InterfaceDescriptionOption::IfName(s) | InterfaceDescriptionOption::IfDescription(s) => opt_len(s.len()),
        _ => opt_len(1),
    }
}

/// At most `max` bytes, cut at a character boundary.
fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// `s` in pieces of at most `max` bytes, cut at character boundaries.
fn chunks(s: &str, max: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        let mut end = rest.len().min(max);
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        out.push(&rest[..end]);
        rest = &rest[end..];
    }
    out
}

impl<W: Write + Send> Sink for PcapngSink<W> {
    fn on_drop(&mut self, drop: &DropRecord) -> io::Result<()> {
        Ok(self.write_packet(&capture_packet(drop))?)
    }

    fn on_summary(&mut self, summary: &Summary) -> io::Result<()> {
        let json = serde_json::to_string(summary).map_err(io::Error::other)?;
        Ok(self.finish(summary.lost_events, summary.rate_limited_events, &json)?)
    }

    fn on_target_summary(&mut self, summary: &TargetSummary) -> io::Result<()> {
        if !summary.is_final {
            return Ok(());
        }
        let json = serde_json::to_string(summary).map_err(io::Error::other)?;
        let (lost, limited) = summary
            .detail
            .as_ref()
            .map_or((summary.lost_events, 0), |d| (d.lost_events, d.rate_limited_events));
        Ok(self.finish(lost, limited, &json)?)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.writer.get_mut().flush()
    }

    fn done(&self) -> bool {
        self.limits.count.is_some_and(|n| self.stats.packets >= n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        enrich::{
            classify::{Certainty, Classification, Effect},
            record::{CtState, RawDetail, TcpFlags},
        },
        kernel::{
            proto::{IpProto, Protocol},
            reasons::Reason,
            symbols::KernelSymbols,
        },
        resolve::{Name, Peer},
    };

    /// The adapter: the event's time to the nanosecond, the names a reader filters on.
    #[test]
    fn a_record_becomes_a_packet_with_its_verdict() {
        let ep = |a: &str, k8s| Endpoint {
            k8s,
            ..Endpoint::new(a.parse().expect("ip"), Some(80))
        };
        let backend = Peer {
            kind: PeerKind::Pod,
            namespace: Some(Name::new("default")),
            pod: Some(Name::new("web-2")),
            service: Some(Name::new("default/web")),
            ..Peer::default()
        };
        let r = DropRecord {
            kind: "drop",
            time: humantime::parse_rfc3339("2026-11-26T10:21:33.123456789Z").expect("time"),
            node: "node-b".into(),
            reason: Reason::Named {
                code: 12,
                name: "NETFILTER_DROP".into(),
            },
            location: KernelSymbols::parse("ffffffff81a00000 T nft_do_chain\n").locate(0xffff_ffff_81a0_03e8),
            protocol: Protocol::Ip(IpProto::TCP),
            src: Some(ep("10.244.1.2", None)),
            dst: Some(ep("10.244.2.10", Some(backend))),
            ifindex: 4,
            ifname: "cali2c8a6f1d3e0".into(),
            netns: 4_026_532_411,
            len: 60,
            tcp_flags: Some(TcpFlags(TcpFlags::SYN)),
            payload_len: Some(0),
            icmp: None,
            classification: Classification::NetfilterRule,
            certainty: Certainty::Exact,
            effect: Effect::Attempt,
            conntrack: Some(CtState::Confirmed),
            orig_dst: None,
            orig_src: None,
            tag: 0,
            ip_version: 4,
            raw: RawDetail {
                headers: vec![0x45, 0, 0, 60],
                ..RawDetail::default()
            },
        };
        let p = capture_packet(&r);
        assert_eq!(p.ts_ns, 1_795_688_493_123_456_789);
        assert_eq!(p.data, &[0x45, 0, 0, 60]);
        assert_eq!(
            p.iface,
            Iface {
                node: "node-b".into(),
                netns: 4_026_532_411,
                ifindex: 4,
                ifname: "cali2c8a6f1d3e0".into()
            }
        );
        assert_eq!(
            verdict_comment(&p.verdict),
            "netdrop reason=NETFILTER_DROP reason_code=12 classification=netfilter_rule certainty=exact \
             effect=attempt location=nft_do_chain+0x3e8 node=node-b netns=4026532411 ifname=cali2c8a6f1d3e0 \
             proto=tcp src=10.244.1.2:80 dst=10.244.2.10:80 dst_pod=default/web-2 service=default/web \
             conntrack=confirmed tcp_flags=SYN time=2026-11-26T10:21:33.123456789Z"
        );
    }

    #[test]
    fn original_length_comes_from_the_ip_header_and_bounds_the_bytes_kept() {
        let mut v4 = vec![0x45, 0, 0, 60];
        v4.resize(128, 0xaa);
        assert_eq!(
            ip_lengths(&v4),
            Some((60, 60)),
            "trailer bytes past the packet are not kept"
        );
        let mut big = vec![0x45, 0, 0x05, 0xdc];
        big.resize(128, 0);
        assert_eq!(ip_lengths(&big), Some((1500, 128)));
        let mut v6 = vec![0x60, 0, 0, 0, 0, 20];
        v6.resize(128, 0);
        assert_eq!(ip_lengths(&v6), Some((60, 60)));
        assert_eq!(ip_lengths(&[]), None);
        assert_eq!(ip_lengths(&[0x45, 0, 0, 60]), None, "shorter than an IPv4 header");
        assert_eq!(ip_lengths(&[0x08; 40]), None, "not IP");
        let mut bogus = vec![0x45, 0, 0, 8];
        bogus.resize(40, 0);
        assert_eq!(ip_lengths(&bogus), None, "a total length below the header's own");
    }

    #[test]
    fn the_verdict_is_one_line_of_key_value_pairs_without_spaces_in_values() {
        let c = verdict_comment(&[
            ("reason", "NETFILTER_DROP".into()),
            ("location", "nft do chain".into()),
            ("dst_pod", "default/web-2".into()),
        ]);
        assert_eq!(
            c,
            "netdrop reason=NETFILTER_DROP location=nft_do_chain dst_pod=default/web-2"
        );
        assert!(c.starts_with(VERDICT_PREFIX));
    }

    #[test]
    fn the_counts_line_reads_back() {
        let s = CaptureStats {
            packets: 10,
            ring_full: 1,
            rate_limited: 2,
            size_cap: 3,
            count_reached: 4,
            no_ip_header: 5,
            ..CaptureStats::default()
        };
        assert_eq!(CaptureStats::parse(&s.line()), Some(s));
        assert_eq!(s.not_kept(), 15);
        assert_eq!(
            s.describe(),
            "10 packets written; not kept: 15 (ring buffer full 1, over --event-rate 2, over --max-size 3, after --count 4, no IP header 5)"
        );
    }

    #[test]
    fn long_summaries_are_split_at_character_boundaries() {
        let s = "é".repeat(40_000);
        let parts = chunks(&s, CHUNK);
        assert_eq!(parts.len(), 2);
        assert!(parts.iter().all(|p| p.len() <= CHUNK));
        assert_eq!(parts.concat(), s);
    }
}
