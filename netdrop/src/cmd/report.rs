//! `netdrop report FILE.pcapng`: the summary, per-target table and diagnosis of a capture,
//! re-rendered offline (no BPF, no cluster) from what `netdrop capture` wrote into the file
//! ([`crate::sink::pcapng`]), with what the file's packets say beside it. Given a bundle
//! (`capture --bundle`, a tarball or its directory, [`crate::sink::bundle`]): the same from its
//! summary and capture, and a listing of its node-state items.

use std::{
    collections::BTreeMap,
    io::{self, Write as _},
    path::{Path, PathBuf},
};

use pcap_file::pcapng::{Block, PcapNgParser, blocks::enhanced_packet::EnhancedPacketOption};
use serde::Serialize;

use crate::{
    aggregate::{Summary, target_summary::TargetSummary},
    cli::{Format, ReportArgs},
    sink::{
        Sink as _, TextSink,
        bundle::{self, BundleError, BundleFiles, Manifest},
        pcapng::{CaptureStats, KEPT_PREFIX, SUMMARY_PREFIX, VERDICT_PREFIX},
    },
};

/// Why a file cannot be reported on. Each is one line naming the file.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Not a pcapng file at all.
    #[error("{path} is not a pcapng capture ({why}): give a file written by `netdrop capture`")]
    NotPcapng { path: PathBuf, why: String },
    /// A block cannot be read: the file was cut short or changed.
    #[error(
        "{path} is damaged at byte {offset} of {len} ({why}) after {packets} packets: truncated or corrupted; nothing was reported"
    )]
    Damaged {
        path: PathBuf,
        offset: usize,
        len: usize,
        why: String,
        packets: u64,
    },
    /// The trailer's summary does not parse.
    #[error("{path}: the summary it carries does not parse ({why}): corrupted")]
    Summary { path: PathBuf, why: String },
    #[error("writing the report")]
    Write(#[source] io::Error),
}

/// What a capture file holds.
#[derive(Debug, Default)]
pub struct CaptureFile {
    pub packets: u64,
    pub interfaces: u64,
    /// Packets per verdict `reason=`.
    pub by_reason: BTreeMap<String, u64>,
    /// The trailer's counts (absent when the capture did not finish).
    pub stats: Option<CaptureStats>,
    /// The trailer's summary: the JSON line `-o json` printed at the end of the run.
    pub summary_json: Option<String>,
}

/// The summary a capture carries.
#[derive(Debug)]
pub enum CarriedSummary {
    Drops(Box<Summary>),
    Target(Box<TargetSummary>),
}

/// Reads a capture from its bytes; no I/O, so it is tested on damaged input without files.
pub fn read_capture(bytes: &[u8], path: &Path) -> Result<CaptureFile, ReportError> {
    let (mut rest, mut parser) = PcapNgParser::new(bytes).map_err(|e| ReportError::NotPcapng {
        path: path.to_path_buf(),
        why: e.to_string(),
    })?;
    let mut out = CaptureFile::default();
    let mut chunks: Vec<(usize, usize, String)> = Vec::new();
    let mut interfaces_in_section = 0_u32;
    while !rest.is_empty() {
        let offset = bytes.len() - rest.len();
        let damaged = |why: String, packets| ReportError::Damaged {
            path: path.to_path_buf(),
            offset,
            len: bytes.len(),
            why,
            packets,
        };
        let (next, block) = parser
            .next_block(rest)
            .map_err(|e| damaged(e.to_string(), out.packets))?;
        rest = next;
        match block {
            Block::SectionHeader(shb) => {
                interfaces_in_section = 0;
                for o in &shb.options {
                    let pcap_file::pcapng::blocks::section_header::SectionHeaderOption::Comment(c) = o else {
                        continue;
                    };
                    if c.starts_with(KEPT_PREFIX) {
                        out.stats = CaptureStats::parse(c);
                    } else if let Some(chunk) = c.strip_prefix(SUMMARY_PREFIX) {
                        let (pos, body) = chunk.split_once(' ').unwrap_or((chunk, ""));
                        let (i, n) = pos.split_once('/').unwrap_or(("0", "0"));
                        let (Ok(i), Ok(n)) = (i.parse(), n.parse()) else {
                            return Err(damaged(format!("summary chunk {pos:?}"), out.packets));
                        };
                        chunks.push((i, n, body.to_string()));
                    }
                }
            }
            Block::InterfaceDescription(_) => {
                interfaces_in_section += 1;
                out.interfaces += 1;
            }
            Block::EnhancedPacket(epb) => {
                if epb.interface_id >= interfaces_in_section {
                    return Err(damaged(
                        format!("packet of interface {} that was not described", epb.interface_id),
                        out.packets,
                    ));
                }
                if epb.data.len() > epb.original_len as usize {
                    return Err(damaged(
                        format!(
                            "a packet of {} bytes captured from {} bytes",
                            epb.data.len(),
                            epb.original_len
                        ),
                        out.packets,
                    ));
                }
                out.packets += 1;
                let reason = epb.options.iter().find_map(|o| match o {
                    EnhancedPacketOption::Comment(c) if c.starts_with(VERDICT_PREFIX) => c
                        .split_whitespace()
                        .find_map(|kv| kv.strip_prefix("reason="))
                        .map(str::to_string),
                    _ => None,
                });
                *out.by_reason.entry(reason.unwrap_or_else(|| "-".into())).or_default() += 1;
            }
            _ => {}
        }
    }
    if !chunks.is_empty() {
        chunks.sort_by_key(|c| c.0);
        let n = chunks[0].1;
        let complete = chunks.len() == n && chunks.iter().enumerate().all(|(k, c)| c.0 == k + 1 && c.1 == n);
        if !complete {
            return Err(ReportError::Summary {
                path: path.to_path_buf(),
                why: format!("{} of its {n} pieces", chunks.len()),
            });
        }
        out.summary_json = Some(chunks.into_iter().map(|c| c.2).collect());
    }
    Ok(out)
}

/// Parses the carried summary. The summary's `&'static str` fields borrow from their input,
/// so the text is leaked: `report` is one-shot and reads one summary.
pub fn parse_summary(json: &str, path: &Path) -> Result<CarriedSummary, ReportError> {
    let leaked: &'static str = Box::leak(json.to_string().into_boxed_str());
    let err = |e: serde_json::Error| ReportError::Summary {
        path: path.to_path_buf(),
        why: e.to_string(),
    };
    let v: serde_json::Value = serde_json::from_str(leaked).map_err(err)?;
    if v.get("service").is_some() {
        Ok(CarriedSummary::Target(Box::new(
            serde_json::from_str(leaked).map_err(err)?,
        )))
    } else {
        Ok(CarriedSummary::Drops(Box::new(
            serde_json::from_str(leaked).map_err(err)?,
        )))
    }
}

/// The `{"type":"capture",...}` line of `report -o json`.
#[derive(Serialize)]
struct CaptureLine<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    packets: u64,
    interfaces: u64,
    by_reason: &'a BTreeMap<String, u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    not_kept: Option<&'a CaptureStats>,
    finished: bool,
}

/// A bundle: a directory, or a file starting with gzip's magic bytes.
fn is_bundle(path: &Path) -> bool {
    path.is_dir()
        || std::fs::File::open(path)
            .and_then(|mut f| {
                let mut magic = [0_u8; 2];
                io::Read::read_exact(&mut f, &mut magic).map(|()| magic)
            })
            .is_ok_and(|m| m == [0x1f, 0x8b])
}

pub fn run(args: &ReportArgs) -> anyhow::Result<()> {
    let (file, bundle) = if is_bundle(&args.file) {
        let b = bundle::read(&args.file)?;
        let Some(capture) = b.capture.as_deref() else {
            return Err(BundleError::Missing {
                path: args.file.clone(),
                name: bundle::CAPTURE,
            }
            .into());
        };
        let mut file = read_capture(capture, &args.file.join(bundle::CAPTURE))?;
        // The bundle's summary.json is the run's final line; the capture's trailer carries the
        // same when the capture finished.
        if let Some(s) = &b.summary {
            file.summary_json = Some(s.clone());
        }
        (file, Some(b))
    } else {
        let bytes = std::fs::read(&args.file).map_err(|source| ReportError::Read {
            path: args.file.clone(),
            source,
        })?;
        (read_capture(&bytes, &args.file)?, None)
    };
    let summary = file
        .summary_json
        .as_deref()
        .map(|j| parse_summary(j, &args.file))
        .transpose()?;
    match args.output {
        Format::Json => {
            let mut out = io::BufWriter::new(io::stdout().lock());
            if let Some(j) = &file.summary_json {
                writeln!(out, "{j}").map_err(ReportError::Write)?;
            }
            let line = CaptureLine {
                kind: "capture",
                packets: file.packets,
                interfaces: file.interfaces,
                by_reason: &file.by_reason,
                not_kept: file.stats.as_ref(),
                finished: summary.is_some(),
            };
            serde_json::to_writer(&mut out, &line)?;
            writeln!(out).map_err(ReportError::Write)?;
            if let Some(m) = bundle.as_ref().and_then(|b| b.manifest.as_ref()) {
                serde_json::to_writer(&mut out, &BundleLine::of(m))?;
                writeln!(out).map_err(ReportError::Write)?;
            }
            out.flush().map_err(ReportError::Write)?;
        }
        Format::Text => {
            let mut text = TextSink::for_stdout(io::stdout());
            match &summary {
                Some(CarriedSummary::Drops(s)) => text.on_summary(s).map_err(ReportError::Write)?,
                Some(CarriedSummary::Target(s)) => text.on_target_summary(s).map_err(ReportError::Write)?,
                None => {}
            }
            let mut out = io::stdout().lock();
            let reasons: Vec<String> = file.by_reason.iter().map(|(r, n)| format!("{r} {n}")).collect();
            let kept = file.stats.map_or_else(
                || "the capture did not finish (no summary in the file: netdrop was stopped before the end?)".into(),
                |s| s.describe(),
            );
            writeln!(
                out,
                "capture {}: {} packets on {} interface(s) ({}); {kept}",
                args.file.display(),
                file.packets,
                file.interfaces,
                if reasons.is_empty() {
                    "none".into()
                } else {
                    reasons.join(", ")
                },
            )
            .map_err(ReportError::Write)?;
            if let Some(b) = &bundle {
                for line in bundle_listing(&args.file, b) {
                    writeln!(out, "{line}").map_err(ReportError::Write)?;
                }
            }
        }
    }
    Ok(())
}

/// The `{"type":"bundle",...}` line of `report -o json` on a bundle.
#[derive(Serialize)]
struct BundleLine<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    node: &'a str,
    created: &'a str,
    items: usize,
    namespaces: Vec<&'a str>,
    /// Items that did not run, or exited non-zero.
    failed: Vec<&'a str>,
    truncated: Vec<&'a str>,
}

impl<'a> BundleLine<'a> {
    fn of(m: &'a Manifest) -> Self {
        Self {
            kind: "bundle",
            node: &m.node,
            created: &m.created,
            items: m.items.len(),
            namespaces: m.namespaces.iter().map(|n| n.label.as_str()).collect(),
            failed: m.items.iter().filter(|i| i.failed()).map(|i| i.file.as_str()).collect(),
            truncated: m
                .items
                .iter()
                .filter(|i| i.truncated)
                .map(|i| i.file.as_str())
                .collect(),
        }
    }
}

fn kib(bytes: u64) -> String {
    if bytes < 10 * 1024 {
        format!("{bytes} B")
    } else {
        format!("{} KiB", bytes / 1024)
    }
}

/// A short listing of a bundle's node state: one line per namespace, the node's items, the
/// Kubernetes objects.
fn bundle_listing(path: &Path, b: &BundleFiles) -> Vec<String> {
    let Some(m) = &b.manifest else { return Vec::new() };
    let total: u64 = b.entries.values().sum();
    let mut lines = vec![format!(
        "bundle {}: {} items, {} in {} files, from {} on {} ({})",
        path.display(),
        m.items.len(),
        kib(total),
        b.entries.len(),
        m.node,
        m.created,
        m.command,
    )];
    let why = |i: &crate::source::node_state::ManifestEntry| {
        let name = i.file.rsplit('/').next().unwrap_or(&i.file).trim_end_matches(".out");
        match (&i.error, i.exit_code) {
            (Some(e), _) => format!("{name} ({e})"),
            (None, Some(c)) => format!("{name} (exit {c})"),
            (None, None) => name.to_string(),
        }
    };
    for ns in &m.namespaces {
        let items: Vec<_> = m
            .items
            .iter()
            .filter(|i| i.netns.as_deref() == Some(ns.label.as_str()))
            .collect();
        let bytes: u64 = items.iter().map(|i| i.bytes + i.stderr_bytes).sum();
        let bad: Vec<String> = items.iter().filter(|i| i.failed()).map(|i| why(i)).collect();
        let cut: Vec<&str> = items
            .iter()
            .filter(|i| i.truncated)
            .map(|i| i.file.rsplit('/').next().unwrap_or(&i.file))
            .collect();
        lines.push(format!(
            "  netns {} (inode {}, {}): {} items, {}{}{}",
            ns.label,
            ns.inode,
            ns.why,
            items.len(),
            kib(bytes),
            if bad.is_empty() {
                String::new()
            } else {
                format!("; failed: {}", bad.join(", "))
            },
            if cut.is_empty() {
                String::new()
            } else {
                format!("; cut at the cap: {}", cut.join(", "))
            },
        ));
    }
    let node: Vec<_> = m
        .items
        .iter()
        .filter(|i| i.netns.is_none() && i.file.starts_with("node/"))
        .collect();
    let cni: Vec<_> = node.iter().filter(|i| i.file.starts_with("node/cni/")).collect();
    let redacted: u64 = cni.iter().map(|i| i.redactions).sum();
    let bad: Vec<String> = node.iter().filter(|i| i.failed()).map(|i| why(i)).collect();
    lines.push(format!(
        "  node: {} items (CNI: {} files, {redacted} secrets redacted){}",
        node.len(),
        cni.len(),
        if bad.is_empty() {
            String::new()
        } else {
            format!("; failed: {}", bad.join(", "))
        },
    ));
    if let Some(k) = m.items.iter().find(|i| i.file == bundle::KUBE) {
        lines.push(match &k.error {
            Some(e) => format!("  kubernetes objects: none ({e})"),
            None => format!(
                "  kubernetes objects: {} ({}; replay with --kube-snapshot)",
                kib(k.bytes),
                bundle::KUBE
            ),
        });
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::pcapng::{CapturePacket, Iface, Limits, PcapngSink};

    const GOLDEN: &str = include_str!("../../tests/golden/lines.jsonl");

    fn packet(data: &[u8], ifname: &str, reason: &str) -> CapturePacket<'static> {
        CapturePacket {
            ts_ns: 1_764_152_493_123_456_789,
            data: Box::leak(data.to_vec().into_boxed_slice()),
            iface: Iface {
                node: "node-a".into(),
                netns: 4_026_532_177,
                ifindex: 7,
                ifname: ifname.into(),
            },
            verdict: vec![("reason", reason.into()), ("dst_pod", "default/web-2".into())],
        }
    }

    fn v4(len: u16) -> Vec<u8> {
        let mut p = vec![0x45, 0, (len >> 8) as u8, len as u8];
        p.resize(usize::from(len).min(128), 0);
        p
    }

    fn v6(payload: u16) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0, (payload >> 8) as u8, payload as u8];
        p.resize((40 + usize::from(payload)).min(128), 0);
        p
    }

    /// A capture of 3 packets on 2 interfaces, one over `--count`, one without IP, and a summary.
    fn capture(summary: &str) -> Vec<u8> {
        let limits = Limits {
            count: Some(3),
            max_bytes: None,
        };
        let mut sink = PcapngSink::new(Vec::new(), limits, "netdrop capture: test", None).expect("sink");
        for p in [
            packet(&v4(1500), "cali1", "NETFILTER_DROP"),
            packet(&v6(20), "cali1", "NO_SOCKET"),
            packet(&[0x08, 0x06], "eth0", "NOT_SPECIFIED"),
            packet(&v4(40), "eth0", "NETFILTER_DROP"),
            packet(&v4(40), "eth0", "NETFILTER_DROP"),
        ] {
            sink.write_packet(&p).expect("write");
        }
        sink.finish(7, 2, summary).expect("finish");
        sink.into_inner()
    }

    fn summaries() -> Vec<&'static str> {
        GOLDEN.lines().filter(|l| l.contains(r#""type":"summary""#)).collect()
    }

    #[test]
    fn every_summary_line_reads_back_to_the_same_bytes() {
        let lines = summaries();
        assert!(lines.len() >= 3, "the golden file has the plain and --svc summaries");
        for line in lines {
            let back = match parse_summary(line, Path::new("t")).expect("parses") {
                CarriedSummary::Drops(s) => serde_json::to_string(&s),
                CarriedSummary::Target(s) => serde_json::to_string(&s),
            }
            .expect("serializes");
            assert_eq!(back, line);
        }
    }

    #[test]
    fn a_capture_reads_back_with_its_counts_and_summary() {
        let summary = summaries().last().copied().expect("a summary");
        let bytes = capture(summary);
        let f = read_capture(&bytes, Path::new("t.pcapng")).expect("reads");
        assert_eq!((f.packets, f.interfaces), (3, 2));
        assert_eq!(f.by_reason["NETFILTER_DROP"], 2);
        assert_eq!(f.by_reason["NO_SOCKET"], 1);
        let stats = f.stats.expect("the trailer's counts");
        assert_eq!(
            (
                stats.packets,
                stats.ring_full,
                stats.rate_limited,
                stats.count_reached,
                stats.no_ip_header
            ),
            (3, 7, 2, 1, 1)
        );
        assert_eq!(f.summary_json.as_deref(), Some(summary));
    }

    #[test]
    fn a_size_cap_keeps_the_file_under_it_and_counts_the_rest() {
        let limits = Limits {
            count: None,
            max_bytes: Some(1000),
        };
        let mut sink = PcapngSink::new(Vec::new(), limits, "t", None).expect("sink");
        for _ in 0..20 {
            sink.write_packet(&packet(&v4(1500), "cali1", "NO_SOCKET"))
                .expect("write");
        }
        let before_trailer = sink.stats();
        assert!(before_trailer.bytes <= 1000, "{before_trailer:?}");
        assert_eq!(before_trailer.packets + before_trailer.size_cap, 20);
        assert!(before_trailer.packets > 0 && before_trailer.size_cap > 0);
        sink.finish(0, 0, "{}").expect("finish");
        let f = read_capture(&sink.into_inner(), Path::new("t")).expect("reads");
        assert_eq!(f.packets, before_trailer.packets);
        assert_eq!(f.stats.map(|s| s.size_cap), Some(before_trailer.size_cap));
    }

    #[test]
    fn a_summary_longer_than_one_option_is_split_and_joined() {
        let long = format!("{{\"x\":\"{}\"}}", "y".repeat(150_000));
        let f = read_capture(&capture(&long), Path::new("t")).expect("reads");
        assert_eq!(f.summary_json.as_deref(), Some(long.as_str()));
    }

    /// Cut anywhere or changed anywhere: an error or a shorter capture, never a panic; cut
    /// inside a block: the error names the offset.
    #[test]
    fn damaged_files_give_one_error_and_never_panic() {
        let bytes = capture(summaries()[0]);
        let whole = read_capture(&bytes, Path::new("t")).expect("reads");
        let mut errors = 0;
        for cut in 0..bytes.len() {
            match read_capture(&bytes[..cut], Path::new("t")) {
                Err(e) => {
                    errors += 1;
                    let msg = e.to_string();
                    assert!(!msg.contains('\n'), "one line: {msg}");
                    assert!(
                        matches!(e, ReportError::NotPcapng { .. } | ReportError::Damaged { .. }),
                        "{msg}"
                    );
                }
                // Only at a block boundary: a capture stopped early, without its summary.
                Ok(f) => assert!(f.packets <= whole.packets && f.summary_json.is_none(), "cut at {cut}"),
            }
        }
        assert!(errors > bytes.len() * 9 / 10, "{errors} of {}", bytes.len());
        for i in 0..bytes.len() {
            for v in [0x00, 0xff, 0x7f] {
                let mut b = bytes.clone();
                b[i] = v;
                let _ = read_capture(&b, Path::new("t")).and_then(|f| {
                    f.summary_json
                        .as_deref()
                        .map(|j| parse_summary(j, Path::new("t")))
                        .transpose()
                });
            }
        }
    }
}
