//! The event model every stage after decoding shares, and every sink (terminal, JSON lines,
//! metrics, capture files) consumes. Field names here are the JSON schema: keep them stable.
//! Values stay typed (reason, protocol, classification, time, addresses, flags); serde and the
//! sinks turn them into text, and no stage reads another stage's text back.

use std::{fmt, net::IpAddr, time::SystemTime};

use serde::{Serialize, Serializer, ser::SerializeStruct as _};

use crate::{
    enrich::classify::{Certainty, Classification, Effect},
    kernel::{proto::Protocol, reasons::Reason, symbols::Location},
};

/// One dropped packet, typed from the ring buffer to the sinks: the sinks (and serde here)
/// are the only places its values become text.
#[derive(Debug, Clone, Serialize)]
pub struct DropRecord {
    /// Always `"drop"`: JSON lines mix drops and summaries.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// JSON: RFC 3339, nanoseconds, UTC.
    #[serde(serialize_with = "rfc3339_nanos")]
    pub time: SystemTime,
    /// The node (host) the drop happened on.
    pub node: String,
    /// JSON: `reason`, the kernel's name (`NO_SOCKET`, or the number when this kernel has no
    /// name for it), and `reason_code`, the raw `enum skb_drop_reason` value on this kernel
    /// (numbers differ between kernels).
    #[serde(flatten, serialize_with = "reason_and_code")]
    pub reason: Reason,
    /// Where the kernel freed the packet: `symbol+0xoff`.
    pub location: Location,
    /// `tcp`, `udp`, `icmp`, `icmpv6`, ... or the L3 protocol (`arp`, `0x88cc`) without IP.
    pub protocol: Protocol,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub src: Option<Endpoint>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst: Option<Endpoint>,
    pub ifindex: u32,
    pub ifname: String,
    /// Network namespace inode (as in `ls -l /proc/PID/ns/net`); `null` when the kernel left
    /// no way to tell (no device, receiving socket or route on the packet).
    #[serde(serialize_with = "crate::enrich::classify::netns_or_null")]
    pub netns: u32,
    /// `skb->len`.
    pub len: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_flags: Option<TcpFlags>,
    /// TCP/UDP payload bytes (from the headers' lengths): 0 for a bare ACK, which carries no data.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_len: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmp: Option<Icmp>,
    /// What the drop is: the reason in lower case (`no_socket`), or for NETFILTER_DROP one of
    /// `netfilter_rule`, `conntrack_insert_failed`, `conntrack_table_full`, `conntrack_invalid`.
    pub classification: Classification,
    /// `exact` or `inferred`.
    pub certainty: Certainty,
    /// What the drop cost, decided by the kernel program: `attempt` (SYN, UDP datagram),
    /// `data`, `lossless` (a bare ACK or data already received), `reset` (answered with a
    /// reset), `unknown` (not parsed; counted as a loss).
    pub effect: Effect,
    /// The packet's conntrack entry: `none`, `unconfirmed`, `confirmed`, `untracked` (absent
    /// when the kernel has no conntrack).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conntrack: Option<CtState>,
    /// Where the flow was addressed to before NAT (a Service's ClusterIP:port), when NAT
    /// changed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub orig_dst: Option<Endpoint>,
    /// Where the flow came from before NAT (a pod's own address under SNAT), when NAT changed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub orig_src: Option<Endpoint>,
    /// The watched address the packet matched (`--svc`: a backend's tag, or the frontend's), as
    /// the kernel counted it (`DropKey::tag`); 0 without targets. Not in the JSON schema.
    #[serde(skip)]
    pub tag: u32,
    /// 4 or 6, or 0 for a packet without an IP header (`DropKey::ip_version`). Not in the JSON
    /// schema.
    #[serde(skip)]
    pub ip_version: u8,
    /// Kernel-side detail kept for sinks that need it (captures), not serialised.
    #[serde(skip)]
    pub raw: RawDetail,
}

fn rfc3339_nanos<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_nanos(*t))
}

/// `"reason":"NO_SOCKET","reason_code":3` (flattened into the record).
fn reason_and_code<S: Serializer>(r: &Reason, s: S) -> Result<S::Ok, S::Error> {
    let mut st = s.serialize_struct("Reason", 2)?;
    st.serialize_field("reason", &format_args!("{r}"))?;
    st.serialize_field("reason_code", &r.code())?;
    st.end()
}

/// A TCP segment's flags, as in its header (FIN is bit 0 ... CWR bit 7). Prints `SYN|ACK`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TcpFlags(pub u8);

impl TcpFlags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;
    pub const ECE: u8 = 0x40;
    pub const CWR: u8 = 0x80;

    pub fn has(self, flag: u8) -> bool {
        self.0 & flag != 0
    }
}

impl fmt::Display for TcpFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The order users read them in (SYN|ACK), not the header's bit order.
        const ORDER: [(u8, &str); 8] = [
            (TcpFlags::SYN, "SYN"),
            (TcpFlags::ACK, "ACK"),
            (TcpFlags::FIN, "FIN"),
            (TcpFlags::RST, "RST"),
            (TcpFlags::PSH, "PSH"),
            (TcpFlags::URG, "URG"),
            (TcpFlags::ECE, "ECE"),
            (TcpFlags::CWR, "CWR"),
        ];
        let mut first = true;
        for (bit, name) in ORDER {
            if self.has(bit) {
                if !first {
                    f.write_str("|")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        Ok(())
    }
}

impl Serialize for TcpFlags {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The packet's conntrack entry, as the kernel program read it (`netdrop_common::ct`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CtState {
    None,
    Unconfirmed,
    Confirmed,
    Untracked,
}

impl CtState {
    pub fn from_raw(ct_state: u8) -> Self {
        use netdrop_common::ct;
        match ct_state & ct::STATE_MASK {
            ct::UNCONFIRMED => Self::Unconfirmed,
            ct::CONFIRMED => Self::Confirmed,
            ct::UNTRACKED => Self::Untracked,
            _ => Self::None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Unconfirmed => "unconfirmed",
            Self::Confirmed => "confirmed",
            Self::Untracked => "untracked",
        }
    }
}

/// One end of a packet, with what Kubernetes says it is (`kind`, `pod`, `namespace`, `node`,
/// `service`, `service_port`, `workload`, `ready`) when resolution is on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub ip: IpAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub k8s: Option<crate::resolve::Peer>,
}

impl Endpoint {
    pub fn new(ip: IpAddr, port: Option<u16>) -> Self {
        Self { ip, port, k8s: None }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Icmp {
    #[serde(rename = "type")]
    pub kind: u8,
    pub code: u8,
}

/// What the kernel sent beyond the decoded fields.
#[derive(Debug, Clone, Default)]
pub struct RawDetail {
    pub ts_ns: u64,
    pub location: u64,
    pub skb_addr: u64,
    pub cpu: u32,
    pub l3_proto: u16,
    pub ct_state: u8,
    pub ct_info: u8,
    /// The kernel program's [`netdrop_common::class`] for the skb (the ABI's `exact_class`): from
    /// the precise hooks (exact) or from the TCP flags (an inference), else 0.
    pub kernel_class: u8,
    /// The packet from its network header, as captured (at most `HEADER_BYTES`).
    pub headers: Vec<u8>,
}
