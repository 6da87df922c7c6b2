//! What the tc counters say at one moment: per interface, per destination, and the watchers'
//! own statistics; and the link events as they happen.

use std::{net::IpAddr, str::FromStr};

use netdrop_common::TcDestKey;
use serde::Serialize;

use crate::probe::tc::TcMode;

/// Counters of one interface and direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
    /// TCP SYN without ACK (each SYN, retransmissions included).
    pub tcp_syn: u64,
    /// First packets of UDP flows (5-tuple unseen on this interface for 30 s).
    pub udp_new: u64,
}

impl Counters {
    /// Connection attempts: TCP SYNs and new UDP flows.
    pub fn attempts(&self) -> u64 {
        self.tcp_syn + self.udp_new
    }

    pub(crate) fn add(&mut self, o: &Self) {
        self.packets += o.packets;
        self.bytes += o.bytes;
        self.tcp_syn += o.tcp_syn;
        self.udp_new += o.udp_new;
    }
}

impl From<netdrop_common::TcCounters> for Counters {
    fn from(c: netdrop_common::TcCounters) -> Self {
        Self {
            packets: c.packets,
            bytes: c.bytes,
            tcp_syn: c.tcp_syn,
            udp_new: c.udp_new,
        }
    }
}

/// One watched interface with its counters.
#[derive(Clone, Debug, Serialize)]
pub struct InterfaceSnapshot {
    /// Node the interface belongs to (the namespace it lives in).
    pub node: String,
    /// Inode of that network namespace.
    pub netns: u32,
    pub ifindex: u32,
    pub name: String,
    /// ifindex of the veth peer (the pod's `eth0`) inside its own namespace.
    pub peer_ifindex: Option<u32>,
    /// The peer namespace's id as seen from `netns` (`IFLA_LINK_NETNSID`).
    pub peer_netnsid: Option<i32>,
    /// Inode of the peer (pod) namespace, when it could be found.
    pub peer_netns: Option<u32>,
    pub mode: TcMode,
    /// When the programs were attached (Unix ms).
    pub attached_unix_ms: u64,
    /// Sent by the pod (tc ingress of the host-side veth).
    pub from_pod: Counters,
    /// Delivered to the pod (tc egress of the host-side veth).
    pub to_pod: Counters,
}

/// A destination whose connection attempts are counted (a Service backend, a `ClusterIP`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Destination {
    pub ip: IpAddr,
    pub port: u16,
    /// IP protocol: 6 (TCP) or 17 (UDP).
    pub proto: u8,
}

impl Destination {
    pub(super) fn key(&self) -> TcDestKey {
        let mut addr = [0u8; 16];
        let family = match self.ip {
            IpAddr::V4(v4) => {
                addr[..4].copy_from_slice(&v4.octets());
                4
            }
            IpAddr::V6(v6) => {
                addr = v6.octets();
                6
            }
        };
        TcDestKey {
            addr,
            port: self.port,
            proto: self.proto,
            family,
        }
    }
}

impl FromStr for Destination {
    type Err = String;

    /// `IP:PORT/PROTO`, e.g. `10.96.0.10:53/udp`, `[fd00::1]:443/tcp`; PROTO defaults to tcp.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match crate::resolve::parse_addr_port_proto(s)? {
            (ip, Some((port, p @ (crate::resolve::Proto::Tcp | crate::resolve::Proto::Udp)))) => Ok(Self {
                ip,
                port,
                proto: p.ip().0,
            }),
            (_, Some(_)) => Err(format!("{s:?}: attempts are counted for tcp and udp")),
            (_, None) => Err(format!("{s:?}: expected IP:PORT[/tcp|/udp], e.g. 10.96.0.10:53/udp")),
        }
    }
}

/// Attempts to one destination seen on one node's interfaces.
#[derive(Clone, Debug, Serialize)]
pub struct DestinationSnapshot {
    pub node: String,
    #[serde(flatten)]
    pub dest: Destination,
    /// Sent by pods on this node (TCP SYNs, UDP datagrams on a from-pod path).
    pub from_pod: u64,
    /// Delivered to pods on this node (TCP SYNs, UDP datagrams on a to-pod path).
    pub to_pod: u64,
}

/// What the watchers did, summed over nodes.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct WatchStats {
    pub link_events: u64,
    pub attached: u64,
    pub forgotten: u64,
    pub attach_errors: u64,
    /// Times the event socket overflowed and the links were listed again.
    pub resyncs: u64,
    /// Filters of killed earlier runs removed at start-up.
    pub leftovers_removed: u64,
    /// Packets on an attached interface without a counter entry (should stay 0).
    pub unregistered_packets: u64,
    pub flow_insert_failed: u64,
    pub short_packets: u64,
}

/// Everything at one moment.
#[derive(Clone, Debug, Serialize)]
pub struct TcSnapshot {
    pub interfaces: Vec<InterfaceSnapshot>,
    pub destinations: Vec<DestinationSnapshot>,
    pub stats: WatchStats,
}

impl TcSnapshot {
    /// The interface named `name` on `node`.
    pub fn interface(&self, node: &str, name: &str) -> Option<&InterfaceSnapshot> {
        self.interfaces.iter().find(|i| i.node == node && i.name == name)
    }

    /// Attempts to `dest` summed over nodes: (from pods, to pods).
    pub fn attempts_to(&self, dest: &Destination) -> (u64, u64) {
        self.destinations
            .iter()
            .filter(|d| d.dest == *dest)
            .fold((0, 0), |(a, b), d| (a + d.from_pod, b + d.to_pod))
    }
}

/// A change in the set of watched interfaces, as it happens.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum WatchEvent {
    Attached {
        node: String,
        ifindex: u32,
        name: String,
        unix_ms: u64,
    },
    Forgotten {
        node: String,
        ifindex: u32,
        name: String,
        unix_ms: u64,
    },
    Error {
        node: String,
        ifindex: u32,
        name: String,
        message: String,
    },
}

pub(super) fn dest_from_key(k: &TcDestKey) -> Destination {
    let ip = if k.family == 4 {
        IpAddr::from([k.addr[0], k.addr[1], k.addr[2], k.addr[3]])
    } else {
        IpAddr::from(k.addr)
    };
    Destination {
        ip,
        port: k.port,
        proto: k.proto,
    }
}
