//! Ring-buffer bytes → [`DropRecord`]. No syscalls: everything the decoder needs (reason table,
//! symbols, clock offset, node name) is handed to it.

use std::{
    mem::size_of,
    net::IpAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use etherparse::{LaxNetSlice, LaxSlicedPacket, TransportSlice};
use netdrop_common::{DropEvent, ct};

use crate::{
    enrich::classify::{Certainty, Classification, Effect},
    enrich::record::{CtState, DropRecord, Endpoint, Icmp, RawDetail, TcpFlags},
    kernel::proto::{IpProto, Protocol},
    kernel::reasons::ReasonTable,
    kernel::symbols::{KernelSymbols, Location},
};

/// A ring-buffer record shorter than a [`DropEvent`]: a kernel/user version mismatch.
#[derive(Debug, thiserror::Error)]
#[error("ring buffer record of {got} bytes, expected {want}: kernel programs and netdrop disagree")]
pub struct ShortRecord {
    pub got: usize,
    pub want: usize,
}

/// Reads a [`DropEvent`] out of a ring-buffer record.
pub fn parse_event(bytes: &[u8]) -> Result<DropEvent, ShortRecord> {
    if bytes.len() < size_of::<DropEvent>() {
        return Err(ShortRecord {
            got: bytes.len(),
            want: size_of::<DropEvent>(),
        });
    }
    // SAFETY: length checked; DropEvent is plain old data (integers and byte arrays), any bit
    // pattern is valid; read_unaligned because ring-buffer records are only 8-byte aligned.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<DropEvent>()) })
}

/// Turns kernel events into records.
#[derive(Clone)]
pub struct Decoder {
    pub reasons: Arc<ReasonTable>,
    pub symbols: Arc<KernelSymbols>,
    /// CLOCK_REALTIME − CLOCK_MONOTONIC, nanoseconds.
    pub clock_offset_ns: i128,
    pub node: String,
    /// The kernel programs read conntrack entries (so `conntrack` is meaningful).
    pub conntrack: bool,
}

/// 4, 6, or 0 for an skb without an IP header (as the kernel keys its counters).
pub fn ip_version(ev: &DropEvent) -> u8 {
    match (ev.header_len, ev.l3_proto) {
        (0, _) => 0,
        (_, 0x0800) => 4,
        _ => 6,
    }
}

impl Decoder {
    /// The record of an event whose location was looked up once, by the caller (it decides
    /// visibility with it first). Classification is the next stage's: until then the record
    /// says `unclassified`.
    pub fn decode(&self, ev: &DropEvent, location: Location) -> DropRecord {
        let header_len = usize::from(ev.header_len).min(ev.headers.len());
        let headers = &ev.headers[..header_len];
        let pkt = decode_headers(ev.l3_proto, headers);
        let (orig_src, orig_dst) = pre_nat(ev, pkt.src.as_ref(), pkt.dst.as_ref());
        DropRecord {
            kind: "drop",
            time: self.wall_time(ev.ts_ns),
            node: self.node.clone(),
            reason: self.reasons.reason(ev.reason),
            location,
            protocol: pkt.protocol,
            src: pkt.src,
            dst: pkt.dst,
            ifindex: ev.ifindex,
            ifname: ifname(&ev.ifname),
            netns: ev.netns,
            len: ev.skb_len,
            tcp_flags: pkt.tcp_flags,
            payload_len: pkt.payload_len,
            icmp: pkt.icmp,
            // The classify stage fills these in.
            classification: Classification::Unclassified,
            certainty: Certainty::Inferred,
            effect: Effect::from_raw(ev.effect),
            conntrack: self.conntrack.then(|| CtState::from_raw(ev.ct_state)),
            orig_dst,
            orig_src,
            tag: ev.tag,
            ip_version: ip_version(ev),
            raw: RawDetail {
                ts_ns: ev.ts_ns,
                location: ev.location,
                skb_addr: ev.skb_addr,
                cpu: ev.cpu,
                l3_proto: ev.l3_proto,
                ct_state: ev.ct_state,
                ct_info: ev.ct_info,
                kernel_class: ev.exact_class,
                headers: headers.to_vec(),
            },
        }
    }

    fn wall_time(&self, mono_ns: u64) -> SystemTime {
        let ns = i128::from(mono_ns) + self.clock_offset_ns;
        SystemTime::UNIX_EPOCH + Duration::from_nanos(ns.max(0) as u64)
    }
}

/// The flow's pre-NAT source and destination, where NAT changed them. Only for packets in the
/// original direction (`ctinfo` < `IP_CT_IS_REPLY`): for those, the entry's original tuple is
/// what the sender addressed.
pub fn pre_nat(ev: &DropEvent, src: Option<&Endpoint>, dst: Option<&Endpoint>) -> (Option<Endpoint>, Option<Endpoint>) {
    const IP_CT_IS_REPLY: u8 = 3;
    let state = ev.ct_state & ct::STATE_MASK;
    if !(state == ct::UNCONFIRMED || state == ct::CONFIRMED) || ev.ct_info >= IP_CT_IS_REPLY {
        return (None, None);
    }
    let t = &ev.ct_orig;
    let ip = |raw: &[u8; 16]| -> Option<IpAddr> {
        match t.l3num {
            2 => Some(IpAddr::from([raw[0], raw[1], raw[2], raw[3]])),
            10 => Some(IpAddr::from(*raw)),
            _ => None,
        }
    };
    let has_ports = IpProto(t.protonum).has_ports();
    let ep = |raw: &[u8; 16], port: u16| ip(raw).map(|ip| Endpoint::new(ip, has_ports.then_some(u16::from_be(port))));
    let differs = |orig: &Option<Endpoint>, now: Option<&Endpoint>| match (orig, now) {
        (Some(o), Some(n)) => o.ip != n.ip || (o.port.is_some() && o.port != n.port),
        _ => false,
    };
    let (os, od) = (ep(&t.src, t.src_port), ep(&t.dst, t.dst_port));
    let os = if differs(&os, src) { os } else { None };
    let od = if differs(&od, dst) { od } else { None };
    (os, od)
}

/// CLOCK_REALTIME − CLOCK_MONOTONIC now, to date `bpf_ktime_get_ns()` stamps.
pub fn clock_offset_ns() -> i128 {
    let now = |clock| {
        nix::time::clock_gettime(clock).map_or(0, |t| i128::from(t.tv_sec()) * 1_000_000_000 + i128::from(t.tv_nsec()))
    };
    now(nix::time::ClockId::CLOCK_REALTIME) - now(nix::time::ClockId::CLOCK_MONOTONIC)
}

fn ifname(raw: &[u8]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

/// What the headers say.
#[derive(Debug, PartialEq, Eq)]
pub struct Headers {
    pub protocol: Protocol,
    pub src: Option<Endpoint>,
    pub dst: Option<Endpoint>,
    pub tcp_flags: Option<TcpFlags>,
    pub icmp: Option<Icmp>,
    /// TCP or UDP payload bytes, from the IP and transport headers' own lengths (the capture
    /// itself is truncated).
    pub payload_len: Option<u32>,
}

/// Decodes captured L3+L4 headers. Truncated captures are expected (we keep 128 bytes), so the
/// lax etherparse slicer is used: it decodes what is there.
pub fn decode_headers(l3_proto: u16, headers: &[u8]) -> Headers {
    let mut out = Headers {
        protocol: Protocol::Ethertype(l3_proto),
        src: None,
        dst: None,
        tcp_flags: None,
        icmp: None,
        payload_len: None,
    };
    if headers.is_empty() {
        return out;
    }
    let Ok(pkt) = LaxSlicedPacket::from_ip(headers) else {
        return out;
    };
    // Where the IP packet ends, counted from the start of the capture.
    let (src, dst, proto, ip_end) = match &pkt.net {
        Some(LaxNetSlice::Ipv4(ip)) => {
            let h = ip.header();
            (
                IpAddr::V4(h.source_addr()),
                IpAddr::V4(h.destination_addr()),
                ip.payload().ip_number,
                usize::from(h.total_len()),
            )
        }
        Some(LaxNetSlice::Ipv6(ip)) => {
            let h = ip.header();
            (
                IpAddr::V6(h.source_addr()),
                IpAddr::V6(h.destination_addr()),
                ip.payload().ip_number,
                40 + usize::from(h.payload_length()),
            )
        }
        _ => return out,
    };
    // The transport header's offset in the capture (after any IPv6 extension headers).
    let offset_of = |part: &[u8]| (part.as_ptr() as usize).wrapping_sub(headers.as_ptr() as usize);
    out.protocol = Protocol::Ip(IpProto(proto.0));
    let (mut sport, mut dport) = (None, None);
    match &pkt.transport {
        Some(TransportSlice::Tcp(t)) => {
            sport = Some(t.source_port());
            dport = Some(t.destination_port());
            out.tcp_flags = Some(tcp_flags(t));
            let header_end = offset_of(t.slice()) + usize::from(t.data_offset()) * 4;
            out.payload_len = ip_end.checked_sub(header_end).map(|n| n as u32);
        }
        Some(TransportSlice::Udp(u)) => {
            sport = Some(u.source_port());
            dport = Some(u.destination_port());
            out.payload_len = u.length().checked_sub(8).map(u32::from);
        }
        Some(TransportSlice::Icmpv4(i)) => {
            out.icmp = Some(Icmp {
                kind: i.type_u8(),
                code: i.code_u8(),
            });
        }
        Some(TransportSlice::Icmpv6(i)) => {
            out.icmp = Some(Icmp {
                kind: i.type_u8(),
                code: i.code_u8(),
            });
        }
        _ => {}
    }
    out.src = Some(Endpoint::new(src, sport));
    out.dst = Some(Endpoint::new(dst, dport));
    out
}

fn tcp_flags(t: &etherparse::TcpSlice<'_>) -> TcpFlags {
    let bits = [
        (t.fin(), TcpFlags::FIN),
        (t.syn(), TcpFlags::SYN),
        (t.rst(), TcpFlags::RST),
        (t.psh(), TcpFlags::PSH),
        (t.ack(), TcpFlags::ACK),
        (t.urg(), TcpFlags::URG),
        (t.ece(), TcpFlags::ECE),
        (t.cwr(), TcpFlags::CWR),
    ];
    TcpFlags(bits.iter().filter(|(on, _)| *on).fold(0, |acc, (_, b)| acc | b))
}

#[cfg(test)]
mod tests {
    use etherparse::PacketBuilder;

    use super::*;

    fn udp4() -> Vec<u8> {
        let b = PacketBuilder::ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64).udp(40000, 53);
        let mut v = Vec::new();
        b.write(&mut v, &[0u8; 300]).expect("build");
        v.truncate(netdrop_common::HEADER_BYTES);
        v
    }

    #[test]
    fn decodes_truncated_udp4() {
        let h = decode_headers(0x0800, &udp4());
        assert_eq!(h.protocol, Protocol::Ip(IpProto::UDP));
        assert_eq!(h.src, Some(Endpoint::new("10.0.0.1".parse().expect("ip"), Some(40000))));
        assert_eq!(h.dst, Some(Endpoint::new("10.0.0.2".parse().expect("ip"), Some(53))));
    }

    #[test]
    fn payload_lengths_come_from_the_headers_not_the_capture() {
        assert_eq!(
            decode_headers(0x0800, &udp4()).payload_len,
            Some(300),
            "the capture keeps 128 bytes"
        );
        let b = PacketBuilder::ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .tcp(1234, 80, 7, 1000)
            .ack(9);
        let mut v = Vec::new();
        b.write(&mut v, &[]).expect("build");
        assert_eq!(decode_headers(0x0800, &v).payload_len, Some(0), "a bare ACK");
        let b = PacketBuilder::ipv6([0xfd; 16], [0xfe; 16], 64)
            .tcp(1234, 80, 7, 1000)
            .ack(9);
        let mut v = Vec::new();
        b.write(&mut v, &[1; 500]).expect("build");
        v.truncate(netdrop_common::HEADER_BYTES);
        assert_eq!(decode_headers(0x86dd, &v).payload_len, Some(500));
    }

    #[test]
    fn decodes_tcp6_syn() {
        let b = PacketBuilder::ipv6([0xfd; 16], [0xfe; 16], 64)
            .tcp(1234, 80, 1, 1000)
            .syn();
        let mut v = Vec::new();
        b.write(&mut v, &[]).expect("build");
        let h = decode_headers(0x86dd, &v);
        assert_eq!(h.protocol, Protocol::Ip(IpProto::TCP));
        assert_eq!(h.tcp_flags.map(|f| f.to_string()).as_deref(), Some("SYN"));
        assert_eq!(h.dst.expect("dst").port, Some(80));
    }

    #[test]
    fn decodes_icmp_echo() {
        let b = PacketBuilder::ipv4([1, 1, 1, 1], [2, 2, 2, 2], 64).icmpv4_echo_request(1, 2);
        let mut v = Vec::new();
        b.write(&mut v, &[0; 8]).expect("build");
        let h = decode_headers(0x0800, &v);
        assert_eq!(
            (h.protocol.to_string().as_str(), h.icmp),
            ("icmp", Some(Icmp { kind: 8, code: 0 }))
        );
        assert_eq!(h.src.expect("src").port, None);
    }

    #[test]
    fn no_headers_names_l3() {
        assert_eq!(decode_headers(0x0806, &[]).protocol.to_string(), "arp");
        assert_eq!(decode_headers(0x88cc, &[]).protocol.to_string(), "0x88cc");
    }

    #[test]
    fn garbage_does_not_panic() {
        for n in 0..64 {
            let junk: Vec<u8> = (0..n).map(|i| (i * 37 + 11) as u8).collect();
            let _ = decode_headers(0x0800, &junk);
            let _ = decode_headers(0x86dd, &junk);
        }
    }

    #[test]
    fn short_record_is_an_error() {
        assert!(parse_event(&[0u8; 10]).is_err());
    }
}
