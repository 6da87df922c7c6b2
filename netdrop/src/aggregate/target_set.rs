//! What a target trace watches: the target as asked ([`TargetSpec`]) and the addresses it
//! stands for now ([`TargetSet`]), encoded for the kernel's address filter and the tc
//! destination counters. Each member gets a tag the kernel counts its drops under.

use std::net::IpAddr;

use netdrop_common::{AddrKey, tag};

use crate::{
    resolve::{Peer, PeerKind, Proto, Resolver, ServiceInfo},
    source::interfaces::Destination,
};

/// What the user asked about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetSpec {
    Svc { namespace: String, name: String },
    Pod { namespace: String, name: String },
    Namespace(String),
    Node(String),
}

impl TargetSpec {
    /// `Service default/web`, `pod ...`, `namespace ...`, `node ...`.
    pub fn describe(&self) -> String {
        match self {
            Self::Svc { namespace, name } => format!("Service {namespace}/{name}"),
            Self::Pod { namespace, name } => format!("pod {namespace}/{name}"),
            Self::Namespace(n) => format!("namespace {n}"),
            Self::Node(n) => format!("node {n}"),
        }
    }

    /// The addresses the target stands for now.
    pub fn resolve(&self, r: &Resolver) -> Result<TargetSet, String> {
        match self {
            Self::Svc { namespace, name } => {
                let info = r.service(namespace, name).ok_or_else(|| {
                    format!("Service {namespace}/{name} not found (check the name and namespace: kubectl get svc -n {namespace})")
                })?;
                Ok(TargetSet::from_service(&info, &|n| r.node_ips(n).unwrap_or_default()))
            }
            Self::Pod { namespace, name } => {
                let pods = r.pods(Some(namespace), None, Some(name));
                if pods.is_empty() {
                    return Err(format!(
                        "pod {namespace}/{name} not found (kubectl get pods -n {namespace})"
                    ));
                }
                Ok(TargetSet::from_pods(self.describe(), &pods))
            }
            Self::Namespace(ns) => {
                let pods = r.pods(Some(ns), None, None);
                if pods.is_empty() {
                    return Err(format!("no pods in namespace {ns}"));
                }
                Ok(TargetSet::from_pods(self.describe(), &pods))
            }
            Self::Node(node) => {
                let mut pods = r.pods(None, Some(node), None);
                let ips = r
                    .node_ips(node)
                    .ok_or_else(|| format!("node {node} not found (kubectl get nodes)"))?;
                pods.push((
                    Peer {
                        kind: PeerKind::Node,
                        node: Some(node.as_str().into()),
                        ..Default::default()
                    },
                    ips,
                ));
                Ok(TargetSet::from_pods(self.describe(), &pods))
            }
        }
    }
}

/// One backend (or pod) the trace watches: an address with its ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetMember {
    /// `namespace/pod`, or the address when the endpoint has no pod.
    pub label: String,
    pub node: Option<String>,
    pub ip: IpAddr,
    /// (port, protocol) pairs; port 0 means any port of any protocol.
    pub ports: Vec<(u16, Proto)>,
    pub ready: bool,
    pub tag: u32,
}

/// A Service's addresses, as the kernel filter and the tc counters need them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetSet {
    /// `namespace/name`.
    pub service: String,
    /// ClusterIPs and external IPs with their ports, and NodePorts on node addresses.
    pub frontends: Vec<(IpAddr, u16, Proto)>,
    pub backends: Vec<TargetMember>,
}

pub(crate) fn ip_proto(p: Proto) -> u8 {
    p.ip().0
}

fn addr_key(ip: IpAddr, port: u16, proto: Proto) -> AddrKey {
    let mut addr = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => addr[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => addr = v6.octets(),
    }
    AddrKey {
        addr,
        port,
        proto: ip_proto(proto),
        _pad: 0,
    }
}

impl TargetSet {
    /// From the resolver's view of the Service. `node_ips` gives a node's addresses (for
    /// NodePorts). Backends keep a stable order (by pod, then address) so tags stay put across
    /// refreshes when the endpoints do not change.
    pub fn from_service(info: &ServiceInfo, node_ips: &dyn Fn(&str) -> Vec<IpAddr>) -> Self {
        let mut frontends = Vec::new();
        for p in &info.ports {
            for ip in info.cluster_ips.iter().chain(&info.external_ips) {
                frontends.push((*ip, p.port, p.protocol));
            }
        }
        let mut nodes: Vec<&str> = info.backends.iter().filter_map(|b| b.node.as_deref()).collect();
        nodes.sort_unstable();
        nodes.dedup();
        for p in info.ports.iter().filter(|p| p.node_port.is_some()) {
            for n in &nodes {
                for ip in node_ips(n) {
                    frontends.push((ip, p.node_port.unwrap_or_default(), p.protocol));
                }
            }
        }
        // One row per endpoint address, whatever the number of ports (a Service with TCP and
        // UDP ports has one endpoint per port per pod).
        let mut by_ip: Vec<TargetMember> = Vec::new();
        for b in &info.backends {
            if let Some(t) = by_ip.iter_mut().find(|t| t.ip == b.ip) {
                if !t.ports.contains(&(b.port, b.protocol)) {
                    t.ports.push((b.port, b.protocol));
                }
                t.ready &= b.ready;
                continue;
            }
            by_ip.push(TargetMember {
                label: match (&b.namespace, &b.pod) {
                    (Some(ns), Some(p)) => format!("{ns}/{p}"),
                    _ => b.ip.to_string(),
                },
                node: b.node.as_deref().map(String::from),
                ip: b.ip,
                ports: vec![(b.port, b.protocol)],
                ready: b.ready,
                tag: 0,
            });
        }
        let mut backends = by_ip;
        for t in &mut backends {
            t.ports.sort_unstable_by_key(|(p, proto)| (*p, ip_proto(*proto)));
        }
        backends.sort_by(|a, b| (&a.label, a.ip).cmp(&(&b.label, b.ip)));
        for (i, b) in backends.iter_mut().enumerate() {
            b.tag = tag::FIRST_BACKEND + i as u32;
        }
        Self {
            service: format!("{}/{}", info.namespace, info.name),
            frontends,
            backends,
        }
    }

    /// Pods as targets (`--pod`, `--namespace`, `--node`): every address of each, any port and
    /// protocol (port 0).
    pub fn from_pods(label: String, pods: &[(Peer, Vec<IpAddr>)]) -> Self {
        let mut backends = Vec::new();
        for (peer, ips) in pods {
            let name = match (&peer.namespace, &peer.pod) {
                (Some(ns), Some(p)) => format!("{ns}/{p}"),
                _ => peer.node.as_deref().unwrap_or("?").to_string(),
            };
            for ip in ips {
                backends.push(TargetMember {
                    label: name.clone(),
                    node: peer.node.as_deref().map(String::from),
                    ip: *ip,
                    ports: vec![(0, Proto::Tcp)],
                    ready: true,
                    tag: 0,
                });
            }
        }
        backends.sort_by(|a, b| (&a.label, a.ip).cmp(&(&b.label, b.ip)));
        for (i, b) in backends.iter_mut().enumerate() {
            b.tag = tag::FIRST_BACKEND + i as u32;
        }
        Self {
            service: label,
            frontends: Vec::new(),
            backends,
        }
    }

    /// `ADDR_FILTER` entries. A target with port 0 matches any port, for every IP protocol.
    pub fn addr_entries(&self) -> Vec<(AddrKey, u32)> {
        let mut v: Vec<(AddrKey, u32)> = self
            .frontends
            .iter()
            .map(|(ip, port, proto)| (addr_key(*ip, *port, *proto), tag::FRONTEND))
            .collect();
        for b in &self.backends {
            for (port, proto) in &b.ports {
                if *port == 0 {
                    for p in [1u8, 6, 17, 58, 132] {
                        let mut k = addr_key(b.ip, 0, *proto);
                        k.proto = p;
                        v.push((k, b.tag));
                    }
                } else {
                    v.push((addr_key(b.ip, *port, *proto), b.tag));
                }
            }
        }
        v
    }

    /// Destinations whose attempts the tc programs count: frontends and backends.
    pub fn destinations(&self) -> Vec<Destination> {
        let tcp_udp = |p: Proto| matches!(p, Proto::Tcp | Proto::Udp);
        self.frontends
            .iter()
            .filter(|(_, _, p)| tcp_udp(*p))
            .map(|(ip, port, proto)| Destination {
                ip: *ip,
                port: *port,
                proto: ip_proto(*proto),
            })
            .chain(self.backends.iter().flat_map(TargetMember::destinations))
            .collect()
    }
}

impl TargetMember {
    /// The tc destinations whose attempts delivered to this target are its attempts: each
    /// (port, protocol) of TCP and UDP; for port 0 (a pod: any port), the address's TCP and UDP
    /// any-port entries, which count every SYN and datagram to it.
    pub fn destinations(&self) -> Vec<Destination> {
        let mut v = Vec::new();
        for (port, proto) in &self.ports {
            if *port == 0 {
                for p in [6, 17] {
                    v.push(Destination {
                        ip: self.ip,
                        port: 0,
                        proto: p,
                    });
                }
            } else if matches!(proto, Proto::Tcp | Proto::Udp) {
                v.push(Destination {
                    ip: self.ip,
                    port: *port,
                    proto: ip_proto(*proto),
                });
            }
        }
        v.sort_by_key(|d| (d.port, d.proto));
        v.dedup();
        v
    }
}
