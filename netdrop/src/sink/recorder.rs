//! The agent's flight recorder: the last enriched drops (the [`DropRecord`]s every other sink
//! gets) kept in memory, bounded by a count and by bytes, the oldest overwritten first and
//! counted; dumped on request as the same pcapng capture `netdrop capture` writes
//! ([`super::pcapng`]: one interface block per namespace and interface, the verdict comment on
//! each packet), whose trailer says how many records were overwritten (`overwritten=` in the
//! `netdrop.capture` line, part of the not-kept count) and carries the agent's summary, so
//! `netdrop report` and tshark read a dump as they read a capture.
//!
//! Owns the ring and the dump's bytes; when and where a dump is written (HTTP, SIGUSR1, a
//! drop-rate trigger) is `netdrop agent`'s.

use std::{
    collections::VecDeque,
    io::{self, Write},
    mem::size_of,
    sync::{Arc, Mutex, PoisonError},
};

use super::{
    Sink,
    pcapng::{CaptureStats, Limits, PcapngError, PcapngSink, capture_packet},
};
use crate::{
    aggregate::{Summary, target_summary::TargetSummary},
    enrich::record::DropRecord,
};

/// How much the recorder keeps; either bound at 0 turns it off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecorderLimits {
    /// The most records kept.
    pub events: usize,
    /// The most bytes of records kept in memory ([`weight`]).
    pub bytes: u64,
}

/// The memory one record holds: the record itself, the `Arc` around it, and what it owns on
/// the heap (the captured headers, the node and interface names). Names shared with the
/// resolver's tables (`Arc<str>`) are not counted: they are not the recorder's.
pub fn weight(r: &DropRecord) -> u64 {
    (size_of::<DropRecord>()
        + 2 * size_of::<usize>()
        + r.raw.headers.capacity()
        + r.node.capacity()
        + r.ifname.capacity()) as u64
}

/// The ring: records oldest first.
#[derive(Debug)]
struct Ring {
    limits: RecorderLimits,
    records: VecDeque<(Arc<DropRecord>, u64)>,
    bytes: u64,
    /// Records pushed out by newer ones (or too big to keep) since the start.
    overwritten: u64,
    /// Records received since the start.
    seen: u64,
}

/// The flight recorder, shared by the sink that fills it and whoever dumps it.
#[derive(Clone, Debug)]
pub struct Recorder {
    ring: Arc<Mutex<Ring>>,
}

/// What the recorder held at one instant.
#[derive(Clone, Debug, Default)]
pub struct RecorderSnapshot {
    /// Oldest first.
    pub records: Vec<Arc<DropRecord>>,
    pub overwritten: u64,
    pub seen: u64,
    /// The memory they hold ([`weight`]).
    pub bytes: u64,
}

impl Recorder {
    /// `None` when either bound is 0 (the recorder is off).
    pub fn new(limits: RecorderLimits) -> Option<Self> {
        (limits.events > 0 && limits.bytes > 0).then(|| Self {
            ring: Arc::new(Mutex::new(Ring {
                limits,
                records: VecDeque::with_capacity(limits.events.min(4096)),
                bytes: 0,
                overwritten: 0,
                seen: 0,
            })),
        })
    }

    /// The ring holds plain data that a panicking holder cannot leave half-updated in a way
    /// that matters (a count off by one at worst): keep recording.
    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps `r`, pushing out the oldest records while either bound is exceeded.
    pub fn push(&self, r: &DropRecord) {
        let w = weight(r);
        let mut ring = self.lock();
        ring.seen += 1;
        if w > ring.limits.bytes {
            // Bigger than the whole budget: never kept, counted as overwritten at once.
            ring.overwritten += 1;
            return;
        }
        while ring.records.len() >= ring.limits.events || ring.bytes + w > ring.limits.bytes {
            let Some((_, old)) = ring.records.pop_front() else {
                break;
            };
            ring.bytes -= old;
            ring.overwritten += 1;
        }
        ring.bytes += w;
        ring.records.push_back((Arc::new(r.clone()), w));
    }

    /// Records received since the start (the trigger's rate is measured on it).
    pub fn seen(&self) -> u64 {
        self.lock().seen
    }

    /// What the recorder holds now; cheap (the records are shared, not copied).
    pub fn snapshot(&self) -> RecorderSnapshot {
        let ring = self.lock();
        RecorderSnapshot {
            records: ring.records.iter().map(|(r, _)| Arc::clone(r)).collect(),
            overwritten: ring.overwritten,
            seen: ring.seen,
            bytes: ring.bytes,
        }
    }

    /// The sink that fills the recorder from the pipeline.
    pub fn sink(&self) -> RecorderSink {
        RecorderSink(self.clone())
    }
}

/// Feeds every drop the pipeline writes out to the recorder.
pub struct RecorderSink(Recorder);

impl Sink for RecorderSink {
    fn on_drop(&mut self, drop: &DropRecord) -> io::Result<()> {
        self.0.push(drop);
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

/// A dump to write: the recorder's records and what the trailer says about them.
#[derive(Clone, Debug, Default)]
pub struct Dump {
    pub snapshot: RecorderSnapshot,
    /// The first section's comment: what the file is, on which node, why it was dumped.
    pub about: String,
    /// Events the kernel could not send (ring buffer full) since the agent started.
    pub lost: u64,
    /// Events the kernel did not send (`--event-rate`) since the agent started.
    pub rate_limited: u64,
    /// The agent's summary at the dump (the `-o json` summary line), for `netdrop report`.
    pub summary_json: String,
}

impl Dump {
    /// Writes the dump as a pcapng capture; returns what it kept and did not.
    pub fn write<W: Write + Send>(&self, out: W) -> Result<CaptureStats, PcapngError> {
        let mut sink = PcapngSink::new(out, Limits::default(), &self.about, None)
            .map_err(|e| PcapngError::Write(pcap_file::PcapError::IoError(e)))?;
        for r in &self.snapshot.records {
            sink.write_packet(&capture_packet(r))?;
        }
        sink.set_overwritten(self.snapshot.overwritten);
        sink.finish(self.lost, self.rate_limited, &self.summary_json)?;
        Ok(sink.stats())
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use pcap_file::pcapng::{
        Block, PcapNgParser,
        blocks::{enhanced_packet::EnhancedPacketOption, section_header::SectionHeaderOption},
    };

    use super::*;
    use crate::{
        enrich::{
            classify::{Certainty, Classification, Effect},
            record::{Endpoint, RawDetail},
        },
        kernel::{
            proto::{IpProto, Protocol},
            reasons::Reason,
            symbols::KernelSymbols,
        },
    };

    /// A UDP datagram to 127.0.0.1:9 whose source port is its sequence number.
    fn record(seq: u16) -> DropRecord {
        let mut headers = vec![0x45, 0, 0, 32, 0, 0, 0, 0, 64, 17, 0, 0, 127, 0, 0, 1, 127, 0, 0, 1];
        headers.extend_from_slice(&seq.to_be_bytes());
        headers.extend_from_slice(&[0, 9, 0, 12, 0, 0, b's', b'e', b'q', b'!']);
        DropRecord {
            kind: "drop",
            time: UNIX_EPOCH + Duration::from_secs(1_795_000_000) + Duration::from_millis(u64::from(seq)),
            node: "node-a".into(),
            reason: Reason::Named {
                code: 2,
                name: "NO_SOCKET".into(),
            },
            location: KernelSymbols::parse("ffffffff81a00000 T __udp4_lib_rcv\n").locate(0xffff_ffff_81a0_04bc),
            protocol: Protocol::Ip(IpProto::UDP),
            src: Some(Endpoint::new([127, 0, 0, 1].into(), Some(seq))),
            dst: Some(Endpoint::new([127, 0, 0, 1].into(), Some(9))),
            ifindex: 1,
            ifname: "lo".into(),
            netns: 4_026_532_411,
            len: 32,
            tcp_flags: None,
            payload_len: Some(4),
            icmp: None,
            classification: Classification::Reason(Reason::Named {
                code: 2,
                name: "NO_SOCKET".into(),
            }),
            certainty: Certainty::Exact,
            effect: Effect::Attempt,
            conntrack: None,
            orig_dst: None,
            orig_src: None,
            tag: 0,
            ip_version: 4,
            raw: RawDetail {
                headers,
                ..RawDetail::default()
            },
        }
    }

    fn seqs(s: &RecorderSnapshot) -> Vec<u16> {
        s.records
            .iter()
            .map(|r| r.src.as_ref().and_then(|e| e.port).expect("port"))
            .collect()
    }

    fn limits(events: usize, bytes: u64) -> RecorderLimits {
        RecorderLimits { events, bytes }
    }

    #[test]
    fn a_zero_bound_turns_the_recorder_off() {
        assert!(Recorder::new(limits(0, 1 << 20)).is_none());
        assert!(Recorder::new(limits(10, 0)).is_none());
        assert!(Recorder::new(limits(10, 1 << 20)).is_some());
    }

    #[test]
    fn the_newest_records_are_kept_up_to_the_count_and_the_rest_counted_as_overwritten() {
        let r = Recorder::new(limits(5, 1 << 20)).expect("on");
        for seq in 0..3 {
            r.push(&record(seq));
        }
        let s = r.snapshot();
        assert_eq!((seqs(&s), s.overwritten, s.seen), (vec![0, 1, 2], 0, 3));
        for seq in 3..12 {
            r.push(&record(seq));
        }
        let s = r.snapshot();
        assert_eq!(seqs(&s), vec![7, 8, 9, 10, 11], "the newest 5, oldest first");
        assert_eq!((s.overwritten, s.seen), (7, 12), "overwritten = seen − kept");
        assert_eq!(s.bytes, 5 * weight(&record(0)));
    }

    #[test]
    fn the_byte_bound_holds_whatever_the_count_allows() {
        let w = weight(&record(0));
        // Room for 3 records and a half.
        let r = Recorder::new(limits(1000, 3 * w + w / 2)).expect("on");
        for seq in 0..10 {
            r.push(&record(seq));
            assert!(r.snapshot().bytes <= 3 * w + w / 2);
        }
        let s = r.snapshot();
        assert_eq!(seqs(&s), vec![7, 8, 9]);
        assert_eq!((s.overwritten, s.bytes), (7, 3 * w));
        // A record bigger than the whole budget is not kept, and counted.
        let mut big = record(10);
        big.raw.headers = vec![0; 8 * w as usize];
        r.push(&big);
        let s = r.snapshot();
        assert_eq!((seqs(&s), s.overwritten, s.seen), (vec![7, 8, 9], 8, 11));
    }

    #[test]
    fn the_weight_counts_the_owned_bytes() {
        let mut r = record(0);
        r.raw.headers = vec![0; 30];
        let base = weight(&r);
        r.raw.headers = vec![0; 130];
        assert_eq!(weight(&r), base + 100);
        assert!(base > size_of::<DropRecord>() as u64);
    }

    #[test]
    fn a_dump_is_a_capture_that_says_what_was_overwritten() {
        let r = Recorder::new(limits(4, 1 << 20)).expect("on");
        for seq in 0..10 {
            r.push(&record(seq));
        }
        let dump = Dump {
            snapshot: r.snapshot(),
            about: "netdrop agent flight recorder".into(),
            lost: 1,
            rate_limited: 2,
            summary_json: String::new(),
        };
        let mut out = Vec::new();
        let stats = dump.write(&mut out).expect("write");
        assert_eq!(stats.packets, 4);
        assert_eq!(stats.overwritten, Some(6));
        assert_eq!(stats.not_kept(), 6 + 1 + 2);
        // Read back as a reader sees it: 4 packets with their verdicts, the trailer's counts.
        let (mut rest, mut parser) = PcapNgParser::new(&out).expect("pcapng");
        let (mut packets, mut trailer) = (0, None);
        while !rest.is_empty() {
            let (next, block) = parser.next_block(rest).expect("a block");
            rest = next;
            match block {
                Block::EnhancedPacket(epb) => {
                    packets += 1;
                    assert!(epb.options.iter().any(|o| matches!(o,
                        EnhancedPacketOption::Comment(c) if c.starts_with("netdrop reason=NO_SOCKET "))));
                }
                Block::SectionHeader(shb) => {
                    for o in &shb.options {
                        if let SectionHeaderOption::Comment(c) = o
                            && let Some(s) = CaptureStats::parse(c)
                        {
                            trailer = Some(s);
                        }
                    }
                }
                _ => {}
            }
        }
        assert_eq!(packets, 4);
        let back = trailer.expect("the trailer");
        assert_eq!(back.overwritten, Some(6));
        assert_eq!((back.ring_full, back.rate_limited), (1, 2));
        assert!(
            back.describe().contains("overwritten by newer drops 6"),
            "{}",
            back.describe()
        );
    }
}
