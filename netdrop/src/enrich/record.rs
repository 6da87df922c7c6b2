//! The event model every stage after decoding shares, and every sink (terminal, JSON lines,
//! metrics, capture files) consumes. Field names here are the JSON schema: keep them stable.

use std::net::IpAddr;

use serde::Serialize;

use crate::enrich::classify::Certainty;

/// One dropped packet.
#[derive(Debug, Clone, Serialize)]
pub struct DropRecord {
    /// Always `"drop"`: JSON lines mix drops and summaries.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// RFC 3339, nanoseconds, UTC.
    pub time: String,
    /// The node (host) the drop happened on.
    pub node: String,
    /// Kernel drop reason name (`NO_SOCKET`), or the number when this kernel has no name for it.
    pub reason: String,
    /// The raw `enum skb_drop_reason` value on this kernel (numbers differ between kernels).
    pub reason_code: u32,
    /// Where the kernel freed the packet: `symbol+0xoff`.
    pub location: String,
    /// `tcp`, `udp`, `icmp`, `icmpv6`, ... or the L3 protocol (`arp`, `0x88cc`) without IP.
    pub protocol: String,
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
    pub tcp_flags: Option<String>,
    /// TCP/UDP payload bytes (from the headers' lengths): 0 for a bare ACK, which carries no data.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_len: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmp: Option<Icmp>,
    /// What the drop is: the reason in lower case (`no_socket`), or for NETFILTER_DROP one of
    /// `netfilter_rule`, `conntrack_insert_failed`, `conntrack_table_full`, `conntrack_invalid`.
    pub classification: String,
    /// `exact` or `inferred`.
    pub certainty: Certainty,
    /// What the drop cost, decided by the kernel program: `attempt` (SYN, UDP datagram),
    /// `data`, `lossless` (a bare ACK or data already received), `reset` (answered with a
    /// reset), `unknown` (not parsed; counted as a loss).
    pub effect: crate::enrich::classify::Effect,
    /// The packet's conntrack entry: `none`, `unconfirmed`, `confirmed`, `untracked` (absent
    /// when the kernel has no conntrack).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conntrack: Option<&'static str>,
    /// Where the flow was addressed to before NAT (a Service's ClusterIP:port), when NAT
    /// changed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub orig_dst: Option<Endpoint>,
    /// Where the flow came from before NAT (a pod's own address under SNAT), when NAT changed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub orig_src: Option<Endpoint>,
    /// Kernel-side detail kept for sinks that need it (captures), not serialised.
    #[serde(skip)]
    pub raw: RawDetail,
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
